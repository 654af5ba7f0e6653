//! What `doctor` checks of the spool: its folders exist and are writable (or can be created),
//! they share one filesystem (claims, answers and rejects are renames), a rename from `tmp/`
//! into `incoming/` works, and the filesystem suits the watch mode (inotify sees nothing that
//! other hosts write over NFS).
//!
//! Invariant: a check only looks; the one thing written is the rename test's hidden temp file
//! (`tmp/.doctor-<pid>.tmp`, a name the daemon ignores), removed before the check returns.

use super::Spool;
use crate::config::{Config, WatchMode};
use crate::health::{
    Check, FsKind, Status, check_fs_type, fs_kind, nearest_existing, writable_dir,
};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The spool's checks, for `doctor`.
pub fn checks(cfg: &Config) -> Vec<Check> {
    let spool = Spool::new(&cfg.spool.dir, &cfg.worker_id());
    let active_label = format!("active/{}/", spool.worker);
    let folders: Vec<(&str, &Path)> = vec![
        ("incoming/", &spool.incoming),
        ("tmp/", &spool.tmp),
        (&active_label, &spool.active),
        ("outbox/", &spool.outbox),
        ("rejected/", &spool.rejected),
        ("hosts/", &spool.hosts),
        ("control/", &spool.control),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

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
    }
}
