//! Native mode ([`NativeBuilder`]): mic runs on this host, in its own process group, output into
//! the job log; and what `doctor` and the daemon's start check of this host for it (mic and
//! sudo, also shown in KVM mode: `check_sudo`, `ict_name`).
//!
//! Invariant: a build's result is what mic really did: its exit status, and an image file that
//! this attempt wrote ([`Prepared::new_image`]); a cancel kills mic's whole process group.

use super::{BuildEnd, Builder, Checks, Prepared, mic, planned_urls, url_for};
use crate::config::{Ict, WorkerConfig};
use crate::domain::Mode;
use crate::domain::workitem::Spec;
use crate::health::{Check, find_on_path, probe};
use crate::process::{self, Output, Registry, Run};
use crossbeam_channel::Receiver;
use std::ffi::OsString;
use std::path::Path;

/// Builds with mic on this host.
pub struct NativeBuilder {
    w: WorkerConfig,
}

impl NativeBuilder {
    pub fn new(w: WorkerConfig) -> NativeBuilder {
        NativeBuilder { w }
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
    let mut urls = planned_urls(w, spec);
    // The job directory, the kickstart and the log were made by `super::prepare`.
    let dir = prepared.dir();
    let log = prepared.log();
    let argv = mic::mic_command(spec, prepared.ks(), dir, w);
    if let Err(e) = log.line(&format!("$ {}", mic::display(&argv))) {
        return BuildEnd::failed(
            format!("cannot write job log {}: {e}", log.path().display()),
            urls,
        );
    }
    let outcome = process::run(Run {
        argv: &argv,
        env: vec![],
        stdin: None,
        output: Output::Sink(log.sink()),
        timeout: w.timeout(),
        cancel: Some(cancel),
        registry,
    });
    let tool = argv
        .iter()
        .find(|a| *a != "sudo" && *a != "-n")
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            let _ = log.line(&format!("error: {e}"));
            return BuildEnd::failed(e.to_string(), urls);
        }
    };
    let tail = if outcome.success() {
        String::new()
    } else {
        log.tail(3)
    };
    let _ = log.line(&format!("{tool} {}", outcome.describe(w.timeout())));
    if outcome == process::Outcome::Cancelled {
        return BuildEnd::Cancelled;
    }
    if !outcome.success() {
        return BuildEnd::failed(
            format!(
                "{tool} {}; last output: {tail}",
                outcome.describe(w.timeout())
            ),
            urls,
        );
    }
    match prepared.new_image() {
        Some(image) => {
            urls.image_url = url_for(w, &image);
            BuildEnd::Finished {
                result: true,
                error: None,
                urls,
            }
        }
        None => BuildEnd::failed(
            format!(
                "{tool} exited 0 but left no image file (none new or changed under {})",
                dir.display()
            ),
            urls,
        ),
    }
}

/// Why mic cannot be run on this host (not found, not a file, not executable; sudo missing when
/// `sudo = true`), or None when it looks runnable.
fn mic_missing(w: &WorkerConfig) -> Option<String> {
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

/// The image creator's name, as `doctor` labels its line.
pub(super) fn ict_name(ict: Ict) -> &'static str {
    match ict {
        Ict::Mic => "mic",
        Ict::Mic2 => "mic2",
    }
}

/// `mic --version` runs.
fn check_mic(w: &WorkerConfig) -> Check {
    let what = ict_name(w.ict);
    let mic = w.mic_path();
    let argv = [mic.clone().into_os_string(), OsString::from("--version")];
    match probe(&argv) {
        Ok(line) if line.is_empty() => Check::ok(what, format!("{} runs", mic.display())),
        Ok(line) => Check::ok(what, format!("{}: {line}", mic.display())),
        Err(e) => Check::fail(what, e),
    }
}

/// With `sudo = true`: sudo runs without a password (or at least mic through it); `needs` says
/// what runs through it, in the failure (also the KVM builder's: its LVM commands use sudo).
pub(super) fn check_sudo(w: &WorkerConfig, needs: &str) -> Check {
    if !w.sudo {
        return Check::ok("sudo", "not used (sudo = false)");
    }
    if find_on_path(Path::new("sudo")).is_none() {
        return Check::fail(
            "sudo",
            "sudo not found on PATH (sudo = true): install it, or set sudo = false",
        );
    }
    let argv = [OsString::from("sudo"), "-n".into(), "true".into()];
    let err = match probe(&argv) {
        Ok(_) => return Check::ok("sudo", "`sudo -n true` works"),
        Err(e) => e,
    };
    // A sudoers rule may allow mic alone without a password: ask sudo (it runs nothing).
    let mic = w.mic_path();
    let list = [
        OsString::from("sudo"),
        "-n".into(),
        "-l".into(),
        mic.clone().into_os_string(),
    ];
    if probe(&list).is_ok() {
        return Check::ok(
            "sudo",
            format!(
                "`sudo -n {}` is allowed (`sudo -n true` is not)",
                mic.display()
            ),
        );
    }
    Check::fail(
        "sudo",
        format!(
            "{err}; {needs}: allow it without a password (NOPASSWD in sudoers) or set sudo = false"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Status;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

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
        assert_eq!(NativeBuilder::new(w.clone()).unavailable(), None);
        w.mic_path = Some("surely-no-such-mic".into());
        assert!(mic_missing(&w).unwrap().contains("not found on PATH"));
        assert!(
            super::super::builder(&w)
                .unavailable()
                .unwrap()
                .contains("not found on PATH")
        );
        // in KVM mode mic runs in the guest: nothing is missing on this host
        w.use_kvm = true;
        assert_eq!(super::super::builder(&w).unavailable(), None);
    }

    #[test]
    fn mic_is_run_with_version() {
        let d = tempfile::tempdir().unwrap();
        let mut w = WorkerConfig {
            mic_path: Some(script(d.path(), "mic", "echo \"mic 1.2.3\"; exit 0")),
            use_kvm: false,
            ..WorkerConfig::default()
        };
        let c = check_mic(&w);
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(c.detail.ends_with(": mic 1.2.3"), "{c:?}");

        w.mic_path = Some(script(d.path(), "bad", "echo usage >&2; exit 2"));
        let c = check_mic(&w);
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.detail.contains("exited with status 2: usage"), "{c:?}");

        w.mic_path = Some(d.path().join("nope"));
        let c = check_mic(&w);
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("nope not found"), "{c:?}");
        // (the KVM builder's mic line: `kvm::tests::mic_is_not_run_on_the_host`)
    }

    #[test]
    fn sudo_not_used() {
        let w = WorkerConfig {
            sudo: false,
            ..WorkerConfig::default()
        };
        assert_eq!(
            check_sudo(&w, "mic runs as `sudo -n mic`").status,
            Status::Ok
        );
    }
}
