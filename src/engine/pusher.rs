//! The pusher: runs the status push apart from the intake and the build slots, so a failing or
//! hanging push utility delays only pushes.
//!
//! Invariants: the pushes of one job go to one thread (`job % threads`) and are tried in the
//! order asked (BUILDING before the final status); a push is made only while the lifecycle
//! still asks for it (a retry of BUILDING once the build is over is dropped; a final status
//! that succeeded is not pushed again); every attempt is recorded as a `pushed` event; a failed
//! attempt is tried again after the one back-off while `[hooks] retries` allow, and after a
//! restart (the lifecycle asks for it again). A stop drains the queue ([`Pusher::drain`]):
//! every push asked before it is made, within its deadline, unless a second signal cuts it.

use super::Result;
use super::backoff::Backoff;
use super::ports::{Pushed, StatusPush};
use super::store::{Store, lock};
use crate::config::Config;
use crate::domain::lifecycle::{self, Step};
use crate::domain::{EventKind, Job, State, Status};
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

enum Msg {
    Ask {
        job: u64,
        status: Status,
        attempt: u32,
        due: Instant,
    },
    /// Make every push asked once (no retries), then end.
    Drain,
}

pub struct Pusher {
    ctx: Arc<Ctx>,
    cancel: Mutex<Option<Sender<()>>>,
    shards: Mutex<Vec<Sender<Msg>>>,
    /// Each thread, and the channel on which it says how many pushes it left undone.
    handles: Mutex<Vec<(JoinHandle<()>, Receiver<usize>)>>,
}

struct Ctx {
    /// Disconnected to cut the pushes off: a push under way is killed (its final status is
    /// pushed again by the next start).
    cancel: Receiver<()>,
    store: Arc<Store>,
    push: Option<Arc<dyn StatusPush>>,
    cfg: Arc<Config>,
    backoff: Backoff,
}

impl Ctx {
    fn cut(&self) -> bool {
        // The cancel channel carries no message, only its disconnection, so looking at it
        // consumes nothing.
        matches!(
            self.cancel.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        )
    }
}

impl Pusher {
    /// Starts the push threads; with no status push, or `threads` false (a command working on
    /// the log while no daemon runs), none: pushes asked for are dropped (the lifecycle asks for
    /// a final status again at the next start).
    pub fn start(
        store: Arc<Store>,
        push: Option<Arc<dyn StatusPush>>,
        cfg: Arc<Config>,
        threads: bool,
    ) -> std::io::Result<Pusher> {
        let n = if threads && push.is_some() {
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
            push,
            cfg,
            backoff,
        });
        let mut shards = Vec::new();
        let mut handles = Vec::new();
        for i in 0..n {
            let (tx, rx) = unbounded();
            let (left_tx, left_rx) = crossbeam_channel::bounded(1);
            let ctx = Arc::clone(&ctx);
            let h = std::thread::Builder::new()
                .name(format!("push-{i}"))
                .spawn(move || {
                    let left = shard(&ctx, &rx);
                    let _ = left_tx.send(left);
                })?;
            handles.push((h, left_rx));
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
        let _ = shards[i].send(Msg::Ask {
            job,
            status,
            attempt: 1,
            due: Instant::now(),
        });
    }

    /// Pushes the final status (DONE or ERROR) of an answered job once more, now, in the
    /// caller's thread, whatever pushes were made before; recorded as a `pushed` event like
    /// every attempt. None when no status push is configured.
    pub fn push_final_now(&self, job: &Job) -> Result<Option<Pushed>> {
        let Some(push) = &self.ctx.push else {
            return Ok(None);
        };
        let status = job.final_status();
        let stdin = super::answer::push_bytes(&self.ctx.store, &self.ctx.cfg.worker, job, status)?;
        let image_id = job.image_id.clone().unwrap_or_default();
        let Some(pushed) =
            push.push_status(job.id, status, stdin, &image_id, Some(&self.ctx.cancel))
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

    /// A stop: makes every push asked so far that was not tried yet, each bounded by the hook
    /// timeout, then ends the push threads; a push that is still failing (a retry) is left for
    /// the next start. A message on `cut` (a second signal) or `deadline` kills a push under way
    /// and leaves the rest (the lifecycle asks for their final statuses again at the next
    /// start). Returns how many pushes were left undone.
    pub fn drain(&self, deadline: Instant, cut: &Receiver<()>) -> usize {
        for s in lock(&self.shards).drain(..) {
            let _ = s.send(Msg::Drain);
        }
        let handles: Vec<_> = lock(&self.handles).drain(..).collect();
        let mut left = 0;
        let mut cut_off = false;
        for (h, done) in handles {
            let n = loop {
                if cut_off {
                    break done.recv().unwrap_or(0);
                }
                let wait = deadline.saturating_duration_since(Instant::now());
                select! {
                    recv(done) -> n => break n.unwrap_or(0),
                    recv(cut) -> _ => {
                        log::warn!("a second stop signal cuts the pushes off");
                        cut_off = true;
                        self.cut();
                    }
                    default(wait) => {
                        log::warn!("the pushes' time at the stop is over: cutting them off");
                        cut_off = true;
                        self.cut();
                    }
                }
            };
            left += n;
            let _ = h.join();
        }
        self.cut();
        if left > 0 {
            log::warn!("{left} push(es) not made at the stop: made by the next start");
        }
        left
    }

    /// Kills a push under way and ends the threads at once (their queued pushes are dropped).
    fn cut(&self) {
        lock(&self.shards).clear();
        lock(&self.cancel).take();
    }
}

impl Drop for Pusher {
    fn drop(&mut self) {
        self.cut();
        for (h, _) in lock(&self.handles).drain(..) {
            let _ = h.join();
        }
    }
}

impl super::Engine {
    /// A stop: the pushes asked so far are made before `deadline` (see [`Pusher::drain`]).
    pub fn drain_pushes(&self, deadline: Instant, cut: &Receiver<()>) -> usize {
        self.pusher.drain(deadline, cut)
    }

    /// A stop cut short: a push under way is killed, the rest left for the next start.
    pub fn cut_pushes(&self) {
        self.pusher.cut();
    }
}

/// One push thread: a queue of asks, each due at a time. Returns how many it left undone.
fn shard(ctx: &Ctx, rx: &Receiver<Msg>) -> usize {
    let mut order = 0u64;
    let mut heap: BinaryHeap<Due> = BinaryHeap::new();
    let mut pending: HashSet<(u64, Status)> = HashSet::new();
    let mut draining = false;
    let mut connected = true;
    // Pushes left for the next start by a drain: retries of pushes that are still failing.
    let mut left = 0;
    // The last push made got no answer from the utility (it hung, or could not run).
    let mut no_answer = false;
    loop {
        if ctx.cut() {
            // The asks not read yet are left too.
            let unread = rx
                .try_iter()
                .filter(|m| matches!(m, Msg::Ask { .. }))
                .count();
            return left + heap.len() + unread;
        }
        // Wait for an ask or the next due push, then take every message there is (a stop's
        // drain is seen before the next push is made).
        let wait = heap.peek().map_or(Duration::from_secs(3600), |Reverse(a)| {
            a.0.saturating_duration_since(Instant::now())
        });
        let mut msgs = Vec::new();
        if connected {
            select! {
                recv(rx) -> m => match m {
                    Ok(m) => msgs.push(m),
                    Err(_) => connected = false,
                },
                default(wait) => {}
            }
            msgs.extend(rx.try_iter());
        } else {
            std::thread::sleep(wait.min(Duration::from_millis(50)));
        }
        for m in msgs {
            match m {
                Msg::Ask {
                    job,
                    status,
                    attempt,
                    due,
                } => {
                    // An ask already queued for the job and status is not queued twice.
                    if pending.insert((job, status)) {
                        order += 1;
                        heap.push(Reverse((due, order, job, status, attempt)));
                    }
                }
                Msg::Drain => draining = true,
            }
        }
        if !connected && !draining {
            return left + heap.len();
        }
        if draining {
            // Draining: every push asked is made once; one that is still failing is left for
            // the next start (the lifecycle asks for its final status again). A utility that
            // gave no answer would make each push behind it wait for the hook timeout too:
            // those are left for the next start as well.
            let before = heap.len();
            heap.retain(|Reverse((_, _, _, _, attempt))| *attempt == 1);
            left += before - heap.len();
            if no_answer && !heap.is_empty() {
                log::warn!(
                    "the push utility gave no answer at the stop: {} push(es) left for the next start",
                    heap.len()
                );
                return left + heap.len();
            }
            if heap.is_empty() {
                return left;
            }
        }
        // One due push at a time: between two, the queue is looked at again (new asks, a
        // stop's drain).
        let due = heap
            .peek()
            .is_some_and(|Reverse(top)| top.0 <= Instant::now());
        if !due || ctx.cut() {
            continue;
        }
        let Some(Reverse((_, _, job, status, attempt))) = heap.pop() else {
            continue;
        };
        pending.remove(&(job, status));
        let tried = attempt_push(ctx, job, status, attempt);
        if let Some(retry) = tried.retry {
            order += 1;
            pending.insert((job, status));
            heap.push(Reverse((retry, order, job, status, attempt + 1)));
        }
        no_answer = tried.no_answer;
    }
}

/// What one push attempt came to.
#[derive(Default)]
struct Tried {
    /// When to try again (a failure, with retries left).
    retry: Option<Instant>,
    /// The utility gave no exit status: it timed out, was killed, or could not be run.
    no_answer: bool,
}

/// One push attempt, if the lifecycle still asks for it.
fn attempt_push(ctx: &Ctx, id: u64, status: Status, attempt: u32) -> Tried {
    let (Some(push), Some(job)) = (ctx.push.as_ref(), ctx.store.job(id)) else {
        return Tried::default();
    };
    let wanted = match status {
        // The first BUILDING is always tried (before the final status, which waits behind it
        // in this thread); a retry of it only while the build runs.
        Status::Building => attempt == 1 || job.state == State::Building,
        _ => lifecycle::next_step(&job, ctx.store.policy()) == Step::Push(status),
    };
    if !wanted {
        return Tried::default();
    }
    // Only the bytes are kept while the utility runs.
    let stdin = match super::answer::push_bytes(&ctx.store, &ctx.cfg.worker, &job, status) {
        Ok(b) => b,
        Err(e) => {
            log::error!("job {id}: cannot push {status:?}: {e}");
            return Tried::default();
        }
    };
    let image_id = job.image_id.clone().unwrap_or_default();
    let Some(pushed) = push.push_status(id, status, stdin, &image_id, Some(&ctx.cancel)) else {
        return Tried::default();
    };
    if !pushed.ok && ctx.cut() {
        // Killed by the daemon stopping: not an attempt of the utility's; the next start
        // pushes it again.
        return Tried::default();
    }
    let no_answer = !pushed.ok && pushed.exit.is_none();
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
    Tried { retry, no_answer }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testkit::Rig;
    use std::sync::Mutex as StdMutex;

    /// A job database that answers each push after `delay`, with no answer (a hang past the
    /// timeout) for `hang`, and a failure for the jobs in `fail`; it records what it was asked.
    #[derive(Default)]
    struct Db {
        delay: Duration,
        hang: bool,
        fail: Vec<u64>,
        asked: StdMutex<Vec<(u64, Status)>>,
    }

    impl StatusPush for Db {
        fn push_status(
            &self,
            job: u64,
            status: Status,
            _stdin: Vec<u8>,
            _image_id: &str,
            _cancel: Option<&Receiver<()>>,
        ) -> Option<Pushed> {
            std::thread::sleep(self.delay);
            lock(&self.asked).push((job, status));
            Some(match (self.hang, self.fail.contains(&job)) {
                (true, _) => Pushed {
                    ok: false,
                    exit: None,
                    error: Some("timed out".into()),
                },
                (false, true) => Pushed {
                    ok: false,
                    exit: Some(1),
                    error: Some("exit 1".into()),
                },
                (false, false) => Pushed {
                    ok: true,
                    exit: Some(0),
                    error: None,
                },
            })
        }
    }

    /// A rig with a push utility configured and `n` jobs built and answered (their final
    /// statuses not pushed: the rig's engine pushes nothing itself).
    fn answered(n: usize) -> (Rig, Vec<u64>) {
        let rig = Rig::with(|cfg| {
            cfg.hooks.push = Some("/bin/true".into());
            cfg.hooks.retry_delay_ms = 60_000;
        });
        let ids = (0..n)
            .map(|i| {
                let id = rig.drop_and_take(&format!("p{i}.json"), &rig.workitem(&format!("p-{i}")));
                rig.engine.build(id).unwrap();
                id
            })
            .collect();
        (rig, ids)
    }

    fn pusher(rig: &Rig, db: &Arc<Db>) -> Pusher {
        let push: Arc<dyn StatusPush> = db.clone();
        Pusher::start(
            Arc::clone(&rig.engine.store),
            Some(push),
            Arc::clone(&rig.engine.cfg),
            true,
        )
        .unwrap()
    }

    #[test]
    fn a_drain_makes_every_push_asked_once_and_leaves_the_failing_ones() {
        let (rig, ids) = answered(4);
        let db = Arc::new(Db {
            delay: Duration::from_millis(20),
            fail: vec![ids[0]],
            ..Db::default()
        });
        let p = pusher(&rig, &db);
        for id in &ids {
            p.push(*id, Status::Done);
        }
        let (_tx, never) = crossbeam_channel::bounded::<()>(1);
        let left = p.drain(Instant::now() + Duration::from_secs(60), &never);
        let asked = lock(&db.asked).clone();
        assert_eq!(asked.len(), 4, "each once: {asked:?}");
        // the failed one's retry (a minute away) is left for the next start
        assert_eq!(left, 1);
        for id in &ids[1..] {
            assert!(rig.engine.store.job(*id).unwrap().final_pushed);
        }
        assert!(!rig.engine.store.job(ids[0]).unwrap().final_pushed);
    }

    #[test]
    fn a_utility_that_gives_no_answer_ends_the_drain() {
        let (rig, ids) = answered(4);
        let db = Arc::new(Db {
            delay: Duration::from_millis(20),
            hang: true,
            ..Db::default()
        });
        let p = pusher(&rig, &db);
        for id in &ids {
            p.push(*id, Status::Done);
        }
        let (_tx, never) = crossbeam_channel::bounded::<()>(1);
        let left = p.drain(Instant::now() + Duration::from_secs(60), &never);
        let asked = lock(&db.asked).len();
        // at most one hung push per thread; the rest left (and the hung ones' retries)
        assert!(asked <= THREADS as usize, "{asked} pushes waited for");
        assert!(left >= 4 - asked, "{left} left");
    }

    #[test]
    fn a_second_signal_cuts_the_drain() {
        let (rig, ids) = answered(6);
        let db = Arc::new(Db {
            delay: Duration::from_millis(300),
            ..Db::default()
        });
        let p = pusher(&rig, &db);
        for id in &ids {
            p.push(*id, Status::Done);
        }
        let (tx, signal) = crossbeam_channel::bounded::<()>(1);
        tx.send(()).unwrap();
        let left = p.drain(Instant::now() + Duration::from_secs(60), &signal);
        let asked = lock(&db.asked).len();
        assert!(asked < 6, "cut: {asked} made");
        assert!(left > 0);
    }
}
