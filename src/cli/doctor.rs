//! `build-image doctor`: checks the configuration and the host, one line per check.
//!
//! Each check is a small function that returns a [`Check`] (status, what, detail: the type of
//! `crate::health`, which the builders share); [`report`] formats the list and [`exit_code`]
//! judges it. This file owns the daemon's own checks (config, base_dir, spool, state_dir, push,
//! amqp); the builder's (mic and sudo; in KVM mode the preflight, qemu, qemu-img, ssh, scp) come
//! from [`crate::imaging::Builder::checks`], in the places of the report they always had.
//!
//! Invariant: a check only looks. The one thing doctor writes is the rename test's hidden temp
//! file (`tmp/.doctor-<pid>.tmp`, a name the daemon ignores), removed before the check returns;
//! missing folders are reported, never created. Every child (`mic --version`, `sudo -n true`,
//! `qemu-img --version`, ...) runs through [`crate::health::probe`] ([`crate::process::output`]
//! with [`CHILD_TIMEOUT`]).

use crate::config::{Config, HooksConfig, WatchMode, WorkerConfig};
use crate::edges::spool::Spool;
use crate::health::{
    CHILD_TIMEOUT, Check, Status, dir_to_write, find_on_path, nearest_existing, writable_dir,
};
use nix::unistd::AccessFlags;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Runs every check, prints one line each, returns the exit code (0 ok, 1 a check failed).
pub fn run(cfg: &Config, config_path: Option<&Path>) -> i32 {
    let checks = all_checks(cfg, config_path);
    // A closed stdout (`doctor | head -1`) must not turn into a panic: the exit code still tells.
    let _ = std::io::stdout()
        .lock()
        .write_all(report(&checks).as_bytes());
    exit_code(&checks)
}

fn all_checks(cfg: &Config, config_path: Option<&Path>) -> Vec<Check> {
    let w = &cfg.worker;
    let builder = crate::imaging::builder(w).checks();
    let mut checks = vec![check_config(config_path), check_mic_opts(w)];
    checks.extend(builder.tools);
    checks.push(check_base_dir(&w.base_dir));
    checks.extend(check_spool(cfg));
    checks.extend(check_state_dir(&cfg.state_dir()));
    checks.push(check_push(&cfg.hooks));
    if let Some(c) = check_amqp(&cfg.amqp) {
        checks.push(c);
    }
    checks.extend(builder.host);
    checks
}

/// The report: one aligned line per check, then the summary line.
fn report(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        out.push_str(&format!(
            "{:<6}{}: {}\n",
            c.status.label(),
            one_line(&c.what),
            one_line(&c.detail)
        ));
    }
    let count = |s: Status| checks.iter().filter(|c| c.status == s).count();
    out.push_str(&format!(
        "{} checks: {} ok, {} warnings, {} failed\n",
        checks.len(),
        count(Status::Ok),
        count(Status::Warn),
        count(Status::Fail)
    ));
    out
}

fn exit_code(checks: &[Check]) -> i32 {
    if checks.iter().any(|c| c.status == Status::Fail) {
        1
    } else {
        0
    }
}

/// Control characters (a child's newlines, a path's tab) would break the one-line-per-check form.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// config

fn check_config(config_path: Option<&Path>) -> Check {
    match config_path {
        Some(p) => Check::ok("config", format!("{} (parsed)", p.display())),
        None => Check::ok(
            "config",
            "built-in defaults (no --config, no BUILD_IMAGE_CONFIG)",
        ),
    }
}

fn check_mic_opts(w: &WorkerConfig) -> Check {
    if w.mic_opts.is_empty() {
        Check::ok("mic_opts", "none")
    } else {
        Check::ok("mic_opts", shell_words::join(&w.mic_opts))
    }
}

// ---------------------------------------------------------------------------------------------
// directories

fn check_base_dir(dir: &Path) -> Check {
    dir_to_write("base_dir", dir, Status::Warn, "the first build creates it")
}

fn check_state_dir(dir: &Path) -> Vec<Check> {
    vec![
        dir_to_write(
            "state_dir",
            dir,
            Status::Ok,
            "the daemon creates it on start",
        ),
        check_fs_type("state_dir filesystem", dir, state_fs_verdict),
    ]
}

// ---------------------------------------------------------------------------------------------
// the spool

fn check_spool(cfg: &Config) -> Vec<Check> {
    let spool = Spool::new(&cfg.spool.dir, &cfg.worker_id());
    let active_label = format!("active/{}/", spool.worker);
    let folders: Vec<(&str, &Path)> = vec![
        ("incoming/", &spool.incoming),
        ("tmp/", &spool.tmp),
        (&active_label, &spool.active),
        ("outbox/", &spool.outbox),
        ("rejected/", &spool.rejected),
    ];
    let mut checks = vec![check_spool_folders(&spool.root, &folders)];
    let present: Vec<(&str, &Path)> = folders
        .iter()
        .copied()
        .filter(|(_, p)| p.is_dir())
        .collect();
    if present.len() >= 2 {
        checks.push(check_same_filesystem(&present));
    }
    if spool.tmp.is_dir() && spool.incoming.is_dir() {
        checks.push(check_rename(&spool.tmp, &spool.incoming));
    }
    let watch = cfg.spool.watch;
    checks.push(check_fs_type(
        "spool filesystem",
        &spool.root,
        |path, magic| spool_fs_verdict(path, magic, watch),
    ));
    checks
}

/// The spool's folders exist and are writable, or are missing and can be created (the daemon
/// creates them on start: a fresh setup). Never creates them.
fn check_spool_folders(root: &Path, folders: &[(&str, &Path)]) -> Check {
    let mut missing = Vec::new();
    let mut problems = Vec::new();
    for (_, p) in folders {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => {
                if let Err(e) = writable_dir(p) {
                    problems.push(e);
                }
            }
            Ok(_) => problems.push(format!("{} is not a directory", p.display())),
            Err(_) => match nearest_existing(p) {
                Err(file) => problems.push(format!(
                    "{} cannot be created: {} is not a directory",
                    p.display(),
                    file.display()
                )),
                Ok(ancestor) => match writable_dir(&ancestor) {
                    Ok(()) => missing.push(p.display().to_string()),
                    Err(e) => problems.push(format!(
                        "{} does not exist and cannot be created: {e}",
                        p.display()
                    )),
                },
            },
        }
    }
    if missing.is_empty() && problems.is_empty() {
        let names: Vec<&str> = folders.iter().map(|(n, _)| *n).collect();
        return Check::ok(
            "spool folders",
            format!("{} under {}", names.join(" "), root.display()),
        );
    }
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!(
            "{} will be created (the daemon creates them on start)",
            missing.join(", ")
        ));
    }
    let status = if problems.is_empty() {
        Status::Warn
    } else {
        Status::Fail
    };
    parts.extend(problems);
    Check::new(status, "spool folders", parts.join("; "))
}

/// The claim, the outbox and the reject all rename between the folders: one filesystem.
fn check_same_filesystem(folders: &[(&str, &Path)]) -> Check {
    let what = "spool same filesystem";
    let mut devs = Vec::new();
    for (name, p) in folders {
        match std::fs::metadata(p) {
            Ok(m) => devs.push((*name, *p, m.dev())),
            Err(e) => return Check::fail(what, format!("cannot stat {}: {e}", p.display())),
        }
    }
    let Some(&(first_name, first_path, first_dev)) = devs.first() else {
        return Check::ok(what, "no folders to compare");
    };
    let others: Vec<String> = devs
        .iter()
        .filter(|(_, _, d)| *d != first_dev)
        .map(|(n, p, _)| format!("{n} ({})", p.display()))
        .collect();
    if others.is_empty() {
        let names: Vec<&str> = devs.iter().map(|(n, _, _)| *n).collect();
        Check::ok(
            what,
            format!(
                "{} on one filesystem (device {first_dev:#x})",
                names.join(" ")
            ),
        )
    } else {
        Check::fail(
            what,
            format!(
                "{} not on the filesystem of {first_name} ({}): rename(2) between them fails; put all spool folders on one filesystem",
                others.join(", "),
                first_path.display()
            ),
        )
    }
}

/// Really renames a hidden temp file from tmp/ into incoming/ (the `submit` path), then
/// removes it.
fn check_rename(tmp: &Path, incoming: &Path) -> Check {
    let what = "spool rename";
    let name = format!(".doctor-{}.tmp", std::process::id());
    let from = tmp.join(&name);
    let to = incoming.join(&name);
    if let Err(e) = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&from)
    {
        return Check::fail(what, format!("cannot create {}: {e}", from.display()));
    }
    let renamed = std::fs::rename(&from, &to);
    let left = if renamed.is_ok() { &to } else { &from };
    let removed = std::fs::remove_file(left);
    match (renamed, removed) {
        (Ok(()), Ok(())) => Check::ok(
            what,
            format!("tmp/ -> incoming/ works (tested with {name}, removed)"),
        ),
        (Ok(()), Err(e)) => Check::warn(
            what,
            format!(
                "tmp/ -> incoming/ works, but the test file {} could not be removed: {e}; remove it by hand",
                to.display()
            ),
        ),
        (Err(e), removed) => {
            let mut msg = format!("cannot rename {} to {}: {e}", from.display(), to.display());
            if let Err(r) = removed {
                msg.push_str(&format!(
                    "; the test file could not be removed either ({r}): remove it by hand"
                ));
            }
            Check::fail(what, msg)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// filesystem types

/// What a filesystem type means for the spool and the event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FsKind {
    Local,
    Network,
    /// FUSE: sshfs and the like are remote, fuse-overlayfs is local; cannot tell.
    Fuse,
}

/// The name and kind of a `statfs` `f_type` magic number.
fn fs_kind(magic: u32) -> (String, FsKind) {
    let (name, kind) = match magic {
        0x6969 => ("nfs", FsKind::Network),
        0xFF53_4D42 => ("cifs", FsKind::Network),
        0xFE53_4D42 => ("smb2", FsKind::Network),
        0x517B => ("smb", FsKind::Network),
        0x5346_414F => ("afs", FsKind::Network),
        0x00C3_6400 => ("ceph", FsKind::Network),
        0x7375_7245 => ("coda", FsKind::Network),
        0x0102_1997 => ("9p", FsKind::Network),
        0x7461_636F => ("ocfs2", FsKind::Network),
        0x0116_1970 => ("gfs2", FsKind::Network),
        0x0BD0_0BD0 => ("lustre", FsKind::Network),
        0x4750_4653 => ("gpfs", FsKind::Network),
        0x564C => ("ncp", FsKind::Network),
        0x6573_5546 => ("fuse", FsKind::Fuse),
        0xEF53 => ("ext2/ext3/ext4", FsKind::Local),
        0x5846_5342 => ("xfs", FsKind::Local),
        0x9123_683E => ("btrfs", FsKind::Local),
        0x0102_1994 => ("tmpfs", FsKind::Local),
        0x794C_7630 => ("overlayfs", FsKind::Local),
        0x2FC1_2FC1 => ("zfs", FsKind::Local),
        0xF2F5_2010 => ("f2fs", FsKind::Local),
        _ => return (format!("type {magic:#x}"), FsKind::Local),
    };
    (name.to_string(), kind)
}

/// Reads the filesystem type of `path` (or of its nearest existing ancestor) and judges it.
/// `verdict` gets the path to show (saying which ancestor was looked at when `path` does not
/// exist yet) and the magic number.
fn check_fs_type(what: &str, path: &Path, verdict: impl FnOnce(&str, u32) -> Check) -> Check {
    let at = match nearest_existing(path) {
        Ok(p) => p,
        Err(file) => file,
    };
    let shown = if at == path {
        path.display().to_string()
    } else {
        format!(
            "{} (not there yet; looked at {})",
            path.display(),
            at.display()
        )
    };
    match nix::sys::statfs::statfs(&at) {
        // f_type is a 32-bit magic number, whatever the width of the C type holding it.
        Ok(st) => verdict(&shown, st.filesystem_type().0 as u64 as u32),
        Err(e) => Check::warn(
            what,
            format!(
                "cannot read the filesystem type of {}: {}",
                at.display(),
                e.desc()
            ),
        ),
    }
}

fn spool_fs_verdict(path: &str, magic: u32, watch: WatchMode) -> Check {
    let what = "spool filesystem";
    let (name, kind) = fs_kind(magic);
    match (kind, watch) {
        (FsKind::Local, _) => Check::ok(what, format!("{path} is on {name} (local)")),
        (_, WatchMode::Poll) => Check::ok(
            what,
            format!("{path} is on {name}; watch = \"poll\" suits it"),
        ),
        (_, WatchMode::Auto) => Check::warn(
            what,
            format!(
                "{path} is on {name}, {}: inotify does not see files other hosts write; set [spool] watch = \"poll\"",
                if kind == FsKind::Fuse {
                    "possibly a network filesystem"
                } else {
                    "a network filesystem"
                }
            ),
        ),
    }
}

fn state_fs_verdict(path: &str, magic: u32) -> Check {
    let what = "state_dir filesystem";
    let (name, kind) = fs_kind(magic);
    match kind {
        FsKind::Local => Check::ok(what, format!("{path} is on {name} (local)")),
        FsKind::Network => Check::fail(
            what,
            format!(
                "{path} is on {name}, a network filesystem: the sled event log must be on local disk; set [spool] state_dir to a local directory"
            ),
        ),
        FsKind::Fuse => Check::warn(
            what,
            format!(
                "{path} is on {name}, possibly a network filesystem: the sled event log must be on local disk"
            ),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// the push utility

fn check_push(hooks: &HooksConfig) -> Check {
    let what = "push";
    let Some(push) = &hooks.push else {
        return Check::ok(what, "not set: statuses are only logged");
    };
    if push.as_os_str().is_empty() {
        return Check::warn(
            what,
            "push = \"\" is set but empty: every push will fail; remove the key to only log statuses",
        );
    }
    let path = if push.components().count() == 1 && !push.is_absolute() {
        match find_on_path(push) {
            Some(p) => p,
            None => {
                return Check::fail(what, format!("{} not found on PATH", push.display()));
            }
        }
    } else {
        push.clone()
    };
    match std::fs::metadata(&path) {
        Err(e) => Check::fail(what, format!("{}: {e}", path.display())),
        Ok(m) if !m.is_file() => Check::fail(what, format!("{} is not a file", path.display())),
        Ok(m) => match nix::unistd::access(&path, AccessFlags::X_OK) {
            Ok(()) => Check::ok(what, format!("{} is executable (not run)", path.display())),
            Err(e) => Check::fail(
                what,
                format!(
                    "{} is not executable (mode {:04o}): {}",
                    path.display(),
                    m.permissions().mode() & 0o7777,
                    e.desc()
                ),
            ),
        },
    }
}

/// A bare program name looked up on PATH, as `Command` will.
/// With `[amqp] url`: the broker answers, and the queue exists or can be declared.
fn check_amqp(a: &crate::config::AmqpConfig) -> Option<Check> {
    let url = a.url.as_deref()?;
    let shown = crate::edges::amqp::config::redact(url);
    let uri = match crate::edges::amqp::config::parse_url(url) {
        Ok(u) => u,
        Err(e) => return Some(Check::fail("amqp broker", e)),
    };
    Some(
        match crate::edges::amqp::client::probe(&uri, &a.queue, CHILD_TIMEOUT) {
            Ok(detail) => Check::ok("amqp broker", format!("{shown}: {detail}")),
            Err(e) => Check::fail("amqp broker", format!("{shown}: {e}")),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn report_is_aligned_with_a_summary() {
        let checks = vec![
            Check::ok("config", "a.toml"),
            Check::warn("spool filesystem", "nfs"),
            Check::fail("mic", "/usr/bin/mic not found\nsecond line"),
        ];
        let text = report(&checks);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            vec![
                "ok    config: a.toml",
                "WARN  spool filesystem: nfs",
                "FAIL  mic: /usr/bin/mic not found second line",
                "3 checks: 1 ok, 1 warnings, 1 failed",
            ]
        );
        assert_eq!(exit_code(&checks), 1);
        assert_eq!(exit_code(&checks[..2]), 0);
        assert_eq!(report(&[]), "0 checks: 0 ok, 0 warnings, 0 failed\n");
    }

    #[test]
    fn config_and_mic_opts() {
        assert_eq!(
            check_config(Some(Path::new("/etc/b.toml"))),
            Check::ok("config", "/etc/b.toml (parsed)")
        );
        assert!(check_config(None).detail.contains("built-in defaults"));
        let mut w = WorkerConfig::default();
        assert_eq!(check_mic_opts(&w).detail, "none");
        w.mic_opts = vec!["--copy-kernel".into(), "--pack-to=a b".into()];
        assert_eq!(check_mic_opts(&w).detail, "--copy-kernel '--pack-to=a b'");
    }

    #[test]
    fn base_dir_states() {
        let d = tempfile::tempdir().unwrap();
        let c = check_base_dir(d.path());
        assert_eq!(c.status, Status::Ok, "{c:?}");

        let missing = d.path().join("a/b/images");
        let c = check_base_dir(&missing);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(!missing.parent().unwrap().exists(), "created something");

        let file = d.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let c = check_base_dir(&file.join("images"));
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(
            c.detail
                .contains(&format!("{} is not a directory", file.display())),
            "{c:?}"
        );
        let c = check_base_dir(&file);
        assert_eq!(c.status, Status::Fail, "{c:?}");
    }

    fn spool_folders(root: &Path) -> Vec<(&'static str, PathBuf)> {
        ["incoming", "tmp", "active/w1", "outbox", "rejected"]
            .iter()
            .map(|n| (*n, root.join(n)))
            .collect()
    }

    #[test]
    fn spool_folders_missing_are_named_and_not_created() {
        let d = tempfile::tempdir().unwrap();
        let folders = spool_folders(d.path());
        std::fs::create_dir_all(&folders[0].1).unwrap();
        let refs: Vec<(&str, &Path)> = folders.iter().map(|(n, p)| (*n, p.as_path())).collect();
        let c = check_spool_folders(d.path(), &refs);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        for (_, p) in &folders[1..] {
            assert!(c.detail.contains(&p.display().to_string()), "{c:?}");
            assert!(!p.exists());
        }
        assert!(c.detail.contains("will be created"));

        // a file where the spool should be: cannot be created
        let file = d.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let bad = file.join("incoming");
        let c = check_spool_folders(&file, &[("incoming/", bad.as_path())]);
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.detail.contains("cannot be created"), "{c:?}");

        for (_, p) in &folders {
            std::fs::create_dir_all(p).unwrap();
        }
        let c = check_spool_folders(d.path(), &refs);
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert_eq!(check_same_filesystem(&refs).status, Status::Ok);
    }

    #[test]
    fn different_filesystems_fail() {
        let d = tempfile::tempdir().unwrap();
        let c = check_same_filesystem(&[("incoming/", d.path()), ("outbox/", Path::new("/proc"))]);
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.detail.starts_with("outbox/ (/proc)"), "{c:?}");
    }

    #[test]
    fn rename_test_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let (tmp, incoming) = (d.path().join("tmp"), d.path().join("incoming"));
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::create_dir_all(&incoming).unwrap();
        let c = check_rename(&tmp, &incoming);
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(&incoming).unwrap().count(), 0);

        // the target folder is gone: the rename fails, the temp file is still removed
        let c = check_rename(&tmp, &d.path().join("nope"));
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    }

    #[test]
    fn filesystem_verdicts() {
        let p = "/s";
        assert_eq!(
            spool_fs_verdict(p, 0xEF53, WatchMode::Auto).status,
            Status::Ok
        );
        let c = spool_fs_verdict(p, 0x6969, WatchMode::Auto);
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.contains("nfs") && c.detail.contains("watch = \"poll\""));
        assert_eq!(
            spool_fs_verdict(p, 0x6969, WatchMode::Poll).status,
            Status::Ok
        );
        assert_eq!(
            spool_fs_verdict(p, 0xFF53_4D42, WatchMode::Auto).status,
            Status::Warn
        );
        assert_eq!(
            spool_fs_verdict(p, 0x6573_5546, WatchMode::Auto).status,
            Status::Warn
        );
        assert_eq!(state_fs_verdict(p, 0x0102_1994).status, Status::Ok);
        assert_eq!(state_fs_verdict(p, 0x6969).status, Status::Fail);
        assert_eq!(state_fs_verdict(p, 0xFE53_4D42).status, Status::Fail);
        assert_eq!(state_fs_verdict(p, 0x6573_5546).status, Status::Warn);
        assert_eq!(fs_kind(0x1234).0, "type 0x1234");
        // this host's temp dir can be read
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("not/yet");
        let c = check_fs_type("x", &missing, |shown, _| Check::ok("x", shown));
        assert_eq!(
            c.detail,
            format!(
                "{} (not there yet; looked at {})",
                missing.display(),
                d.path().display()
            )
        );
        let c = check_fs_type("x", d.path(), |shown, _| Check::ok("x", shown));
        assert_eq!(c.detail, d.path().display().to_string());
    }

    #[test]
    fn push_states() {
        let d = tempfile::tempdir().unwrap();
        let mut h = HooksConfig::default();
        assert_eq!(check_push(&h).status, Status::Ok);
        h.push = Some(PathBuf::new());
        assert_eq!(check_push(&h).status, Status::Warn);
        h.push = Some(d.path().join("nope"));
        let c = check_push(&h);
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("nope"));
        let plain = d.path().join("plain");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        h.push = Some(plain);
        let c = check_push(&h);
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("not executable (mode 0644)"), "{c:?}");
        h.push = Some(script(d.path(), "push", "exit 0"));
        assert_eq!(check_push(&h).status, Status::Ok);
        h.push = Some("sh".into());
        assert_eq!(check_push(&h).status, Status::Ok, "found on PATH");
    }
}
