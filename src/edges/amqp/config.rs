//! The `[amqp]` section: the daemon as a BOSS participant (docs/amqp.md), and what is made of
//! it: the broker URL parsed (only `amqp://`), shown without its password, and the `source`
//! label a claim records. The config file's reader takes the section from here; this file
//! imports nothing else of the crate.
//!
//! Invariant: the password of `url` is never shown: `Debug`, errors and logs get [`redact`].

use lapin::uri::{AMQPScheme, AMQPUri};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

/// An empty string is "not set".
fn empty_is_unset<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    Ok(s.filter(|p| !p.trim().is_empty()))
}

/// `[amqp]`: the daemon as a BOSS participant (docs/amqp.md). Unset `url`: no AMQP.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// `amqp://USER:PASS@HOST:PORT/VHOST` (vhost percent-encoded, `%2f` is `/`); never logged
    /// with its password. An empty string is "not set".
    #[serde(deserialize_with = "empty_is_unset")]
    pub url: Option<String>,
    /// The queue consumed (declared durable): the participant's name.
    pub queue: String,
    /// Answers are published to the default exchange with this routing key (declared durable).
    pub reply_queue: String,
    /// Unacked messages held, 0..=1000; 0 = the number of build slots (`[worker] workers`).
    pub prefetch: u32,
    /// The arguments `queue` is declared with when it does not exist yet (say
    /// `{ "x-queue-type" = "quorum" }`); a queue that exists is used as it is.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub queue_arguments: BTreeMap<String, Argument>,
    /// The same for `reply_queue`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub reply_queue_arguments: BTreeMap<String, Argument>,
    /// The farm's work queue (durable): workitems drained from `queue` wait here until a
    /// daemon has a free build slot. Unset: `<queue>.farm`.
    #[serde(
        deserialize_with = "empty_is_unset",
        skip_serializing_if = "Option::is_none"
    )]
    pub work_queue: Option<String>,
    /// The arguments `work_queue` is declared with when it does not exist yet.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub work_queue_arguments: BTreeMap<String, Argument>,
    /// The farm's fanout exchange (durable): cancels reach every daemon through it. Unset:
    /// `<queue>.farm`.
    #[serde(
        deserialize_with = "empty_is_unset",
        skip_serializing_if = "Option::is_none"
    )]
    pub farm_exchange: Option<String>,
    /// How long a daemon remembers a cancel (days), so that its workitem taken later is
    /// answered cancelled, never built.
    pub cancel_memory_days: u32,
}

/// A queue argument's value: what AMQP queue arguments take (a string, an integer, a boolean).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Argument {
    Bool(bool),
    Int(i64),
    Text(String),
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: None,
            queue: "build_image".into(),
            reply_queue: "ruote_workitems".into(),
            prefetch: 0,
            queue_arguments: BTreeMap::new(),
            reply_queue_arguments: BTreeMap::new(),
            work_queue: None,
            work_queue_arguments: BTreeMap::new(),
            farm_exchange: None,
            cancel_memory_days: 7,
        }
    }
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &self.url.as_deref().map(redact))
            .field("queue", &self.queue)
            .field("reply_queue", &self.reply_queue)
            .field("prefetch", &self.prefetch)
            .field("queue_arguments", &self.queue_arguments)
            .field("reply_queue_arguments", &self.reply_queue_arguments)
            .field("work_queue", &self.work_queue)
            .field("work_queue_arguments", &self.work_queue_arguments)
            .field("farm_exchange", &self.farm_exchange)
            .field("cancel_memory_days", &self.cancel_memory_days)
            .finish()
    }
}

impl AmqpConfig {
    /// Is the section sound? (the error names the key)
    pub fn check(&self) -> Result<(), String> {
        if self.prefetch > 1000 {
            return Err(format!(
                "[amqp] prefetch = {} is out of range: it must be 0..=1000 (0 = the build slots)",
                self.prefetch
            ));
        }
        let (work, farm) = (self.work_queue(), self.farm_exchange());
        for (key, name) in [
            ("queue", &self.queue),
            ("reply_queue", &self.reply_queue),
            ("work_queue", &work),
            ("farm_exchange", &farm),
        ] {
            if name.is_empty() || name.len() > 255 {
                return Err(format!(
                    "[amqp] {key} must be 1..=255 bytes long (an AMQP short string)"
                ));
            }
        }
        for (key, args) in [
            ("queue_arguments", &self.queue_arguments),
            ("reply_queue_arguments", &self.reply_queue_arguments),
            ("work_queue_arguments", &self.work_queue_arguments),
        ] {
            if let Some(name) = args.keys().find(|k| k.is_empty() || k.len() > 255) {
                return Err(format!(
                    "[amqp] {key}: the name {name:?} must be 1..=255 bytes long (an AMQP short string)"
                ));
            }
        }
        if let Some(url) = &self.url {
            parse_url(url)?;
        }
        Ok(())
    }

    /// The farm's work queue (`work_queue`, or `<queue>.farm`).
    pub fn work_queue(&self) -> String {
        self.work_queue
            .clone()
            .unwrap_or_else(|| format!("{}.farm", self.queue))
    }

    /// The farm's fanout exchange (`farm_exchange`, or `<queue>.farm`).
    pub fn farm_exchange(&self) -> String {
        self.farm_exchange
            .clone()
            .unwrap_or_else(|| format!("{}.farm", self.queue))
    }

    /// The unacked messages of `queue` a daemon with `workers` build slots holds.
    pub fn prefetch_for(&self, workers: usize) -> u16 {
        let n = if self.prefetch == 0 {
            workers as u32
        } else {
            self.prefetch
        };
        n.clamp(1, u16::MAX as u32) as u16
    }
}

/// Queue arguments as AMQP puts them (`x-queue-type` a long string, an integer a long long).
pub fn field_table(args: &BTreeMap<String, Argument>) -> lapin::types::FieldTable {
    use lapin::types::AMQPValue;
    let mut t = lapin::types::FieldTable::default();
    for (k, v) in args {
        let v = match v {
            Argument::Bool(b) => AMQPValue::Boolean(*b),
            Argument::Int(i) => AMQPValue::LongLongInt(*i),
            Argument::Text(s) => AMQPValue::LongString(s.as_str().into()),
        };
        t.insert(k.as_str().into(), v);
    }
    t
}

/// The url with its password replaced by `***` (for logs and `Debug`).
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match auth.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Parses `[amqp] url`. Only `amqp://` (this build has no TLS).
pub fn parse_url(url: &str) -> Result<AMQPUri, String> {
    let uri: AMQPUri = url
        .parse()
        .map_err(|e| format!("[amqp] url {:?} is not an AMQP url: {e}", redact(url)))?;
    if uri.scheme != AMQPScheme::AMQP {
        return Err(format!(
            "[amqp] url {:?}: amqps:// is not supported by this build (use amqp://, or a TLS tunnel)",
            redact(url)
        ));
    }
    if uri.authority.host.is_empty() {
        return Err(format!("[amqp] url {:?} has no host", redact(url)));
    }
    Ok(uri)
}

/// The `source` recorded in a `claimed` event: `amqp://HOST:PORT/VHOST/QUEUE` (no user, no
/// password; the vhost percent-encoded).
pub fn source_label(uri: &AMQPUri, queue: &str) -> String {
    let vhost =
        percent_encoding::utf8_percent_encode(&uri.vhost, percent_encoding::NON_ALPHANUMERIC);
    format!(
        "amqp://{}:{}/{vhost}/{queue}",
        uri.authority.host, uri.authority.port
    )
}
