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
use std::time::{Duration, SystemTime};

pub use client::{Client, Handle, Incoming, Settings};

/// The hidden name prefix of a message body in `active/<worker>/`.
pub const FILE_PREFIX: &str = ".amqp-";

/// How long messages waiting for a build slot wait at most before the slots are counted again
/// (the build threads tell the intake when a slot frees; this covers any path that does not).
const SLOT_RECHECK: Duration = Duration::from_millis(50);

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
        remove_leftovers(stage);
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
            recv(stage.slot_wakeups()) -> _ => {}
            default(wait) => {}
        }
        while let Ok(m) = deliveries.try_recv() {
            pending.push_back(m);
        }
        // A lost connection's messages are the broker's again (it requeues them): never
        // claimed, even before the reconnect (an ack on a dead channel goes nowhere).
        let generation = handle.generation();
        let connected = handle.connected();
        pending.retain(|m| connected && m.generation == generation);
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
                        claim(stage, handle, vec![m], false);
                    }
                }
            }
        }
        let free = free_slots(stage).min(pending.len());
        if free > 0 {
            let batch: Vec<Incoming> = pending.drain(..free).collect();
            claim(stage, handle, batch, true);
        }
    }
}

/// Writes message bodies into active/, records their claims (one flush), then acks them
/// (workitems) or rejects them without requeue (malformed bodies: their jobs are rejected, the
/// bodies kept in rejected/ with a `.reason`). What cannot be recorded goes back to the queue.
/// Returns the jobs opened.
fn claim(stage: &Stage, handle: &Handle, batch: Vec<Incoming>, workitem: bool) -> Vec<u64> {
    let source = stage.amqp_source();
    let mut names = Vec::with_capacity(batch.len());
    let written = batch.iter().try_for_each(|m| {
        let name = body_name();
        let path = stage.spool.active_path(&name);
        names.push(name);
        crate::durable::write_new(&path, &m.body, 0o644).map(|_| ())
    });
    let recorded = written
        .and_then(|()| crate::durable::sync_dir(&stage.spool.active))
        .map_err(|e| e.to_string())
        .and_then(|()| {
            stage
                .intake_from(&names, source.as_deref())
                .map_err(|e| e.to_string())
        });
    match recorded {
        Ok(()) => {
            for m in batch {
                if workitem {
                    handle.ack(m);
                } else {
                    handle.reject(m, false);
                }
            }
            names.iter().filter_map(|n| stage.job_of_file(n)).collect()
        }
        Err(e) => {
            log::error!(
                "AMQP: cannot record {} message(s) ({e}): back to the queue",
                batch.len()
            );
            for n in &names {
                let _ = std::fs::remove_file(stage.spool.active_path(n));
            }
            for m in batch {
                handle.reject(m, true);
            }
            Vec::new()
        }
    }
}

/// Removes what an earlier life of this worker left of interrupted body writes in active/
/// (hidden temporary files of `.amqp-` names; that process is gone: the log's lock is ours).
pub fn remove_leftovers(stage: &Stage) {
    let tmp_prefix = format!(".{FILE_PREFIX}");
    let Ok(rd) = std::fs::read_dir(&stage.spool.active) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&tmp_prefix) && name.ends_with(".tmp") {
            match std::fs::remove_file(e.path()) {
                Ok(()) => log::info!("removed active/{name}, left by an interrupted write"),
                Err(err) => log::warn!("cannot remove active/{name}: {err}"),
            }
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
        claim(stage, handle, vec![m], true);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use serde_json::json;
    use std::path::Path;

    #[test]
    fn the_password_is_never_shown() {
        assert_eq!(
            redact("amqp://boss:s3cret@mq.example.org:5672/%2f"),
            "amqp://boss:***@mq.example.org:5672/%2f"
        );
        assert_eq!(redact("amqp://boss:p@ss@h/v"), "amqp://boss:***@h/v");
        assert_eq!(redact("amqp://h:5672/v"), "amqp://h:5672/v");
        assert_eq!(redact("not a url"), "not a url");
        let cfg = Config::parse(
            "[amqp]\nurl = \"amqp://u:topsecret@h:5672/%2f\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert!(!format!("{cfg:?}").contains("topsecret"));
        let e = Config::parse("[amqp]\nurl = \"http://u:topsecret@h/\"\n", Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not an AMQP url") && !e.contains("topsecret"),
            "{e}"
        );
    }

    #[test]
    fn config_defaults_ranges_and_urls() {
        let cfg = Config::parse("", Path::new("t")).unwrap();
        assert_eq!(cfg.amqp.url, None);
        assert_eq!(cfg.amqp.queue, "build_image");
        assert_eq!(cfg.amqp.reply_queue, "ruote_workitems");
        assert_eq!(cfg.amqp.prefetch_for(3), 3);
        let cfg = Config::parse("[amqp]\nurl = \"\"\nprefetch = 5\n", Path::new("t")).unwrap();
        assert_eq!(cfg.amqp.url, None, "empty = unset");
        assert_eq!(cfg.amqp.prefetch_for(3), 5);
        for bad in [
            "[amqp]\nprefetch = 1001\n",
            "[amqp]\nprefetch = -1\n",
            "[amqp]\nqueue = \"\"\n",
            "[amqp]\nnope = 1\n",
            "[amqp]\nurl = \"amqps://h/\"\n",
            "[amqp]\nurl = \"amqp://:5672/\"\n",
        ] {
            assert!(Config::parse(bad, Path::new("t")).is_err(), "{bad}");
        }
        let uri = parse_url("amqp://u:p@mq:5673/build%2fvhost").unwrap();
        assert_eq!(
            source_label(&uri, "build_image"),
            "amqp://mq:5673/build%2Fvhost/build_image"
        );
    }

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
        assert!(forget(&json!({"fields": {"params": {"forget": true}}})));
        assert!(!forget(&json!({"fields": {"params": {"forget": "yes"}}})));
        assert!(!forget(&json!({"fields": {}})));
    }

    #[test]
    fn body_names_are_hidden_and_unique() {
        let a = body_name();
        let b = body_name();
        assert_ne!(a, b);
        assert!(is_amqp_file(&a) && crate::spool::ignored_name(&a));
        assert!(!is_amqp_file("amqp-1.json"));
        let mut job = Job {
            file: Some(a),
            ..Job::default()
        };
        assert_eq!(source_of(&job), "amqp");
        job.file = Some("x.json".into());
        assert_eq!(source_of(&job), "spool");
    }

    #[test]
    fn claimed_without_source_reads_as_before() {
        let old = r#"{"seq":1,"ts":"t","job":1,"kind":"claimed","file":"a","worker":"w","bytes":1,"sha256":"x"}"#;
        let ev: crate::journal::Event = serde_json::from_str(old).unwrap();
        assert!(matches!(
            ev.kind,
            crate::journal::EventKind::Claimed { source: None, .. }
        ));
        assert_eq!(serde_json::to_string(&ev).unwrap(), old);
    }
}
