//! The event log: one sled tree, key = big-endian u64 seq, value = the event as JSON.
//!
//! Invariant: `append` returns only after the event is flushed, so a caller acts on a step only
//! once its event is durable. Seqs are handed out under one lock, so the log is totally ordered
//! and a reader that has seen seq N has seen every event before it.

pub mod event;
pub mod fold;

pub use event::{Event, EventKind, Mode, Status};
pub use fold::{Job, Jobs, State};

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(
        "the event log in {0} is locked by another process: is a build-image daemon already running on this state dir?"
    )]
    Locked(PathBuf),
    #[error("cannot open the event log in {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("event log I/O failed: {0}")]
    Sled(#[from] sled::Error),
    #[error("event {seq} in the log is not readable: {source}")]
    Corrupt { seq: u64, source: serde_json::Error },
    #[error("cannot encode an event: {0}")]
    Encode(serde_json::Error),
}

pub type Result<T> = std::result::Result<T, JournalError>;

const EVENTS: &str = "events";

pub struct Journal {
    db: sled::Db,
    events: sled::Tree,
    next_seq: Mutex<u64>,
    path: PathBuf,
}

/// Now, as the RFC 3339 UTC text events carry.
pub fn now_ts() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl Journal {
    /// Opens (or creates) the log in `dir`. Fails with [`JournalError::Locked`] when another
    /// process holds it.
    pub fn open(dir: &Path) -> Result<Journal> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(8 * 1024 * 1024)
            .flush_every_ms(None)
            .open()
            .map_err(|e| match &e {
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("lock") =>
                {
                    JournalError::Locked(dir.to_path_buf())
                }
                _ => JournalError::Open {
                    path: dir.to_path_buf(),
                    source: e,
                },
            })?;
        let events = db.open_tree(EVENTS)?;
        let next = match events.last()? {
            Some((k, _)) => key_seq(&k) + 1,
            None => 1,
        };
        Ok(Journal {
            db,
            events,
            next_seq: Mutex::new(next),
            path: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event and flushes it. `job = None` opens a new job whose id is this seq.
    pub fn append(&self, job: Option<u64>, kind: EventKind) -> Result<Event> {
        let mut out = self.append_batch(vec![(job, kind)])?;
        out.pop()
            .ok_or_else(|| JournalError::Sled(sled::Error::Unsupported("empty batch".into())))
    }

    /// Appends several events with one flush (group commit).
    pub fn append_batch(&self, items: Vec<(Option<u64>, EventKind)>) -> Result<Vec<Event>> {
        let mut out = Vec::with_capacity(items.len());
        {
            let mut next = self.next_seq.lock().unwrap_or_else(|p| p.into_inner());
            let mut batch = sled::Batch::default();
            let mut seq = *next;
            for (job, kind) in items {
                let ev = Event {
                    seq,
                    ts: now_ts(),
                    job: job.unwrap_or(seq),
                    kind,
                };
                let bytes = serde_json::to_vec(&ev).map_err(JournalError::Encode)?;
                batch.insert(&seq.to_be_bytes(), bytes);
                out.push(ev);
                seq += 1;
            }
            self.events.apply_batch(batch)?;
            *next = seq;
        }
        self.db.flush()?;
        Ok(out)
    }

    /// The event with this seq.
    pub fn get(&self, seq: u64) -> Result<Option<Event>> {
        match self.events.get(seq.to_be_bytes())? {
            Some(v) => decode(seq, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Events with seq >= `since`, in order.
    pub fn since(&self, since: u64) -> impl Iterator<Item = Result<Event>> + '_ {
        self.events.range(since.to_be_bytes()..).map(|item| {
            let (k, v) = item?;
            decode(key_seq(&k), &v)
        })
    }

    /// The seq the next event will get.
    pub fn next_seq(&self) -> u64 {
        *self.next_seq.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Folds the whole log from empty.
    pub fn fold_all(&self) -> Result<Jobs> {
        let mut jobs = Jobs::new();
        for ev in self.since(0) {
            fold::apply(&mut jobs, &ev?);
        }
        Ok(jobs)
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

fn key_seq(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = k.len().min(8);
    b[8 - n..].copy_from_slice(&k[k.len() - n..]);
    u64::from_be_bytes(b)
}

fn decode(seq: u64, bytes: &[u8]) -> Result<Event> {
    serde_json::from_slice(bytes).map_err(|source| JournalError::Corrupt { seq, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_reopen_and_lock() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            let a = j
                .append(
                    None,
                    EventKind::Rejected {
                        file: "x".into(),
                        reason: "empty file".into(),
                    },
                )
                .unwrap();
            assert_eq!((a.seq, a.job), (1, 1));
            let b = j
                .append(Some(1), EventKind::Cancelled { reason: "r".into() })
                .unwrap();
            assert_eq!((b.seq, b.job), (2, 1));
            assert!(matches!(
                Journal::open(dir.path()),
                Err(JournalError::Locked(_))
            ));
        }
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.next_seq(), 3);
        let all: Vec<Event> = j.since(0).collect::<Result<_>>().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(j.get(2).unwrap().unwrap().kind.name(), "cancelled");
        assert_eq!(j.fold_all().unwrap()[&1].state, State::Rejected);
        let batch = j
            .append_batch(
                (0..3)
                    .map(|i| {
                        (
                            None,
                            EventKind::Rejected {
                                file: format!("f{i}"),
                                reason: "r".into(),
                            },
                        )
                    })
                    .collect(),
            )
            .unwrap();
        assert_eq!(
            batch.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
    }
}
