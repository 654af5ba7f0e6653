//! How a command reaches the log: through a running daemon's control socket, or, when none
//! runs, by opening the log itself (briefly: a daemon starting meanwhile waits for the lock) and
//! answering the request with the same `control::handle` the daemon runs.

use crate::config::Config;
use crate::domain::Event;
use crate::edges::spool::Spool;
use crate::engine::statedir::StateDirError;
use crate::engine::store::{Store, StoreError};
use crate::engine::{Engine, Parts};
use crate::journal::JournalError;
use crate::operate::Host;
use crate::operate::control::{self, Client, Request, Response};
use crate::process::Registry;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Is there a log for this config (has a daemon ever run with it)?
pub fn ensure_log(cfg: &Config) -> anyhow::Result<()> {
    let dir = cfg.state_dir();
    anyhow::ensure!(
        dir.join("conf").exists() || dir.join("db").exists(),
        "no event log in {}: has a daemon run with this configuration (--config, --spool, [spool] worker_id)?",
        dir.display()
    );
    Ok(())
}

/// A host over the log itself, when no daemon runs (None: the log is locked). It builds and
/// pushes nothing: what an action leaves to do is done by the next daemon start. Answers an
/// action sends (`redeliver`) go to the outbox; an AMQP job's (`redeliver`) is published by the
/// command's own client (`cli::archive`).
pub fn open_offline(cfg: &Config) -> anyhow::Result<Option<Host>> {
    ensure_log(cfg)?;
    let dir = cfg.state_dir();
    let store = match Store::open(
        &dir,
        crate::journal::DEFAULT_CACHE_BYTES,
        cfg.policy(),
        Duration::ZERO,
    ) {
        Ok(s) => s,
        Err(StoreError::Journal(JournalError::Locked(_)))
        | Err(StoreError::StateDir(StateDirError::Journal(JournalError::Locked(_))))
        | Err(StoreError::StateDir(StateDirError::Locked(_)))
        | Err(StoreError::Locked(_)) => {
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let cfg = Arc::new(cfg.clone());
    let spool = Spool::new(&cfg.spool.dir, &cfg.worker_id());
    let engine = Engine::new(Parts {
        cfg: Arc::clone(&cfg),
        worker: spool.worker.clone(),
        store: Arc::new(store),
        registry: Registry::none(),
        inputs: Arc::new(spool.clone()),
        builder: crate::imaging::builder(&cfg.worker),
        push: Some(Arc::new(crate::edges::hooks::Hooks::new(
            &cfg.hooks,
            dir.join("hooks.log"),
            Registry::none(),
        ))),
        pushes: false,
    })?;
    engine.set_answerer(
        crate::domain::ReplyTo::Outbox,
        Some(Arc::new(crate::edges::spool::outbox::Outbox::new(
            &spool.outbox,
            &spool.worker,
        ))),
    );
    Ok(Some(Host {
        cfg,
        engine: Arc::new(engine),
        spool,
    }))
}

/// Asks the running daemon, or answers from the log itself when none runs. While the log is
/// locked but no socket answers (a daemon starting), tries again for a while.
pub fn call(
    cfg: &Config,
    req: Request,
    mut on_event: impl FnMut(&Event) -> bool,
) -> anyhow::Result<Response> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(client) = Client::connect(&cfg.state_dir()) {
            match client.call(&req, &mut on_event)? {
                Response::Busy if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                r => return Ok(r),
            }
        }
        if let Some(host) = open_offline(cfg)? {
            return Ok(control::handle(&host, req, on_event));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the event log in {} is locked, but no daemon answers on its control socket",
            cfg.state_dir().display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The response, or its error as an error (exit 1).
pub fn expect(r: Response) -> anyhow::Result<Response> {
    match r {
        Response::Error { message } => Err(anyhow::anyhow!(message)),
        Response::Busy => Err(anyhow::anyhow!(
            "the daemon has too many operator connections; try again"
        )),
        r => Ok(r),
    }
}
