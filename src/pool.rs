//! The build pool: `workers` threads fed job ids by a crossbeam channel.
//!
//! Invariant: at most `workers` builds run at once; closing the pool lets running work end
//! (or, after the grace period, has it cancelled) and joins every thread.

use crossbeam_channel::{Receiver, Sender, unbounded};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

    /// Closes the queue, waits up to `grace` for the threads to drain it, then calls
    /// `expire` (which should cancel running work) and waits for the rest.
    pub fn close(mut self, grace: Duration, expire: impl FnOnce()) {
        self.tx = None;
        let deadline = Instant::now() + grace;
        let mut left = self.handles.len();
        while left > 0 {
            match self
                .exited
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(()) => left -= 1,
                Err(_) => break,
            }
        }
        if left > 0 {
            expire();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
