//! The engine's timer thread: flushes lazily appended events, writes the log's high-water
//! mark, repairs a log that failed a write (with back-off, then moves every open job on
//! again), moves stalled jobs when they fall due, passes over what builds left on the host
//! (`leaks`), expires images by the retention policy (`retention`), and runs the periodic duties the daemon
//! hands it (a liveness mark, the service manager's watchdog), so that they stop
//! when this thread does.
//!
//! Invariant: while the log cannot be written nothing is moved (a stalled job waits for the
//! repair), and after a repair every open job not building is moved again, so a step whose
//! record was lost with the log's unflushed tail is done again.

use super::Engine;
use super::backoff::Backoff;
use crossbeam_channel::{Receiver, Sender, bounded, select};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A duty run every `every` by the timer thread.
pub struct Periodic {
    pub every: Duration,
    pub run: Box<dyn FnMut() + Send>,
}

/// The running timer thread; stopped (and joined) by [`Timer::stop`].
pub struct Timer {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Timer {
    pub fn start(engine: Arc<Engine>, duties: Vec<Periodic>) -> std::io::Result<Timer> {
        let (stop, rx) = bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("timer".into())
            .spawn(move || run(&engine, duties, &rx))?;
        Ok(Timer { stop, thread })
    }

    pub fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

fn run(engine: &Engine, mut duties: Vec<Periodic>, stop: &Receiver<()>) {
    let repair = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut repair_tries = 0u32;
    let mut next_repair = Instant::now();
    let mut due: Vec<Instant> = duties.iter().map(|_| Instant::now()).collect();
    loop {
        for (d, at) in duties.iter_mut().zip(due.iter_mut()) {
            if Instant::now() >= *at {
                (d.run)();
                *at = Instant::now() + d.every;
            }
        }
        let failing = engine.store.failing().is_some();
        let next = [
            engine.store.next_tick(),
            engine.next_stall(),
            failing.then_some(next_repair),
            due.iter().min().copied(),
        ]
        .into_iter()
        .flatten()
        .min();
        let wait = next.map_or(Duration::from_secs(1), |d| {
            d.saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1))
        });
        select! {
            recv(stop) -> _ => return,
            recv(engine.wakeups()) -> _ => {}
            default(wait) => {}
        }
        if engine.store.failing().is_some() {
            if Instant::now() >= next_repair {
                repair_tries += 1;
                match engine.store.repair() {
                    Ok(true) => {
                        repair_tries = 0;
                        engine.resume_all();
                    }
                    Ok(false) => next_repair = Instant::now() + repair.delay(repair_tries),
                    Err(e) => {
                        log::error!("cannot reload the event log: {e}");
                        next_repair = Instant::now() + repair.delay(repair_tries);
                    }
                }
            }
            continue;
        }
        engine.store.tick();
        engine.run_due_stalled();
        engine.run_leak_pass();
        engine.run_retention_pass();
    }
}
