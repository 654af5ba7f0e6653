//! The event log: events in blocks (see `block`) in one sled tree, key = big-endian u64 seq of a
//! block's first event, value = the block (the events as JSON, compressed together).
//!
//! This file owns the `Journal` handle: opening it (sled's lock, the stored-form check, the
//! repair of an interrupted merge, the next seq), its errors, the names of its trees and the
//! marks of its stored form, and the flag of a handle that failed a write. The rest is split by
//! concern: `append` (appending and group commit), `scan` (reading events in order and folding
//! them), `indexes` (the indexes and open marks derived from the events), `migrate` (stored
//! form 1 into form 2) and `archive` (import, backup, rewrite).
//!
//! Invariant: seqs and job numbers are handed out under one lock, so the log is totally ordered
//! and a reader that has seen seq N has seen every event before it. Job numbers are dense (1, 2,
//! 3, ...): the next one is one above the highest job the job index holds (the index entry of a
//! job is written before its first event, so it is durable with it); a log of an earlier
//! version, whose jobs were numbered by the seq of their first event, goes on after its
//! highest job. The events are the truth; every other
//! tree is derived from them and can be rebuilt by folding them. Once a write has failed, the
//! handle writes nothing more (`broken`) and the store reopens the log.
//!
//! Farm-level events (`drained`, `undrained`: `EventKind::is_farm`) belong to no job: they are
//! recorded under job number `FARM` (0, never a job's), a key space of their own in `job_seqs`
//! (read by `farm_events`); they have no open mark and no name index, the job folds skip them,
//! and they go through `since`, export, import, backup and compaction as any event does.

mod append;
pub mod archive;
pub mod block;
mod indexes;
mod migrate;
mod scan;

pub use indexes::folder_key;

use crate::domain::{Event, EventKind, FARM, Job, Jobs, Tag};
use append::take_input;

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
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
    #[error(
        "the event log in {path} is corrupt ({detail}); restore it from a backup (docs/operations.md)"
    )]
    StoreCorrupt { path: PathBuf, detail: String },
    #[error("the event log is damaged: {0}; restore it from a backup (docs/operations.md)")]
    Block(#[from] block::BlockError),
    #[error("cannot encode an event: {0}")]
    Encode(serde_json::Error),
    #[error("the event log failed a write earlier ({0}); it is reopened before it is used again")]
    Broken(String),
    /// An import, backup or rewrite of the log that cannot be done (see `archive`).
    #[error("{0}")]
    Refused(String),
}

pub type Result<T> = std::result::Result<T, JournalError>;

/// sled's page cache by default: small, so an idle daemon stays small.
pub const DEFAULT_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// The events, in full blocks (`SEAL_EVENTS` events or `SEAL_BYTES`).
const BLOCKS: &str = "blocks";
/// The newest events, in the small blocks of single appends, until they are sealed into one
/// full block. Every key of `tail` is above every key of `blocks`.
const TAIL: &str = "tail";
/// The events of a log written before blocks (stored form 1): one JSON value per event, key =
/// its seq. Moved into blocks when such a log is opened (`migrate`).
const LEGACY_EVENTS: &str = "events";
/// Key (in the default tree) of the stored form of the events (absent: form 1).
const STORE_FORMAT: &[u8] = b"store_format";
/// The stored form this version writes: 2 = blocks, inputs compressed.
pub const STORE_VERSION: u64 = 2;
/// Small blocks at the end of the log are merged once they hold this many events together (and
/// a block is cut at this many events or `SEAL_BYTES`).
const SEAL_EVENTS: usize = 256;
const SEAL_BYTES: usize = 256 * 1024;
/// Per job, the seqs of its events (varints, ascending): how `show` reads one job's events.
const JOB_SEQS: &str = "job_seqs";
const BY_IMAGE: &str = "by_image";
const BY_SHA: &str = "by_sha";
const OPEN: &str = "open";
/// Trees of stored form 1, read while a log is moved to form 2 (`migrate`), then dropped:
/// one key per event of a job (job ++ seq), the folded state of each job, the inputs, the job
/// folders (form 2 finds them through by_image).
const LEGACY_BY_JOB: &str = "by_job";
const LEGACY_BY_FOLDER: &str = "by_folder";
const LEGACY_JOBS: &str = "jobs";
const LEGACY_INPUTS: &str = "inputs";
/// Sealed blocks kept decompressed for the readers that go job by job (`show`, the status
/// page, the metrics' first count): consecutive jobs share blocks.
const CACHED_BLOCKS: usize = 8;
/// Key (in the default tree) of the format of what is derived from the events and kept (the
/// open marks): when it changes, the log is folded whole again at the next start.
const PROJECTION_FORMAT: &[u8] = b"projection_format";
/// The format of what this version derives from the events and keeps (4: the open marks only;
/// a job's state is folded from its events when asked for).
pub const PROJECTION_VERSION: u64 = 4;
/// Key (in the default tree) written to check that the log takes writes again.
const PROBE: &[u8] = b"probe";
/// Key (in the default tree) of the highest seq whose job projection was stored, in projection
/// formats before 3 (removed when the projections are folded again).
const PROJECTED_UPTO: &[u8] = b"projected_upto";

/// The log and its indexes. The events (`blocks`, `tail`, inputs included) are the truth;
/// `job_seqs` (job -> the seqs of its events), `by_image` (image_id made safe ++ 0 ++ job: by
/// image_id and by job folder), `by_sha` (sha256 of the claimed file ++ 0 ++ job) and `open`
/// (the jobs not settled) are derived from them and can be rebuilt by folding them
/// (`build-image replay` checks them).
/// A job's state is the fold of its events, read through `job_seqs`; a start folds only the
/// open jobs.
pub struct Journal {
    db: sled::Db,
    blocks: sled::Tree,
    tail: sled::Tree,
    job_seqs: sled::Tree,
    by_image: sled::Tree,
    by_sha: sled::Tree,
    open: sled::Tree,
    /// Decompressed sealed blocks, newest use last.
    cache: Mutex<Vec<Cached>>,
    /// Seals so far (see `Scan`).
    seals: std::sync::atomic::AtomicU64,
    next_seq: Mutex<u64>,
    /// The number the next job opened gets (changed only under `next_seq`).
    next_job: std::sync::atomic::AtomicU64,
    /// The small blocks at the end of the log not merged yet (taken under `next_seq`).
    small: Mutex<Small>,
    commit: Mutex<Commit>,
    committed: Condvar,
    path: PathBuf,
    /// Set at the first write error: sled may then block a later flush forever (a failed
    /// reservation leaves a hole its stable point never passes), so this handle writes nothing
    /// more; the store reopens the log.
    broken: Mutex<Option<String>>,
}

/// A sealed block kept decompressed: its first seq, its last seq, its body.
type Cached = (u64, u64, std::sync::Arc<Vec<u8>>);

/// An event as written: its JSON (without the input) and the input it carried.
struct Stored {
    seq: u64,
    job: u64,
    json: Vec<u8>,
    input: Option<Vec<u8>>,
}

/// The small blocks at the end of the log: their keys and how many events they hold.
#[derive(Default)]
struct Small {
    keys: Vec<u64>,
    events: usize,
}

/// Group commit: events below `durable` are flushed; `flushing` while a thread flushes for all.
#[derive(Default)]
struct Commit {
    durable: u64,
    flushing: bool,
}

/// Now, as the RFC 3339 UTC text events carry.
pub fn now_ts() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Opens the log a test has just closed again: sled releases its lock on the directory a
/// little after the last handle is dropped (spacejam/sled#1234), so a `Locked` is waited out
/// (as `engine::statedir` does at a start) for up to 10 s.
#[cfg(test)]
pub(crate) fn reopen_for_test(dir: &Path) -> Journal {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Journal::open(dir) {
            Err(JournalError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => return other.unwrap(),
        }
    }
}

impl Journal {
    /// Opens (or creates) the log in `dir` with the default cache (8 MiB). Fails with
    /// [`JournalError::Locked`] when another process holds it.
    pub fn open(dir: &Path) -> Result<Journal> {
        Journal::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens the log with a page cache of `cache_bytes` (sled's cache: memory against replay
    /// speed; see docs/PERFORMANCE.md).
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Journal> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(None)
            .open()
            .map_err(|e| match &e {
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("lock") =>
                {
                    JournalError::Locked(dir.to_path_buf())
                }
                sled::Error::Corruption { .. } => JournalError::StoreCorrupt {
                    path: dir.to_path_buf(),
                    detail: e.to_string(),
                },
                _ => JournalError::Open {
                    path: dir.to_path_buf(),
                    source: e,
                },
            })?;
        let blocks = db.open_tree(BLOCKS)?;
        let tail = db.open_tree(TAIL)?;
        let mut journal = Journal {
            job_seqs: db.open_tree(JOB_SEQS)?,
            by_image: db.open_tree(BY_IMAGE)?,
            by_sha: db.open_tree(BY_SHA)?,
            open: db.open_tree(OPEN)?,
            cache: Mutex::new(Vec::new()),
            seals: std::sync::atomic::AtomicU64::new(0),
            db,
            blocks,
            tail,
            next_seq: Mutex::new(1),
            next_job: std::sync::atomic::AtomicU64::new(1),
            small: Mutex::new(Small::default()),
            commit: Mutex::new(Commit {
                durable: 1,
                flushing: false,
            }),
            committed: Condvar::new(),
            path: dir.to_path_buf(),
            broken: Mutex::new(None),
        };
        journal.migrate()?;
        journal.tidy_tail()?;
        let next = journal.scan_last_seq()? + 1;
        let last_job = journal.tidy_job_index(next - 1)?;
        *journal.next_job.get_mut() = last_job + 1;
        *journal
            .next_seq
            .get_mut()
            .unwrap_or_else(|p| p.into_inner()) = next;
        journal
            .commit
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .durable = next;
        Ok(journal)
    }

    /// The seq of the last stored event (0: none).
    fn scan_last_seq(&self) -> Result<u64> {
        for tree in [&self.tail, &self.blocks] {
            if let Some((k, v)) = tree.last()? {
                return last_entry(key_seq(&k), &v);
            }
        }
        Ok(0)
    }

    /// Removes the job index entries of the jobs whose first event a crash took (an append
    /// writes a new job's index entry before its events: every seq it lists is above the
    /// log's last), so that their numbers are given again; returns the highest job left (0:
    /// none). Their other index entries and marks are harmless: the lookups check the job's
    /// own events, and a start removes a mark with no events.
    fn tidy_job_index(&self, last_seq: u64) -> Result<u64> {
        let mut lost = Vec::new();
        let mut last_job = 0;
        for item in self.job_seqs.iter().rev() {
            let (k, v) = item?;
            // seqs ascend: the first tells (an entry cut short is left to its readers)
            match block::take_varint(&mut &v[..]) {
                Some(first) if first > last_seq => lost.push(k),
                _ => {
                    last_job = key_seq(&k);
                    break;
                }
            }
        }
        if !lost.is_empty() {
            log::warn!(
                "log {}: the job index named {} job(s) whose events a crash took: their numbers are given again",
                self.path.display(),
                lost.len()
            );
            for k in lost {
                self.job_seqs.remove(k)?;
            }
        }
        Ok(last_job)
    }

    /// The number the next job opened gets.
    pub fn next_job(&self) -> u64 {
        self.next_job.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The highest job number in the log (0: none).
    pub fn last_job(&self) -> u64 {
        self.next_job() - 1
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses to touch a log that failed a write.
    fn check_broken(&self) -> Result<()> {
        match &*lock(&self.broken) {
            Some(why) => Err(JournalError::Broken(why.clone())),
            None => Ok(()),
        }
    }

    fn set_broken(&self, e: &JournalError) {
        if matches!(e, JournalError::Sled(_)) {
            lock(&self.broken).get_or_insert_with(|| e.to_string());
        }
    }

    /// Has the log failed a write?
    pub fn is_broken(&self) -> bool {
        lock(&self.broken).is_some()
    }

    /// Checks that the log takes a write and a flush now.
    pub fn probe(&self) -> Result<()> {
        self.check_broken()?;
        let r = (|| {
            self.db.insert(PROBE, now_ts().as_bytes())?;
            self.db.flush()?;
            Ok(())
        })();
        if let Err(e) = &r {
            self.set_broken(e);
        }
        r
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The process holding the lock of the log in `dir` (sled takes an flock on its `db` file):
/// its pid and command line, from /proc/locks.
pub fn lock_holder(dir: &Path) -> Option<(i32, String)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir.join("db")).ok()?;
    let (major, minor) = (
        nix::sys::stat::major(meta.dev()),
        nix::sys::stat::minor(meta.dev()),
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
        let f: Vec<&str> = line.split_whitespace().collect();
        let (pid, dev) = (f.get(4)?, f.get(5)?);
        let mut parts = dev.split(':');
        let maj = u64::from_str_radix(parts.next()?, 16).ok()?;
        let min = u64::from_str_radix(parts.next()?, 16).ok()?;
        let ino: u64 = parts.next()?.parse().ok()?;
        if (maj, min, ino) != (major, minor, meta.ino()) {
            return None;
        }
        let pid: i32 = pid.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| {
                c.split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        Some((pid, cmd))
    })
}

/// The seq of the last event of a stored block.
fn last_entry(first: u64, stored: &[u8]) -> Result<u64> {
    let body = block::body(first, stored)?;
    let mut last = first;
    for e in block::entries(first, &body) {
        last = last.max(e?.seq);
    }
    Ok(last)
}

fn decode_view(seq: u64, v: &[u8]) -> Result<crate::domain::job::EventView<'_>> {
    serde_json::from_slice(v).map_err(|source| JournalError::Corrupt { seq, source })
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
    use crate::domain::State;

    /// Open until settled, as the lifecycle says with no push utility.
    fn p(job: &Job) -> bool {
        crate::domain::lifecycle::is_open(
            job,
            &crate::domain::lifecycle::Policy {
                push: false,
                push_retries: 0,
                max_attempts: 2,
            },
        )
    }

    /// `p`, as the tests of the other files of the log take it.
    pub(super) const P: &dyn Fn(&Job) -> bool = &p;

    pub(super) fn cancelled() -> EventKind {
        EventKind::Cancelled { reason: "r".into() }
    }

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
                    P,
                )
                .unwrap();
            assert_eq!((a.seq, a.job), (1, 1));
            let b = j
                .append(Some(1), EventKind::Cancelled { reason: "r".into() }, P)
                .unwrap();
            assert_eq!((b.seq, b.job), (2, 1));
            assert!(matches!(
                Journal::open(dir.path()),
                Err(JournalError::Locked(_))
            ));
        }
        let j = reopen_for_test(dir.path());
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
                P,
            )
            .unwrap();
        assert_eq!(
            batch.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        // append_batch stores each job's projection: they are the fold of the log
        let jobs = j.fold_all().unwrap();
        assert_eq!(j.projections().unwrap(), jobs);
        assert!(
            j.open_jobs().unwrap().is_empty(),
            "rejected jobs are settled"
        );
        let seqs: Vec<u64> = j.job_events(1).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2]);
    }

    #[test]
    fn jobs_are_numbered_densely_and_the_numbering_survives_a_reopening_and_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            assert_eq!((j.next_job(), j.last_job()), (1, 0));
            let a = j.append(None, cancelled(), P).unwrap();
            j.append(Some(a.job), cancelled(), P).unwrap();
            j.append(Some(a.job), cancelled(), P).unwrap();
            let b = j.append(None, cancelled(), P).unwrap();
            let batch = j
                .append_batch(vec![(None, cancelled()), (Some(b.job), cancelled())], P)
                .unwrap();
            assert_eq!((a.seq, a.job), (1, 1));
            assert_eq!((b.seq, b.job), (4, 2));
            assert_eq!((batch[0].seq, batch[0].job), (5, 3));
            assert_eq!(j.last_job(), 3);
            // an event for a job never opened is refused, and writes nothing
            for never in [0, 4, 99] {
                let e = j.append(Some(never), cancelled(), P).unwrap_err();
                assert!(matches!(e, JournalError::Refused(_)), "{e}");
            }
            assert!(!j.is_broken());
            assert_eq!((j.next_seq(), j.next_job()), (7, 4));
            // a crash that took an append after its job index entry was written: the entry
            // names a seq above the log's end
            let mut lost = Vec::new();
            block::put_varint(&mut lost, 7);
            j.job_seqs.insert(4u64.to_be_bytes(), lost).unwrap();
            j.flush().unwrap();
        }
        let j = reopen_for_test(dir.path());
        assert_eq!(j.next_job(), 4, "the lost job's number is given again");
        let c = j.append(None, cancelled(), P).unwrap();
        assert_eq!((c.seq, c.job), (7, 4));
        assert_eq!(j.job_events(4).unwrap().len(), 1);
        assert_eq!(
            j.fold_all().unwrap().keys().copied().collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
    }

    #[test]
    fn farm_events_belong_to_no_job_and_survive_a_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let drained = || EventKind::Drained {
            reason: "kernel update".into(),
        };
        {
            let j = Journal::open(dir.path()).unwrap();
            let a = j.append(None, cancelled(), P).unwrap();
            let d = j.append(Some(FARM), drained(), P).unwrap();
            assert_eq!((d.seq, d.job), (2, FARM));
            // no job opened, none marked, the numbering goes on
            assert_eq!(j.next_job(), 2);
            // a farm event given a job, or none, and a job's event given FARM: refused
            for (job, kind) in [
                (None, drained()),
                (Some(a.job), EventKind::Undrained {}),
                (Some(FARM), cancelled()),
            ] {
                let e = j.append(job, kind, P).unwrap_err();
                assert!(matches!(e, JournalError::Refused(_)), "{e}");
            }
            let b = j
                .append_batch(
                    vec![(None, cancelled()), (Some(FARM), EventKind::Undrained {})],
                    P,
                )
                .unwrap();
            assert_eq!((b[0].job, b[1].job), (2, FARM));
            j.append(Some(FARM), drained(), P).unwrap();
        }
        let j = reopen_for_test(dir.path());
        let farm: Vec<(u64, &str)> = j
            .farm_events()
            .unwrap()
            .iter()
            .map(|e| (e.seq, e.kind.name()))
            .collect();
        assert_eq!(farm, [(2, "drained"), (4, "undrained"), (5, "drained")]);
        // the job folds skip them; `since` shows them in their place
        let jobs = j.fold_all().unwrap();
        assert_eq!(jobs.keys().copied().collect::<Vec<_>>(), [1, 2]);
        assert_eq!(j.newest_projections(5).unwrap(), jobs);
        assert_eq!(j.fold_job(FARM).unwrap(), None);
        assert_eq!(j.open_jobs().unwrap(), [1, 2], "FARM is never marked open");
        assert_eq!(j.since(0).count(), 5);
        assert_eq!((j.next_job(), j.next_seq()), (3, 6));
        // a log of farm events only
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.append(Some(FARM), drained(), P).unwrap();
        drop(j);
        let j = reopen_for_test(dir.path());
        assert_eq!((j.last_job(), j.farm_events().unwrap().len()), (0, 1));
        assert!(j.fold_all().unwrap().is_empty());
        assert_eq!(j.append(None, cancelled(), P).unwrap().job, 1);
    }
}
