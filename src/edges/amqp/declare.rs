//! Declaring what the daemon uses on the broker, and telling a refusal from an outage: queues are
//! looked at passively first (one an operator declared, with whatever arguments, is used as it
//! is) and declared durable with the configured arguments only when missing; the farm's fanout
//! exchange and this daemon's own queue bound to it; `doctor`'s probe.
//!
//! Invariant: a declare never changes a queue that exists (a passive declare on a channel of its
//! own: a missing queue closes that channel, not the daemon's).

use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Connection, ConnectionProperties, Consumer};
use std::time::Duration;

/// Is this failure one that trying again does not heal (an operator must act): credentials,
/// permissions, a missing vhost, a queue whose arguments differ? The broker says so with these
/// AMQP reply names.
pub fn refused(why: &str) -> bool {
    [
        "ACCESS_REFUSED",
        "ACCESS-REFUSED",
        "NOT_ALLOWED",
        "NOT-ALLOWED",
        "PRECONDITION_FAILED",
        "PRECONDITION-FAILED",
        "NOT_FOUND",
        "NOT-FOUND",
        "RESOURCE_LOCKED",
        "RESOURCE-LOCKED",
    ]
    .iter()
    .any(|name| why.contains(name))
}

/// Makes sure `queue` exists: one an operator declared, with whatever arguments (a dead-letter
/// exchange, `x-queue-type = quorum`), is used as it is (a passive declare, on a channel of its
/// own: a missing queue closes it); a missing one is declared durable with `arguments`.
pub async fn declare(conn: &Connection, queue: &str, arguments: &FieldTable) -> Result<(), String> {
    let e = |what: &'static str| move |err: lapin::Error| format!("{what} {queue}: {err}");
    let ch = conn
        .create_channel()
        .await
        .map_err(e("cannot open a channel to declare"))?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::durable()
    };
    if ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .is_ok()
    {
        let _ = ch.close(200, "declared".into()).await;
        return Ok(());
    }
    let ch = conn
        .create_channel()
        .await
        .map_err(e("cannot open a channel to declare"))?;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::durable(),
        arguments.clone(),
    )
    .await
    .map_err(e("cannot declare the queue"))?;
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// An answer's properties: persistent (delivery_mode 2), JSON.
pub fn persistent() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

/// Connects and checks the queue exists or can be declared (for `doctor`).
pub fn probe(
    uri: &AMQPUri,
    queue: &str,
    arguments: &FieldTable,
    timeout: Duration,
) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    runtime.block_on(async {
        let work = async {
            let conn = Connection::connect_uri(uri.clone(), ConnectionProperties::default())
                .await
                .map_err(|e| format!("cannot connect: {e}"))?;
            declare(&conn, queue, arguments).await?;
            let ch = conn
                .create_channel()
                .await
                .map_err(|e| format!("cannot open a channel: {e}"))?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::durable()
            };
            let q = ch
                .queue_declare(queue.into(), passive, FieldTable::default())
                .await
                .map_err(|e| format!("cannot look at queue {queue}: {e}"))?;
            let _ = conn.close(200, "doctor".into()).await;
            Ok(format!(
                "queue {queue}: {} message(s) waiting, {} consumer(s)",
                q.message_count(),
                q.consumer_count()
            ))
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    })
}

/// What [`farm`] declares: the exchange, this daemon's queue on it and its expiry (ms), and the
/// consumer tag it is consumed with.
pub struct Farm<'a> {
    pub farm_exchange: &'a str,
    pub farm_queue: &'a str,
    pub farm_queue_expires_ms: u64,
    pub consumer_tag: &'a str,
}

/// Declares the farm's fanout exchange (durable) and this daemon's own queue on it (durable,
/// `x-expires`: a cancel broadcast while the daemon is away waits for it), binds it, and
/// consumes it.
pub async fn farm(conn: &Connection, s: &Farm<'_>) -> Result<Consumer, String> {
    let e = |what: &'static str| move |err: lapin::Error| format!("{what}: {err}");
    let ch = conn
        .create_channel()
        .await
        .map_err(e("cannot open a channel"))?;
    ch.exchange_declare(
        s.farm_exchange.into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|err| format!("cannot declare the exchange {}: {err}", s.farm_exchange))?;
    let mut expires = FieldTable::default();
    expires.insert(
        "x-expires".into(),
        lapin::types::AMQPValue::LongLongInt(
            i64::try_from(s.farm_queue_expires_ms).unwrap_or(i64::MAX),
        ),
    );
    declare(conn, s.farm_queue, &expires).await?;
    ch.queue_bind(
        s.farm_queue.into(),
        s.farm_exchange.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(e("cannot bind this daemon's farm queue"))?;
    ch.basic_consume(
        s.farm_queue.into(),
        format!("{}-farm", s.consumer_tag).as_str().into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(e("cannot consume this daemon's farm queue"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_from_outages() {
        assert!(refused(
            "cannot connect: protocol error: AMQP soft error: ACCESS-REFUSED: ACCESS_REFUSED - Login was refused"
        ));
        assert!(refused(
            "cannot declare the queue build_image: PRECONDITION_FAILED - inequivalent arg"
        ));
        assert!(refused("NOT_ALLOWED - vhost boss not found"));
        assert!(!refused(
            "cannot connect: IO error: Connection refused (os error 111)"
        ));
        assert!(!refused("connection lost: connection reset by peer"));
    }
}
