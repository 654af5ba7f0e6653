//! What the engine asks of the world at its edges, as traits: the place where claimed inputs
//! wait until they are answered ([`Inputs`]), the answerer of each reply destination
//! ([`Answerer`]), and the status push ([`StatusPush`]). The engine holds these as trait
//! objects and never learns which transport stands behind one.
//!
//! Invariant: every method here is a step the engine records (or has recorded) in the log, and
//! each can be repeated after a crash with the same effect: reading an input again, keeping a
//! body again under a new name, releasing a released input, sending the same answer again.

use crate::domain::{Job, Origin, Receipt, Status};
use crossbeam_channel::Receiver;
use serde_json::Value;

/// A port's failure, with the path or peer that failed in its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PortError {
    pub message: String,
    /// The disk (or quota) is full: worth waiting for, not a reason to fail a job.
    pub no_space: bool,
}

impl PortError {
    pub fn new(message: impl Into<String>) -> PortError {
        PortError {
            message: message.into(),
            no_space: false,
        }
    }

    /// Was it a full disk (ENOSPC, EDQUOT)?
    pub fn from_io(message: impl Into<String>, e: &std::io::Error) -> PortError {
        PortError {
            message: message.into(),
            no_space: matches!(
                e.raw_os_error(),
                Some(nix::libc::ENOSPC) | Some(nix::libc::EDQUOT)
            ),
        }
    }
}

pub type PortResult<T> = Result<T, PortError>;

/// A held input as read: its bytes and sha256, or why it is not readable as a workitem file.
#[derive(Debug, Clone, Default)]
pub struct InputRead {
    pub name: String,
    pub bytes: Vec<u8>,
    pub sha256: String,
    /// Set when the input is not readable as a workitem file at all (a symlink, too big, ...).
    pub unreadable: Option<String>,
}

/// An input found where inputs wait (at a start, before recovery moves the jobs on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub name: String,
    /// Kept by [`Inputs::keep`] from a body handed over whole (not a claimed file).
    pub kept: bool,
    /// Where it came from, as far as the place can tell (a claimed file: the source that
    /// moved it there).
    pub origin: Origin,
}

/// The place where this worker's claimed inputs wait until they are answered. A name is
/// unique there while its job lives.
pub trait Inputs: Send + Sync {
    /// Reads a held input: never through a symlink, never beyond `max_bytes`. A name that
    /// cannot be read becomes an unreadable input with the reason (never an error).
    fn read(&self, name: &str, max_bytes: u64) -> InputRead;
    /// Keeps bodies handed over whole, each under a new name (named for their origin); durable
    /// (written, fsynced, the folder fsynced) when it returns.
    fn keep(&self, origin: &Origin, bodies: &[&[u8]]) -> PortResult<Vec<String>>;
    /// A new name for a body that is kept in the log only (the input of its `queued` or
    /// `invalid` event), as [`Inputs::keep`] would name it: nothing is written.
    fn name_for(&self, origin: &Origin) -> String;
    /// Keeps a body under the name [`Inputs::name_for`] gave it (a body kept in the log only
    /// that is set aside after all); durable when it returns.
    fn keep_named(&self, name: &str, body: &[u8]) -> PortResult<()>;
    /// Removes an answered input (repeating it is harmless; not fsynced: recovery removes it
    /// again if a crash undoes it).
    fn release(&self, name: &str) -> PortResult<()>;
    /// Moves an input that is not a workitem aside with the reason; returns the name it got.
    fn reject(&self, name: &str, reason: &str) -> PortResult<String>;
    /// Is the input still held?
    fn holds(&self, name: &str) -> bool;
    /// Every input held now.
    fn held(&self) -> PortResult<Vec<Held>>;
}

/// A job's answer: its input workitem with the OUT fields set (built by `engine::answer`).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    value: Value,
}

impl Answer {
    pub(crate) fn new(value: Value) -> Answer {
        Answer { value }
    }

    pub fn value(&self) -> &Value {
        &self.value
    }

    /// The answer as sent (a file, a message body): pretty JSON and a newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(&self.value).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    /// The answer as the push utility reads it on stdin: compact JSON.
    pub fn into_push_bytes(self) -> Vec<u8> {
        serde_json::to_vec(&self.value).unwrap_or_default()
    }
}

/// Why an answer was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// Not now (a full disk, a broker away, no confirm in time): the step is tried again.
    #[error("{0}")]
    Later(String),
    #[error("{0}")]
    Failed(String),
}

/// Sends answers to one reply destination. `copy` names the re-drop of the job being answered
/// (None: the job's own answer).
pub trait Answerer: Send + Sync {
    fn send(&self, job: &Job, copy: Option<&str>, answer: &Answer) -> Result<Receipt, AnswerError>;
}

/// One run of the push utility, as its `pushed` event records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub ok: bool,
    pub exit: Option<i32>,
    pub error: Option<String>,
}

/// The status push: tells the job database a job's status (`<push> STATUS`, the workitem on
/// stdin). A disconnected `cancel` kills a push under way.
pub trait StatusPush: Send + Sync {
    /// None when no push utility is configured.
    fn push_status(
        &self,
        job: u64,
        status: Status,
        stdin: Vec<u8>,
        image_id: &str,
        cancel: Option<&Receiver<()>>,
    ) -> Option<Pushed>;
}
