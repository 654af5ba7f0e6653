//! AMQP as a source: the messages the client consumed become submissions to the engine's
//! intake, exactly as dropped files do (same validation, events, builds, pushes, operator
//! commands); a cancel message cancels the job with that `fei`; a body that is not a JSON
//! object is rejected without requeue (kept in `rejected/` with a reason, like any input that
//! is not a workitem).
//!
//! Invariants: a message is acked only after the intake recorded its claim durably (the
//! engine keeps the body before it records the claim); a workitem is claimed only when a build
//! slot is free for it (the broker holds the rest, at most `prefetch` of them unacked here); a
//! message of a lost connection is never claimed (the broker delivers it again).

use super::client::{Handle, Incoming};
use crate::domain::Origin;
use crate::domain::origin::{Body, Submission};
use crate::engine::Engine;
use crossbeam_channel::{Receiver, select};
use serde_json::Value;
use std::collections::VecDeque;
use std::time::Duration;

/// How long messages waiting for a build slot wait at most before the slots are counted again
/// (the build threads tell the intake when a slot frees; this covers any path that does not).
const SLOT_RECHECK: Duration = Duration::from_millis(50);

/// What a message is.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A workitem: becomes a job (its validation is the intake's).
    Workitem,
    /// A top-level `"cancel": true`: cancel the job with this `fei`.
    Cancel(Value),
    /// Not a JSON object: rejected without requeue, kept in rejected/.
    Malformed(String),
}

/// Classifies a message body (pure).
pub fn classify(body: &[u8]) -> Message {
    match crate::domain::workitem::parse_object(body) {
        Err(e) => Message::Malformed(e.to_string()),
        Ok(v) => {
            if v.get("cancel") == Some(&Value::Bool(true)) {
                Message::Cancel(v.get("fei").cloned().unwrap_or(Value::Null))
            } else {
                Message::Workitem
            }
        }
    }
}

/// What the intake thread works with.
pub struct Source<'a> {
    pub engine: &'a Engine,
    pub handle: &'a Handle,
    /// Where the messages come from (`claimed.source`).
    pub origin: Origin,
    /// The answerer: jobs whose answer's confirm came after their step let go, or whose answer
    /// waits for the broker to take publishes again, are moved then, not at their back-off's end.
    pub reply: &'a super::reply::Reply,
}

/// The intake thread: takes messages until `stop` (or the client) goes.
pub fn run(src: &Source<'_>, deliveries: &Receiver<Incoming>, stop: &Receiver<()>) {
    let engine = src.engine;
    let handle = src.handle;
    let mut pending: VecDeque<Incoming> = VecDeque::new();
    loop {
        // Messages waiting for a slot: woken when one may have come free (a build ended, an
        // intake or a cancel let one go), and at the latest after SLOT_RECHECK (a slot freed
        // by a path that does not tell, e.g. a job failed before its build); none: sleep until
        // one arrives.
        let wait = if pending.is_empty() {
            Duration::from_millis(200)
        } else {
            SLOT_RECHECK
        };
        select! {
            recv(stop) -> _ => return,
            recv(deliveries) -> m => match m {
                Ok(m) => pending.push_back(m),
                Err(_) => return,
            },
            recv(engine.slot_wakeups()) -> _ => {}
            recv(src.reply.woken()) -> id => {
                if let Ok(id) = id {
                    engine.wake_stalled(id);
                }
            }
            default(wait) => {}
        }
        for id in src.reply.ready_again() {
            engine.wake_stalled(id);
        }
        while let Ok(m) = deliveries.try_recv() {
            pending.push_back(m);
        }
        // A lost connection's messages are the broker's again (it requeues them): never
        // claimed, even before the reconnect (an ack on a dead channel goes nowhere).
        let generation = handle.generation();
        let connected = handle.connected();
        pending.retain(|m| connected && m.generation == generation);
        if pending.is_empty() || engine.store.failing().is_some() || engine.stopping() {
            continue;
        }
        // Cancels and malformed bodies need no build slot: they go first.
        let mut i = 0;
        while i < pending.len() {
            match classify(&pending[i].body) {
                Message::Workitem => i += 1,
                Message::Cancel(fei) => {
                    if let Some(m) = pending.remove(i) {
                        cancel(src, &fei, &mut pending);
                        handle.ack(m);
                    }
                }
                Message::Malformed(why) => {
                    if let Some(m) = pending.remove(i) {
                        log::warn!("AMQP: a message is not a workitem ({why}): rejected");
                        claim(src, vec![m], false);
                    }
                }
            }
        }
        let free = engine.free_slots().min(pending.len());
        if free > 0 {
            let batch: Vec<Incoming> = pending.drain(..free).collect();
            claim(src, batch, true);
        }
    }
}

/// Hands message bodies to the intake (one flush for all), then acks them (workitems) or
/// rejects them without requeue (malformed bodies: their jobs are rejected, the bodies kept in
/// rejected/ with a `.reason`). What cannot be recorded goes back to the queue.
fn claim(src: &Source<'_>, mut batch: Vec<Incoming>, workitem: bool) {
    let submissions = batch
        .iter_mut()
        .map(|m| Submission {
            origin: src.origin.clone(),
            body: Body::Bytes(std::mem::take(&mut m.body)),
        })
        .collect();
    match src.engine.submit(submissions) {
        Ok(()) => {
            for m in batch {
                if workitem {
                    src.handle.ack(m);
                } else {
                    src.handle.reject(m, false);
                }
            }
        }
        Err(e) => {
            log::error!(
                "AMQP: cannot record {} message(s) ({e}): back to the queue",
                batch.len()
            );
            for m in batch {
                src.handle.reject(m, true);
            }
        }
    }
}

/// Cancels the job with this `fei`: an open AMQP job of this daemon, or a message held here
/// and not claimed yet (claimed now, then cancelled: never built).
fn cancel(src: &Source<'_>, fei: &Value, pending: &mut VecDeque<Incoming>) {
    if fei.is_null() {
        log::warn!("AMQP: a cancel without a fei: nothing to cancel");
        return;
    }
    let held = pending.iter().position(|m| {
        crate::domain::workitem::parse_object(&m.body).is_ok_and(|v| v.get("fei") == Some(fei))
    });
    if let Some(i) = held
        && let Some(m) = pending.remove(i)
    {
        claim(src, vec![m], true);
    }
    match job_of_fei(src.engine, fei) {
        Some(id) => match src.engine.cancel(id) {
            Ok(_) => log::info!("AMQP: job {id} cancelled (fei {fei})"),
            Err(e) => log::warn!("AMQP: cannot cancel job {id}: {e}"),
        },
        None => log::warn!(
            "AMQP: cancel of fei {fei}: no open job of this worker has it (answered already, or another host holds it)"
        ),
    }
}

/// The open AMQP job of this worker, not answered yet, whose workitem has this `fei`.
fn job_of_fei(engine: &Engine, fei: &Value) -> Option<u64> {
    let ids: Vec<u64> = engine.store.with_open(|jobs| {
        jobs.values()
            .filter(|j| {
                engine.is_mine(j)
                    && j.worker.is_some()
                    && matches!(j.origin, Origin::Broker { .. })
                    && !j.state.is_answered()
                    && j.input_seq.is_some()
            })
            .map(|j| j.id)
            .collect()
    });
    ids.into_iter().find(|id| {
        engine.store.job(*id).is_some_and(|j| {
            engine
                .store
                .input_value(&j)
                .is_ok_and(|v| v.get("fei") == Some(fei))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_are_classified() {
        assert_eq!(classify(br#"{"fields": {}}"#), Message::Workitem);
        assert_eq!(
            classify(br#"{"fei": {"wfid": "w"}, "cancel": true}"#),
            Message::Cancel(json!({"wfid": "w"}))
        );
        assert_eq!(
            classify(br#"{"fei": {"wfid": "w"}, "cancel": false}"#),
            Message::Workitem
        );
        for bad in [
            &b"not json"[..],
            b"[1, 2]",
            b"",
            b"\"a string\"",
            b"\xff\xfe",
        ] {
            assert!(matches!(classify(bad), Message::Malformed(_)), "{bad:?}");
        }
    }
}
