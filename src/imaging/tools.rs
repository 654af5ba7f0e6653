//! The host tools a build runs, as `doctor` and the daemon's start look at them: the image
//! creator (mic, or mic2 as `mic-image-creator`) and sudo. Shared by both builders (KVM mode
//! shows sudo too: its LVM commands use it).
//!
//! Invariant: a check only looks; every probe (`mic --version`, `sudo -n true`, `sudo -n -l`)
//! runs through `health::probe` with its timeout.

use crate::config::{Ict, WorkerConfig};
use crate::health::{Check, find_on_path, probe};
use std::ffi::OsString;
use std::path::Path;

/// Why mic cannot be run on this host (not found, not a file, not executable; sudo missing when
/// `sudo = true`), or None when it looks runnable.
pub fn mic_missing(w: &WorkerConfig) -> Option<String> {
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
pub fn ict_name(ict: Ict) -> &'static str {
    match ict {
        Ict::Mic => "mic",
        Ict::Mic2 => "mic2",
    }
}

/// `mic --version` runs.
pub fn check_mic(w: &WorkerConfig) -> Check {
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
pub fn check_sudo(w: &WorkerConfig, needs: &str) -> Check {
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
        w.mic_path = Some("surely-no-such-mic".into());
        assert!(mic_missing(&w).unwrap().contains("not found on PATH"));
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
