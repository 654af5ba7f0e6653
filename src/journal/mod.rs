//! The event log: events in blocks (see `block`) in one sled tree, key = big-endian u64 seq of a
//! block's first event, value = the block (the events as JSON, compressed together).
//!
//! Invariant: `append` and `append_batch` return only after the events are flushed, so a caller
//! acts on a step only once its event is durable. `append_with` appends without flushing;
//! `sync` then makes everything appended so far durable with one flush shared by every thread
//! waiting at that moment (group commit). Seqs are handed out under one lock, so the log is
//! totally ordered, a reader that has seen seq N has seen every event before it, and a flush
//! covers every event appended before it (sled has one log for all its trees). Each append
//! writes its events as one block; once the small blocks at the end of the log hold
//! `SEAL_EVENTS` events they are merged into one (`seal`), so a scan reads few, large values
//! whichever way the events came.
//!
//! Kept in their own files: `indexes` (the indexes and open marks derived from the events, and the
//! lookups through them), `migrate` (a log of stored form 1 moved into form 2), `scan` (reading the
//! events in order and folding them).

pub mod archive;
pub mod block;
pub mod event;
pub mod fold;
mod indexes;
mod migrate;
mod scan;

pub use event::{Cause, Event, EventKind, Input, Mode, Status, Tag};
pub use fold::{Job, Jobs, State};
pub use indexes::folder_key;

use indexes::{image_key, sha_key};

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

    /// Removes the small blocks a crash in the middle of a merge (`seal`) left in `tail` after
    /// the merged block was written (their events are in it), and takes the others as the
    /// small blocks to merge next.
    fn tidy_tail(&self) -> Result<()> {
        let sealed = match self.blocks.last()? {
            Some((k, v)) => last_entry(key_seq(&k), &v)?,
            None => 0,
        };
        let mut small = Small::default();
        let mut stale = Vec::new();
        for item in self.tail.iter() {
            let (k, v) = item?;
            let first = key_seq(&k);
            if first <= sealed {
                stale.push(k);
                continue;
            }
            let body = block::body(first, &v)?;
            small.keys.push(first);
            small.events += block::entries(first, &body)
                .filter(|e| e.as_ref().is_ok_and(|e| !e.input))
                .count();
        }
        if !stale.is_empty() {
            log::warn!(
                "log {}: {} block(s) left by an interrupted merge removed (their events are in the merged block)",
                self.path.display(),
                stale.len()
            );
            for k in stale {
                self.tail.remove(k)?;
            }
            self.db.flush()?;
        }
        *lock(&self.small) = small;
        Ok(())
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

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event and flushes it. `job = None` opens a new job whose id is this seq.
    /// `is_open` says whether a job is still open after it (the store passes the lifecycle's).
    pub fn append(
        &self,
        job: Option<u64>,
        kind: EventKind,
        is_open: &dyn Fn(&Job) -> bool,
    ) -> Result<Event> {
        let mut out = self.append_batch(vec![(job, kind)], is_open)?;
        out.pop()
            .ok_or_else(|| JournalError::Sled(sled::Error::Unsupported("empty batch".into())))
    }

    /// Appends several events with one flush (group commit), storing each job's projection
    /// folded from its stored one, open or not as `is_open` says.
    pub fn append_batch(
        &self,
        items: Vec<(Option<u64>, EventKind)>,
        is_open: &dyn Fn(&Job) -> bool,
    ) -> Result<Vec<Event>> {
        let mut pending: std::collections::HashMap<u64, Job> = Default::default();
        let evs = self.append_with(items, |ev, view| {
            let job = pending
                .entry(ev.job)
                .or_insert_with(|| self.projection(ev.job).ok().flatten().unwrap_or_default());
            job.apply(view);
            is_open(job)
        })?;
        if let Some(last) = evs.last() {
            self.sync(last.seq + 1)?;
        }
        Ok(evs)
    }

    /// Appends events without flushing them (see `sync`). `project` is called for each event,
    /// in order, under the append lock, with the event and its stored form, and says whether
    /// the job is open after it (its open mark is kept or written, else removed).
    pub fn append_with(
        &self,
        items: Vec<(Option<u64>, EventKind)>,
        project: impl FnMut(&Event, &fold::EventView<'_>) -> bool,
    ) -> Result<Vec<Event>> {
        self.check_broken()?;
        let r = self.append_inner(items, project);
        if let Err(e) = &r {
            self.set_broken(e);
        }
        r
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

    fn append_inner(
        &self,
        items: Vec<(Option<u64>, EventKind)>,
        mut project: impl FnMut(&Event, &fold::EventView<'_>) -> bool,
    ) -> Result<Vec<Event>> {
        let mut out = Vec::with_capacity(items.len());
        let mut next = self.next_seq.lock().unwrap_or_else(|p| p.into_inner());
        let mut stored: Vec<Stored> = Vec::with_capacity(items.len());
        let mut indexed: Vec<(&sled::Tree, Vec<u8>)> = Vec::new();
        let mut seqs: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
        let mut seq = *next;
        let mut projected: std::collections::HashMap<u64, bool> = Default::default();
        for (job, mut kind) in items {
            let input = take_input(&mut kind);
            let ev = Event {
                seq,
                ts: now_ts(),
                job: job.unwrap_or(seq),
                kind,
            };
            let bytes = serde_json::to_vec(&ev).map_err(JournalError::Encode)?;
            let view = decode_view(seq, &bytes)?;
            projected.insert(ev.job, project(&ev, &view));
            seqs.entry(ev.job).or_default().push(seq);
            indexed.extend(self.index_entry(ev.job, &ev.kind));
            stored.push(Stored {
                seq,
                job: ev.job,
                json: bytes,
                input,
            });
            out.push(ev);
            seq += 1;
        }
        // Indexes and the open marks of the jobs open after this append first, then the events,
        // then the marks of the jobs it settles removed: sled recovers a prefix of what was
        // written, so a crash leaves an index entry or a mark without its event (readers skip
        // it, a start removes the mark) or a settled job still marked (a start folds it and
        // removes the mark), never an event missing from its indexes or an open job unmarked.
        // Plain inserts, not sled batches: each `apply_batch` makes sled seal and write its
        // buffer (a pwrite and a sync_file_range), and the prefix is all the atomicity needed.
        for (job, new) in &seqs {
            self.add_seqs(*job, new)?;
        }
        for (tree, key) in indexed {
            tree.insert(key, &[])?;
        }
        for (id, is_open) in &projected {
            if *is_open {
                self.mark(*id)?;
            }
        }
        self.write_blocks(&stored)?;
        for (id, is_open) in &projected {
            if !*is_open {
                self.unmark(*id)?;
            }
        }
        *next = seq;
        Ok(out)
    }

    /// The name or content index entry an event adds, if any: (its tree, its key).
    fn index_entry(&self, job: u64, kind: &EventKind) -> Option<(&sled::Tree, Vec<u8>)> {
        match kind {
            EventKind::Queued { image_id, .. }
            | EventKind::Invalid {
                image_id: Some(image_id),
                ..
            } => Some((&self.by_image, image_key(image_id, job))),
            EventKind::Claimed { sha256, .. } => Some((&self.by_sha, sha_key(sha256, job))),
            _ => None,
        }
    }

    /// Writes events (ascending seq, above every stored one; called under `next_seq`) with
    /// their inputs as blocks: a few as one small block in `tail`, many cut into full blocks of
    /// `SEAL_EVENTS` events (or `SEAL_BYTES`) in `blocks`. Once the small blocks hold
    /// `SEAL_EVENTS` events they are merged into one full block (`seal`): `blocks` gets one
    /// large value per few hundred events, and the many small writes go to a tree of a few
    /// small values (sled rewrites a tree's last node as it grows: a node of small values is
    /// cheap to rewrite, and the tail's removed values free whole segments).
    fn write_blocks(&self, events: &[Stored]) -> Result<()> {
        let mut small = lock(&self.small);
        let mut builder = block::Builder::default();
        let mut first = 0;
        for ev in events {
            if builder.is_empty() {
                first = ev.seq;
            }
            builder.push(ev.seq, ev.job, &ev.json, false);
            if let Some(input) = &ev.input {
                builder.push(ev.seq, ev.job, input, true);
            }
            if builder.len() >= SEAL_EVENTS || builder.body_bytes() >= SEAL_BYTES {
                // every key of `blocks` stays below every key of `tail`
                self.seal(&mut small)?;
                let full = std::mem::take(&mut builder);
                self.blocks.insert(first.to_be_bytes(), full.finish())?;
            }
        }
        if !builder.is_empty() {
            let n = builder.len();
            self.tail.insert(first.to_be_bytes(), builder.finish())?;
            small.keys.push(first);
            small.events += n;
            if small.events >= SEAL_EVENTS {
                self.seal(&mut small)?;
            }
        }
        Ok(())
    }

    /// Merges the small blocks of `tail` into one block of `blocks` under the first one's key.
    /// The merged block is written before the small ones are removed, so a crash in between
    /// leaves events twice, never missing (readers skip the copies, `tidy_tail` removes them).
    fn seal(&self, small: &mut Small) -> Result<()> {
        let Some(&key) = small.keys.first() else {
            return Ok(());
        };
        let mut merged = block::Builder::default();
        for item in self.tail.iter() {
            let (k, v) = item?;
            let first = key_seq(&k);
            let body = block::body(first, &v)?;
            for e in block::entries(first, &body) {
                let e = e?;
                merged.push(e.seq, e.job, e.json, e.input);
            }
        }
        self.blocks.insert(key.to_be_bytes(), merged.finish())?;
        // counted before the small blocks go, so a scan that missed them sees it (`Scan`)
        self.seals.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        for k in &small.keys {
            self.tail.remove(k.to_be_bytes())?;
        }
        *small = Small::default();
        Ok(())
    }

    /// Makes every event below seq `end` durable. Group commit: when another thread is already
    /// flushing, waits for it and flushes only if that did not cover `end`; one flush covers
    /// everything appended before it started, for every thread waiting.
    pub fn sync(&self, end: u64) -> Result<()> {
        let mut c = self.commit.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if c.durable >= end {
                return Ok(());
            }
            if !c.flushing {
                break;
            }
            c = self.committed.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        self.check_broken()?;
        c.flushing = true;
        drop(c);
        let target = self.next_seq();
        let flushed = self.db.flush().map_err(JournalError::from);
        if let Err(e) = &flushed {
            self.set_broken(e);
        }
        let mut c = self.commit.lock().unwrap_or_else(|p| p.into_inner());
        c.flushing = false;
        if flushed.is_ok() {
            c.durable = c.durable.max(target);
        }
        self.committed.notify_all();
        flushed?;
        Ok(())
    }

    /// The highest seq known durable (0: none).
    pub fn durable_seq(&self) -> u64 {
        lock(&self.commit).durable.saturating_sub(1)
    }

    /// Whether some appended event is not flushed yet.
    pub fn unsynced(&self) -> bool {
        let next = self.next_seq();
        self.commit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .durable
            < next
    }

    /// The seq the next event will get.
    pub fn next_seq(&self) -> u64 {
        *self.next_seq.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Flushes everything appended so far.
    pub fn flush(&self) -> Result<()> {
        self.sync(self.next_seq())
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

    /// The seq of the last event in the log (0: empty).
    pub fn last_seq(&self) -> u64 {
        self.next_seq() - 1
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

/// The input a `queued` or `invalid` event carries, moved out of it (it can be megabytes; it is
/// stored beside the event); None for an empty one, which so does not hide the job's earlier
/// input.
fn take_input(kind: &mut EventKind) -> Option<Vec<u8>> {
    match kind {
        EventKind::Queued { input, .. } | EventKind::Invalid { input, .. } => {
            Some(std::mem::take(&mut input.0)).filter(|i| !i.is_empty())
        }
        _ => None,
    }
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

fn decode_view(seq: u64, v: &[u8]) -> Result<fold::EventView<'_>> {
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

    /// Open until settled, as the lifecycle says with no push utility.
    fn p(job: &Job) -> bool {
        crate::lifecycle::is_open(
            job,
            &crate::lifecycle::Policy {
                push: false,
                push_retries: 0,
                max_attempts: 2,
            },
        )
    }

    /// `p`, as the tests of the other files of the log take it.
    pub(super) const P: &dyn Fn(&Job) -> bool = &p;

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
    fn content_index_and_group_commit() {
        let dir = tempfile::tempdir().unwrap();
        let j = std::sync::Arc::new(Journal::open(dir.path()).unwrap());
        let claimed = |sha: &str| EventKind::Claimed {
            file: "f".into(),
            worker: "w".into(),
            bytes: 1,
            sha256: sha.into(),
            source: None,
        };
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let j = std::sync::Arc::clone(&j);
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let sha = if i % 2 == 0 { "aa" } else { "ab" };
                        let evs = j
                            .append_with(vec![(None, claimed(sha))], |_, v| {
                                let mut job = Job::default();
                                job.apply(v);
                                job.id == v.job
                            })
                            .unwrap();
                        j.sync(evs[0].seq + 1).unwrap();
                        assert!(evs[0].seq >= 1, "thread {t}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!j.unsynced());
        assert_eq!(j.jobs_for_sha("aa").unwrap().len(), 100);
        assert_eq!(j.jobs_for_sha("ab").unwrap().len(), 100);
        assert!(j.jobs_for_sha("a").unwrap().is_empty());
        assert_eq!(j.open_jobs().unwrap().len(), 200);
        j.append_with(vec![(None, claimed("cc"))], |_, v| {
            let mut job = Job::default();
            job.apply(v);
            job.id != v.job
        })
        .unwrap();
        assert!(j.unsynced());
        j.flush().unwrap();
        assert!(!j.unsynced());
        assert_eq!(j.open_jobs().unwrap().len(), 200);
    }

    pub(super) fn cancelled() -> EventKind {
        EventKind::Cancelled { reason: "r".into() }
    }

    #[test]
    fn small_blocks_are_sealed_and_a_crash_in_a_seal_leaves_no_copy() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            for _ in 0..300 {
                j.append(None, cancelled(), P).unwrap();
            }
            assert_eq!(j.blocks.len(), 1, "256 events sealed into one block");
            assert_eq!(j.tail.len(), 300 - SEAL_EVENTS, "the rest in small blocks");
            // a crash after a seal wrote its merged block, before it removed the small ones:
            // one of them is still there
            let (k, v) = j.blocks.first().unwrap().unwrap();
            let body = block::body(key_seq(&k), &v).unwrap();
            let e = block::entries(key_seq(&k), &body)
                .map(|e| e.unwrap())
                .nth(10)
                .unwrap();
            let mut b = block::Builder::default();
            b.push(e.seq, e.job, e.json, false);
            j.tail.insert(e.seq.to_be_bytes(), b.finish()).unwrap();
            // readers skip the copy
            let seqs: Vec<u64> = j.since(0).map(|e| e.unwrap().seq).collect();
            assert_eq!(seqs, (1..=300).collect::<Vec<_>>());
            assert_eq!(j.fold_all().unwrap().len(), 300);
            assert_eq!(j.get(e.seq).unwrap().unwrap().seq, e.seq);
            j.flush().unwrap();
        }
        // and the next open removes it
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.tail.len(), 300 - SEAL_EVENTS);
        assert_eq!(j.next_seq(), 301);
        assert_eq!(j.since(0).count(), 300);
        assert_eq!(j.job_events(11).unwrap().len(), 1);
        // sealing goes on from the small blocks found at the open
        for _ in 0..(2 * SEAL_EVENTS - 300) {
            j.append(None, cancelled(), P).unwrap();
        }
        assert_eq!(j.blocks.len(), 2);
        assert_eq!(j.tail.len(), 0);
        assert_eq!(j.since(0).count(), 2 * SEAL_EVENTS);
    }

    #[test]
    fn a_big_input_is_stored_with_its_event_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let big =
            serde_json::json!({ "image": { "image_id": "big", "kickstart": "x".repeat(3 << 20) } });
        let ev = j
            .append(
                None,
                EventKind::Invalid {
                    image_id: Some("big".into()),
                    error: "e".into(),
                    held_by: None,
                    input: big.clone().into(),
                },
                P,
            )
            .unwrap();
        j.append(Some(ev.job), cancelled(), P).unwrap();
        assert_eq!(j.input(ev.job).unwrap().unwrap(), big);
        assert_eq!(j.job_events(ev.job).unwrap().len(), 2);
        assert_eq!(j.jobs_for_image("big").unwrap(), vec![ev.job]);
        // past the block size: a block of its own, sealed at once, compressed
        assert_eq!(j.blocks.len(), 1);
        assert!(j.blocks.first().unwrap().unwrap().1.len() < 1 << 20);
    }
}
