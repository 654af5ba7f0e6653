//! The cancels this daemon heard of on the farm exchange, remembered with an expiry, so that a
//! workitem taken from the work queue after its cancel (even after a restart of the daemon) is
//! answered cancelled and never built. Kept in the state directory (`amqp-cancels.json`: each
//! cancel's `fei` key and when it expires, in seconds since the epoch).
//!
//! Invariant: a cancel is written (tmp + fsync + rename) before its message is acked, so a
//! cancel the broker no longer holds is remembered here; expired ones are dropped at each write
//! and ignored when read.

use crate::durable::{DurableError, write_atomic};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The file of a state directory the notes are kept in.
pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join("amqp-cancels.json")
}

/// The cancels heard of: fei key -> expiry (seconds since the epoch).
pub struct Notes {
    path: PathBuf,
    map: Mutex<BTreeMap<String, u64>>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Notes {
    /// The notes kept at `path` (none when it is missing; an unreadable file is logged and
    /// started afresh: what it held is lost, not the daemon).
    pub fn open(path: PathBuf) -> Notes {
        let map = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                log::error!(
                    "{}: not a list of cancels ({e}): starting with none",
                    path.display()
                );
                BTreeMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                log::error!(
                    "cannot read {} ({e}): starting with no cancels",
                    path.display()
                );
                BTreeMap::new()
            }
        };
        Notes {
            path,
            map: Mutex::new(map),
        }
    }

    /// Remembers a cancel until `expires`; durable when it returns.
    pub fn note(&self, key: String, expires: u64) -> Result<(), DurableError> {
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let now = now();
        map.retain(|_, e| *e > now);
        map.insert(key, expires);
        let bytes = serde_json::to_vec(&*map).unwrap_or_default();
        write_atomic(&self.path, &bytes, 0o600)
    }

    /// Was this fei cancelled (and the cancel not expired)?
    pub fn noted(&self, key: &str) -> bool {
        let map = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.get(key).is_some_and(|e| *e > now())
    }
}

/// When a cancel noted now expires, after `days`.
pub fn expiry(days: u32) -> u64 {
    now() + u64::from(days) * 86_400
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_kept_across_opens_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let p = path_in(dir.path());
        let n = Notes::open(p.clone());
        assert!(!n.noted("a"));
        n.note("a".into(), expiry(7)).unwrap();
        n.note("old".into(), 1).unwrap();
        assert!(n.noted("a"));
        assert!(!n.noted("old"), "expired");
        let again = Notes::open(p.clone());
        assert!(again.noted("a"), "kept");
        again.note("b".into(), expiry(1)).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(!text.contains("old"), "expired notes are dropped: {text}");
        std::fs::write(&p, b"garbage").unwrap();
        assert!(!Notes::open(p).noted("a"));
    }
}
