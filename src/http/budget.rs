//! The server's budgets: how many connections of each kind it serves at once, each kind from a
//! budget of its own, so that one kind never takes the room of another.
//!
//! - probes (`/healthz`, `/metrics`): [`PROBES`] at once;
//! - pages (the pages, the API, whole logs, everything else): `[http] max_connections`;
//! - live log streams (`/jobs/ID/log/stream`): `[http] max_streams`;
//! - connections still sending their request head (nobody knows yet what they want): at most
//!   [`Budgets::waiting_cap`]; a connection arriving past that closes the one that has waited
//!   longest, so that clients holding half-sent requests never keep a new one (a probe) out.
//!
//! Invariants:
//! - A request is counted in its kind's budget from its head until its connection ends (one
//!   request per connection): a client that reads its answer slowly holds its own kind's room,
//!   and no other.
//! - Past a budget, a request gets 503 at once with `Retry-After` (its kind's room is full);
//!   what is refused is counted per kind (`build_image_http_refused_total`).

use super::exposition::{Data, Family, Number};
use super::routes::Route;
use crate::engine::store::lock;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// Probes (`/healthz`, `/metrics`) answered at once.
pub const PROBES: usize = 8;

/// What a request is, for the budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Probe,
    Page,
    Stream,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Probe, Kind::Page, Kind::Stream];

    /// The kind of a request for `route`.
    pub fn of(route: &Route) -> Kind {
        match route {
            Route::Healthz | Route::Metrics => Kind::Probe,
            Route::JobLogStream(_) => Kind::Stream,
            _ => Kind::Page,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Probe => "probe",
            Kind::Page => "page",
            Kind::Stream => "stream",
        }
    }

    fn index(self) -> usize {
        match self {
            Kind::Probe => 0,
            Kind::Page => 1,
            Kind::Stream => 2,
        }
    }
}

/// Connections waiting for their request head, oldest first (by arrival number), each with
/// the sender that tells it to go.
struct Waiting {
    next: u64,
    queue: BTreeMap<u64, oneshot::Sender<()>>,
    /// Connections closed to make room.
    closed: u64,
}

/// The budgets of one server.
pub struct Budgets {
    rooms: [Arc<Semaphore>; 3],
    limits: [usize; 3],
    refused: [AtomicU64; 3],
    waiting_cap: usize,
    waiting: Mutex<Waiting>,
}

impl Budgets {
    /// `max_connections` pages and `max_streams` streams at once (and [`PROBES`] probes).
    pub fn new(max_connections: usize, max_streams: usize) -> Budgets {
        let limits = [PROBES, max_connections.max(1), max_streams.max(1)];
        Budgets {
            rooms: limits.map(|n| Arc::new(Semaphore::new(n))),
            limits,
            refused: std::array::from_fn(|_| AtomicU64::new(0)),
            waiting_cap: limits.iter().sum(),
            waiting: Mutex::new(Waiting {
                next: 0,
                queue: BTreeMap::new(),
                closed: 0,
            }),
        }
    }

    /// How many of `kind` are served at once.
    pub fn limit(&self, kind: Kind) -> usize {
        self.limits[kind.index()]
    }

    /// Connections that may wait for their request head at once: as many as all the
    /// budgets together.
    pub fn waiting_cap(&self) -> usize {
        self.waiting_cap
    }

    /// Room for a request of `kind`, held until the permit is dropped; None (and counted as
    /// refused) when its budget is full.
    pub fn take(&self, kind: Kind) -> Option<OwnedSemaphorePermit> {
        let permit = Arc::clone(&self.rooms[kind.index()])
            .try_acquire_owned()
            .ok();
        if permit.is_none() {
            self.refused[kind.index()].fetch_add(1, Ordering::Relaxed);
        }
        permit
    }

    /// A new connection, waiting for its request head: its number, and the receiver that
    /// fires when it must go to make room (the one waiting longest goes when the cap is
    /// reached).
    pub fn arrive(&self) -> (u64, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut w = lock(&self.waiting);
        while w.queue.len() >= self.waiting_cap {
            let Some((_, oldest)) = w.queue.pop_first() else {
                break;
            };
            let _ = oldest.send(());
            w.closed += 1;
        }
        let id = w.next;
        w.next += 1;
        w.queue.insert(id, tx);
        (id, rx)
    }

    /// Connection `id` is no longer waiting for its head (it sent it, or it ended).
    pub fn headed(&self, id: u64) {
        lock(&self.waiting).queue.remove(&id);
    }

    /// Connections waiting for their head now.
    pub fn waiting(&self) -> usize {
        lock(&self.waiting).queue.len()
    }

    /// The server's own families for `/metrics`: requests served now and refused so far by
    /// budget, and the connections closed to make room.
    pub fn families(&self) -> Vec<Family> {
        let by_kind = |f: &dyn Fn(Kind) -> u64| {
            Kind::ALL
                .iter()
                .map(|k| (vec![("budget", k.name().to_string())], f(*k)))
                .collect::<Vec<_>>()
        };
        let in_use = |k: Kind| {
            let free = self.rooms[k.index()].available_permits();
            self.limits[k.index()].saturating_sub(free) as u64
        };
        let (waiting, closed) = {
            let w = lock(&self.waiting);
            (w.queue.len() as u64, w.closed)
        };
        let mut open: Vec<_> = by_kind(&in_use)
            .into_iter()
            .map(|(l, n)| (l, Number::Int(n as i64)))
            .collect();
        open.push((
            vec![("budget", "waiting".to_string())],
            Number::Int(waiting as i64),
        ));
        vec![
            Family {
                name: "build_image_http_connections",
                help: "Connections of the web server now, by budget (probe, page, stream; waiting: still sending their request)",
                data: Data::Gauge(open),
            },
            Family {
                name: "build_image_http_refused",
                help: "Requests answered 503 because their budget was full, by budget",
                data: Data::Counter(by_kind(&|k| {
                    self.refused[k.index()].load(Ordering::Relaxed)
                })),
            },
            Family {
                name: "build_image_http_waiting_closed",
                help: "Connections closed before their request was read, to make room for a new one",
                data: Data::Counter(vec![(vec![], closed)]),
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_own_room() {
        let b = Budgets::new(2, 1);
        let pages: Vec<_> = (0..2).map(|_| b.take(Kind::Page).unwrap()).collect();
        assert!(b.take(Kind::Page).is_none(), "pages full");
        let stream = b.take(Kind::Stream).unwrap();
        assert!(b.take(Kind::Stream).is_none(), "streams full");
        let probes: Vec<_> = (0..PROBES).map(|_| b.take(Kind::Probe).unwrap()).collect();
        assert!(b.take(Kind::Probe).is_none());
        drop(pages);
        assert!(
            b.take(Kind::Page).is_some(),
            "room again once a page is over"
        );
        drop((stream, probes));
        let text = super::super::exposition::encode(
            &b.families(),
            super::super::exposition::Format::Classic,
        );
        assert!(
            text.contains("build_image_http_refused_total{budget=\"page\"} 1"),
            "{text}"
        );
        assert!(text.contains("build_image_http_refused_total{budget=\"stream\"} 1"));
    }

    #[test]
    fn the_longest_waiting_connection_makes_room() {
        let b = Budgets::new(1, 1);
        let cap = b.waiting_cap();
        assert_eq!(cap, PROBES + 2);
        let mut waiting: Vec<_> = (0..cap).map(|_| b.arrive()).collect();
        assert_eq!(b.waiting(), cap);
        // One that sent its head leaves the queue: room for one more without closing anyone.
        b.headed(waiting[3].0);
        let late = b.arrive();
        assert!(waiting.iter_mut().all(|(_, rx)| rx.try_recv().is_err()));
        // Past the cap, the oldest still waiting is told to go (not the one that headed).
        let newest = b.arrive();
        assert_eq!(waiting[0].1.try_recv(), Ok(()));
        assert!(waiting[1].1.try_recv().is_err());
        assert_eq!(b.waiting(), cap);
        drop((late, newest));
    }
}
