//! The event log: one sled tree, key = big-endian u64 seq, value = the event as JSON.
//!
//! Invariant: `append` and `append_batch` return only after the events are flushed, so a caller
//! acts on a step only once its event is durable. `append_with` appends without flushing;
//! `sync` then makes everything appended so far durable with one flush shared by every thread
//! waiting at that moment (group commit). Seqs are handed out under one lock, so the log is
//! totally ordered, a reader that has seen seq N has seen every event before it, and a flush
//! covers every event appended before it (sled has one log for all its trees).

pub mod archive;
pub mod event;
pub mod fold;

pub use event::{Cause, Event, EventKind, Input, Mode, Status, Tag};
pub use fold::{Job, Jobs, State};

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

const EVENTS: &str = "events";
const BY_JOB: &str = "by_job";
const BY_IMAGE: &str = "by_image";
const JOBS: &str = "jobs";
const INPUTS: &str = "inputs";
const BY_SHA: &str = "by_sha";
const OPEN: &str = "open";
const BY_FOLDER: &str = "by_folder";
/// Key (in the default tree) of the format of the stored projections: when the fold changes,
/// the projections are folded again from the log at the next start.
const PROJECTION_FORMAT: &[u8] = b"projection_format";
/// The format the fold of this version writes.
pub const PROJECTION_VERSION: u64 = 2;
/// Key (in the default tree) written to check that the log takes writes again.
const PROBE: &[u8] = b"probe";
/// Key (in the default tree) of the highest seq whose job projection is stored.
const PROJECTED_UPTO: &[u8] = b"projected_upto";

/// The log and its indexes. `events` is the truth; `by_job` (job ++ seq), `by_image`
/// (image_id ++ 0 ++ job), `by_sha` (sha256 of the claimed file ++ 0 ++ job), `jobs` (job -> its
/// folded state, the projection) and `open` (the jobs not settled yet) are derived from it and
/// can be rebuilt by folding `events` (`build-image replay` checks the projections). The
/// projections are a snapshot of the fold: `projected_upto` says up to which seq they are
/// stored, so a start folds only the events after it.
pub struct Journal {
    db: sled::Db,
    events: sled::Tree,
    by_job: sled::Tree,
    by_image: sled::Tree,
    by_sha: sled::Tree,
    by_folder: sled::Tree,
    jobs: sled::Tree,
    open: sled::Tree,
    inputs: sled::Tree,
    next_seq: Mutex<u64>,
    commit: Mutex<Commit>,
    committed: Condvar,
    path: PathBuf,
    /// Set at the first write error: sled may then block a later flush forever (a failed
    /// reservation leaves a hole its stable point never passes), so this handle writes nothing
    /// more; the store reopens the log.
    broken: Mutex<Option<String>>,
}

/// Group commit: events below `durable` are flushed; `flushing` while a thread flushes for all.
#[derive(Default)]
struct Commit {
    durable: u64,
    flushing: bool,
}

/// The job's state after an event, and whether the job is still open (not settled).
pub type Projected = (Job, bool);

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
        let had_by_sha = db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == BY_SHA.as_bytes());
        let events = db.open_tree(EVENTS)?;
        let next = match events.last()? {
            Some((k, _)) => key_seq(&k) + 1,
            None => 1,
        };
        let journal = Journal {
            by_job: db.open_tree(BY_JOB)?,
            by_image: db.open_tree(BY_IMAGE)?,
            by_sha: db.open_tree(BY_SHA)?,
            by_folder: db.open_tree(BY_FOLDER)?,
            jobs: db.open_tree(JOBS)?,
            open: db.open_tree(OPEN)?,
            inputs: db.open_tree(INPUTS)?,
            db,
            events,
            next_seq: Mutex::new(next),
            commit: Mutex::new(Commit {
                durable: next,
                flushing: false,
            }),
            committed: Condvar::new(),
            path: dir.to_path_buf(),
            broken: Mutex::new(None),
        };
        if !had_by_sha && next > 1 {
            // A log written before the content index existed: build it once.
            let mut batch = sled::Batch::default();
            journal.fold_range(0, None, |ev| {
                if ev.kind == Tag::Claimed
                    && let Some(sha) = &ev.sha256
                {
                    batch.insert(sha_key(sha, ev.job), &[]);
                }
            })?;
            journal.by_sha.apply_batch(batch)?;
            journal.db.flush()?;
        }
        Ok(journal)
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
            (job.clone(), is_open(job))
        })?;
        if let Some(last) = evs.last() {
            self.sync(last.seq + 1)?;
        }
        Ok(evs)
    }

    /// Appends events without flushing them (see `sync`). `project` is called for each event,
    /// in order, under the append lock, with the event and its stored form, and gives the
    /// job's state after it, stored as the job's projection.
    pub fn append_with(
        &self,
        items: Vec<(Option<u64>, EventKind)>,
        project: impl FnMut(&Event, &fold::EventView<'_>) -> Projected,
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
        mut project: impl FnMut(&Event, &fold::EventView<'_>) -> Projected,
    ) -> Result<Vec<Event>> {
        let mut out = Vec::with_capacity(items.len());
        let mut next = self.next_seq.lock().unwrap_or_else(|p| p.into_inner());
        type Items = Vec<(Vec<u8>, Vec<u8>)>;
        let mut batch: Items = Vec::new();
        let mut by_job: Items = Vec::new();
        let mut by_image: Items = Vec::new();
        let mut by_sha: Items = Vec::new();
        let mut by_folder: Items = Vec::new();
        let mut jobs: Items = Vec::new();
        let mut open: Vec<([u8; 8], bool)> = Vec::new();
        let mut inputs: Items = Vec::new();
        let mut seq = *next;
        let mut projected: std::collections::HashMap<u64, Projected> = Default::default();
        for (job, mut kind) in items {
            // The input goes to its own tree, moved, not copied (it can be megabytes).
            let input = match &mut kind {
                EventKind::Queued { input, .. } | EventKind::Invalid { input, .. } => {
                    Some(std::mem::take(&mut input.0))
                }
                _ => None,
            };
            let ev = Event {
                seq,
                ts: now_ts(),
                job: job.unwrap_or(seq),
                kind,
            };
            let bytes = serde_json::to_vec(&ev).map_err(JournalError::Encode)?;
            let view = decode_view(&seq.to_be_bytes(), &bytes)?;
            projected.insert(ev.job, project(&ev, &view));
            by_job.push((job_seq_key(ev.job, seq).to_vec(), Vec::new()));
            match &ev.kind {
                EventKind::Queued { image_id, spec, .. } => {
                    by_image.push((image_key(image_id, ev.job), Vec::new()));
                    by_folder.push((image_key(&folder_key(spec), ev.job), Vec::new()));
                }
                EventKind::Invalid {
                    image_id: Some(image_id),
                    ..
                } => {
                    by_image.push((image_key(image_id, ev.job), Vec::new()));
                }
                EventKind::Claimed { sha256, .. } => {
                    by_sha.push((sha_key(sha256, ev.job), Vec::new()));
                }
                _ => {}
            }
            if let Some(input) = input {
                inputs.push((ev.job.to_be_bytes().to_vec(), input));
            }
            batch.push((seq.to_be_bytes().to_vec(), bytes));
            out.push(ev);
            seq += 1;
        }
        for (id, (job, is_open)) in &projected {
            let bytes = serde_json::to_vec(job).map_err(JournalError::Encode)?;
            jobs.push((id.to_be_bytes().to_vec(), bytes));
            open.push((id.to_be_bytes(), *is_open));
        }
        // Indexes and inputs first, then the events, then the projections: sled recovers a
        // prefix of what was written, so a crash leaves an index entry without its event
        // (readers skip it) or events newer than `projected_upto` (folded at the next start),
        // never an event missing from its indexes. Plain inserts, not sled batches: each
        // `apply_batch` makes sled seal and write its buffer (a pwrite and a sync_file_range),
        // and the prefix is all the atomicity needed here.
        for (tree, items) in [
            (&self.by_job, by_job),
            (&self.by_image, by_image),
            (&self.by_sha, by_sha),
            (&self.by_folder, by_folder),
            (&self.inputs, inputs),
            (&self.events, batch),
            (&self.jobs, jobs),
        ] {
            for (k, v) in items {
                tree.insert(k, v)?;
            }
        }
        for (k, is_open) in open {
            if is_open {
                self.open.insert(k, &[])?;
            } else {
                self.open.remove(k)?;
            }
        }
        if seq > *next {
            self.db.insert(PROJECTED_UPTO, &(seq - 1).to_be_bytes())?;
        }
        *next = seq;
        Ok(out)
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

    /// The events of one job, in order (through the by_job index).
    pub fn job_events(&self, job: u64) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        for item in self.by_job.scan_prefix(job.to_be_bytes()) {
            let (k, _) = item?;
            let seq = key_seq(&k[8..]);
            if let Some(ev) = self.get(seq)? {
                out.push(ev);
            }
        }
        Ok(out)
    }

    /// The input workitem of a job (stored with its `queued` or `invalid` event).
    pub fn input(&self, job: u64) -> Result<Option<serde_json::Value>> {
        match self.inputs.get(job.to_be_bytes())? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|source| JournalError::Corrupt { seq: job, source }),
            None => Ok(None),
        }
    }

    /// The stored bytes of a job's input workitem.
    pub fn input_bytes(&self, job: u64) -> Result<Option<sled::IVec>> {
        Ok(self.inputs.get(job.to_be_bytes())?)
    }

    /// The jobs that carry this image_id, oldest first (through the by_image index).
    pub fn jobs_for_image(&self, image_id: &str) -> Result<Vec<u64>> {
        let mut prefix = image_id.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.by_image.scan_prefix(&prefix) {
            let (k, _) = item?;
            out.push(key_seq(&k[prefix.len()..]));
        }
        Ok(out)
    }

    /// The jobs whose job folder is `prefix/dir_id` of `spec`, oldest first.
    pub fn jobs_for_folder(&self, spec: &crate::workitem::Spec) -> Result<Vec<u64>> {
        let mut prefix = folder_key(spec).into_bytes();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.by_folder.scan_prefix(&prefix) {
            let (k, _) = item?;
            out.push(key_seq(&k[prefix.len()..]));
        }
        Ok(out)
    }

    /// The jobs that carry this file content (the sha256 of a claimed file), oldest first.
    pub fn jobs_for_sha(&self, sha256: &str) -> Result<Vec<u64>> {
        let mut prefix = sha256.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.by_sha.scan_prefix(&prefix) {
            let (k, _) = item?;
            out.push(key_seq(&k[prefix.len()..]));
        }
        Ok(out)
    }

    /// Stores a job's folded state (the projection) and whether it is open. Not flushed on its
    /// own: it is derived, and made durable by the next flush.
    pub fn put_projection(&self, job: &Job, open: bool) -> Result<()> {
        let bytes = serde_json::to_vec(job).map_err(JournalError::Encode)?;
        self.jobs.insert(job.id.to_be_bytes(), bytes)?;
        if open {
            self.open.insert(job.id.to_be_bytes(), &[])?;
        } else {
            self.open.remove(job.id.to_be_bytes())?;
        }
        Ok(())
    }

    /// The stored projection of one job.
    pub fn projection(&self, job: u64) -> Result<Option<Job>> {
        match self.jobs.get(job.to_be_bytes())? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|source| JournalError::Corrupt { seq: job, source }),
            None => Ok(None),
        }
    }

    /// Every stored projection.
    pub fn projections(&self) -> Result<Jobs> {
        self.projections_from(0)
    }

    /// The stored projections of the jobs with an id of at least `first`.
    pub fn projections_from(&self, first: u64) -> Result<Jobs> {
        let mut out = Jobs::new();
        for item in self.jobs.range(first.to_be_bytes()..) {
            let (k, v) = item?;
            let id = key_seq(&k);
            let job: Job = serde_json::from_slice(&v)
                .map_err(|source| JournalError::Corrupt { seq: id, source })?;
            out.insert(id, job);
        }
        Ok(out)
    }

    /// The jobs marked open (not settled) when their last event was appended.
    pub fn open_jobs(&self) -> Result<Vec<u64>> {
        self.open.iter().keys().map(|k| Ok(key_seq(&k?))).collect()
    }

    /// The highest seq whose projection is stored (0: none, e.g. a log from before
    /// projections were kept this way).
    pub fn projected_upto(&self) -> Result<u64> {
        Ok(self.db.get(PROJECTED_UPTO)?.map_or(0, |v| key_seq(&v)))
    }

    /// Records that the projections are stored up to seq `upto` (after a repair).
    pub fn set_projected_upto(&self, upto: u64) -> Result<()> {
        self.db.insert(PROJECTED_UPTO, &upto.to_be_bytes())?;
        Ok(())
    }

    /// The seq the next event will get.
    pub fn next_seq(&self) -> u64 {
        *self.next_seq.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Folds the whole log from empty.
    pub fn fold_all(&self) -> Result<Jobs> {
        Ok(self.fold_jobs(None)?.0)
    }

    /// Folds the events below seq `until` (all: None) from empty; returns the jobs and how many
    /// events were read. Jobs are independent, so the work is split by job id over the cores:
    /// each thread reads the log and fully decodes only its own jobs' events (the job id is
    /// taken from the front of the stored JSON, where the encoder puts it).
    pub fn fold_jobs(&self, until: Option<u64>) -> Result<(Jobs, u64)> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 4) as u64;
        let end = until.unwrap_or(u64::MAX);
        let part = |me: u64| -> Result<(Jobs, u64)> {
            let mut jobs = Jobs::new();
            let mut n = 0;
            for item in self.events.range(0u64.to_be_bytes()..end.to_be_bytes()) {
                let (k, v) = item?;
                n += 1;
                let job = match quick_job(&v) {
                    Some(job) => job,
                    None => decode_view(&k, &v)?.job,
                };
                if job % threads != me {
                    continue;
                }
                fold::apply(&mut jobs, &decode_view(&k, &v)?);
            }
            Ok((jobs, n))
        };
        if threads == 1 {
            return part(0);
        }
        let parts: Vec<Result<(Jobs, u64)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|me| s.spawn(move || part(me))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Ok((Jobs::new(), 0))))
                .collect()
        });
        let mut all = Jobs::new();
        let mut n = 0;
        for p in parts {
            let (mut jobs, count) = p?;
            all.append(&mut jobs);
            n = count;
        }
        Ok((all, n))
    }

    /// Calls `f` with each stored event from seq `since` up to (not including) `until`, read
    /// in its stored form without building the typed event (the fast path of replay). Returns
    /// how many it read.
    pub fn fold_range(
        &self,
        since: u64,
        until: Option<u64>,
        mut f: impl FnMut(&fold::EventView<'_>),
    ) -> Result<u64> {
        let mut n = 0;
        let end = until.unwrap_or(u64::MAX);
        for item in self.events.range(since.to_be_bytes()..end.to_be_bytes()) {
            let (k, v) = item?;
            let view: fold::EventView<'_> =
                serde_json::from_slice(&v).map_err(|source| JournalError::Corrupt {
                    seq: key_seq(&k),
                    source,
                })?;
            f(&view);
            n += 1;
        }
        Ok(n)
    }

    /// Flushes everything appended so far.
    pub fn flush(&self) -> Result<()> {
        self.sync(self.next_seq())
    }

    /// The format of the stored projections (0: older than the format mark).
    pub fn projection_format(&self) -> Result<u64> {
        Ok(self.db.get(PROJECTION_FORMAT)?.map_or(0, |v| key_seq(&v)))
    }

    /// Replaces every stored projection (and the open marks, and the folder index) by those
    /// of `jobs`, the fold of the whole log below seq `upto + 1`, and flushes.
    pub fn rewrite_projections(
        &self,
        jobs: &Jobs,
        is_open: &dyn Fn(&Job) -> bool,
        upto: u64,
    ) -> Result<()> {
        self.jobs.clear()?;
        self.open.clear()?;
        for job in jobs.values() {
            self.put_projection(job, is_open(job))?;
        }
        if self.by_folder.is_empty() {
            // A log from before the folder index: build it from the queued events.
            for item in self.events.iter() {
                let (_, v) = item?;
                if let Ok(Event {
                    job,
                    kind: EventKind::Queued { spec, .. },
                    ..
                }) = serde_json::from_slice::<Event>(&v)
                {
                    self.by_folder
                        .insert(image_key(&folder_key(&spec), job), &[])?;
                }
            }
        }
        self.set_projected_upto(upto)?;
        self.db
            .insert(PROJECTION_FORMAT, &PROJECTION_VERSION.to_be_bytes())?;
        self.flush()
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

/// The key of a job folder: `prefix/dir_id`.
pub fn folder_key(spec: &crate::workitem::Spec) -> String {
    format!("{}/{}", spec.prefix, spec.dir_id)
}

fn job_seq_key(job: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&job.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn image_key(image_id: &str, job: u64) -> Vec<u8> {
    let mut k = image_id.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&job.to_be_bytes());
    k
}

fn sha_key(sha256: &str, job: u64) -> Vec<u8> {
    image_key(sha256, job)
}

/// The job id from the front of a stored event (`{"seq":N,"ts":"...","job":M,...`), without
/// decoding the rest; None when it is not where the encoder puts it.
fn quick_job(v: &[u8]) -> Option<u64> {
    let head = &v[..v.len().min(96)];
    let at = head.windows(6).position(|w| w == b"\"job\":")? + 6;
    let digits = head[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&head[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

fn decode_view<'a>(k: &[u8], v: &'a [u8]) -> Result<fold::EventView<'a>> {
    serde_json::from_slice(v).map_err(|source| JournalError::Corrupt {
        seq: key_seq(k),
        source,
    })
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

    const P: &dyn Fn(&Job) -> bool = &p;

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
        assert_eq!(j.projected_upto().unwrap(), 5);
        assert!(
            j.open_jobs().unwrap().is_empty(),
            "rejected jobs are settled"
        );
        let seqs: Vec<u64> = j.job_events(1).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2]);
    }

    #[test]
    fn image_index() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let inv = |id: &str| EventKind::Invalid {
            image_id: Some(id.into()),
            error: "e".into(),
            held_by: None,
            input: serde_json::json!({}).into(),
        };
        j.append(None, inv("a"), P).unwrap();
        j.append(None, inv("ab"), P).unwrap();
        j.append(None, inv("a"), P).unwrap();
        assert_eq!(j.jobs_for_image("a").unwrap(), vec![1, 3]);
        assert_eq!(
            j.open_jobs().unwrap(),
            vec![1, 2, 3],
            "answered, not delivered yet"
        );
        assert_eq!(j.jobs_for_image("ab").unwrap(), vec![2]);
        assert!(j.jobs_for_image("b").unwrap().is_empty());
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
                                (job, true)
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
        assert_eq!(j.projected_upto().unwrap(), 200);
        j.append_with(vec![(None, claimed("cc"))], |_, v| {
            let mut job = Job::default();
            job.apply(v);
            (job, false)
        })
        .unwrap();
        assert!(j.unsynced());
        j.flush().unwrap();
        assert!(!j.unsynced());
        assert_eq!(j.open_jobs().unwrap().len(), 200);
    }
}
