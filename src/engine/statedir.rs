//! The state directory of a worker (`state/<worker>/`): made private (the log holds kickstarts
//! with password hashes), its files restricted to the owner, its high-water mark, the log
//! opened while another process may hold it for a moment, and a stuck log handle cut off its
//! files.
//!
//! Invariant: nothing in the state directory is readable by other users, and the high-water
//! mark only ever names a seq that was durable.

use crate::health::{Check, FsKind, Status, check_fs_type, dir_to_write, fs_kind};
use crate::journal::{self, Journal, JournalError};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why the state directory or its log could not be had.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("cannot prepare the state directory {path}: {source}")]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another process holds the log (the message names it when it can).
    #[error("{0}")]
    Locked(String),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

type Result<T> = std::result::Result<T, StateDirError>;

/// The file beside the log holding the highest seq known durable.
pub fn mark_path(dir: &Path) -> PathBuf {
    dir.join("log.mark")
}

pub(crate) fn read_mark(dir: &Path) -> Option<u64> {
    std::fs::read_to_string(mark_path(dir))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Creates the state directory (mode 0700: the log holds kickstarts with password hashes).
pub fn prepare_state_dir(dir: &Path) -> Result<()> {
    let err = |source| StateDirError::Prepare {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    Ok(())
}

/// Opens the log, waiting up to `patience` while another process (an operator command reading
/// the log directly) holds it. A lock held longer names its holder.
pub fn open_journal(dir: &Path, cache_bytes: u64, patience: Duration) -> Result<Journal> {
    let deadline = Instant::now() + patience;
    loop {
        match Journal::open_with_cache(dir, cache_bytes) {
            Err(JournalError::Locked(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(JournalError::Locked(p)) => {
                let holder = journal::lock_holder(&p)
                    .map(|(pid, cmd)| format!(" (held by pid {pid}: {cmd})"))
                    .unwrap_or_default();
                return Err(StateDirError::Locked(format!(
                    "the event log in {} is locked by another process{holder}: is a build-image daemon already running on this state dir?",
                    p.display()
                )));
            }
            other => return Ok(other?),
        }
    }
}

/// Points every descriptor of this process open on `path` at /dev/null (dup2), so that the
/// open file description closes: its lock is released, and whatever still holds the old
/// descriptor numbers (a sled handle stuck after a write error) reads and writes nothing real.
/// Returns how many were detached.
pub(crate) fn detach_files(path: &Path) -> usize {
    use std::os::fd::AsRawFd;
    let Ok(target) = std::fs::canonicalize(path) else {
        return 0;
    };
    let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return 0;
    };
    let mut n = 0;
    for e in std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some(fd) = e.file_name().to_str().and_then(|f| f.parse::<i32>().ok()) else {
            continue;
        };
        if std::fs::read_link(e.path()).is_ok_and(|l| l == target) {
            // SAFETY: dup2 atomically makes `fd` refer to /dev/null; `fd` stays a valid,
            // open descriptor (its owner keeps using the number), only its file changes.
            if unsafe { nix::libc::dup2(null.as_raw_fd(), fd) } >= 0 {
                n += 1;
            }
        }
    }
    n
}

/// Makes the files of the state dir readable by the owner only (the dir itself is 0700).
pub(crate) fn restrict_files(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let mode = if ft.is_dir() {
                stack.push(e.path());
                0o700
            } else if ft.is_file() {
                0o600
            } else {
                continue;
            };
            let _ = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(mode));
        }
    }
}

/// What `doctor` checks of the state directory: writable (or can be made), on local disk.
pub fn checks(dir: &Path) -> Vec<Check> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_must_be_on_local_disk() {
        let p = "/s";
        assert_eq!(state_fs_verdict(p, 0x0102_1994).status, Status::Ok);
        assert_eq!(state_fs_verdict(p, 0x6969).status, Status::Fail);
        assert_eq!(state_fs_verdict(p, 0xFE53_4D42).status, Status::Fail);
        assert_eq!(state_fs_verdict(p, 0x6573_5546).status, Status::Warn);
    }
}
