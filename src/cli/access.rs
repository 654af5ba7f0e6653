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

/// Asks the running daemon, or computes the answer from the log itself.
/// `on_event` receives streamed events (from the daemon).
pub fn query<T: DeserializeOwned + Serialize>(
    cfg: &Config,
    req: &Request,
    mut on_event: impl FnMut(Event) -> bool,
    local: impl Fn(&Journal, &Spool) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(client) = Client::connect(&cfg.state_dir()) {
            let reply = client.call(req, &mut on_event)?;
            if !reply.ok {
                anyhow::bail!(reply.error.unwrap_or_else(|| "the daemon refused".into()));
            }
            let data = reply.data.unwrap_or(serde_json::Value::Null);
            return serde_json::from_value(data).context("unexpected answer from the daemon");
        }
        if let Some(journal) = open_log(cfg)? {
            let spool = Spool::new(&cfg.spool.dir, &cfg.worker_id());
            return local(&journal, &spool);
        }
        // Locked, but no socket yet: a daemon is starting. Ask it in a moment.
        anyhow::ensure!(
            Instant::now() < deadline,
            "the event log in {} is locked, but no daemon answers on its control socket",
            cfg.state_dir().display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs an operator action in the running daemon, or, when none runs, on a stage opened over
/// the log (its effects that need a build happen at the next daemon start).
pub fn act<T: DeserializeOwned + Serialize>(
    cfg: &Config,
    req: &Request,
    local: impl Fn(&Stage) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(client) = Client::connect(&cfg.state_dir()) {
            let reply = client.call(req, |_| true)?;
            if !reply.ok {
                anyhow::bail!(reply.error.unwrap_or_else(|| "the daemon refused".into()));
            }
            let data = reply.data.unwrap_or(serde_json::Value::Null);
            return serde_json::from_value(data).context("unexpected answer from the daemon");
        }
        if let Some(journal) = open_log(cfg)? {
            let spool = Spool::new(&cfg.spool.dir, &cfg.worker_id());
            let stage = Stage::new(cfg.clone(), spool, journal, cfg.state_dir())?;
            return local(&stage);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the event log in {} is locked, but no daemon answers on its control socket",
            cfg.state_dir().display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
