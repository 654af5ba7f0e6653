//! How a command reaches the log: through a running daemon's control socket, or, when none
//! runs, by opening the log itself (briefly: a daemon starting meanwhile waits for the lock) and
//! answering the request with the same `control::handle` the daemon runs.

use crate::config::Config;
use crate::control::{self, Client, Request, Response};
use crate::journal::{Event, JournalError};
use crate::lifecycle::Policy;
use crate::process::Registry;
use crate::spool::Spool;
use crate::stage::Stage;
use crate::store::{Store, StoreError};
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

/// A stage over the log itself, when no daemon runs (None: the log is locked). It builds and
/// pushes nothing: what an action leaves to do is done by the next daemon start.
pub fn open_offline(cfg: &Config) -> anyhow::Result<Option<Stage>> {
    ensure_log(cfg)?;
    let dir = cfg.state_dir();
    let store = match Store::open(
        &dir,
        crate::journal::DEFAULT_CACHE_BYTES,
        Policy::from_config(cfg),
        Duration::ZERO,
    ) {
        Ok(s) => s,
        Err(StoreError::Journal(JournalError::Locked(_))) | Err(StoreError::Locked(_)) => {
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let spool = Spool::new(&cfg.spool.dir, &cfg.worker_id());
    let hooks = crate::hooks::Hooks::new(&cfg.hooks, dir.join("hooks.log"), Registry::none());
    let stage = Stage::new(
        Arc::new(cfg.clone()),
        spool,
        Arc::new(store),
        Registry::none(),
        hooks,
        false,
    )?;
    Ok(Some(stage))
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
        if let Some(stage) = open_offline(cfg)? {
            return Ok(control::handle(&stage, req, on_event));
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
