//! Retention: which images expire (`artifacts::policy`, a pure function of the log and the
//! disk), the pass that expires them, the disk budget a build must find before it starts, and
//! `pin`/`unpin`. The policy (`keep_days`, `keep_last`) is applied by the timer every minute;
//! the disk budget (`min_free_mb`) when a build is about to start and finds too little room
//! (and while one waits), and by an operator's `gc`.
//!
//! Invariants: an expiry is recorded (`expired`, durable) before any of its files is deleted,
//! and deleting is done again by a later pass for an expiry a crash or an error cut short (the
//! event lists the files; a missing file is skipped); only files the job's `SHA256SUMS` lists
//! are deleted, beneath base_dir and never through a symlink, and never the log, the
//! kickstart, `SHA256SUMS` or the provenance; only this worker's jobs are passed over; one pass
//! at a time, so `gc` and the daemon never expire one image twice.

use super::store::lock;
use super::{Engine, EngineError, Result};
use crate::artifacts::policy::{self, Image, Rules};
use crate::artifacts::sums;
use crate::domain::{EventKind, Job, State};
use crate::imaging::{beneath, layout};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the timer passes over the images when a rule is set.
const PASS_EVERY: Duration = Duration::from_secs(60);

/// Files of a job folder no expiry deletes, whatever a `SHA256SUMS` lists.
const NEVER: [&str; 4] = [
    sums::SUMS_FILE,
    "provenance.json",
    "provenance.intoto.jsonl",
    "console.log",
];

/// The pass's state.
#[derive(Default)]
pub struct Retention {
    /// One pass at a time (the timer's, a build's gate, an operator's `gc`).
    pass: Mutex<()>,
    /// When the timer's next pass is due; None: at once (a start, or a delete to finish).
    due: Mutex<Option<Instant>>,
    /// Why builds wait for room under base_dir (None: they do not).
    waiting: Mutex<Option<String>>,
}

/// One image the policy chose: its job, what its files hold, why, and the files (paths under
/// base_dir) its expiry deletes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Planned {
    pub job: u64,
    pub image_id: Option<String>,
    pub name: Option<String>,
    pub bytes: u64,
    pub reason: String,
    pub files: Vec<String>,
}

/// Seconds since the epoch of an event's time (RFC 3339).
fn epoch(ts: &str) -> Option<u64> {
    humantime::parse_rfc3339_weak(ts.trim_end_matches('Z'))
        .or_else(|_| humantime::parse_rfc3339(ts))
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
}

impl Engine {
    fn rules(&self) -> Rules {
        let a = &self.cfg.artifacts;
        Rules {
            keep_days: a.keep_days,
            keep_last: a.keep_last,
            min_free: a.min_free_mb.saturating_mul(1 << 20),
        }
    }

    /// Free bytes under base_dir (None when it cannot be told).
    fn base_free(&self) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(&self.cfg.worker.base_dir).ok()?;
        Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
    }

    /// The images the policy may expire: this worker's answered successful builds whose files
    /// were listed (`SHA256SUMS`, sized in `finished`) and have not expired.
    fn images(&self, jobs: &crate::domain::job::Jobs) -> Vec<Image> {
        jobs.values()
            .filter(|j| j.state == State::Done && j.expired.is_none() && self.is_mine(j))
            .filter_map(|j| {
                Some(Image {
                    job: j.id,
                    name: j.name.clone().unwrap_or_default(),
                    finished: epoch(j.finished_at.as_deref()?)?,
                    bytes: j.urls.artifact_bytes?,
                    pinned: j.pinned,
                })
            })
            .collect()
    }

    /// The files of a job's build that an expiry deletes (paths under base_dir): the ones its
    /// `SHA256SUMS` lists, less those no expiry takes.
    fn image_files(&self, job: &Job) -> std::result::Result<Vec<String>, String> {
        let w = &self.cfg.worker;
        let spec = self
            .store
            .spec(job)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("job {} has no workitem in the log", job.id))?;
        let dir = layout::job_dir(w, &spec);
        let under = dir
            .strip_prefix(&w.base_dir)
            .map_err(|_| format!("{} is not under base_dir", dir.display()))?;
        let sums_path = dir.join(sums::SUMS_FILE);
        let text = std::fs::read(&sums_path)
            .map_err(|e| format!("cannot read {}: {e}", sums_path.display()))?;
        let listed = sums::parse(&text).map_err(|e| format!("{}: {e}", sums_path.display()))?;
        let log = layout::log_path(w, &spec);
        let ks = layout::ks_path(w, &spec);
        let mut files = Vec::new();
        for (rel, _) in listed {
            let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let whole = dir.join(&rel);
            if NEVER.contains(&name) || whole == log || whole == ks {
                continue;
            }
            let plain = rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !plain {
                log::warn!(
                    "job {}: {} lists {}, not a path in the job folder: left alone",
                    job.id,
                    sums_path.display(),
                    rel.display()
                );
                continue;
            }
            files.push(under.join(&rel).to_string_lossy().into_owned());
        }
        Ok(files)
    }

    /// What expires now, in order: the policy's images, and with `budget` those the disk
    /// budget takes too.
    fn plan_of(&self, jobs: &crate::domain::job::Jobs, budget: bool) -> Vec<Planned> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let free = if budget { self.base_free() } else { None };
        let chosen = policy::plan(&self.images(jobs), self.rules(), now, free);
        let mut out = Vec::new();
        for c in chosen {
            let Some(job) = jobs.get(&c.job) else {
                continue;
            };
            match self.image_files(job) {
                Ok(files) => out.push(Planned {
                    job: c.job,
                    image_id: job.image_id.clone(),
                    name: job.name.clone(),
                    bytes: c.bytes,
                    reason: c.reason,
                    files,
                }),
                Err(e) => log::warn!("job {}: its images cannot expire: {e}", c.job),
            }
        }
        out
    }

    /// `gc`: expires what the policy and the disk budget name (`dry_run`: only says what).
    pub fn gc(&self, dry_run: bool) -> Result<Vec<Planned>> {
        self.expire(dry_run, true)
    }

    /// Expires what the policy names, and with `budget` what the disk budget takes too
    /// (`dry_run`: only says what): each expiry recorded, then its files deleted. Also
    /// finishes the deletes of earlier expiries left undone.
    fn expire(&self, dry_run: bool, budget: bool) -> Result<Vec<Planned>> {
        let _pass = lock(&self.retention.pass);
        let jobs = self.store.journal()?.projections()?;
        let plan = self.plan_of(&jobs, budget);
        if dry_run {
            return Ok(plan);
        }
        let mut clean = self.finish_expiries(&jobs);
        for p in &plan {
            self.store.record(
                Some(p.job),
                EventKind::Expired {
                    files: p.files.clone(),
                    bytes: p.bytes,
                    reason: p.reason.clone(),
                },
            )?;
            clean &= self.delete(p.job, &p.files);
        }
        *lock(&self.retention.due) = Some(
            Instant::now()
                + if clean {
                    PASS_EVERY
                } else {
                    Duration::from_secs(5)
                },
        );
        if !plan.is_empty() {
            self.stalled_now();
        }
        Ok(plan)
    }

    /// Deletes an expiry's files; false when one could not be deleted (a later pass tries again).
    fn delete(&self, job: u64, files: &[String]) -> bool {
        let base = &self.cfg.worker.base_dir;
        let mut all = true;
        for f in files {
            match beneath::remove_beneath(base, Path::new(f)) {
                Ok(true) => log::info!(
                    "job {job}: expired {}",
                    PathBuf::from(base).join(f).display()
                ),
                Ok(false) => {}
                Err(e) => {
                    all = false;
                    log::error!(
                        "job {job}: cannot delete the expired {f} under {}: {e}",
                        base.display()
                    );
                }
            }
        }
        all
    }

    /// The files of recorded expiries still on disk are deleted (a crash or an error cut the
    /// delete short). True when nothing was left.
    fn finish_expiries(&self, jobs: &crate::domain::job::Jobs) -> bool {
        let mut clean = true;
        for j in jobs.values().filter(|j| self.is_mine(j)) {
            if let Some(e) = &j.expired {
                clean &= self.delete(j.id, &e.files);
            }
        }
        clean
    }

    /// The timer's pass: when a rule is set and it is due (every minute, at once after a
    /// start). The disk budget takes images only while a build waits for room: an image just
    /// built and answered is not deleted to keep a margin no build asked for yet.
    pub fn run_retention_pass(&self) {
        let r = self.rules();
        if (r.keep_days == 0 && r.keep_last == 0 && r.min_free == 0) || self.stopping() {
            return;
        }
        if lock(&self.retention.due).is_some_and(|at| Instant::now() < at) {
            return;
        }
        let waiting = self.waiting_for_room().is_some();
        if let Err(e) = self.expire(false, waiting) {
            log::error!("retention pass: {e}");
            *lock(&self.retention.due) = Some(Instant::now() + PASS_EVERY);
        }
        if waiting {
            let _ = self.check_room();
        }
    }

    /// Is there room under base_dir for a build to start (`min_free_mb`)? When not, the policy's
    /// pass runs first; still not: why, which `status` shows while builds wait.
    pub fn room_to_build(&self) -> std::result::Result<(), String> {
        if self.check_room().is_ok() {
            return Ok(());
        }
        if let Err(e) = self.expire(false, true) {
            log::error!("retention pass: {e}");
        }
        self.check_room()
    }

    fn check_room(&self) -> std::result::Result<(), String> {
        let min = self.rules().min_free;
        let mut waiting = lock(&self.retention.waiting);
        match self.base_free() {
            Some(free) if min > 0 && free < min => {
                let why = format!(
                    "no build starts: base_dir {} has {} MiB free, below [artifacts] min_free_mb = {}; \
                     nothing more may expire (pin, keep_days, keep_last)",
                    self.cfg.worker.base_dir.display(),
                    free >> 20,
                    self.cfg.artifacts.min_free_mb
                );
                if waiting.as_deref() != Some(why.as_str()) {
                    log::warn!("{why}");
                }
                *waiting = Some(why.clone());
                Err(why)
            }
            _ => {
                if waiting.take().is_some() {
                    drop(waiting);
                    log::info!("base_dir has room again: builds start");
                    self.stalled_now();
                }
                Ok(())
            }
        }
    }

    /// Why builds wait for room under base_dir, if they do.
    pub fn waiting_for_room(&self) -> Option<String> {
        lock(&self.retention.waiting).clone()
    }

    /// `pin` (true) or `unpin` (false), recorded. Refused for a job with no image, or whose
    /// images expired; pinning a pinned job (or unpinning one that is not) records nothing.
    pub fn pin(&self, id: u64, pin: bool) -> Result<bool> {
        let job = self
            .store
            .job(id)
            .ok_or(super::store::StoreError::NoJob(id))?;
        if pin && job.result != Some(true) {
            return Err(EngineError::Refused(format!(
                "job {id} is {}: only a built image can be pinned",
                job.state
            )));
        }
        if let Some(e) = &job.expired
            && pin
        {
            return Err(EngineError::Refused(format!(
                "job {id}'s images expired at {} ({}): there is nothing left to pin",
                e.at, e.reason
            )));
        }
        if job.pinned == pin {
            return Ok(false);
        }
        let kind = if pin {
            EventKind::Pinned {}
        } else {
            EventKind::Unpinned {}
        };
        self.store.record(Some(id), kind)?;
        if !pin {
            // an image given back to the policy may make room for a build waiting for it
            self.stalled_now();
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::epoch;

    #[test]
    fn event_times_read_as_epoch_seconds() {
        assert_eq!(epoch("1970-01-01T00:01:40.000Z"), Some(100));
        assert_eq!(epoch("2026-12-02T10:00:00Z"), Some(1_796_205_600));
        assert_eq!(epoch("yesterday"), None);
    }
}
