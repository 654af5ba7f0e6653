//! The daemon: recovery on start, the claim loop over `incoming/` (inotify plus periodic
//! rescans), the build pool, and an orderly stop.
//!
//! Invariant: claiming stops as soon as a stop is asked for; running builds get `grace` to
//! finish and are then killed and recorded as `interrupted`; queued jobs stay queued in the log
//! and are built by the next start.

use crate::config::{Config, WatchMode};
use crate::journal::{Journal, State};
use crate::pool::Pool;
use crate::spool::{self, Ready, Scanner, Spool};
use crate::stage::{Next, Stage};
use anyhow::Context;
use crossbeam_channel::{Receiver, Sender, select, unbounded};
use notify::Watcher;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs the daemon until `stop` receives a message (or is disconnected).
pub fn run(cfg: Config, stop: Receiver<()>) -> anyhow::Result<()> {
    let worker = cfg.worker_id();
    let spool = Spool::new(&cfg.spool.dir, &worker);
    spool.create_dirs()?;
    let state_dir = cfg.state_dir();
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create state directory {}", state_dir.display()))?;
    let journal = Journal::open(&state_dir)?;
    log::info!(
        "build-image {} worker {worker} spool {} state {} ({} build slot(s), {:?} mode)",
        env!("CARGO_PKG_VERSION"),
        spool.root.display(),
        state_dir.display(),
        cfg.worker.workers,
        crate::build::mode(&cfg.worker),
    );
    let stage = Arc::new(Stage::new(cfg, spool, journal, state_dir)?);

    let worker_stage = Arc::clone(&stage);
    let pool = Pool::start(
        stage.cfg.worker.workers,
        Arc::new(move |id| {
            if let Err(e) = worker_stage.build(id) {
                log::error!("job {id}: {e}");
            }
        }),
    )?;
    let queue = pool.sender().context("build pool has no queue")?;

    recover(&stage, &queue)?;
    let result = claim_loop(&stage, &queue, &stop);

    log::info!("stopping: no more claims; waiting for running builds");
    stage.set_stopping();
    drop(queue);
    let grace = Duration::from_secs(stage.cfg.worker.grace);
    pool.close(grace, || {
        log::warn!(
            "grace period of {} s over: killing running builds",
            grace.as_secs()
        );
        stage.cancel_running();
    });
    stage.journal.flush()?;
    log::info!("stopped");
    result
}

/// Reconciles the log with the spool, then moves every unsettled job forward.
fn recover(stage: &Stage, queue: &Sender<u64>) -> anyhow::Result<()> {
    let jobs = stage.all_jobs();
    // Which job, if any, a file in active/ belongs to: the newest job that names it.
    let mut by_file: HashMap<&str, &crate::journal::Job> = HashMap::new();
    for job in jobs.values() {
        if job
            .worker
            .as_deref()
            .is_some_and(|w| w != stage.spool.worker)
        {
            continue;
        }
        if let Some(f) = &job.file {
            by_file.insert(f.as_str(), job);
        }
    }
    for name in stage.spool.active_files()? {
        let owner = by_file.get(name.as_str());
        let unlogged = match owner {
            None => true,
            Some(job) if job.state == State::Delivered || job.state == State::Rejected => {
                // Settled: a leftover of that job only if it is the same content.
                let c = stage.spool.read_claimed(&name, stage.cfg.spool.max_bytes)?;
                c.unreadable.is_none() && Some(&c.sha256) != job.sha256.as_ref()
            }
            Some(_) => false,
        };
        if unlogged {
            log::info!("recovery: {name} in active/ has no job: claiming it");
            if let Next::Build(id) = stage.claimed(&name)? {
                let _ = queue.send(id);
            }
        }
    }
    let mut queued = 0;
    for (id, job) in jobs {
        if job.is_settled() {
            continue;
        }
        if job
            .worker
            .as_deref()
            .is_some_and(|w| w != stage.spool.worker)
        {
            continue;
        }
        match stage.advance(id) {
            Ok(Next::Build(id)) => {
                queued += 1;
                let _ = queue.send(id);
            }
            Ok(Next::Nothing) => {}
            Err(e) => log::error!("recovery of job {id}: {e}"),
        }
    }
    if queued > 0 {
        log::info!("recovery: {queued} job(s) queued again");
    }
    Ok(())
}

enum Wake {
    Stop,
    Fs(notify::Result<notify::Event>),
    Timer,
}

fn claim_loop(stage: &Stage, queue: &Sender<u64>, stop: &Receiver<()>) -> anyhow::Result<()> {
    let cfg = &stage.cfg.spool;
    let incoming = stage.spool.incoming.clone();
    let (fs_tx, fs_rx) = unbounded();
    let _watcher = match cfg.watch {
        WatchMode::Poll => None,
        WatchMode::Auto => match start_watcher(&incoming, fs_tx) {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!(
                    "cannot watch {} with inotify ({e}); rescanning every {} ms only",
                    incoming.display(),
                    cfg.poll_interval_ms
                );
                None
            }
        },
    };
    let poll = Duration::from_millis(cfg.poll_interval_ms);
    let mut scanner = Scanner::new(cfg);
    let mut next_scan = Instant::now();
    loop {
        let wait = next_scan.saturating_duration_since(Instant::now());
        let wake = select! {
            recv(stop) -> _ => Wake::Stop,
            recv(fs_rx) -> ev => match ev {
                Ok(ev) => Wake::Fs(ev),
                Err(_) => Wake::Timer,
            },
            default(wait) => Wake::Timer,
        };
        match wake {
            Wake::Stop => return Ok(()),
            Wake::Fs(Ok(ev)) => {
                if ev.need_rescan() {
                    next_scan = Instant::now();
                    continue;
                }
                let moved_in = matches!(
                    ev.kind,
                    notify::EventKind::Modify(notify::event::ModifyKind::Name(
                        notify::event::RenameMode::To | notify::event::RenameMode::Both
                    ))
                );
                if moved_in
                    && let Some(path) = ev.paths.last()
                    && path.parent() == Some(incoming.as_path())
                    && let Some(name) = path.file_name().and_then(|n| n.to_str())
                    && let Some(ready) = spool::moved_in_ready(&incoming, name, cfg.max_bytes)
                {
                    take(stage, queue, &mut scanner, ready);
                } else if !moved_in {
                    // A write in progress: look again when it may have become stable.
                    next_scan =
                        next_scan.min(Instant::now() + Duration::from_millis(cfg.min_age_ms));
                }
            }
            Wake::Fs(Err(e)) => {
                log::warn!("inotify error ({e}); rescanning");
                next_scan = Instant::now();
            }
            Wake::Timer => match scanner.scan(&incoming) {
                Ok((ready, due)) => {
                    for r in ready {
                        if stop.try_recv().is_ok() {
                            return Ok(());
                        }
                        take(stage, queue, &mut scanner, r);
                    }
                    next_scan = Instant::now() + due.map_or(poll, |d| d.min(poll));
                }
                Err(e) => {
                    log::warn!("{e}; retrying in {} ms", cfg.poll_interval_ms);
                    next_scan = Instant::now() + poll;
                }
            },
        }
    }
}

fn start_watcher(
    dir: &std::path::Path,
    tx: Sender<notify::Result<notify::Event>>,
) -> notify::Result<notify::RecommendedWatcher> {
    let mut w = notify::recommended_watcher(move |ev| {
        let _ = tx.send(ev);
    })?;
    w.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(w)
}

/// Claims or rejects one ready name; errors are logged and the file stays for a later scan.
fn take(stage: &Stage, queue: &Sender<u64>, scanner: &mut Scanner, ready: Ready) {
    match ready {
        Ready::Reject(name, why) => {
            scanner.forget(&name);
            if let Err(e) = stage.reject_unread(&name, &format!("not a workitem: {why}")) {
                log::error!("cannot reject {name}: {e}");
            }
        }
        Ready::File(name) => {
            scanner.forget(&name);
            match stage.spool.claim(&name) {
                Ok(true) => match stage.claimed(&name) {
                    Ok(Next::Build(id)) => {
                        let _ = queue.send(id);
                    }
                    Ok(Next::Nothing) => {}
                    Err(e) => log::error!("claimed {name}: {e}"),
                },
                Ok(false) => {}
                Err(e) => log::error!("{e}"),
            }
        }
    }
}

/// The state dir a config uses (for commands that open the log).
pub fn state_dir(cfg: &Config) -> PathBuf {
    cfg.state_dir()
}
