//! The farm's hosts (issue 22, "Several hosts, one farm"): each daemon keeps a record of itself
//! ([`HostRecord`]: worker id, host name, version, pid, state, build slots, running jobs, queue,
//! heartbeat) where the farm can read it: `hosts/<worker>.json` in the spool, and, with AMQP, on
//! the farm's fanout exchange, whose records every daemon keeps in memory ([`Board`]).
//! `build-image hosts` and the status page list them ([`shown`]); a record whose heartbeat is
//! older than [`GONE_AFTER`] of its writer's intervals is **gone**, shown with the jobs it held.
//!
//! Invariant: what a host is shown as is a pure function of its last record and the time
//! ([`HostRecord::shown_state`]); a clean stop writes `stopped`, so only a host that died (or
//! lost its way to the farm) is ever gone.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// A record not refreshed for this many of its writer's intervals is gone.
pub const GONE_AFTER: u32 = 3;

/// The AMQP message type (`type` property) of a host record on the farm exchange.
pub const MESSAGE_TYPE: &str = "build-image.host";

/// What a host says it is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Claiming and building.
    Running,
    /// Drained (`build-image drain`): running builds finish, nothing more is claimed.
    Draining,
    /// Stopping: running builds get their grace, nothing more is claimed.
    Stopping,
    /// Stopped cleanly (its last record).
    Stopped,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Running => "running",
            HostState::Draining => "draining",
            HostState::Stopping => "stopping",
            HostState::Stopped => "stopped",
        }
    }
}

/// A job a host is building.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningJob {
    /// The job number (in that host's log).
    pub job: u64,
    pub image_id: String,
    /// When its build started (RFC 3339).
    #[serde(default)]
    pub since: Option<String>,
}

/// Build slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slots {
    pub total: usize,
    pub free: usize,
}

/// One host's record of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub worker: String,
    pub hostname: String,
    pub version: String,
    pub pid: u32,
    pub state: HostState,
    /// Why it is drained, while it is.
    #[serde(default)]
    pub drained: Option<String>,
    pub slots: Slots,
    pub running: Vec<RunningJob>,
    /// Jobs queued on it, waiting for a slot.
    pub queued: usize,
    /// When it wrote this record (RFC 3339, milliseconds).
    pub heartbeat: String,
    /// When the daemon started (RFC 3339).
    pub started: String,
    /// How often it writes its record (seconds): it is gone after [`GONE_AFTER`] of them.
    pub interval_s: u64,
    /// Its status page, when it serves one.
    #[serde(default)]
    pub http: Option<String>,
}

impl HostRecord {
    /// How old the record is at `now` (zero for a heartbeat in the future or unreadable one:
    /// an unreadable time is shown as gone by [`HostRecord::is_gone`] instead).
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        let at = humantime::parse_rfc3339_weak(&self.heartbeat).ok()?;
        Some(now.duration_since(at).unwrap_or_default())
    }

    /// Is the host gone at `now`: not stopped cleanly, and its heartbeat older than
    /// [`GONE_AFTER`] intervals (or unreadable)?
    pub fn is_gone(&self, now: SystemTime) -> bool {
        if self.state == HostState::Stopped {
            return false;
        }
        let limit = Duration::from_secs(self.interval_s.max(1)) * GONE_AFTER;
        self.age(now).is_none_or(|age| age > limit)
    }

    /// What the host is shown as: its state, or `gone`.
    pub fn shown_state(&self, now: SystemTime) -> &'static str {
        if self.is_gone(now) {
            "gone"
        } else {
            self.state.as_str()
        }
    }

    /// The record's bytes as written and published (one JSON object).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Is this record newer than `other` (by heartbeat; a readable one wins)?
    fn newer_than(&self, other: &HostRecord) -> bool {
        let t = |r: &HostRecord| humantime::parse_rfc3339_weak(&r.heartbeat).ok();
        match (t(self), t(other)) {
            (Some(a), Some(b)) => a > b,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

/// A host as shown by `build-image hosts`, `/api/hosts` and the status page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shown {
    /// `running`, `draining`, `stopping`, `stopped` or `gone`.
    pub shown: String,
    /// Seconds since its heartbeat.
    pub age_s: Option<u64>,
    #[serde(flatten)]
    pub record: HostRecord,
}

/// The records, one per worker (the newest of each), as shown at `now`, sorted by worker.
pub fn shown(records: impl IntoIterator<Item = HostRecord>, now: SystemTime) -> Vec<Shown> {
    let mut by_worker: BTreeMap<String, HostRecord> = BTreeMap::new();
    for r in records {
        match by_worker.get(&r.worker) {
            Some(old) if !r.newer_than(old) => {}
            _ => {
                by_worker.insert(r.worker.clone(), r);
            }
        }
    }
    by_worker
        .into_values()
        .map(|record| Shown {
            shown: record.shown_state(now).to_string(),
            age_s: record.age(now).map(|a| a.as_secs()),
            record,
        })
        .collect()
}

/// The records heard on the farm exchange (AMQP), the latest of each worker.
#[derive(Default)]
pub struct Board(Mutex<BTreeMap<String, HostRecord>>);

impl Board {
    /// Keeps `record` unless a newer one of its worker is kept.
    pub fn receive(&self, record: HostRecord) {
        let mut m = match self.0.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if m.get(&record.worker)
            .is_none_or(|old| record.newer_than(old))
        {
            m.insert(record.worker.clone(), record);
        }
    }

    /// Every record kept.
    pub fn all(&self) -> Vec<HostRecord> {
        match self.0.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        }
    }
}

/// Now as a record's time (RFC 3339 with milliseconds).
pub fn now_text() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(worker: &str, state: HostState, at: SystemTime) -> HostRecord {
        HostRecord {
            worker: worker.into(),
            hostname: "h".into(),
            version: "0".into(),
            pid: 1,
            state,
            drained: None,
            slots: Slots { total: 1, free: 0 },
            running: vec![RunningJob {
                job: 3,
                image_id: "img-3".into(),
                since: None,
            }],
            queued: 0,
            heartbeat: humantime::format_rfc3339_millis(at).to_string(),
            started: humantime::format_rfc3339_seconds(at).to_string(),
            interval_s: 5,
            http: None,
        }
    }

    #[test]
    fn a_record_is_gone_after_three_intervals_unless_stopped() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let r = rec("w1", HostState::Running, t0);
        assert!(!r.is_gone(t0));
        assert!(!r.is_gone(t0 + Duration::from_secs(15)));
        assert!(r.is_gone(t0 + Duration::from_millis(15_001)));
        assert_eq!(r.shown_state(t0 + Duration::from_secs(16)), "gone");
        assert_eq!(r.shown_state(t0 + Duration::from_secs(1)), "running");
        // a heartbeat in the future (clocks apart) is not gone
        assert!(!r.is_gone(t0 - Duration::from_secs(60)));
        let s = rec("w1", HostState::Stopped, t0);
        assert!(!s.is_gone(t0 + Duration::from_secs(86_400)));
        assert_eq!(s.shown_state(t0 + Duration::from_secs(86_400)), "stopped");
        let d = rec("w1", HostState::Draining, t0);
        assert_eq!(d.shown_state(t0 + Duration::from_secs(2)), "draining");
        assert!(d.is_gone(t0 + Duration::from_secs(60)));
        let mut bad = rec("w1", HostState::Running, t0);
        bad.heartbeat = "yesterday".into();
        assert!(bad.is_gone(t0), "an unreadable heartbeat is gone");
    }

    #[test]
    fn the_newest_record_of_each_worker_is_shown_with_its_jobs() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let old = rec("w2", HostState::Running, t0);
        let mut new = rec("w2", HostState::Stopping, t0 + Duration::from_secs(5));
        new.running.clear();
        let w1 = rec("w1", HostState::Running, t0);
        let now = t0 + Duration::from_secs(18);
        let list = shown([new.clone(), old.clone(), w1], now);
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].record.worker, "w1");
        assert_eq!(list[0].shown, "gone");
        assert_eq!(list[0].record.running[0].image_id, "img-3");
        assert_eq!(list[0].age_s, Some(18));
        assert_eq!(list[1].record, new);
        let board = Board::default();
        board.receive(new.clone());
        board.receive(old);
        assert_eq!(board.all(), vec![new.clone()]);
        let back: HostRecord = serde_json::from_slice(&new.to_json()).unwrap();
        assert_eq!(back, new);
        let v = serde_json::to_value(&list[1]).unwrap();
        assert_eq!(v["shown"], "stopping");
        assert_eq!(v["worker"], "w2", "the record's fields are flattened: {v}");
    }
}
