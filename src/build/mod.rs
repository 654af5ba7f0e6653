//! Builds: the job directory, the job log, running the image creator (natively, or in a KVM
//! guest), and turning what it left behind into the OUT fields.
//!
//! Invariant: every path a build writes is under `base_dir/prefix/dir_id`, whose parts were
//! validated by `workitem::normalise`; a build's result is what mic really did (exit status and
//! an image file on disk), never assumed.

pub mod kvm;
pub mod mic;
pub mod native;

use crate::config::WorkerConfig;
use crate::journal::Mode;
use crate::workitem::{Spec, Urls};
use crossbeam_channel::Receiver;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How a build ended.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildEnd {
    Finished {
        result: bool,
        error: Option<String>,
        urls: Urls,
    },
    /// Cancelled through the cancel channel before it finished.
    Cancelled,
}

impl BuildEnd {
    fn failed(error: String, urls: Urls) -> BuildEnd {
        BuildEnd::Finished {
            result: false,
            error: Some(error),
            urls,
        }
    }
}

pub fn mode(w: &WorkerConfig) -> Mode {
    if w.use_kvm { Mode::Kvm } else { Mode::Native }
}

/// `base_dir/prefix/dir_id`.
pub fn job_dir(w: &WorkerConfig, spec: &Spec) -> PathBuf {
    w.base_dir.join(&spec.prefix).join(&spec.dir_id)
}

pub fn log_path(w: &WorkerConfig, spec: &Spec) -> PathBuf {
    job_dir(w, spec).join(format!("{}.log", spec.name))
}

pub fn ks_path(w: &WorkerConfig, spec: &Spec) -> PathBuf {
    job_dir(w, spec).join(format!("{}.ks", spec.name))
}

/// The URL of a path under base_dir: base_dir replaced by base_url.
pub fn url_for(w: &WorkerConfig, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(&w.base_dir).ok()?;
    let mut url = w.base_url.trim_end_matches('/').to_string();
    for part in rel.components() {
        url.push('/');
        url.push_str(&part.as_os_str().to_string_lossy());
    }
    Some(url)
}

/// files_url and logfile_url, known before the build starts (the BUILDING push carries them).
pub fn planned_urls(w: &WorkerConfig, spec: &Spec) -> Urls {
    Urls {
        files_url: url_for(w, &job_dir(w, spec)),
        image_url: None,
        logfile_url: url_for(w, &log_path(w, spec)),
    }
}

/// The largest non-hidden regular file anywhere under `dir` (symlinks not followed, hidden
/// directories not entered), other than the files in `skip`.
pub fn find_image(dir: &Path, skip: &[PathBuf]) -> Option<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let Ok(ft) = entry.file_type() else { continue };
            let path = entry.path();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() && !skip.contains(&path) {
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                let better = match &best {
                    None => true,
                    Some((s, p)) => size > *s || (size == *s && path < *p),
                };
                if better {
                    best = Some((size, path));
                }
            }
        }
    }
    best.map(|(_, p)| p)
}

/// Why a job directory could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct PrepareError {
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl PrepareError {
    /// The disk (or quota) is full: worth waiting for, not a reason to fail the job.
    pub fn is_no_space(&self) -> bool {
        matches!(
            self.source.raw_os_error(),
            Some(nix::libc::ENOSPC) | Some(nix::libc::EDQUOT)
        )
    }
}

/// Makes the job directory, writes the kickstart and starts the job log, before a build starts.
pub fn prepare(w: &WorkerConfig, spec: &Spec, attempt: u32) -> Result<(), PrepareError> {
    let dir = job_dir(w, spec);
    make_job_dir(&dir).map_err(|source| PrepareError {
        what: "cannot create job directory",
        path: dir.clone(),
        source,
    })?;
    let ks = ks_path(w, spec);
    // Not fsynced: the kickstart is in the log and written again before every attempt.
    crate::durable::write_atomic_unsynced(&ks, spec.kickstart.as_bytes(), 0o644).map_err(|e| {
        PrepareError {
            what: "cannot write the kickstart",
            path: ks.clone(),
            source: e.source,
        }
    })?;
    let log = log_path(w, spec);
    JobLog::open(&log)
        .and_then(|mut l| {
            l.line(&format!(
                "build of {} ({} {} {}), attempt {attempt}, {:?} mode",
                spec.image_id,
                spec.name,
                spec.arch,
                spec.image_type,
                mode(w)
            ))
        })
        .map_err(|source| PrepareError {
            what: "cannot write the job log",
            path: log.clone(),
            source,
        })
}

/// Creates the job directory (and missing parents) group-writable, as the original did.
pub fn make_job_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o775)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o775))
}

/// The job's log file: every command and its output, each step after a timestamped line.
pub struct JobLog {
    file: File,
    path: PathBuf,
}

impl JobLog {
    pub fn open(path: &Path) -> std::io::Result<JobLog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(path)?;
        Ok(JobLog {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn line(&mut self, text: &str) -> std::io::Result<()> {
        writeln!(self.file, "[{}] {text}", crate::journal::now_ts())?;
        self.file.flush()
    }

    /// A handle for a child's stdout and stderr.
    pub fn for_child(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// The last `n` non-empty lines, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let text = std::fs::read(&self.path).unwrap_or_default();
        let start = text.len().saturating_sub(4096);
        let text = String::from_utf8_lossy(&text[start..]);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(n)..].join(" | ")
    }
}

/// Runs the build for `spec` with the configured mode. `cancel` stops it.
pub fn build(w: &WorkerConfig, spec: &Spec, cancel: &Receiver<()>) -> BuildEnd {
    if w.use_kvm {
        kvm::build(w, spec, cancel)
    } else {
        native::build(w, spec, cancel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_replace_base_dir() {
        let w = WorkerConfig {
            base_dir: "/srv/images".into(),
            base_url: "http://img.example/images/".into(),
            ..WorkerConfig::default()
        };
        assert_eq!(
            url_for(&w, Path::new("/srv/images/queue/user/7-1/a.img")).as_deref(),
            Some("http://img.example/images/queue/user/7-1/a.img")
        );
        assert_eq!(url_for(&w, Path::new("/elsewhere/a")), None);
    }

    #[test]
    fn image_is_largest_visible_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("rel/images/n")).unwrap();
        std::fs::create_dir_all(p.join(".hidden")).unwrap();
        std::fs::write(p.join("n.log"), vec![0u8; 5000]).unwrap();
        std::fs::write(p.join("rel/images/n/n.img"), vec![0u8; 3000]).unwrap();
        std::fs::write(p.join("rel/images/n/n.ks"), vec![0u8; 10]).unwrap();
        std::fs::write(p.join(".big"), vec![0u8; 9000]).unwrap();
        std::fs::write(p.join(".hidden/x"), vec![0u8; 9000]).unwrap();
        assert_eq!(
            find_image(p, &[p.join("n.log")]),
            Some(p.join("rel/images/n/n.img"))
        );
        assert_eq!(find_image(&p.join("none"), &[]), None);
    }
}
