//! Build slots: a queued job gets one of `workers` slots (the [`super::pool`] threads), its job
//! folder is prepared, `started` is recorded, the builder runs, and its end is recorded.
//!
//! Invariants: "still queued? then start it" and "queued? then cancel it" are decided under
//! one lock, so a cancelled job is never started and a started one is cancelled by killing its
//! build; `started` is durable before the BUILDING push and before the builder spawns
//! anything; a build's end is recorded even through a full log disk (retried with back-off
//! until it is, or until the daemon stops: then the next start finds the build interrupted).

use super::backoff::Backoff;
use super::store::lock;
use super::{Engine, EngineError, Result};
use crate::domain::lifecycle::{self, Step};
use crate::domain::{Cause, EventKind, Failure, Mode, State, Status};
use crate::imaging::{self, BuildEnd};
use crossbeam_channel::{Receiver, Sender, bounded};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

/// What a build killed by an operator's `cancel` says (its `cancelled` event, its job log).
const CANCELLED_BY_OPERATOR: &str = "cancelled by the operator";
/// What a build killed by a daemon's stop says (its `interrupted` event, its job log): it did not
/// fail, and it is built again.
const INTERRUPTED_BY_STOP: &str = "interrupted by a daemon stop; built again at the next start";

/// The builds running in this daemon, and the queue to the build threads.
pub struct Slots {
    /// Each running build holds the sending side of its cancel channel here while it runs
    /// (dropping it cancels the build's children).
    running: Mutex<HashMap<u64, Sender<()>>>,
    /// Running builds an operator cancelled (as opposed to a stop killing them).
    by_operator: Mutex<HashSet<u64>>,
    /// Serialises "still queued? then start it" against "queued? then cancel it".
    decide: Mutex<()>,
    /// The build pool's queue while the daemon runs (None offline and once stopping).
    queue: Mutex<Option<Sender<u64>>>,
    /// Told when a build slot may have come free (a build ended, an intake finished): a
    /// source that takes work only for free slots waits on it instead of polling.
    freed: (Sender<()>, Receiver<()>),
}

impl Default for Slots {
    fn default() -> Slots {
        Slots {
            running: Mutex::new(HashMap::new()),
            by_operator: Mutex::new(HashSet::new()),
            decide: Mutex::new(()),
            queue: Mutex::new(None),
            freed: bounded(1),
        }
    }
}

impl Slots {
    pub(crate) fn running_ids(&self) -> HashSet<u64> {
        lock(&self.running).keys().copied().collect()
    }
}

/// A running build: registered while it lives, unregistered when dropped however the build
/// ends.
struct BuildGuard<'a> {
    slots: &'a Slots,
    id: u64,
    cancel: Receiver<()>,
}

impl Drop for BuildGuard<'_> {
    fn drop(&mut self) {
        lock(&self.slots.running).remove(&self.id);
        lock(&self.slots.by_operator).remove(&self.id);
    }
}

impl Engine {
    /// Connects the build pool's queue (None disconnects it, so the pool can drain).
    pub fn set_queue(&self, queue: Option<Sender<u64>>) {
        *lock(&self.slots.queue) = queue;
    }

    /// Hands a job to the build pool; false when no pool runs (offline, or stopping): the job
    /// stays queued in the log and the next start builds it.
    pub fn enqueue(&self, id: u64) -> bool {
        match &*lock(&self.slots.queue) {
            Some(q) => q.send(id).is_ok(),
            None => false,
        }
    }

    /// Ready when a build slot may have come free since the last receive.
    pub fn slot_wakeups(&self) -> &Receiver<()> {
        &self.slots.freed.1
    }

    pub(crate) fn slot_may_be_free(&self) {
        let _ = self.slots.freed.0.try_send(());
    }

    /// Build slots not taken by this worker's jobs that wait for or hold one.
    pub fn free_slots(&self) -> usize {
        let busy = self.store.with_open(|jobs| {
            jobs.values()
                .filter(|j| self.is_mine(j))
                .filter(|j| {
                    matches!(
                        j.state,
                        State::Claimed | State::Queued | State::Building | State::Interrupted
                    )
                })
                .count()
        });
        self.cfg.worker.workers.saturating_sub(busy)
    }

    /// How many builds run.
    pub fn running(&self) -> usize {
        lock(&self.slots.running).len()
    }

    /// Builds a queued job in this (pool) thread, then moves it on (delivery, push).
    pub fn build(&self, id: u64) -> Result<()> {
        if self.stopping() {
            return Ok(());
        }
        let Some(job) = self.store.job(id) else {
            return Ok(());
        };
        if lifecycle::next_step(&job, self.store.policy()) != Step::Build {
            return Ok(());
        }
        // The disk budget under base_dir: no build starts below it (the job stays queued).
        self.room_to_build().map_err(EngineError::Deferred)?;
        let mut spec = self.store.build_spec(&job)?;
        let w = &self.cfg.worker;
        let prepared = match imaging::prepare(w, &spec, job.attempts + 1) {
            Ok(p) => p,
            Err(e) if e.is_no_space() => {
                // Not the job's fault: it stays queued and is tried again when space returns.
                return Err(EngineError::Deferred(e.to_string()));
            }
            Err(e) => {
                self.store.record(
                    Some(id),
                    EventKind::Finished {
                        result: false,
                        error: Some(e.to_string()),
                        urls: imaging::planned_urls(w, &spec),
                        failure: Some(Failure::Infrastructure),
                        boot_seconds: None,
                    },
                )?;
                self.slot_may_be_free();
                return self.advance(id).map(|_| ());
            }
        };
        if self.builder.mode() == Mode::Native {
            // mic reads the kickstart from the file just written: not kept in memory meanwhile.
            spec.kickstart = String::new();
        }
        let Some(guard) = self.begin(id)? else {
            return Ok(());
        };
        self.pusher.push(id, Status::Building);
        let started = std::time::SystemTime::now();
        let end = self
            .builder
            .build(&spec, &prepared, &guard.cancel, &self.registry);
        // provenance.json (and its signature) before `finished` names it
        let end = self.attest(id, &spec, &prepared, started, end);
        let boot_seconds = prepared.boot_seconds();
        let cancelled_by_operator = lock(&self.slots.by_operator).contains(&id);
        if matches!(end, BuildEnd::Cancelled) {
            // The builder says the build was stopped; why is known here (the job log's reader
            // must not take a stop for a failure).
            let why = if cancelled_by_operator {
                CANCELLED_BY_OPERATOR
            } else {
                INTERRUPTED_BY_STOP
            };
            if let Err(e) = prepared.log().line(why) {
                log::warn!("job {id}: cannot write its job log: {e}");
            }
        }
        let released = prepared.release();
        drop(guard);
        let kinds = match end {
            BuildEnd::Finished {
                result,
                error,
                urls,
                failure,
            } => {
                let mut kinds = vec![EventKind::Finished {
                    result,
                    error,
                    urls,
                    failure,
                    boot_seconds,
                }];
                // An infrastructure failure is tried again, up to infra_retries times.
                let before = job.infra_failures;
                if failure == Some(Failure::Infrastructure) && before < w.infra_retries {
                    kinds.push(EventKind::Requeued {
                        reason: format!(
                            "infrastructure failure: tried again automatically ({} of infra_retries = {})",
                            before + 1,
                            w.infra_retries
                        ),
                        file: None,
                        from_worker: None,
                    });
                }
                kinds
            }
            BuildEnd::Cancelled if cancelled_by_operator => vec![
                EventKind::Cancelled {
                    reason: CANCELLED_BY_OPERATOR.into(),
                },
                EventKind::Finished {
                    result: false,
                    error: Some("cancelled".into()),
                    urls: imaging::planned_urls(w, &spec),
                    failure: Some(Failure::Cancelled),
                    boot_seconds,
                },
            ],
            BuildEnd::Cancelled => vec![EventKind::Interrupted {
                reason: INTERRUPTED_BY_STOP.into(),
                cause: Cause::Stop,
            }],
        };
        for l in &released.leaked {
            log::error!("job {id}: its build left {}: {}", l.what, l.why);
        }
        let mut kinds = kinds;
        kinds.extend(super::leaks::leaked_events(&released));
        self.record_retrying(id, kinds)?;
        self.slot_may_be_free();
        self.advance(id).map(|_| ())
    }

    /// Starts a build if the job is still waiting for one: records `started` under the lock
    /// that `cancel` takes, and registers the build. None when it is not to be built now.
    fn begin(&self, id: u64) -> Result<Option<BuildGuard<'_>>> {
        let _decide = lock(&self.slots.decide);
        let Some(job) = self.store.job(id) else {
            return Ok(None);
        };
        if lifecycle::next_step(&job, self.store.policy()) != Step::Build || self.stopping() {
            return Ok(None);
        }
        let (tx, rx) = bounded::<()>(1);
        self.store.record(
            Some(id),
            EventKind::Started {
                mode: self.builder.mode(),
                attempt: job.attempts + 1,
            },
        )?;
        lock(&self.slots.running).insert(id, tx);
        self.stalls.clear(id);
        Ok(Some(BuildGuard {
            slots: &self.slots,
            id,
            cancel: rx,
        }))
    }

    /// Records the end of a build; while the log cannot be written, tries again with back-off
    /// (the build's outcome is not to be lost to a full disk) until the daemon stops.
    fn record_retrying(&self, id: u64, kinds: Vec<EventKind>) -> Result<()> {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut n = 0;
        loop {
            let items = kinds.iter().cloned().map(|k| (Some(id), k)).collect();
            match self.store.record_batch(items) {
                Ok(_) => return Ok(()),
                Err(e) if self.stopping() => return Err(e.into()),
                Err(e) => {
                    n += 1;
                    if n == 1 {
                        log::error!("job {id}: cannot record the end of its build yet: {e}");
                    }
                    std::thread::sleep(backoff.delay(n));
                }
            }
        }
    }

    /// Kills every running build (a stop's grace is over): recorded as interrupted by a stop.
    pub fn cancel_running(&self) {
        lock(&self.slots.running).clear();
    }

    /// Cancels a running build for the operator. Under the decide lock (the caller holds it
    /// through `slots_decide`). Returns whether the job had a running build here.
    pub(crate) fn cancel_running_build(&self, id: u64) -> bool {
        let mut running = lock(&self.slots.running);
        if running.contains_key(&id) {
            lock(&self.slots.by_operator).insert(id);
            // Disconnecting the channel cancels the running child and any later one.
            running.remove(&id);
            return true;
        }
        false
    }

    /// The lock that orders starting a build against cancelling it.
    pub(crate) fn slots_decide(&self) -> std::sync::MutexGuard<'_, ()> {
        lock(&self.slots.decide)
    }
}

#[cfg(test)]
mod tests {
    use crate::domain::State;
    use crate::engine::testkit::Rig;

    #[test]
    fn a_queued_job_is_built_recorded_and_answered() {
        let rig = Rig::new();
        let id = rig.drop_and_take("a.json", &rig.workitem("a-1"));
        assert_eq!(
            rig.engine.free_slots(),
            0,
            "the queued job takes the one slot"
        );
        rig.engine.build(id).unwrap();
        let job = rig.engine.store.job(id).unwrap();
        assert_eq!(job.state, State::Done, "{job:?}");
        assert_eq!(job.attempts, 1);
        assert!(job.urls.image_url.is_some(), "{job:?}");
        assert_eq!(rig.engine.free_slots(), 1);
        assert_eq!(rig.engine.running(), 0);
        assert!(rig.outbox_dir().join("a.json").exists());
    }

    #[test]
    fn a_job_that_is_not_queued_is_not_built() {
        let rig = Rig::new();
        let id = rig.drop_and_take("a.json", &rig.workitem("a-2"));
        rig.engine.cancel(id).unwrap();
        rig.engine.build(id).unwrap();
        let job = rig.engine.store.job(id).unwrap();
        assert_eq!((job.state, job.attempts), (State::Error, 0), "{job:?}");
    }

    #[test]
    fn nothing_is_started_once_stopping() {
        let rig = Rig::new();
        let id = rig.drop_and_take("a.json", &rig.workitem("a-3"));
        rig.engine.set_stopping();
        rig.engine.build(id).unwrap();
        assert_eq!(rig.engine.store.job(id).unwrap().state, State::Queued);
    }
}
