//! What a KVM build needs on this host, looked at without running or creating anything: the
//! accelerator, the base image, kernel, initrd and ssh key, img_tmp (and mic_cachedir with the
//! 9p cache). `doctor` shows every check; a build fails with the first failed one.
//!
//! Invariant: a check only looks (stat, open, access(2)); nothing here makes a file or runs a
//! program, so a build that fails here has made nothing in img_tmp.

use super::commands;
use crate::config::{VmAccel, WorkerConfig};
use crate::health::{Check, Status, dir_to_write};
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

/// A preflight check as one sentence, for a build's error: "ssh key (vm_ssh_key) /k: mode
/// 0644...".
pub fn message(c: &Check) -> String {
    let label = match c.what.as_str() {
        "vm_base_img" => "base image (vm_base_img)",
        "vm_kernel" => "guest kernel (vm_kernel)",
        "vm_initrd" => "guest initrd (vm_initrd)",
        "vm_ssh_key" => "ssh key (vm_ssh_key)",
        other => other,
    };
    format!("{label} {}", c.detail)
}

/// Checks, without running or creating anything, what a KVM build needs on this host: the
/// accelerator, the base image, kernel, initrd and ssh key, img_tmp (and mic_cachedir with the
/// 9p cache). Shared by `doctor` and the KVM builder (which fails with the first failure).
pub fn preflight(w: &WorkerConfig) -> Vec<Check> {
    let mut out = vec![
        kvm_verdict(w.vm_accel, kvm_usable()),
        vm_file("vm_base_img", w.vm_base_img.as_deref(), true),
        vm_file("vm_kernel", w.vm_kernel.as_deref(), true),
        vm_file("vm_initrd", w.vm_initrd.as_deref(), false),
        ssh_key(w.vm_ssh_key.as_deref()),
        dir_to_write(
            "img_tmp",
            &w.img_tmp,
            Status::Ok,
            "the first KVM build creates it for its overlay images",
        ),
    ];
    if w.use_9p_cache {
        out.push(dir_to_write(
            "mic_cachedir",
            &w.mic_cachedir,
            Status::Ok,
            "the first KVM build creates it",
        ));
    }
    out
}

pub fn kvm_verdict(accel: VmAccel, usable: Result<(), String>) -> Check {
    let what = "/dev/kvm";
    match (usable, accel) {
        (Ok(()), VmAccel::Tcg) => Check::ok(what, "usable, but vm_accel = \"tcg\" does not use it"),
        (Ok(()), _) => Check::ok(what, "usable (opens read-write, CPU has vmx/svm)"),
        (Err(e), VmAccel::Kvm) => Check::fail(
            what,
            format!(
                "is not usable: {e}; vm_accel = \"kvm\" needs it (or set vm_accel = \"auto\" or \
                 \"tcg\")"
            ),
        ),
        (Err(e), VmAccel::Auto) => Check::warn(
            what,
            format!("{e}; vm_accel = \"auto\" falls back to tcg, much slower"),
        ),
        (Err(e), VmAccel::Tcg) => Check::ok(what, format!("not used (vm_accel = \"tcg\"): {e}")),
    }
}

/// The configured path, or the finding that says it is unset (a failure when `required`) or
/// empty (always a failure: a build reads `vm_initrd = ""` as a path, it does not mean "unset").
fn configured<'a>(
    what: &'static str,
    p: Option<&'a Path>,
    required: bool,
) -> Result<&'a Path, Check> {
    match p {
        None if required => Err(Check::fail(what, "not set (needed with use_kvm = true)")),
        None => Err(Check::ok(what, "not set (optional)")),
        Some(p) if p.as_os_str().is_empty() => Err(Check::fail(
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
pub fn vm_file(what: &'static str, path: Option<&Path>, required: bool) -> Check {
    let path = match configured(what, path, required) {
        Ok(p) => p,
        Err(f) => return f,
    };
    let m = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Check::fail(what, format!("{}: {e}", path.display())),
    };
    let kind = if m.is_file() {
        format!("file, {} bytes", m.len())
    } else if m.file_type().is_block_device() {
        "block device".to_string()
    } else {
        return Check::fail(
            what,
            format!("{} is neither a file nor a block device", path.display()),
        );
    };
    match File::open(path) {
        Ok(_) => Check::ok(what, format!("{} ({kind})", path.display())),
        Err(e) => Check::fail(what, format!("{} is not readable: {e}", path.display())),
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

pub fn ssh_key(path: Option<&Path>) -> Check {
    let what = "vm_ssh_key";
    let path = match configured(what, path, true) {
        Ok(p) => p,
        Err(f) => return f,
    };
    let m = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Check::fail(what, format!("{}: {e}", path.display())),
    };
    if !m.is_file() {
        return Check::fail(what, format!("{} is not a file", path.display()));
    }
    let mode = m.permissions().mode();
    if let Err(e) = key_mode_verdict(mode) {
        return Check::fail(
            what,
            format!("{}: {e}; chmod 600 {}", path.display(), path.display()),
        );
    }
    match File::open(path) {
        Ok(_) => Check::ok(
            what,
            format!("{} (mode {:04o}, readable)", path.display(), mode & 0o7777),
        ),
        Err(e) => Check::fail(what, format!("cannot read {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_verdicts() {
        let no = || Err("cannot open /dev/kvm read-write: No such file".to_string());
        assert_eq!(kvm_verdict(VmAccel::Kvm, Ok(())).status, Status::Ok);
        assert_eq!(kvm_verdict(VmAccel::Auto, Ok(())).status, Status::Ok);
        assert_eq!(kvm_verdict(VmAccel::Kvm, no()).status, Status::Fail);
        assert_eq!(kvm_verdict(VmAccel::Auto, no()).status, Status::Warn);
        assert_eq!(kvm_verdict(VmAccel::Tcg, no()).status, Status::Ok);
        assert!(message(&kvm_verdict(VmAccel::Kvm, no())).starts_with("/dev/kvm is not usable: "));
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
        assert_eq!(f.status, Status::Fail);
        assert!(f.detail.contains("chmod 600"), "{f:?}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(ssh_key(Some(&key)).status, Status::Ok);
        assert_eq!(ssh_key(None).status, Status::Fail);
        assert_eq!(ssh_key(Some(Path::new(""))).status, Status::Fail);
    }

    #[test]
    fn vm_files() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("vmlinuz");
        std::fs::write(&f, "k").unwrap();
        assert_eq!(vm_file("vm_kernel", Some(&f), true).status, Status::Ok);
        assert_eq!(vm_file("vm_kernel", None, true).status, Status::Fail);
        assert_eq!(vm_file("vm_initrd", None, false).status, Status::Ok);
        let c = vm_file("vm_kernel", Some(&d.path().join("nope")), true);
        assert_eq!(c.status, Status::Fail);
        assert!(
            message(&c).starts_with("guest kernel (vm_kernel) "),
            "{c:?}"
        );
        assert_eq!(
            vm_file("vm_kernel", Some(d.path()), true).status,
            Status::Fail
        );
        assert_eq!(
            vm_file("vm_initrd", Some(Path::new("")), false).status,
            Status::Fail
        );
        let tmp = |p: &Path| dir_to_write("img_tmp", p, Status::Ok, "made by a build");
        assert_eq!(tmp(d.path()).status, Status::Ok);
        assert_eq!(tmp(&d.path().join("new/deeper")).status, Status::Ok);
        assert!(!d.path().join("new").exists());
        assert_eq!(tmp(&f).status, Status::Fail);
        assert_eq!(tmp(&f.join("sub")).status, Status::Fail);
    }
}
