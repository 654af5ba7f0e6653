//! AMQP as a source, in two steps (docs/amqp.md, "Several hosts, one farm"):
//!
//! - **Drain**: every message of the participant's queue is handled at once, whatever the
//!   build slots: a workitem is re-published (persistent, confirmed) to the farm's work queue,
//!   a cancel to the farm's fanout exchange, and only then is the original acked; a body that
//!   is not a JSON object is rejected without requeue (kept in `rejected/` with a reason, like
//!   any input that is not a workitem). Each message is classified once.
//! - **Take**: while a build slot is free, one workitem at a time is taken from the work queue
//!   (`basic.get`) and becomes a submission to the engine's intake, exactly as a dropped file
//!   does (same validation, events, builds, pushes, operator commands). A drained host
//!   (`build-image drain`) takes nothing; it still drains and applies cancels.
//!
//! The fanout exchange also carries every daemon's host record (`type` = `build-image.host`),
//! kept in memory (`Engine::hosts`). Every cancel comes back to every daemon from the fanout exchange: it is noted (with an
//! expiry, durably) and applied to the job that holds its `fei` here, if any; a workitem taken
//! later whose `fei` is noted is answered cancelled, never built.
//!
//! Invariants: a participant message is acked only after its copy is confirmed by the broker;
//! a work-queue message is acked only after the intake recorded its claim durably; a daemon
//! takes work only while a build slot is free for it (work waits in the broker, never in a
//! busy daemon); a message of a lost connection is never claimed or acked (the broker delivers
//! it again); a cancel is noted durably before its message is acked.

use super::client::{Got, Handle, Incoming, Target};
use super::notes::{self, Notes};
use super::reply::Reply;
use crate::domain::Origin;
use crate::domain::origin::{Body, Submission};
use crate::domain::workitem::{HEAD_BYTES, fei_in_head, fei_key};
use crate::engine::Engine;
use crossbeam_channel::{Receiver, select, unbounded};
use serde_json::Value;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How often a daemon with a free build slot asks the work queue for work when it was empty.
const POLL: Duration = Duration::from_millis(250);

/// A get whose answer never came (its command lost with the client) is given up after this.
const GET_PATIENCE: Duration = Duration::from_secs(30);

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
    pub reply: &'a Reply,
    /// Messages of the farm's fanout exchange.
    pub farm: &'a Receiver<Incoming>,
    /// The cancels heard of.
    pub notes: &'a Notes,
    /// How long a cancel is remembered.
    pub cancel_days: u32,
}

/// The intake thread: drains, takes and applies cancels until `stop` (or the client) goes.
pub fn run(src: &Source<'_>, deliveries: &Receiver<Incoming>, stop: &Receiver<()>) {
    let engine = src.engine;
    let handle = src.handle;
    let (got_tx, got_rx) = unbounded::<Got>();
    // A get asked for and not answered yet (since when).
    let mut getting: Option<Instant> = None;
    // When the work queue may be asked again (it was empty).
    let mut next_get = Instant::now();
    // Bodies handled here rather than moved on (not JSON objects, too big), waiting for the log
    // to take writes.
    let mut malformed: VecDeque<Incoming> = VecDeque::new();
    loop {
        let now = Instant::now();
        let wait = if getting.is_none() && engine.accepting() && engine.free_slots() > 0 {
            next_get
                .saturating_duration_since(now)
                .max(Duration::from_millis(1))
        } else {
            Duration::from_secs(1)
        };
        select! {
            recv(stop) -> _ => return,
            recv(deliveries) -> m => match m {
                Ok(m) => drain(src, m, &mut malformed),
                Err(_) => return,
            },
            recv(src.farm) -> m => match m {
                Ok(m) => farm_message(src, m),
                Err(_) => return,
            },
            recv(got_rx) -> g => {
                getting = None;
                match g {
                    Ok(Ok(Some(m))) => taken(src, m, &mut malformed),
                    Ok(Ok(None)) => next_get = Instant::now() + POLL,
                    Ok(Err(why)) => {
                        log::debug!("AMQP: {why}");
                        next_get = Instant::now() + POLL;
                    }
                    Err(_) => return,
                }
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
        let writable = engine.store.failing().is_none() && !engine.stopping();
        if writable {
            while let Some(m) = malformed.pop_front() {
                if !fresh(handle, &m) {
                    continue;
                }
                if m.body.len() as u64 > engine.cfg.spool.max_bytes {
                    claim_too_big(src, m);
                } else {
                    claim(src, vec![m], false);
                }
            }
        }
        if getting.is_some_and(|at| at.elapsed() > GET_PATIENCE) {
            getting = None;
        }
        if getting.is_none()
            && Instant::now() >= next_get
            && writable
            && handle.connected()
            && engine.accepting() // a drained host takes nothing from the work queue
            && engine.free_slots() > 0
        {
            match handle.get(got_tx.clone()) {
                Ok(()) => getting = Some(Instant::now()),
                Err(_) => next_get = Instant::now() + POLL,
            }
        }
    }
}

/// Is the message of the connection there is now? (One of a lost connection is the broker's
/// again: it requeued it.)
fn fresh(handle: &Handle, m: &Incoming) -> bool {
    handle.connected() && m.generation == handle.generation()
}

/// A message of the participant's queue: moved on at once.
fn drain(src: &Source<'_>, mut m: Incoming, malformed: &mut VecDeque<Incoming>) {
    if !fresh(src.handle, &m) {
        return;
    }
    if m.body.len() as u64 > src.engine.cfg.spool.max_bytes {
        log::warn!(
            "AMQP: a message of {} bytes is over [spool] max_bytes = {}: answered result false when it has a fei",
            m.body.len(),
            src.engine.cfg.spool.max_bytes
        );
        malformed.push_back(m);
        return;
    }
    let to = match classify(&m.body) {
        Message::Workitem => Target::Work,
        Message::Cancel(_) => Target::Farm,
        Message::Malformed(why) => {
            log::warn!("AMQP: a message is not a workitem ({why}): rejected");
            malformed.push_back(m);
            return;
        }
    };
    let body = std::mem::take(&mut m.body);
    let h = src.handle.clone();
    let sent = src.handle.forward(to, body, move |r| match r {
        Ok(()) => h.ack(m),
        Err(why) => {
            log::warn!("AMQP: a message could not be moved to the farm ({why}): back to the queue");
            h.reject(m, true);
        }
    });
    if let Err(why) = sent {
        // Not connected: the broker has it again.
        log::debug!("AMQP: {why}");
    }
}

/// A message of the farm's fanout exchange: a host record (its `type` says so), kept; or a
/// cancel, noted and applied to the job that holds its `fei` here.
fn farm_message(src: &Source<'_>, m: Incoming) {
    if !fresh(src.handle, &m) {
        return;
    }
    if m.kind.as_deref() == Some(crate::hosts::MESSAGE_TYPE) {
        // A host record (not a cancel): kept in memory for `hosts` and the status page.
        match serde_json::from_slice::<crate::hosts::HostRecord>(&m.body) {
            Ok(r) => src.engine.hosts.receive(r),
            Err(e) => {
                log::warn!("AMQP: a host record on the farm exchange is unreadable ({e}): dropped")
            }
        }
        src.handle.ack(m);
        return;
    }
    let fei = match classify(&m.body) {
        Message::Cancel(fei) => fei,
        _ => {
            log::warn!("AMQP: a message on the farm exchange is not a cancel: dropped");
            src.handle.ack(m);
            return;
        }
    };
    let Some(key) = fei_key(&fei) else {
        log::warn!("AMQP: a cancel without a fei: nothing to cancel");
        src.handle.ack(m);
        return;
    };
    if let Err(e) = src.notes.note(key, notes::expiry(src.cancel_days)) {
        log::error!(
            "AMQP: cannot remember the cancel of fei {fei} ({e}): a workitem of it taken later would be built"
        );
    }
    match job_of_fei(src.engine, &fei) {
        Some(id) => match src.engine.cancel(id) {
            Ok(_) => log::info!("AMQP: job {id} cancelled (fei {fei})"),
            Err(e) => log::warn!("AMQP: cannot cancel job {id}: {e}"),
        },
        None => log::debug!(
            "AMQP: cancel of fei {fei} noted: no open job of this worker has it (another host holds it, or its workitem is still to be taken)"
        ),
    }
    src.handle.ack(m);
}

/// A message taken from the work queue: claimed (a free slot was there for it).
fn taken(src: &Source<'_>, m: Incoming, malformed: &mut VecDeque<Incoming>) {
    if !fresh(src.handle, &m) {
        return;
    }
    // A cancel that came first is noted before its workitem is claimed.
    while let Ok(f) = src.farm.try_recv() {
        farm_message(src, f);
    }
    match classify(&m.body) {
        Message::Workitem => claim(src, vec![m], true),
        // Not put there by a daemon: handled as if it came from the participant's queue.
        Message::Cancel(_) => drain(src, m, malformed),
        Message::Malformed(why) => {
            log::warn!("AMQP: a message of the work queue is not a workitem ({why}): rejected");
            malformed.push_back(m);
        }
    }
}

/// A body over `max_bytes`: claimed with its head only (the engine answers it `result: false`
/// when its head has a `fei`, else rejects it), then acked when answered, else rejected without
/// requeue (to the queue's dead-letter exchange, if any).
fn claim_too_big(src: &Source<'_>, m: Incoming) {
    let head = m.body[..m.body.len().min(HEAD_BYTES)].to_vec();
    let answered = fei_in_head(&head).is_some();
    let submission = Submission {
        origin: src.origin.clone(),
        body: Body::TooBig {
            bytes: m.body.len() as u64,
            sha256: crate::digest::sha256_hex(&m.body),
            head,
        },
    };
    match src.engine.submit(vec![submission]) {
        Ok(()) if answered => src.handle.ack(m),
        Ok(()) => src.handle.reject(m, false),
        Err(e) => {
            log::error!("AMQP: cannot record a message too big ({e}): back to the queue");
            src.handle.reject(m, true);
        }
    }
}

/// Says whether a broker workitem was cancelled before it was taken (its `fei` is noted).
pub fn cancelled_before(notes: &Notes, origin: &Origin, workitem: &Value) -> Option<String> {
    if !matches!(origin, Origin::Broker { .. }) {
        return None;
    }
    let key = fei_key(workitem.get("fei")?)?;
    notes.noted(&key).then(|| {
        "cancelled before its workitem was taken (a cancel on the farm exchange)".to_string()
    })
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
