//! Draining a host (`drain`/`undrain`): while drained it claims nothing more — the spool's
//! claim loop leaves incoming/ to the other hosts, the AMQP intake stops taking from the farm
//! work queue (the participant queue is still moved to the farm, cancels still applied) —
//! while the builds it holds go on and are answered, and the daemon stays up.
//!
//! Invariant: the drain is a farm-level event in the log (`drained`, `undrained`), durable
//! before anything acts on it, and the sources read it through the store's fold of those
//! events, so a restart keeps it and every surface (`status`, `/healthz`, `/metrics`) says the
//! same.

use super::{Engine, EngineError, Result};
use crate::domain::{EventKind, FARM};

impl Engine {
    /// Some(reason) while this host is drained.
    pub fn drained(&self) -> Option<String> {
        self.store.drained().map(|d| d.reason)
    }

    /// Does this host take new work (not stopping, not drained)? The sources ask before they
    /// claim.
    pub fn accepting(&self) -> bool {
        !self.stopping() && self.store.drained().is_none()
    }

    /// Drains the host, for `reason`; Ok(false) when it already was, for that reason (a new
    /// reason is recorded again).
    pub fn drain(&self, reason: &str) -> Result<bool> {
        // one line, shown as is by /healthz and the log
        if reason.trim().is_empty() || reason.chars().any(char::is_control) {
            return Err(EngineError::Refused(format!(
                "a drain's reason is one line of text, not {reason:?}"
            )));
        }
        if self.drained().as_deref() == Some(reason) {
            return Ok(false);
        }
        self.store.record(
            Some(FARM),
            EventKind::Drained {
                reason: reason.to_string(),
            },
        )?;
        Ok(true)
    }

    /// Takes the host back into the farm; Ok(false) when it was not drained.
    pub fn undrain(&self) -> Result<bool> {
        if self.drained().is_none() {
            return Ok(false);
        }
        self.store.record(Some(FARM), EventKind::Undrained {})?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use crate::domain::{EventKind, FARM};
    use crate::engine::testkit::Rig;

    #[test]
    fn a_drain_is_an_event_and_survives_a_reopening() {
        let rig = Rig::new();
        assert!(rig.engine.accepting());
        assert_eq!(rig.engine.drained(), None);
        assert!(rig.engine.drain("kernel update").unwrap());
        assert!(!rig.engine.drain("kernel update").unwrap(), "already");
        for bad in ["", " ", "two\nlines", "\x1b[2J"] {
            assert!(rig.engine.drain(bad).is_err(), "{bad:?}");
        }
        assert_eq!(rig.engine.drained().as_deref(), Some("kernel update"));
        assert!(!rig.engine.accepting());
        let journal = rig.engine.store.journal().unwrap();
        assert!(journal.durable_seq() >= journal.last_seq(), "durable");
        let kinds: Vec<&str> = journal
            .farm_events()
            .unwrap()
            .iter()
            .map(|e| e.kind.name())
            .collect();
        assert_eq!(kinds, ["drained"]);
        drop(journal);
        assert!(rig.engine.undrain().unwrap());
        assert!(!rig.engine.undrain().unwrap(), "not drained");
        assert!(rig.engine.accepting());
    }

    #[test]
    fn a_reopened_store_is_still_drained() {
        use crate::engine::store::Store;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let policy = crate::config::Config::default().policy();
        let open = || Store::open(dir.path(), 8 << 20, policy, Duration::from_secs(10)).unwrap();
        {
            let store = open();
            store
                .record(Some(FARM), EventKind::Drained { reason: "a".into() })
                .unwrap();
            store.record(Some(FARM), EventKind::Undrained {}).unwrap();
            store
                .record(
                    Some(FARM),
                    EventKind::Drained {
                        reason: "disk".into(),
                    },
                )
                .unwrap();
        }
        let store = open();
        let d = store.drained().unwrap();
        assert_eq!((d.reason.as_str(), d.seq), ("disk", 3));
    }
}
