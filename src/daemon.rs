//! The daemon: recovery on start, the claim loop over `incoming/` (inotify plus periodic
//! rescans), the build pool, the retry thread (push retries, stalled jobs), and an orderly stop.
//!
//! Invariant: claiming stops as soon as a stop is asked for; running builds get `grace` to
//! finish and are then killed and recorded as `interrupted`; queued jobs stay queued in the log
//! and are built by the next start.

use crate::config::{Config, WatchMode};
use crate::journal::{Journal, JournalError, State};
use crate::pool::Pool;
use crate::spool::{self, Ready, Scanner, Spool};
use crate::stage::{Next, Stage};
use anyhow::Context;
use crossbeam_channel::{Receiver, Sender, bounded, select, unbounded};
use notify::Watcher;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Opens the log, waiting a little while another process (an operator command reading the log
/// directly) holds it.
pub fn open_journal(
    state_dir: &Path,
    cache_bytes: u64,
    patience: Duration,
) -> Result<Journal, JournalError> {
    let deadline = Instant::now() + patience;
    loop {
        match Journal::open_with_cache(state_dir, cache_bytes) {
            Err(JournalError::Locked(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// The folder where running child process groups are registered (see `process`).
pub fn groups_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("groups")
}

/// Runs the daemon until `stop` receives a message (or is disconnected).
pub fn run(cfg: Config, stop: Receiver<()>) -> anyhow::Result<()> {
    let running = Running::start(cfg)?;
    let result = claim_loop(&running.stage, &stop, None);
    running.shutdown()?;
    result
}

/// `run --once`: claims what is in incoming/ when it starts (and finishes what an earlier run
/// left unfinished), waits for those jobs to be answered, and stops. Ok(true) when every one of
/// them succeeded. A stop signal ends it early (Ok(false)).
pub fn run_once(cfg: Config, stop: Receiver<()>) -> anyhow::Result<bool> {
    let first_new = {
        // Jobs opened from here on are this run's.
        let running = Running::start(cfg)?;
        let first_new = running.first_seq;
        let initial: std::collections::HashSet<String> =
            crate::spool::list_names(&running.stage.spool.incoming)?
                .into_iter()
                .filter(|n| !spool::ignored_name(n))
                .collect();
        log::info!("--once: {} file(s) in incoming/", initial.len());
        let result = claim_loop(&running.stage, &stop, Some(initial));
        let stage = Arc::clone(&running.stage);
        let tracked: Vec<u64> = running.unsettled_at_start.clone();
        let push = stage.cfg.hooks.push.is_some();
        let done = |j: &crate::journal::Job| {
            matches!(j.state, State::Delivered | State::Rejected | State::Moved)
                && (!push
                    || j.state != State::Delivered
                    || j.final_pushed
                    || j.final_push_attempts > 0)
        };
        let mut ok = result.is_ok();
        let mut stopped = false;
        loop {
            let mut jobs = stage.jobs_from(first_new).unwrap_or_else(|e| {
                log::error!("--once: {e}");
                Default::default()
            });
            for id in &tracked {
                if let Some(job) = stage.job(*id) {
                    jobs.insert(*id, job);
                }
            }
            let mine: Vec<&crate::journal::Job> = jobs
                .values()
                .filter(|j| j.worker.as_deref().is_none_or(|w| w == stage.spool.worker))
                .collect();
            if mine.iter().all(|j| done(j)) {
                let failed = mine.iter().filter(|j| j.result != Some(true)).count();
                log::info!("--once: {} job(s), {failed} failed", mine.len());
                ok &= failed == 0;
                break;
            }
            select! {
                recv(stop) -> _ => { stopped = true; break; }
                default(Duration::from_millis(50)) => {}
            }
        }
        running.shutdown()?;
        result?;
        (ok && !stopped, first_new)
    };
    Ok(first_new.0)
}

/// A started daemon: the stage, its pool, the retry thread and the control socket.
struct Running {
    stage: Arc<Stage>,
    pool: Pool,
    retry_stop: Sender<()>,
    retry_thread: std::thread::JoinHandle<()>,
    control: crate::control::Server,
    /// The first seq of this run: jobs with a higher id were opened by it.
    first_seq: u64,
    /// Jobs recovery found unfinished.
    unsettled_at_start: Vec<u64>,
}

impl Running {
    fn start(cfg: Config) -> anyhow::Result<Running> {
        let worker = cfg.worker_id();
        let spool = Spool::new(&cfg.spool.dir, &worker);
        spool.create_dirs()?;
        let state_dir = cfg.state_dir();
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("cannot create state directory {}", state_dir.display()))?;
        let journal = open_journal(
            &state_dir,
            cfg.spool.log_cache_mb * 1024 * 1024,
            Duration::from_secs(5),
        )?;
        log::info!(
            "build-image {} worker {worker} spool {} state {} ({} build slot(s), {:?} mode)",
            env!("CARGO_PKG_VERSION"),
            spool.root.display(),
            state_dir.display(),
            cfg.worker.workers,
            crate::build::mode(&cfg.worker),
        );
        let stage = Arc::new(Stage::new(cfg, spool, journal, state_dir)?);
        // Children of an earlier life of this daemon (SIGKILLed) must not build beside the new one.
        let killed = stage.registry.kill_leftovers();
        if !killed.is_empty() {
            log::warn!(
                "killed {} process group(s) left by the previous run",
                killed.len()
            );
        }
        let first_seq = stage.journal.next_seq();

        let worker_stage = Arc::clone(&stage);
        let pool = Pool::start(
            stage.cfg.worker.workers,
            Arc::new(move |id| {
                if let Err(e) = worker_stage.build(id) {
                    worker_stage.stall(id, &e);
                }
            }),
        )?;
        stage.set_queue(pool.sender());

        let unsettled_at_start = recover(&stage)?;
        // The replay's temporary memory is freed; hand it back to the system rather than keep it
        // for the daemon's whole (mostly idle) life.
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
        unsafe {
            nix::libc::malloc_trim(0);
        }

        let (retry_stop, retry_rx) = bounded::<()>(1);
        let retry_thread = {
            let stage = Arc::clone(&stage);
            std::thread::Builder::new()
                .name("retries".into())
                .spawn(move || stage.run_retries(&retry_rx))?
        };
        let control = crate::control::Server::start(Arc::clone(&stage))?;
        Ok(Running {
            stage,
            pool,
            retry_stop,
            retry_thread,
            control,
            first_seq,
            unsettled_at_start,
        })
    }

    fn shutdown(self) -> anyhow::Result<()> {
        let stage = self.stage;
        log::info!("stopping: no more claims; waiting for running builds");
        stage.set_stopping();
        self.control.stop();
        drop(self.retry_stop);
        let _ = self.retry_thread.join();
        stage.set_queue(None);
        let grace = Duration::from_secs(stage.cfg.worker.grace);
        self.pool.close(grace, || {
            log::warn!(
                "grace period of {} s over: killing running builds",
                grace.as_secs()
            );
            stage.cancel_running();
        });
        stage.journal.flush()?;
        log::info!("stopped");
        Ok(())
    }
}

/// Reconciles the log with the spool, then moves every unsettled job forward: the normal steps,
/// run again.
/// Returns the jobs it found unsettled.
fn recover(stage: &Stage) -> anyhow::Result<Vec<u64>> {
    crate::build::kvm::recover_orphans(&stage.cfg.worker, &stage.registry);
    let jobs = stage.open_jobs();
    let mine = |job: &crate::journal::Job| {
        job.worker
            .as_deref()
            .is_none_or(|w| w == stage.spool.worker)
    };
    // Which open job, if any, a file in active/ belongs to: the newest one that names it.
    let mut by_file: HashMap<&str, &crate::journal::Job> = HashMap::new();
    for job in jobs.values().filter(|j| mine(j)) {
        if let Some(f) = &job.file {
            by_file.insert(f.as_str(), job);
        }
    }
    let mut unlogged_files = Vec::new();
    let mut leftovers = Vec::new();
    for name in stage.spool.active_files()? {
        if by_file.contains_key(name.as_str()) {
            continue;
        }
        // No open job: the leftover of a settled job of this worker with the same name and
        // content (a crash undid its removal), or a file claimed but never recorded.
        let c = stage.spool.read_claimed(&name, stage.cfg.spool.max_bytes)?;
        let settled = match c.unreadable {
            Some(_) => None,
            None => stage
                .journal
                .jobs_for_sha(&c.sha256)?
                .into_iter()
                .rev()
                .filter_map(|id| stage.job(id))
                .find(|j| mine(j) && j.file.as_deref() == Some(name.as_str())),
        };
        match settled {
            Some(job) => leftovers.push(job.id),
            None => {
                log::info!("recovery: {name} in active/ has no job: claiming it");
                unlogged_files.push(name);
            }
        }
    }
    for id in leftovers {
        // Its own step again: a delivered job removes the file, a rejected one moves it.
        if let Err(e) = stage.advance(id) {
            stage.stall(id, &e);
        }
    }
    if !unlogged_files.is_empty()
        && let Err(e) = stage.intake(&unlogged_files)
    {
        log::error!("recovery: cannot record the claims of {unlogged_files:?}: {e}");
    }
    let retries = stage.cfg.hooks.retries;
    let mut queued = 0;
    let mut unsettled = Vec::new();
    for (id, job) in jobs {
        if job.is_settled(retries) || !mine(&job) {
            continue;
        }
        unsettled.push(id);
        match stage.advance(id) {
            Ok(Next::Build(id)) => {
                queued += 1;
                stage.enqueue(id);
            }
            Ok(Next::Nothing) => {
                // A final push that failed before the restart is tried again now.
                if job.state == State::Delivered && !job.final_pushed && job.final_push_attempts > 0
                {
                    stage.schedule_push_at(
                        id,
                        job.final_status(),
                        job.final_push_attempts + 1,
                        Instant::now(),
                    );
                }
            }
            Err(e) => stage.stall(id, &e),
        }
    }
    if queued > 0 {
        log::info!("recovery: {queued} job(s) queued again");
    }
    Ok(unsettled)
}

enum Wake {
    Stop,
    Fs(notify::Result<notify::Event>),
    Timer,
}

/// Claims until `stop`; with `only`, claims just those names and returns once none of them is
/// left in incoming/.
fn claim_loop(
    stage: &Stage,
    stop: &Receiver<()>,
    mut only: Option<std::collections::HashSet<String>>,
) -> anyhow::Result<()> {
    let cfg = &stage.cfg.spool;
    let incoming = stage.spool.incoming.clone();
    let (fs_tx, fs_rx) = unbounded();
    // Kept alive for its inotify watch; replaced when the folder comes back after vanishing.
    let mut _watcher = watch(cfg.watch, &incoming, &fs_tx);
    // Files renamed into active/ whose claim could not be recorded yet (e.g. the disk was full).
    let mut unrecorded: Vec<String> = Vec::new();
    let poll = Duration::from_millis(cfg.poll_interval_ms);
    let mut scanner = Scanner::new(cfg);
    let mut next_scan = Instant::now();
    let mut scan_failing = false;
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
                // A burst of renames arrives as a burst of events: take them all, then claim
                // them as one batch (one flush).
                let mut ready = Vec::new();
                let mut rescan = false;
                let mut writing = false;
                let mut next = Some(ev);
                while let Some(ev) = next.take() {
                    rescan |= ev.need_rescan();
                    let moved_in = matches!(
                        ev.kind,
                        notify::EventKind::Modify(notify::event::ModifyKind::Name(
                            notify::event::RenameMode::To | notify::event::RenameMode::Both
                        ))
                    );
                    if moved_in
                        && only.is_none()
                        && let Some(path) = ev.paths.last()
                        && path.parent() == Some(incoming.as_path())
                        && let Some(name) = path.file_name().and_then(|n| n.to_str())
                        && let Some(r) = spool::moved_in_ready(&incoming, name, cfg.max_bytes)
                    {
                        ready.push(r);
                    } else if !moved_in {
                        writing = true;
                    }
                    while next.is_none() && ready.len() < MAX_BATCH {
                        match fs_rx.try_recv() {
                            Ok(Ok(ev)) => next = Some(ev),
                            Ok(Err(e)) => {
                                log::warn!("inotify error ({e}); rescanning");
                                rescan = true;
                            }
                            Err(_) => break,
                        }
                    }
                }
                if rescan {
                    log::info!("inotify queue overflowed: rescanning");
                    next_scan = Instant::now();
                }
                if writing {
                    // A write in progress: look again when it may have become stable.
                    next_scan =
                        next_scan.min(Instant::now() + Duration::from_millis(cfg.min_age_ms));
                }
                take(stage, &mut scanner, ready, &mut unrecorded);
            }
            Wake::Fs(Err(e)) => {
                log::warn!("inotify error ({e}); rescanning");
                next_scan = Instant::now();
            }
            Wake::Timer => match scanner.scan(&incoming) {
                Ok((ready, due)) => {
                    if scan_failing {
                        log::info!("{} is readable again", incoming.display());
                        scan_failing = false;
                        // The old watch died with the folder: watch the new one.
                        _watcher = watch(cfg.watch, &incoming, &fs_tx);
                    }
                    if !unrecorded.is_empty() {
                        let names = std::mem::take(&mut unrecorded);
                        record_claims(stage, names, &mut unrecorded);
                    }
                    let ready: Vec<Ready> = ready
                        .into_iter()
                        .filter(|r| {
                            let name = match r {
                                Ready::File(n) | Ready::Reject(n, _) => n,
                            };
                            only.as_ref().is_none_or(|names| names.contains(name))
                        })
                        .collect();
                    for chunk in ready.chunks(MAX_BATCH) {
                        if stop.try_recv().is_ok() {
                            return Ok(());
                        }
                        take(stage, &mut scanner, chunk.to_vec(), &mut unrecorded);
                    }
                    if let Some(names) = &mut only {
                        names.retain(|n| stage.spool.incoming.join(n).symlink_metadata().is_ok());
                        if names.is_empty() && unrecorded.is_empty() {
                            return Ok(());
                        }
                    }
                    next_scan = Instant::now() + due.map_or(poll, |d| d.min(poll));
                }
                Err(e) => {
                    if !scan_failing {
                        log::warn!("{e}; retrying every {} ms", cfg.poll_interval_ms);
                    }
                    scan_failing = true;
                    _watcher = None;
                    next_scan = Instant::now() + poll;
                }
            },
        }
    }
}

fn watch(
    mode: WatchMode,
    dir: &Path,
    tx: &Sender<notify::Result<notify::Event>>,
) -> Option<notify::RecommendedWatcher> {
    if mode == WatchMode::Poll {
        return None;
    }
    let tx = tx.clone();
    let started = notify::recommended_watcher(move |ev| {
        let _ = tx.send(ev);
    })
    .and_then(|mut w| {
        w.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok(w)
    });
    match started {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn!(
                "cannot watch {} with inotify ({e}); rescanning only",
                dir.display()
            );
            None
        }
    }
}

/// The most files claimed with one flush.
const MAX_BATCH: usize = 1000;

/// Claims (renames into active/, one directory fsync for all) or rejects the ready names;
/// errors are logged and a file stays for a later scan.
fn take(stage: &Stage, scanner: &mut Scanner, ready: Vec<Ready>, unrecorded: &mut Vec<String>) {
    let mut claimed = Vec::new();
    for r in ready {
        match r {
            Ready::Reject(name, why) => {
                scanner.forget(&name);
                if let Err(e) = stage.reject_unread(&name, &format!("not a workitem: {why}")) {
                    log::error!("cannot reject {name}: {e}");
                }
            }
            Ready::File(name) => {
                scanner.forget(&name);
                match stage.spool.claim(&name) {
                    Ok(true) => claimed.push(name),
                    Ok(false) => {}
                    Err(e) => log::error!("{e}"),
                }
            }
        }
    }
    if claimed.is_empty() {
        return;
    }
    if let Err(e) = crate::durable::sync_dir(&stage.spool.active) {
        log::error!("{e}");
    }
    record_claims(stage, claimed, unrecorded);
}

/// Records files now in active/ as jobs and moves them forward; if that fails the names are
/// kept for the next scan.
fn record_claims(stage: &Stage, names: Vec<String>, unrecorded: &mut Vec<String>) {
    if let Err(e) = stage.intake(&names) {
        log::error!(
            "claimed {} file(s) but cannot record them yet: {e}",
            names.len()
        );
        unrecorded.extend(names);
    }
}
