//! The event kinds of a job's life. An event is a fact that has been made durable; the job's
//! state is whatever the fold of its events says (see `fold`).

use crate::workitem::{Spec, Urls};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One entry of the log: `seq` is its sled key, `job` the seq of the event that opened the job.
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
    /// A file was renamed into `active/<worker>/`.
    Claimed {
        file: String,
        worker: String,
        bytes: u64,
        sha256: String,
    },
    /// The input is not a workitem at all; it goes to `rejected/`.
    Rejected {
        file: String,
        reason: String,
    },
    /// A workitem that fails validation; it is answered with an error.
    Invalid {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image_id: Option<String>,
        error: String,
        /// The workitem as given. Stored beside the event (the log's `inputs` tree, same
        /// flush), not in it, so the event log stays small and quick to fold.
        #[serde(skip)]
        input: Value,
    },
    /// A valid workitem waiting for a build slot.
    Queued {
        image_id: String,
        spec: Box<Spec>,
        /// As in `Invalid`: stored in the `inputs` tree.
        #[serde(skip)]
        input: Value,
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
    },
    /// The reply was written to `outbox/<outbox>`.
    Delivered {
        outbox: String,
    },
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

    /// A build was stopped by the daemon stopping or dying under it.
    Interrupted {
        reason: String,
    },
}

impl EventKind {
    /// Must the event be flushed before the caller goes on? Every kind but two records a
    /// decision that later steps act on, so it is durable before they do. `delivered` and
    /// `pushed` record a step already done (the reply is fsynced in outbox/ before `delivered`
    /// is appended) whose repetition is harmless: if a crash loses them, recovery writes the
    /// same reply again and pushes the status again (at least once). They are flushed by the
    /// next flush of any thread, or within 100 ms.
    pub fn needs_flush(&self) -> bool {
        !matches!(self, EventKind::Delivered { .. } | EventKind::Pushed { .. })
    }

    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Claimed { .. } => "claimed",
            EventKind::Rejected { .. } => "rejected",
            EventKind::Invalid { .. } => "invalid",
            EventKind::Queued { .. } => "queued",
            EventKind::Started { .. } => "started",
            EventKind::Finished { .. } => "finished",
            EventKind::Delivered { .. } => "delivered",
            EventKind::Pushed { .. } => "pushed",
            EventKind::Cancelled { .. } => "cancelled",
            EventKind::Requeued { .. } => "requeued",
            EventKind::Interrupted { .. } => "interrupted",
        }
    }
}
