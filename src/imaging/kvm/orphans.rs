//! A KVM build's files in `img_tmp`: the stem they share and its lock ([`new_stem`]), killing
//! a build's qemu ([`kill_vm`]), and freeing what builds of an earlier life of the daemon left
//! ([`recover_orphans`]).
//!
//! Invariant: a build's lock is held from before its stem's name appears until the build's
//! files are gone; only a stem whose `.lock` is free is touched (a running build, of this or
//! another daemon sharing img_tmp, holds its lock), and a pid is killed only when its command
//! line names the stem and qemu: a pid file naming another process kills nothing.

use super::absolute;
use super::commands;
use crate::config::WorkerConfig;
use crate::process::{self, Output, Registry, Run};
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// File names in `img_tmp` that belong to this program start with this.
const STEM_PREFIX: &str = "build-image-vm-";
/// The kinds of file a build keeps in `img_tmp`, by extension.
/// (`out` is no longer made; it is still cleaned up after older versions; `ctl` is a warm
/// guest's ssh control socket, docs/plan-issue-24.md.)
/// `boot` is a warm guest's own log until a build takes it.
pub(super) const STEM_EXTS: [&str; 8] = [
    "qcow2", "pid", "console", "out", "lv", "ctl", "boot", "lock",
];
/// The directories a guest keeps in `img_tmp`, by extension: `9p`, a warm guest's own 9p output
/// share (docs/plan-issue-24.md). Removed with what is in them, symlinks not followed.
pub(super) const STEM_DIRS: [&str; 1] = ["9p"];

/// A new stem in img_tmp (created when missing) for a build of `dir_id`,
/// `build-image-vm-<dir_id>-<random>`, and its `.lock`, held: locked under a hidden name, then
/// renamed, so recovery never sees it unlocked.
pub(super) fn new_stem(
    img_tmp: &Path,
    dir_id: &str,
    random: u64,
) -> Result<(PathBuf, Flock<File>), String> {
    let tmp = absolute(img_tmp);
    std::fs::create_dir_all(&tmp)
        .map_err(|e| format!("cannot create img_tmp {}: {e}", tmp.display()))?;
    let id: String = dir_id.chars().take(40).collect();
    let name = format!("{STEM_PREFIX}{id}-{:012x}", random & 0xffff_ffff_ffff);
    let stem = tmp.join(&name);
    let hidden = tmp.join(format!(".{name}.lock"));
    let file =
        File::create(&hidden).map_err(|e| format!("cannot create {}: {e}", hidden.display()))?;
    let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| format!("cannot lock {}: {e}", hidden.display()))?;
    std::fs::rename(&hidden, with_ext(&stem, "lock")).map_err(|e| {
        let _ = std::fs::remove_file(&hidden);
        format!("cannot rename {}: {e}", hidden.display())
    })?;
    Ok((stem, lock))
}

/// Kills the qemu of a build (by pid, only if its command line names the build's stem) and
/// waits a little for it to go.
pub(super) fn kill_vm(pid: i32, marker: &[u8]) -> std::io::Result<bool> {
    let killed = process::kill_pid_if(pid, |cmdline| {
        !marker.is_empty()
            && cmdline.windows(marker.len()).any(|w| w == marker)
            && cmdline.windows(4).any(|w| w == b"qemu")
    })?;
    if killed {
        crate::wait::wait_for(Duration::from_secs(10), || !crate::process::pid_alive(pid));
    }
    Ok(killed)
}

/// Finds what builds of a previous life of the daemon left in `img_tmp` (a guest still running,
/// an overlay, an LVM snapshot, pid and console files) and removes it. Only stems whose lock is
/// free are touched: a running build (of this or another daemon sharing img_tmp) holds its lock.
/// Returns the stems cleaned.
pub fn recover_orphans(w: &WorkerConfig, registry: &Registry) -> Vec<String> {
    let tmp = absolute(&w.img_tmp);
    let Ok(rd) = std::fs::read_dir(&tmp) else {
        return Vec::new();
    };
    let mut stems: Vec<String> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            if !name.starts_with(STEM_PREFIX) {
                return None;
            }
            let (stem, ext) = name.rsplit_once('.')?;
            (STEM_EXTS.contains(&ext) || STEM_DIRS.contains(&ext)).then(|| stem.to_string())
        })
        .collect();
    stems.sort();
    stems.dedup();
    let mut cleaned = Vec::new();
    for name in stems {
        let stem = tmp.join(&name);
        let lock_path = with_ext(&stem, "lock");
        let _lock = match File::open(&lock_path) {
            Ok(f) => match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(l) => Some(l),
                Err(_) => continue, // a live build holds it
            },
            Err(_) => None,
        };
        if let Some(pid) = read_pid(&with_ext(&stem, "pid")) {
            match kill_vm(pid, name.as_bytes()) {
                Ok(true) => {
                    log::warn!("recovery: killed the orphaned guest {name} (qemu pid {pid})")
                }
                Ok(false) => {}
                Err(e) => log::warn!("recovery: cannot kill qemu pid {pid} of {name}: {e}"),
            }
        }
        let mut keep_lv = false;
        if let Ok(lv) = std::fs::read(with_ext(&stem, "lv")) {
            let lv = PathBuf::from(String::from_utf8_lossy(&lv).trim().to_string());
            let ours = lv.starts_with("/dev")
                && lv.file_name().and_then(|n| n.to_str()) == Some(name.as_str());
            if ours && lv.exists() {
                let argv = commands::lvremove(w.sudo, &lv);
                let outcome = process::run(Run {
                    argv: &argv,
                    env: vec![],
                    stdin: None,
                    output: Output::Null,
                    timeout: w.timeout(),
                    cancel: None,
                    registry,
                });
                match outcome {
                    Ok(o) if o.success() => {
                        log::warn!("recovery: removed the orphaned snapshot {}", lv.display())
                    }
                    Ok(o) => {
                        keep_lv = true;
                        log::warn!(
                            "recovery: lvremove -f {} {}",
                            lv.display(),
                            o.describe(w.timeout())
                        );
                    }
                    Err(e) => {
                        keep_lv = true;
                        log::warn!("recovery: lvremove -f {}: {e}", lv.display());
                    }
                }
            }
        }
        if keep_lv {
            continue;
        }
        if with_ext(&stem, "qcow2").exists() {
            log::warn!("recovery: removing the orphaned overlay {name}.qcow2");
        }
        for ext in STEM_DIRS {
            let dir = with_ext(&stem, ext);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => log::warn!("recovery: removed the orphaned share {}", dir.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("recovery: cannot remove {}: {e}", dir.display()),
            }
        }
        for ext in STEM_EXTS {
            let _ = std::fs::remove_file(with_ext(&stem, ext));
        }
        cleaned.push(name);
    }
    cleaned
}

/// The warm guests a running daemon keeps in `img_tmp`: (up, booting) — stems
/// `build-image-vm-warm-*` whose lock is held, with and without their held connection's socket.
pub(super) fn warm_stems(img_tmp: &Path) -> (usize, usize) {
    let tmp = absolute(img_tmp);
    let (mut up, mut booting) = (0, 0);
    for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(stem) = name
            .to_str()
            .filter(|n| n.starts_with(&format!("{STEM_PREFIX}warm-")))
            .and_then(|n| n.strip_suffix(".lock"))
        else {
            continue;
        };
        let held = File::open(e.path())
            .map(|f| Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err())
            .unwrap_or(false);
        if !held {
            continue;
        }
        if with_ext(&tmp.join(stem), "ctl").exists() {
            up += 1;
        } else {
            booting += 1;
        }
    }
    (up, booting)
}

pub(super) fn with_ext(stem: &Path, ext: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_os_string();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

pub(super) fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_leaves_locked_stems_and_cleans_free_ones() {
        let d = tempfile::tempdir().unwrap();
        let w = WorkerConfig {
            img_tmp: d.path().to_path_buf(),
            sudo: false,
            ..WorkerConfig::default()
        };
        let live = d.path().join("build-image-vm-a-1");
        let dead = d.path().join("build-image-vm-b-2");
        for stem in [&live, &dead] {
            for ext in ["qcow2", "pid", "console", "lock"] {
                std::fs::write(with_ext(stem, ext), b"").unwrap();
            }
        }
        // a pid file naming a process that is not ours: never killed
        let mut sleeper = std::process::Command::new("sleep")
            .arg("302")
            .spawn()
            .unwrap();
        std::fs::write(with_ext(&dead, "pid"), sleeper.id().to_string()).unwrap();
        std::fs::write(d.path().join("unrelated.qcow2"), b"").unwrap();
        let held = Flock::lock(
            File::open(with_ext(&live, "lock")).unwrap(),
            FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        assert_eq!(
            recover_orphans(&w, &Registry::none()),
            vec!["build-image-vm-b-2".to_string()]
        );
        assert!(
            sleeper.try_wait().unwrap().is_none(),
            "a foreign pid was killed"
        );
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                "build-image-vm-a-1.console",
                "build-image-vm-a-1.lock",
                "build-image-vm-a-1.pid",
                "build-image-vm-a-1.qcow2",
                "unrelated.qcow2"
            ]
        );
        drop(held);
        assert_eq!(
            recover_orphans(&w, &Registry::none()),
            vec!["build-image-vm-a-1".to_string()]
        );
        assert_eq!(recover_orphans(&w, &Registry::none()), Vec::<String>::new());
    }

    #[test]
    fn recovery_removes_a_warm_guests_socket_and_share_but_nothing_a_symlink_leads_to() {
        let d = tempfile::tempdir().unwrap();
        let tmp = d.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let w = WorkerConfig {
            img_tmp: tmp.clone(),
            sudo: false,
            ..WorkerConfig::default()
        };
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"k").unwrap();
        let stem = tmp.join("build-image-vm-warm-00000000abcd");
        std::fs::write(with_ext(&stem, "lock"), b"").unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(with_ext(&stem, "ctl")).unwrap();
        let share = with_ext(&stem, "9p");
        std::fs::create_dir_all(share.join("7-1/sub")).unwrap();
        std::fs::write(share.join("7-1/sub/img.raw"), b"i").unwrap();
        std::os::unix::fs::symlink(&outside, share.join("7-1/out")).unwrap();
        // a share alone (its lock already gone) is found too
        let lone = tmp.join("build-image-vm-warm-00000000beef.9p");
        std::fs::create_dir(&lone).unwrap();
        assert_eq!(
            recover_orphans(&w, &Registry::none()),
            vec![
                "build-image-vm-warm-00000000abcd".to_string(),
                "build-image-vm-warm-00000000beef".to_string()
            ]
        );
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"k");
    }
}
