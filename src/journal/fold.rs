//! Job state as a pure fold of events: no I/O, no clock, nothing but `apply`, which reads each
//! event in its stored form (`EventView`), so replay and the live daemon fold the same bytes.
//!
//! The fold keeps what status listings and the recovery decisions need; bulky payloads (the
//! input workitem, the spec) stay in the log and are read by seq (`input_seq`) when needed.

use super::event::{Event, Mode, Status};
use crate::workitem::Urls;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Claimed, not yet read.
    #[default]
    Claimed,
    /// Not a workitem; moved to rejected/.
    Rejected,
    /// Waiting for a build slot.
    Queued,
    /// A build was started and has not finished.
    Building,
    /// A build was interrupted and waits to be built again.
    Interrupted,
    /// Finished (or invalid, or cancelled): the reply is decided but not yet in the outbox.
    Finished,
    /// The reply is in the outbox.
    Delivered,
    /// A dead worker's claimed file handed back to incoming/ (`requeue --worker`).
    Moved,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Claimed => "claimed",
            State::Rejected => "rejected",
            State::Queued => "queued",
            State::Building => "building",
            State::Interrupted => "interrupted",
            State::Finished => "finished",
            State::Delivered => "delivered",
            State::Moved => "moved",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Job {
    pub id: u64,
    pub state: State,
    pub file: Option<String>,
    pub worker: Option<String>,
    pub bytes: u64,
    pub sha256: Option<String>,
    pub image_id: Option<String>,
    pub name: Option<String>,
    pub arch: Option<String>,
    pub image_type: Option<String>,
    /// The seq of the `queued` or `invalid` event holding the input workitem.
    pub input_seq: Option<u64>,
    pub mode: Option<Mode>,
    pub attempts: u32,
    pub interruptions: u32,
    pub result: Option<bool>,
    pub error: Option<String>,
    pub urls: Urls,
    pub outbox: Option<String>,
    pub reason: Option<String>,
    /// The final status (DONE/ERROR) has been pushed successfully.
    pub final_pushed: bool,
    /// Attempts at pushing the final status.
    pub final_push_attempts: u32,
    pub claimed_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub last_seq: u64,
}

impl Job {
    /// The status pushed when the job is over.
    pub fn final_status(&self) -> Status {
        if self.result == Some(true) {
            Status::Done
        } else {
            Status::Error
        }
    }

    /// Nothing is left to do for this job: rejected, or answered and its final status pushed
    /// (or every push attempt, 1 + `push_retries`, spent).
    pub fn is_settled(&self, push_retries: u32) -> bool {
        match self.state {
            State::Rejected | State::Moved => true,
            State::Delivered => self.final_pushed || self.final_push_attempts > push_retries,
            _ => false,
        }
    }

    /// Applies one event of this job (as stored). The only place job state changes.
    pub fn apply(&mut self, ev: &EventView<'_>) {
        let s = |c: &Option<Cow<'_, str>>| c.as_deref().map(str::to_string);
        let ts = || Some(ev.ts.to_string());
        self.id = ev.job;
        self.last_seq = ev.seq;
        match &*ev.kind {
            "claimed" => {
                self.state = State::Claimed;
                self.file = s(&ev.file);
                self.worker = s(&ev.worker);
                self.bytes = ev.bytes.unwrap_or_default();
                self.sha256 = s(&ev.sha256);
                // A file read again after it grew is claimed again; it was claimed first then.
                self.claimed_at.get_or_insert_with(|| ev.ts.to_string());
            }
            "rejected" => {
                self.state = State::Rejected;
                if self.file.is_none() {
                    self.file = s(&ev.file);
                }
                self.reason = s(&ev.reason);
                self.claimed_at.get_or_insert_with(|| ev.ts.to_string());
            }
            "invalid" => {
                self.state = State::Finished;
                self.image_id = s(&ev.image_id);
                self.input_seq = Some(ev.seq);
                self.result = Some(false);
                self.error = s(&ev.error);
                self.finished_at = ts();
            }
            "queued" => {
                self.state = State::Queued;
                self.image_id = s(&ev.image_id);
                if let Some(spec) = &ev.spec {
                    self.name = Some(spec.name.to_string());
                    self.arch = Some(spec.arch.to_string());
                    self.image_type = Some(spec.image_type.to_string());
                }
                self.input_seq = Some(ev.seq);
            }
            "started" => {
                self.state = State::Building;
                self.mode = ev.mode;
                self.attempts = ev.attempt.unwrap_or(self.attempts + 1);
                self.started_at = ts();
            }
            "finished" => {
                self.state = State::Finished;
                self.result = ev.result;
                self.error = s(&ev.error);
                self.urls = ev.urls.clone().unwrap_or_default();
                self.finished_at = ts();
            }
            "delivered" => {
                self.state = State::Delivered;
                self.outbox = s(&ev.outbox);
            }
            "pushed" if ev.status != Some(Status::Building) && self.state == State::Delivered => {
                self.final_push_attempts += 1;
                if ev.ok == Some(true) {
                    self.final_pushed = true;
                }
            }
            "cancelled" => self.reason = s(&ev.reason),
            "requeued" if ev.file.is_some() && self.input_seq.is_none() => {
                self.state = State::Moved;
                self.file = s(&ev.file);
                self.worker = s(&ev.from_worker);
                self.reason = s(&ev.reason);
            }
            "requeued" => {
                self.state = State::Queued;
                self.reason = s(&ev.reason);
                self.result = None;
                self.error = None;
                self.urls = Urls::default();
                self.outbox = None;
                self.final_pushed = false;
                self.final_push_attempts = 0;
                self.finished_at = None;
            }
            "interrupted" => {
                self.state = State::Interrupted;
                self.interruptions += 1;
                self.reason = s(&ev.reason);
            }
            _ => {} // a kind from a newer version: nothing this one knows to change
        }
    }

    /// Applies an event given as the typed value (the same as its stored form).
    pub fn apply_event(&mut self, ev: &Event) {
        if let Ok(bytes) = serde_json::to_vec(ev)
            && let Ok(view) = serde_json::from_slice::<EventView<'_>>(&bytes)
        {
            self.apply(&view);
        }
    }
}

/// An event as the fold reads it: borrowed from the stored JSON, only the fields the fold
/// uses (deserialising the typed [`Event`] costs several times more, see docs/PERFORMANCE.md).
#[derive(Debug, Default, Deserialize)]
pub struct EventView<'a> {
    pub seq: u64,
    pub job: u64,
    #[serde(borrow)]
    pub ts: Cow<'a, str>,
    #[serde(borrow)]
    pub kind: Cow<'a, str>,
    #[serde(borrow, default)]
    pub file: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub worker: Option<Cow<'a, str>>,
    #[serde(default)]
    pub bytes: Option<u64>,
    #[serde(borrow, default)]
    pub sha256: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub reason: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub image_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub error: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub spec: Option<SpecView<'a>>,
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub attempt: Option<u32>,
    #[serde(default)]
    pub result: Option<bool>,
    #[serde(default)]
    pub urls: Option<Urls>,
    #[serde(borrow, default)]
    pub outbox: Option<Cow<'a, str>>,
    #[serde(default)]
    pub status: Option<Status>,
    #[serde(default)]
    pub ok: Option<bool>,
    #[serde(borrow, default)]
    pub from_worker: Option<Cow<'a, str>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct SpecView<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    #[serde(borrow)]
    pub arch: Cow<'a, str>,
    #[serde(borrow)]
    pub image_type: Cow<'a, str>,
}

/// Every job of a log, by job id.
pub type Jobs = BTreeMap<u64, Job>;

/// Applies one event (as stored) to the map of jobs.
pub fn apply(jobs: &mut Jobs, ev: &EventView<'_>) {
    jobs.entry(ev.job).or_default().apply(ev);
}

/// Applies one typed event to the map of jobs.
pub fn apply_event(jobs: &mut Jobs, ev: &Event) {
    jobs.entry(ev.job).or_default().apply_event(ev);
}

/// Folds a sequence of events from empty.
pub fn fold<'a>(events: impl IntoIterator<Item = &'a Event>) -> Jobs {
    let mut jobs = Jobs::new();
    for ev in events {
        apply_event(&mut jobs, ev);
    }
    jobs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::event::EventKind;
    use crate::workitem::Spec;
    use serde_json::json;

    fn ev(seq: u64, job: u64, kind: EventKind) -> Event {
        Event {
            seq,
            ts: format!("2026-11-24T00:00:{seq:02}Z"),
            job,
            kind,
        }
    }

    fn spec() -> Spec {
        Spec {
            image_id: "7-1".into(),
            dir_id: "7-1".into(),
            kickstart: "ks".into(),
            image_type: "fs".into(),
            name: "n".into(),
            arch: "i586".into(),
            prefix: "requests".into(),
            release: None,
            tokenmap: None,
            extra_opts: vec![],
        }
    }

    fn claimed() -> EventKind {
        EventKind::Claimed {
            file: "a.json".into(),
            worker: "w1".into(),
            bytes: 10,
            sha256: "ab".into(),
        }
    }

    #[test]
    fn happy_path() {
        let events = vec![
            ev(1, 1, claimed()),
            ev(
                2,
                1,
                EventKind::Queued {
                    image_id: "7-1".into(),
                    spec: Box::new(spec()),
                    input: json!({}),
                },
            ),
            ev(
                3,
                1,
                EventKind::Started {
                    mode: Mode::Native,
                    attempt: 1,
                },
            ),
            ev(
                4,
                1,
                EventKind::Pushed {
                    status: Status::Building,
                    exit: Some(0),
                    ok: true,
                    error: None,
                },
            ),
            ev(
                5,
                1,
                EventKind::Finished {
                    result: true,
                    error: None,
                    urls: Urls::default(),
                },
            ),
            ev(
                6,
                1,
                EventKind::Delivered {
                    outbox: "a.json".into(),
                },
            ),
        ];
        let jobs = fold(&events);
        let j = &jobs[&1];
        assert_eq!(j.state, State::Delivered);
        assert_eq!(j.input_seq, Some(2));
        assert_eq!(j.attempts, 1);
        assert!(!j.is_settled(0), "final status not pushed yet");
        assert_eq!(j.final_status(), Status::Done);
        let mut jobs = jobs;
        apply_event(
            &mut jobs,
            &ev(
                7,
                1,
                EventKind::Pushed {
                    status: Status::Done,
                    exit: Some(1),
                    ok: false,
                    error: None,
                },
            ),
        );
        assert!(!jobs[&1].is_settled(1));
        assert!(
            jobs[&1].is_settled(0),
            "no retries: one failed attempt settles it"
        );
        assert_eq!(jobs[&1].final_push_attempts, 1);
        apply_event(
            &mut jobs,
            &ev(
                8,
                1,
                EventKind::Pushed {
                    status: Status::Done,
                    exit: Some(0),
                    ok: true,
                    error: None,
                },
            ),
        );
        assert!(jobs[&1].is_settled(1));
    }

    #[test]
    fn interleaved_jobs_and_interruptions() {
        let events = vec![
            ev(1, 1, claimed()),
            ev(2, 2, claimed()),
            ev(
                3,
                2,
                EventKind::Rejected {
                    file: "b".into(),
                    reason: "empty file".into(),
                },
            ),
            ev(
                4,
                1,
                EventKind::Queued {
                    image_id: "7-1".into(),
                    spec: Box::new(spec()),
                    input: json!({}),
                },
            ),
            ev(
                5,
                1,
                EventKind::Started {
                    mode: Mode::Native,
                    attempt: 1,
                },
            ),
            ev(
                6,
                1,
                EventKind::Interrupted {
                    reason: "daemon stopped".into(),
                },
            ),
            ev(
                7,
                9,
                EventKind::Rejected {
                    file: "c".into(),
                    reason: "symlink".into(),
                },
            ),
        ];
        let jobs = fold(&events);
        assert_eq!(jobs.len(), 3);
        assert_eq!(jobs[&1].state, State::Interrupted);
        assert_eq!(jobs[&1].interruptions, 1);
        assert_eq!(jobs[&2].state, State::Rejected);
        assert!(jobs[&2].is_settled(0));
        assert_eq!(jobs[&9].file.as_deref(), Some("c"));
    }

    #[test]
    fn invalid_is_finished_with_error() {
        let jobs = fold(&[
            ev(1, 1, claimed()),
            ev(
                2,
                1,
                EventKind::Invalid {
                    image_id: Some("x".into()),
                    error: "missing".into(),
                    input: json!({}),
                },
            ),
        ]);
        assert_eq!(jobs[&1].state, State::Finished);
        assert_eq!(jobs[&1].result, Some(false));
        assert_eq!(jobs[&1].final_status(), Status::Error);
    }

    #[test]
    fn event_json_shape() {
        let e = ev(
            5,
            1,
            EventKind::Started {
                mode: Mode::Native,
                attempt: 2,
            },
        );
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            json!({"seq": 5, "ts": "2026-11-24T00:00:05Z", "job": 1, "kind": "started", "mode": "native", "attempt": 2})
        );
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }
}
