//! The event kinds of a job's life. An event is a fact that has been made durable; the job's
//! state is whatever the fold of its events says (see `fold`).

use super::origin::{Receipt, ReceiptFields};
use crate::domain::workitem::{Spec, Urls};
use serde::{Deserialize, Serialize};

/// The input workitem as it was read (the file's bytes, a JSON object). Kept beside the event
/// (the log's `inputs` tree, same flush), not in it, so the event log stays small and quick to
/// fold; stored as read, so a large workitem is not encoded again.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Input(pub Vec<u8>);

impl From<serde_json::Value> for Input {
    fn from(v: serde_json::Value) -> Input {
        Input(serde_json::to_vec(&v).unwrap_or_default())
    }
}

impl Input {
    /// No input carried (the stored form of an event never carries it: it is in `inputs`).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// In the export (`events --json`, archives) the input is carried inside its event as a JSON
/// value, on one line (so JSON Lines stay one event a line): an import stores that compact form.
impl Serialize for Input {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v: serde_json::Value =
            serde_json::from_slice(&self.0).map_err(serde::ser::Error::custom)?;
        v.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Input {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Input, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        serde_json::to_vec(&v)
            .map(Input)
            .map_err(serde::de::Error::custom)
    }
}

/// One entry of the log: `seq` is its place in the log, `job` the number of its job (jobs are
/// numbered 1, 2, 3, ... as they open; in a log of an earlier version, by the seq of the event
/// that opened them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub ts: String,
    pub job: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Native,
    Kvm,
}

/// A status pushed to the external utility.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Building,
    Done,
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Building => "BUILDING",
            Status::Done => "DONE",
            Status::Error => "ERROR",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// A file was renamed into `active/<worker>/` (or, with `source`, a message body written
    /// there: `amqp://HOST:PORT/VHOST/QUEUE`, no password; absent for the spool).
    Claimed {
        file: String,
        worker: String,
        bytes: u64,
        sha256: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<String>,
    },
    /// The input is not a workitem at all; it goes to `rejected/`.
    Rejected {
        file: String,
        reason: String,
    },
    /// A workitem that fails validation, or that asks for an image_id (or job folder) another
    /// job holds (`held_by`): it is answered with an error. A conflict pushes no status: the
    /// status of an image_id belongs to the job that holds it.
    Invalid {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image_id: Option<String>,
        error: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        held_by: Option<u64>,
        /// The workitem as given (see [`Input`]): stored apart, carried only by the export.
        #[serde(default, skip_serializing_if = "Input::is_empty")]
        input: Input,
    },
    /// A valid workitem waiting for a build slot.
    Queued {
        image_id: String,
        spec: Box<Spec>,
        /// As in `Invalid`: stored in the `inputs` tree, carried only by the export.
        #[serde(default, skip_serializing_if = "Input::is_empty")]
        input: Input,
    },
    Started {
        mode: Mode,
        attempt: u32,
    },
    Finished {
        result: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        urls: Urls,
        /// A failed build's class (absent: a success, or a failure recorded before classes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failure: Option<super::Failure>,
        /// KVM: seconds from the guest's start to its ssh answering. (Known only once the guest
        /// is up, after `started` was made durable, so it is recorded with the build's end.)
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot_seconds: Option<f64>,
    },
    /// The answer went out (see [`Delivery`]).
    Delivered(Delivery),
    Pushed {
        status: Status,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit: Option<i32>,
        ok: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Cancelled {
        reason: String,
    },
    /// An operator asked for the job to be built again (`retry`), or (with `file`) moved a dead
    /// worker's claimed file back to incoming/ (`requeue --worker`; the event opens a job of its
    /// own, settled at once).
    Requeued {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_worker: Option<String>,
    },

    /// A build was stopped by the daemon stopping (`cause: stop`, not counted against
    /// max_attempts) or dying under it (`crash`, counted).
    Interrupted {
        reason: String,
        #[serde(default)]
        cause: Cause,
    },
    /// A byte-identical re-drop (same sha256) of this job was claimed: the same request. It is
    /// not built again and pushes nothing; it is answered with this job's answer (a `delivered`
    /// event with `copy`).
    Duplicate {
        file: String,
        worker: String,
        bytes: u64,
        sha256: String,
        /// As in `Claimed`: where the re-drop came from (absent for the spool).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<String>,
    },
    /// What a build left on the host that its release could not free (a mount held busy, a
    /// loop device in use, a process that survived): `what` names it, `why` says why. Shown by
    /// `status`, `doctor` and `/metrics` until a later pass frees it (`leak_freed`).
    Leaked {
        what: String,
        why: String,
    },
    /// A resource recorded `leaked` was found freed by a later pass.
    LeakFreed {
        what: String,
    },
    /// An operator kept the job's images out of every expiry (`pin`).
    Pinned {},
    /// An operator gave the job's images back to the retention policy (`unpin`).
    Unpinned {},
    /// The job's image files were expired by the retention policy (or the disk budget): `files`
    /// (paths under base_dir, the ones its `SHA256SUMS` lists) are deleted after this event is
    /// durable; `bytes` is what they held; `reason` says which rule chose them. The log, the
    /// answer, `SHA256SUMS` and the provenance stay.
    Expired {
        files: Vec<String>,
        bytes: u64,
        reason: String,
    },
    /// `compact` moved the events of `jobs` jobs settled before `before` (`events` events) out
    /// of the log into the archive `file`. The event opens a record of its own, settled at
    /// once (state `moved`); it keeps the log's numbering going when the newest jobs went.
    Compacted {
        file: String,
        reason: String,
        before: String,
        jobs: u64,
        events: u64,
    },
    /// A farm-level event (no job: see [`FARM`]): an operator took this host out of the farm
    /// (`drain`): it claims nothing more until `undrained`; running builds go on.
    Drained {
        reason: String,
    },
    /// A farm-level event: the host takes work again (`undrain`).
    Undrained {},
    /// A farm-level event: a cancel heard on the farm's exchange (AMQP), for the workitem whose
    /// `fei` key (`workitem::fei_key`) is `fei`, remembered until `expires` (seconds since the
    /// epoch): a workitem of it taken later is answered cancelled, never built.
    CancelNoted {
        fei: String,
        expires: u64,
    },
}

/// The job number of the events that belong to no job (farm-level events: `drained`,
/// `undrained`, `cancel_noted`). Jobs are numbered from 1, so 0 is a key space of its own in the log: the job
/// fold skips it, `Journal::farm_events` reads it, and `domain::farm::Farm` folds it.
pub const FARM: u64 = 0;

/// A `delivered` event: the answer of the job went out (its [`Receipt`]); with `copy`, the
/// answer for that byte-identical re-drop of the job (see `Duplicate`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "DeliveryFields", into = "DeliveryFields")]
pub struct Delivery {
    pub receipt: Receipt,
    pub copy: Option<String>,
}

/// A `delivered` event as stored: the receipt's fields (see [`Receipt::decode`]) around `copy`,
/// in the order the log has always had them.
#[derive(Serialize, Deserialize)]
struct DeliveryFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outbox: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    copy: Option<String>,
    /// sha256 of the answer written (how a later delivery knows this job's own answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    /// The queue the answer was published to (and confirmed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    queue: Option<String>,
    /// No answer was sent, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    withheld: Option<String>,
}

impl From<DeliveryFields> for Delivery {
    fn from(f: DeliveryFields) -> Delivery {
        Delivery {
            receipt: Receipt::decode(ReceiptFields {
                outbox: f.outbox,
                sha256: f.sha256,
                queue: f.queue,
                withheld: f.withheld,
            }),
            copy: f.copy,
        }
    }
}

impl From<Delivery> for DeliveryFields {
    fn from(d: Delivery) -> DeliveryFields {
        let r = d.receipt.encode();
        DeliveryFields {
            outbox: r.outbox,
            copy: d.copy,
            sha256: r.sha256,
            queue: r.queue,
            withheld: r.withheld,
        }
    }
}

/// Why a build was interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Cause {
    /// The daemon was stopped (grace over, or a second signal).
    Stop,
    /// The daemon died under the build (found at the next start).
    #[default]
    Crash,
}

/// The kinds of event, without their data: what the fold matches on. Every [`EventKind`] maps
/// to one (`EventKind::tag`), and the fold matches on every tag with no catch-all, so a kind
/// added without being handled does not compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tag {
    Claimed,
    Rejected,
    Invalid,
    Queued,
    Started,
    Finished,
    Delivered,
    Pushed,
    Cancelled,
    Requeued,
    Interrupted,
    Duplicate,
    Compacted,
    Leaked,
    LeakFreed,
    Pinned,
    Unpinned,
    Expired,
    Drained,
    Undrained,
    CancelNoted,
}

impl Tag {
    /// Every kind, in the order of a job's life.
    pub const ALL: [Tag; 21] = [
        Tag::Claimed,
        Tag::Rejected,
        Tag::Invalid,
        Tag::Queued,
        Tag::Started,
        Tag::Finished,
        Tag::Delivered,
        Tag::Pushed,
        Tag::Cancelled,
        Tag::Requeued,
        Tag::Interrupted,
        Tag::Duplicate,
        Tag::Compacted,
        Tag::Leaked,
        Tag::LeakFreed,
        Tag::Pinned,
        Tag::Unpinned,
        Tag::Expired,
        Tag::Drained,
        Tag::Undrained,
        Tag::CancelNoted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Tag::Claimed => "claimed",
            Tag::Rejected => "rejected",
            Tag::Invalid => "invalid",
            Tag::Queued => "queued",
            Tag::Started => "started",
            Tag::Finished => "finished",
            Tag::Delivered => "delivered",
            Tag::Pushed => "pushed",
            Tag::Cancelled => "cancelled",
            Tag::Requeued => "requeued",
            Tag::Interrupted => "interrupted",
            Tag::Duplicate => "duplicate",
            Tag::Compacted => "compacted",
            Tag::Leaked => "leaked",
            Tag::LeakFreed => "leak_freed",
            Tag::Pinned => "pinned",
            Tag::Unpinned => "unpinned",
            Tag::Expired => "expired",
            Tag::Drained => "drained",
            Tag::Undrained => "undrained",
            Tag::CancelNoted => "cancel_noted",
        }
    }

    /// The kind named `s`, if there is one.
    pub fn parse(s: &str) -> Option<Tag> {
        Tag::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Does this kind belong to no job (see [`FARM`])?
    pub fn is_farm(self) -> bool {
        matches!(self, Tag::Drained | Tag::Undrained | Tag::CancelNoted)
    }
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EventKind {
    /// Must the event be flushed before the caller goes on? Every kind but two records a
    /// decision that later steps act on, so it is durable before they do. `delivered` and
    /// `pushed` record a step already done (the reply is fsynced in outbox/ before `delivered`
    /// is appended) whose repetition is harmless: if a crash loses them, recovery writes the
    /// same reply again and pushes the status again (at least once). They are flushed by the
    /// next flush of any thread, or within 100 ms.
    pub fn needs_flush(&self) -> bool {
        !matches!(self, EventKind::Delivered(_) | EventKind::Pushed { .. })
    }

    pub fn tag(&self) -> Tag {
        match self {
            EventKind::Claimed { .. } => Tag::Claimed,
            EventKind::Rejected { .. } => Tag::Rejected,
            EventKind::Invalid { .. } => Tag::Invalid,
            EventKind::Queued { .. } => Tag::Queued,
            EventKind::Started { .. } => Tag::Started,
            EventKind::Finished { .. } => Tag::Finished,
            EventKind::Delivered(_) => Tag::Delivered,
            EventKind::Pushed { .. } => Tag::Pushed,
            EventKind::Cancelled { .. } => Tag::Cancelled,
            EventKind::Requeued { .. } => Tag::Requeued,
            EventKind::Interrupted { .. } => Tag::Interrupted,
            EventKind::Duplicate { .. } => Tag::Duplicate,
            EventKind::Compacted { .. } => Tag::Compacted,
            EventKind::Leaked { .. } => Tag::Leaked,
            EventKind::LeakFreed { .. } => Tag::LeakFreed,
            EventKind::Pinned {} => Tag::Pinned,
            EventKind::Unpinned {} => Tag::Unpinned,
            EventKind::Expired { .. } => Tag::Expired,
            EventKind::Drained { .. } => Tag::Drained,
            EventKind::Undrained {} => Tag::Undrained,
            EventKind::CancelNoted { .. } => Tag::CancelNoted,
        }
    }

    /// Does this kind belong to no job (a farm-level event, recorded under job [`FARM`])?
    pub fn is_farm(&self) -> bool {
        self.tag().is_farm()
    }

    pub fn name(&self) -> &'static str {
        self.tag().as_str()
    }
}

impl Event {
    /// The event in one line, for the daemon's log: `seq N job J kind detail`.
    pub fn summary(&self) -> String {
        let detail = match &self.kind {
            EventKind::Claimed { file, bytes, .. } => format!("{file} ({bytes} bytes)"),
            EventKind::Duplicate { file, .. } => format!("{file}: a byte-identical re-drop"),
            EventKind::Rejected { file, reason } => format!("{file}: {reason}"),
            EventKind::Invalid { error, .. } => error.clone(),
            EventKind::Queued { image_id, spec, .. } => {
                format!("{image_id} {} {} {}", spec.name, spec.arch, spec.image_type)
            }
            EventKind::Started { mode, attempt } => format!("{mode:?} attempt {attempt}"),
            EventKind::Finished { result, error, .. } => {
                format!("result={result} {}", error.as_deref().unwrap_or(""))
            }
            EventKind::Delivered(d) => match &d.copy {
                Some(c) => format!("{} (for the re-drop {c})", d.receipt),
                None => d.receipt.to_string(),
            },
            EventKind::Pushed {
                status, ok, error, ..
            } => format!(
                "{} ok={ok} {}",
                status.as_str(),
                error.as_deref().unwrap_or("")
            ),
            EventKind::Cancelled { reason }
            | EventKind::Compacted { reason, .. }
            | EventKind::Requeued { reason, .. }
            | EventKind::Interrupted { reason, .. } => reason.clone(),
            EventKind::Leaked { what, why } => format!("{what}: {why}"),
            EventKind::LeakFreed { what } => what.clone(),
            EventKind::Pinned {} | EventKind::Unpinned {} | EventKind::Undrained {} => {
                String::new()
            }
            EventKind::Drained { reason } => reason.clone(),
            EventKind::CancelNoted { fei, expires } => format!("{fei} until {expires}"),
            EventKind::Expired {
                files,
                bytes,
                reason,
            } => format!("{} file(s), {bytes} bytes: {reason}", files.len()),
        };
        // one line, nothing a terminal acts on (a multi-line error reads with `\n`)
        format!(
            "seq {} job {} {} {}",
            self.seq,
            self.job,
            self.kind.name(),
            super::text::escape(detail.trim_end())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claimed_without_source_reads_as_before() {
        let old = r#"{"seq":1,"ts":"t","job":1,"kind":"claimed","file":"a","worker":"w","bytes":1,"sha256":"x"}"#;
        let ev: Event = serde_json::from_str(old).unwrap();
        assert!(matches!(ev.kind, EventKind::Claimed { source: None, .. }));
        assert_eq!(serde_json::to_string(&ev).unwrap(), old);
    }

    #[test]
    fn deliveries_keep_their_stored_shape() {
        for (line, receipt) in [
            (
                r#"{"seq":3,"ts":"t","job":1,"kind":"delivered","outbox":"a2.json","copy":"a2.json","sha256":"cd"}"#,
                Receipt::Outbox {
                    name: "a2.json".into(),
                    sha256: Some("cd".into()),
                },
            ),
            (
                r#"{"seq":3,"ts":"t","job":1,"kind":"delivered","queue":"ruote_workitems"}"#,
                Receipt::Published {
                    queue: "ruote_workitems".into(),
                },
            ),
            (
                r#"{"seq":3,"ts":"t","job":1,"kind":"delivered","withheld":"fields.params.forget"}"#,
                Receipt::Withheld {
                    why: "fields.params.forget".into(),
                },
            ),
        ] {
            let ev: Event = serde_json::from_str(line).unwrap();
            let EventKind::Delivered(d) = &ev.kind else {
                panic!("{ev:?}")
            };
            assert_eq!(d.receipt, receipt);
            assert_eq!(serde_json::to_string(&ev).unwrap(), line);
        }
        // written by versions that told a published answer by a prefix
        let old =
            r#"{"seq":3,"ts":"t","job":1,"kind":"delivered","outbox":"amqp:ruote_workitems"}"#;
        let ev: Event = serde_json::from_str(old).unwrap();
        assert!(matches!(
            ev.kind,
            EventKind::Delivered(Delivery {
                receipt: Receipt::Published { .. },
                copy: None
            })
        ));
    }
}
