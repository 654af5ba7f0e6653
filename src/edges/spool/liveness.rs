//! The liveness mark: a running daemon keeps `active/<worker>/.alive` (host, pid, time)
//! refreshed, so that `requeue --worker W` on another host can tell a live worker from a dead
//! one, and removes it at a clean stop.
//!
//! Invariant: a mark refreshed within `STALE_AFTER` is alive, except one that names this host
//! and a process that is not running (dead at once); no mark is unknown.

use super::{Spool, SpoolError};
use crate::durable::{self, DurableError};
use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, SystemTime};

/// The liveness mark a running daemon keeps refreshed in its `active/<worker>/`.
/// How often a daemon refreshes its liveness mark.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// A liveness mark not refreshed for this long belongs to a dead daemon.
pub const STALE_AFTER: Duration = Duration::from_secs(60);
pub const ALIVE: &str = ".alive";

/// Is another daemon alive? See [`Spool::liveness`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// Its mark was refreshed recently; the detail says by whom and when.
    Alive(String),
    /// Its mark is stale, or names a process of this host that is not running.
    Dead(String),
    /// It keeps no mark (never started, stopped cleanly, or a version without marks).
    Unknown,
}

impl Spool {
    /// Writes or refreshes this daemon's liveness mark `active/<worker>/.alive` (host name, pid,
    /// time), for `requeue --worker` on other hosts to see that it is alive.
    pub fn heartbeat(&self) -> Result<(), SpoolError> {
        let body = format!(
            "host={}\npid={}\ntime={}\n",
            host_name(),
            std::process::id(),
            humantime::format_rfc3339_seconds(SystemTime::now())
        );
        durable::write_atomic_unsynced(&self.active.join(ALIVE), body.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Removes the liveness mark (a clean stop).
    pub fn clear_heartbeat(&self) -> Result<(), SpoolError> {
        let path = self.active.join(ALIVE);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DurableError::new("cannot remove", &path, e).into()),
        }
    }

    /// Is `worker`'s daemon alive, by its liveness mark? `Alive` when the mark was refreshed
    /// within `stale_after`, except that a mark naming this host and a process that is not
    /// running is `Dead` at once; `Dead` when it is older; `Unknown` when there is no mark.
    pub fn liveness(&self, worker: &str, stale_after: Duration) -> Liveness {
        let path = self.root.join("active").join(worker).join(ALIVE);
        let Ok(meta) = path.symlink_metadata() else {
            return Liveness::Unknown;
        };
        let mut text = String::new();
        if let Ok(f) = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(&path)
        {
            let _ = f.take(4096).read_to_string(&mut text);
        }
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::trim)
                .unwrap_or("")
                .to_string()
        };
        let (host, pid) = (field("host"), field("pid"));
        let age = meta
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .unwrap_or_default();
        let detail = format!(
            "worker {worker}: host {}, pid {}, mark refreshed {} s ago",
            if host.is_empty() { "?" } else { &host },
            if pid.is_empty() { "?" } else { &pid },
            age.as_secs()
        );
        if !host.is_empty()
            && host == host_name()
            && let Ok(pid) = pid.parse::<i32>()
            && pid > 0
            && !process_running(pid)
        {
            return Liveness::Dead(format!("{detail}; that process is not running"));
        }
        if age <= stale_after {
            Liveness::Alive(detail)
        } else {
            Liveness::Dead(format!(
                "{detail}, more than {} s ago",
                stale_after.as_secs()
            ))
        }
    }
}

/// This host's name, as the liveness mark records it.
fn host_name() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Is a process with this pid running on this host (as far as `kill(pid, 0)` tells)?
fn process_running(pid: i32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e != nix::errno::Errno::ESRCH,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_and_liveness() {
        let d = tempfile::tempdir().unwrap();
        let sp = Spool::new(d.path(), "w1");
        sp.create_dirs().unwrap();
        let hour = Duration::from_secs(3600);
        assert_eq!(sp.liveness("w1", hour), Liveness::Unknown);
        assert_eq!(sp.liveness("nobody", hour), Liveness::Unknown);
        sp.heartbeat().unwrap();
        sp.heartbeat().unwrap();
        match sp.liveness("w1", hour) {
            Liveness::Alive(detail) => {
                assert!(detail.contains(&std::process::id().to_string()), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        assert!(
            sp.active_files().unwrap().is_empty(),
            "the mark is no claimed file"
        );
        assert_eq!(
            std::fs::read_dir(&sp.active).unwrap().count(),
            1,
            "no temporary file left"
        );
        // Stale: not refreshed within stale_after.
        let mark = sp.active.join(ALIVE);
        std::fs::File::options()
            .write(true)
            .open(&mark)
            .unwrap()
            .set_modified(SystemTime::now() - 2 * hour)
            .unwrap();
        assert!(matches!(sp.liveness("w1", hour), Liveness::Dead(_)));
        assert!(matches!(sp.liveness("w1", 3 * hour), Liveness::Alive(_)));
        sp.clear_heartbeat().unwrap();
        sp.clear_heartbeat().unwrap();
        assert_eq!(sp.liveness("w1", hour), Liveness::Unknown);
    }

    #[test]
    fn a_mark_of_this_host_naming_a_gone_process_is_dead_at_once() {
        let d = tempfile::tempdir().unwrap();
        let sp = Spool::new(d.path(), "w2");
        sp.create_dirs().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        std::fs::write(
            sp.active.join(ALIVE),
            format!("host={}\npid={pid}\ntime=now\n", host_name()),
        )
        .unwrap();
        let hour = Duration::from_secs(3600);
        match sp.liveness("w2", hour) {
            Liveness::Dead(detail) => assert!(detail.contains("not running"), "{detail}"),
            other => panic!("{other:?}"),
        }
        // Another host's mark: only its age counts.
        std::fs::write(
            sp.active.join(ALIVE),
            format!("host=elsewhere.invalid\npid={pid}\n"),
        )
        .unwrap();
        assert!(matches!(sp.liveness("w2", hour), Liveness::Alive(_)));
    }
}
