//! The pipeline stage: the shared state of a running daemon (config, spool, log, the fold of
//! the log) and the steps that move one job forward.
//!
//! Invariant: job state changes only through `record`, which makes the event durable and then
//! applies it to the in-memory fold; every step reads the fold, acts, and records, and can be
//! repeated after a crash (recovery runs these same steps).

use crate::build::{self, BuildEnd};
use crate::config::Config;
use crate::hooks;
use crate::journal::{Event, EventKind, Job, Jobs, Journal, JournalError, State, Status};
use crate::spool::Spool;
use crate::workitem::{self, Spec, WorkitemError};
use crossbeam_channel::{Sender, bounded};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

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
}

pub type Result<T> = std::result::Result<T, StageError>;

pub struct Stage {
    pub cfg: Config,
    pub spool: Spool,
    pub journal: Journal,
    jobs: Mutex<Jobs>,
    hook_log: PathBuf,
    running: Mutex<HashMap<u64, Sender<()>>>,
    stopping: AtomicBool,
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
    pub fn new(cfg: Config, spool: Spool, journal: Journal, state_dir: PathBuf) -> Result<Stage> {
        let jobs = journal.fold_all()?;
        Ok(Stage {
            cfg,
            spool,
            journal,
            jobs: Mutex::new(jobs),
            hook_log: state_dir.join("hooks.log"),
            running: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
        })
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes one event durable, then applies it to the fold.
    pub fn record(&self, job: Option<u64>, kind: EventKind) -> Result<Event> {
        let ev = self.journal.append(job, kind)?;
        self.apply(&ev);
        Ok(ev)
    }

    /// Several events with one flush.
    pub fn record_batch(&self, items: Vec<(Option<u64>, EventKind)>) -> Result<Vec<Event>> {
        let evs = self.journal.append_batch(items)?;
        for ev in &evs {
            self.apply(ev);
        }
        Ok(evs)
    }

    fn apply(&self, ev: &Event) {
        log_event(ev);
        crate::journal::fold::apply(&mut self.jobs(), ev);
    }

    pub fn job(&self, id: u64) -> Option<Job> {
        self.jobs().get(&id).cloned()
    }

    /// A snapshot of every job.
    pub fn all_jobs(&self) -> Jobs {
        self.jobs().clone()
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Cancels every running build (their process groups are killed).
    pub fn cancel_running(&self) {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        for tx in running.values() {
            let _ = tx.try_send(());
        }
    }

    /// The input workitem (and spec, for a valid one) of a job, from its event.
    pub fn input(&self, job: &Job) -> Result<(Value, Option<Spec>)> {
        let seq = job.input_seq.ok_or(StageError::NoInput(job.id))?;
        match self.journal.get(seq)?.map(|e| e.kind) {
            Some(EventKind::Queued { spec, input, .. }) => Ok((input, Some(*spec))),
            Some(EventKind::Invalid { input, .. }) => Ok((input, None)),
            _ => Err(StageError::NoInput(job.id)),
        }
    }

    /// Records a file just renamed into active/ as a new job and reads it.
    pub fn claimed(&self, name: &str) -> Result<Next> {
        let c = self.spool.read_claimed(name, self.cfg.spool.max_bytes)?;
        let ev = self.record(
            None,
            EventKind::Claimed {
                file: name.to_string(),
                worker: self.spool.worker.clone(),
                bytes: c.bytes.len() as u64,
                sha256: c.sha256.clone(),
            },
        )?;
        self.advance(ev.job)
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
                            std::fs::remove_file(&path).map_err(|e| {
                                crate::durable::DurableError::new("cannot remove", &path, e)
                            })?;
                            crate::durable::sync_dir(&self.spool.active)?;
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

    fn read_input(&self, job: &Job) -> Result<()> {
        let Some(file) = &job.file else {
            return Err(StageError::NoInput(job.id));
        };
        let reject = |reason: String| -> Result<()> {
            self.record(
                Some(job.id),
                EventKind::Rejected {
                    file: file.clone(),
                    reason,
                },
            )?;
            Ok(())
        };
        let c = match self.spool.read_claimed(file, self.cfg.spool.max_bytes) {
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
            Err(e) => return reject(e.to_string()),
        };
        match workitem::normalise(&input) {
            Ok(spec) => {
                self.record(
                    Some(job.id),
                    EventKind::Queued {
                        image_id: spec.image_id.clone(),
                        spec: Box::new(spec),
                        input,
                    },
                )?;
            }
            Err(WorkitemError::NotAWorkitem(e)) => return reject(e),
            Err(WorkitemError::Invalid(error)) => {
                self.record(
                    Some(job.id),
                    EventKind::Invalid {
                        image_id: workitem::raw_image_id(&input),
                        error: format!("invalid workitem: {error}"),
                        input,
                    },
                )?;
            }
        }
        Ok(())
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
        crate::durable::write_atomic(&self.spool.outbox.join(&name), &bytes, 0o644)?;
        self.record(Some(job.id), EventKind::Delivered { outbox: name })?;
        Ok(())
    }

    /// Runs the push utility once and records the attempt.
    fn push(&self, job: &Job, status: Status, workitem: &Value) -> Result<()> {
        let image_id = job.image_id.clone().unwrap_or_default();
        if let Some(p) =
            hooks::push_status(&self.cfg.hooks, status, workitem, &image_id, &self.hook_log)
        {
            if let Some(e) = &p.error {
                log::warn!("job {} push {} failed: {e}", job.id, status.as_str());
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
        let (cancel_tx, cancel_rx) = bounded::<()>(1);
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, cancel_tx);
        let result = (|| {
            self.record(
                Some(id),
                EventKind::Started {
                    mode: build::mode(w),
                    attempt: job.attempts + 1,
                },
            )?;
            let planned = build::planned_urls(w, &spec);
            let building = workitem::reply(&input, None, None, &planned);
            if let Some(job) = self.job(id) {
                self.push(&job, Status::Building, &building)?;
            }
            let end = build::build(w, &spec, &cancel_rx);
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
                BuildEnd::Cancelled if self.stopping() => {
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
        | EventKind::Requeued { reason }
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
