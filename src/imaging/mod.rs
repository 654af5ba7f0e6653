//! Builds: the job directory (`layout` says where, `jobdir` makes it), the job log (`joblog`,
//! read back by `logread`), running the image creator (`native`, or in a KVM guest: `kvm`), and
//! turning what it left behind into the OUT fields.
//!
//! Invariant: every path a build writes is under `base_dir/prefix/dir_id`, whose parts were
//! validated by `workitem::normalise`, reached from base_dir without following a symlink that
//! was already there; a build's result is what mic really did (exit status and an image file on
//! disk that this attempt wrote, see [`Prepared::new_image`]), never assumed.

pub mod jobdir;
pub mod joblog;
pub mod kvm;
pub mod layout;
pub mod logread;
pub mod mic;
pub mod native;

pub use jobdir::{PrepareError, Prepared, prepare};
pub use joblog::JobLog;
pub use layout::{job_dir, ks_path, log_path, planned_urls, url_for};

use crate::config::WorkerConfig;
use crate::health::find_on_path;
use crate::journal::Mode;
use crate::process::Registry;
use crate::workitem::{Spec, Urls};
use crossbeam_channel::Receiver;
use std::path::Path;

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

/// Why mic cannot be run on this host (not found, not a file, not executable; sudo missing when
/// `sudo = true`), or None when it looks runnable. In KVM mode mic runs in the guest: None.
pub fn mic_missing(w: &WorkerConfig) -> Option<String> {
    if w.use_kvm {
        return None;
    }
    if w.sudo && find_on_path(Path::new("sudo")).is_none() {
        return Some("sudo not found on PATH (sudo = true)".into());
    }
    let mic = w.mic_path();
    let path = if mic.components().count() == 1 && !mic.is_absolute() {
        match find_on_path(&mic) {
            Some(p) => p,
            None => return Some(format!("{} not found on PATH", mic.display())),
        }
    } else {
        mic.clone()
    };
    match std::fs::metadata(&path) {
        Err(e) => Some(format!("{}: {e}", path.display())),
        Ok(m) if !m.is_file() => Some(format!("{} is not a file", path.display())),
        Ok(_) => nix::unistd::access(&path, nix::unistd::AccessFlags::X_OK)
            .err()
            .map(|e| format!("{} is not executable: {}", path.display(), e.desc())),
    }
}

/// Runs the build for `spec` with the configured mode, in the directory `prepare` made.
/// `cancel` stops it; every child is registered in `registry`.
pub fn build(
    w: &WorkerConfig,
    spec: &Spec,
    prepared: &Prepared,
    cancel: &Receiver<()>,
    registry: &Registry,
) -> BuildEnd {
    if w.use_kvm {
        kvm::build(w, spec, prepared, cancel, registry)
    } else {
        native::build(w, spec, prepared, cancel, registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mic_missing_says_why() {
        let d = tempfile::tempdir().unwrap();
        let mut w = WorkerConfig {
            sudo: false,
            mic_path: Some(d.path().join("mic")),
            ..WorkerConfig::default()
        };
        assert!(mic_missing(&w).unwrap().contains("No such file"));
        std::fs::write(d.path().join("mic"), "#!/bin/sh\n").unwrap();
        assert!(mic_missing(&w).unwrap().contains("not executable"));
        std::fs::set_permissions(
            d.path().join("mic"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        assert_eq!(mic_missing(&w), None);
        w.mic_path = Some("surely-no-such-mic".into());
        assert!(mic_missing(&w).unwrap().contains("not found on PATH"));
        w.use_kvm = true;
        assert_eq!(mic_missing(&w), None);
    }
}
