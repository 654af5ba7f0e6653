//! `log ID [--follow]`: what a job's build log holds from a stream position, and where the job
//! is, in one answer. A pure function of the journal, the config and the log file, so that the
//! daemon (over its control socket) and a command that opened the log itself answer alike.
//!
//! Invariant: the job's state is read before its log, so an answer that says the job has ended
//! carries a log that its build will not add to any more (the `finished` event is recorded after
//! the build's last output).

use crate::config::Config;
use crate::domain::{EventKind, State};
use crate::imaging::{self, logread};
use crate::journal::Journal;
use crate::operate::ops::{self, OpsError};
use serde::{Deserialize, Serialize};

/// One answer to a `log` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogChunk {
    pub job: u64,
    pub image_id: Option<String>,
    pub state: State,
    /// The job is over (answered, or not a workitem): its log will not grow.
    pub ended: bool,
    pub result: Option<bool>,
    pub error: Option<String>,
    /// Where its build log is (None: the job never got as far as a build: not a workitem,
    /// invalid).
    pub path: Option<String>,
    /// A build has started at least once.
    pub built: bool,
    /// The log file exists.
    pub exists: bool,
    /// Output from stream position `start` (see [`logread`]): whole UTF-8 sequences, invalid
    /// bytes replaced by U+FFFD.
    pub text: String,
    pub start: u64,
    /// The position after `text` (ask from here next).
    pub next: u64,
    /// Bytes between the position asked for and `start` that the log's bound cut out before
    /// they were read.
    pub skipped: u64,
    /// The log's length as a stream when it was read.
    pub end: u64,
    /// The log was replaced (shorter than the position asked for, without a cut marker): `start`
    /// is 0.
    pub restarted: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error("cannot read the build log {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// The job `id` names (or `job` when given: a follower asks by number once it knows it), its
/// state, and at most [`logread::MAX_CHUNK`] bytes of its build log from `from`. None: no such
/// job (yet: a follower may wait for a file just dropped to be claimed).
pub fn read(
    journal: &Journal,
    cfg: &Config,
    id: &str,
    job: Option<u64>,
    from: u64,
) -> Result<Option<LogChunk>, LogError> {
    let job_id = match job {
        Some(n) => n,
        None => match ops::resolve(journal, id) {
            Ok(n) => n,
            Err(OpsError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        },
    };
    let events = journal.job_events(job_id)?;
    let j = crate::domain::job::fold(&events)
        .remove(&job_id)
        .ok_or_else(|| OpsError::NotFound(id.to_string()))?;
    let spec = events.iter().rev().find_map(|e| match &e.kind {
        EventKind::Queued { spec, .. } => Some(spec),
        _ => None,
    });
    let path = spec.map(|s| imaging::log_path(&cfg.worker, s));
    let ended = j.state.has_ended();
    let mut out = LogChunk {
        job: job_id,
        image_id: j.image_id.clone(),
        state: j.state,
        ended,
        result: j.result,
        error: j.error.clone(),
        path: path.as_ref().map(|p| p.display().to_string()),
        built: j.was_built(),
        exists: false,
        text: String::new(),
        start: from,
        next: from,
        skipped: 0,
        end: from,
        restarted: false,
    };
    let Some(path) = path else {
        return Ok(Some(out));
    };
    let chunk = logread::read(
        &path,
        logread::Bound::of(&cfg.worker),
        from,
        logread::MAX_CHUNK,
    )
    .map_err(|source| LogError::Read {
        path: path.display().to_string(),
        source,
    })?;
    if let Some(c) = chunk {
        // An incomplete UTF-8 sequence at the end waits for its rest, unless none will come.
        let keep = if ended {
            c.data.len()
        } else {
            logread::complete_utf8(&c.data)
        };
        out.exists = true;
        out.text = String::from_utf8_lossy(&c.data[..keep]).into_owned();
        out.start = c.start;
        out.next = c.start + keep as u64;
        out.skipped = c.skipped;
        out.end = c.end;
        out.restarted = c.restarted;
    }
    Ok(Some(out))
}
