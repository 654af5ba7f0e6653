//! A build's processes, found however they left their process group: a cgroup v2 of their own
//! (`Cgroup`: made under the daemon's own cgroup, killed with `cgroup.kill`, so a `setsid` or
//! double-forked child goes too), or, where the host has no cgroup v2 (or it is switched off), a
//! marker in the environment that every child inherits (`ENV_MARKER`), found in `/proc`
//! (`kill_marked`).
//!
//! Invariant: the cgroup v2 mount is found in `/proc/self/mountinfo`, never assumed; only a
//! cgroup this daemon made (its path recorded by the caller) and only processes carrying the exact
//! marker value of one build are ever killed.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The environment variable every process of a build inherits: its value names the build's
/// place (unique per build attempt).
pub const ENV_MARKER: &str = "BUILD_IMAGE_PLACE";

/// A cgroup v2 directory made for one build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
}

/// Where cgroup v2 is mounted, from `/proc/self/mountinfo` (a hybrid host has it beside the v1
/// hierarchies, e.g. at /sys/fs/cgroup/unified); None when there is none.
/// Found once per process: a host does not move its cgroup v2 mount while a daemon runs.
pub fn v2_mount() -> Option<PathBuf> {
    static MOUNT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    MOUNT.get_or_init(find_v2_mount).clone()
}

fn find_v2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let point = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(unescape(point)))
    })
}

/// A mountinfo path with its octal escapes (`\040` for a space, ...) undone.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's own cgroup v2 directory (`0::/PATH` of `/proc/self/cgroup` under `mount`).
fn own_dir(mount: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let rel = rel.trim().trim_start_matches('/');
    Some(if rel.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(rel)
    })
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl Cgroup {
    /// Makes a new cgroup for a build under this daemon's own cgroup v2 (a daemon run by
    /// systemd needs `Delegate=yes` for that). None, with the reason, where the host has no
    /// cgroup v2, or it offers no `cgroup.kill` (Linux < 5.14), or the directory cannot be made.
    pub fn create(label: &str) -> Result<Cgroup, String> {
        let mount = v2_mount().ok_or("no cgroup v2 is mounted (/proc/self/mountinfo)")?;
        let parent = own_dir(&mount).ok_or("this process has no cgroup v2 (/proc/self/cgroup)")?;
        let label: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        let name = format!(
            "build-image-{}-{}-{label}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = parent.join(name);
        std::fs::create_dir(&path)
            .map_err(|e| format!("cannot make cgroup {}: {e}", path.display()))?;
        let cg = Cgroup { path };
        if !cg.path.join("cgroup.kill").exists() {
            let _ = std::fs::remove_dir(&cg.path);
            return Err(format!(
                "cgroup v2 at {} has no cgroup.kill (Linux 5.14 or later needed)",
                mount.display()
            ));
        }
        Ok(cg)
    }

    /// Is `path` a cgroup [`Cgroup::create`] makes: a `build-image-*` directory right under
    /// this process's own cgroup v2?
    pub fn is_ours(path: &Path) -> bool {
        let Some(parent) = v2_mount().and_then(|m| own_dir(&m)) else {
            return false;
        };
        path.parent() == Some(parent.as_path())
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("build-image-") && !n.contains(".."))
    }

    /// The cgroup at `path` (one recorded earlier, e.g. by a daemon that crashed).
    pub fn at(path: PathBuf) -> Cgroup {
        Cgroup { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `cgroup.procs`, opened for a child to write itself into before it runs its program.
    pub fn procs(&self) -> std::io::Result<File> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
    }

    /// The pids in the cgroup now.
    pub fn members(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Kills every process in the cgroup (`cgroup.kill`), waits up to `wait` until it is empty,
    /// and removes it. Returns how many processes it held; Err says what is left and why. A
    /// cgroup that is already gone is Ok(0).
    pub fn kill_and_remove(&self, wait: Duration) -> Result<usize, String> {
        if !self.path.exists() {
            return Ok(0);
        }
        let held = self.members().len();
        if held > 0 {
            let written = std::fs::OpenOptions::new()
                .write(true)
                .open(self.path.join("cgroup.kill"))
                .and_then(|mut f| f.write_all(b"1"));
            if let Err(e) = written {
                return Err(format!(
                    "cannot write {}/cgroup.kill: {e}",
                    self.path.display()
                ));
            }
        }
        let empty = crate::wait::wait_for(wait, || self.members().is_empty());
        if !empty {
            return Err(format!(
                "processes {:?} still in cgroup {} after cgroup.kill",
                self.members(),
                self.path.display()
            ));
        }
        // rmdir succeeds once the last member is reaped by whoever is its parent
        let mut last = None;
        let removed = crate::wait::wait_for(wait, || match std::fs::remove_dir(&self.path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                last = Some(e);
                false
            }
        });
        if !removed {
            return Err(format!(
                "cannot remove cgroup {}: {}",
                self.path.display(),
                last.map(|e| e.to_string()).unwrap_or_default()
            ));
        }
        Ok(held)
    }
}

/// Removes the empty `build-image-PID-*` cgroups under this process's own cgroup v2 whose daemon
/// (PID) is gone: what a daemon that was SIGKILLed and never started again leaves (a build's
/// cgroup that still holds processes is freed by the release of that daemon's crashed builds, from
/// the job's record, and is left alone here, as is every cgroup of a daemon that is alive, another
/// worker on this host included). Returns the cgroups removed.
pub fn sweep_strays() -> Vec<PathBuf> {
    let Some(parent) = v2_mount().and_then(|m| own_dir(&m)) else {
        return Vec::new();
    };
    let Ok(rd) = std::fs::read_dir(&parent) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.path())
        .filter(|p| stray_daemon(p).is_some_and(|pid| !super::pid_alive(pid)))
        .filter(|p| Cgroup::at(p.clone()).members().is_empty())
        // rmdir of a cgroup fails (EBUSY) if a process entered it since: then it is not a stray
        .filter(|p| std::fs::remove_dir(p).is_ok())
        .collect()
}

/// The daemon's pid in a cgroup name [`Cgroup::create`] makes (`build-image-PID-N-label`).
fn stray_daemon(path: &Path) -> Option<i32> {
    let name = path.file_name()?.to_str()?;
    let pid = name.strip_prefix("build-image-")?.split('-').next()?;
    pid.parse().ok().filter(|pid| *pid > 0)
}

/// The live processes whose environment holds `ENV_MARKER=value` exactly.
pub fn marked(value: &str) -> Vec<i32> {
    let needle = format!("{ENV_MARKER}={value}");
    let needle = needle.as_bytes();
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me && super::pid_alive(*pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == needle))
        })
        .collect()
}

/// Kills (SIGKILL) every process marked with `value`, again until none is left or `wait` has
/// passed (a process may fork while it is being killed). Returns the pids killed; Err names those
/// still alive.
pub fn kill_marked(value: &str, wait: Duration) -> Result<Vec<i32>, String> {
    let mut killed = Vec::new();
    let gone = crate::wait::wait_for(wait, || {
        let now = marked(value);
        for pid in &now {
            if kill(Pid::from_raw(*pid), Signal::SIGKILL).is_ok() && !killed.contains(pid) {
                killed.push(*pid);
            }
        }
        now.is_empty()
    });
    if gone {
        Ok(killed)
    } else {
        Err(format!(
            "processes {:?} marked {ENV_MARKER}={value} survive SIGKILL",
            marked(value)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b/c\134d"), "/a b/c\\d");
        assert_eq!(unescape(r"/plain\04"), r"/plain\04");
    }

    #[test]
    fn a_marked_double_forked_child_is_found_and_killed() {
        let value = format!("test-{}-marker", std::process::id());
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "(setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {})",
            pidfile.display()
        );
        let st = std::process::Command::new("sh")
            .args(["-c", &script])
            .env(ENV_MARKER, &value)
            .status()
            .unwrap();
        assert!(st.success());
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(crate::wait::wait_for(Duration::from_secs(10), || marked(
            &value
        )
        .contains(&pid)));
        assert!(marked("some-other-build").is_empty() || !marked("x").contains(&pid));
        let killed = kill_marked(&value, Duration::from_secs(10)).unwrap();
        assert!(killed.contains(&pid), "{killed:?}");
        assert!(!super::super::pid_alive(pid));
    }

    #[test]
    fn the_daemon_of_a_cgroup_is_read_from_its_name() {
        assert_eq!(
            stray_daemon(Path::new("/c/build-image-3762-6-tort-041-1")),
            Some(3762)
        );
        assert_eq!(stray_daemon(Path::new("/c/build-image-x-1")), None);
        assert_eq!(stray_daemon(Path::new("/c/build-image-0-1")), None);
        assert_eq!(stray_daemon(Path::new("/c/other-3762-1")), None);
    }

    #[test]
    fn empty_cgroups_of_a_dead_daemon_are_swept_and_a_live_ones_kept() {
        let mine = match Cgroup::create("sweep-test") {
            Ok(cg) => cg,
            Err(why) => {
                assert!(std::env::var_os("CI").is_none(), "{why}");
                eprintln!("SKIPPED: {why}");
                return;
            }
        };
        // a pid that is gone: a child that ran and was reaped
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let parent = mine.path().parent().unwrap().to_path_buf();
        let stray = parent.join(format!("build-image-{dead}-0-sweep-test"));
        std::fs::create_dir(&stray).unwrap();
        let swept = sweep_strays();
        let stray_left = stray.exists();
        if stray_left {
            let _ = std::fs::remove_dir(&stray);
        }
        assert!(mine.path().exists(), "a live daemon's cgroup is kept");
        assert_eq!(mine.kill_and_remove(Duration::from_secs(5)), Ok(0));
        assert!(swept.contains(&stray), "{swept:?}");
        assert!(!stray_left);
    }

    #[test]
    fn a_cgroup_kill_takes_an_escaped_child_too() {
        let cg = match Cgroup::create("unit-test") {
            Ok(cg) => cg,
            Err(why) => {
                assert!(std::env::var_os("CI").is_none(), "{why}");
                eprintln!("SKIPPED: {why}");
                return;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "echo $$ > {p}.self; (setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {p})",
            p = pidfile.display()
        );
        let procs = cg.procs().unwrap();
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", &script]);
        super::super::enter_before_exec(&mut cmd, &procs);
        assert!(cmd.status().unwrap().success());
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(cg.members().contains(&pid), "{:?}", cg.members());
        assert!(Cgroup::is_ours(cg.path()));
        assert!(!Cgroup::is_ours(cg.path().parent().unwrap()));
        assert!(!Cgroup::is_ours(Path::new("/sys/fs/cgroup/build-image-x")));
        assert_eq!(cg.kill_and_remove(Duration::from_secs(10)), Ok(1));
        assert!(!super::super::pid_alive(pid));
        assert!(!cg.path().exists());
        assert_eq!(cg.kill_and_remove(Duration::from_secs(1)), Ok(0));
    }
}
