//! The broker as an answerer: a job that came over AMQP is answered by publishing its answer
//! to `[amqp] reply_queue` (default exchange, persistent, `mandatory`, with publisher
//! confirms), unless its workitem asks for no reply (`fields.params.forget`). A byte-identical
//! re-delivery of a broker job (a `duplicate`: the same `fei`) gets no answer of its own: the
//! job's one answer answers it (`redeliver ID` publishes it again when that is wanted).
//!
//! Invariants: the receipt (and so `delivered`) is returned only after the broker confirmed the
//! message and did not return it (no queue to route it to); without a connection or a confirm
//! the answer is not delivered and the engine tries the step again (at least once). One publish
//! is in flight per answer: while its confirm is awaited (a broker that blocks publishers
//! confirms when it unblocks) the step is tried again later without publishing again; only a
//! nack, a return or the loss of its connection lets the answer be published again. No caller
//! waits for a confirm more than [`FAST_CONFIRM`] (a build slot is never held by a broker):
//! a confirm that comes later wakes the job ([`Reply::woken`]), and so does the broker taking
//! publishes again for an answer that could not start ([`Reply::ready_again`]).

use super::client::Handle;
use crate::domain::{Job, Receipt, ReplyTo};
use crate::engine::ports::{Answer, AnswerError, Answerer};
use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How long a delivery waits for the broker's confirm before it lets its thread go (the confirm
/// is still awaited; the job is woken when it comes).
pub const FAST_CONFIRM: Duration = Duration::from_secs(1);

/// Why a byte-identical re-delivery of a broker job is not answered on its own.
pub const DUPLICATE: &str =
    "a byte-identical re-delivery: the job's own answer (the same fei) answers it";

/// Does the workitem ask for no reply (`fields.params.forget` true)?
pub fn forget(workitem: &Value) -> bool {
    workitem.pointer("/fields/params/forget") == Some(&Value::Bool(true))
}

/// An answer: its job and the re-drop it answers (None: the job's own).
type Key = (u64, Option<String>);

/// An answer published and not yet settled.
enum Flight {
    /// Its confirm is awaited (published on the connection of this generation).
    Pending { generation: u64 },
    /// The broker said how it went; the next try of the step takes it.
    Done(Result<(), String>),
}

/// Publishes answers through the client's handle.
pub struct Reply {
    handle: Handle,
    queue: String,
    in_flight: Arc<Mutex<HashMap<Key, Flight>>>,
    /// The jobs whose confirm came after their step let its thread go.
    woken: (Sender<u64>, Receiver<u64>),
    /// The jobs whose answer could not start (no connection, a blocked broker): moved again as
    /// soon as the broker takes publishes again ([`Reply::ready_again`]).
    refused: Mutex<HashSet<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Reply {
    pub fn new(handle: Handle, queue: String) -> Reply {
        Reply {
            handle,
            queue,
            in_flight: Arc::default(),
            woken: unbounded(),
            refused: Mutex::default(),
        }
    }

    /// The jobs whose answer could not start for want of a broker that takes publishes, once it
    /// takes them again (connected, not blocked); none before.
    pub fn ready_again(&self) -> Vec<u64> {
        if !self.handle.connected() || self.handle.blocked().is_some() {
            return Vec::new();
        }
        lock(&self.refused).drain().collect()
    }

    /// Ready with a job id when a confirm (or a nack, a return) came for an answer whose step
    /// was left to be tried again: that job is to be moved now rather than at its back-off.
    pub fn woken(&self) -> &Receiver<u64> {
        &self.woken.1
    }

    fn receipt(&self, r: Result<(), String>) -> Result<Receipt, AnswerError> {
        match r {
            Ok(()) => Ok(Receipt::Published {
                queue: self.queue.clone(),
            }),
            Err(e) => Err(AnswerError::Later(format!("answer not published: {e}"))),
        }
    }

    /// Publishes the answer unless one is in flight; waits for its confirm at most
    /// [`FAST_CONFIRM`].
    fn publish(&self, key: Key, bytes: Vec<u8>) -> Result<Receipt, AnswerError> {
        {
            let mut map = lock(&self.in_flight);
            match map.remove(&key) {
                Some(Flight::Pending { generation })
                    if self.handle.connected() && self.handle.generation() == generation =>
                {
                    map.insert(key, Flight::Pending { generation });
                    let why = match self.handle.blocked() {
                        Some(b) => format!(
                            "awaiting the broker's confirm of the answer ({}: {b})",
                            super::client::BLOCKED
                        ),
                        None => "awaiting the broker's confirm of the answer".to_string(),
                    };
                    return Err(AnswerError::Later(why));
                }
                // Its connection is gone, and the confirm with it: published again below
                // (the answers-twice window of docs/amqp.md, when the broker had it).
                Some(Flight::Pending { .. }) | None => {}
                Some(Flight::Done(r)) => return self.receipt(r),
            }
            map.insert(
                key.clone(),
                Flight::Pending {
                    generation: self.handle.generation(),
                },
            );
        }
        // A rendezvous: the confirm is handed over only while the publisher still waits;
        // later it is kept for the next try and the job is woken.
        let (tx, rx) = bounded::<Result<(), String>>(0);
        let in_flight = Arc::clone(&self.in_flight);
        let woken = self.woken.0.clone();
        let k = key.clone();
        let started = self.handle.start_publish(bytes, move |r| {
            let mut map = lock(&in_flight);
            if !matches!(map.get(&k), Some(Flight::Pending { .. })) {
                return;
            }
            match tx.try_send(r) {
                Ok(()) => {}
                Err(e) => {
                    map.insert(k.clone(), Flight::Done(e.into_inner()));
                    drop(map);
                    let _ = woken.send(k.0);
                }
            }
        });
        if let Err(e) = started {
            lock(&self.in_flight).remove(&key);
            lock(&self.refused).insert(key.0);
            return self.receipt(Err(e));
        }
        let got = rx.recv_timeout(FAST_CONFIRM);
        let mut map = lock(&self.in_flight);
        match got {
            Ok(r) => {
                map.remove(&key);
                self.receipt(r)
            }
            Err(_) => match map.remove(&key) {
                Some(Flight::Done(r)) => self.receipt(r),
                Some(p) => {
                    map.insert(key, p);
                    Err(AnswerError::Later(format!(
                        "awaiting the broker's confirm of the answer (none within {FAST_CONFIRM:?})"
                    )))
                }
                None => self.receipt(Err("the publish was forgotten".into())),
            },
        }
    }
}

impl Answerer for Reply {
    fn send(&self, job: &Job, copy: Option<&str>, answer: &Answer) -> Result<Receipt, AnswerError> {
        if copy.is_some() && job.reply_to() == ReplyTo::Broker {
            return Ok(Receipt::Withheld {
                why: DUPLICATE.into(),
            });
        }
        // The answer is the workitem with its OUT fields: its params are the input's.
        if forget(answer.value()) {
            return Ok(Receipt::Withheld {
                why: "fields.params.forget".into(),
            });
        }
        self.publish((job.id, copy.map(str::to_string)), answer.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn forget_is_a_true_boolean_only() {
        assert!(forget(&json!({"fields": {"params": {"forget": true}}})));
        assert!(!forget(&json!({"fields": {"params": {"forget": "yes"}}})));
        assert!(!forget(&json!({"fields": {}})));
    }
}
