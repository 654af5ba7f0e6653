//! The farm's hosts as operators see them (`build-image hosts`, `/api/hosts`, the status page's
//! hosts panel): this daemon's record of itself made from its engine ([`record_of`]), and the
//! list of every host's latest record from the spool's `hosts/` and the records heard on the
//! farm exchange ([`farm`]).
//!
//! Invariant: the list is the same whoever reads it (a command with no daemon, the socket, a
//! page): the newest record of each worker, shown by `crate::hosts::shown`.

use super::Host;
use crate::domain::State;
use crate::edges::spool::Spool;
use crate::engine::Engine;
use crate::hosts::{GONE_AFTER, HostRecord, HostState, RunningJob, Shown, Slots};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Publishes a record elsewhere (the farm exchange): its bytes and how long it lives (ms).
pub type Publish = Box<dyn Fn(Vec<u8>, u64) + Send + Sync>;

/// A daemon's record keeper: run by its timer every `[worker] host_record_interval`, and once
/// more at a clean stop ([`Announcer::last`], state `stopped`; nothing is written after it).
pub struct Announcer {
    pub engine: Arc<Engine>,
    pub spool: Spool,
    pub started: String,
    /// The status page's address, once it serves.
    pub http: std::sync::OnceLock<String>,
    pub publish: Option<Publish>,
    stopped: Mutex<bool>,
}

impl Announcer {
    pub fn new(engine: Arc<Engine>, spool: Spool, publish: Option<Publish>) -> Announcer {
        Announcer {
            engine,
            spool,
            started: started_now(),
            http: std::sync::OnceLock::new(),
            publish,
            stopped: Mutex::new(false),
        }
    }

    /// Writes the record now (the timer's duty).
    pub fn beat(&self) {
        self.write(false);
    }

    /// The last record, `stopped` (a clean stop).
    pub fn last(&self) {
        self.write(true);
    }

    fn write(&self, stopped: bool) {
        let mut done = match self.stopped.lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        if *done {
            return;
        }
        let r = record_of(
            &self.engine,
            &self.started,
            self.http.get().cloned(),
            stopped,
        );
        if let Err(e) = self.spool.write_host_record(&r) {
            log::warn!("cannot write this host's record: {e}");
        }
        if let Some(p) = &self.publish {
            let ttl_ms = r.interval_s * 1000 * u64::from(GONE_AFTER);
            p(r.to_json(), ttl_ms);
        }
        self.engine.hosts.receive(r);
        *done = stopped;
    }
}

/// When this daemon started, as its records say it (RFC 3339).
pub fn started_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// This daemon's record of itself now. `stopped`: its last record at a clean stop.
pub fn record_of(
    engine: &Engine,
    started: &str,
    http: Option<String>,
    stopped: bool,
) -> HostRecord {
    let state = if stopped {
        HostState::Stopped
    } else if engine.stopping() {
        HostState::Stopping
    } else if engine.drained().is_some() {
        HostState::Draining
    } else {
        HostState::Running
    };
    let (running, queued) = engine.store.with_open(|jobs| {
        let mine = || {
            jobs.values()
                .filter(|j| j.worker.is_some() && engine.is_mine(j))
        };
        let running: Vec<RunningJob> = mine()
            .filter(|j| j.state == State::Building)
            .map(|j| RunningJob {
                job: j.id,
                image_id: j.image_id.clone().unwrap_or_default(),
                since: j.started_at.clone(),
            })
            .collect();
        let queued = mine().filter(|j| j.state == State::Queued).count();
        (running, queued)
    });
    HostRecord {
        worker: engine.worker.clone(),
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        state,
        drained: engine.drained(),
        slots: Slots {
            total: engine.cfg.worker.workers,
            free: if stopped { 0 } else { engine.free_slots() },
        },
        running,
        queued,
        heartbeat: crate::hosts::now_text(),
        started: started.to_string(),
        interval_s: engine.cfg.worker.host_record_interval,
        http,
    }
}

/// The farm's hosts as `host` sees them: the spool's records and the ones its daemon keeps in
/// memory (heard on the farm exchange, and its own).
pub fn farm(host: &Host) -> Vec<Shown> {
    let mut records = match host.spool.host_records() {
        Ok(r) => r,
        Err(e) => {
            log::warn!("{e}");
            Vec::new()
        }
    };
    records.extend(host.engine.hosts.all());
    crate::hosts::shown(records, SystemTime::now())
}
