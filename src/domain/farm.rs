//! The farm-level state of this host: the fold of the events that belong to no job (job
//! number [`FARM`](super::event::FARM) in the log: `drained`, `undrained`).
//!
//! Invariant: like a job's state, it changes only by `Farm::apply`, in seq order, so it is the
//! fold of the farm events of the log (the store folds them at its open and applies each one
//! it records).

use super::event::{Event, EventKind};
use serde::{Deserialize, Serialize};

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
            _ => {}
        }
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
}
