//! How a command reaches the log: through a running daemon's control socket, or, when none
//! runs, by opening the log itself (briefly: a daemon starting meanwhile waits for the lock).

use crate::config::Config;
use crate::control::{Client, Request};
use crate::journal::{Event, Journal, JournalError};
use crate::spool::Spool;
use crate::stage::Stage;
use anyhow::Context;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::{Duration, Instant};

/// Opens the log of `cfg` directly. Errors when it does not exist (no daemon ever ran with this
/// config) rather than creating an empty one.
pub fn open_log(cfg: &Config) -> anyhow::Result<Option<Journal>> {
    let dir = cfg.state_dir();
    anyhow::ensure!(
        dir.join("conf").exists() || dir.join("db").exists(),
        "no event log in {}: has a daemon run with this configuration (--config, --spool, [spool] worker_id)?",
        dir.display()
    );
    match Journal::open(&dir) {
        Ok(j) => Ok(Some(j)),
        Err(JournalError::Locked(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The way to the log: the running daemon, or the log itself.
enum Reach {
    Daemon(Client),
    Log(Journal),
}

/// Connects to the daemon, or opens the log when none runs. While the log is locked but no socket
/// answers (a daemon starting), tries again for a while.
fn reach(cfg: &Config) -> anyhow::Result<Reach> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(client) = Client::connect(&cfg.state_dir()) {
            return Ok(Reach::Daemon(client));
        }
        if let Some(journal) = open_log(cfg)? {
            return Ok(Reach::Log(journal));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the event log in {} is locked, but no daemon answers on its control socket",
            cfg.state_dir().display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends a request to the daemon and decodes its answer.
fn ask<T: DeserializeOwned>(
    client: Client,
    req: &Request,
    on_event: impl FnMut(Event) -> bool,
) -> anyhow::Result<T> {
    let reply = client.call(req, on_event)?;
    if !reply.ok {
        anyhow::bail!(reply.error.unwrap_or_else(|| "the daemon refused".into()));
    }
    let data = reply.data.unwrap_or(serde_json::Value::Null);
    serde_json::from_value(data).context("unexpected answer from the daemon")
}

/// Asks the running daemon, or computes the answer from the log itself.
/// `on_event` receives streamed events (from the daemon).
pub fn query<T: DeserializeOwned + Serialize>(
    cfg: &Config,
    req: &Request,
    on_event: impl FnMut(Event) -> bool,
    local: impl Fn(&Journal, &Spool) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    match reach(cfg)? {
        Reach::Daemon(client) => ask(client, req, on_event),
        Reach::Log(journal) => {
            let spool = Spool::new(&cfg.spool.dir, &cfg.worker_id());
            local(&journal, &spool)
        }
    }
}

/// Runs an operator action in the running daemon, or, when none runs, on a stage opened over
/// the log (its effects that need a build happen at the next daemon start).
pub fn act<T: DeserializeOwned + Serialize>(
    cfg: &Config,
    req: &Request,
    local: impl Fn(&Stage) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    match reach(cfg)? {
        Reach::Daemon(client) => ask(client, req, |_| true),
        Reach::Log(journal) => {
            let spool = Spool::new(&cfg.spool.dir, &cfg.worker_id());
            let stage = Stage::new(cfg.clone(), spool, journal, cfg.state_dir())?;
            local(&stage)
        }
    }
}
