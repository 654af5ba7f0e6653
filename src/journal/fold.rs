//! Job state as a pure fold of events: no I/O, no clock, nothing but `apply`.
//!
//! The fold keeps what status listings and the recovery decisions need; bulky payloads (the
//! input workitem, the spec) stay in the log and are read by seq (`input_seq`) when needed.

use super::event::{Event, EventKind, Mode, Status};
use crate::workitem::Urls;
use serde::{Deserialize, Serialize};
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

    /// Applies one event of this job. The only place job state changes.
    pub fn apply(&mut self, ev: &Event) {
        self.id = ev.job;
        self.last_seq = ev.seq;
        match &ev.kind {
            EventKind::Claimed {
                file,
                worker,
                bytes,
                sha256,
            } => {
                self.state = State::Claimed;
                self.file = Some(file.clone());
                self.worker = Some(worker.clone());
                self.bytes = *bytes;
                self.sha256 = Some(sha256.clone());
                // A file read again after it grew is claimed again; it was claimed first then.
                self.claimed_at.get_or_insert_with(|| ev.ts.clone());
            }
            EventKind::Rejected { file, reason } => {
                self.state = State::Rejected;
                self.file.get_or_insert_with(|| file.clone());
                self.reason = Some(reason.clone());
                self.claimed_at.get_or_insert_with(|| ev.ts.clone());
            }
            EventKind::Invalid {
                image_id, error, ..
            } => {
                self.state = State::Finished;
                self.image_id = image_id.clone();
                self.input_seq = Some(ev.seq);
                self.result = Some(false);
                self.error = Some(error.clone());
                self.finished_at = Some(ev.ts.clone());
            }
            EventKind::Queued { image_id, spec, .. } => {
                self.state = State::Queued;
                self.image_id = Some(image_id.clone());
                self.name = Some(spec.name.clone());
                self.arch = Some(spec.arch.clone());
                self.image_type = Some(spec.image_type.clone());
                self.input_seq = Some(ev.seq);
            }
            EventKind::Started { mode, attempt } => {
                self.state = State::Building;
                self.mode = Some(*mode);
                self.attempts = *attempt;
                self.started_at = Some(ev.ts.clone());
            }
            EventKind::Finished {
                result,
                error,
                urls,
            } => {
                self.state = State::Finished;
                self.result = Some(*result);
                self.error = error.clone();
                self.urls = urls.clone();
                self.finished_at = Some(ev.ts.clone());
            }
            EventKind::Delivered { outbox } => {
                self.state = State::Delivered;
                self.outbox = Some(outbox.clone());
            }
            EventKind::Pushed { status, ok, .. } => {
                if *status != Status::Building && self.state == State::Delivered {
                    self.final_push_attempts += 1;
                    if *ok {
                        self.final_pushed = true;
                    }
                }
            }
            EventKind::Cancelled { reason } => {
                self.reason = Some(reason.clone());
            }
            EventKind::Requeued {
                reason,
                file: Some(file),
                from_worker,
            } if self.input_seq.is_none() => {
                self.state = State::Moved;
                self.file = Some(file.clone());
                self.worker = from_worker.clone();
                self.reason = Some(reason.clone());
            }
            EventKind::Requeued { reason, .. } => {
                self.state = State::Queued;
                self.reason = Some(reason.clone());
                self.result = None;
                self.error = None;
                self.urls = Urls::default();
                self.outbox = None;
                self.final_pushed = false;
                self.final_push_attempts = 0;
                self.finished_at = None;
            }
            EventKind::Interrupted { reason } => {
                self.state = State::Interrupted;
                self.interruptions += 1;
                self.reason = Some(reason.clone());
            }
        }
    }
}

/// Every job of a log, by job id.
pub type Jobs = BTreeMap<u64, Job>;

/// Applies one event to the map of jobs.
pub fn apply(jobs: &mut Jobs, ev: &Event) {
    jobs.entry(ev.job).or_default().apply(ev);
}

/// Folds a sequence of events from empty.
pub fn fold<'a>(events: impl IntoIterator<Item = &'a Event>) -> Jobs {
    let mut jobs = Jobs::new();
    for ev in events {
        apply(&mut jobs, ev);
    }
    jobs
}

#[cfg(test)]
mod tests {
    use super::*;
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
        apply(
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
        apply(
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
