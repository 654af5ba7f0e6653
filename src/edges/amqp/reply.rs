//! The broker as an answerer: a job that came over AMQP is answered by publishing its answer
//! to `[amqp] reply_queue` (default exchange, persistent, `mandatory`, with publisher
//! confirms), unless its workitem asks for no reply (`fields.params.forget`). A byte-identical
//! re-delivery of a broker job (a `duplicate`: the same `fei`) gets no answer of its own: the
//! job's one answer answers it (`redeliver ID` publishes it again when that is wanted).
//!
//! Invariant: the receipt (and so `delivered`) is returned only after the broker confirmed the
//! message and did not return it (no queue to route it to); without a connection or a confirm
//! the answer is not delivered and the engine tries the step again (at least once).

use super::client::Handle;
use crate::domain::{Job, Receipt, ReplyTo};
use crate::engine::ports::{Answer, AnswerError, Answerer};
use serde_json::Value;
use std::time::Duration;

/// How long a delivery waits for the broker's confirm.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a byte-identical re-delivery of a broker job is not answered on its own.
pub const DUPLICATE: &str =
    "a byte-identical re-delivery: the job's own answer (the same fei) answers it";

/// Does the workitem ask for no reply (`fields.params.forget` true)?
pub fn forget(workitem: &Value) -> bool {
    workitem.pointer("/fields/params/forget") == Some(&Value::Bool(true))
}

/// Publishes answers through the client's handle.
pub struct Reply {
    pub handle: Handle,
    pub queue: String,
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
        self.handle
            .publish(answer.to_bytes(), CONFIRM_TIMEOUT)
            .map_err(|e| AnswerError::Later(format!("answer not published: {e}")))?;
        Ok(Receipt::Published {
            queue: self.queue.clone(),
        })
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
