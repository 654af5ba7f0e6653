//! Operator actions on one job, each recorded as an event before it acts: `retry` (a built
//! job queued again), `cancel` (a queued job never built, a running one killed), `redeliver`
//! (an answered job's answer sent again), `repush` (its final status pushed again).
//!
//! Invariant: an action that does not apply to the job is refused with the lifecycle's reason
//! (`retry_refusal`, `cancel_refusal`) and records nothing.

use super::ports::Pushed;
use super::store::StoreError;
use super::{Engine, EngineError, Result};
use crate::domain::lifecycle;
use crate::domain::{EventKind, Job, Receipt, State};

impl Engine {
    /// `retry`: a built job that is over is queued again (the same workitem; its next build is
    /// attempt + 1). Returns whether a build pool took it now (else the next start builds it).
    pub fn retry(&self, id: u64) -> Result<bool> {
        let job = self.store.job(id).ok_or(StoreError::NoJob(id))?;
        if let Some(why) = lifecycle::retry_refusal(&job) {
            return Err(EngineError::Refused(why));
        }
        self.store.record(
            Some(id),
            EventKind::Requeued {
                reason: format!("retry by the operator (attempt {})", job.attempts + 1),
                file: None,
                from_worker: None,
            },
        )?;
        Ok(self.enqueue(id))
    }

    /// `cancel`: a queued job is never built; a running one has its build killed. Both are
    /// answered with the error "cancelled" (and ERROR pushed). Returns true when the job was
    /// answered now, false when a running build was told to stop (its build thread answers it).
    pub fn cancel(&self, id: u64) -> Result<bool> {
        let decide = self.slots_decide();
        let job = self.store.job(id).ok_or(StoreError::NoJob(id))?;
        if let Some(why) = lifecycle::cancel_refusal(&job) {
            return Err(EngineError::Refused(why));
        }
        if job.state == State::Building && self.cancel_running_build(id) {
            return Ok(false);
        }
        self.store.record_batch(vec![
            (
                Some(id),
                EventKind::Cancelled {
                    reason: "cancelled by the operator".into(),
                },
            ),
            (
                Some(id),
                EventKind::Finished {
                    result: false,
                    error: Some("cancelled".into()),
                    urls: job.urls.clone(),
                    failure: Some(crate::domain::Failure::Cancelled),
                    boot_seconds: None,
                },
            ),
        ])?;
        drop(decide);
        // Never built: its claim of the job folder (made at the intake) is let go, and the
        // folder goes if nothing else is in it.
        if job.attempts == 0
            && let Ok(Some(spec)) = self.store.spec(&job)
        {
            crate::imaging::jobdir::release_unbuilt(&self.cfg.worker, &spec, &self.worker);
        }
        self.slot_may_be_free();
        self.advance(id)?;
        Ok(true)
    }

    /// `redeliver`: an answered job's answer sent again the way it went the first time (the
    /// same bytes: the answer is built from the log as it was then), never over another job's
    /// answer, recorded as a `delivered` event. Returns where it went and whether the bytes
    /// are those of the job's last recorded answer.
    pub fn redeliver(&self, id: u64) -> Result<(Receipt, bool)> {
        let job = self.store.job(id).ok_or(StoreError::NoJob(id))?;
        if !job.state.is_answered() || job.receipt.is_none() {
            return Err(EngineError::Refused(format!(
                "job {id} is {}: only an answered job (done or error) can be delivered again{}",
                job.state,
                if job.state == State::Finished {
                    " (its answer is being written now)"
                } else {
                    ""
                }
            )));
        }
        let receipt = self.deliver(&job, None)?;
        let identical = receipt
            .sha256()
            .is_none_or(|sha| job.answers.last().map(String::as_str) == Some(sha));
        Ok((receipt, identical))
    }

    /// `repush`: the final status of an answered job pushed once more, now, in this thread
    /// (a job database restored from a backup), recorded as a `pushed` event. None when no
    /// push utility is configured.
    pub fn repush(&self, job: &Job) -> Result<Option<Pushed>> {
        self.pusher.push_final_now(job)
    }
}

#[cfg(test)]
mod tests {
    use crate::domain::State;
    use crate::engine::EngineError;
    use crate::engine::testkit::Rig;

    #[test]
    fn cancel_answers_a_queued_job_and_refuses_an_answered_one() {
        let rig = Rig::new();
        let id = rig.drop_and_take("a.json", &rig.workitem("c-1"));
        assert!(rig.engine.cancel(id).unwrap(), "answered now");
        let job = rig.engine.store.job(id).unwrap();
        assert_eq!(job.state, State::Error);
        assert_eq!(job.error.as_deref(), Some("cancelled"));
        let again = rig.engine.cancel(id).unwrap_err();
        assert!(matches!(again, EngineError::Refused(_)), "{again}");
        // never built: retry refuses it too
        let e = rig.engine.retry(id).unwrap_err();
        assert!(e.to_string().contains("never built"), "{e}");
    }

    #[test]
    fn retry_queues_a_built_job_again_and_redeliver_sends_the_same_answer() {
        let rig = Rig::new();
        let id = rig.drop_and_take("a.json", &rig.workitem("r-1"));
        rig.engine.build(id).unwrap();
        let (receipt, identical) = rig.engine.redeliver(id).unwrap();
        assert_eq!(receipt.outbox_name(), Some("a.json"));
        assert!(identical);
        assert!(!rig.engine.retry(id).unwrap(), "no pool runs in the rig");
        let job = rig.engine.store.job(id).unwrap();
        assert_eq!((job.state, job.attempts), (State::Queued, 1));
        let e = rig.engine.redeliver(id).unwrap_err();
        assert!(matches!(e, EngineError::Refused(_)), "{e}");
    }
}
