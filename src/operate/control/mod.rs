//! The operator protocol's answers: [`handle`] is the one function that answers a request,
//! run by the daemon for a socket request ([`server`]) and by a command on a host opened over
//! the log when no daemon runs, so the answer is the same either way.
//!
//! Invariant: a request never changes a job other than through the engine's actions (each
//! recorded as an event first); queries read the log, never the daemon's memory, except
//! `status` while the log is closed for its reopening (then the open jobs it keeps).

pub mod protocol;
pub mod server;

pub use protocol::{Client, Request, Response, socket_path};
pub use server::{IDLE, MAX_CONNECTIONS, MAX_REQUEST, Server};

use crate::domain::{Event, Tag};
use crate::operate::Host;
use crate::operate::ops::{self, EventFilter};
use std::time::Duration;

/// Events read from the log at a time for an event stream (an export of a long log is never
/// held whole).
const EVENTS_PAGE: usize = 4096;

/// Answers a request on `host` (the daemon's, or one opened over the log). Streamed events go
/// to `on_event`, which returns false to stop the stream.
pub fn handle(host: &Host, req: Request, mut on_event: impl FnMut(&Event) -> bool) -> Response {
    let err = |e: &dyn std::fmt::Display| Response::Error {
        message: e.to_string(),
    };
    if req == Request::Hosts {
        // Needs no log: the spool's records and the daemon's memory.
        return Response::Hosts {
            hosts: crate::operate::hosts::farm(host),
        };
    }
    let journal = match host.engine.store.journal() {
        Ok(j) => j,
        Err(e) => {
            // The log is closed while it is reopened after a write error (and stays so while
            // the disk is full): `status` still answers, from the open jobs kept in memory,
            // with why nothing is claimed.
            if let Request::Status { state, limit } = &req
                && let Some(why) = host.engine.store.failing()
            {
                return Response::Status {
                    rows: ops::status(&host.engine.store.open_jobs(), *state, *limit),
                    failing: Some(why),
                    unpushed: unpushed(host),
                    waiting: host.engine.waiting_for_room(),
                    degraded: degraded(host),
                    drained: host.engine.store.drained(),
                };
            }
            return err(&e);
        }
    };
    match req {
        Request::Status { state, limit } => {
            let jobs = match (state, limit) {
                // the newest N of every state: only their part of the log is folded
                (None, Some(n)) => journal.newest_projections(n),
                _ => journal.projections(),
            };
            match jobs {
                Ok(jobs) => Response::Status {
                    rows: ops::status(&jobs, state, limit),
                    failing: host.engine.store.failing(),
                    unpushed: unpushed(host),
                    waiting: host.engine.waiting_for_room(),
                    degraded: degraded(host),
                    drained: host.engine.store.drained(),
                },
                Err(e) => err(&e),
            }
        }
        Request::Show { id } => match ops::show(&journal, &host.cfg, &id) {
            Ok(v) => Response::Show(Box::new(v)),
            Err(e) => err(&e),
        },
        Request::Events { filter, follow } => {
            drop(journal);
            let mut next = filter.since;
            let mut full;
            loop {
                let journal = match host.engine.store.journal() {
                    Ok(j) => j,
                    Err(e) => return err(&e),
                };
                // Every event below the horizon is in the tree (seqs are published after insert).
                let horizon = journal.next_seq();
                let f = EventFilter {
                    since: next,
                    ..filter.clone()
                };
                match ops::events_page(&journal, &f, EVENTS_PAGE) {
                    Ok(evs) => {
                        // A page cut short by its inputs' size is followed by the next one.
                        full = !evs.is_empty();
                        for ev in &evs {
                            next = ev.seq + 1;
                            if !on_event(ev) {
                                return Response::Events;
                            }
                        }
                    }
                    Err(e) => return err(&e),
                }
                drop(journal);
                if next < horizon && full {
                    continue; // a long log: the next page
                }
                next = next.max(horizon);
                if !follow || host.engine.stopping() {
                    return Response::Events;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Request::Replay => match ops::replay(&journal, &host.spool, host.engine.store.policy()) {
            Ok(r) => Response::Replay(r),
            Err(e) => err(&e),
        },
        Request::Retry { id } => {
            let result =
                ops::resolve(&journal, &id)
                    .map_err(|e| e.to_string())
                    .and_then(|job| {
                        drop(journal);
                        host.engine
                            .retry(job)
                            .map(|building_now| Response::Retried {
                                job,
                                building_now,
                                over_amqp: host.engine.store.job(job).is_some_and(|j| {
                                    j.reply_to() == crate::domain::ReplyTo::Broker
                                }),
                            })
                            .map_err(|e| e.to_string())
                    });
            result.unwrap_or_else(|message| Response::Error { message })
        }
        Request::Cancel { id } => {
            let result = ops::resolve(&journal, &id)
                .map_err(|e| e.to_string())
                .and_then(|job| {
                    drop(journal);
                    host.engine
                        .cancel(job)
                        .map(|answered| Response::Cancelled { job, answered })
                        .map_err(|e| e.to_string())
                });
            result.unwrap_or_else(|message| Response::Error { message })
        }
        Request::Pin { id, pin } => {
            let result = ops::resolve(&journal, &id)
                .map_err(|e| e.to_string())
                .and_then(|job| {
                    drop(journal);
                    host.engine
                        .pin(job, pin)
                        .map(|changed| Response::Pinned {
                            job,
                            pinned: pin,
                            changed,
                        })
                        .map_err(|e| e.to_string())
                });
            result.unwrap_or_else(|message| Response::Error { message })
        }
        Request::Gc { dry_run } => {
            drop(journal);
            match host.engine.gc(dry_run) {
                Ok(expired) => Response::Gc { dry_run, expired },
                Err(e) => err(&e),
            }
        }
        req @ (Request::Drain { .. } | Request::Undrain) => {
            drop(journal);
            let changed = match &req {
                Request::Drain { reason } => host.engine.drain(reason),
                _ => host.engine.undrain(),
            };
            match changed {
                Ok(changed) => Response::Drained {
                    drained: host.engine.store.drained(),
                    changed,
                },
                Err(e) => err(&e),
            }
        }
        Request::Log { id, job, from } => {
            match crate::operate::joblog::read(&journal, &host.cfg, &id, job, from) {
                Ok(c) => Response::Log(c.map(Box::new)),
                Err(e) => err(&e),
            }
        }
        Request::Requeue { worker, force } => {
            drop(journal);
            match crate::edges::spool::requeue::requeue_worker(
                &host.engine,
                &host.spool,
                &worker,
                force,
            ) {
                Ok(moved) => Response::Requeued { moved },
                Err(e) => err(&e),
            }
        }
        Request::Backup { dir } => {
            let r = crate::operate::archive::outside_spool(host, &dir, "the backup folder")
                .and_then(|()| {
                    crate::operate::archive::backup(&journal, &dir, &|| host.engine.stopping())
                });
            match r {
                Ok(r) => Response::BackedUp(r),
                Err(e) => err(&e),
            }
        }
        Request::Compact { before, archive } => {
            drop(journal);
            let r = humantime::parse_rfc3339_weak(&before)
                .map_err(|e| {
                    crate::operate::archive::ArchiveError::Refused(format!("{before}: {e}"))
                })
                .and_then(|t| crate::operate::archive::compact(host, t, &archive));
            match r {
                Ok(r) => Response::Compacted(r),
                Err(e) => err(&e),
            }
        }
        Request::Repush { since, until } => {
            drop(journal);
            let t = |s: &str| {
                humantime::parse_rfc3339_weak(s).map_err(|e| {
                    crate::operate::archive::ArchiveError::Refused(format!("{s}: {e}"))
                })
            };
            let r = t(&since)
                .and_then(|a| Ok((a, t(&until)?)))
                .and_then(|(a, b)| crate::operate::archive::repush(host, a, b));
            match r {
                Ok(r) => Response::Repushed(r),
                Err(e) => err(&e),
            }
        }
        Request::Hosts => Response::Hosts {
            hosts: crate::operate::hosts::farm(host),
        },
        Request::Redeliver { id } => {
            drop(journal);
            match crate::operate::archive::redeliver(host, &id) {
                Ok(r) => Response::Redelivered(r),
                Err(e) => err(&e),
            }
        }
    }
}

/// The event kinds and states a request may name, for error messages.
pub fn kinds() -> String {
    Tag::ALL.map(|t| t.as_str()).join(", ")
}

/// The parts of the daemon that are not working, each `NAME: why`; and the answers not
/// delivered yet whose step waits to be tried again (`answers: …`).
fn degraded(host: &Host) -> Vec<String> {
    let mut out: Vec<String> = host
        .engine
        .conditions
        .now()
        .into_iter()
        .filter(|(_, c)| !c.ok)
        .map(|(name, c)| format!("{name}: {}", c.detail))
        .collect();
    let policy = *host.engine.store.policy();
    let stalled = host.engine.stalled();
    let undelivered: Vec<u64> = host.engine.store.with_open(|jobs| {
        stalled
            .iter()
            .filter(|id| {
                jobs.get(id).is_some_and(|j| {
                    matches!(
                        crate::domain::lifecycle::next_step(j, &policy),
                        crate::domain::lifecycle::Step::Deliver
                            | crate::domain::lifecycle::Step::DeliverCopy(_)
                    )
                })
            })
            .copied()
            .collect()
    });
    if !undelivered.is_empty() {
        let shown: Vec<String> = undelivered.iter().take(10).map(u64::to_string).collect();
        out.push(format!(
            "answers: {} answer(s) not delivered yet, tried again with back-off (job {}{})",
            undelivered.len(),
            shown.join(", "),
            if undelivered.len() > 10 { ", …" } else { "" }
        ));
    }
    out
}

/// Answered jobs of this worker whose final status is still to be pushed (the push utility
/// failed and is tried again, or a stop left it for the next start), said in one line.
fn unpushed(host: &Host) -> Option<String> {
    let policy = *host.engine.store.policy();
    let (waiting, failed) = host.engine.store.with_open(|jobs| {
        let waiting: Vec<&crate::domain::Job> = jobs
            .values()
            .filter(|j| {
                matches!(
                    crate::domain::lifecycle::next_step(j, &policy),
                    crate::domain::lifecycle::Step::Push(_)
                )
            })
            .collect();
        let failed = waiting.iter().filter(|j| j.final_push_attempts > 0).count();
        (waiting.len(), failed)
    });
    (waiting > 0).then(|| {
        format!(
            "{waiting} answered job(s) wait for their final status push ({failed} after a failed attempt){}",
            if host.engine.stopping() || host.engine.is_offline() {
                ": the next daemon start pushes them"
            } else {
                ""
            }
        )
    })
}
