//! What a KVM build needs on this host, looked at without running or creating anything: the
//! accelerator, the base image, kernel, initrd and ssh key, img_tmp (and mic_cachedir with the
//! 9p cache). `doctor` shows every finding; a build fails with the first failure.
//!
//! Invariant: a check only looks (stat, open, access(2)); nothing here makes a file or runs a
//! program, so a build that fails here has made nothing in img_tmp.

use super::commands;
use crate::config::{VmAccel, WorkerConfig};
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

/// Is /dev/kvm usable for a guest: openable read-write, and the CPU has hardware virtualisation
/// (without vmx/svm, as in a guest without nested virtualisation, /dev/kvm may open but a KVM
/// guest never runs)?
pub fn kvm_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm read-write: {e}"))?;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")
        .map_err(|e| format!("cannot read /proc/cpuinfo: {e}"))?;
    if !commands::cpu_has_virt(&cpuinfo) {
        return Err(
            "the CPU shows no vmx or svm flag in /proc/cpuinfo (no hardware or nested \
                    virtualisation)"
                .into(),
        );
    }
    Ok(())
}

/// How a preflight finding weighs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One thing the preflight looked at: `what` is the config key or device, `detail` what was
/// found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub what: &'static str,
    pub detail: String,
}

impl Finding {
    fn new(level: Level, what: &'static str, detail: impl Into<String>) -> Finding {
        Finding {
            level,
            what,
            detail: detail.into(),
        }
    }

    /// The finding as one sentence, for a build's error: "ssh key (vm_ssh_key) /k: mode 0644...".
    pub fn message(&self) -> String {
        let label = match self.what {
            "vm_base_img" => "base image (vm_base_img)",
            "vm_kernel" => "guest kernel (vm_kernel)",
            "vm_initrd" => "guest initrd (vm_initrd)",
            "vm_ssh_key" => "ssh key (vm_ssh_key)",
            other => other,
        };
        format!("{label} {}", self.detail)
    }
}

/// Checks, without running or creating anything, what a KVM build needs on this host: the
/// accelerator, the base image, kernel, initrd and ssh key, img_tmp (and mic_cachedir with the
/// 9p cache). Shared by `doctor` and the KVM builder (which fails with the first failure).
pub fn preflight(w: &WorkerConfig) -> Vec<Finding> {
    let mut out = vec![
        kvm_verdict(w.vm_accel, kvm_usable()),
        vm_file("vm_base_img", w.vm_base_img.as_deref(), true),
        vm_file("vm_kernel", w.vm_kernel.as_deref(), true),
        vm_file("vm_initrd", w.vm_initrd.as_deref(), false),
        ssh_key(w.vm_ssh_key.as_deref()),
        dir_to_write(
            "img_tmp",
            &w.img_tmp,
            "the first KVM build creates it for its overlay images",
        ),
    ];
    if w.use_9p_cache {
        out.push(dir_to_write(
            "mic_cachedir",
            &w.mic_cachedir,
            "the first KVM build creates it",
        ));
    }
    out
}

pub fn kvm_verdict(accel: VmAccel, usable: Result<(), String>) -> Finding {
    let what = "/dev/kvm";
    match (usable, accel) {
        (Ok(()), VmAccel::Tcg) => Finding::new(
            Level::Ok,
            what,
            "usable, but vm_accel = \"tcg\" does not use it",
        ),
        (Ok(()), _) => Finding::new(
            Level::Ok,
            what,
            "usable (opens read-write, CPU has vmx/svm)",
        ),
        (Err(e), VmAccel::Kvm) => Finding::new(
            Level::Fail,
            what,
            format!(
                "is not usable: {e}; vm_accel = \"kvm\" needs it (or set vm_accel = \"auto\" or \
                 \"tcg\")"
            ),
        ),
        (Err(e), VmAccel::Auto) => Finding::new(
            Level::Warn,
            what,
            format!("{e}; vm_accel = \"auto\" falls back to tcg, much slower"),
        ),
        (Err(e), VmAccel::Tcg) => Finding::new(
            Level::Ok,
            what,
            format!("not used (vm_accel = \"tcg\"): {e}"),
        ),
    }
}

/// The configured path, or the finding that says it is unset (a failure when `required`) or
/// empty (always a failure: a build reads `vm_initrd = ""` as a path, it does not mean "unset").
fn configured<'a>(
    what: &'static str,
    p: Option<&'a Path>,
    required: bool,
) -> Result<&'a Path, Finding> {
    match p {
        None if required => Err(Finding::new(
            Level::Fail,
            what,
            "not set (needed with use_kvm = true)",
        )),
        None => Err(Finding::new(Level::Ok, what, "not set (optional)")),
        Some(p) if p.as_os_str().is_empty() => Err(Finding::new(
            Level::Fail,
            what,
            format!(
                "{what} = \"\" is an empty path, which a build tries to use; {}",
                if required {
                    "set it (needed with use_kvm = true)"
                } else {
                    "remove the key to leave it unset"
                }
            ),
        )),
        Some(p) => Ok(p),
    }
}

/// A file qemu reads: a regular file or a block device (an LVM volume for the base image).
pub fn vm_file(what: &'static str, path: Option<&Path>, required: bool) -> Finding {
    let path = match configured(what, path, required) {
        Ok(p) => p,
        Err(f) => return f,
    };
    let m = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Finding::new(Level::Fail, what, format!("{}: {e}", path.display())),
    };
    let kind = if m.is_file() {
        format!("file, {} bytes", m.len())
    } else if m.file_type().is_block_device() {
        "block device".to_string()
    } else {
        return Finding::new(
            Level::Fail,
            what,
            format!("{} is neither a file nor a block device", path.display()),
        );
    };
    match File::open(path) {
        Ok(_) => Finding::new(Level::Ok, what, format!("{} ({kind})", path.display())),
        Err(e) => Finding::new(
            Level::Fail,
            what,
            format!("{} is not readable: {e}", path.display()),
        ),
    }
}

/// ssh refuses a private key that group or others may read: mode 0600 or stricter.
pub fn key_mode_verdict(mode: u32) -> Result<(), String> {
    if mode & 0o077 == 0 {
        Ok(())
    } else {
        Err(format!(
            "mode {:04o}: group/other bits set, ssh refuses such a key",
            mode & 0o7777
        ))
    }
}

pub fn ssh_key(path: Option<&Path>) -> Finding {
    let what = "vm_ssh_key";
    let path = match configured(what, path, true) {
        Ok(p) => p,
        Err(f) => return f,
    };
    let m = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Finding::new(Level::Fail, what, format!("{}: {e}", path.display())),
    };
    if !m.is_file() {
        return Finding::new(
            Level::Fail,
            what,
            format!("{} is not a file", path.display()),
        );
    }
    let mode = m.permissions().mode();
    if let Err(e) = key_mode_verdict(mode) {
        return Finding::new(
            Level::Fail,
            what,
            format!("{}: {e}; chmod 600 {}", path.display(), path.display()),
        );
    }
    match File::open(path) {
        Ok(_) => Finding::new(
            Level::Ok,
            what,
            format!("{} (mode {:04o}, readable)", path.display(), mode & 0o7777),
        ),
        Err(e) => Finding::new(
            Level::Fail,
            what,
            format!("cannot read {}: {e}", path.display()),
        ),
    }
}

/// A directory a build creates when missing: fine when it is a writable directory, or when it
/// is missing and its nearest existing ancestor is a writable directory.
pub fn dir_to_write(what: &'static str, dir: &Path, why_missing: &str) -> Finding {
    let writable = |p: &Path| {
        nix::unistd::access(
            p,
            nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
        )
        .map_err(|e| format!("{} is not writable: {}", p.display(), e.desc()))
    };
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Finding::new(
                Level::Fail,
                what,
                format!("{} is not a directory", dir.display()),
            );
        }
        Ok(_) => {
            return match writable(dir) {
                Ok(()) => Finding::new(Level::Ok, what, format!("{} (writable)", dir.display())),
                Err(e) => Finding::new(Level::Fail, what, e),
            };
        }
        Err(_) => {}
    }
    let mut cur = dir.parent();
    while let Some(c) = cur {
        let c = if c.as_os_str().is_empty() {
            Path::new(".")
        } else {
            c
        };
        match std::fs::metadata(c) {
            Ok(m) if m.is_dir() => {
                return match writable(c) {
                    Ok(()) => Finding::new(
                        Level::Ok,
                        what,
                        format!(
                            "{} does not exist yet; {why_missing} (under {}, which is writable)",
                            dir.display(),
                            c.display()
                        ),
                    ),
                    Err(e) => Finding::new(
                        Level::Fail,
                        what,
                        format!(
                            "{} does not exist and cannot be created: {e}",
                            dir.display()
                        ),
                    ),
                };
            }
            Ok(_) => {
                return Finding::new(
                    Level::Fail,
                    what,
                    format!(
                        "{} cannot be created: {} is not a directory",
                        dir.display(),
                        c.display()
                    ),
                );
            }
            Err(_) => {}
        }
        if c == Path::new(".") {
            break;
        }
        cur = c.parent();
    }
    Finding::new(
        Level::Fail,
        what,
        format!("{} cannot be created: no existing parent", dir.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_verdicts() {
        let no = || Err("cannot open /dev/kvm read-write: No such file".to_string());
        assert_eq!(kvm_verdict(VmAccel::Kvm, Ok(())).level, Level::Ok);
        assert_eq!(kvm_verdict(VmAccel::Auto, Ok(())).level, Level::Ok);
        assert_eq!(kvm_verdict(VmAccel::Kvm, no()).level, Level::Fail);
        assert_eq!(kvm_verdict(VmAccel::Auto, no()).level, Level::Warn);
        assert_eq!(kvm_verdict(VmAccel::Tcg, no()).level, Level::Ok);
        assert!(
            kvm_verdict(VmAccel::Kvm, no())
                .message()
                .starts_with("/dev/kvm is not usable: ")
        );
    }

    #[test]
    fn ssh_key_mode() {
        assert!(key_mode_verdict(0o100600).is_ok());
        assert!(key_mode_verdict(0o100400).is_ok());
        assert!(key_mode_verdict(0o100700).is_ok());
        assert!(key_mode_verdict(0o100640).is_err());
        assert!(key_mode_verdict(0o100604).is_err());
        assert!(key_mode_verdict(0o100644).unwrap_err().contains("0644"));

        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("id");
        std::fs::write(&key, "key").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let f = ssh_key(Some(&key));
        assert_eq!(f.level, Level::Fail);
        assert!(f.detail.contains("chmod 600"), "{f:?}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(ssh_key(Some(&key)).level, Level::Ok);
        assert_eq!(ssh_key(None).level, Level::Fail);
        assert_eq!(ssh_key(Some(Path::new(""))).level, Level::Fail);
    }

    #[test]
    fn vm_files() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("vmlinuz");
        std::fs::write(&f, "k").unwrap();
        assert_eq!(vm_file("vm_kernel", Some(&f), true).level, Level::Ok);
        assert_eq!(vm_file("vm_kernel", None, true).level, Level::Fail);
        assert_eq!(vm_file("vm_initrd", None, false).level, Level::Ok);
        let c = vm_file("vm_kernel", Some(&d.path().join("nope")), true);
        assert_eq!(c.level, Level::Fail);
        assert!(
            c.message().starts_with("guest kernel (vm_kernel) "),
            "{c:?}"
        );
        assert_eq!(
            vm_file("vm_kernel", Some(d.path()), true).level,
            Level::Fail
        );
        assert_eq!(
            vm_file("vm_initrd", Some(Path::new("")), false).level,
            Level::Fail
        );
        let tmp = |p: &Path| dir_to_write("img_tmp", p, "made by a build");
        assert_eq!(tmp(d.path()).level, Level::Ok);
        assert_eq!(tmp(&d.path().join("new/deeper")).level, Level::Ok);
        assert!(!d.path().join("new").exists());
        assert_eq!(tmp(&f).level, Level::Fail);
        assert_eq!(tmp(&f.join("sub")).level, Level::Fail);
    }
}
