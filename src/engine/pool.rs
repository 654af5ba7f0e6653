//! The build pool: `workers` threads fed job ids by a crossbeam channel.
//!
//! Invariant: at most `workers` builds run at once; closing the pool lets running work end
//! (or, after the grace period, has it cancelled) and joins every thread.

use crossbeam_channel::{Receiver, Sender, unbounded};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How a pool's close ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Every thread ended its work within the grace.
    Finished,
    /// The grace ran out: running work was cancelled.
    GraceOver,
    /// A second stop signal (or its channel's end) cut the grace: running work was cancelled.
    SecondSignal,
}

pub struct Pool {
    tx: Option<Sender<u64>>,
    exited: Receiver<()>,
    handles: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `n` threads, each running `work(job)` for the ids it receives.
    pub fn start(n: usize, work: Arc<dyn Fn(u64) + Send + Sync>) -> std::io::Result<Pool> {
        let (tx, rx) = unbounded::<u64>();
        let (exit_tx, exited) = unbounded::<()>();
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let rx = rx.clone();
            let work = Arc::clone(&work);
            let exit_tx = exit_tx.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("build-{i}"))
                    .spawn(move || {
                        for job in rx.iter() {
                            work(job);
                        }
                        let _ = exit_tx.send(());
                    })?,
            );
        }
        Ok(Pool {
            tx: Some(tx),
            exited,
            handles,
        })
    }

    pub fn sender(&self) -> Option<Sender<u64>> {
        self.tx.clone()
    }

    /// Closes the queue, waits up to `grace` for the threads to drain it (or until `now`
    /// receives a message: a second stop signal), then calls `expire` with why (it should
    /// cancel running work) and waits for the rest. Says how it ended.
    pub fn close(
        mut self,
        grace: Duration,
        now: &Receiver<()>,
        expire: impl FnOnce(&str),
    ) -> Closed {
        self.tx = None;
        let deadline = Instant::now().checked_add(grace);
        let mut left = self.handles.len();
        let mut why = None;
        let mut closed = Closed::Finished;
        while left > 0 {
            let wait = deadline.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            crossbeam_channel::select! {
                recv(self.exited) -> r => match r {
                    Ok(()) => left -= 1,
                    Err(_) => break,
                },
                recv(now) -> _ => {
                    why = Some("a second stop signal ends the grace period");
                    closed = Closed::SecondSignal;
                    break;
                }
                default(wait) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        why = Some("the grace period is over");
                        closed = Closed::GraceOver;
                        break;
                    }
                }
            }
        }
        if left > 0 {
            expire(why.unwrap_or("stopping"));
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
        closed
    }
}
