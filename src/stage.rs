//! The pipeline stage: the shared state of a running daemon (config, spool, log, the fold of
//! the log) and the steps that move one job forward.
//!
//! Invariant: job state changes only through `record`, which appends the event, applies it to
//! the fold and makes it durable before returning (the kinds that record a step already done
//! and harmless to repeat, `delivered` and `pushed`, are flushed with the next flush instead,
//! see `EventKind::needs_flush`); every step reads the fold, acts, and records, and can be
//! repeated after a crash (recovery runs these same steps).
//!
//! Memory is bounded: the stage keeps only the open (unsettled) jobs; a settled job is read
//! from its stored projection when asked for, and the duplicate checks use the log's indexes.

use crate::build::{self, BuildEnd};
use crate::config::Config;
use crate::hooks;
use crate::journal::{Event, EventKind, Job, Jobs, Journal, JournalError, State, Status};
use crate::spool::Spool;
use crate::workitem::{self, Spec, WorkitemError};
use crossbeam_channel::{Receiver, Sender, bounded, select};
use serde_json::Value;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    #[error(transparent)]
    Durable(#[from] crate::durable::DurableError),
    #[error("job {0} has no input event in the log")]
    NoInput(u64),
    #[error("job {0} is not in the log")]
    NoJob(u64),
    #[error("{0}")]
    Refused(String),
    #[error("deferred: {0}")]
    Deferred(String),
}

pub type Result<T> = std::result::Result<T, StageError>;

pub struct Stage {
    pub cfg: Config,
    pub spool: Spool,
    pub journal: Journal,
    pub state_dir: PathBuf,
    /// The open (unsettled) jobs, as folded from the log; settled ones live in the log only.
    open: Mutex<Jobs>,
    hooks: hooks::Hooks,
    /// Every child the stage starts (builds, pushes) is registered here.
    pub registry: crate::process::Registry,
    running: Mutex<HashMap<u64, Sender<()>>>,
    stopping: AtomicBool,
    /// Pushes to try again: (due, job, status, attempt).
    push_retries: Mutex<BinaryHeap<Reverse<PushRetry>>>,
    /// Jobs whose last step failed (I/O: disk full, a folder gone): job -> (due, delay).
    stalled: Mutex<BTreeMap<u64, (Instant, Duration)>>,
    wake: (Sender<()>, Receiver<()>),
    /// The build pool's queue while the daemon runs (None offline and once stopping).
    queue: Mutex<Option<Sender<u64>>>,
    /// Running builds an operator cancelled (as opposed to a stop killing them).
    cancelled_by_operator: Mutex<std::collections::HashSet<u64>>,
    /// Serialises "is it still queued? then start it" against "is it queued? then cancel it".
    start_lock: Mutex<()>,
    /// Claimed files that did not parse: the content seen and since when (see `read_input`).
    settling: Mutex<HashMap<u64, (String, Instant)>>,
    /// When events appended without a flush are to be flushed (see `LAZY_FLUSH`).
    lazy_flush: Mutex<Option<Instant>>,
}

/// Jobs queued earlier in the same intake batch (not yet in the fold): key -> (job, file).
#[derive(Default)]
struct BatchSeen {
    image_ids: HashMap<String, (u64, String)>,
    shas: HashMap<String, (u64, String)>,
}

/// What reading a claimed file decided.
enum Intake {
    Events(Vec<EventKind>),
    /// Not yet: the file may still be being written.
    Defer(String),
}

/// A push to try again: (due, job, status, attempt).
type PushRetry = (Instant, u64, Status, u32);

/// How soon an event that needs no flush of its own is flushed when nothing else flushes.
const LAZY_FLUSH: Duration = Duration::from_millis(100);

/// Is a job still open for this daemon: not rejected, moved, or delivered with its final
/// push made (or given up, or no push utility configured)?
pub fn is_open(cfg: &Config, job: &Job) -> bool {
    !(job.is_settled(cfg.hooks.retries)
        || (job.state == State::Delivered && cfg.hooks.push.is_none()))
}

/// What a step left to do for a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing now: the job is settled (or waits for something outside).
    Nothing,
    /// The job needs a build slot.
    Build(u64),
}

impl Stage {
    /// Loads the open jobs from their stored projections and folds the events appended after
    /// the last stored projection (a crash can leave a few), storing what they change. A log
    /// with no projection mark (written before projections were kept) is folded whole once.
    pub fn new(cfg: Config, spool: Spool, journal: Journal, state_dir: PathBuf) -> Result<Stage> {
        let started = Instant::now();
        let mut open = Jobs::new();
        for id in journal.open_jobs()? {
            if let Some(job) = journal.projection(id)? {
                open.insert(id, job);
            }
        }
        let upto = journal.projected_upto()?;
        // The events after the snapshot, applied to their jobs (open ones from memory, the
        // others from their projections), in one pass.
        let mut tail = Jobs::new();
        let mut failed = None;
        let n = journal.fold_range(upto + 1, None, |ev| {
            let job = tail.entry(ev.job).or_insert_with(|| {
                open.remove(&ev.job).unwrap_or_else(|| {
                    journal
                        .projection(ev.job)
                        .unwrap_or_else(|e| {
                            failed.get_or_insert(e);
                            None
                        })
                        .unwrap_or_default()
                })
            });
            if ev.seq > job.last_seq {
                job.apply(ev);
            }
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        for (id, job) in tail {
            let is_open = is_open(&cfg, &job);
            journal.put_projection(&job, is_open)?;
            if is_open {
                open.insert(id, job);
            }
        }
        if n > 0 {
            journal.set_projected_upto(journal.next_seq() - 1)?;
            journal.flush()?;
        }
        log::info!(
            "log opened: {} open job(s), {n} event(s) folded after the stored projections, in {:?}",
            open.len(),
            started.elapsed(),
        );
        let registry = crate::process::Registry::new(crate::daemon::groups_dir(&state_dir));
        let hooks = hooks::Hooks::new(&cfg.hooks, state_dir.join("hooks.log"), registry.clone());
        Ok(Stage {
            cfg,
            spool,
            journal,
            hooks,
            registry,
            state_dir,
            open: Mutex::new(open),
            running: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            push_retries: Mutex::new(BinaryHeap::new()),
            stalled: Mutex::new(BTreeMap::new()),
            wake: bounded(1),
            queue: Mutex::new(None),
            cancelled_by_operator: Mutex::new(Default::default()),
            start_lock: Mutex::new(()),
            settling: Mutex::new(HashMap::new()),
            lazy_flush: Mutex::new(None),
        })
    }

    fn open(&self) -> std::sync::MutexGuard<'_, Jobs> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one event (see `record_batch`).
    pub fn record(&self, job: Option<u64>, kind: EventKind) -> Result<Event> {
        let mut evs = self.record_batch(vec![(job, kind)])?;
        evs.pop().ok_or(StageError::NoInput(0))
    }

    /// Appends events (with each job's new projection) and applies them to the fold, under one
    /// lock, so the fold is always the fold of the log; then makes them durable with one flush
    /// (shared with the other threads flushing at that moment), unless none of them needs it.
    pub fn record_batch(&self, items: Vec<(Option<u64>, EventKind)>) -> Result<Vec<Event>> {
        let evs = self.append(items)?;
        let Some(last) = evs.last() else {
            return Ok(evs);
        };
        if evs.iter().any(|e| e.kind.needs_flush()) {
            self.journal.sync(last.seq + 1)?;
        } else {
            self.flush_soon();
        }
        for ev in &evs {
            log_event(ev);
        }
        Ok(evs)
    }

    /// Appends events and applies them to the fold, without flushing.
    fn append(&self, items: Vec<(Option<u64>, EventKind)>) -> Result<Vec<Event>> {
        let mut m = self.open();
        let mut pending: HashMap<u64, Job> = HashMap::new();
        let mut failed = None;
        let evs = self.journal.append_with(items, |ev, view| {
            let job = pending.entry(ev.job).or_insert_with(|| {
                if ev.seq == ev.job {
                    return Job::default();
                }
                match m.get(&ev.job) {
                    Some(job) => Some(job.clone()),
                    None => self.journal.projection(ev.job).unwrap_or_else(|e| {
                        failed = Some(e);
                        None
                    }),
                }
                .unwrap_or_default()
            });
            job.apply(view);
            (job.clone(), is_open(&self.cfg, job))
        })?;
        for (id, job) in pending {
            if is_open(&self.cfg, &job) {
                m.insert(id, job);
            } else {
                m.remove(&id);
            }
        }
        if let Some(e) = failed {
            // The events are in the log; the projection is repaired by the next start.
            log::error!("cannot read a stored projection while recording: {e}");
        }
        Ok(evs)
    }

    /// Asks the retry thread to flush what was appended without a flush, soon.
    fn flush_soon(&self) {
        let mut due = self.lazy_flush.lock().unwrap_or_else(|p| p.into_inner());
        if due.is_none() {
            *due = Some(Instant::now() + LAZY_FLUSH);
            let _ = self.wake.0.try_send(());
        }
    }

    /// A job, open (from memory) or settled (from its stored projection).
    pub fn job(&self, id: u64) -> Option<Job> {
        if let Some(job) = self.open().get(&id) {
            return Some(job.clone());
        }
        match self.journal.projection(id) {
            Ok(job) => job,
            Err(e) => {
                log::error!("job {id}: {e}");
                None
            }
        }
    }

    /// A snapshot of every job (read from the stored projections).
    pub fn all_jobs(&self) -> Result<Jobs> {
        Ok(self.journal.projections()?)
    }

    /// The jobs with an id of at least `first` (read from the stored projections).
    pub fn jobs_from(&self, first: u64) -> Result<Jobs> {
        Ok(self.journal.projections_from(first)?)
    }

    /// A snapshot of the open jobs.
    pub fn open_jobs(&self) -> Jobs {
        self.open().clone()
    }

    /// An earlier job that makes job `id` a duplicate: the same content or the same image_id,
    /// and queued, building or built successfully (or queued earlier in this batch). Says why.
    fn duplicate_of(
        &self,
        id: u64,
        sha: &str,
        image_id: &str,
        batch: &BatchSeen,
    ) -> Option<String> {
        if let Some((other, file)) = batch.shas.get(sha) {
            return Some(format!(
                "duplicate: the same file content (sha256 {}) was dropped before as job {other} (file {file}, queued)",
                &sha[..sha.len().min(12)]
            ));
        }
        if let Some((other, file)) = batch.image_ids.get(image_id) {
            return Some(format!(
                "duplicate: image_id {image_id:?} is already taken by job {other} (file {file}, queued)"
            ));
        }
        let blocking = |other: &Job| {
            other.id != id
                && match other.state {
                    State::Claimed | State::Rejected | State::Moved => false,
                    State::Queued | State::Building | State::Interrupted => true,
                    State::Finished | State::Delivered => other.result == Some(true),
                }
        };
        let describe = |other: &Job| {
            let state = match other.state {
                State::Finished | State::Delivered => "built".to_string(),
                s => s.as_str().to_string(),
            };
            format!(
                "job {} (file {}, {state})",
                other.id,
                other.file.as_deref().unwrap_or("?")
            )
        };
        let first_blocking = |ids: std::result::Result<Vec<u64>, JournalError>| {
            ids.unwrap_or_else(|e| {
                log::error!("duplicate check: {e}");
                Vec::new()
            })
            .into_iter()
            .filter_map(|id| self.job(id))
            .find(|o| blocking(o))
        };
        if let Some(other) = first_blocking(self.journal.jobs_for_sha(sha)) {
            return Some(format!(
                "duplicate: the same file content (sha256 {}) was dropped before as {}",
                &sha[..sha.len().min(12)],
                describe(&other)
            ));
        }
        first_blocking(self.journal.jobs_for_image(image_id)).map(|other| {
            format!(
                "duplicate: image_id {image_id:?} is already taken by {}",
                describe(&other)
            )
        })
    }

    /// Connects the build pool's queue (None disconnects it, so the pool can drain).
    pub fn set_queue(&self, queue: Option<Sender<u64>>) {
        *self.queue.lock().unwrap_or_else(|p| p.into_inner()) = queue;
    }

    /// Hands a job to the build pool; false when no pool runs (offline, or stopping): the job
    /// stays queued in the log and the next daemon start builds it.
    pub fn enqueue(&self, id: u64) -> bool {
        match &*self.queue.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(q) => q.send(id).is_ok(),
            None => false,
        }
    }

    /// Moves a job forward and hands it to the pool when it needs a build; a failing step
    /// stalls it (to be retried).
    pub fn advance_and_enqueue(&self, id: u64) {
        match self.advance(id) {
            Ok(Next::Build(id)) => {
                self.enqueue(id);
            }
            Ok(Next::Nothing) => {}
            Err(e) => self.stall(id, &e),
        }
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Cancels every running build (their process groups are killed). Dropping a build's
    /// sender disconnects its cancel channel, which every later child of that build sees too.
    pub fn cancel_running(&self) {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The input workitem (and spec, for a valid one) of a job, from its event.
    pub fn input(&self, job: &Job) -> Result<(Value, Option<Spec>)> {
        let seq = job.input_seq.ok_or(StageError::NoInput(job.id))?;
        let input = self
            .journal
            .input(job.id)?
            .ok_or(StageError::NoInput(job.id))?;
        match self.journal.get(seq)?.map(|e| e.kind) {
            Some(EventKind::Queued { spec, .. }) => {
                let spec = spec.with_kickstart_from(&input);
                Ok((input, Some(spec)))
            }
            Some(EventKind::Invalid { .. }) => Ok((input, None)),
            _ => Err(StageError::NoInput(job.id)),
        }
    }

    /// Records files just renamed into active/ as new jobs and reads them, with one flush for
    /// all their `claimed` events and what reading them decided (group commit: nothing acts on
    /// a claim before that flush, and the log lines of the claims are written after it). An
    /// error means no claim was recorded (the caller keeps the names and tries again); once
    /// appended, a job whose next step fails is stalled and retried.
    pub fn intake(&self, names: &[String]) -> Result<()> {
        let mut read = Vec::with_capacity(names.len());
        for name in names {
            let c = self.spool.read_claimed(name, self.cfg.spool.max_bytes)?;
            read.push(c);
        }
        let claims = self.append(
            read.iter()
                .map(|c| {
                    (
                        None,
                        EventKind::Claimed {
                            file: c.name.clone(),
                            worker: self.spool.worker.clone(),
                            bytes: c.bytes.len() as u64,
                            sha256: c.sha256.clone(),
                        },
                    )
                })
                .collect(),
        )?;
        let ids: Vec<u64> = claims.iter().map(|e| e.job).collect();
        let mut batch = BatchSeen::default();
        let mut outcomes = Vec::new();
        let mut deferred = Vec::new();
        for (ev, c) in claims.iter().zip(read) {
            let Some(job) = self.job(ev.job) else {
                continue;
            };
            match self.decide(&job, Ok(c), &mut batch) {
                Ok(Intake::Events(kinds)) => {
                    outcomes.extend(kinds.into_iter().map(|k| (Some(job.id), k)))
                }
                Ok(Intake::Defer(why)) => deferred.push((job.id, StageError::Deferred(why))),
                Err(e) => deferred.push((job.id, e)),
            }
        }
        let decided = self.append(outcomes);
        let synced = self
            .journal
            .sync(self.journal.next_seq())
            .map_err(StageError::from);
        for ev in &claims {
            log_event(ev);
        }
        let decided = match (decided, synced) {
            (Ok(evs), Ok(())) => evs,
            (Err(e), _) | (_, Err(e)) => {
                // The claims are in the log; the jobs are read again later.
                for id in &ids {
                    self.stall(*id, &e);
                }
                return Ok(());
            }
        };
        for ev in &decided {
            log_event(ev);
        }
        for (id, why) in &deferred {
            self.stall(*id, why);
        }
        for id in ids {
            if !deferred.iter().any(|(d, _)| *d == id) {
                self.advance_and_enqueue(id);
            }
        }
        Ok(())
    }

    /// Rejects a name in incoming/ unread (symlink, fifo, directory, too big).
    pub fn reject_unread(&self, name: &str, reason: &str) -> Result<()> {
        let from = self.spool.incoming.join(name);
        if from.symlink_metadata().is_err() {
            return Ok(());
        }
        self.record(
            None,
            EventKind::Rejected {
                file: name.to_string(),
                reason: reason.to_string(),
            },
        )?;
        self.spool.reject(&from, name, reason)?;
        Ok(())
    }

    /// Moves a job forward through every step that needs no build slot.
    pub fn advance(&self, id: u64) -> Result<Next> {
        loop {
            let job = self.job(id).ok_or(StageError::NoJob(id))?;
            match job.state {
                State::Claimed => self.read_input(&job)?,
                State::Moved => return Ok(Next::Nothing),
                State::Rejected => {
                    if let Some(file) = &job.file {
                        let path = self.spool.active_path(file);
                        if path.symlink_metadata().is_ok() {
                            let reason = job.reason.clone().unwrap_or_default();
                            self.spool.reject(&path, file, &reason)?;
                        }
                    }
                    return Ok(Next::Nothing);
                }
                State::Queued => return Ok(Next::Build(id)),
                State::Interrupted => {
                    if job.attempts >= self.cfg.worker.max_attempts {
                        self.record(
                            Some(id),
                            EventKind::Finished {
                                result: false,
                                error: Some(format!(
                                    "build interrupted {} time(s), giving up after {} attempt(s) (max_attempts); last: {}",
                                    job.interruptions,
                                    job.attempts,
                                    job.reason.as_deref().unwrap_or("unknown")
                                )),
                                urls: job.urls.clone(),
                            },
                        )?;
                    } else {
                        return Ok(Next::Build(id));
                    }
                }
                State::Building => {
                    // Only recovery sees this: the daemon died under the build.
                    self.record(
                        Some(id),
                        EventKind::Interrupted {
                            reason: format!("daemon stopped during attempt {}", job.attempts),
                        },
                    )?;
                }
                State::Finished => self.deliver(&job)?,
                State::Delivered => {
                    if let Some(file) = &job.file {
                        let path = self.spool.active_path(file);
                        if path.symlink_metadata().is_ok() {
                            // Not fsynced: if a crash undoes the removal, recovery finds the
                            // file again and this settled job removes it again.
                            std::fs::remove_file(&path).map_err(|e| {
                                crate::durable::DurableError::new("cannot remove", &path, e)
                            })?;
                        }
                    }
                    if !job.final_pushed && job.final_push_attempts == 0 {
                        let (input, _) = self.input(&job)?;
                        let reply =
                            workitem::reply(&input, job.result, job.error.as_deref(), &job.urls);
                        self.push(&job, job.final_status(), &reply)?;
                    }
                    return Ok(Next::Nothing);
                }
            }
        }
    }

    /// Has this content of a claimed file changed within the last min_age (so it may still be
    /// being written)?
    fn still_settling(&self, id: u64, sha: &str) -> bool {
        let mut settling = self.settling.lock().unwrap_or_else(|p| p.into_inner());
        let min_age = Duration::from_millis(self.cfg.spool.min_age_ms);
        match settling.get(&id) {
            Some((seen, since)) if seen == sha => {
                if since.elapsed() >= min_age {
                    settling.remove(&id);
                    false
                } else {
                    true
                }
            }
            _ => {
                settling.insert(id, (sha.to_string(), Instant::now()));
                true
            }
        }
    }

    /// Reads a claimed job's file again (recovery, or after it was deferred) and records what
    /// that decides.
    fn read_input(&self, job: &Job) -> Result<()> {
        let file = job.file.as_deref().ok_or(StageError::NoInput(job.id))?;
        let c = self.spool.read_claimed(file, self.cfg.spool.max_bytes);
        match self.decide(job, c, &mut BatchSeen::default())? {
            Intake::Events(kinds) => {
                self.record_batch(kinds.into_iter().map(|k| (Some(job.id), k)).collect())?;
                Ok(())
            }
            Intake::Defer(why) => Err(StageError::Deferred(why)),
        }
    }

    /// What the content of a claimed file makes of its job: rejected (not a workitem), invalid
    /// (answered with an error), a duplicate (likewise), or queued; or, while the file may still
    /// be being written, nothing yet. Records nothing.
    fn decide(
        &self,
        job: &Job,
        read: std::result::Result<crate::spool::Claimed, crate::spool::SpoolError>,
        batch: &mut BatchSeen,
    ) -> Result<Intake> {
        let file = job.file.clone().unwrap_or_default();
        let reject = |reason: String| {
            Ok(Intake::Events(vec![EventKind::Rejected {
                file: file.clone(),
                reason,
            }]))
        };
        let c = match read {
            Ok(c) => c,
            Err(crate::spool::SpoolError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return reject(
                    "the claimed file disappeared from active/ before it was read".into(),
                );
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(why) = c.unreadable {
            return reject(format!("not a workitem: {why}"));
        }
        let input = match workitem::parse_object(&c.bytes) {
            Ok(v) => v,
            Err(e) => {
                // A writer that does not rename may still be writing (over NFS or FUSE the
                // size and mtime the claim relied on can be cached and stale). A prefix of a
                // JSON object never parses, so read it again until its content has stood
                // still for min_age; only then is it not a workitem.
                if self.still_settling(job.id, &c.sha256) {
                    return Ok(Intake::Defer(format!(
                        "{file} does not parse yet ({e}): reading it again in case it is still being written"
                    )));
                }
                return reject(e.to_string());
            }
        };
        self.settling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&job.id);
        let mut events = Vec::new();
        if job.sha256.as_deref() != Some(c.sha256.as_str()) {
            // It grew after the claim: record what is actually read.
            events.push(EventKind::Claimed {
                file: file.clone(),
                worker: self.spool.worker.clone(),
                bytes: c.bytes.len() as u64,
                sha256: c.sha256.clone(),
            });
        }
        match workitem::normalise(&input) {
            Ok(spec) => match self.duplicate_of(job.id, &c.sha256, &spec.image_id, batch) {
                Some(error) => events.push(EventKind::Invalid {
                    image_id: Some(spec.image_id),
                    error,
                    input,
                }),
                None => {
                    batch
                        .image_ids
                        .insert(spec.image_id.clone(), (job.id, file.clone()));
                    batch.shas.insert(c.sha256.clone(), (job.id, file.clone()));
                    events.push(EventKind::Queued {
                        image_id: spec.image_id.clone(),
                        spec: Box::new(spec),
                        input,
                    });
                }
            },
            Err(WorkitemError::NotAWorkitem(e)) => return reject(e),
            Err(WorkitemError::Invalid(error)) => events.push(EventKind::Invalid {
                image_id: workitem::raw_image_id(&input),
                error: format!("invalid workitem: {error}"),
                input,
            }),
        }
        Ok(Intake::Events(events))
    }

    /// Writes the reply to outbox/ (idempotent: same name, tmp + rename) and records it.
    fn deliver(&self, job: &Job) -> Result<()> {
        let (input, _) = self.input(job)?;
        let reply = workitem::reply(&input, job.result, job.error.as_deref(), &job.urls);
        let name = job
            .file
            .clone()
            .unwrap_or_else(|| format!("job-{}.json", job.id));
        let mut bytes = serde_json::to_vec_pretty(&reply).unwrap_or_default();
        bytes.push(b'\n');
        let target = self.spool.outbox.join(&name);
        if let Err(e) = crate::durable::write_atomic(&target, &bytes, 0o644) {
            if !e.is_not_found() {
                return Err(e.into());
            }
            log::warn!("{} is gone: creating it again", self.spool.outbox.display());
            std::fs::create_dir_all(&self.spool.outbox).map_err(|e| {
                crate::durable::DurableError::new("cannot create", &self.spool.outbox, e)
            })?;
            crate::durable::write_atomic(&target, &bytes, 0o644)?;
        }
        self.record(Some(job.id), EventKind::Delivered { outbox: name })?;
        Ok(())
    }

    /// Runs the push utility once (attempt 1) and records it; a failure is retried later.
    fn push(&self, job: &Job, status: Status, workitem: &Value) -> Result<()> {
        self.push_attempt(job, status, workitem, 1)
    }

    /// One push attempt; on failure the next one is scheduled with back-off while
    /// `[hooks] retries` allow.
    fn push_attempt(
        &self,
        job: &Job,
        status: Status,
        workitem: &Value,
        attempt: u32,
    ) -> Result<()> {
        let image_id = job.image_id.clone().unwrap_or_default();
        if let Some(p) = self.hooks.push(job.id, status, workitem, &image_id) {
            if let Some(e) = &p.error {
                log::warn!(
                    "job {} push {} attempt {attempt} failed: {e}",
                    job.id,
                    status.as_str()
                );
                if attempt <= self.cfg.hooks.retries {
                    self.schedule_push(job.id, status, attempt + 1);
                }
            }
            self.record(
                Some(job.id),
                EventKind::Pushed {
                    status,
                    exit: p.exit,
                    ok: p.ok,
                    error: p.error,
                },
            )?;
        }
        Ok(())
    }

    /// Schedules push attempt `attempt` (2, 3, ...) after a back-off of
    /// `retry_delay * 2^(attempt - 2)` seconds.
    pub fn schedule_push(&self, job: u64, status: Status, attempt: u32) {
        let base = Duration::from_millis(self.cfg.hooks.retry_delay_ms);
        let delay = base.saturating_mul(1u32 << attempt.saturating_sub(2).min(16));
        self.schedule_push_at(job, status, attempt, Instant::now() + delay);
    }

    /// Schedules push attempt `attempt` at `due` (recovery: now).
    pub fn schedule_push_at(&self, job: u64, status: Status, attempt: u32, due: Instant) {
        self.push_retries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Reverse((due, job, status, attempt)));
        let _ = self.wake.0.try_send(());
    }

    /// Marks a job whose step failed (disk full, a folder gone, ...) to be moved forward again
    /// later, with a doubling delay from poll_interval_ms up to a minute.
    pub fn stall(&self, id: u64, why: &StageError) {
        let mut stalled = self.stalled.lock().unwrap_or_else(|p| p.into_inner());
        let first = Duration::from_millis(self.cfg.spool.poll_interval_ms);
        let delay = stalled
            .get(&id)
            .map_or(first, |(_, d)| (*d * 2).min(Duration::from_secs(60)));
        match why {
            StageError::Deferred(_) => log::info!("job {id}: {why}; trying again in {delay:?}"),
            _ => log::error!("job {id}: {why}; trying again in {delay:?}"),
        }
        stalled.insert(id, (Instant::now() + delay, delay));
        let _ = self.wake.0.try_send(());
    }

    /// Runs due push retries and re-advances stalled jobs until `stop` fires.
    pub fn run_retries(&self, stop: &Receiver<()>) {
        loop {
            let now = Instant::now();
            let next_push = self
                .push_retries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .peek()
                .map(|Reverse((due, ..))| *due);
            let next_stall = self
                .stalled
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .map(|(due, _)| *due)
                .min();
            let next_flush = *self.lazy_flush.lock().unwrap_or_else(|p| p.into_inner());
            let next = [next_push, next_stall, next_flush]
                .into_iter()
                .flatten()
                .min();
            let wait = next.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(now)
            });
            select! {
                recv(stop) -> _ => return,
                recv(self.wake.1) -> _ => continue,
                default(wait) => {}
            }
            self.run_due_pushes();
            self.run_due_stalled();
            self.run_due_flush();
        }
    }

    /// Flushes the events appended without a flush, once their time has come.
    fn run_due_flush(&self) {
        let mut due = self.lazy_flush.lock().unwrap_or_else(|p| p.into_inner());
        if due.is_some_and(|d| d <= Instant::now()) {
            *due = None;
            drop(due);
            if let Err(e) = self.journal.flush() {
                log::error!("cannot flush the event log: {e}");
                self.flush_soon();
            }
        }
    }

    fn run_due_pushes(&self) {
        loop {
            let due = {
                let mut heap = self.push_retries.lock().unwrap_or_else(|p| p.into_inner());
                match heap.peek() {
                    Some(Reverse((due, ..))) if *due <= Instant::now() => heap.pop(),
                    _ => None,
                }
            };
            let Some(Reverse((_, id, status, attempt))) = due else {
                return;
            };
            if let Err(e) = self.retry_push(id, status, attempt) {
                log::error!("job {id}: push retry failed: {e}");
            }
        }
    }

    fn retry_push(&self, id: u64, status: Status, attempt: u32) -> Result<()> {
        let job = self.job(id).ok_or(StageError::NoJob(id))?;
        let (input, spec) = self.input(&job)?;
        let reply = match status {
            // A BUILDING status that a later one has superseded is not sent any more.
            Status::Building if job.state != State::Building => return Ok(()),
            Status::Building => {
                let urls = spec
                    .map(|s| build::planned_urls(&self.cfg.worker, &s))
                    .unwrap_or_default();
                workitem::reply(&input, None, None, &urls)
            }
            _ if job.state != State::Delivered || job.final_pushed => return Ok(()),
            _ => workitem::reply(&input, job.result, job.error.as_deref(), &job.urls),
        };
        self.push_attempt(&job, status, &reply, attempt)
    }

    fn run_due_stalled(&self) {
        let due: Vec<u64> = {
            let stalled = self.stalled.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            stalled
                .iter()
                .filter(|(_, (d, _))| *d <= now)
                .map(|(id, _)| *id)
                .collect()
        };
        for id in due {
            match self.advance(id) {
                Ok(next) => {
                    self.stalled
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    log::info!("job {id}: moving again");
                    if let Next::Build(id) = next {
                        self.enqueue(id);
                    }
                }
                Err(e) => self.stall(id, &e),
            }
        }
    }

    /// `retry`: a finished job is queued again (the same workitem; its next build is attempt
    /// + 1). Returns whether a build pool took it now (else the next start builds it).
    pub fn retry(&self, id: u64) -> Result<bool> {
        let job = self.job(id).ok_or(StageError::NoJob(id))?;
        if !matches!(job.state, State::Finished | State::Delivered) || job.input_seq.is_none() {
            return Err(StageError::Refused(format!(
                "job {id} is {}: only a finished job can be retried",
                job.state.as_str()
            )));
        }
        self.record(
            Some(id),
            EventKind::Requeued {
                reason: format!("retry by the operator (attempt {})", job.attempts + 1),
                file: None,
                from_worker: None,
            },
        )?;
        Ok(self.enqueue(id))
    }

    /// `cancel`: a queued job is never built; a running one has its process group killed.
    /// Both are answered in the outbox with the error "cancelled" and ERROR is pushed.
    /// Returns true when the job was already answered, false when a running build was told
    /// to stop (its build thread answers it).
    pub fn cancel(&self, id: u64) -> Result<bool> {
        let guard = self.start_lock.lock().unwrap_or_else(|p| p.into_inner());
        let job = self.job(id).ok_or(StageError::NoJob(id))?;
        match job.state {
            State::Queued | State::Interrupted | State::Building => {}
            s => {
                return Err(StageError::Refused(format!(
                    "job {id} is {}: only a queued or running job can be cancelled",
                    s.as_str()
                )));
            }
        }
        if job.state == State::Building {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if running.contains_key(&id) {
                self.cancelled_by_operator
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id);
                // Disconnecting the channel cancels the running child and any later one.
                running.remove(&id);
                return Ok(false);
            }
        }
        let urls = job.urls.clone();
        let events = self.record_batch(vec![
            (
                Some(id),
                EventKind::Cancelled {
                    reason: "cancelled by the operator".into(),
                },
            ),
            (
                Some(id),
                EventKind::Finished {
                    result: false,
                    error: Some("cancelled".into()),
                    urls,
                },
            ),
        ]);
        drop(guard);
        events?;
        self.advance(id)?;
        Ok(true)
    }

    /// `requeue --worker W`: moves the files of another (dead) worker's `active/W/` back to
    /// incoming/, each recorded first. Returns the names moved.
    pub fn requeue_worker(&self, worker: &str) -> Result<Vec<String>> {
        if worker == self.spool.worker {
            return Err(StageError::Refused(format!(
                "{worker} is this daemon's own worker id: its files are recovered on start"
            )));
        }
        if worker.is_empty() || worker.starts_with('.') || worker.contains('/') {
            return Err(StageError::Refused(format!(
                "{worker:?} is not a worker id"
            )));
        }
        let dir = self.spool.root.join("active").join(worker);
        let names = crate::spool::list_names(&dir)?;
        let mut moved = Vec::new();
        for name in names {
            let mut target = name.clone();
            let mut n = 1;
            while self.spool.incoming.join(&target).symlink_metadata().is_ok() {
                target = format!("requeued-{n}-{name}");
                n += 1;
            }
            self.record(
                None,
                EventKind::Requeued {
                    reason: format!("moved active/{worker}/{name} back to incoming/{target}"),
                    file: Some(name.clone()),
                    from_worker: Some(worker.to_string()),
                },
            )?;
            crate::durable::rename(&dir.join(&name), &self.spool.incoming.join(&target))?;
            moved.push(target);
        }
        Ok(moved)
    }

    /// Builds a queued job in this (pool) thread, then delivers and pushes.
    pub fn build(&self, id: u64) -> Result<()> {
        if self.stopping() {
            return Ok(());
        }
        let job = self.job(id).ok_or(StageError::NoJob(id))?;
        if !matches!(job.state, State::Queued | State::Interrupted) {
            return Ok(());
        }
        let (input, spec) = self.input(&job)?;
        let spec = spec.ok_or(StageError::NoInput(id))?;
        let w = &self.cfg.worker;
        let prepared = match build::prepare(w, &spec, job.attempts + 1) {
            Ok(p) => p,
            Err(e) if e.is_no_space() => {
                // Not the job's fault: it stays queued and is tried again when space returns.
                return Err(StageError::Deferred(e.to_string()));
            }
            Err(e) => {
                self.record(
                    Some(id),
                    EventKind::Finished {
                        result: false,
                        error: Some(e.to_string()),
                        urls: build::planned_urls(w, &spec),
                    },
                )?;
                return self.advance(id).map(|_| ());
            }
        };
        let guard = self.start_lock.lock().unwrap_or_else(|p| p.into_inner());
        let job = self.job(id).ok_or(StageError::NoJob(id))?;
        if !matches!(job.state, State::Queued | State::Interrupted) {
            return Ok(());
        }
        let (cancel_tx, cancel_rx) = bounded::<()>(1);
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, cancel_tx);
        let started = self.record(
            Some(id),
            EventKind::Started {
                mode: build::mode(w),
                attempt: job.attempts + 1,
            },
        );
        drop(guard);
        let result = (|| {
            started?;
            let planned = build::planned_urls(w, &spec);
            let building = workitem::reply(&input, None, None, &planned);
            if let Some(job) = self.job(id) {
                self.push(&job, Status::Building, &building)?;
            }
            let end = build::build(w, &spec, &prepared, &cancel_rx, &self.registry);
            match end {
                BuildEnd::Finished {
                    result,
                    error,
                    urls,
                } => {
                    self.record(
                        Some(id),
                        EventKind::Finished {
                            result,
                            error,
                            urls,
                        },
                    )?;
                }
                BuildEnd::Cancelled
                    if !self
                        .cancelled_by_operator
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id) =>
                {
                    self.record(
                        Some(id),
                        EventKind::Interrupted {
                            reason: "daemon stopping: build killed after the grace period".into(),
                        },
                    )?;
                    return Ok(());
                }
                BuildEnd::Cancelled => {
                    self.record(
                        Some(id),
                        EventKind::Cancelled {
                            reason: "cancelled by the operator".into(),
                        },
                    )?;
                    self.record(
                        Some(id),
                        EventKind::Finished {
                            result: false,
                            error: Some("cancelled".into()),
                            urls: planned,
                        },
                    )?;
                }
            }
            self.advance(id).map(|_| ())
        })();
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        result
    }
}

fn log_event(ev: &Event) {
    let detail = match &ev.kind {
        EventKind::Claimed { file, bytes, .. } => format!("{file} ({bytes} bytes)"),
        EventKind::Rejected { file, reason } => format!("{file}: {reason}"),
        EventKind::Invalid { error, .. } => error.clone(),
        EventKind::Queued { image_id, spec, .. } => {
            format!("{image_id} {} {} {}", spec.name, spec.arch, spec.image_type)
        }
        EventKind::Started { mode, attempt } => format!("{mode:?} attempt {attempt}"),
        EventKind::Finished { result, error, .. } => {
            format!("result={result} {}", error.as_deref().unwrap_or(""))
        }
        EventKind::Delivered { outbox } => format!("outbox/{outbox}"),
        EventKind::Pushed {
            status, ok, error, ..
        } => format!(
            "{} ok={ok} {}",
            status.as_str(),
            error.as_deref().unwrap_or("")
        ),
        EventKind::Cancelled { reason }
        | EventKind::Requeued { reason, .. }
        | EventKind::Interrupted { reason } => reason.clone(),
    };
    log::info!(
        "seq {} job {} {} {}",
        ev.seq,
        ev.job,
        ev.kind.name(),
        detail.trim_end()
    );
}
