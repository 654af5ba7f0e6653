//! The farm in a shared spool: each daemon's host record `hosts/<worker>.json` (see
//! `crate::hosts`), and the control drops of `control/`: a `cancel ID` run on any host of the
//! farm drops `control/cancel-<unique>.json` naming an image_id; every daemon looks at the drops
//! ([`Spool::take_drops`], from its timer), the one holding an open job of that image_id cancels
//! it by the normal cancel path and answers the drop (`<drop>.answer`), the others leave it.
//! A drop nobody took within [`DROP_EXPIRY`] (and an answer nobody read) is removed by any daemon.
//!
//! Invariant: records, drops and answers are written tmp + fsync + rename, so a reader sees a
//! whole file or none; a drop is answered at most once (the holder renames it away before it
//! acts, so two passes never cancel twice).

use super::{Spool, SpoolError};
use crate::durable::{self, DurableError};
use crate::engine::Engine;
use crate::hosts::HostRecord;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A control drop nobody took (and an answer nobody read) is removed after this.
pub const DROP_EXPIRY: Duration = Duration::from_secs(120);

/// The largest record or drop read.
const MAX_FILE: u64 = 256 * 1024;

/// A `cancel ID` sent through the spool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelDrop {
    pub op: String,
    pub image_id: String,
    /// Who asked (host name and pid), for the log.
    pub from: String,
}

/// The holder's answer to a drop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropAnswer {
    /// The worker that held the job.
    pub worker: String,
    pub job: u64,
    /// Ok: the job was cancelled (`answered`: at once; false: its build is being killed).
    pub answered: bool,
    /// Why it could not be cancelled, if it could not.
    #[serde(default)]
    pub refused: Option<String>,
}

impl Spool {
    fn record_path(&self, worker: &str) -> PathBuf {
        self.hosts.join(format!("{worker}.json"))
    }

    /// Writes this daemon's record (tmp + fsync + rename).
    pub fn write_host_record(&self, record: &HostRecord) -> Result<(), SpoolError> {
        durable::write_atomic_tagged(
            &self.record_path(&record.worker),
            &record.to_json(),
            0o644,
            &self.worker,
        )?;
        Ok(())
    }

    /// The records in `hosts/` (a file that is not a record is skipped with a warning).
    pub fn host_records(&self) -> Result<Vec<HostRecord>, SpoolError> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.hosts) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(source) => {
                return Err(SpoolError::Scan {
                    path: self.hosts.clone(),
                    source,
                });
            }
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            match read_small(&e.path()).map(|b| serde_json::from_slice::<HostRecord>(&b)) {
                Ok(Ok(r)) => out.push(r),
                Ok(Err(err)) => log::warn!("hosts/{name} is not a host record: {err}"),
                Err(err) => log::warn!("cannot read hosts/{name}: {err}"),
            }
        }
        Ok(out)
    }

    /// Drops a cancel of `image_id` into `control/` for the host that holds it; returns the
    /// drop's path (its answer is [`answer_path`] of it).
    pub fn drop_cancel(&self, image_id: &str) -> Result<PathBuf, SpoolError> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path = self.control.join(format!(
            "cancel-{}-{}-{nanos}.json",
            self.worker,
            std::process::id()
        ));
        let drop = CancelDrop {
            op: "cancel".into(),
            image_id: image_id.to_string(),
            from: format!("{} pid {}", self.worker, std::process::id()),
        };
        let bytes = serde_json::to_vec(&drop).unwrap_or_default();
        durable::write_atomic(&path, &bytes, 0o644)?;
        Ok(path)
    }

    /// One pass over `control/` by a daemon: each cancel drop naming an image_id of an open
    /// job of this worker is taken (renamed away), the job cancelled and the drop answered;
    /// drops and answers older than [`DROP_EXPIRY`] are removed. Returns the drops taken.
    pub fn take_drops(&self, engine: &Engine) -> usize {
        let Ok(rd) = std::fs::read_dir(&self.control) else {
            return 0;
        };
        let mut taken = 0;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            // Expired: a drop nobody took, an answer nobody read, a take or write a crash cut.
            if expired(&path) {
                match std::fs::remove_file(&path) {
                    Ok(()) => log::info!("control/{name}: nobody took it in time, removed"),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => log::warn!("cannot remove control/{name}: {err}"),
                }
                continue;
            }
            if name.starts_with('.') || !(name.starts_with("cancel-") && name.ends_with(".json")) {
                continue;
            }
            let Ok(Ok(drop)) = read_small(&path).map(|b| serde_json::from_slice::<CancelDrop>(&b))
            else {
                continue;
            };
            let Some(job) = open_job_of(engine, &drop.image_id) else {
                continue;
            };
            // Taken: renamed to a hidden name of this worker first, so that no other pass
            // (of this daemon or another) acts on it again.
            let hidden = self.control.join(format!(".{name}.{}.taken", self.worker));
            if std::fs::rename(&path, &hidden).is_err() {
                continue;
            }
            let answer = match engine.cancel(job) {
                Ok(answered) => {
                    log::info!(
                        "job {job} ({}) cancelled by a control drop from {}",
                        drop.image_id,
                        drop.from
                    );
                    DropAnswer {
                        worker: engine.worker.clone(),
                        job,
                        answered,
                        refused: None,
                    }
                }
                Err(err) => DropAnswer {
                    worker: engine.worker.clone(),
                    job,
                    answered: false,
                    refused: Some(err.to_string()),
                },
            };
            let bytes = serde_json::to_vec(&answer).unwrap_or_default();
            if let Err(err) = durable::write_atomic(&answer_path(&path), &bytes, 0o644) {
                log::warn!("cannot answer control/{name}: {err}");
            }
            let _ = std::fs::remove_file(&hidden);
            taken += 1;
        }
        taken
    }
}

/// Where the answer to a drop is written.
pub fn answer_path(drop: &Path) -> PathBuf {
    drop.with_extension("answer")
}

/// The answer to a drop, once written.
pub fn read_answer(drop: &Path) -> Option<DropAnswer> {
    let bytes = read_small(&answer_path(drop)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The open job of this worker (not answered yet) that holds `image_id`.
fn open_job_of(engine: &Engine, image_id: &str) -> Option<u64> {
    engine.store.with_open(|jobs| {
        jobs.values()
            .find(|j| {
                j.image_id.as_deref() == Some(image_id)
                    && j.worker.is_some()
                    && engine.is_mine(j)
                    && !j.state.is_answered()
            })
            .map(|j| j.id)
    })
}

fn expired(path: &Path) -> bool {
    path.symlink_metadata()
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age > DROP_EXPIRY)
}

/// Reads a small regular file (no symlink followed, at most [`MAX_FILE`] bytes).
fn read_small(path: &Path) -> Result<Vec<u8>, DurableError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| DurableError::new("cannot open", path, e))?;
    let mut bytes = Vec::new();
    f.take(MAX_FILE)
        .read_to_end(&mut bytes)
        .map_err(|e| DurableError::new("cannot read", path, e))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::{HostState, Slots};

    #[test]
    fn the_holder_takes_its_drop_once_and_old_files_expire() {
        let rig = crate::engine::testkit::Rig::new();
        let job = rig.drop_and_take("a.json", &rig.workitem("x1"));
        let sp = Spool::new(&rig.dir.path().join("spool"), "w1");
        sp.create_dirs().unwrap();
        let mine = sp.drop_cancel("x1").unwrap();
        let theirs = sp.drop_cancel("elsewhere-2").unwrap();
        let old_taken = sp.control.join(".cancel-9.json.w1.taken");
        let old_drop = sp.control.join("cancel-old.json");
        for p in [&old_taken, &old_drop] {
            std::fs::write(p, "{}").unwrap();
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(SystemTime::now() - 2 * DROP_EXPIRY)
                .unwrap();
        }
        assert_eq!(sp.take_drops(&rig.engine), 1);
        let a = read_answer(&mine).unwrap();
        assert_eq!((a.worker.as_str(), a.job, a.answered), ("w1", job, true));
        assert_eq!(a.refused, None);
        assert!(!mine.exists(), "taken");
        assert!(theirs.exists(), "not this worker's: left");
        assert!(!old_taken.exists() && !old_drop.exists(), "expired");
        let j = rig.engine.store.job(job).unwrap();
        assert!(j.state.is_answered(), "{:?}", j.state);
        assert_eq!(j.error.as_deref(), Some("cancelled"));
        // taken once: a second pass finds nothing of this worker's
        std::fs::remove_file(answer_path(&mine)).unwrap();
        assert_eq!(sp.take_drops(&rig.engine), 0);
        assert!(read_answer(&mine).is_none());
    }

    #[test]
    fn records_are_written_whole_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let sp = Spool::new(d.path(), "w1");
        sp.create_dirs().unwrap();
        let r = HostRecord {
            worker: "w1".into(),
            hostname: "h".into(),
            version: "1".into(),
            pid: 7,
            state: HostState::Running,
            drained: None,
            slots: Slots { total: 2, free: 1 },
            running: vec![],
            queued: 3,
            heartbeat: crate::hosts::now_text(),
            started: crate::hosts::now_text(),
            interval_s: 5,
            http: None,
        };
        sp.write_host_record(&r).unwrap();
        sp.write_host_record(&r).unwrap();
        std::fs::write(sp.hosts.join("junk.json"), "{").unwrap();
        assert_eq!(sp.host_records().unwrap(), vec![r]);
        let names: Vec<String> = std::fs::read_dir(&sp.hosts)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
        let drop = sp.drop_cancel("img-1").unwrap();
        assert!(drop.starts_with(&sp.control));
        let back: CancelDrop = serde_json::from_slice(&std::fs::read(&drop).unwrap()).unwrap();
        assert_eq!(back.image_id, "img-1");
        assert_eq!(read_answer(&drop), None);
        assert_eq!(answer_path(&drop).extension().unwrap(), "answer");
    }
}
