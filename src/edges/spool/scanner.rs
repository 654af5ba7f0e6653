//! The drop protocol, read from `incoming/` by repeated scans: which names are ready to be
//! claimed (stable for `min_age_ms`, by the scanner's own observation or by their mtime), which
//! are to be rejected unread (not a regular file, too big, a hard link seen long enough), and
//! which are not finished yet (hidden, `.tmp`, `.part`).
//!
//! Invariant: a scan only looks (it opens nothing); a file with several names is rejected only
//! once the scanner itself has seen it unchanged for the hard-link hold, so a writer's
//! link-then-unlink is claimed, not rejected.

use super::{SpoolError, hard_link, ignored_name, not_regular, too_big};
use crate::config::SpoolConfig;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

/// The shortest time a file with several names (link count > 1) is watched unchanged before it
/// is rejected as a hard link: a writer that cannot rename without replacing (NFS) links the file
/// into `incoming/` and then unlinks its temporary name, and another host's attribute cache may
/// show the old link count for a few seconds after that.
pub const HARD_LINK_HOLD: Duration = Duration::from_secs(10);

/// What a scan found ready in `incoming/`.
#[derive(Debug, Clone, PartialEq)]
pub enum Ready {
    /// A regular file, stable for min_age: claim it.
    File(String),
    /// Not a regular file, too big, or a hard link: reject it unread.
    Reject(String, String),
    /// A name that is not UTF-8: reject it unread with [`Spool::reject_bad_name`].
    BadName(OsString),
}

/// What the scanner keeps of a file to tell whether it changed: size, mtime, link count, ctime.
type Stamp = (u64, i64, i64, u64, i64, i64);

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    (
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.nlink(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
}

/// Watches `incoming/` by repeated scans: decides which names are ready by the drop protocol.
/// Keeps, per name, the stamp seen and when it was first seen so.
pub struct Scanner {
    seen: HashMap<OsString, (Stamp, Instant)>,
    min_age: Duration,
    hard_link_hold: Duration,
    max_bytes: u64,
}

impl Scanner {
    pub fn new(cfg: &SpoolConfig) -> Scanner {
        let min_age = Duration::from_millis(cfg.min_age_ms);
        Scanner {
            seen: HashMap::new(),
            min_age,
            hard_link_hold: min_age.max(HARD_LINK_HOLD),
            max_bytes: cfg.max_bytes,
        }
    }

    /// Sets how long a file with several names must be seen unchanged before it is rejected as
    /// a hard link (default: `min_age`, at least [`HARD_LINK_HOLD`]).
    pub fn with_hard_link_hold(mut self, hold: Duration) -> Scanner {
        self.hard_link_hold = hold;
        self
    }

    /// One pass over `incoming/`. Returns what is ready, and when the next not-yet-stable file
    /// becomes due (so the caller can look again then rather than at the next poll).
    ///
    /// A regular file is ready when its stamp is unchanged for `min_age` (by the scanner's own
    /// observation, or by its mtime). A file with several names (link count > 1) may be a writer's
    /// link-then-unlink: it is rejected only once the scanner itself has seen it unchanged for the
    /// hard-link hold (its mtime says nothing about when it was linked).
    pub fn scan(&mut self, incoming: &Path) -> Result<(Vec<Ready>, Option<Duration>), SpoolError> {
        let rd = std::fs::read_dir(incoming).map_err(|source| SpoolError::Scan {
            path: incoming.to_path_buf(),
            source,
        })?;
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut ready = Vec::new();
        let mut next_due: Option<Duration> = None;
        let mut due = |d: Duration| next_due = Some(next_due.map_or(d, |n: Duration| n.min(d)));
        let mut present = std::collections::HashSet::new();
        for entry in rd.flatten() {
            let raw = entry.file_name();
            if ignored_name(&raw.to_string_lossy()) {
                continue;
            }
            let utf8 = raw.to_str().map(str::to_string);
            let reject = |why: String| match &utf8 {
                Some(name) => Ready::Reject(name.clone(), why),
                None => Ready::BadName(raw.clone()),
            };
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if let Some(why) = not_regular(&meta.file_type()) {
                ready.push(reject(why));
                continue;
            }
            if meta.len() > self.max_bytes {
                ready.push(reject(too_big(meta.len(), self.max_bytes)));
                continue;
            }
            present.insert(raw.clone());
            let key = stamp(&meta);
            let first = match self.seen.get(&raw) {
                Some(&(k, t)) if k == key => t,
                _ => {
                    self.seen.insert(raw.clone(), (key, now));
                    now
                }
            };
            let observed = now.duration_since(first);
            if meta.nlink() > 1 {
                if observed >= self.hard_link_hold {
                    ready.push(reject(hard_link(meta.nlink())));
                } else {
                    due(self.hard_link_hold - observed);
                }
                continue;
            }
            let age = meta
                .modified()
                .ok()
                .and_then(|m| wall.duration_since(m).ok())
                .unwrap_or_default();
            if age >= self.min_age || observed >= self.min_age {
                ready.push(match utf8 {
                    Some(name) => Ready::File(name),
                    None => Ready::BadName(raw),
                });
            } else {
                due(self.min_age - observed.max(age));
            }
        }
        self.seen.retain(|n, _| present.contains(n));
        Ok((ready, next_due))
    }

    /// Forgets a name (it was claimed or rejected).
    pub fn forget(&mut self, name: impl AsRef<OsStr>) {
        self.seen.remove(name.as_ref());
    }
}

/// Opens nothing; checks a single name just announced by inotify as renamed into place. `None`
/// for a name to ignore, and for a file with several names (the next scan decides on it).
pub fn moved_in_ready(incoming: &Path, name: &str, max_bytes: u64) -> Option<Ready> {
    if ignored_name(name) {
        return None;
    }
    let meta = incoming.join(name).symlink_metadata().ok()?;
    if let Some(why) = not_regular(&meta.file_type()) {
        return Some(Ready::Reject(name.to_string(), why));
    }
    if meta.len() > max_bytes {
        return Some(Ready::Reject(
            name.to_string(),
            too_big(meta.len(), max_bytes),
        ));
    }
    if meta.nlink() > 1 {
        return None;
    }
    Some(Ready::File(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::super::tests::cfg;
    use super::*;

    #[test]
    fn scan_classifies() {
        let d = tempfile::tempdir().unwrap();
        let inc = d.path();
        std::fs::write(inc.join("ok.json"), b"{}").unwrap();
        std::fs::write(inc.join("big.json"), vec![b' '; 101]).unwrap();
        std::fs::write(inc.join("w.part"), b"{").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", inc.join("link.json")).unwrap();
        std::fs::create_dir(inc.join("dir.json")).unwrap();
        nix::unistd::mkfifo(
            &inc.join("fifo.json"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let mut s = Scanner::new(&cfg(0));
        let (mut ready, _) = s.scan(inc).unwrap();
        ready.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
        let names: Vec<String> = ready.iter().map(|r| format!("{r:?}")).collect();
        assert_eq!(ready.len(), 5, "{names:?}");
        assert!(ready.contains(&Ready::File("ok.json".into())));
        assert!(
            names
                .iter()
                .any(|n| n.contains("big.json") && n.contains("too big"))
        );
        assert!(
            names
                .iter()
                .any(|n| n.contains("link.json") && n.contains("symlink"))
        );
        assert!(
            names
                .iter()
                .any(|n| n.contains("dir.json") && n.contains("directory"))
        );
        assert!(
            names
                .iter()
                .any(|n| n.contains("fifo.json") && n.contains("fifo"))
        );
    }

    #[test]
    fn young_file_waits_for_min_age() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.json"), b"{").unwrap();
        let mut s = Scanner::new(&cfg(60_000));
        let (ready, due) = s.scan(d.path()).unwrap();
        assert!(ready.is_empty());
        assert!(due.unwrap() <= Duration::from_secs(60));
    }

    /// Scans until something is ready (or a generous deadline passes).
    fn scan_until_ready(s: &mut Scanner, dir: &Path) -> Vec<Ready> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (ready, due) = s.scan(dir).unwrap();
            if !ready.is_empty() || Instant::now() >= deadline {
                return ready;
            }
            std::thread::sleep(due.unwrap_or(Duration::from_millis(10)));
        }
    }

    #[test]
    fn hard_link_waits_then_is_rejected() {
        let d = tempfile::tempdir().unwrap();
        let inc = d.path().join("incoming");
        std::fs::create_dir(&inc).unwrap();
        std::fs::write(d.path().join("orig"), b"{}").unwrap();
        std::fs::hard_link(d.path().join("orig"), inc.join("a.json")).unwrap();
        let mut s = Scanner::new(&cfg(0)).with_hard_link_hold(Duration::from_millis(50));
        let (ready, due) = s.scan(&inc).unwrap();
        assert!(ready.is_empty(), "not at first sight: {ready:?}");
        assert!(due.is_some());
        let ready = scan_until_ready(&mut s, &inc);
        assert_eq!(ready.len(), 1);
        let Ready::Reject(name, why) = &ready[0] else {
            panic!("{ready:?}")
        };
        assert_eq!(name, "a.json");
        assert!(why.contains("hard link"), "{why}");
        assert!(moved_in_ready(&inc, "a.json", 100).is_none());
    }

    #[test]
    fn default_hard_link_hold_is_not_shorter_than_min_age() {
        let s = Scanner::new(&cfg(0));
        assert_eq!(s.hard_link_hold, HARD_LINK_HOLD);
        let s = Scanner::new(&cfg(60_000));
        assert_eq!(s.hard_link_hold, Duration::from_secs(60));
    }

    #[test]
    fn link_then_unlink_writer_is_claimed_not_rejected() {
        let d = tempfile::tempdir().unwrap();
        let inc = d.path().join("incoming");
        std::fs::create_dir(&inc).unwrap();
        let tmp = d.path().join(".a.tmp");
        std::fs::write(&tmp, b"{}").unwrap();
        std::fs::hard_link(&tmp, inc.join("a.json")).unwrap();
        let mut s = Scanner::new(&cfg(0)).with_hard_link_hold(Duration::from_secs(3600));
        assert!(s.scan(&inc).unwrap().0.is_empty());
        std::fs::remove_file(&tmp).unwrap();
        assert_eq!(s.scan(&inc).unwrap().0, vec![Ready::File("a.json".into())]);
        assert_eq!(
            moved_in_ready(&inc, "a.json", 100),
            Some(Ready::File("a.json".into()))
        );
    }
}
