//! Job state as a pure fold of events: no I/O, no clock, nothing but `apply`, which reads each
//! event in its stored form (`EventView`), so replay and the live daemon fold the same bytes.
//!
//! The fold keeps what status listings and the recovery decisions need; bulky payloads (the
//! input workitem, the spec) stay in the log and are read by seq (`input_seq`) when needed.

use super::event::{Cause, Event, Mode, Status, Tag};
use super::origin::{Origin, Receipt, ReceiptFields, ReplyTo};
use super::workitem::Urls;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Where a job is: the one vocabulary of `status`, `show`, `--json` and error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Claimed, not yet read.
    #[default]
    Claimed,
    /// Waiting for a build slot.
    Queued,
    /// A build was started and has not finished.
    Building,
    /// A build was interrupted and waits to be built again.
    Interrupted,
    /// Decided (built, invalid, conflict or cancelled), the answer not yet sent.
    Finished,
    /// Answered: the image was built.
    Done,
    /// Answered: it failed (build, validation, conflict, cancel).
    Error,
    /// Not a workitem; moved to rejected/.
    Rejected,
    /// A dead worker's claimed file handed back to incoming/ (`requeue --worker`), or events
    /// moved to an archive (`compact`): a record settled at once.
    Moved,
}

impl State {
    /// Every state, in the order of a job's life.
    pub const ALL: [State; 9] = [
        State::Claimed,
        State::Queued,
        State::Building,
        State::Interrupted,
        State::Finished,
        State::Done,
        State::Error,
        State::Rejected,
        State::Moved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Claimed => "claimed",
            State::Queued => "queued",
            State::Building => "building",
            State::Interrupted => "interrupted",
            State::Finished => "finished",
            State::Done => "done",
            State::Error => "error",
            State::Rejected => "rejected",
            State::Moved => "moved",
        }
    }

    /// The state named `s`, if there is one.
    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The answer was sent.
    pub fn is_answered(self) -> bool {
        matches!(self, State::Done | State::Error)
    }

    /// Is the job past any build (its build log will not grow)? Decided (an answer not yet
    /// sent included), answered, not a workitem, or moved away.
    pub fn has_ended(self) -> bool {
        matches!(
            self,
            State::Finished | State::Done | State::Error | State::Rejected | State::Moved
        )
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A byte-identical re-drop of a job, answered with the job's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Copy {
    /// Its input's name where inputs wait (`active/<worker>/`).
    pub file: String,
    pub worker: String,
    /// Where the re-drop came from (its answer goes back the same way).
    pub origin: Origin,
    /// What became of its answer, once sent.
    pub receipt: Option<Receipt>,
}

impl Copy {
    /// Is its answer still to be sent?
    pub fn unanswered(&self) -> bool {
        self.receipt.is_none()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Job {
    pub id: u64,
    pub state: State,
    /// Where its workitem came from (its `claimed` event).
    pub origin: Origin,
    /// Its input's name where inputs wait (`active/<worker>/`), and the name its answer takes.
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
    /// The workitem was valid and accepted for building (it holds its image_id).
    pub accepted: bool,
    pub mode: Option<Mode>,
    /// Builds started, over the job's whole life.
    pub attempts: u32,
    pub interruptions: u32,
    /// Builds lost to a crash since the job was last queued (counted against max_attempts).
    pub lost: u32,
    pub result: Option<bool>,
    pub error: Option<String>,
    /// A conflict: the job that holds this job's image_id. Answered, no status pushed.
    pub held_by: Option<u64>,
    pub urls: Urls,
    /// What became of its answer, once sent (the last `delivered` event of the job itself).
    pub receipt: Option<Receipt>,
    /// sha256 of the answers this job wrote (to the outbox), newest last (so a later delivery
    /// knows its own earlier answer from another job's).
    pub answers: Vec<String>,
    pub reason: Option<String>,
    /// The final status (DONE/ERROR) has been pushed successfully.
    pub final_pushed: bool,
    /// Attempts at pushing the final status.
    pub final_push_attempts: u32,
    /// Byte-identical re-drops of this job.
    pub copies: Vec<Copy>,
    pub claimed_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub last_seq: u64,
    /// What its builds left on the host and could not free (`leaked`, not yet `leak_freed`),
    /// oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub leaks: Vec<Leak>,
    /// The class of its failed build (its last `finished`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<super::Failure>,
    /// Builds that failed for the infrastructure since it was queued (each retried
    /// automatically while fewer than `infra_retries`).
    pub infra_failures: u32,
    /// KVM: how long its last guest took to boot (seconds to ssh).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_seconds: Option<f64>,
    /// An operator pinned its images: no expiry takes them.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
    /// Its images were expired (since its last build).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expired: Option<Expiry>,
}

/// An `expired` event as the fold keeps it: when, why, what it held, and the files (paths
/// under base_dir) to delete (again, after a crash cut a delete short).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Expiry {
    pub at: String,
    pub reason: String,
    pub bytes: u64,
    pub files: Vec<String>,
}

/// A resource a build left on the host: what it is, and why it could not be freed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Leak {
    pub what: String,
    pub why: String,
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

    /// Where its answer goes.
    pub fn reply_to(&self) -> ReplyTo {
        self.origin.reply_to()
    }

    /// Was it ever built (a build started)? Only such a job can be retried.
    pub fn was_built(&self) -> bool {
        self.attempts > 0
    }

    /// Applies one event of this job (as stored). The only place job state changes.
    pub fn apply(&mut self, ev: &EventView<'_>) {
        let s = |c: &Option<Cow<'_, str>>| c.as_deref().map(str::to_string);
        let ts = || Some(ev.ts.to_string());
        self.id = ev.job;
        self.last_seq = ev.seq;
        match ev.kind {
            Tag::Claimed => {
                self.state = State::Claimed;
                self.origin = Origin::decode(ev.source.as_deref(), ev.file.as_deref());
                self.file = s(&ev.file);
                self.worker = s(&ev.worker);
                self.bytes = ev.bytes.unwrap_or_default();
                self.sha256 = s(&ev.sha256);
                // A file read again after it grew is claimed again; it was claimed first then.
                self.claimed_at.get_or_insert_with(|| ev.ts.to_string());
            }
            Tag::Rejected => {
                self.state = State::Rejected;
                if self.file.is_none() {
                    self.file = s(&ev.file);
                }
                self.reason = s(&ev.reason);
                self.claimed_at.get_or_insert_with(|| ev.ts.to_string());
            }
            Tag::Invalid => {
                self.state = State::Finished;
                self.image_id = s(&ev.image_id);
                self.input_seq = Some(ev.seq);
                self.result = Some(false);
                self.error = s(&ev.error);
                self.held_by = ev.held_by;
                self.finished_at = ts();
            }
            Tag::Queued => {
                self.state = State::Queued;
                self.image_id = s(&ev.image_id);
                if let Some(spec) = &ev.spec {
                    self.name = Some(spec.name.to_string());
                    self.arch = Some(spec.arch.to_string());
                    self.image_type = Some(spec.image_type.to_string());
                }
                self.input_seq = Some(ev.seq);
                self.accepted = true;
                self.lost = 0;
                self.infra_failures = 0;
            }
            Tag::Started => {
                self.state = State::Building;
                self.mode = ev.mode;
                self.attempts = ev.attempt.unwrap_or(self.attempts + 1);
                self.started_at = ts();
            }
            Tag::Finished => {
                self.state = State::Finished;
                self.result = ev.result;
                self.error = s(&ev.error);
                self.failure = ev.failure;
                self.boot_seconds = ev.boot_seconds;
                if ev.failure == Some(super::Failure::Infrastructure) {
                    self.infra_failures += 1;
                }
                self.urls = ev.urls.clone().unwrap_or_default();
                self.finished_at = ts();
            }
            Tag::Delivered => {
                let receipt = Receipt::decode(ReceiptFields {
                    outbox: s(&ev.outbox),
                    sha256: s(&ev.sha256),
                    queue: s(&ev.queue),
                    withheld: s(&ev.withheld),
                });
                match &ev.copy {
                    Some(file) => {
                        if let Some(c) = self
                            .copies
                            .iter_mut()
                            .find(|c| c.file == *file && c.unanswered())
                        {
                            c.receipt = Some(receipt);
                        }
                    }
                    None => {
                        self.state = if self.result == Some(true) {
                            State::Done
                        } else {
                            State::Error
                        };
                        if let Some(sha) = receipt.sha256() {
                            self.answers.push(sha.to_string());
                        }
                        self.receipt = Some(receipt);
                    }
                }
            }
            Tag::Pushed => {
                if ev.status != Some(Status::Building) && self.state.is_answered() {
                    self.final_push_attempts += 1;
                    if ev.ok == Some(true) {
                        self.final_pushed = true;
                    }
                }
            }
            Tag::Cancelled => self.reason = s(&ev.reason),
            Tag::Requeued => {
                if ev.file.is_some() && self.input_seq.is_none() {
                    self.state = State::Moved;
                    self.file = s(&ev.file);
                    self.worker = s(&ev.from_worker);
                    self.reason = s(&ev.reason);
                } else {
                    self.state = State::Queued;
                    self.reason = s(&ev.reason);
                    self.result = None;
                    self.error = None;
                    self.failure = None;
                    self.urls = Urls::default();
                    self.receipt = None;
                    self.final_pushed = false;
                    self.final_push_attempts = 0;
                    self.finished_at = None;
                    self.lost = 0;
                    self.expired = None;
                }
            }
            Tag::Interrupted => {
                self.state = State::Interrupted;
                self.interruptions += 1;
                if ev.cause.unwrap_or_default() == Cause::Crash {
                    self.lost += 1;
                }
                self.reason = s(&ev.reason);
            }
            Tag::Compacted => {
                self.state = State::Moved;
                self.file = s(&ev.file);
                self.reason = s(&ev.reason);
                self.claimed_at.get_or_insert_with(|| ev.ts.to_string());
            }
            Tag::Leaked => {
                let what = s(&ev.what).unwrap_or_default();
                let why = s(&ev.why).unwrap_or_default();
                match self.leaks.iter_mut().find(|l| l.what == what) {
                    Some(l) => l.why = why,
                    None => self.leaks.push(Leak { what, why }),
                }
            }
            Tag::LeakFreed => {
                let what = s(&ev.what).unwrap_or_default();
                self.leaks.retain(|l| l.what != what);
            }
            // farm-level events belong to no job (`domain::farm`); `fold::apply` never
            // hands them to a job
            Tag::Drained | Tag::Undrained | Tag::CancelNoted => {}
            Tag::Pinned => self.pinned = true,
            Tag::Unpinned => self.pinned = false,
            Tag::Expired => {
                self.expired = Some(Expiry {
                    at: ev.ts.to_string(),
                    reason: s(&ev.reason).unwrap_or_default(),
                    bytes: ev.bytes.unwrap_or_default(),
                    files: ev.files.iter().flatten().map(|f| f.to_string()).collect(),
                })
            }
            Tag::Duplicate => {
                let file = s(&ev.file).unwrap_or_default();
                if !self.copies.iter().any(|c| c.file == file && c.unanswered()) {
                    self.copies.push(Copy {
                        origin: Origin::decode(ev.source.as_deref(), Some(&file)),
                        file,
                        worker: s(&ev.worker).unwrap_or_default(),
                        receipt: None,
                    });
                }
            }
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
/// `kind` is typed: a stored kind this version does not know is an error, not skipped.
#[derive(Debug, Deserialize)]
pub struct EventView<'a> {
    pub seq: u64,
    pub job: u64,
    #[serde(borrow)]
    pub ts: Cow<'a, str>,
    pub kind: Tag,
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
    #[serde(default)]
    pub held_by: Option<u64>,
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
    pub source: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub outbox: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub queue: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub withheld: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub copy: Option<Cow<'a, str>>,
    #[serde(default)]
    pub status: Option<Status>,
    #[serde(default)]
    pub ok: Option<bool>,
    #[serde(borrow, default)]
    pub from_worker: Option<Cow<'a, str>>,
    #[serde(default)]
    pub cause: Option<Cause>,
    #[serde(borrow, default)]
    pub what: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub why: Option<Cow<'a, str>>,
    #[serde(default)]
    pub failure: Option<super::Failure>,
    #[serde(default)]
    pub boot_seconds: Option<f64>,
    #[serde(borrow, default)]
    pub files: Option<Vec<Cow<'a, str>>>,
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
    if ev.job == super::event::FARM {
        return; // a farm-level event: no job's (see `domain::farm`)
    }
    jobs.entry(ev.job).or_default().apply(ev);
}

/// Applies one typed event to the map of jobs.
pub fn apply_event(jobs: &mut Jobs, ev: &Event) {
    if ev.job == super::event::FARM {
        return;
    }
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
    use crate::domain::event::EventKind;
    use serde_json::json;

    fn ev(seq: u64, job: u64, kind: EventKind) -> Event {
        Event {
            seq,
            ts: format!("2026-11-24T00:00:{seq:02}Z"),
            job,
            kind,
        }
    }

    fn claimed() -> EventKind {
        EventKind::Claimed {
            file: "a.json".into(),
            worker: "w1".into(),
            bytes: 10,
            sha256: "ab".into(),
            source: None,
        }
    }

    #[test]
    fn interleaved_jobs() {
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
                EventKind::Invalid {
                    image_id: Some("x".into()),
                    error: "missing".into(),
                    held_by: None,
                    input: json!({}).into(),
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
        assert_eq!(jobs[&1].state, State::Finished);
        assert_eq!(jobs[&1].result, Some(false));
        assert_eq!(jobs[&1].input_seq, Some(4));
        assert_eq!(jobs[&2].state, State::Rejected);
        assert_eq!(jobs[&9].file.as_deref(), Some("c"));
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

    #[test]
    fn an_unknown_kind_is_an_error_not_skipped() {
        let bytes = br#"{"seq":1,"ts":"t","job":1,"kind":"teleported"}"#;
        assert!(serde_json::from_slice::<EventView<'_>>(bytes).is_err());
    }

    #[test]
    fn states_and_kinds_round_trip_their_names() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
        }
        for t in Tag::ALL {
            assert_eq!(Tag::parse(t.as_str()), Some(t));
            assert_eq!(serde_json::to_value(t).unwrap(), json!(t.as_str()));
        }
    }
}
