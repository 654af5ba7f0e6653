//! The daemon as a BOSS participant (docs/amqp.md): Ruote workitems consumed from an AMQP
//! queue become jobs exactly as dropped files do, and answers are published to the engine's
//! reply queue with publisher confirms.
//!
//! A message body is written (tmp + fsync + rename) into `active/<worker>/` under a hidden
//! name, `.amqp-…` (a name no dropped file can have: `incoming/` ignores hidden names), and
//! handed to the same intake as a claimed file (`Stage::intake_from`): same validation,
//! events, builds, pushes, operator commands. The name is what marks a job as an AMQP one:
//! its Deliver step publishes instead of writing to outbox/.
//!
//! Invariants: a message is acked only after its claim is flushed to the event log; a daemon
//! claims a workitem only when a build slot is free for it (the broker holds the rest, at most
//! `prefetch` of them unacked here); `delivered` is recorded only after the broker confirmed
//! the answer, so an unconfirmed answer is published again by the normal step (stalled job,
//! recovery at the next start).

pub mod client;

use crate::config::AmqpConfig;
use crate::journal::{Job, State};
use crate::stage::Stage;
use crossbeam_channel::{Receiver, Sender, bounded, select};
use lapin::uri::{AMQPScheme, AMQPUri};
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

pub use client::{Client, Handle, Incoming, Settings};

/// The hidden name prefix of a message body in `active/<worker>/`.
pub const FILE_PREFIX: &str = ".amqp-";

/// How long a Deliver step waits for the broker's confirm.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Is this file in active/ a message body (an AMQP job)?
pub fn is_amqp_file(name: &str) -> bool {
    name.starts_with(FILE_PREFIX)
}

/// Where a job's workitem came from: `amqp` or `spool`.
pub fn source_of(job: &Job) -> &'static str {
    match &job.file {
        Some(f) if is_amqp_file(f) => "amqp",
        _ => "spool",
    }
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
    match crate::workitem::parse_object(body) {
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

/// Does the workitem ask for no reply (`fields.params.forget` true)?
pub fn forget(input: &Value) -> bool {
    input.pointer("/fields/params/forget") == Some(&Value::Bool(true))
}

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
    let uri = parse_url(url)?;
    Ok(Some(Settings {
        uri,
        shown: redact(url),
        queue: cfg.queue.clone(),
        reply_queue: cfg.reply_queue.clone(),
        prefetch: cfg.prefetch_for(workers),
        consume,
        consumer_tag: format!("build-image-{worker}-{}", std::process::id()),
    }))
}

/// A free name for a message body in active/.
fn body_name() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{FILE_PREFIX}{nanos}-{}.json",
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The participant: the AMQP client and the intake thread that turns its messages into jobs.
pub struct Participant {
    client: Client,
    intake: Option<(Sender<()>, std::thread::JoinHandle<()>)>,
}

impl Participant {
    /// Starts the client (and connects the stage's Deliver step to it). Nothing is consumed
    /// until [`Participant::start_intake`].
    pub fn start(stage: &Stage, consume: bool) -> anyhow::Result<Option<Participant>> {
        let cfg = &stage.cfg;
        let Some(s) = settings(&cfg.amqp, cfg.worker.workers, &stage.spool.worker, consume)
            .map_err(anyhow::Error::msg)?
        else {
            return Ok(None);
        };
        let client = Client::start(s)?;
        stage.set_amqp(Some(client.handle.clone()));
        Ok(Some(Participant {
            client,
            intake: None,
        }))
    }

    /// Starts turning messages into jobs.
    pub fn start_intake(&mut self, stage: Arc<Stage>) -> std::io::Result<()> {
        let (tx, rx) = bounded::<()>(1);
        let handle = self.client.handle.clone();
        let deliveries = self.client.deliveries.clone();
        let t = std::thread::Builder::new()
            .name("amqp-intake".into())
            .spawn(move || intake_loop(&stage, &handle, &deliveries, &rx))?;
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
    pub fn stop(mut self, stage: &Stage) {
        self.stop_intake();
        stage.set_amqp(None);
        self.client.stop();
    }
}

/// Build slots not taken by this worker's jobs that wait for or hold one.
fn free_slots(stage: &Stage) -> usize {
    let me = stage.spool.worker.as_str();
    let busy = stage.store.with_open(|jobs| {
        jobs.values()
            .filter(|j| j.worker.as_deref().is_none_or(|w| w == me))
            .filter(|j| {
                matches!(
                    j.state,
                    State::Claimed | State::Queued | State::Building | State::Interrupted
                )
            })
            .count()
    });
    stage.cfg.worker.workers.saturating_sub(busy)
}

fn intake_loop(
    stage: &Stage,
    handle: &Handle,
    deliveries: &Receiver<Incoming>,
    stop: &Receiver<()>,
) {
    let mut pending: VecDeque<Incoming> = VecDeque::new();
    let mut next_check = Instant::now();
    loop {
        select! {
            recv(stop) -> _ => return,
            recv(deliveries) -> m => match m {
                Ok(m) => pending.push_back(m),
                Err(_) => return,
            },
            default(Duration::from_millis(20)) => {}
        }
        while let Ok(m) = deliveries.try_recv() {
            pending.push_back(m);
        }
        // After a reconnect the broker has requeued what the old connection held.
        let generation = handle.generation();
        pending.retain(|m| m.generation == generation);
        if pending.is_empty() || stage.store.failing().is_some() || stage.stopping() {
            continue;
        }
        // Cancels and malformed bodies need no build slot: they go first.
        let mut i = 0;
        while i < pending.len() {
            match classify(&pending[i].body) {
                Message::Workitem => i += 1,
                Message::Cancel(fei) => {
                    if let Some(m) = pending.remove(i) {
                        cancel(stage, handle, &fei, &mut pending);
                        handle.ack(m);
                    }
                }
                Message::Malformed(why) => {
                    if let Some(m) = pending.remove(i) {
                        log::warn!("AMQP: a message is not a workitem ({why}): rejected");
                        claim(stage, handle, m, false);
                    }
                }
            }
        }
        if Instant::now() < next_check && pending.is_empty() {
            continue;
        }
        next_check = Instant::now() + Duration::from_millis(20);
        let mut free = free_slots(stage);
        while free > 0 {
            let Some(m) = pending.pop_front() else { break };
            if claim(stage, handle, m, true).is_some() {
                free -= 1;
            }
        }
    }
}

/// Writes a message body into active/, records its claim (flushed), then acks it (a workitem)
/// or rejects it without requeue (a malformed body: its job is rejected, the body kept in
/// rejected/ with a `.reason`). If it cannot be recorded, it goes back to the queue.
fn claim(stage: &Stage, handle: &Handle, m: Incoming, workitem: bool) -> Option<u64> {
    let name = body_name();
    let path = stage.spool.active_path(&name);
    let source = stage.amqp_source();
    let recorded = crate::durable::write_new(&path, &m.body, 0o644)
        .map_err(|e| e.to_string())
        .and_then(|_| {
            stage
                .intake_from(std::slice::from_ref(&name), source.as_deref())
                .map_err(|e| e.to_string())
        });
    match recorded {
        Ok(()) => {
            if workitem {
                handle.ack(m);
            } else {
                handle.reject(m, false);
            }
            stage.job_of_file(&name)
        }
        Err(e) => {
            log::error!("AMQP: cannot record a message ({e}): back to the queue");
            let _ = std::fs::remove_file(&path);
            handle.reject(m, true);
            None
        }
    }
}

/// Cancels the job with this `fei`: an open AMQP job of this daemon, or a message held here
/// and not claimed yet (claimed now, then cancelled: never built).
fn cancel(stage: &Stage, handle: &Handle, fei: &Value, pending: &mut VecDeque<Incoming>) {
    if fei.is_null() {
        log::warn!("AMQP: a cancel without a fei: nothing to cancel");
        return;
    }
    let held = pending.iter().position(|m| {
        crate::workitem::parse_object(&m.body).is_ok_and(|v| v.get("fei") == Some(fei))
    });
    if let Some(i) = held
        && let Some(m) = pending.remove(i)
    {
        claim(stage, handle, m, true);
    }
    match stage.job_of_fei(fei) {
        Some(id) => match stage.cancel(id) {
            Ok(_) => log::info!("AMQP: job {id} cancelled (fei {fei})"),
            Err(e) => log::warn!("AMQP: cannot cancel job {id}: {e}"),
        },
        None => log::warn!(
            "AMQP: cancel of fei {fei}: no open job of this worker has it (answered already, or another host holds it)"
        ),
    }
}
