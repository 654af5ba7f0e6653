//! The step driver: moves a job through every step that needs no build slot (read, give up,
//! deliver, deliver a re-drop's copy, hand over a push, reject), stalls a job whose step
//! failed and moves it again with back-off, and recovers at a start.
//!
//! Invariants: what to do next is only ever `lifecycle::next_step` of the job as folded now;
//! recovery is these same steps run over the open jobs (a job found `building` is first
//! recorded `interrupted`, the daemon having died under it), after the held inputs are
//! reconciled with the log: an input no live job holds is the leftover of a settled job (its
//! last step runs again), a body kept but never claimed (never acknowledged: its source sends
//! it again), or an input claimed but never recorded (claimed now).

use super::backoff::Backoff;
use super::store::{StoreError, lock};
use super::{Engine, EngineError, Result};
use crate::domain::lifecycle::{self, Step};
use crate::domain::origin::{Body, Submission};
use crate::domain::{Cause, EventKind, State};
use crossbeam_channel::{Receiver, Sender, bounded};
use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A stalled job: when it is due, its failures so far, and whether its step is being run again
/// now (taken by the timer: handed to a build slot, say), so that nothing else moves it meanwhile.
#[derive(Debug, Clone, Copy)]
struct Stall {
    at: Instant,
    tries: u32,
    moving: bool,
}

/// Jobs whose step failed (a full disk, a peer away), to be moved again later.
pub struct Stalls {
    due: Mutex<BTreeMap<u64, Stall>>,
    /// Wakes the timer thread (a stall scheduled).
    wake: (Sender<()>, Receiver<()>),
}

impl Default for Stalls {
    fn default() -> Stalls {
        Stalls {
            due: Mutex::new(BTreeMap::new()),
            wake: bounded(1),
        }
    }
}

impl Stalls {
    pub(crate) fn clear(&self, id: u64) {
        lock(&self.due).remove(&id);
    }
}

impl Engine {
    /// Moves a job forward through every step that needs no build slot; a failing step
    /// stalls it (to be tried again with back-off).
    pub fn advance_or_stall(&self, id: u64) {
        if let Err(e) = self.advance(id) {
            self.stall(id, &e);
        }
    }

    /// Moves a job forward through every step that needs no build slot. Returns the step it
    /// stopped at.
    pub fn advance(&self, id: u64) -> Result<Step> {
        loop {
            let job = self.store.job(id).ok_or(StoreError::NoJob(id))?;
            let step = lifecycle::next_step(&job, self.store.policy());
            match &step {
                Step::Read => self.read_input(&job)?,
                Step::Build => {
                    self.enqueue(id);
                    return Ok(step);
                }
                Step::GiveUp => {
                    self.store.record(
                        Some(id),
                        EventKind::Finished {
                            result: false,
                            error: Some(format!(
                                "the build was lost {} time(s) to a crash of the daemon; giving up (max_attempts = {}); last: {}",
                                job.lost,
                                self.cfg.worker.max_attempts,
                                job.reason.as_deref().unwrap_or("unknown")
                            )),
                            urls: job.urls.clone(),
                            failure: Some(crate::domain::Failure::Infrastructure),
boot_seconds: None,
                        },
                    )?;
                }
                Step::Deliver => {
                    self.deliver(&job, None)?;
                }
                Step::DeliverCopy(file) => {
                    self.deliver(&job, Some(file))?;
                }
                Step::Push(status) => {
                    self.pusher.push(id, *status);
                    return Ok(step);
                }
                // the timer's leak pass frees it (see `leaks`)
                Step::Release => return Ok(step),
                Step::Settled if job.state == State::Rejected => {
                    // Its input goes aside with the reason (again, after a crash).
                    if let Some(file) = &job.file
                        && self.inputs.holds(file)
                    {
                        let reason = job.reason.clone().unwrap_or_default();
                        self.inputs.reject(file, &reason)?;
                    }
                    return Ok(step);
                }
                Step::Running | Step::Settled => return Ok(step),
            }
        }
    }

    /// Marks a job whose step failed to be moved forward again later (back-off from
    /// poll_interval_ms up to a minute).
    pub fn stall(&self, id: u64, why: &EngineError) {
        let mut due = lock(&self.stalls.due);
        let tries = due.get(&id).map_or(1, |st| st.tries + 1);
        let delay = Backoff::new(
            Duration::from_millis(self.cfg.spool.poll_interval_ms),
            Duration::from_secs(60),
        )
        .delay(tries);
        match why {
            EngineError::Deferred(_) => log::info!("job {id}: {why}; trying again in {delay:?}"),
            _ => log::error!("job {id}: {why}; trying again in {delay:?}"),
        }
        due.insert(
            id,
            Stall {
                at: Instant::now() + delay,
                tries,
                moving: false,
            },
        );
        let _ = self.stalls.wake.0.try_send(());
    }

    /// Every stalled job is due now (room came back: a build waiting for it need not wait out
    /// its back-off), except one whose step is being run again right now: moving it too would
    /// hand one job to two build slots at once.
    pub(crate) fn stalled_now(&self) {
        let now = Instant::now();
        for st in lock(&self.stalls.due).values_mut().filter(|st| !st.moving) {
            st.at = st.at.min(now);
        }
        let _ = self.stalls.wake.0.try_send(());
    }

    /// Makes a stalled job due now (what its step waited for has come, e.g. the broker's
    /// confirm of its answer) rather than at the end of its back-off. A job not stalled is left
    /// alone (its step is under way, or done).
    pub fn wake_stalled(&self, id: u64) {
        let mut due = lock(&self.stalls.due);
        if let Some(st) = due.get_mut(&id).filter(|st| !st.moving) {
            st.at = Instant::now();
            drop(due);
            let _ = self.stalls.wake.0.try_send(());
        }
    }

    /// The jobs whose step failed and waits to be tried again.
    pub fn stalled(&self) -> Vec<u64> {
        lock(&self.stalls.due).keys().copied().collect()
    }

    /// When the next stalled job is due.
    pub fn next_stall(&self) -> Option<Instant> {
        lock(&self.stalls.due).values().map(|st| st.at).min()
    }

    /// Ready when a stall was scheduled.
    pub fn wakeups(&self) -> &Receiver<()> {
        &self.stalls.wake.1
    }

    /// Moves the stalled jobs whose time has come.
    pub fn run_due_stalled(&self) {
        if self.store.failing().is_some() {
            return;
        }
        let now = Instant::now();
        let due: Vec<u64> = lock(&self.stalls.due)
            .iter()
            .filter(|(_, st)| !st.moving && st.at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            // Not due again while this step runs. If it hands the job to a build slot, the slot
            // says how it went: a build deferred again stalls it with a longer back-off (so this
            // mark is set before, never after, the hand-over), a build that starts clears it.
            if let Some(st) = lock(&self.stalls.due).get_mut(&id) {
                st.moving = true;
                st.at = now + Duration::from_secs(3600);
            }
            match self.advance(id) {
                Ok(Step::Build) => {}
                Ok(_) => {
                    self.stalls.clear(id);
                    log::info!("job {id}: moving again");
                }
                Err(e) => self.stall(id, &e),
            }
        }
    }

    /// After the log was repaired: every open job is moved forward again (its steps whose
    /// records were lost are done again).
    pub fn resume_all(&self) {
        let running = self.running_ids();
        for id in self.store.open_jobs().into_keys() {
            if !running.contains(&id) {
                self.advance_or_stall(id);
            }
        }
    }

    /// Reconciles the log with the held inputs, then moves every open job of this worker
    /// forward: the normal steps, run again. Returns the open jobs it found.
    pub fn recover(&self) -> Result<Vec<u64>> {
        self.builder.recover(&self.registry);
        let jobs = self.store.open_jobs();
        let held = self.held_names();
        let mut unlogged = Vec::new();
        for input in self.inputs.held()? {
            let name = input.name;
            if held.contains(&name) {
                continue;
            }
            // No live job holds it: the leftover of a settled job (a crash undid its release),
            // a body kept but never claimed, or an input claimed but never recorded.
            let read = self.read_held(&name);
            let settled = match read.unreadable {
                Some(_) => None,
                None => self
                    .store
                    .journal()?
                    .jobs_for_sha(&read.sha256)?
                    .into_iter()
                    .rev()
                    .filter_map(|id| self.store.job(id))
                    .find(|j| {
                        self.is_mine(j)
                            && (j.file.as_deref() == Some(name.as_str())
                                || j.copies.iter().any(|k| k.file == name))
                    }),
            };
            match settled {
                Some(job) if job.state == State::Rejected => {
                    let reason = job.reason.clone().unwrap_or_default();
                    self.inputs.reject(&name, &reason)?;
                }
                Some(_) => self.inputs.release(&name)?,
                None if input.kept => {
                    // Its claim was never recorded, so its source never had it acknowledged,
                    // and sends it again.
                    log::info!("recovery: the kept body {name} was never claimed: removed");
                    self.inputs.release(&name)?;
                }
                None => {
                    log::info!("recovery: {name} is held but has no job: claiming it");
                    unlogged.push(Submission {
                        origin: input.origin,
                        body: Body::Claimed(name),
                    });
                }
            }
        }
        if !unlogged.is_empty()
            && let Err(e) = self.submit(unlogged)
        {
            log::error!("recovery: cannot record the claims of unrecorded inputs: {e}");
        }
        let mut open = Vec::new();
        let mut queued = 0;
        for (id, job) in jobs.iter().filter(|(_, j)| self.is_mine(j)) {
            open.push(*id);
            if job.state == State::Building {
                // Nothing runs at a start: the daemon died under this build; what it left on
                // the host is freed before anything else is built.
                self.release_lost(job);
                if let Err(e) = self.store.record(
                    Some(*id),
                    EventKind::Interrupted {
                        reason: format!("the daemon died during attempt {}", job.attempts),
                        cause: Cause::Crash,
                    },
                ) {
                    self.stall(*id, &e.into());
                    continue;
                }
            }
            match self.advance(*id) {
                Ok(Step::Build) => queued += 1,
                Ok(_) => {}
                Err(e) => self.stall(*id, &e),
            }
        }
        if queued > 0 {
            log::info!("recovery: {queued} job(s) queued again");
        }
        Ok(open)
    }

    pub(crate) fn running_ids(&self) -> HashSet<u64> {
        self.slots.running_ids()
    }
}

#[cfg(test)]
mod tests {
    use crate::domain::State;
    use crate::engine::testkit::Rig;
    use serde_json::json;

    #[test]
    fn a_job_whose_answer_cannot_go_out_stalls_and_moves_again() {
        let rig = Rig::new();
        rig.engine
            .set_answerer(crate::domain::ReplyTo::Outbox, None);
        let id = rig.drop_and_take("x.json", &json!({"image": {}}));
        assert_eq!(rig.engine.store.job(id).unwrap().state, State::Finished);
        assert!(rig.engine.next_stall().is_some(), "stalled");
        rig.connect_outbox();
        assert!(crate::wait::wait_for(
            std::time::Duration::from_secs(10),
            || {
                rig.engine.run_due_stalled();
                rig.engine.store.job(id).unwrap().state == State::Error
            }
        ));
        assert!(rig.engine.next_stall().is_none());
    }

    #[test]
    fn recovery_claims_unrecorded_inputs_and_drops_unclaimed_bodies() {
        let rig = Rig::new();
        // an input moved in before a crash, its claim never recorded
        std::fs::write(
            rig.held_dir().join("lost.json"),
            serde_json::to_vec(&rig.workitem("lost-1")).unwrap(),
        )
        .unwrap();
        // a body kept before a crash, never claimed (so never acknowledged)
        std::fs::write(rig.held_dir().join(".kept-1.json"), b"{}").unwrap();
        let open = rig.engine.recover().unwrap();
        assert!(open.is_empty(), "no job was open before");
        let lost = rig.job_by_file("lost.json").unwrap();
        assert_eq!(lost.state, State::Queued);
        assert!(!rig.held_dir().join(".kept-1.json").exists());
    }

    #[test]
    fn recovery_interrupts_a_build_the_daemon_died_under() {
        let rig = Rig::new();
        let id = rig.drop_and_take("b.json", &rig.workitem("b-1"));
        rig.engine
            .store
            .record(
                Some(id),
                crate::domain::EventKind::Started {
                    mode: crate::domain::Mode::Native,
                    attempt: 1,
                },
            )
            .unwrap();
        let open = rig.engine.recover().unwrap();
        assert_eq!(open, vec![id]);
        let job = rig.engine.store.job(id).unwrap();
        // no build pool runs in the rig: it waits to be built again
        assert_eq!((job.state, job.lost), (State::Interrupted, 1), "{job:?}");
    }
}
