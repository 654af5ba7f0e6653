//! Where a job's workitem came from, where its answer goes, and what became of the answer: the
//! typed forms of what the `claimed`, `duplicate` and `delivered` events record.
//!
//! Invariant: these are decoded from the recorded events in one place each
//! ([`Origin::decode`], [`Receipt::decode`]) and encoded in one place each
//! ([`Origin::source`], [`Receipt::encode`]); no other code works out a job's origin or its
//! answer's destination from a file name or a string prefix. Logs written before these types
//! existed are read by the same decoders (the only place that knows their conventions), so no
//! stored-form migration is needed.

use serde::{Deserialize, Serialize};

/// The hidden name prefix under which message bodies were once kept in `active/<worker>/`
/// (read only to decode logs whose `claimed` events carry no `source`).
const OLD_BODY_PREFIX: &str = ".amqp-";
/// How the `outbox` field of a `delivered` event once told a published answer (`amqp:QUEUE`)
/// and a withheld one (`amqp: forget (no reply)`) from an outbox file.
const OLD_PUBLISHED_PREFIX: &str = "amqp:";
const OLD_WITHHELD: &str = "amqp: forget (no reply)";

/// Where a job's workitem came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// A file dropped into the spool's `incoming/` and claimed by rename.
    #[default]
    Spool,
    /// A message consumed from a broker queue; `source` names it as `amqp://HOST:PORT/VHOST/QUEUE`
    /// (no user, no password). None for a job recorded before sources were (its file's name told).
    Broker { source: Option<String> },
}

impl Origin {
    /// The origin a `claimed` (or `duplicate`) event records: its `source`, or, for a log written
    /// before the source was recorded, the hidden name a message body was kept under.
    pub fn decode(source: Option<&str>, file: Option<&str>) -> Origin {
        match source {
            Some(s) => Origin::Broker {
                source: Some(s.to_string()),
            },
            None if file.is_some_and(|f| f.starts_with(OLD_BODY_PREFIX)) => {
                Origin::Broker { source: None }
            }
            None => Origin::Spool,
        }
    }

    /// What a `claimed` event records as its `source` (None for the spool).
    pub fn source(&self) -> Option<&str> {
        match self {
            Origin::Spool => None,
            Origin::Broker { source } => source.as_deref(),
        }
    }

    /// The short name operators see (`status`, `show`, the status page).
    pub fn name(&self) -> &'static str {
        match self {
            Origin::Spool => "spool",
            Origin::Broker { .. } => "amqp",
        }
    }

    /// Where the answer of a workitem of this origin goes.
    pub fn reply_to(&self) -> ReplyTo {
        match self {
            Origin::Spool => ReplyTo::Outbox,
            Origin::Broker { .. } => ReplyTo::Broker,
        }
    }

    /// Is the input whole when it is handed over (a message body), or may its writer still be
    /// writing it (a dropped file over NFS, whose size and mtime the claim relied on)? An input
    /// that does not parse is read again until it has stood still unless it arrived whole.
    pub fn arrives_whole(&self) -> bool {
        matches!(self, Origin::Broker { .. })
    }
}

/// Where a job's answer goes: each destination has one answerer at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyTo {
    /// A file in the spool's `outbox/`, named after the input.
    #[default]
    Outbox,
    /// A message to the workflow engine's reply queue (or none, when the workitem asks for none).
    Broker,
}

impl ReplyTo {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyTo::Outbox => "outbox",
            ReplyTo::Broker => "broker",
        }
    }
}

impl std::fmt::Display for ReplyTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an answerer did with an answer: what the `delivered` event records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Receipt {
    /// Written to `outbox/<name>`; `sha256` of its bytes (how a later delivery knows this job's
    /// own answer from another job's).
    Outbox {
        name: String,
        sha256: Option<String>,
    },
    /// Published to this queue and confirmed by the broker.
    Published { queue: String },
    /// Not sent: the workitem asked for no answer (`why`).
    Withheld { why: String },
}

/// The fields of a `delivered` event that hold its receipt, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiptFields {
    pub outbox: Option<String>,
    pub sha256: Option<String>,
    pub queue: Option<String>,
    pub withheld: Option<String>,
}

impl Receipt {
    /// The receipt a `delivered` event records. Logs written before receipts were typed kept a
    /// published answer as `outbox: "amqp:QUEUE"` and a withheld one as
    /// `outbox: "amqp: forget (no reply)"`: read here, and nowhere else.
    pub fn decode(f: ReceiptFields) -> Receipt {
        if let Some(why) = f.withheld {
            return Receipt::Withheld { why };
        }
        if let Some(queue) = f.queue {
            return Receipt::Published { queue };
        }
        let name = f.outbox.unwrap_or_default();
        if name == OLD_WITHHELD {
            return Receipt::Withheld {
                why: "fields.params.forget".into(),
            };
        }
        if let Some(queue) = name.strip_prefix(OLD_PUBLISHED_PREFIX) {
            return Receipt::Published {
                queue: queue.to_string(),
            };
        }
        Receipt::Outbox {
            name,
            sha256: f.sha256,
        }
    }

    /// The fields a `delivered` event stores for this receipt.
    pub fn encode(&self) -> ReceiptFields {
        match self {
            Receipt::Outbox { name, sha256 } => ReceiptFields {
                outbox: Some(name.clone()),
                sha256: sha256.clone(),
                ..ReceiptFields::default()
            },
            Receipt::Published { queue } => ReceiptFields {
                queue: Some(queue.clone()),
                ..ReceiptFields::default()
            },
            Receipt::Withheld { why } => ReceiptFields {
                withheld: Some(why.clone()),
                ..ReceiptFields::default()
            },
        }
    }

    /// The outbox file written, for an answer in the outbox.
    pub fn outbox_name(&self) -> Option<&str> {
        match self {
            Receipt::Outbox { name, .. } => Some(name),
            _ => None,
        }
    }

    /// The sha256 of the answer's bytes, where the answerer kept it.
    pub fn sha256(&self) -> Option<&str> {
        match self {
            Receipt::Outbox { sha256, .. } => sha256.as_deref(),
            _ => None,
        }
    }
}

/// Where an answer went, in a few words (`outbox/a.json`, `published to ruote_workitems`, ...).
impl std::fmt::Display for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Receipt::Outbox { name, .. } => write!(f, "outbox/{name}"),
            Receipt::Published { queue } => write!(f, "published to {queue}"),
            Receipt::Withheld { why } => write!(f, "no answer sent ({why})"),
        }
    }
}

/// A workitem handed to the engine by a source at the edge.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub origin: Origin,
    pub body: Body,
}

/// How a submission's workitem reaches the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// A file the source already moved into the place where inputs wait (the spool's claim),
    /// by its name there: the engine reads it.
    Claimed(String),
    /// The bytes themselves (a message body): the engine keeps them where inputs wait before
    /// it records the claim. A source acknowledges such a body only after the intake returned
    /// Ok: a body kept but never claimed was never acknowledged, and its source sends it again.
    Bytes(Vec<u8>),
    /// A body over `[spool] max_bytes`, of which the source kept only the first
    /// [`super::workitem::HEAD_BYTES`] (`head`): claimed with the size and sha256 of the whole,
    /// answered `result: false` when a `fei` can be read from its head (invalid), else
    /// rejected; the head is what `rejected/` keeps.
    TooBig {
        head: Vec<u8>,
        bytes: u64,
        sha256: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_decode_from_the_source_and_old_logs_from_the_name() {
        assert_eq!(Origin::decode(None, Some("a.json")), Origin::Spool);
        let amqp = Origin::decode(Some("amqp://h:5672/%2F/q"), Some("b.json"));
        assert_eq!(
            amqp,
            Origin::Broker {
                source: Some("amqp://h:5672/%2F/q".into())
            }
        );
        assert_eq!(amqp.source(), Some("amqp://h:5672/%2F/q"));
        assert_eq!(
            Origin::decode(None, Some(".amqp-1-2.json")),
            Origin::Broker { source: None }
        );
        assert_eq!(Origin::Spool.source(), None);
        assert_eq!(Origin::Spool.reply_to(), ReplyTo::Outbox);
        assert_eq!(amqp.reply_to(), ReplyTo::Broker);
        assert!(amqp.arrives_whole() && !Origin::Spool.arrives_whole());
        assert_eq!((Origin::Spool.name(), amqp.name()), ("spool", "amqp"));
    }

    #[test]
    fn receipts_round_trip_and_old_strings_decode() {
        for r in [
            Receipt::Outbox {
                name: "a.json".into(),
                sha256: Some("ab".into()),
            },
            Receipt::Published {
                queue: "ruote_workitems".into(),
            },
            Receipt::Withheld {
                why: "fields.params.forget".into(),
            },
        ] {
            assert_eq!(Receipt::decode(r.encode()), r);
        }
        let old = |s: &str| {
            Receipt::decode(ReceiptFields {
                outbox: Some(s.into()),
                ..ReceiptFields::default()
            })
        };
        assert_eq!(
            old("amqp:ruote_workitems"),
            Receipt::Published {
                queue: "ruote_workitems".into()
            }
        );
        assert!(matches!(
            old("amqp: forget (no reply)"),
            Receipt::Withheld { .. }
        ));
        assert_eq!(old("x.json").outbox_name(), Some("x.json"));
    }
}
