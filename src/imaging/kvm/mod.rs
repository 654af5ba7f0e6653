//! KVM mode: each build runs mic inside a throw-away guest booted from an overlay of a base image
//! (REFERENCE.md "KVM mode", steps 1-8). `commands` builds the command lines, `preflight` checks
//! the host before anything is made, `sequence` runs the guest's steps (each command through
//! `process::run` with the per-command timeout, each command and its output in the job log),
//! `orphans` frees what a killed daemon left; this module runs one build and says how it ended.
//!
//! Invariant: whatever happens (failure, timeout, cancel), a build that started a guest or made
//! an overlay stops the guest and removes the overlay before it returns; what a killed daemon
//! left behind is found by `recover_orphans` on the next start. A build's files in `img_tmp` share
//! one stem, `build-image-vm-<dir_id>-<random>`; its `.lock` file is flock'ed for the build's
//! whole life, so a stem whose lock is free belongs to no running build.

pub mod commands;
mod orphans;
mod preflight;
mod sequence;

pub use orphans::recover_orphans;
pub use preflight::{
    key_mode_verdict, kvm_usable, kvm_verdict, message, preflight, ssh_key, vm_file,
};

use super::{BuildEnd, Prepared, planned_urls, url_for};
use crate::config::WorkerConfig;
use crate::process::Registry;
use crate::workitem::Spec;
use crossbeam_channel::Receiver;
use sequence::{Guest, Stop};
use std::path::{Path, PathBuf};

/// Runs a KVM-mode build of `spec` in the job directory `prepare` made; `cancel` stops it (the
/// guest is still cleaned up).
pub fn build(
    w: &WorkerConfig,
    spec: &Spec,
    prepared: &Prepared,
    cancel: &Receiver<()>,
    registry: &Registry,
) -> BuildEnd {
    let mut urls = planned_urls(w, spec);
    let mut b = Guest::new(w, spec, prepared, cancel, registry);
    let run = b.run();
    b.teardown();
    match run {
        Ok(image) => {
            urls.image_url = url_for(w, &image);
            BuildEnd::Finished {
                result: true,
                error: None,
                urls,
            }
        }
        Err(Stop::Cancelled) => {
            b.note("build cancelled");
            BuildEnd::Cancelled
        }
        Err(Stop::Failed(error)) => {
            b.note(&format!("error: {error}"));
            BuildEnd::failed(error, urls)
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
