//! The AMQP connection: one thread with its own single-threaded tokio runtime (lapin's
//! executor), talking to the daemon over channels. It consumes the participant's queue
//! (manual acks, `basic_qos(prefetch)`), hands each delivery to the daemon, acks or rejects
//! what the daemon says, and publishes answers `mandatory` with publisher confirms. A lost
//! connection is reconnected with back-off; meanwhile publishes fail at once (the caller tries
//! again later). A broker that refuses the daemon (credentials, permissions, a vhost, a queue's
//! arguments) is an ERROR with its reason, not a quiet retry; [`Handle::problem`] says why the
//! client is not connected. A broker that blocks publishers (`connection.blocked`: a memory or
//! disk alarm) is honoured: no publish starts until it unblocks ([`Handle::blocked`]), and a
//! publish has no time-out (its confirm comes when the broker reads it again).
//!
//! Invariants: a delivery is tagged with the generation (connection) it came from; once that
//! connection is lost (`connected` false from the moment the client sees it) the broker has
//! requeued every unacked one, so the daemon drops them unclaimed. An answer the broker
//! returned (no queue to route it to) is a failed publish, never a delivered one; the reply
//! queue is declared again before the next publish.

pub use super::declare::{declare, persistent, probe, refused};
use crate::engine::backoff::Backoff;
use crossbeam_channel::{Receiver, Sender, unbounded};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Confirmation, Connection, ConnectionProperties};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// What the client needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    pub uri: AMQPUri,
    /// The url without its password, for logs.
    pub shown: String,
    pub queue: String,
    /// Declared with these when missing (`[amqp] queue_arguments`).
    pub queue_arguments: FieldTable,
    pub reply_queue: String,
    pub reply_queue_arguments: FieldTable,
    /// The farm's work queue: workitems drained from `queue` wait there for a free slot.
    pub work_queue: String,
    pub work_queue_arguments: FieldTable,
    /// The farm's fanout exchange: cancels reach every daemon through it.
    pub farm_exchange: String,
    /// This daemon's queue bound to the exchange (durable, named after the worker, so that a
    /// cancel broadcast while the daemon is away waits for it), deleted by the broker after
    /// this long unused (ms).
    pub farm_queue: String,
    pub farm_queue_expires_ms: u64,
    pub prefetch: u16,
    /// Consume the queue (false: publish only, e.g. `run --once`).
    pub consume: bool,
    pub consumer_tag: String,
}

/// One message taken from the queue, not acked yet.
pub struct Incoming {
    pub body: Vec<u8>,
    pub redelivered: bool,
    /// The connection it came on (see the module's invariant).
    pub generation: u64,
    /// Its AMQP `type` property (a host record on the farm exchange: `crate::hosts::MESSAGE_TYPE`).
    pub kind: Option<String>,
    acker: lapin::Acker,
}

/// Told once how a publish went: confirmed (Ok), or nacked, returned, or lost (Err).
pub type Done = Box<dyn FnOnce(Result<(), String>) + Send>;

/// Where a message drained from the participant's queue goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The farm's work queue (a workitem).
    Work,
    /// The farm's fanout exchange (a cancel: every daemon gets it).
    Farm,
    /// The farm's fanout exchange, a host record (`type` = `crate::hosts::MESSAGE_TYPE`, not
    /// persistent, expiring after this many ms in the queue of a daemon that is away).
    Host(u64),
}

/// What a `basic.get` of the work queue brought: a message, or none waiting.
pub type Got = Result<Option<Incoming>, String>;

enum Cmd {
    Publish {
        body: Vec<u8>,
        done: Done,
    },
    Forward {
        to: Target,
        body: Vec<u8>,
        done: Done,
    },
    Get(Sender<Got>),
    Ack(lapin::Acker),
    /// Reject; `requeue` puts it back for another consumer.
    Reject(lapin::Acker, bool),
    Stop,
}

/// State shared with the daemon.
#[derive(Default)]
struct Shared {
    connected: AtomicBool,
    generation: AtomicU64,
    /// Why the client is not connected (None while connected, or before the first try ends).
    problem: std::sync::Mutex<Option<String>>,
    /// Why the broker blocks this connection's publishers (`connection.blocked`), while it does.
    blocked: std::sync::Mutex<Option<String>>,
}

/// The sending side: cheap to clone, used by any thread.
#[derive(Clone)]
pub struct Handle {
    cmds: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Shared>,
}

impl Handle {
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// Why the client is not connected to the broker (None: connected, or still trying for
    /// the first time).
    pub fn problem(&self) -> Option<String> {
        match self.shared.problem.lock() {
            Ok(p) => p.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The current connection's generation.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::SeqCst)
    }

    /// Why the broker blocks publishers on this connection (`connection.blocked`, a memory or
    /// disk alarm), while it does.
    pub fn blocked(&self) -> Option<String> {
        match self.shared.blocked.lock() {
            Ok(b) => b.clone(),
            Err(b) => b.into_inner().clone(),
        }
    }

    /// Starts publishing `body` persistent and `mandatory` to the default exchange (routing
    /// key: the reply queue); `done` is told once how it went: Ok when the broker confirmed it
    /// and routed it, Err when it was nacked, returned, or lost with its connection. There is no
    /// time-out: a blocked broker confirms when it unblocks. Err at once (and `done` is not
    /// called) when not connected or while the broker blocks publishers.
    pub fn start_publish(
        &self,
        body: Vec<u8>,
        done: impl FnOnce(Result<(), String>) + Send + 'static,
    ) -> Result<(), String> {
        if !self.connected() {
            return Err("not connected to the broker".into());
        }
        if let Some(why) = self.blocked() {
            return Err(format!("{BLOCKED}: {why}"));
        }
        self.cmds
            .send(Cmd::Publish {
                body,
                done: Box::new(done),
            })
            .map_err(|_| "the AMQP client has stopped".to_string())
    }

    /// Starts publishing `body` (a message drained from the participant's queue) persistent
    /// and confirmed to the farm's work queue or fanout exchange; `done` is told how it went.
    /// Unlike an answer, it is not refused while the broker blocks publishers: it waits in the
    /// client (the original stays unacked meanwhile). Err at once when not connected.
    pub fn forward(
        &self,
        to: Target,
        body: Vec<u8>,
        done: impl FnOnce(Result<(), String>) + Send + 'static,
    ) -> Result<(), String> {
        if !self.connected() {
            return Err("not connected to the broker".into());
        }
        self.cmds
            .send(Cmd::Forward {
                to,
                body,
                done: Box::new(done),
            })
            .map_err(|_| "the AMQP client has stopped".to_string())
    }

    /// Asks the work queue for one message (`basic.get`, acked later by [`Handle::ack`]); the
    /// answer comes on `done`. Err at once when not connected.
    pub fn get(&self, done: Sender<Got>) -> Result<(), String> {
        if !self.connected() {
            return Err("not connected to the broker".into());
        }
        self.cmds
            .send(Cmd::Get(done))
            .map_err(|_| "the AMQP client has stopped".to_string())
    }

    pub fn ack(&self, m: Incoming) {
        let _ = self.cmds.send(Cmd::Ack(m.acker));
    }

    pub fn reject(&self, m: Incoming, requeue: bool) {
        let _ = self.cmds.send(Cmd::Reject(m.acker, requeue));
    }
}

/// The running client.
pub struct Client {
    pub handle: Handle,
    /// Messages of the participant's queue.
    pub deliveries: Receiver<Incoming>,
    /// Messages of the farm's fanout exchange (this daemon's own queue bound to it).
    pub farm: Receiver<Incoming>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    pub fn start(settings: Settings) -> std::io::Result<Client> {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (del_tx, del_rx) = unbounded();
        let (farm_tx, farm_rx) = unbounded();
        let shared = Arc::new(Shared::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("amqp".into())
                .spawn(move || {
                    runtime.block_on(run(
                        settings,
                        shared,
                        cmd_rx,
                        Outlets {
                            deliveries: del_tx,
                            farm: farm_tx,
                        },
                    ))
                })?
        };
        Ok(Client {
            handle: Handle {
                cmds: cmd_tx,
                shared,
            },
            deliveries: del_rx,
            farm: farm_rx,
            thread: Some(thread),
        })
    }

    /// Closes the connection (after the acks and publishes asked for before) and ends the thread.
    pub fn stop(mut self) {
        let _ = self.handle.cmds.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The heartbeat asked for when the url does not set one (seconds).
pub const HEARTBEAT_S: u16 = 10;

/// Where the client hands the messages it receives.
struct Outlets {
    deliveries: Sender<Incoming>,
    farm: Sender<Incoming>,
}

async fn run(
    s: Settings,
    shared: Arc<Shared>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    out: Outlets,
) {
    let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut tries = 0u32;
    // The refusal last logged at ERROR, and when (it is logged again when it changes, and every
    // REFUSAL_REPEAT while it lasts).
    let mut refusal: Option<(String, std::time::Instant)> = None;
    loop {
        let before = shared.generation.load(Ordering::SeqCst);
        let why = match session(&s, &shared, &mut cmds, &out).await {
            Ok(()) => return,
            Err(e) => e,
        };
        shared.connected.store(false, Ordering::SeqCst);
        if shared.generation.load(Ordering::SeqCst) != before {
            // It was connected: a new outage.
            tries = 0;
        }
        tries += 1;
        let delay = backoff.delay(tries);
        set_problem(&shared, Some(why.clone()));
        if refused(&why) {
            let again = refusal
                .as_ref()
                .is_none_or(|(last, at)| *last != why || at.elapsed() >= REFUSAL_REPEAT);
            if again {
                log::error!(
                    "AMQP {}: the broker refuses: {why}; nothing is consumed or answered over AMQP until this is fixed (trying again every {:?} at most)",
                    s.shown,
                    Duration::from_secs(5)
                );
                refusal = Some((why.clone(), std::time::Instant::now()));
            }
        } else if tries == 1 {
            log::warn!(
                "AMQP {}: {why}; reconnecting (every {:?} at most)",
                s.shown,
                Duration::from_secs(5)
            );
        } else {
            log::debug!("AMQP {}: {why}; next try in {delay:?}", s.shown);
        }
        // Wait, answering commands: publishes fail, acks of the old connection are moot (the
        // broker requeued those messages).
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                c = cmds.recv() => match c {
                    None | Some(Cmd::Stop) => return,
                    Some(Cmd::Publish { done, .. }) | Some(Cmd::Forward { done, .. }) => {
                        done(Err("not connected to the broker".into()))
                    }
                    Some(Cmd::Get(done)) => {
                        let _ = done.send(Err("not connected to the broker".into()));
                    }
                    Some(Cmd::Ack(_)) | Some(Cmd::Reject(..)) => {}
                },
            }
        }
    }
}

/// How long a stop waits for the broker to answer the connection's close.
const CLOSE_PATIENCE: Duration = Duration::from_secs(5);

/// How often a refusal that lasts is logged at ERROR again.
const REFUSAL_REPEAT: Duration = Duration::from_secs(300);

/// What a publish refused while the broker blocks publishers says (before the broker's reason).
pub const BLOCKED: &str = "the broker blocks publishers";

fn set_blocked(shared: &Shared, why: Option<String>) {
    match shared.blocked.lock() {
        Ok(mut b) => *b = why,
        Err(b) => *b.into_inner() = why,
    }
}

fn set_problem(shared: &Shared, problem: Option<String>) {
    match shared.problem.lock() {
        Ok(mut p) => *p = problem,
        Err(p) => *p.into_inner() = problem,
    }
}

/// One connection's life. Ok: stopped; Err: lost (the reason).
async fn session(
    s: &Settings,
    shared: &Shared,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    out: &Outlets,
) -> Result<(), String> {
    let mut uri = s.uri.clone();
    uri.query.heartbeat.get_or_insert(HEARTBEAT_S);
    // Two connections: a broker under an alarm blocks the connections that publish, and lapin
    // writes nothing at all on a blocked one (no get, no ack). Consuming, getting work and
    // acking go on their own connection, which never publishes, so they go on through an alarm.
    let named = |what: &str| {
        ConnectionProperties::default()
            .with_connection_name(format!("build-image {}{what}", s.consumer_tag).into())
    };
    let conn = Connection::connect_uri(uri.clone(), named(""))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let pconn = match Connection::connect_uri(uri, named(" publish")).await {
        Ok(c) => c,
        Err(e) => {
            let _ = tokio::time::timeout(CLOSE_PATIENCE, conn.close(200, "".into())).await;
            return Err(format!("cannot connect: {e}"));
        }
    };
    let result = serve(s, shared, &conn, &pconn, cmds, out).await;
    shared.connected.store(false, Ordering::SeqCst);
    set_blocked(shared, None);
    if result.is_ok() {
        // A broker that blocks the connection never reads the close (lapin writes nothing
        // while blocked): a stop does not wait for it longer than this.
        for c in [&conn, &pconn] {
            let closing = c.close(200, "build-image stopping".into());
            if tokio::time::timeout(CLOSE_PATIENCE, closing).await.is_err() {
                log::warn!(
                    "AMQP {}: the broker did not answer the close within {CLOSE_PATIENCE:?}; leaving it",
                    s.shown
                );
            }
        }
    }
    result
}

async fn serve(
    s: &Settings,
    shared: &Shared,
    conn: &Connection,
    pconn: &Connection,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    out: &Outlets,
) -> Result<(), String> {
    let e = |what: &'static str| move |err: lapin::Error| format!("{what}: {err}");
    // Subscribed first: a `connection.blocked` is told only to listeners there are.
    let mut events = Box::pin(pconn.events_listener());
    let consume = conn
        .create_channel()
        .await
        .map_err(e("cannot open a channel"))?;
    declare(conn, &s.queue, &s.queue_arguments).await?;
    declare(conn, &s.reply_queue, &s.reply_queue_arguments).await?;
    declare(conn, &s.work_queue, &s.work_queue_arguments).await?;
    let publish = pconn
        .create_channel()
        .await
        .map_err(e("cannot open a channel"))?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(e("cannot enable publisher confirms"))?;
    let mut consumer = if s.consume {
        consume
            .basic_qos(s.prefetch, BasicQosOptions::default())
            .await
            .map_err(e("cannot set the prefetch"))?;
        Some(
            consume
                .basic_consume(
                    s.queue.as_str().into(),
                    s.consumer_tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(e("cannot consume"))?,
        )
    } else {
        None
    };
    // The farm's fanout exchange, and this daemon's own queue bound to it.
    let mut farm = if s.consume {
        let farm = super::declare::Farm {
            farm_exchange: &s.farm_exchange,
            farm_queue: &s.farm_queue,
            farm_queue_expires_ms: s.farm_queue_expires_ms,
            consumer_tag: &s.consumer_tag,
        };
        Some(super::declare::farm(conn, &farm).await?)
    } else {
        None
    };
    // Set when the broker returned an answer: the reply queue is gone (deleted by an operator),
    // declared again before the next publish.
    let redeclare = Arc::new(AtomicBool::new(false));
    // The same for the work queue (a forwarded workitem returned).
    let redeclare_work = Arc::new(AtomicBool::new(false));
    let generation = shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
    set_problem(shared, None);
    shared.connected.store(true, Ordering::SeqCst);
    log::info!(
        "AMQP {}: connected; {} (prefetch {}), answers to {}",
        s.shown,
        if s.consume {
            format!("consuming {}", s.queue)
        } else {
            "not consuming".to_string()
        },
        s.prefetch,
        s.reply_queue
    );
    loop {
        tokio::select! {
            d = async {
                match consumer.as_mut() {
                    Some(c) => c.next().await,
                    None => std::future::pending().await,
                }
            } => match d {
                Some(Ok(d)) => {
                    let m = Incoming {
                        kind: d.properties.kind().as_ref().map(|k| k.to_string()),
                        body: d.data,
                        redelivered: d.redelivered,
                        generation,
                        acker: d.acker,
                    };
                    if out.deliveries.send(m).is_err() {
                        return Ok(());
                    }
                }
                Some(Err(err)) => return Err(format!("connection lost: {err}")),
                None => return Err("the broker cancelled the consumer".into()),
            },
            d = async {
                match farm.as_mut() {
                    Some(c) => c.next().await,
                    None => std::future::pending().await,
                }
            } => match d {
                Some(Ok(d)) => {
                    let m = Incoming {
                        kind: d.properties.kind().as_ref().map(|k| k.to_string()),
                        body: d.data,
                        redelivered: d.redelivered,
                        generation,
                        acker: d.acker,
                    };
                    if out.farm.send(m).is_err() {
                        return Ok(());
                    }
                }
                Some(Err(err)) => return Err(format!("connection lost: {err}")),
                None => return Err("the broker cancelled the farm consumer".into()),
            },
            ev = events.next() => match ev {
                Some(lapin::Event::ConnectionBlocked(why)) => {
                    log::warn!(
                        "AMQP {}: {BLOCKED} ({why}): answers wait until it unblocks; builds go on",
                        s.shown
                    );
                    set_blocked(shared, Some(why));
                }
                Some(lapin::Event::ConnectionUnblocked) => {
                    log::info!("AMQP {}: the broker takes publishes again", s.shown);
                    set_blocked(shared, None);
                }
                // The publishing connection (or its channel: a publish to an exchange deleted
                // meanwhile closes it) failed: both are made again.
                Some(lapin::Event::Error(err)) => {
                    return Err(format!("the publishing connection failed: {err}"));
                }
                Some(_) => {}
                None => return Err("the connection's events ended".into()),
            },
            c = cmds.recv() => match c {
                None | Some(Cmd::Stop) => return Ok(()),
                Some(Cmd::Publish { body, done }) => {
                    if redeclare.load(Ordering::SeqCst) {
                        match declare(conn, &s.reply_queue, &s.reply_queue_arguments).await {
                            Ok(()) => {
                                redeclare.store(false, Ordering::SeqCst);
                                log::info!("AMQP: reply queue {} declared again", s.reply_queue);
                            }
                            Err(why) => {
                                done(Err(why));
                                continue;
                            }
                        }
                    }
                    let ch = publish.clone();
                    let key = s.reply_queue.clone();
                    let redeclare = Arc::clone(&redeclare);
                    tokio::spawn(async move {
                        let r = async {
                            let confirm = ch
                                .basic_publish(
                                    "".into(),
                                    key.as_str().into(),
                                    BasicPublishOptions { mandatory: true, immediate: false },
                                    &body,
                                    persistent(),
                                )
                                .await
                                .map_err(|e| format!("cannot publish: {e}"))?
                                .await
                                .map_err(|e| format!("no confirm: {e}"))?;
                            confirmed(confirm, &key)
                        }
                        .await;
                        if r.as_ref().is_err_and(|e| e.contains(RETURNED)) {
                            redeclare.store(true, Ordering::SeqCst);
                        }
                        done(r);
                    });
                }
                Some(Cmd::Forward { to, body, done }) => {
                    if to == Target::Work && redeclare_work.load(Ordering::SeqCst) {
                        match declare(conn, &s.work_queue, &s.work_queue_arguments).await {
                            Ok(()) => redeclare_work.store(false, Ordering::SeqCst),
                            Err(why) => {
                                done(Err(why));
                                continue;
                            }
                        }
                    }
                    let ch = publish.clone();
                    let (exchange, key) = match to {
                        Target::Work => (String::new(), s.work_queue.clone()),
                        Target::Farm | Target::Host(_) => (s.farm_exchange.clone(), String::new()),
                    };
                    let props = match to {
                        Target::Host(ms) => persistent()
                            .with_delivery_mode(1)
                            .with_type(crate::hosts::MESSAGE_TYPE.into())
                            .with_expiration(ms.to_string().as_str().into()),
                        _ => persistent(),
                    };
                    let again = Arc::clone(&redeclare_work);
                    tokio::spawn(async move {
                        let r = async {
                            let confirm = ch
                                .basic_publish(
                                    exchange.as_str().into(),
                                    key.as_str().into(),
                                    BasicPublishOptions { mandatory: to == Target::Work, immediate: false },
                                    &body,
                                    props,
                                )
                                .await
                                .map_err(|e| format!("cannot publish: {e}"))?
                                .await
                                .map_err(|e| format!("no confirm: {e}"))?;
                            confirmed(confirm, &key)
                        }
                        .await;
                        if r.as_ref().is_err_and(|e| e.contains(RETURNED)) {
                            again.store(true, Ordering::SeqCst);
                        }
                        done(r);
                    });
                }
                Some(Cmd::Get(done)) => {
                    let ch = consume.clone();
                    let queue = s.work_queue.clone();
                    tokio::spawn(async move {
                        let r = ch
                            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                            .await
                            .map(|m| {
                                m.map(|m| Incoming {
                                    kind: m.delivery.properties.kind().as_ref().map(|k| k.to_string()),
                                    body: m.delivery.data,
                                    redelivered: m.delivery.redelivered,
                                    generation,
                                    acker: m.delivery.acker,
                                })
                            })
                            .map_err(|e| format!("cannot get from {queue}: {e}"));
                        let _ = done.send(r);
                    });
                }
                Some(Cmd::Ack(a)) => {
                    if let Err(err) = a.ack(BasicAckOptions::default()).await {
                        log::warn!("AMQP: cannot ack ({err}); the broker will deliver it again");
                    }
                }
                Some(Cmd::Reject(a, requeue)) => {
                    let r = if requeue {
                        a.nack(BasicNackOptions { requeue: true, multiple: false }).await
                    } else {
                        a.reject(BasicRejectOptions { requeue: false }).await
                    };
                    if let Err(err) = r {
                        log::warn!("AMQP: cannot reject ({err})");
                    }
                }
            },
        }
    }
}

/// What an error of a returned answer says (the client declares the reply queue again).
const RETURNED: &str = "the broker returned the answer";

/// A publisher confirm judged: only an ack of a message the broker routed is a delivery; a
/// returned message (mandatory, no queue bound to its routing key) is acked by the broker too,
/// but it went nowhere.
fn confirmed(c: Confirmation, queue: &str) -> Result<(), String> {
    match c {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)) => Err(format!(
            "{RETURNED} ({} {}): no queue {queue}",
            r.reply_code, r.reply_text
        )),
        Confirmation::Nack(None) => Err("the broker nacked the answer".to_string()),
    }
}
