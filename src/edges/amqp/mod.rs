//! The daemon as a BOSS participant (docs/amqp.md): Ruote workitems consumed from an AMQP
//! queue are submitted to the engine as dropped files are ([`intake`]), and the answers of the
//! jobs they became are published to the engine's reply queue ([`reply`]). This adapter owns
//! its config section and URL handling ([`config`]) and its client (lapin on a thread and
//! runtime of its own, [`client`]); the engine knows none of it.
//!
//! Invariants: a message is acked only after its claim is durable; a daemon claims a workitem
//! only when a build slot is free for it; `delivered` is recorded only after the broker
//! confirmed the answer, so an unconfirmed answer is published again by the engine's normal
//! step (a stalled job, recovery at the next start).

pub mod client;
pub mod config;
pub mod declare;
pub mod intake;
pub mod notes;
pub mod reply;

use crate::conditions::{Condition, Gauge};
use crate::domain::{Origin, ReplyTo};
use crate::engine::Engine;
use crossbeam_channel::{Sender, bounded};
use std::sync::Arc;

pub use client::{Client, Handle, Incoming, Settings};
pub use config::AmqpConfig;

/// The name the participant's condition is shown under (`/healthz`, `/metrics`, `status`).
pub const CONDITION: &str = "amqp";

/// The client settings for a config (None: no `[amqp] url`).
pub fn settings(
    cfg: &AmqpConfig,
    workers: usize,
    worker: &str,
    consume: bool,
) -> Result<Option<Settings>, String> {
    let Some(url) = &cfg.url else {
        return Ok(None);
    };
    let uri = config::parse_url(url)?;
    Ok(Some(Settings {
        uri,
        shown: config::redact(url),
        queue: cfg.queue.clone(),
        queue_arguments: config::field_table(&cfg.queue_arguments),
        reply_queue: cfg.reply_queue.clone(),
        reply_queue_arguments: config::field_table(&cfg.reply_queue_arguments),
        work_queue: cfg.work_queue(),
        work_queue_arguments: config::field_table(&cfg.work_queue_arguments),
        farm_exchange: cfg.farm_exchange(),
        farm_queue: format!("{}.{worker}", cfg.farm_exchange()),
        farm_queue_expires_ms: u64::from(cfg.cancel_memory_days.max(1)) * 86_400_000,
        prefetch: cfg.prefetch_for(workers),
        consume,
        consumer_tag: format!("build-image-{worker}-{}", std::process::id()),
    }))
}

/// The participant: the AMQP client and the intake thread that turns its messages into jobs.
pub struct Participant {
    client: Client,
    origin: Origin,
    reply: Arc<reply::Reply>,
    intake: Option<(Sender<()>, std::thread::JoinHandle<()>)>,
}

impl Participant {
    /// Starts the client and connects it to the engine as the answerer of `broker` replies.
    /// Nothing is consumed until [`Participant::start_intake`]. None without `[amqp] url`.
    pub fn start(engine: &Engine, consume: bool) -> anyhow::Result<Option<Participant>> {
        let cfg = &engine.cfg;
        let Some(s) = settings(&cfg.amqp, cfg.worker.workers, &engine.worker, consume)
            .map_err(anyhow::Error::msg)?
        else {
            return Ok(None);
        };
        let origin = Origin::Broker {
            source: Some(config::source_label(&s.uri, &s.queue)),
        };
        let queue = s.reply_queue.clone();
        let shown = s.shown.clone();
        let client = Client::start(s)?;
        let h = client.handle.clone();
        engine
            .conditions
            .register(CONDITION, move || condition(&h, &shown));
        let reply = Arc::new(reply::Reply::new(client.handle.clone(), queue));
        engine.set_answerer(
            ReplyTo::Broker,
            Some(Arc::clone(&reply) as Arc<dyn crate::engine::ports::Answerer>),
        );
        Ok(Some(Participant {
            client,
            origin,
            reply,
            intake: None,
        }))
    }

    /// Publishes host records on the farm's fanout exchange (`type` = `crate::hosts::MESSAGE_TYPE`,
    /// expiring after `ttl_ms` in the queue of a daemon that is away); nothing while not connected.
    pub fn announcer(&self) -> impl Fn(Vec<u8>, u64) + Send + Sync + 'static {
        let h = self.client.handle.clone();
        move |body, ttl_ms| {
            if let Err(why) = h.forward(client::Target::Host(ttl_ms), body, |r| {
                if let Err(why) = r {
                    log::debug!("AMQP: the host record was not published: {why}");
                }
            }) {
                log::debug!("AMQP: the host record was not published: {why}");
            }
        }
    }

    /// Starts turning messages into jobs: drains the participant's queue, takes work from the
    /// farm's work queue while a build slot is free, and applies the farm's cancels.
    pub fn start_intake(&mut self, engine: Arc<Engine>) -> std::io::Result<()> {
        let (tx, rx) = bounded::<()>(1);
        let handle = self.client.handle.clone();
        let deliveries = self.client.deliveries.clone();
        let farm = self.client.farm.clone();
        let origin = self.origin.clone();
        let reply = Arc::clone(&self.reply);
        let notes = Arc::new(notes::Notes::open(Arc::clone(&engine.store)));
        let check = Arc::clone(&notes);
        engine.set_cancelled_before(Some(Arc::new(move |origin, workitem| {
            intake::cancelled_before(&check, origin, workitem)
        })));
        let cancel_days = engine.cfg.amqp.cancel_memory_days;
        let t = std::thread::Builder::new()
            .name("amqp-intake".into())
            .spawn(move || {
                let src = intake::Source {
                    engine: &engine,
                    handle: &handle,
                    origin,
                    reply: &reply,
                    farm: &farm,
                    notes: &notes,
                    cancel_days,
                };
                intake::run(&src, &deliveries, &rx)
            })?;
        self.intake = Some((tx, t));
        Ok(())
    }

    /// No more claims (messages held but not claimed go back to the queue when the connection
    /// closes).
    pub fn stop_intake(&mut self) {
        if let Some((tx, t)) = self.intake.take() {
            drop(tx);
            let _ = t.join();
        }
    }

    /// Closes the connection (after the builds and answers are done).
    pub fn stop(mut self, engine: &Engine) {
        self.stop_intake();
        engine.set_cancelled_before(None);
        engine.set_answerer(ReplyTo::Broker, None);
        engine.conditions.remove(CONDITION);
        self.client.stop();
    }
}

/// The participant's condition: connected (and publishers not blocked), or why not; with the
/// gauges `build_image_amqp_connected` and `build_image_amqp_blocked`.
fn condition(h: &Handle, shown: &str) -> Condition {
    let connected = h.connected();
    let blocked = h.blocked().filter(|_| connected);
    let (ok, detail) = match (&blocked, connected) {
        (Some(why), _) => (false, format!("{}: {why}", client::BLOCKED)),
        (None, true) => (true, format!("connected to {shown}")),
        (None, false) => (
            false,
            format!(
                "not connected to {shown}: {}",
                h.problem().unwrap_or_else(|| "connecting".to_string())
            ),
        ),
    };
    Condition {
        ok,
        detail,
        gauges: vec![
            Gauge {
                name: "build_image_amqp_connected",
                help: "1 while the daemon is connected to its AMQP broker, 0 while it is not (refused, away, connecting)",
                value: i64::from(connected),
            },
            Gauge {
                name: "build_image_amqp_blocked",
                help: "1 while the broker blocks the daemon's publishes (connection.blocked: a memory or disk alarm); answers wait, builds go on",
                value: i64::from(blocked.is_some()),
            },
        ],
    }
}

/// What `doctor` checks with `[amqp] url`: the broker answers, and the queue exists or can be declared.
pub fn check(a: &AmqpConfig) -> Option<crate::health::Check> {
    let url = a.url.as_deref()?;
    let shown = config::redact(url);
    let uri = match config::parse_url(url) {
        Ok(u) => u,
        Err(e) => return Some(crate::health::Check::fail("amqp broker", e)),
    };
    Some(
        match client::probe(
            &uri,
            &a.queue,
            &config::field_table(&a.queue_arguments),
            crate::health::CHILD_TIMEOUT,
        ) {
            Ok(detail) => crate::health::Check::ok("amqp broker", format!("{shown}: {detail}")),
            Err(e) => crate::health::Check::fail("amqp broker", format!("{shown}: {e}")),
        },
    )
}
