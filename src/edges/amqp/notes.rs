//! The cancels this daemon heard of on the farm exchange, remembered with an expiry, so that a
//! workitem taken from the work queue after its cancel (even after a restart of the daemon) is
//! answered cancelled and never built. Kept in the event log as farm-level events
//! (`cancel_noted {fei, expires}`: the `fei` key and when the note expires, in seconds since
//! the epoch), folded by the store (`domain::farm::Farm::cancels`). An earlier version kept
//! them in the state directory (`amqp-cancels.json`): moved into the log at the first start.
//!
//! Invariant: a cancel is recorded (flushed) before its message is acked, so a cancel the broker
//! no longer holds is remembered; expired notes are dropped from the fold and never noted.

use crate::domain::{EventKind, FARM};
use crate::engine::store::{Store, StoreError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The file of a state directory an earlier version kept the notes in.
pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join("amqp-cancels.json")
}

/// The cancels heard of, through the store.
pub struct Notes {
    store: Arc<Store>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Notes {
    /// The notes of `store`; those an earlier version kept in `amqp-cancels.json` beside the
    /// log are recorded first (the ones not expired), and the file removed once they are
    /// durable (kept, and tried again at the next start, when they cannot be recorded).
    pub fn open(store: Arc<Store>) -> Notes {
        let file = path_in(store.dir());
        match std::fs::read(&file) {
            Ok(bytes) => {
                let old: BTreeMap<String, u64> =
                    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                        log::error!(
                            "{}: not a list of cancels ({e}): its notes are dropped",
                            file.display()
                        );
                        BTreeMap::new()
                    });
                let now = now();
                let items: Vec<_> = old
                    .into_iter()
                    .filter(|(_, e)| *e > now)
                    .map(|(fei, expires)| (Some(FARM), EventKind::CancelNoted { fei, expires }))
                    .collect();
                let n = items.len();
                match store.record_batch(items) {
                    Ok(_) => match std::fs::remove_file(&file) {
                        Ok(()) => log::info!(
                            "AMQP: {n} cancel note(s) of {} moved into the event log",
                            file.display()
                        ),
                        Err(e) => log::warn!("cannot remove {}: {e}", file.display()),
                    },
                    Err(e) => log::error!(
                        "AMQP: cannot move the cancel notes of {} into the log ({e}): kept there, tried again at the next start",
                        file.display()
                    ),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::error!("cannot read {} ({e}): its notes are left", file.display()),
        }
        Notes { store }
    }

    /// Remembers a cancel until `expires`; durable when it returns (a note already there, to
    /// that expiry or later, is not recorded again).
    pub fn note(&self, key: String, expires: u64) -> Result<(), StoreError> {
        let known = self
            .store
            .with_farm(|f| f.cancels.get(&key).is_some_and(|e| *e >= expires));
        if known {
            return Ok(());
        }
        self.store
            .record(Some(FARM), EventKind::CancelNoted { fei: key, expires })?;
        Ok(())
    }

    /// Was this fei cancelled (and the cancel not expired)?
    pub fn noted(&self, key: &str) -> bool {
        self.store.with_farm(|f| f.cancel_noted(key, now()))
    }
}

/// When a cancel noted now expires, after `days`.
pub fn expiry(days: u32) -> u64 {
    now() + u64::from(days) * 86_400
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn open_store(dir: &Path) -> Arc<Store> {
        let policy = crate::config::Config::default().policy();
        Arc::new(Store::open(dir, 8 << 20, policy, Duration::from_secs(10)).unwrap())
    }

    #[test]
    fn notes_are_events_kept_across_opens_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        // a file of an earlier version: moved into the log at the first open
        std::fs::create_dir_all(dir.path()).unwrap();
        std::fs::write(
            path_in(dir.path()),
            serde_json::to_vec(&serde_json::json!({"old": 1, "kept": expiry(3)})).unwrap(),
        )
        .unwrap();
        {
            let n = Notes::open(open_store(dir.path()));
            assert!(!path_in(dir.path()).exists(), "moved");
            assert!(n.noted("kept"));
            assert!(!n.noted("old"), "expired: not moved");
            assert!(!n.noted("a"));
            let week = expiry(7);
            n.note("a".into(), week).unwrap();
            n.note("a".into(), week).unwrap();
            n.note("a".into(), week - 60).unwrap();
            n.note("gone".into(), 1).unwrap();
            assert!(n.noted("a"));
            assert!(!n.noted("gone"), "expired");
            let journal = n.store.journal().unwrap();
            let notes: Vec<String> = journal
                .farm_events()
                .unwrap()
                .into_iter()
                .filter_map(|e| match e.kind {
                    EventKind::CancelNoted { fei, .. } => Some(fei),
                    _ => None,
                })
                .collect();
            assert_eq!(notes, ["kept", "a", "gone"], "each once, durable");
            assert!(journal.durable_seq() >= journal.last_seq());
            assert!(journal.fold_all().unwrap().is_empty(), "no job");
        }
        let n = Notes::open(open_store(dir.path()));
        assert!(n.noted("a") && n.noted("kept"), "kept across opens");
        assert!(!n.noted("gone"));
    }
}
