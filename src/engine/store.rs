//! The job store: the event log and the fold of the jobs still open. It is the only writer of
//! the log, and the only holder of job state in memory.
//!
//! Invariants:
//! - A job's state changes only by `record`/`append`: the event is appended and applied to the
//!   in-memory fold under one lock, so memory is always the fold of the log.
//! - `record` returns once its events are durable (group commit across threads); the kinds
//!   that record a step already done (`delivered`, `pushed`) ride on the next flush instead
//!   (`EventKind::needs_flush`, at most `LAZY_FLUSH` later).
//! - A write error marks the store failing: callers stop acting (the claim loop stops
//!   claiming) until `repair` succeeds: it probes the log, reopens it when the store keeps
//!   reporting the old error, and reloads the open jobs from what is durable.
//! - The log is refused at start when it is shorter than the high-water mark kept beside it.
//! - The farm-level state (`farm`, `drained`) is the fold of the events of no job, kept as the
//!   open jobs are: folded at the open, applied at each append under the same lock.

use super::statedir::{self, detach_files, mark_path, read_mark, restrict_files};
use crate::domain::farm::{Drain, Farm};
use crate::domain::lifecycle::{self, Policy};
use crate::domain::workitem::Spec;
use crate::domain::{Event, EventKind, FARM, Job, Jobs};
use crate::journal::{self, Journal, JournalError, PROJECTION_VERSION};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{0}")]
    Locked(String),
    #[error(
        "the event log in {dir} lost its tail: it ends at event {last}, but events up to {mark} were written (high-water mark {mark_file}). Restore the log from a backup; to accept the loss and start from what is left, remove {mark_file}"
    )]
    Truncated {
        dir: PathBuf,
        last: u64,
        mark: u64,
        mark_file: PathBuf,
    },
    #[error(transparent)]
    StateDir(#[from] statedir::StateDirError),
    #[error("the event log cannot be written now ({0}); it is retried")]
    Failing(String),
    #[error("job {0} has no input workitem in the log")]
    NoInput(u64),
    #[error("job {0} is not in the log")]
    NoJob(u64),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// How soon an event that needs no flush of its own is flushed when nothing else flushes.
pub const LAZY_FLUSH: Duration = Duration::from_millis(100);
/// How often, at most, the high-water mark is written.
const MARK_EVERY: Duration = Duration::from_secs(1);

/// Locks a mutex, taking the data of a poisoned one (a panicked holder changed nothing that
/// the code after it relies on: every change is an append to the log first).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How one recorded event changed its job: what an [`Observer`] is told.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The job's state before the event (None: the event opened the job).
    pub before: Option<crate::domain::State>,
    pub after: crate::domain::State,
    /// The job's `started_at` after the event.
    pub started_at: Option<String>,
}

/// Told of every event as it is appended, in seq order, under the store's lock (before the
/// event's job projection is written, so a reader that sees the new projection was preceded by
/// the observer), and when `repair` reloads the jobs (an append that failed after its events
/// were observed, or events appended without a flush and lost, are then forgotten). Keep it
/// quick: memory only. (The HTTP server's metrics are one.)
pub trait Observer: Send + Sync {
    fn recorded(&self, event: &Event, change: &Change);
    /// An event of no job (`drained`, `cancel_noted`, …: no job changed), told after the job
    /// events of its append.
    fn recorded_farm(&self, _event: &Event) {}
    fn reloaded(&self, journal: &Journal);
}

pub struct Store {
    /// Told of each recorded event (set once, before anything is recorded).
    observer: std::sync::OnceLock<Arc<dyn Observer>>,
    dir: PathBuf,
    cache_bytes: u64,
    policy: Policy,
    journal: RwLock<Option<Arc<Journal>>>,
    /// The open jobs, as folded from the log.
    open: Mutex<Jobs>,
    /// The farm-level state (drained or not), folded from the events of no job.
    farm: Mutex<Farm>,
    /// Why the log cannot be written, while it cannot.
    failing: Mutex<Option<String>>,
    /// When events appended without a flush are to be flushed.
    lazy_flush: Mutex<Option<Instant>>,
    /// The high-water mark last written, and when.
    mark: Mutex<(u64, Instant)>,
    /// Free bytes kept on the state disk: below them nothing is appended.
    min_free: u64,
    /// The failing state is only a full disk (the log itself is fine).
    full: std::sync::atomic::AtomicBool,
}

impl Store {
    /// Opens the log in `dir` (refusing one that lost its tail), moves an older stored form to
    /// this one's, and loads the open jobs.
    pub fn open(dir: &Path, cache_bytes: u64, policy: Policy, patience: Duration) -> Result<Store> {
        statedir::prepare_state_dir(dir)?;
        // Not while `compact` swaps the log's files; what a crashed one left is finished first.
        let Some(_rewrite) = journal::archive::open_guard(dir, patience)? else {
            return Err(StoreError::Locked(format!(
                "the event log in {} is being rewritten by `compact`: try again when it is done",
                dir.display()
            )));
        };
        let journal = statedir::open_journal(dir, cache_bytes, patience)?;
        let last = journal.last_seq();
        if let Some(mark) = read_mark(dir)
            && last < mark
        {
            return Err(StoreError::Truncated {
                dir: dir.to_path_buf(),
                last,
                mark,
                mark_file: mark_path(dir),
            });
        }
        restrict_files(dir);
        let open = load_open(&journal, &policy)?;
        let farm = Farm::fold(&journal.farm_events()?);
        Ok(Store {
            observer: std::sync::OnceLock::new(),
            dir: dir.to_path_buf(),
            cache_bytes,
            policy,
            journal: RwLock::new(Some(Arc::new(journal))),
            open: Mutex::new(open),
            farm: Mutex::new(farm),
            failing: Mutex::new(None),
            lazy_flush: Mutex::new(None),
            mark: Mutex::new((last, Instant::now())),
            min_free: 0,
            full: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Keeps `bytes` free on the state disk: below that, appends are refused (the store is
    /// failing, as on a write error) until space returns.
    pub fn with_min_free(mut self, bytes: u64) -> Store {
        self.min_free = bytes;
        self
    }

    /// Free bytes on the state disk (None when it cannot be told).
    fn free_bytes(&self) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(&self.dir).ok()?;
        Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
    }

    /// Is there room for `need` more bytes (and the free space kept)?
    pub fn ensure_room(&self, need: u64) -> Result<()> {
        if self.min_free == 0 {
            return Ok(());
        }
        if let Some(free) = self.free_bytes()
            && free < self.min_free.saturating_add(need)
        {
            let why = format!(
                "the state disk of {} is full: {} MiB free, {} MiB kept free ([spool] state_min_free_mb)",
                self.dir.display(),
                free >> 20,
                self.min_free >> 20
            );
            let mut f = lock(&self.failing);
            if f.is_none() {
                log::error!("{why}; claiming stops until there is room");
                self.full.store(true, std::sync::atomic::Ordering::SeqCst);
                *f = Some(why.clone());
            }
            return Err(StoreError::Failing(why));
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sets the observer of recorded events (once; later calls are ignored).
    pub fn set_observer(&self, observer: Arc<dyn Observer>) {
        let _ = self.observer.set(observer);
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The log, for reading (queries). None only while `repair` reopens it.
    pub fn journal(&self) -> Result<Arc<Journal>> {
        self.journal
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Failing("the event log is being reopened".into()))
    }

    /// Why the log cannot be written now, if it cannot.
    pub fn failing(&self) -> Option<String> {
        lock(&self.failing).clone()
    }

    fn fail(&self, e: &JournalError) {
        let mut f = lock(&self.failing);
        if f.is_none() {
            log::error!("the event log cannot be written: {e}; claiming stops until it can");
        }
        *f = Some(e.to_string());
    }

    /// Records one event (see `record_batch`).
    pub fn record(&self, job: Option<u64>, kind: EventKind) -> Result<Event> {
        let mut evs = self.record_batch(vec![(job, kind)])?;
        evs.pop().ok_or(StoreError::NoJob(job.unwrap_or_default()))
    }

    /// Appends events and applies them to the fold; then makes them durable with one flush
    /// (shared with the other threads flushing at that moment), unless none of them needs it.
    pub fn record_batch(&self, items: Vec<(Option<u64>, EventKind)>) -> Result<Vec<Event>> {
        let evs = self.append(items)?;
        if evs.iter().any(|e| e.kind.needs_flush()) {
            self.sync()?;
        } else if !evs.is_empty() {
            self.flush_soon();
        }
        for ev in &evs {
            log_event(ev);
        }
        Ok(evs)
    }

    /// Appends events and applies them to the fold, without flushing (the caller calls `sync`
    /// before acting on them).
    pub fn append(&self, items: Vec<(Option<u64>, EventKind)>) -> Result<Vec<Event>> {
        if let Some(why) = self.failing() {
            return Err(StoreError::Failing(why));
        }
        let need: u64 = items
            .iter()
            .map(|(_, k)| match k {
                EventKind::Queued { input, .. } | EventKind::Invalid { input, .. } => {
                    input.0.len() as u64 + 4096
                }
                _ => 4096,
            })
            .sum();
        self.ensure_room(need)?;
        let journal = self.journal()?;
        let mut open = lock(&self.open);
        let mut pending: HashMap<u64, Job> = HashMap::new();
        let mut failed = None;
        let policy = self.policy;
        let observer = self.observer.get();
        let evs = journal
            .append_with(items, |ev, view, opens| {
                let job = pending.entry(ev.job).or_insert_with(|| {
                    if opens {
                        return Job::default();
                    }
                    match open.get(&ev.job) {
                        Some(job) => Some(job.clone()),
                        None => journal.projection(ev.job).unwrap_or_else(|e| {
                            failed = Some(e);
                            None
                        }),
                    }
                    .unwrap_or_default()
                });
                let before = (!opens).then_some(job.state);
                job.apply(view);
                if let Some(o) = observer {
                    let change = Change {
                        before,
                        after: job.state,
                        started_at: job.started_at.clone(),
                    };
                    o.recorded(ev, &change);
                }
                lifecycle::is_open(job, &policy)
            })
            .inspect_err(|e| {
                // a refused append (an event for a job never opened) wrote nothing
                if !matches!(e, JournalError::Refused(_)) {
                    self.fail(e)
                }
            })?;
        if evs.iter().any(|e| e.job == FARM) {
            let mut farm = lock(&self.farm);
            for ev in evs.iter().filter(|e| e.job == FARM) {
                farm.apply(ev);
                if let Some(o) = observer {
                    o.recorded_farm(ev);
                }
            }
        }
        for (id, job) in pending {
            if lifecycle::is_open(&job, &policy) {
                open.insert(id, job);
            } else {
                open.remove(&id);
            }
        }
        if let Some(e) = failed {
            // The events are in the log; the job's state is folded from them when next read.
            log::error!("cannot fold a job from the log while recording: {e}");
        }
        Ok(evs)
    }

    /// Makes everything appended so far durable.
    pub fn sync(&self) -> Result<()> {
        let journal = self.journal()?;
        journal.flush().inspect_err(|e| self.fail(e))?;
        Ok(())
    }

    /// Asks for a flush of what was appended without one, soon (`tick` does it).
    fn flush_soon(&self) {
        let mut due = lock(&self.lazy_flush);
        if due.is_none() {
            *due = Some(Instant::now() + LAZY_FLUSH);
        }
    }

    /// When `tick` has something to do next.
    pub fn next_tick(&self) -> Option<Instant> {
        let flush = *lock(&self.lazy_flush);
        let (marked, at) = *lock(&self.mark);
        let mark = self
            .journal()
            .ok()
            .filter(|j| j.last_seq() > marked)
            .map(|_| at + MARK_EVERY);
        [flush, mark].into_iter().flatten().min()
    }

    /// Flushes what was appended without a flush once its time has come, and writes the
    /// high-water mark (at most once a second).
    pub fn tick(&self) {
        let now = Instant::now();
        let due = {
            let mut due = lock(&self.lazy_flush);
            let d = due.is_some_and(|d| d <= now);
            if d {
                *due = None;
            }
            d
        };
        if due && let Err(e) = self.sync() {
            log::error!("cannot flush the event log: {e}");
        }
        let at = lock(&self.mark).1;
        if now >= at + MARK_EVERY {
            self.write_mark();
        }
    }

    /// Writes the high-water mark: the highest seq that is durable. Only ever raised.
    pub fn write_mark(&self) {
        let Ok(journal) = self.journal() else { return };
        let durable = journal.durable_seq();
        let mut mark = lock(&self.mark);
        mark.1 = Instant::now();
        if durable <= mark.0 {
            return;
        }
        match crate::durable::write_atomic(
            &mark_path(&self.dir),
            format!("{durable}\n").as_bytes(),
            0o600,
        ) {
            Ok(()) => mark.0 = durable,
            Err(e) => log::warn!("cannot write the log's high-water mark: {e}"),
        }
    }

    /// A job, open (from memory) or settled (folded from its events).
    pub fn job(&self, id: u64) -> Option<Job> {
        if let Some(job) = lock(&self.open).get(&id) {
            return Some(job.clone());
        }
        match self.journal().map(|j| j.projection(id)) {
            Ok(Ok(job)) => job,
            Ok(Err(e)) => {
                log::error!("job {id}: {e}");
                None
            }
            Err(e) => {
                log::error!("job {id}: {e}");
                None
            }
        }
    }

    /// Reads the open jobs in place (no copy), under the store's lock: keep `f` short.
    pub fn with_open<T>(&self, f: impl FnOnce(&Jobs) -> T) -> T {
        f(&lock(&self.open))
    }

    /// A snapshot of the open jobs.
    pub fn open_jobs(&self) -> Jobs {
        lock(&self.open).clone()
    }

    /// The input workitem of a job, alone (no spec: no copy of its kickstart).
    pub fn input_value(&self, job: &Job) -> Result<Value> {
        let journal = self.journal()?;
        let bytes = journal
            .input_bytes(job.id)?
            .ok_or(StoreError::NoInput(job.id))?;
        serde_json::from_slice(&bytes).map_err(|source| {
            StoreError::Journal(JournalError::Corrupt {
                seq: job.id,
                source,
            })
        })
    }

    /// The spec of a valid job with its kickstart, for a build (the input is read and
    /// dropped, the kickstart moved out of it).
    pub fn build_spec(&self, job: &Job) -> Result<Spec> {
        let journal = self.journal()?;
        let spec = spec_of(&journal, job)?.ok_or(StoreError::NoInput(job.id))?;
        drop(journal);
        Ok(spec.with_kickstart_taken(self.input_value(job)?))
    }

    /// Tries to make the log writable again after a write error: probes it; when the store
    /// keeps reporting the error, reopens it. Then reloads the open jobs from what is durable
    /// (events appended but not flushed before the error are gone; the steps they recorded
    /// are done again, which every step allows). Ok(true) once the log works.
    pub fn repair(&self) -> Result<bool> {
        if self.failing().is_none() {
            return Ok(true);
        }
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
            // Nothing failed in the log: only wait for room.
            if self
                .free_bytes()
                .is_some_and(|f| f < self.min_free.saturating_add(1 << 20))
            {
                return Ok(false);
            }
            let broken = self.journal().map(|j| j.is_broken()).unwrap_or(true);
            if !broken {
                self.full.store(false, std::sync::atomic::Ordering::SeqCst);
                *lock(&self.failing) = None;
                log::info!("the state disk has room again: resuming");
                return Ok(true);
            }
        }
        let probed = self.journal().map(|j| j.probe());
        if let Ok(Err(e)) = &probed {
            log::warn!("the event log still fails a write: {e}");
        }
        if !matches!(probed, Ok(Ok(()))) {
            let mut slot = self.journal.write().unwrap_or_else(|p| p.into_inner());
            if let Some(j) = slot.take() {
                // Other holders (a query under way) keep sled's lock: try again later.
                match Arc::try_unwrap(j) {
                    Ok(j) => {
                        // Closing a log that failed a write flushes it, which sled may never
                        // finish: give it a while, in a thread of its own.
                        let (tx, rx) = crossbeam_channel::bounded::<()>(1);
                        std::thread::spawn(move || {
                            drop(j);
                            let _ = tx.send(());
                        });
                        if rx.recv_timeout(Duration::from_secs(10)).is_err() {
                            // sled is stuck closing it (a flush that never ends): cut the old
                            // handle off its files so that its lock goes and nothing it might
                            // still write reaches the log, and open the log afresh.
                            let n = detach_files(&self.dir.join("db"));
                            log::warn!(
                                "the failed event log would not close: {n} descriptor(s) of it detached; reopening"
                            );
                        }
                    }
                    Err(j) => {
                        log::warn!("the event log is in use: reopening it later");
                        *slot = Some(j);
                        return Ok(false);
                    }
                }
            }
            // A rewrite (`compact`) whose swap failed half-way is finished first.
            let reopened = if journal::archive::swap_pending(&self.dir) {
                journal::archive::finish_swap(&self.dir)
            } else {
                Ok(())
            }
            .and_then(|()| Journal::open_with_cache(&self.dir, self.cache_bytes));
            match reopened {
                Ok(j) => {
                    let probe = j.probe();
                    *slot = Some(Arc::new(j));
                    if let Err(e) = probe {
                        log::warn!("the reopened event log fails a write: {e}");
                        *lock(&self.failing) = Some(e.to_string());
                        return Ok(false);
                    }
                }
                Err(e) => {
                    log::warn!("cannot reopen the event log yet: {e}");
                    *lock(&self.failing) = Some(e.to_string());
                    return Ok(false);
                }
            }
        }
        let journal = self.journal()?;
        let reloaded = load_open(&journal, &self.policy)?;
        *lock(&self.open) = reloaded;
        *lock(&self.farm) = Farm::fold(&journal.farm_events()?);
        if let Some(o) = self.observer.get() {
            o.reloaded(&journal);
        }
        *lock(&self.failing) = None;
        self.full.store(false, std::sync::atomic::Ordering::SeqCst);
        log::info!("the event log takes writes again: resuming");
        Ok(true)
    }
}

impl Store {
    /// Runs `f` with the log to itself (`compact`): no event is appended and no query reads
    /// the log meanwhile. `f` gets the log by value and closes it (drop) before it touches the
    /// files of the state dir; then the log of the state dir is opened again and the open jobs
    /// are reloaded from it. Waits up to `patience` for readers to let go of the log.
    pub fn with_log_closed<T>(
        &self,
        patience: Duration,
        f: impl FnOnce(Journal) -> std::result::Result<T, JournalError>,
    ) -> Result<T> {
        let mut slot = self.journal.write().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + patience;
        let journal = loop {
            let Some(arc) = slot.take() else {
                return Err(StoreError::Failing(
                    "the event log is being reopened".into(),
                ));
            };
            match Arc::try_unwrap(arc) {
                Ok(j) => break j,
                Err(arc) if Instant::now() < deadline => {
                    *slot = Some(arc);
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(arc) => {
                    *slot = Some(arc);
                    return Err(StoreError::Failing(
                        "the event log stays in use; try again".into(),
                    ));
                }
            }
        };
        let out = f(journal);
        let reopened = journal::archive::finish_swap(&self.dir)
            .and_then(|()| Journal::open_with_cache(&self.dir, self.cache_bytes));
        let loaded = reopened.map_err(StoreError::from).and_then(|j| {
            // Reloaded before anyone appends again (the slot is still held).
            let open = load_open(&j, &self.policy)?;
            let farm = Farm::fold(&j.farm_events()?);
            Ok((j, open, farm))
        });
        match loaded {
            Ok((j, open, farm)) => {
                *lock(&self.open) = open;
                *lock(&self.farm) = farm;
                *slot = Some(Arc::new(j));
            }
            Err(e) => {
                // `repair` opens it again.
                log::error!("cannot open the event log again after rewriting it: {e}");
                *lock(&self.failing) = Some(e.to_string());
                return Err(e);
            }
        }
        Ok(out?)
    }
}

impl Store {
    /// The farm-level state: the fold of the events of no job (`domain::farm`).
    pub fn farm(&self) -> Farm {
        lock(&self.farm).clone()
    }

    /// Asks the farm-level state without copying it (it holds every cancel note).
    pub fn with_farm<T>(&self, f: impl FnOnce(&Farm) -> T) -> T {
        f(&lock(&self.farm))
    }

    /// The drain in force, if the host is drained (`drained` recorded, no `undrained` since).
    pub fn drained(&self) -> Option<Drain> {
        lock(&self.farm).drained.clone()
    }

    /// The spec of a valid job (without its kickstart), from its `queued` event.
    pub fn spec(&self, job: &Job) -> Result<Option<Spec>> {
        spec_of(&*self.journal()?, job)
    }
}

/// The spec of a valid job (without its kickstart), from its `queued` event.
pub fn spec_of(journal: &Journal, job: &Job) -> Result<Option<Spec>> {
    let Some(seq) = job.input_seq else {
        return Ok(None);
    };
    Ok(match journal.get(seq)?.map(|e| e.kind) {
        Some(EventKind::Queued { spec, .. }) => Some(*spec),
        _ => None,
    })
}

/// Loads the open jobs: the jobs marked open (not settled, or changed by an append a crash
/// cut short) folded from their own events; a marked job that turns out settled is unmarked. A
/// log whose marks are of another format (or none) is folded whole once.
fn load_open(journal: &Journal, policy: &Policy) -> Result<Jobs> {
    let started = Instant::now();
    if journal.projection_format()? != PROJECTION_VERSION {
        let (jobs, n) = journal.fold_jobs(None)?;
        journal.rewrite_marks(&jobs, &|j: &Job| lifecycle::is_open(j, policy))?;
        log::info!(
            "log: projections folded again from {n} event(s) ({} jobs) in {:?}",
            jobs.len(),
            started.elapsed()
        );
    }
    let mut open = Jobs::new();
    let mut settled = 0;
    for id in journal.open_jobs()? {
        let Some(job) = journal.fold_job(id)? else {
            // a mark written before a crash took its events: nothing to load
            journal.unmark(id)?;
            continue;
        };
        if lifecycle::is_open(&job, policy) {
            open.insert(id, job);
        } else {
            journal.unmark(id)?;
            settled += 1;
        }
    }
    if settled > 0 {
        journal.flush()?;
    }
    log::info!(
        "log opened: {} open job(s) ({settled} marked job(s) found settled) in {:?}",
        open.len(),
        started.elapsed(),
    );
    Ok(open)
}

/// One line per event in the daemon's log.
pub fn log_event(ev: &Event) {
    log::info!("{}", ev.summary());
}
