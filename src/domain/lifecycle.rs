//! A job's lifecycle: what is left to do for a job, as a pure decision table over its folded
//! state and the daemon's policy. No I/O, no clock: `next_step(&Job, &Policy) -> Step`.
//!
//! Invariant: this is the one definition of "open", "settled", "answered" and "live" (holds
//! its file in `active/`): the daemon, recovery, `run --once`, the journal's open-jobs index and
//! `replay` all ask it, so they cannot disagree.

use crate::domain::{Job, State, Status};

/// What the daemon is set to do for every job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// A push utility is configured.
    pub push: bool,
    /// Further push attempts after a failed one.
    pub push_retries: u32,
    /// Builds lost to a crash before a job is answered with an error.
    pub max_attempts: u32,
}

/// The next thing to do for a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Read the claimed file and decide what it is (rejected, invalid, conflict, queued).
    Read,
    /// Give it a build slot.
    Build,
    /// A build is running. At a start nothing is: the build was lost to a crash, and is
    /// recorded as interrupted.
    Running,
    /// Too many builds were lost to crashes: answer with an error.
    GiveUp,
    /// Send the answer (and release the input).
    Deliver,
    /// Write the answer for this byte-identical re-drop (its file in `active/`).
    DeliverCopy(String),
    /// Push the final status.
    Push(Status),
    /// Free again what its builds left on the host and could not free (`leaked`): a job
    /// stays open until it is freed.
    Release,
    /// Nothing is left to do.
    Settled,
}

/// What is left to do for `job` under `policy`.
pub fn next_step(job: &Job, policy: &Policy) -> Step {
    match job.state {
        State::Claimed => Step::Read,
        State::Queued => Step::Build,
        State::Interrupted if job.lost >= policy.max_attempts => Step::GiveUp,
        State::Interrupted => Step::Build,
        State::Building => Step::Running,
        State::Finished => Step::Deliver,
        State::Done | State::Error => {
            if let Some(c) = job.copies.iter().find(|c| c.unanswered()) {
                Step::DeliverCopy(c.file.clone())
            } else if needs_push(job, policy) {
                Step::Push(job.final_status())
            } else if !job.leaks.is_empty() {
                Step::Release
            } else {
                Step::Settled
            }
        }
        State::Rejected | State::Moved => Step::Settled,
    }
}

/// Is the final status still to be pushed (and may it be tried again)?
fn needs_push(job: &Job, policy: &Policy) -> bool {
    policy.push
        && job.held_by.is_none()
        && !job.final_pushed
        && job.final_push_attempts <= policy.push_retries
}

/// Nothing is left to do for the job.
pub fn is_settled(job: &Job, policy: &Policy) -> bool {
    next_step(job, policy) == Step::Settled
}

/// Something is left to do: the daemon keeps the job in memory and the log marks it open.
pub fn is_open(job: &Job, policy: &Policy) -> bool {
    !is_settled(job, policy)
}

/// Does the job hold a file in `active/<worker>/` (its own input, or a re-drop not answered
/// yet)?
pub fn is_live(job: &Job) -> bool {
    matches!(
        job.state,
        State::Claimed | State::Queued | State::Building | State::Interrupted | State::Finished
    ) || job.copies.iter().any(|c| c.unanswered())
}

/// Did the final push fail for good (every attempt spent)?
pub fn push_failed(job: &Job, policy: &Policy) -> bool {
    job.state.is_answered()
        && policy.push
        && job.held_by.is_none()
        && !job.final_pushed
        && job.final_push_attempts > policy.push_retries
}

/// Why `retry` refuses a job, if it does: only a job that was built and is over can be
/// built again.
pub fn retry_refusal(job: &Job) -> Option<String> {
    let id = job.id;
    match job.state {
        State::Finished | State::Done | State::Error if job.was_built() => None,
        State::Finished | State::Done | State::Error => Some(match job.held_by {
            Some(holder) => format!(
                "job {id} was never built: it was a conflict with job {holder}, which holds its image_id (retry job {holder} instead)"
            ),
            None if job.accepted => {
                format!("job {id} was never built: it was cancelled before it ran; submit it again")
            }
            None => format!(
                "job {id} was never built: its workitem is invalid ({}); fix it and submit it again",
                job.error.as_deref().unwrap_or("?")
            ),
        }),
        s => Some(format!(
            "job {id} is {s}: only a finished job (done or error) can be retried"
        )),
    }
}

/// Why `cancel` refuses a job, if it does: only a queued or running job can be cancelled.
pub fn cancel_refusal(job: &Job) -> Option<String> {
    match job.state {
        State::Queued | State::Interrupted | State::Building => None,
        s => Some(format!(
            "job {} is {s}: only a queued or running job can be cancelled",
            job.id
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::Delivery;
    use crate::domain::workitem::{Spec, Urls};
    use crate::domain::{Cause, Event, EventKind, Mode, Receipt, Tag};
    use serde_json::json;

    fn spec() -> Spec {
        Spec::sample("n", "fs")
    }

    /// A canonical event of each kind.
    fn event(tag: Tag) -> EventKind {
        match tag {
            Tag::Claimed => EventKind::Claimed {
                file: "a.json".into(),
                worker: "w1".into(),
                bytes: 10,
                sha256: "ab".into(),
                source: None,
            },
            Tag::Rejected => EventKind::Rejected {
                file: "a.json".into(),
                reason: "empty file".into(),
            },
            Tag::Invalid => EventKind::Invalid {
                image_id: Some("7-1".into()),
                error: "missing arch".into(),
                held_by: None,
                input: json!({}).into(),
            },
            Tag::Queued => EventKind::Queued {
                image_id: "7-1".into(),
                spec: Box::new(spec()),
                input: json!({}).into(),
            },
            Tag::Started => EventKind::Started {
                mode: Mode::Native,
                attempt: 1,
            },
            Tag::Finished => EventKind::Finished {
                result: true,
                error: None,
                urls: Urls::default(),
                failure: None,
                boot_seconds: None,
            },
            Tag::Delivered => EventKind::Delivered(Delivery {
                receipt: Receipt::Outbox {
                    name: "a.json".into(),
                    sha256: Some("cd".into()),
                },
                copy: None,
            }),
            Tag::Pushed => EventKind::Pushed {
                status: Status::Done,
                exit: Some(0),
                ok: true,
                error: None,
            },
            Tag::Cancelled => EventKind::Cancelled {
                reason: "by the operator".into(),
            },
            Tag::Requeued => EventKind::Requeued {
                reason: "retry".into(),
                file: None,
                from_worker: None,
            },
            Tag::Interrupted => EventKind::Interrupted {
                reason: "daemon died".into(),
                cause: Cause::Crash,
            },
            Tag::Duplicate => EventKind::Duplicate {
                file: "b.json".into(),
                worker: "w1".into(),
                bytes: 10,
                sha256: "ab".into(),
                source: None,
            },
            Tag::Leaked => EventKind::Leaked {
                what: "mount /srv/images/requests/7-1/.build-tmp/x".into(),
                why: "busy".into(),
            },
            Tag::LeakFreed => EventKind::LeakFreed {
                what: "mount /srv/images/requests/7-1/.build-tmp/x".into(),
            },
            Tag::Pinned => EventKind::Pinned {},
            Tag::Unpinned => EventKind::Unpinned {},
            Tag::Expired => EventKind::Expired {
                files: vec!["requests/7-1/a.raw".into()],
                bytes: 10,
                reason: "keep_last = 1".into(),
            },
            Tag::Compacted => EventKind::Compacted {
                file: "/var/archive.jsonl".into(),
                reason: "compacted".into(),
                before: "2026-01-01T00:00:00Z".into(),
                jobs: 1,
                events: 5,
            },
            Tag::Drained => EventKind::Drained {
                reason: "maintenance".into(),
            },
            Tag::Undrained => EventKind::Undrained {},
            Tag::CancelNoted => EventKind::CancelNoted {
                fei: "{}".into(),
                expires: 1,
            },
        }
    }

    fn fold(kinds: Vec<EventKind>) -> Job {
        let mut job = Job::default();
        for (i, kind) in kinds.into_iter().enumerate() {
            job.apply_event(&Event {
                seq: 1 + i as u64,
                ts: format!("2026-11-25T00:00:{i:02}Z"),
                job: 1,
                kind,
            });
        }
        job
    }

    /// A job in each state, folded from the events that lead there.
    fn job_in(state: State) -> Job {
        use Tag::*;
        let path: &[Tag] = match state {
            State::Claimed => &[Claimed],
            State::Queued => &[Claimed, Queued],
            State::Building => &[Claimed, Queued, Started],
            State::Interrupted => &[Claimed, Queued, Started, Interrupted],
            State::Finished => &[Claimed, Queued, Started, Finished],
            State::Done => &[Claimed, Queued, Started, Finished, Delivered],
            State::Error => &[Claimed, Invalid, Delivered],
            State::Rejected => &[Claimed, Rejected],
            State::Moved => {
                return fold(vec![EventKind::Requeued {
                    reason: "moved".into(),
                    file: Some("a.json".into()),
                    from_worker: Some("w2".into()),
                }]);
            }
        };
        let job = fold(path.iter().map(|t| event(*t)).collect());
        assert_eq!(job.state, state, "the path to {state} leads elsewhere");
        job
    }

    /// State × event: the state after applying each kind (columns in `Tag::ALL` order:
    /// claimed rejected invalid queued started finished delivered pushed cancelled requeued
    /// interrupted duplicate compacted leaked leak_freed pinned unpinned expired drained undrained cancel_noted;
    /// the farm-level ones change no job: the fold never hands them to one).
    #[test]
    fn every_state_by_every_event() {
        use State::*;
        const C: State = Claimed;
        const Q: State = Queued;
        const B: State = Building;
        const I: State = Interrupted;
        const F: State = Finished;
        const D: State = Done;
        const E: State = Error;
        const R: State = Rejected;
        const M: State = Moved;
        let table: [(State, [State; Tag::ALL.len()]); State::ALL.len()] = [
            (
                C,
                [
                    C, R, F, Q, B, F, E, C, C, Q, I, C, M, C, C, C, C, C, C, C, C,
                ],
            ),
            (
                Q,
                [
                    C, R, F, Q, B, F, E, Q, Q, Q, I, Q, M, Q, Q, Q, Q, Q, Q, Q, Q,
                ],
            ),
            (
                B,
                [
                    C, R, F, Q, B, F, E, B, B, Q, I, B, M, B, B, B, B, B, B, B, B,
                ],
            ),
            (
                I,
                [
                    C, R, F, Q, B, F, E, I, I, Q, I, I, M, I, I, I, I, I, I, I, I,
                ],
            ),
            (
                F,
                [
                    C, R, F, Q, B, F, D, F, F, Q, I, F, M, F, F, F, F, F, F, F, F,
                ],
            ),
            (
                D,
                [
                    C, R, F, Q, B, F, D, D, D, Q, I, D, M, D, D, D, D, D, D, D, D,
                ],
            ),
            (
                E,
                [
                    C, R, F, Q, B, F, E, E, E, Q, I, E, M, E, E, E, E, E, E, E, E,
                ],
            ),
            (
                R,
                [
                    C, R, F, Q, B, F, E, R, R, Q, I, R, M, R, R, R, R, R, R, R, R,
                ],
            ),
            (
                M,
                [
                    C, R, F, Q, B, F, E, M, M, Q, I, M, M, M, M, M, M, M, M, M, M,
                ],
            ),
        ];
        // Every state has its row, in order.
        assert_eq!(table.map(|(s, _)| s), State::ALL);
        for (state, row) in table {
            for (tag, want) in Tag::ALL.into_iter().zip(row) {
                let mut job = job_in(state);
                let before = job.clone();
                let seq = job.last_seq + 1;
                job.apply_event(&Event {
                    seq,
                    ts: "2026-11-25T01:00:00Z".into(),
                    job: 1,
                    kind: event(tag),
                });
                assert_eq!(job.state, want, "{state} + {tag}");
                assert_eq!(job.last_seq, seq, "{state} + {tag}: last_seq");
                // What each kind may change besides the state.
                let pushes = job.final_push_attempts - before.final_push_attempts;
                assert_eq!(
                    pushes,
                    u32::from(tag == Tag::Pushed && before.state.is_answered()),
                    "{state} + {tag}: final push attempts"
                );
                let lost = job.lost as i64 - before.lost as i64;
                let want_lost = match tag {
                    Tag::Interrupted => 1,
                    Tag::Queued | Tag::Requeued => -(before.lost as i64),
                    _ => 0,
                };
                assert_eq!(lost, want_lost, "{state} + {tag}: lost builds");
                assert_eq!(
                    job.copies.len() - before.copies.len(),
                    usize::from(tag == Tag::Duplicate),
                    "{state} + {tag}: copies"
                );
            }
        }
    }

    #[test]
    fn an_interruption_by_a_stop_is_not_a_lost_build() {
        let mut job = job_in(State::Building);
        job.apply_event(&Event {
            seq: 9,
            ts: "t".into(),
            job: 1,
            kind: EventKind::Interrupted {
                reason: "stop".into(),
                cause: Cause::Stop,
            },
        });
        assert_eq!(
            (job.state, job.lost, job.interruptions),
            (State::Interrupted, 0, 1)
        );
        let strict = Policy {
            push: false,
            push_retries: 0,
            max_attempts: 1,
        };
        assert_eq!(next_step(&job, &strict), Step::Build);
    }

    /// The policies the decision table is checked under.
    const POLICIES: [Policy; 3] = [
        // no push utility
        Policy {
            push: false,
            push_retries: 3,
            max_attempts: 2,
        },
        // a push utility, retries
        Policy {
            push: true,
            push_retries: 3,
            max_attempts: 2,
        },
        // a push utility, no retry, one lost build is too many
        Policy {
            push: true,
            push_retries: 0,
            max_attempts: 1,
        },
    ];

    fn with(mut job: Job, f: impl FnOnce(&mut Job)) -> Job {
        f(&mut job);
        job
    }

    /// State × policy: the next step, for every state and the variants of a job in it that
    /// the policy treats differently.
    #[test]
    fn every_state_by_every_policy() {
        use Step::*;
        let push_done = Push(Status::Done);
        let push_error = Push(Status::Error);
        let failed_push = |j: &mut Job| {
            j.final_push_attempts = 1;
        };
        let cases: Vec<(&str, Job, [Step; 3])> = vec![
            ("claimed", job_in(State::Claimed), [Read, Read, Read]),
            ("queued", job_in(State::Queued), [Build, Build, Build]),
            (
                "building",
                job_in(State::Building),
                [Running, Running, Running],
            ),
            (
                "interrupted once",
                job_in(State::Interrupted),
                [Build, Build, GiveUp],
            ),
            (
                "interrupted twice",
                with(job_in(State::Interrupted), |j| j.lost = 2),
                [GiveUp, GiveUp, GiveUp],
            ),
            (
                "finished",
                job_in(State::Finished),
                [Deliver, Deliver, Deliver],
            ),
            (
                "done",
                job_in(State::Done),
                [Settled, push_done.clone(), push_done.clone()],
            ),
            (
                "done, one push failed",
                with(job_in(State::Done), failed_push),
                [Settled, push_done.clone(), Settled],
            ),
            (
                "done, pushed",
                with(job_in(State::Done), |j| {
                    j.final_push_attempts = 1;
                    j.final_pushed = true;
                }),
                [Settled, Settled, Settled],
            ),
            (
                "done, a re-drop to answer",
                with(job_in(State::Done), |j| {
                    j.copies.push(crate::domain::job::Copy {
                        file: "b.json".into(),
                        worker: "w1".into(),
                        ..Default::default()
                    })
                }),
                [
                    DeliverCopy("b.json".into()),
                    DeliverCopy("b.json".into()),
                    DeliverCopy("b.json".into()),
                ],
            ),
            (
                "error",
                job_in(State::Error),
                [Settled, push_error.clone(), push_error.clone()],
            ),
            (
                "error, a conflict",
                with(job_in(State::Error), |j| j.held_by = Some(3)),
                [Settled, Settled, Settled],
            ),
            (
                "rejected",
                job_in(State::Rejected),
                [Settled, Settled, Settled],
            ),
            ("moved", job_in(State::Moved), [Settled, Settled, Settled]),
        ];
        // Every state is covered.
        for s in State::ALL {
            assert!(
                cases.iter().any(|(_, j, _)| j.state == s),
                "{s} not covered"
            );
        }
        for (what, job, want) in cases {
            for (policy, want) in POLICIES.iter().zip(want) {
                assert_eq!(next_step(&job, policy), want, "{what} under {policy:?}");
                assert_eq!(
                    is_settled(&job, policy),
                    want == Settled,
                    "{what} under {policy:?}"
                );
                assert_eq!(is_open(&job, policy), want != Settled);
            }
        }
    }

    #[test]
    fn live_and_push_failed() {
        for s in State::ALL {
            let job = job_in(s);
            assert_eq!(
                is_live(&job),
                !matches!(
                    s,
                    State::Done | State::Error | State::Rejected | State::Moved
                ),
                "{s}"
            );
        }
        let done = with(job_in(State::Done), |j| j.final_push_attempts = 4);
        assert!(push_failed(&done, &POLICIES[1]));
        assert!(!push_failed(&done, &POLICIES[0]), "no push utility");
        assert!(!push_failed(&job_in(State::Done), &POLICIES[1]));
    }

    #[test]
    fn retry_and_cancel_refusals() {
        assert!(retry_refusal(&job_in(State::Done)).is_none());
        assert!(retry_refusal(&job_in(State::Finished)).is_none());
        let invalid = retry_refusal(&job_in(State::Error)).unwrap();
        assert!(invalid.contains("invalid"), "{invalid}");
        let conflict = retry_refusal(&with(job_in(State::Error), |j| j.held_by = Some(3)));
        assert!(conflict.unwrap().contains("conflict with job 3"));
        let cancelled = with(job_in(State::Queued), |j| {
            j.state = State::Error;
            j.result = Some(false);
        });
        assert!(retry_refusal(&cancelled).unwrap().contains("cancelled"));
        assert!(
            retry_refusal(&job_in(State::Queued))
                .unwrap()
                .contains("is queued")
        );
        for s in State::ALL {
            assert_eq!(
                cancel_refusal(&job_in(s)).is_none(),
                matches!(s, State::Queued | State::Building | State::Interrupted),
                "{s}"
            );
        }
    }
}
