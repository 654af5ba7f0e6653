//! Builds: the job directory (`layout` says where, `jobdir` makes it), the job log (`joblog`,
//! read back by `logread`), running the image creator, and turning what it left behind into
//! the OUT fields. This module owns the [`Builder`] trait, which the two modes implement
//! (`native`: mic on this host; `kvm`: mic in a throw-away guest), [`builder`] (the one the
//! config asks for), [`BuildEnd`] and [`mode`].
//!
//! Invariant: every path a build writes is under `base_dir/prefix/dir_id`, whose parts were
//! validated by `workitem::normalise`, reached from base_dir without following a symlink that
//! was already there; a build's result is what mic really did (exit status and an image file on
//! disk that this attempt wrote, see [`Prepared::new_image`]), never assumed.

pub mod beneath;
pub mod jobdir;
pub mod joblog;
pub mod kvm;
pub mod layout;
pub mod logread;
pub mod mic;
pub mod native;
pub mod place;
pub mod tools;

pub use jobdir::{PrepareError, Prepared, Sealed, prepare};
pub use joblog::JobLog;
pub use layout::{job_dir, ks_path, log_path, planned_urls, url_for};

use crate::config::WorkerConfig;
use crate::domain::workitem::{Spec, Urls};
use crate::domain::{Failure, Mode};
use crate::health::Check;
use crate::process::Registry;
use crossbeam_channel::Receiver;
use std::sync::Arc;

/// How a build ended.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildEnd {
    Finished {
        result: bool,
        error: Option<String>,
        urls: Urls,
        /// A failure's class (None for a success).
        failure: Option<Failure>,
    },
    /// Cancelled through the cancel channel before it finished.
    Cancelled,
}

impl BuildEnd {
    /// A success: the sealed image's URL, sha256 and the bytes of the build's files in `urls`.
    fn built(w: &WorkerConfig, sealed: jobdir::Sealed, mut urls: Urls) -> BuildEnd {
        urls.image_url = layout::url_for(w, &sealed.image);
        urls.artifact_bytes = Some(sealed.files.iter().map(|f| f.bytes).sum());
        urls.image_sha256 = Some(sealed.image_sha256);
        BuildEnd::Finished {
            result: true,
            error: None,
            urls,
            failure: None,
        }
    }

    fn failed(error: String, urls: Urls, failure: Failure) -> BuildEnd {
        BuildEnd::Finished {
            result: false,
            error: Some(error),
            urls,
            failure: Some(failure),
        }
    }
}

/// Below this much free space, the filesystem of a job folder counts as full.
const DISK_FULL_BYTES: u64 = 1 << 20;

/// The class of a build whose image creator ended so (it did not succeed, or left no image),
/// and a note for the error: mic's own failure is the image's (the same input fails again),
/// unless the job folder's filesystem is full; a timeout, a stall or a signal is the
/// infrastructure's.
// the statvfs counts are u64 on this target, narrower on some others
#[allow(clippy::unnecessary_cast)]
pub fn failure_of(outcome: crate::process::Outcome, dir: &std::path::Path) -> (Failure, String) {
    use crate::process::Outcome;
    match outcome {
        Outcome::Cancelled => (Failure::Cancelled, String::new()),
        Outcome::TimedOut | Outcome::Stalled(_) | Outcome::Signalled(_) => {
            (Failure::Infrastructure, String::new())
        }
        Outcome::Exited(_) => match nix::sys::statvfs::statvfs(dir) {
            Ok(st)
                if (st.blocks_available() as u64) * (st.fragment_size() as u64)
                    < DISK_FULL_BYTES =>
            {
                (
                    Failure::Infrastructure,
                    format!(" (the filesystem of {} is full)", dir.display()),
                )
            }
            _ => (Failure::Image, String::new()),
        },
    }
}

/// The host facts common to both modes (mic's path and options), with `version`.
pub fn mic_facts(
    w: &WorkerConfig,
    version: Option<String>,
) -> crate::artifacts::provenance::HostFacts {
    crate::artifacts::provenance::HostFacts {
        mode: match mode(w) {
            Mode::Native => "native",
            Mode::Kvm => "kvm",
        }
        .to_string(),
        ict: tools::ict_name(w.ict).to_string(),
        mic_path: w.mic_path(),
        mic_version: version,
        mic_opts: w.mic_opts.clone(),
        base_image: None,
    }
}

/// The mode `w` configures: the mode of `builder(w)`.
pub fn mode(w: &WorkerConfig) -> Mode {
    if w.use_kvm { Mode::Kvm } else { Mode::Native }
}

/// One kind of build (native, or in a KVM guest): what the stage runs for a job, what the
/// daemon's start frees and reports, and what `doctor` checks.
pub trait Builder: Send + Sync {
    /// native or kvm (recorded in the `started` event).
    fn mode(&self) -> Mode;

    /// Runs one build of `spec` in the directory `prepare` made; `cancel` (a message, or the
    /// sender dropped) stops it; every child is registered in `registry`.
    fn build(
        &self,
        spec: &Spec,
        prepared: &Prepared,
        cancel: &Receiver<()>,
        registry: &Registry,
    ) -> BuildEnd;

    /// At a daemon start, before any build: frees what builds left when the daemon died (KVM:
    /// orphaned guests, overlays, LVM snapshots; native frees those too, for a daemon whose
    /// config switched from KVM). Default: nothing.
    fn recover(&self, _registry: &Registry) {}

    /// At a daemon stop, after the builds ended: ends what the builder keeps between builds
    /// (KVM: the warm guests not taken). Default: nothing.
    fn stop(&self) {}

    /// The warm pool's figures (KVM with `vm_warm > 0`, once started). Default: None.
    fn warm(&self) -> Option<kvm::warm::Figures> {
        None
    }

    /// Why this builder cannot run on this host now, if it cannot (native: mic or sudo missing).
    /// Default: None.
    fn unavailable(&self) -> Option<String> {
        None
    }

    /// How this builder builds, as a build's provenance states it: mode, mic's path, version
    /// and options; KVM: the base image and its sha256. Asked after a successful build (of
    /// `prepared`); what costs (mic --version, hashing the base image) is done once per daemon
    /// start and cached.
    fn host_facts(&self, prepared: &Prepared) -> crate::artifacts::provenance::HostFacts;

    /// What `doctor` checks for this builder (native: mic, sudo; KVM: mic's note, sudo, the
    /// preflight, qemu, qemu-img, ssh, scp), split by where the report shows them.
    fn checks(&self) -> Checks;
}

/// A builder's checks, in the two places of `doctor`'s report they have always had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checks {
    /// The image creator and sudo as this builder runs them: reported with the configuration,
    /// before base_dir.
    pub tools: Vec<Check>,
    /// What only this kind of build needs of the host (KVM: the preflight, then qemu, qemu-img,
    /// ssh, scp): reported last, after the daemon's own checks.
    pub host: Vec<Check>,
}

/// The builder `w` configures: [`kvm::KvmBuilder`] with `use_kvm = true`, else
/// [`native::NativeBuilder`]; each holds its own copy of `w`.
pub fn builder(w: &WorkerConfig) -> Arc<dyn Builder> {
    if w.use_kvm {
        Arc::new(kvm::KvmBuilder::new(w.clone()))
    } else {
        Arc::new(native::NativeBuilder::new(w.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_of_each_mode_says_what_the_host_lacks() {
        let d = tempfile::tempdir().unwrap();
        let mut w = WorkerConfig {
            sudo: false,
            mic_path: Some(d.path().join("surely-no-such-mic")),
            ..WorkerConfig::default()
        };
        let native = builder(&w);
        assert_eq!(native.mode(), Mode::Native);
        assert!(native.unavailable().unwrap().contains("No such file"));
        std::fs::write(d.path().join("mic"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            d.path().join("mic"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        w.mic_path = Some(d.path().join("mic"));
        assert_eq!(builder(&w).unavailable(), None);
        // in KVM mode mic runs in the guest: nothing is missing on this host
        w.mic_path = Some("surely-no-such-mic".into());
        w.use_kvm = true;
        assert_eq!(builder(&w).mode(), Mode::Kvm);
        assert_eq!(builder(&w).unavailable(), None);
    }
}
