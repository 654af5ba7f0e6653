//! What a build may leave on the host, looked at from the test's side (independently of the
//! daemon's own code): loop devices whose backing file is under a directory, mounts under it,
//! processes working in it; and [`HostGuard`], which frees all of them when the test ends, even
//! when it fails, so that a test never leaves a loop device, a mount or a sleeper behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A mountinfo path with its octal escapes undone.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mount point of the host (this process's view), in mount order.
pub fn all_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

/// Every attached loop device: (`/dev/loopN`, backing file).
pub fn all_loops() -> Vec<(String, PathBuf)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            let b = b.trim_end_matches('\n').trim_end_matches(" (deleted)");
            v.push((format!("/dev/{name}"), PathBuf::from(b)));
        }
    }
    v.sort();
    v
}

pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    all_mounts()
        .into_iter()
        .filter(|m| m.starts_with(root))
        .collect()
}

pub fn loops_under(root: &Path) -> Vec<(String, PathBuf)> {
    all_loops()
        .into_iter()
        .filter(|(_, b)| b.starts_with(root))
        .collect()
}

/// Live processes whose working directory or root is under `root`.
pub fn procs_under(root: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me && super::alive(*pid))
        .filter(|pid| {
            ["cwd", "root"].iter().any(|l| {
                std::fs::read_link(format!("/proc/{pid}/{l}")).is_ok_and(|p| p.starts_with(root))
            })
        })
        .collect()
}

/// Frees, when dropped, whatever a test's builds left under `root`: its processes killed, its
/// mounts unmounted (deepest first, lazily), its loop devices detached.
pub struct HostGuard {
    pub root: PathBuf,
}

impl HostGuard {
    pub fn new(root: &Path) -> HostGuard {
        HostGuard {
            root: std::fs::canonicalize(root).unwrap(),
        }
    }

    /// What is left under the root: loop devices, mounts, processes (and the `pids` given that
    /// are still alive), as readable lines; empty when nothing is.
    pub fn leftovers(&self, pids: &[i32]) -> Vec<String> {
        let mut v: Vec<String> = loops_under(&self.root)
            .into_iter()
            .map(|(d, b)| format!("loop device {d} on {}", b.display()))
            .collect();
        v.extend(
            mounts_under(&self.root)
                .into_iter()
                .map(|m| format!("mount {}", m.display())),
        );
        v.extend(
            procs_under(&self.root)
                .into_iter()
                .map(|p| format!("process {p} working under the root")),
        );
        v.extend(
            pids.iter()
                .filter(|p| super::alive(**p))
                .map(|p| format!("process {p} alive")),
        );
        v
    }

    /// Waits (a killed process takes a moment to be reaped) until nothing is left.
    pub fn assert_clean(&self, pids: &[i32]) {
        let mut left = Vec::new();
        let clean = super::wait_for(Duration::from_secs(20), || {
            left = self.leftovers(pids);
            left.is_empty()
        });
        assert!(clean, "the build left behind: {left:#?}");
    }
}

impl Drop for HostGuard {
    fn drop(&mut self) {
        for pid in procs_under(&self.root) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let mut mounts = mounts_under(&self.root);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in mounts {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&m)
                .status();
        }
        for (dev, _) in loops_under(&self.root) {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&dev)
                .status();
        }
    }
}

/// The pids the mic fixture printed (its own, its child's, the escaped sleeper's) into a log.
pub fn fixture_all_pids(log: &str) -> Vec<i32> {
    log.lines()
        .filter_map(|l| {
            l.strip_prefix("mic-fixture pid: ")
                .or_else(|| l.strip_prefix("mic-fixture child pid: "))
                .or_else(|| l.strip_prefix("mic-fixture escaped pid: "))
        })
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}
