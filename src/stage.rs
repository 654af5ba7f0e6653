//! The stage: carries out what the lifecycle decides for each job. It owns no job state (the
//! store does) and decides nothing about a job's next step (`lifecycle::next_step` does); it
//! reads a job, asks the lifecycle, does the I/O of that step, and records it.
//!
//! Invariants: every step records its event durably before anything acts on it, and can be
//! done again after a crash (recovery is `advance` run over the open jobs); a file in
//! `active/` is owned by exactly one live job (its input, or an unanswered re-drop).

use crate::backoff::Backoff;
use crate::config::Config;
use crate::imaging::{self, BuildEnd, Builder};
use crate::journal::{Cause, EventKind, Input, Job, State, Status};
use crate::lifecycle::{self, Step};
use crate::outbox::Outbox;
use crate::process::Registry;
use crate::pusher::Pusher;
use crate::spool::{Claimed, Spool, SpoolError};
use crate::store::{Store, StoreError, lock};
use crate::workitem::{self, Spec, WorkitemError};
use crossbeam_channel::{Receiver, Sender, bounded};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Durable(#[from] crate::durable::DurableError),
    #[error(transparent)]
    Outbox(#[from] crate::outbox::OutboxError),
    #[error("{0}")]
    Refused(String),
    #[error("deferred: {0}")]
    Deferred(String),
}

impl From<crate::journal::JournalError> for StageError {
    fn from(e: crate::journal::JournalError) -> Self {
        StageError::Store(e.into())
    }
}

pub type Result<T> = std::result::Result<T, StageError>;

/// The builds running in this daemon: each holds the sending side of its cancel channel here
/// while it runs (dropping it cancels the build's children).
#[derive(Default)]
struct Builds {
    running: Mutex<HashMap<u64, Sender<()>>>,
    /// Running builds an operator cancelled (as opposed to a stop killing them).
    by_operator: Mutex<HashSet<u64>>,
    /// Serialises "still queued? then start it" against "queued? then cancel it".
    decide: Mutex<()>,
}

/// A running build: registered while it lives, unregistered when dropped however the build
/// ends.
struct BuildGuard<'a> {
    builds: &'a Builds,
    id: u64,
    cancel: Receiver<()>,
}

impl Drop for BuildGuard<'_> {
    fn drop(&mut self) {
        lock(&self.builds.running).remove(&self.id);
        lock(&self.builds.by_operator).remove(&self.id);
    }
}

/// What a claimed file's content makes of its job.
enum Decision {
    Events(Vec<EventKind>),
    /// Not yet: the file may still be being written.
    Defer(String),
}

/// Jobs accepted earlier in the same intake batch (not yet visible through the indexes).
#[derive(Default)]
struct Batch {
    image_ids: HashMap<String, u64>,
    folders: HashMap<String, u64>,
}

pub struct Stage {
    pub cfg: Arc<Config>,
    pub spool: Spool,
    pub store: Arc<Store>,
    pub registry: Registry,
    outbox: Outbox,
    pusher: Pusher,
    builds: Builds,
    /// Jobs whose step failed (disk full, a folder gone): job -> (due, failures so far).
    stalled: Mutex<BTreeMap<u64, (Instant, u32)>>,
    /// Claimed files that did not parse: the content seen and since when.
    settling: Mutex<HashMap<u64, (String, Instant)>>,
    /// Jobs a byte-identical re-drop was added to (for `run --once`).
    touched: Mutex<BTreeSet<u64>>,
    /// The build pool's queue while the daemon runs (None offline and once stopping).
    queue: Mutex<Option<Sender<u64>>>,
    stopping: AtomicBool,
    /// Wakes the timer thread (a stall scheduled).
    wake: (Sender<()>, Receiver<()>),
    /// The AMQP client answers of AMQP jobs are published with (`[amqp]`, see `amqp`).
    amqp: Mutex<Option<crate::amqp::Handle>>,
    /// One intake at a time (the spool's claim loop and the AMQP intake): its image_id and
    /// folder conflict checks see every job accepted before.
    intake_one: Mutex<()>,
    /// Told when a build slot may have come free (a build ended, an intake finished): the AMQP
    /// intake waits on it for a slot instead of polling.
    slot_freed: (Sender<()>, Receiver<()>),
    /// Native or KVM, as `cfg.worker` says.
    builder: Arc<dyn Builder>,
}

impl Stage {
    pub fn new(
        cfg: Arc<Config>,
        spool: Spool,
        store: Arc<Store>,
        registry: Registry,
        hooks: crate::hooks::Hooks,
        pushes: bool,
    ) -> std::io::Result<Stage> {
        let pusher = Pusher::start(Arc::clone(&store), hooks, Arc::clone(&cfg), pushes)?;
        Ok(Stage {
            outbox: Outbox::new(&spool.outbox, &spool.worker),
            builder: imaging::builder(&cfg.worker),
            cfg,
            spool,
            store,
            registry,
            pusher,
            builds: Builds::default(),
            stalled: Mutex::new(BTreeMap::new()),
            settling: Mutex::new(HashMap::new()),
            touched: Mutex::new(BTreeSet::new()),
            queue: Mutex::new(None),
            stopping: AtomicBool::new(false),
            wake: bounded(1),
            amqp: Mutex::new(None),
            intake_one: Mutex::new(()),
            slot_freed: bounded(1),
        })
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Connects the build pool's queue (None disconnects it, so the pool can drain).
    pub fn set_queue(&self, queue: Option<Sender<u64>>) {
        *lock(&self.queue) = queue;
    }

    /// Hands a job to the build pool; false when no pool runs (offline, or stopping): the job
    /// stays queued in the log and the next start builds it.
    pub fn enqueue(&self, id: u64) -> bool {
        match &*lock(&self.queue) {
            Some(q) => q.send(id).is_ok(),
            None => false,
        }
    }

    /// Connects (or, with None, disconnects) the AMQP client that answers AMQP jobs.
    pub fn set_amqp(&self, handle: Option<crate::amqp::Handle>) {
        *lock(&self.amqp) = handle;
    }

    /// The `source` of a claim from `[amqp]` (no password).
    pub fn amqp_source(&self) -> Option<String> {
        let url = self.cfg.amqp.url.as_deref()?;
        let uri = crate::amqp::parse_url(url).ok()?;
        Some(crate::amqp::source_label(&uri, &self.cfg.amqp.queue))
    }

    /// The open job of this worker whose file in active/ is `name`.
    pub fn job_of_file(&self, name: &str) -> Option<u64> {
        self.store.with_open(|jobs| {
            jobs.values()
                .rev()
                .find(|j| {
                    j.file.as_deref() == Some(name)
                        && j.worker.as_deref() == Some(self.spool.worker.as_str())
                })
                .map(|j| j.id)
        })
    }

    /// The open AMQP job of this worker, not answered yet, whose workitem has this `fei`.
    pub fn job_of_fei(&self, fei: &serde_json::Value) -> Option<u64> {
        let me = self.spool.worker.as_str();
        let ids: Vec<u64> = self.store.with_open(|jobs| {
            jobs.values()
                .filter(|j| {
                    j.worker.as_deref() == Some(me)
                        && j.file.as_deref().is_some_and(crate::amqp::is_amqp_file)
                        && !j.state.is_answered()
                        && j.input_seq.is_some()
                })
                .map(|j| j.id)
                .collect()
        });
        ids.into_iter().find(|id| {
            self.store.job(*id).is_some_and(|j| {
                self.store
                    .input_value(&j)
                    .is_ok_and(|v| v.get("fei") == Some(fei))
            })
        })
    }

    /// Stops the pushes (after the builds have ended).
    pub fn stop_pushes(&self) {
        self.pusher.stop();
    }

    /// Jobs a re-drop was added to since the start.
    pub fn touched(&self) -> BTreeSet<u64> {
        lock(&self.touched).clone()
    }

    /// Moves a job forward through every step that needs no build slot; a failing step
    /// stalls it (to be tried again with back-off).
    pub fn advance_or_stall(&self, id: u64) {
        if let Err(e) = self.advance(id) {
            self.stall(id, &e);
        }
    }

    /// Moves a job forward through every step that needs no build slot. Returns the step it
    /// stopped at.
    pub fn advance(&self, id: u64) -> Result<Step> {
        loop {
            let job = self.store.job(id).ok_or(StoreError::NoJob(id))?;
            let step = lifecycle::next_step(&job, self.store.policy());
            match &step {
                Step::Read => self.read_input(&job)?,
                Step::Build => {
                    self.enqueue(id);
                    return Ok(step);
                }
                Step::GiveUp => {
                    self.store.record(
                        Some(id),
                        EventKind::Finished {
                            result: false,
                            error: Some(format!(
                                "the build was lost {} time(s) to a crash of the daemon; giving up (max_attempts = {}); last: {}",
                                job.lost,
                                self.cfg.worker.max_attempts,
                                job.reason.as_deref().unwrap_or("unknown")
                            )),
                            urls: job.urls.clone(),
                        },
                    )?;
                }
                Step::Deliver => self.deliver(&job)?,
                Step::DeliverCopy(file) => self.deliver_copy(&job, file)?,
                Step::Push(status) => {
                    self.pusher.push(id, *status);
                    return Ok(step);
                }
                Step::Settled if job.state == State::Rejected => {
                    // Its file goes to rejected/ with the reason (again, after a crash).
                    if let Some(file) = &job.file {
                        let path = self.spool.active_path(file);
                        if path.symlink_metadata().is_ok() {
                            let reason = job.reason.clone().unwrap_or_default();
                            // A message body's hidden name is shown in rejected/.
                            self.spool
                                .reject(&path, file.trim_start_matches('.'), &reason)?;
                        }
                    }
                    return Ok(step);
                }
                Step::Running | Step::Settled => return Ok(step),
            }
        }
    }

    /// Marks a job whose step failed to be moved forward again later (back-off from
    /// poll_interval_ms up to a minute).
    pub fn stall(&self, id: u64, why: &StageError) {
        let mut stalled = lock(&self.stalled);
        let tries = stalled.get(&id).map_or(1, |(_, n)| n + 1);
        let delay = Backoff::new(
            Duration::from_millis(self.cfg.spool.poll_interval_ms),
            Duration::from_secs(60),
        )
        .delay(tries);
        match why {
            StageError::Deferred(_) => log::info!("job {id}: {why}; trying again in {delay:?}"),
            _ => log::error!("job {id}: {why}; trying again in {delay:?}"),
        }
        stalled.insert(id, (Instant::now() + delay, tries));
        let _ = self.wake.0.try_send(());
    }

    /// When the next stalled job is due.
    pub fn next_stall(&self) -> Option<Instant> {
        lock(&self.stalled).values().map(|(due, _)| *due).min()
    }

    pub fn wakeups(&self) -> &Receiver<()> {
        &self.wake.1
    }

    /// Ready when a build slot may have come free since the last receive (see `slot_freed`).
    pub fn slot_wakeups(&self) -> &Receiver<()> {
        &self.slot_freed.1
    }

    fn slot_may_be_free(&self) {
        let _ = self.slot_freed.0.try_send(());
    }

    /// Moves the stalled jobs whose time has come.
    pub fn run_due_stalled(&self) {
        if self.store.failing().is_some() {
            return;
        }
        let now = Instant::now();
        let due: Vec<u64> = lock(&self.stalled)
            .iter()
            .filter(|(_, (d, _))| *d <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            // Not due again while this step runs. If it hands the job to a build slot, the slot
            // says how it went: a build deferred again stalls it with a longer back-off (so this
            // mark is set before, never after, the hand-over), a build that starts clears it.
            if let Some(entry) = lock(&self.stalled).get_mut(&id) {
                entry.0 = now + Duration::from_secs(3600);
            }
            match self.advance(id) {
                Ok(Step::Build) => {}
                Ok(_) => {
                    lock(&self.stalled).remove(&id);
                    log::info!("job {id}: moving again");
                }
                Err(e) => self.stall(id, &e),
            }
        }
    }

    /// After the log was repaired: every open job is moved forward again (its steps whose
    /// records were lost are done again).
    pub fn resume_all(&self) {
        let running: HashSet<u64> = lock(&self.builds.running).keys().copied().collect();
        for id in self.store.open_jobs().into_keys() {
            if !running.contains(&id) {
                self.advance_or_stall(id);
            }
        }
    }

    /// Records files just renamed into active/ and reads them, with one flush for all their
    /// events (group commit: nothing acts on a claim before that flush). An error means their
    /// claims are not recorded (the caller keeps the names and tries again).
    pub fn intake(&self, names: &[String]) -> Result<()> {
        self.intake_from(names, None)
    }

    /// `intake` of files whose content came from elsewhere (`source`, recorded in `claimed`):
    /// message bodies written into active/ by the AMQP participant.
    pub fn intake_from(&self, names: &[String], source: Option<&str>) -> Result<()> {
        // Taken by every intake: without [amqp] there is one intake thread (the claim loop, or
        // the recovery before it starts), so it is never contended there.
        let one = lock(&self.intake_one);
        let mut round: Vec<Claimed> = Vec::with_capacity(names.len());
        for name in names {
            round.push(self.read_claimed(name));
        }
        let mut batch = Batch::default();
        let mut to_advance: Vec<u64> = Vec::new();
        let mut deferred: Vec<(u64, StageError)> = Vec::new();
        let mut logged = Vec::new();
        while !round.is_empty() {
            // A file byte-identical to an earlier one of this batch waits for the next round,
            // when the earlier one's job can be found by its content.
            let mut seen = HashSet::new();
            let (now, later): (Vec<Claimed>, Vec<Claimed>) = round
                .into_iter()
                .partition(|c| c.sha256.is_empty() || seen.insert(c.sha256.clone()));
            round = later;
            let mut claims = Vec::new();
            let mut fresh = Vec::new();
            for c in now {
                match self.copy_of(&c.sha256) {
                    Some(of) => {
                        claims.push((
                            Some(of),
                            EventKind::Duplicate {
                                file: c.name.clone(),
                                worker: self.spool.worker.clone(),
                                bytes: c.bytes.len() as u64,
                                sha256: c.sha256.clone(),
                            },
                        ));
                        fresh.push(None);
                    }
                    None => {
                        claims.push((
                            None,
                            EventKind::Claimed {
                                file: c.name.clone(),
                                worker: self.spool.worker.clone(),
                                bytes: c.bytes.len() as u64,
                                sha256: c.sha256.clone(),
                                source: source.map(str::to_string),
                            },
                        ));
                        fresh.push(Some(c));
                    }
                }
            }
            let evs = self.store.append(claims)?;
            let mut outcomes = Vec::new();
            for (ev, c) in evs.iter().zip(fresh) {
                let Some(c) = c else {
                    lock(&self.touched).insert(ev.job);
                    to_advance.push(ev.job);
                    continue;
                };
                to_advance.push(ev.job);
                let name = c.name.clone();
                match self.decide(ev.job, &name, Ok(c), &mut batch) {
                    Ok(Decision::Events(kinds)) => {
                        outcomes.extend(kinds.into_iter().map(|k| (Some(ev.job), k)))
                    }
                    Ok(Decision::Defer(why)) => deferred.push((ev.job, StageError::Deferred(why))),
                    Err(e) => deferred.push((ev.job, e)),
                }
            }
            logged.extend(evs);
            logged.extend(self.store.append(outcomes)?);
        }
        self.store.sync()?;
        for ev in &logged {
            crate::store::log_event(ev);
        }
        let stalled: HashSet<u64> = deferred.iter().map(|(id, _)| *id).collect();
        for (id, why) in &deferred {
            self.stall(*id, why);
        }
        drop(one);
        // Claims that did not queue a build (invalid, rejected) held a slot until now.
        self.slot_may_be_free();
        let mut seen = HashSet::new();
        to_advance.retain(|id| seen.insert(*id) && !stalled.contains(id));
        for id in to_advance {
            self.advance_or_stall(id);
        }
        Ok(())
    }

    /// `intake` of names whose earlier intake failed: those that were recorded meanwhile (by
    /// a flush that covered them after all) are left out.
    pub fn intake_again(&self, names: &[String]) -> Result<()> {
        let held = self.held_files();
        let names: Vec<String> = names
            .iter()
            .filter(|n| !held.contains(n.as_str()))
            .cloned()
            .collect();
        self.intake(&names)
    }

    /// The files in active/ that open jobs hold.
    fn held_files(&self) -> HashSet<String> {
        self.store.with_open(|jobs| {
            let mut held = HashSet::new();
            for job in jobs.values() {
                if lifecycle::is_live(job)
                    && !job.state.is_answered()
                    && let Some(f) = &job.file
                {
                    held.insert(f.clone());
                }
                for c in job.copies.iter().filter(|c| c.outbox.is_none()) {
                    held.insert(c.file.clone());
                }
            }
            held
        })
    }

    /// Reads a claimed file; a file that vanished or cannot be read becomes unreadable (and
    /// is rejected with the reason).
    fn read_claimed(&self, name: &str) -> Claimed {
        match self.spool.read_claimed(name, self.cfg.spool.max_bytes) {
            Ok(c) => c,
            Err(e) => Claimed {
                name: name.to_string(),
                path: self.spool.active_path(name),
                bytes: Vec::new(),
                sha256: String::new(),
                unreadable: Some(match &e {
                    SpoolError::Read { source, .. }
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        "the claimed file disappeared from active/ before it was read".into()
                    }
                    _ => e.to_string(),
                }),
            },
        }
    }

    /// The job a file with this content would be a byte-identical re-drop of: the oldest job
    /// of this worker with that content whose input was read (valid or invalid).
    fn copy_of(&self, sha: &str) -> Option<u64> {
        if sha.is_empty() {
            return None;
        }
        let journal = self.store.journal().ok()?;
        let ids = journal.jobs_for_sha(sha).unwrap_or_else(|e| {
            log::error!("content index: {e}");
            Vec::new()
        });
        ids.into_iter().find(|id| {
            self.store.job(*id).is_some_and(|j| {
                j.input_seq.is_some()
                    && j.sha256.as_deref() == Some(sha)
                    && j.worker.as_deref() == Some(self.spool.worker.as_str())
            })
        })
    }

    /// The job holding this image_id or this job folder, other than `me`: the oldest job
    /// accepted for building with it.
    fn holder(&self, me: u64, spec: &Spec, batch: &Batch) -> Option<(u64, &'static str)> {
        if let Some(j) = batch.image_ids.get(&spec.image_id) {
            return Some((*j, "image_id"));
        }
        let folder = crate::journal::folder_key(spec);
        if let Some(j) = batch.folders.get(&folder) {
            return Some((*j, "job folder"));
        }
        let journal = self.store.journal().ok()?;
        let accepted = |ids: std::result::Result<Vec<u64>, crate::journal::JournalError>| {
            ids.unwrap_or_else(|e| {
                log::error!("image index: {e}");
                Vec::new()
            })
            .into_iter()
            .find(|id| *id != me && self.store.job(*id).is_some_and(|j| j.accepted))
        };
        if let Some(j) = accepted(journal.jobs_for_image(&spec.image_id)) {
            return Some((j, "image_id"));
        }
        accepted(journal.jobs_for_folder(spec)).map(|j| (j, "job folder"))
    }

    /// Has this content of a claimed file changed within the last min_age (so it may still be
    /// being written)?
    fn still_settling(&self, id: u64, sha: &str) -> bool {
        let mut settling = lock(&self.settling);
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
        let file = job.file.as_deref().unwrap_or_default();
        let c = self.read_claimed(file);
        match self.decide(job.id, file, Ok(c), &mut Batch::default())? {
            Decision::Events(kinds) => {
                self.store
                    .record_batch(kinds.into_iter().map(|k| (Some(job.id), k)).collect())?;
                Ok(())
            }
            Decision::Defer(why) => Err(StageError::Deferred(why)),
        }
    }

    /// What the content of a claimed file makes of job `id`: rejected (not a workitem),
    /// invalid, a conflict (another job holds its image_id or folder), or queued; or, while
    /// the file may still be being written, nothing yet. Records nothing.
    fn decide(
        &self,
        id: u64,
        file: &str,
        read: std::result::Result<Claimed, SpoolError>,
        batch: &mut Batch,
    ) -> Result<Decision> {
        let reject = |reason: String| {
            Ok(Decision::Events(vec![EventKind::Rejected {
                file: file.to_string(),
                reason,
            }]))
        };
        let c = read?;
        if let Some(why) = c.unreadable {
            return reject(format!("not a workitem: {why}"));
        }
        let value = match workitem::parse_object(&c.bytes) {
            Ok(v) => v,
            Err(e) => {
                // A writer that does not rename may still be writing (over NFS or FUSE the
                // size and mtime the claim relied on can be stale). A prefix of a JSON object
                // never parses, so read it again until its content has stood still for
                // min_age; only then is it not a workitem.
                // A message body is whole when it is written: no waiting.
                if !crate::amqp::is_amqp_file(file) && self.still_settling(id, &c.sha256) {
                    return Ok(Decision::Defer(format!(
                        "{file} does not parse yet ({e}): reading it again in case it is still being written"
                    )));
                }
                return reject(e.to_string());
            }
        };
        lock(&self.settling).remove(&id);
        let mut events = Vec::new();
        let job_sha = self.store.job(id).and_then(|j| j.sha256);
        if job_sha.as_deref() != Some(c.sha256.as_str()) {
            // It grew after the claim: record what is actually read.
            events.push(EventKind::Claimed {
                file: file.to_string(),
                worker: self.spool.worker.clone(),
                bytes: c.bytes.len() as u64,
                sha256: c.sha256.clone(),
                source: None,
            });
        }
        let normalised = workitem::normalise(&value);
        let raw_id = workitem::raw_image_id(&value);
        drop(value);
        let input = Input(c.bytes);
        match normalised {
            Ok(mut spec) => match self.holder(id, &spec, batch) {
                Some((holder, what)) => {
                    let desc = self
                        .store
                        .job(holder)
                        .map(|h| {
                            format!(
                                "job {holder} (file {}, {})",
                                h.file.as_deref().unwrap_or("?"),
                                h.state
                            )
                        })
                        .unwrap_or_else(|| format!("job {holder}"));
                    events.push(EventKind::Invalid {
                        image_id: Some(spec.image_id.clone()),
                        error: format!(
                            "conflict: the {what} of image_id {:?} ({}/{}) is held by {desc}; rebuilding an image is `build-image retry {holder}`",
                            spec.image_id, spec.prefix, spec.dir_id
                        ),
                        held_by: Some(holder),
                        input,
                    });
                }
                None => {
                    batch.image_ids.insert(spec.image_id.clone(), id);
                    batch.folders.insert(crate::journal::folder_key(&spec), id);
                    // The kickstart is read from the stored input when a build needs it.
                    spec.kickstart = String::new();
                    events.push(EventKind::Queued {
                        image_id: spec.image_id.clone(),
                        spec: Box::new(spec),
                        input,
                    });
                }
            },
            Err(WorkitemError::NotAWorkitem(e)) => return reject(e),
            Err(WorkitemError::Invalid(error)) => events.push(EventKind::Invalid {
                image_id: raw_id,
                error: format!("invalid workitem: {error}"),
                held_by: None,
                input,
            }),
        }
        Ok(Decision::Events(events))
    }

    /// Rejects a name in incoming/ unread (symlink, fifo, directory, too big, hard link).
    pub fn reject_unread(&self, name: &str, reason: &str) -> Result<()> {
        let from = self.spool.incoming.join(name);
        if from.symlink_metadata().is_err() {
            return Ok(());
        }
        self.store.record(
            None,
            EventKind::Rejected {
                file: name.to_string(),
                reason: reason.to_string(),
            },
        )?;
        self.spool.reject(&from, name, reason)?;
        Ok(())
    }

    /// Rejects a name in incoming/ that is not UTF-8: recorded, then moved to rejected/ under a
    /// safe name with the original (escaped) in its `.reason`.
    pub fn reject_bad_name(&self, raw: &std::ffi::OsStr) -> Result<String> {
        if self.spool.incoming.join(raw).symlink_metadata().is_err() {
            return Ok(String::new());
        }
        let safe = crate::spool::safe_name(raw);
        self.store.record(
            None,
            EventKind::Rejected {
                file: safe.clone(),
                reason: format!(
                    "the file name is not UTF-8 (as bytes: {})",
                    raw.as_encoded_bytes().escape_ascii()
                ),
            },
        )?;
        Ok(self.spool.reject_bad_name(raw)?)
    }

    /// The answer of a job, as the outbox gets it.
    fn answer(&self, job: &Job) -> Result<Vec<u8>> {
        let input = self.store.input_value(job)?;
        let reply = workitem::reply_owned(input, job.result, job.error.as_deref(), &job.urls);
        let mut bytes = serde_json::to_vec_pretty(&reply).unwrap_or_default();
        bytes.push(b'\n');
        Ok(bytes)
    }

    fn deliver_error(e: crate::outbox::OutboxError) -> StageError {
        if e.is_no_space() {
            StageError::Deferred(format!("outbox full: {e}"))
        } else {
            e.into()
        }
    }

    /// Writes the answer to the outbox (never over another job's), records it, and removes
    /// the input from active/.
    fn deliver(&self, job: &Job) -> Result<()> {
        if let Some(file) = job.file.as_deref()
            && crate::amqp::is_amqp_file(file)
        {
            return self.deliver_amqp(job, file, None).map(|_| ());
        }
        let (file, d) = self.write_answer(job)?;
        self.store.record(
            Some(job.id),
            EventKind::Delivered {
                outbox: d.name,
                copy: None,
                sha256: Some(d.sha256),
            },
        )?;
        self.remove_active(&file)
    }

    /// Writes a job's answer to the outbox under its input's name (never over another job's
    /// answer); returns that input name and where the answer went. Records nothing.
    fn write_answer(&self, job: &Job) -> Result<(String, crate::outbox::Delivery)> {
        let bytes = self.answer(job)?;
        let file = job
            .file
            .clone()
            .unwrap_or_else(|| format!("job-{}.json", job.id));
        let d = self
            .outbox
            .deliver(&file, job.id, &bytes, &job.answers)
            .map_err(Self::deliver_error)?;
        Ok((file, d))
    }

    /// Answers a byte-identical re-drop with the job's answer.
    fn deliver_copy(&self, job: &Job, file: &str) -> Result<()> {
        if crate::amqp::is_amqp_file(file) {
            return self.deliver_amqp(job, file, Some(file)).map(|_| ());
        }
        let bytes = self.answer(job)?;
        let d = self
            .outbox
            .deliver(file, job.id, &bytes, &job.answers)
            .map_err(Self::deliver_error)?;
        self.store.record(
            Some(job.id),
            EventKind::Delivered {
                outbox: d.name,
                copy: Some(file.to_string()),
                sha256: Some(d.sha256),
            },
        )?;
        self.remove_active(file)
    }

    /// Publishes the answer of an AMQP job (or of a re-delivery of its message, `copy`) and
    /// records `delivered` once the broker confirmed it; with `fields.params.forget` nothing is
    /// published. Not connected (or not confirmed): deferred, and tried again later.
    /// Publishes an AMQP job's answer (unless it is forgotten) and records `delivered` after
    /// the confirm. Returns where it went (`amqp:<reply_queue>`, or the forget note).
    fn deliver_amqp(&self, job: &Job, file: &str, copy: Option<&str>) -> Result<String> {
        let input = self.store.input_value(job)?;
        let outbox = if crate::amqp::forget(&input) {
            drop(input);
            "amqp: forget (no reply)".to_string()
        } else {
            drop(input);
            let bytes = self.answer(job)?;
            let handle = lock(&self.amqp).clone().ok_or_else(|| {
                StageError::Deferred("an AMQP job, and no [amqp] connection".into())
            })?;
            handle
                .publish(bytes, crate::amqp::CONFIRM_TIMEOUT)
                .map_err(|e| StageError::Deferred(format!("answer not published: {e}")))?;
            format!("amqp:{}", self.cfg.amqp.reply_queue)
        };
        self.store.record(
            Some(job.id),
            EventKind::Delivered {
                outbox: outbox.clone(),
                copy: copy.map(str::to_string),
                sha256: None,
            },
        )?;
        self.remove_active(file)?;
        Ok(outbox)
    }

    /// Removes an answered input from active/. Not fsynced: if a crash undoes the removal,
    /// recovery finds the file of a settled job and removes it again.
    fn remove_active(&self, file: &str) -> Result<()> {
        let path = self.spool.active_path(file);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(crate::durable::DurableError::new("cannot remove", &path, e).into()),
        }
    }

    /// Reconciles the log with the spool, then moves every open job forward: the normal
    /// steps, run again. Returns the open jobs it found.
    pub fn recover(&self) -> Result<Vec<u64>> {
        self.builder.recover(&self.registry);
        let jobs = self.store.open_jobs();
        let me = self.spool.worker.as_str();
        let mine = |job: &Job| job.worker.as_deref().is_none_or(|w| w == me);
        let held = self.held_files();
        let mut unlogged = Vec::new();
        for name in self.spool.active_files()? {
            if held.contains(&name) {
                continue;
            }
            // No live job holds it: the leftover of a settled job (a crash undid its removal),
            // or a file claimed but never recorded.
            let c = self.read_claimed(&name);
            let settled = match c.unreadable {
                Some(_) => None,
                None => self
                    .store
                    .journal()?
                    .jobs_for_sha(&c.sha256)?
                    .into_iter()
                    .rev()
                    .filter_map(|id| self.store.job(id))
                    .find(|j| {
                        mine(j)
                            && (j.file.as_deref() == Some(name.as_str())
                                || j.copies.iter().any(|k| k.file == name))
                    }),
            };
            match settled {
                Some(job) if job.state == State::Rejected => {
                    let reason = job.reason.clone().unwrap_or_default();
                    self.spool
                        .reject(&self.spool.active_path(&name), &name, &reason)?;
                }
                Some(_) => self.remove_active(&name)?,
                None if crate::amqp::is_amqp_file(&name) => {
                    // A message body whose claim was never recorded: it was not acked, so the
                    // broker delivers it again.
                    log::info!("recovery: {name} in active/ was never claimed: removed");
                    self.remove_active(&name)?;
                }
                None => {
                    log::info!("recovery: {name} in active/ has no job: claiming it");
                    unlogged.push(name);
                }
            }
        }
        if !unlogged.is_empty()
            && let Err(e) = self.intake(&unlogged)
        {
            log::error!("recovery: cannot record the claims of {unlogged:?}: {e}");
        }
        let mut open = Vec::new();
        let mut queued = 0;
        for (id, job) in jobs.iter().filter(|(_, j)| mine(j)) {
            open.push(*id);
            if job.state == State::Building {
                // Nothing runs at a start: the daemon died under this build.
                if let Err(e) = self.store.record(
                    Some(*id),
                    EventKind::Interrupted {
                        reason: format!("the daemon died during attempt {}", job.attempts),
                        cause: Cause::Crash,
                    },
                ) {
                    self.stall(*id, &e.into());
                    continue;
                }
            }
            match self.advance(*id) {
                Ok(Step::Build) => queued += 1,
                Ok(_) => {}
                Err(e) => self.stall(*id, &e),
            }
        }
        if queued > 0 {
            log::info!("recovery: {queued} job(s) queued again");
        }
        Ok(open)
    }

    /// Builds a queued job in this (pool) thread, then delivers and pushes.
    pub fn build(&self, id: u64) -> Result<()> {
        if self.stopping() {
            return Ok(());
        }
        let Some(job) = self.store.job(id) else {
            return Ok(());
        };
        if lifecycle::next_step(&job, self.store.policy()) != Step::Build {
            return Ok(());
        }
        let mut spec = self.store.build_spec(&job)?;
        let w = &self.cfg.worker;
        let prepared = match imaging::prepare(w, &spec, job.attempts + 1) {
            Ok(p) => p,
            Err(e) if e.is_no_space() => {
                // Not the job's fault: it stays queued and is tried again when space returns.
                return Err(StageError::Deferred(e.to_string()));
            }
            Err(e) => {
                self.store.record(
                    Some(id),
                    EventKind::Finished {
                        result: false,
                        error: Some(e.to_string()),
                        urls: imaging::planned_urls(w, &spec),
                    },
                )?;
                self.slot_may_be_free();
                return self.advance(id).map(|_| ());
            }
        };
        if !w.use_kvm {
            // mic reads the kickstart from the file just written: not kept in memory meanwhile.
            spec.kickstart = String::new();
        }
        let Some(guard) = self.begin(id)? else {
            return Ok(());
        };
        self.pusher.push(id, Status::Building);
        let end = self
            .builder
            .build(&spec, &prepared, &guard.cancel, &self.registry);
        drop(prepared);
        let cancelled_by_operator = lock(&self.builds.by_operator).contains(&id);
        drop(guard);
        let kinds = match end {
            BuildEnd::Finished {
                result,
                error,
                urls,
            } => vec![EventKind::Finished {
                result,
                error,
                urls,
            }],
            BuildEnd::Cancelled if cancelled_by_operator => vec![
                EventKind::Cancelled {
                    reason: "cancelled by the operator".into(),
                },
                EventKind::Finished {
                    result: false,
                    error: Some("cancelled".into()),
                    urls: imaging::planned_urls(w, &spec),
                },
            ],
            BuildEnd::Cancelled => vec![EventKind::Interrupted {
                reason: "the daemon stopped: the build was killed".into(),
                cause: Cause::Stop,
            }],
        };
        self.record_retrying(id, kinds)?;
        self.slot_may_be_free();
        self.advance(id).map(|_| ())
    }

    /// Starts a build if the job is still waiting for one: records `started` under the lock
    /// that `cancel` takes, and registers the build. None when it is not to be built now.
    fn begin(&self, id: u64) -> Result<Option<BuildGuard<'_>>> {
        let _decide = lock(&self.builds.decide);
        let Some(job) = self.store.job(id) else {
            return Ok(None);
        };
        if lifecycle::next_step(&job, self.store.policy()) != Step::Build || self.stopping() {
            return Ok(None);
        }
        let (tx, rx) = bounded::<()>(1);
        self.store.record(
            Some(id),
            EventKind::Started {
                mode: self.builder.mode(),
                attempt: job.attempts + 1,
            },
        )?;
        lock(&self.builds.running).insert(id, tx);
        lock(&self.stalled).remove(&id);
        Ok(Some(BuildGuard {
            builds: &self.builds,
            id,
            cancel: rx,
        }))
    }

    /// Records the end of a build; while the log cannot be written, tries again with back-off
    /// (the build's outcome is not to be lost to a full disk) until the daemon stops.
    fn record_retrying(&self, id: u64, kinds: Vec<EventKind>) -> Result<()> {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut n = 0;
        loop {
            let items = kinds.iter().cloned().map(|k| (Some(id), k)).collect();
            match self.store.record_batch(items) {
                Ok(_) => return Ok(()),
                Err(e) if self.stopping() => return Err(e.into()),
                Err(e) => {
                    n += 1;
                    if n == 1 {
                        log::error!("job {id}: cannot record the end of its build yet: {e}");
                    }
                    std::thread::sleep(backoff.delay(n));
                }
            }
        }
    }

    /// Kills every running build (a stop's grace is over): recorded as interrupted by a stop.
    pub fn cancel_running(&self) {
        lock(&self.builds.running).clear();
    }

    /// How many builds run.
    pub fn running(&self) -> usize {
        lock(&self.builds.running).len()
    }

    /// `retry`: a built job that is over is queued again (the same workitem; its next build is
    /// attempt + 1). Returns whether a build pool took it now (else the next start builds it).
    pub fn retry(&self, id: u64) -> Result<bool> {
        let job = self.store.job(id).ok_or(StoreError::NoJob(id))?;
        if let Some(why) = lifecycle::retry_refusal(&job) {
            return Err(StageError::Refused(why));
        }
        self.store.record(
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
    /// Both are answered with the error "cancelled" (and ERROR pushed). Returns true when the
    /// job was answered now, false when a running build was told to stop (its build thread
    /// answers it).
    pub fn cancel(&self, id: u64) -> Result<bool> {
        let decide = lock(&self.builds.decide);
        let job = self.store.job(id).ok_or(StoreError::NoJob(id))?;
        if let Some(why) = lifecycle::cancel_refusal(&job) {
            return Err(StageError::Refused(why));
        }
        if job.state == State::Building {
            let mut running = lock(&self.builds.running);
            if running.contains_key(&id) {
                lock(&self.builds.by_operator).insert(id);
                // Disconnecting the channel cancels the running child and any later one.
                running.remove(&id);
                return Ok(false);
            }
        }
        let urls = job.urls.clone();
        self.store.record_batch(vec![
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
        ])?;
        drop(decide);
        self.slot_may_be_free();
        self.advance(id)?;
        Ok(true)
    }

    /// `requeue --worker W`: moves the files of another (dead) worker's `active/W/` back to
    /// incoming/, each recorded first. Returns the names moved.
    pub fn requeue_worker(&self, worker: &str, force: bool) -> Result<Vec<String>> {
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
        match self.spool.liveness(worker, crate::spool::STALE_AFTER) {
            crate::spool::Liveness::Alive(how) if !force => {
                return Err(StageError::Refused(format!(
                    "worker {worker} looks alive ({how}): requeue is for a host that is down for good; --force if you are sure"
                )));
            }
            _ => {}
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
            self.store.record(
                None,
                EventKind::Requeued {
                    reason: format!("moved active/{worker}/{name} back to incoming/{target}"),
                    file: Some(name.clone()),
                    from_worker: Some(worker.to_string()),
                },
            )?;
            if !crate::durable::rename_noreplace(
                &dir.join(&name),
                &self.spool.incoming.join(&target),
            )? {
                return Err(StageError::Refused(format!(
                    "incoming/{target} appeared meanwhile; run requeue again"
                )));
            }
            moved.push(target);
        }
        Ok(moved)
    }
}

/// The operator actions of the log over years (`crate::archive`) that need the stage's outbox
/// and pusher.
impl Stage {
    /// `redeliver`: writes an answered job's answer to the outbox again (the same bytes as its
    /// delivery: the answer is built from the log as it was then), by the outbox's rule (never
    /// over another job's answer), and records it as a `delivered` event. Returns where it went
    /// and whether its sha256 is that of the job's last recorded answer.
    pub fn redeliver(&self, id: u64) -> Result<(crate::outbox::Delivery, bool)> {
        let job = self.store.job(id).ok_or(StoreError::NoJob(id))?;
        if !job.state.is_answered() || job.outbox.is_none() {
            return Err(StageError::Refused(format!(
                "job {id} is {}: only an answered job (done or error) can be delivered again{}",
                job.state,
                if job.state == State::Finished {
                    " (its answer is being written now)"
                } else {
                    ""
                }
            )));
        }
        if let Some(file) = job.file.as_deref()
            && crate::amqp::is_amqp_file(file)
        {
            // Its answer went to the broker, not the outbox: published again (the same
            // answer, built from the log as the first time), `delivered` after the confirm.
            let name = self.deliver_amqp(&job, file, None)?;
            let sha256 = job.answers.last().cloned().unwrap_or_default();
            return Ok((crate::outbox::Delivery { name, sha256 }, true));
        }
        let (_, d) = self.write_answer(&job)?;
        let identical = job.answers.last() == Some(&d.sha256);
        self.store.record(
            Some(job.id),
            EventKind::Delivered {
                outbox: d.name.clone(),
                copy: None,
                sha256: Some(d.sha256.clone()),
            },
        )?;
        Ok((d, identical))
    }

    /// `repush`: the final status of an answered job pushed once more, now (see
    /// `Pusher::push_final_now`).
    pub fn repush(&self, job: &Job) -> Result<Option<crate::hooks::Pushed>> {
        Ok(self.pusher.push_final_now(job)?)
    }
}
