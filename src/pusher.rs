//! The pusher: runs the status push utility apart from the claim loop and the build slots, so a
//! failing or hanging utility delays only pushes.
//!
//! Invariants: the pushes of one job go to one thread (`job % threads`) and are tried in the
//! order asked (BUILDING before the final status); a push is done only while the lifecycle
//! still asks for it (a retry of BUILDING once the build is over is dropped; a final status
//! that succeeded is not pushed again); every attempt is recorded as a `pushed` event; a failed
//! attempt is tried again after the one back-off while `[hooks] retries` allow, and after a
//! restart (the lifecycle asks for it again).

use crate::backoff::Backoff;
use crate::config::Config;
use crate::hooks::Hooks;
use crate::hooks::Pushed;
use crate::imaging;
use crate::journal::{EventKind, Job, State, Status};
use crate::lifecycle::{self, Step};
use crate::store::{Store, StoreError, lock};
use crate::workitem;
use crossbeam_channel::{Receiver, Sender, select, unbounded};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Pushes run by this many threads at most (jobs are spread over them by id).
const THREADS: u64 = 2;

/// A push due at a time: (due, order asked, job, status, attempt).
type Due = Reverse<(Instant, u64, u64, Status, u32)>;

struct Ask {
    job: u64,
    status: Status,
    attempt: u32,
    due: Instant,
}

pub struct Pusher {
    ctx: Arc<Ctx>,
    cancel: Mutex<Option<Sender<()>>>,
    shards: Mutex<Vec<Sender<Ask>>>,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

struct Ctx {
    /// Disconnected when the daemon stops: a push under way is killed (its status is pushed
    /// again by the next start).
    cancel: Receiver<()>,
    store: Arc<Store>,
    hooks: Hooks,
    cfg: Arc<Config>,
    backoff: Backoff,
}

impl Pusher {
    /// Starts the push threads; with no push utility configured, or `enabled` false (a command
    /// working on the log while no daemon runs), none: pushes asked for are dropped (the
    /// lifecycle asks for a final status again at the next start).
    pub fn start(
        store: Arc<Store>,
        hooks: Hooks,
        cfg: Arc<Config>,
        enabled: bool,
    ) -> std::io::Result<Pusher> {
        let n = if enabled && cfg.hooks.push.is_some() {
            THREADS
        } else {
            0
        };
        let backoff = Backoff::new(
            Duration::from_millis(cfg.hooks.retry_delay_ms),
            Duration::from_secs(24 * 3600),
        );
        let (cancel_tx, cancel) = crossbeam_channel::bounded(1);
        let ctx = Arc::new(Ctx {
            cancel,
            store,
            hooks,
            cfg,
            backoff,
        });
        let mut shards = Vec::new();
        let mut handles = Vec::new();
        for i in 0..n {
            let (tx, rx) = unbounded();
            let ctx = Arc::clone(&ctx);
            handles.push(
                std::thread::Builder::new()
                    .name(format!("push-{i}"))
                    .spawn(move || shard(&ctx, &rx))?,
            );
            shards.push(tx);
        }
        Ok(Pusher {
            ctx,
            cancel: Mutex::new(Some(cancel_tx)),
            shards: Mutex::new(shards),
            handles: Mutex::new(handles),
        })
    }

    /// Asks for `status` of `job` to be pushed (first attempt, now).
    pub fn push(&self, job: u64, status: Status) {
        let shards = lock(&self.shards);
        if shards.is_empty() {
            return;
        }
        let i = (job % shards.len() as u64) as usize;
        let _ = shards[i].send(Ask {
            job,
            status,
            attempt: 1,
            due: Instant::now(),
        });
    }

    /// Pushes the final status (DONE or ERROR) of an answered job once more, now, in the
    /// caller's thread (`repush`: a job database restored from a backup), whatever pushes were
    /// made before; recorded as a `pushed` event like every attempt. None when no push utility
    /// is configured.
    pub fn push_final_now(&self, job: &Job) -> Result<Option<Pushed>, StoreError> {
        let status = job.final_status();
        let input = self.ctx.store.input_value(job)?;
        let reply = workitem::reply_owned(input, job.result, job.error.as_deref(), &job.urls);
        let stdin = serde_json::to_vec(&reply).unwrap_or_default();
        drop(reply);
        let image_id = job.image_id.clone().unwrap_or_default();
        let Some(pushed) =
            self.ctx
                .hooks
                .push_bytes(job.id, status, stdin, &image_id, Some(&self.ctx.cancel))
        else {
            return Ok(None);
        };
        self.ctx.store.record(
            Some(job.id),
            EventKind::Pushed {
                status,
                exit: pushed.exit,
                ok: pushed.ok,
                error: pushed.error.clone(),
            },
        )?;
        Ok(Some(pushed))
    }

    /// Stops: pushes not started are dropped and a push under way is killed (a final status is
    /// pushed again by the next start).
    pub fn stop(&self) {
        lock(&self.shards).clear();
        lock(&self.cancel).take();
        for h in lock(&self.handles).drain(..) {
            let _ = h.join();
        }
    }
}

/// One push thread: a queue of asks, each due at a time.
fn shard(ctx: &Ctx, rx: &Receiver<Ask>) {
    let mut order = 0u64;
    let mut heap: BinaryHeap<Due> = BinaryHeap::new();
    let mut pending: HashSet<(u64, Status)> = HashSet::new();
    loop {
        let wait = heap.peek().map_or(Duration::from_secs(3600), |Reverse(a)| {
            a.0.saturating_duration_since(Instant::now())
        });
        select! {
            recv(rx) -> ask => match ask {
                Ok(a) => {
                    if pending.insert((a.job, a.status)) {
                        order += 1;
                        heap.push(Reverse((a.due, order, a.job, a.status, a.attempt)));
                    }
                }
                Err(_) => return,
            },
            default(wait) => {}
        }
        while let Some(Reverse(top)) = heap.peek() {
            if top.0 > Instant::now() {
                break;
            }
            let Some(Reverse((_, _, job, status, attempt))) = heap.pop() else {
                break;
            };
            pending.remove(&(job, status));
            if let Some(retry) = attempt_push(ctx, job, status, attempt) {
                order += 1;
                pending.insert((job, status));
                heap.push(Reverse((retry, order, job, status, attempt + 1)));
            }
            // A stop asked meanwhile: leave the rest. (The cancel channel carries no message, only
            // its disconnection, so looking at it consumes nothing; looking at `rx` would take an
            // ask that arrived in between, and lose it.)
            if matches!(
                ctx.cancel.try_recv(),
                Err(crossbeam_channel::TryRecvError::Disconnected)
            ) {
                return;
            }
        }
    }
}

/// One push attempt, if the lifecycle still asks for it; returns when to try again.
fn attempt_push(ctx: &Ctx, id: u64, status: Status, attempt: u32) -> Option<Instant> {
    let job = ctx.store.job(id)?;
    let wanted = match status {
        // The first BUILDING is always tried (before the final status, which waits behind it
        // in this thread); a retry of it only while the build runs.
        Status::Building => attempt == 1 || job.state == State::Building,
        _ => lifecycle::next_step(&job, ctx.store.policy()) == Step::Push(status),
    };
    if !wanted {
        return None;
    }
    let input = match ctx.store.input_value(&job) {
        Ok(i) => i,
        Err(e) => {
            log::error!("job {id}: cannot push {status:?}: {e}");
            return None;
        }
    };
    let reply = match status {
        Status::Building => {
            let urls = match ctx.store.journal().map(|j| crate::store::spec_of(&j, &job)) {
                Ok(Ok(Some(spec))) => imaging::planned_urls(&ctx.cfg.worker, &spec),
                _ => Default::default(),
            };
            workitem::reply_owned(input, None, None, &urls)
        }
        _ => workitem::reply_owned(input, job.result, job.error.as_deref(), &job.urls),
    };
    // Only the bytes are kept while the utility runs.
    let stdin = serde_json::to_vec(&reply).unwrap_or_default();
    drop(reply);
    let image_id = job.image_id.clone().unwrap_or_default();
    let pushed = ctx
        .hooks
        .push_bytes(id, status, stdin, &image_id, Some(&ctx.cancel))?;
    if !pushed.ok
        && matches!(
            ctx.cancel.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        )
    {
        // Killed by the daemon stopping: not an attempt of the utility's; the next start
        // pushes it again.
        return None;
    }
    let retry = match &pushed.error {
        Some(e) => {
            log::warn!(
                "job {id} push {} attempt {attempt} failed: {e}",
                status.as_str()
            );
            (attempt <= ctx.cfg.hooks.retries).then(|| Instant::now() + ctx.backoff.delay(attempt))
        }
        None => None,
    };
    if let Err(e) = ctx.store.record(
        Some(id),
        EventKind::Pushed {
            status,
            exit: pushed.exit,
            ok: pushed.ok,
            error: pushed.error,
        },
    ) {
        // The push happened; the log did not take its record. The lifecycle asks for it
        // again once the log works (at least once).
        log::error!(
            "job {id}: cannot record the push of {}: {e}",
            status.as_str()
        );
    }
    retry
}
