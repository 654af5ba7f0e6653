//! What builds left on the host and could not free: each such resource is a `leaked` event of
//! its job (recorded with the build's end, or by the release of a build lost to a crash at the
//! next start); a job with leaks stays open (`Step::Release`), and the timer's pass over such
//! jobs ([`Engine::run_leak_pass`], with back-off from 1 s to a minute while something is still
//! held) frees again what is still there, recording `leak_freed` for what is gone.
//!
//! Invariant: only the job's own folder is looked at (`imaging::place::release`); a leak is
//! forgotten only when a pass finds it gone, never assumed.

use super::backoff::Backoff;
use super::store::lock;
use super::{Engine, EngineError, Result};
use crate::domain::job::Leak;
use crate::domain::{EventKind, Job};
use crate::imaging::place::{self, Release};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When the next pass over jobs with leaks is due, and how many passes in a row found
/// something still held.
#[derive(Default)]
pub struct LeakPass {
    due: Mutex<Option<(Instant, u32)>>,
}

/// The `leaked` events of a release: one per thing it could not free.
pub(crate) fn leaked_events(r: &Release) -> Vec<EventKind> {
    r.leaked
        .iter()
        .map(|l| EventKind::Leaked {
            what: l.what.clone(),
            why: l.why.clone(),
        })
        .collect()
}

/// The events that bring a job's recorded leaks up to date with what a pass found still held:
/// `leak_freed` for each one gone, `leaked` for each one new or whose reason changed.
fn reconcile(recorded: &[Leak], found: &Release) -> Vec<EventKind> {
    let mut kinds: Vec<EventKind> = recorded
        .iter()
        .filter(|l| !found.leaked.iter().any(|f| f.what == l.what))
        .map(|l| EventKind::LeakFreed {
            what: l.what.clone(),
        })
        .collect();
    kinds.extend(
        found
            .leaked
            .iter()
            .filter(|f| !recorded.iter().any(|l| l.what == f.what && l.why == f.why))
            .map(|f| EventKind::Leaked {
                what: f.what.clone(),
                why: f.why.clone(),
            }),
    );
    kinds
}

impl Engine {
    /// Passes over this worker's jobs with leaks when due: each is released again; while
    /// something is still held the next pass is later (back-off to a minute).
    pub fn run_leak_pass(&self) {
        let mut due = lock(&self.leak_pass.due);
        let now = Instant::now();
        if due.is_some_and(|(at, _)| now < at) || self.stopping() {
            return;
        }
        let jobs: Vec<Job> = self.store.with_open(|jobs| {
            jobs.values()
                .filter(|j| !j.leaks.is_empty() && self.is_mine(j))
                .filter(|j| {
                    crate::domain::lifecycle::next_step(j, self.store.policy())
                        == crate::domain::lifecycle::Step::Release
                })
                .cloned()
                .collect()
        });
        let tries = due.map_or(0, |(_, n)| n);
        if jobs.is_empty() {
            *due = Some((now + Duration::from_secs(1), 0));
            return;
        }
        let mut held = false;
        for job in &jobs {
            if let Err(e) = self.release_leaks(job) {
                log::info!("job {}: {e}", job.id);
                held = true;
            }
        }
        let tries = if held { tries + 1 } else { 0 };
        let delay = Backoff::new(Duration::from_secs(1), Duration::from_secs(60)).delay(tries);
        *due = Some((Instant::now() + delay, tries));
    }

    /// A pass over a job with leaks: frees again what its folder still holds, records what is
    /// gone; Err (Deferred: the job stalls and is passed over again later) while something is
    /// still held.
    pub(crate) fn release_leaks(&self, job: &Job) -> Result<()> {
        let spec = self.store.build_spec(job)?;
        let dir = crate::imaging::job_dir(&self.cfg.worker, &spec);
        let found = place::release(&dir, self.cfg.worker.sudo);
        for line in &found.freed {
            log::info!("job {}: released {line}", job.id);
        }
        let kinds = reconcile(&job.leaks, &found);
        if !kinds.is_empty() {
            let items = kinds.into_iter().map(|k| (Some(job.id), k)).collect();
            self.store.record_batch(items)?;
        }
        if found.leaked.is_empty() {
            Ok(())
        } else {
            Err(EngineError::Deferred(format!(
                "its build left {} resource(s) still held: {}",
                found.leaked.len(),
                found
                    .leaked
                    .iter()
                    .map(|l| l.what.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }

    /// Frees what a build lost to a crash left on the host (its place), noted in its job log;
    /// what cannot be freed is recorded `leaked`.
    pub(crate) fn release_lost(&self, job: &Job) {
        match self.store.build_spec(job) {
            Ok(spec) => {
                let r = place::release_lost(&self.cfg.worker, &spec);
                let kinds = leaked_events(&r);
                if !kinds.is_empty() {
                    let items = kinds.into_iter().map(|k| (Some(job.id), k)).collect();
                    if let Err(e) = self.store.record_batch(items) {
                        log::error!("job {}: cannot record what its build left: {e}", job.id);
                    }
                }
            }
            Err(e) => log::warn!("job {}: cannot find its job folder to release: {e}", job.id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imaging::place::Leak as Found;

    #[test]
    fn a_pass_records_what_is_gone_and_what_is_new() {
        let recorded = vec![
            Leak {
                what: "mount /a".into(),
                why: "busy".into(),
            },
            Leak {
                what: "loop device /dev/loop9".into(),
                why: "in use".into(),
            },
        ];
        let found = Release {
            freed: vec![],
            leaked: vec![Found {
                what: "loop device /dev/loop9".into(),
                why: "in use".into(),
            }],
        };
        assert_eq!(
            reconcile(&recorded, &found),
            vec![EventKind::LeakFreed {
                what: "mount /a".into()
            }]
        );
        assert!(reconcile(&recorded[1..], &found).is_empty());
        assert_eq!(reconcile(&[], &found).len(), 1);
    }
}
