//! Native mode ([`NativeBuilder`]): mic runs on this host, in its own process group, output into
//! the job log; what it needs of the host (mic, sudo) is checked by [`super::tools`].
//!
//! Invariant: a build's result is what mic really did: its exit status, and an image file that
//! this attempt wrote ([`Prepared::new_image`]); a failure's error is mic's own error lines (not
//! the command line, which stays in the job log) or the daemon's reason (a timeout, a signal); a
//! cancel kills mic's whole process group.

use super::joblog::{OutputTail, failure};
use super::tools::{check_mic, check_sudo, mic_missing};
use super::{BuildEnd, Builder, Checks, Prepared, failure_of, mic, planned_urls};
use crate::config::WorkerConfig;
use crate::domain::workitem::Spec;
use crate::domain::{Failure, Mode};
use crate::process::{self, Output, Registry, Run};
use crossbeam_channel::Receiver;

/// Builds with mic on this host.
pub struct NativeBuilder {
    w: WorkerConfig,
    /// What `mic --version` printed, asked once (None when it could not be asked).
    version: std::sync::OnceLock<Option<String>>,
}

impl NativeBuilder {
    pub fn new(w: WorkerConfig) -> NativeBuilder {
        NativeBuilder {
            w,
            version: std::sync::OnceLock::new(),
        }
    }
}

impl Builder for NativeBuilder {
    fn mode(&self) -> Mode {
        Mode::Native
    }

    fn build(
        &self,
        spec: &Spec,
        prepared: &Prepared,
        cancel: &Receiver<()>,
        registry: &Registry,
    ) -> BuildEnd {
        run(&self.w, spec, prepared, cancel, registry)
    }

    /// A daemon that ran in KVM mode before (its config switched since) may have left a guest
    /// running and an overlay or LVM snapshot in img_tmp: freed all the same, as a KVM start
    /// frees them.
    fn recover(&self, registry: &Registry) {
        super::kvm::recover_orphans(&self.w, registry);
    }

    fn host_facts(&self, _prepared: &Prepared) -> crate::artifacts::provenance::HostFacts {
        let version = self.version.get_or_init(|| {
            let argv = [self.w.mic_path().into_os_string(), "--version".into()];
            crate::health::probe(&argv)
                .map_err(|e| log::warn!("provenance: cannot ask mic its version: {e}"))
                .ok()
        });
        super::mic_facts(&self.w, version.clone())
    }

    fn unavailable(&self) -> Option<String> {
        mic_missing(&self.w)
    }

    fn checks(&self) -> Checks {
        let needs = format!("mic runs as `sudo -n {}`", self.w.mic_path().display());
        Checks {
            tools: vec![check_mic(&self.w), check_sudo(&self.w, &needs)],
            host: Vec::new(),
        }
    }
}

/// Runs mic for `spec` in the job directory `prepare` made; `cancel` stops it.
fn run(
    w: &WorkerConfig,
    spec: &Spec,
    prepared: &Prepared,
    cancel: &Receiver<()>,
    registry: &Registry,
) -> BuildEnd {
    let urls = planned_urls(w, spec);
    // The job directory, the kickstart and the log were made by `super::prepare`.
    let dir = prepared.dir();
    let log = prepared.log();
    let mut argv = mic::mic_command(spec, prepared.ks(), dir, w);
    if w.ict == crate::config::Ict::Mic {
        // mic's own temp dir (its mounts, its loop images) in the build's place
        match prepared.place().mic_config(&argv) {
            Ok(Some(opt)) => {
                let at = argv.len() - spec.extra_opts.len() - w.mic_opts.len();
                argv.insert(at, opt.into());
            }
            Ok(None) => {
                let _ = log
                    .line("mic's config is named on its command line: its tmpdir is used as it is");
            }
            Err(e) => {
                return BuildEnd::failed(
                    format!("cannot write the build's mic config: {e}"),
                    urls,
                    Failure::Infrastructure,
                );
            }
        }
    }
    if let Err(e) = log.line(&format!("$ {}", mic::display(&argv))) {
        return BuildEnd::failed(
            format!("cannot write job log {}: {e}", log.path().display()),
            urls,
            Failure::Infrastructure,
        );
    }
    let output = OutputTail::new();
    let place = prepared.place();
    let outcome = process::run_with(
        Run {
            argv: &argv,
            env: place.env(),
            stdin: None,
            output: Output::Sink(log.sink_keeping(&output)),
            timeout: w.timeout(),
            cancel: Some(cancel),
            registry,
        },
        process::With {
            procs: place.procs(),
            stall: w.stall_timeout(),
            private_mounts: place.private_mounts(),
        },
    );
    let tool = argv
        .iter()
        .find(|a| *a != "sudo" && *a != "-n")
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            let _ = log.line(&format!("error: {e}"));
            return BuildEnd::failed(e.to_string(), urls, Failure::Infrastructure);
        }
    };
    let how = format!("{tool} {}", outcome.describe(w.timeout()));
    let _ = log.line(&how);
    if outcome == process::Outcome::Cancelled {
        return BuildEnd::Cancelled;
    }
    if !outcome.success() {
        // mic's own error lines say the cause; a timeout, a signal or a full disk is the cause
        // itself.
        let (class, why) = failure_of(outcome, dir);
        let reason_first = outcome.exit_code().is_none() || !why.is_empty();
        return BuildEnd::failed(
            failure(&format!("{how}{why}"), &output.text(), reason_first),
            urls,
            class,
        );
    }
    match prepared.new_image() {
        Some(image) => match prepared.seal(&image) {
            Ok(sealed) => BuildEnd::built(w, sealed, urls),
            Err(e) => {
                let _ = log.line(&format!("error: {e}"));
                BuildEnd::failed(e, urls, Failure::Infrastructure)
            }
        },
        None => BuildEnd::failed(
            format!(
                "{tool} exited 0 but left no image file (none new or changed under {})",
                dir.display()
            ),
            urls,
            failure_of(process::Outcome::Exited(0), dir).0,
        ),
    }
}
