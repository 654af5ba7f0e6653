//! The farm-level state of this host: the fold of the events that belong to no job (job
//! number [`FARM`](super::event::FARM) in the log: `drained`, `undrained`, `cancel_noted`).
//!
//! Invariant: like a job's state, it changes only by `Farm::apply`, in seq order, so it is the
//! fold of the farm events of the log (the store folds them at its open and applies each one
//! it records). A cancel note expired at an event's time is dropped at that event (so the
//! fold is pure: it reads no clock), and one expired now is not noted (`cancel_noted`).

use super::event::{Event, EventKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A drain in force: why, since when (the `drained` event's time) and its seq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    pub reason: String,
    pub since: String,
    pub seq: u64,
}

/// What the farm-level events say now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Farm {
    /// Drained (claims nothing more), and why; None: takes work.
    pub drained: Option<Drain>,
    /// The cancels heard on the farm exchange: `fei` key -> expiry (seconds since the epoch).
    pub cancels: BTreeMap<String, u64>,
}

impl Farm {
    /// Applies one event (a job's event changes nothing here).
    pub fn apply(&mut self, ev: &Event) {
        match &ev.kind {
            EventKind::Drained { reason } => {
                self.drained = Some(Drain {
                    reason: reason.clone(),
                    since: ev.ts.clone(),
                    seq: ev.seq,
                })
            }
            EventKind::Undrained {} => self.drained = None,
            EventKind::CancelNoted { fei, expires } => {
                if let Some(at) = epoch_secs(&ev.ts) {
                    self.cancels.retain(|_, e| *e > at);
                }
                let e = self.cancels.entry(fei.clone()).or_default();
                *e = (*e).max(*expires);
            }
            _ => {}
        }
    }

    /// Is a cancel of this `fei` key noted and not expired at `now` (seconds since the epoch)?
    pub fn cancel_noted(&self, fei: &str, now: u64) -> bool {
        self.cancels.get(fei).is_some_and(|e| *e > now)
    }

    /// Folds farm events (in seq order) from empty.
    pub fn fold<'a>(events: impl IntoIterator<Item = &'a Event>) -> Farm {
        let mut farm = Farm::default();
        for ev in events {
            farm.apply(ev);
        }
        farm
    }
}

/// An event's time (RFC 3339) in seconds since the epoch.
fn epoch_secs(ts: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339_weak(ts).ok()?;
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::FARM;

    fn ev(seq: u64, kind: EventKind) -> Event {
        Event {
            seq,
            ts: format!("t{seq}"),
            job: FARM,
            kind,
        }
    }

    #[test]
    fn the_last_drain_or_undrain_wins() {
        let d = |r: &str| EventKind::Drained { reason: r.into() };
        assert_eq!(Farm::fold(&[]), Farm::default());
        let f = Farm::fold(&[ev(1, d("disk")), ev(2, d("kernel"))]);
        assert_eq!(
            f.drained,
            Some(Drain {
                reason: "kernel".into(),
                since: "t2".into(),
                seq: 2
            })
        );
        let f = Farm::fold(&[ev(1, d("disk")), ev(3, EventKind::Undrained {})]);
        assert_eq!(f.drained, None);
        // a job's event changes nothing
        let mut f = Farm::fold(&[ev(1, d("disk"))]);
        f.apply(&ev(4, EventKind::Pinned {}));
        assert_eq!(f.drained.map(|d| d.reason), Some("disk".into()));
    }

    #[test]
    fn cancel_notes_expire() {
        let note = |seq: u64, ts: &str, fei: &str, expires: u64| Event {
            seq,
            ts: ts.into(),
            job: FARM,
            kind: EventKind::CancelNoted {
                fei: fei.into(),
                expires,
            },
        };
        // 2026-01-01T00:00:00Z = 1767225600
        let t0 = 1_767_225_600;
        let f = Farm::fold(&[
            note(1, "2026-01-01T00:00:00Z", "a", t0 + 100),
            note(2, "2026-01-01T00:00:00Z", "b", t0 + 10),
            // at t0 + 50: b expired, dropped from the projection
            note(3, "2026-01-01T00:00:50Z", "c", t0 + 1000),
        ]);
        assert_eq!(f.cancels.keys().collect::<Vec<_>>(), ["a", "c"]);
        assert!(f.cancel_noted("a", t0 + 60));
        assert!(!f.cancel_noted("a", t0 + 100), "expired now");
        assert!(!f.cancel_noted("b", t0));
        assert!(!f.cancel_noted("x", t0));
        assert!(f.drained.is_none());
    }
}
