//! The daemon: recovery on start, the claim loop over `incoming/` (inotify plus periodic
//! rescans), the build pool, the timer thread (lazy flushes, the log's high-water mark, the
//! liveness mark, stalled jobs, repair of a failing log), and an orderly stop.
//!
//! Invariant: claiming stops as soon as a stop is asked for; running builds get `grace` to
//! finish and are then killed and recorded as `interrupted`; queued jobs stay queued in the log
//! and are built by the next start.

use crate::config::{Config, WatchMode};
use crate::lifecycle;
use crate::pool::Pool;
use crate::process::Registry;
use crate::spool::{self, Ready, Scanner, Spool};
use crate::stage::Stage;
use crate::store::Store;
use anyhow::Context;
use crossbeam_channel::{Receiver, Sender, bounded, select, unbounded};
use notify::Watcher;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The folder where running child process groups are registered (see `process`).
pub fn groups_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("groups")
}

/// Runs the daemon until `stop` receives a message (or is disconnected). A second message
/// during the stop's grace kills the running builds at once.
pub fn run(cfg: Config, stop: Receiver<()>) -> anyhow::Result<()> {
    let running = Running::start(cfg, true)?;
    let result = claim_loop(&running.stage, &stop, None);
    running.shutdown(&stop)?;
    result
}

/// `run --once`: claims what is in incoming/ when it starts (and finishes what an earlier run
/// left unfinished), waits for those jobs to be settled, and stops. Ok(true) when every one of
/// them succeeded and its final status was pushed (when a push utility is configured). A stop
/// signal ends it early (Ok(false)).
pub fn run_once(cfg: Config, stop: Receiver<()>) -> anyhow::Result<bool> {
    let running = Running::start(cfg, false)?;
    let stage = Arc::clone(&running.stage);
    let first_new = running.first_seq;
    let initial: HashSet<String> = spool::list_names(&stage.spool.incoming)?
        .into_iter()
        .filter(|n| !spool::ignored_name(n))
        .collect();
    log::info!("--once: {} file(s) in incoming/", initial.len());
    let result = claim_loop(&stage, &stop, Some(initial));
    let policy = *stage.store.policy();
    let mut ok = result.is_ok();
    let mut stopped = false;
    loop {
        let mut ids: HashSet<u64> = running.open_at_start.iter().copied().collect();
        ids.extend(stage.touched());
        if let Ok(journal) = stage.store.journal() {
            ids.extend(journal.projections_from(first_new)?.into_keys());
        }
        let jobs: Vec<crate::journal::Job> = ids
            .into_iter()
            .filter_map(|id| stage.store.job(id))
            .filter(|j| j.worker.as_deref().is_none_or(|w| w == stage.spool.worker))
            .collect();
        if jobs.iter().all(|j| lifecycle::is_settled(j, &policy)) {
            let failed = jobs
                .iter()
                .filter(|j| j.result != Some(true) || lifecycle::push_failed(j, &policy))
                .count();
            log::info!("--once: {} job(s), {failed} failed", jobs.len());
            ok &= failed == 0;
            break;
        }
        select! {
            recv(stop) -> _ => { stopped = true; break; }
            default(Duration::from_millis(50)) => {}
        }
    }
    running.shutdown(&stop)?;
    result?;
    Ok(ok && !stopped)
}

/// A started daemon: the stage, its pool, the timer thread and the control socket.
struct Running {
    stage: Arc<Stage>,
    pool: Pool,
    timer_stop: Sender<()>,
    timer: std::thread::JoinHandle<()>,
    control: crate::control::Server,
    /// The status page, API and metrics (`[http] listen`).
    http: Option<crate::http::Server>,
    /// The first seq of this run: jobs with a higher id were opened by it.
    first_seq: u64,
    /// Jobs recovery found open.
    open_at_start: Vec<u64>,
    /// The BOSS participant (`[amqp] url` set).
    amqp: Option<crate::amqp::Participant>,
}

impl Running {
    /// `consume`: take workitems from `[amqp] queue` (not for `run --once`, which only answers
    /// the AMQP jobs an earlier run left open).
    fn start(cfg: Config, consume: bool) -> anyhow::Result<Running> {
        // Buffers of a large workitem (megabytes) are given back to the system when freed:
        // without a fixed threshold glibc raises it after the first such free and keeps later
        // ones in its heaps, so a few large inputs would hold their memory for good.
        #[cfg(target_env = "gnu")]
        // SAFETY: mallopt only sets an allocator parameter; it has no preconditions.
        unsafe {
            nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 1 << 20);
        }
        let cfg = Arc::new(cfg);
        // A taken HTTP port stops the start before anything else is started.
        let http_listener = match cfg.http.addr()? {
            Some(addr) => Some(
                crate::http::Server::bind(addr)
                    .with_context(|| format!("cannot serve HTTP on {addr}"))?,
            ),
            None => None,
        };
        let worker = cfg.worker_id();
        let spool = Spool::new(&cfg.spool.dir, &worker);
        spool.create_dirs()?;
        let state_dir = cfg.state_dir();
        let policy = lifecycle::Policy::from_config(&cfg);
        let store = Arc::new(
            Store::open(
                &state_dir,
                cfg.spool.log_cache_mb * 1024 * 1024,
                policy,
                Duration::from_secs(5),
            )
            .map(|s| s.with_min_free(cfg.spool.state_min_free_mb << 20))
            .with_context(|| format!("cannot open the event log in {}", state_dir.display()))?,
        );
        // The metrics observe every event from now on; the log's jobs are counted beside.
        let metrics = match http_listener {
            Some(l) => Some((l, crate::http::metrics::start_counting(&store)?)),
            None => None,
        };
        // Only now (the log's lock is ours, so no other daemon of this worker runs).
        for p in spool.remove_leftovers() {
            log::info!("removed {}, left by an interrupted write", p.display());
        }
        log::info!(
            "build-image {} worker {worker} spool {} state {} ({} build slot(s), {:?} mode)",
            env!("CARGO_PKG_VERSION"),
            spool.root.display(),
            state_dir.display(),
            cfg.worker.workers,
            crate::imaging::mode(&cfg.worker),
        );
        if let Some(why) = crate::imaging::builder(&cfg.worker).unavailable() {
            log::warn!("{why}: every build will fail until it is fixed (build-image doctor)");
        }
        // Children of an earlier life of this daemon (SIGKILLed) must not build beside the new one.
        let registry = Registry::new(groups_dir(&state_dir));
        let killed = registry.kill_leftovers();
        if !killed.is_empty() {
            log::warn!(
                "killed {} process group(s) left by the previous run",
                killed.len()
            );
        }
        let hooks =
            crate::hooks::Hooks::new(&cfg.hooks, state_dir.join("hooks.log"), registry.clone());
        let stage = Arc::new(Stage::new(
            Arc::clone(&cfg),
            spool,
            store,
            registry,
            hooks,
            true,
        )?);
        let first_seq = stage.store.journal()?.last_seq() + 1;

        let worker_stage = Arc::clone(&stage);
        let pool = Pool::start(
            cfg.worker.workers,
            Arc::new(move |id| {
                if let Err(e) = worker_stage.build(id) {
                    worker_stage.stall(id, &e);
                }
            }),
        )?;
        stage.set_queue(pool.sender());

        let mut amqp = crate::amqp::Participant::start(&stage, consume)?;
        let open_at_start = stage.recover()?;
        if let Some(a) = amqp.as_mut().filter(|_| consume) {
            a.start_intake(Arc::clone(&stage))?;
        }
        // The replay's temporary memory is freed; hand it back to the system rather than keep
        // it for the daemon's whole (mostly idle) life.
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
        unsafe {
            nix::libc::malloc_trim(0);
        }

        let (timer_stop, timer_rx) = bounded::<()>(1);
        let timer = {
            let stage = Arc::clone(&stage);
            std::thread::Builder::new()
                .name("timer".into())
                .spawn(move || run_timer(&stage, &timer_rx))?
        };
        let control = crate::control::Server::start(Arc::clone(&stage))?;
        let http = match metrics {
            Some((listener, (metrics, seeder))) => {
                let app = crate::http::App {
                    stage: Arc::clone(&stage),
                    metrics,
                };
                let max = cfg.http.max_connections as usize;
                Some(
                    crate::http::Server::start(app, seeder, listener, max)
                        .context("cannot start the HTTP server")?,
                )
            }
            None => None,
        };
        crate::notify::ready(&format!(
            "claiming; {} job(s) open at start",
            open_at_start.len()
        ));
        Ok(Running {
            stage,
            pool,
            timer_stop,
            timer,
            control,
            http,
            first_seq,
            open_at_start,
            amqp,
        })
    }

    /// Stops: no more claims; running builds get `grace` (a second signal on `stop` ends it
    /// at once) while the control socket keeps answering; then the pushes and the timer stop.
    fn shutdown(mut self, stop: &Receiver<()>) -> anyhow::Result<()> {
        if let Some(a) = self.amqp.as_mut() {
            a.stop_intake();
        }
        let stage = self.stage;
        let running = stage.running();
        log::info!("stopping: no more claims; {running} build(s) running");
        crate::notify::stopping(&format!("stopping; {running} build(s) running"));
        // The stop timeout of the service manager is extended while the grace (and the kill,
        // the records and the flush after it) run, and no longer.
        let _extend = crate::notify::Extender::start(
            Instant::now()
                + Duration::from_secs(stage.cfg.worker.grace)
                + crate::notify::AFTER_GRACE,
        );
        stage.set_stopping();
        stage.set_queue(None);
        let grace = Duration::from_secs(stage.cfg.worker.grace);
        self.pool.close(grace, stop, |why| {
            log::warn!("{why}: killing running builds");
            stage.cancel_running();
        });
        self.control.stop();
        if let Some(h) = self.http {
            h.stop();
        }
        stage.stop_pushes();
        if let Some(a) = self.amqp {
            a.stop(&stage);
        }
        drop(self.timer_stop);
        let _ = self.timer.join();
        stage.store.sync()?;
        stage.store.write_mark();
        if let Err(e) = stage.spool.clear_heartbeat() {
            log::warn!("cannot remove the liveness mark: {e}");
        }
        log::info!("stopped");
        Ok(())
    }
}

/// The timer thread: flushes lazily appended events, writes the log's high-water mark,
/// repairs a log that failed a write (with back-off), and moves stalled jobs again.
fn run_timer(stage: &Stage, stop: &Receiver<()>) {
    let repair = crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut repair_tries = 0u32;
    let mut next_repair = Instant::now();
    let mut next_beat = Instant::now();
    let watchdog_every = crate::notify::watchdog_every();
    let mut next_watchdog = Instant::now();
    loop {
        if let Some(every) = watchdog_every
            && Instant::now() >= next_watchdog
        {
            crate::notify::watchdog();
            next_watchdog = Instant::now() + every;
        }
        if Instant::now() >= next_beat {
            if let Err(e) = stage.spool.heartbeat() {
                log::warn!("cannot refresh the liveness mark: {e}");
            }
            next_beat = Instant::now() + spool::HEARTBEAT;
        }
        let failing = stage.store.failing().is_some();
        let next = [
            stage.store.next_tick(),
            stage.next_stall(),
            failing.then_some(next_repair),
            Some(next_beat),
            watchdog_every.map(|_| next_watchdog),
        ]
        .into_iter()
        .flatten()
        .min();
        let wait = next.map_or(Duration::from_secs(1), |d| {
            d.saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1))
        });
        select! {
            recv(stop) -> _ => return,
            recv(stage.wakeups()) -> _ => {}
            default(wait) => {}
        }
        if stage.store.failing().is_some() {
            if Instant::now() >= next_repair {
                repair_tries += 1;
                match stage.store.repair() {
                    Ok(true) => {
                        repair_tries = 0;
                        stage.resume_all();
                    }
                    Ok(false) => next_repair = Instant::now() + repair.delay(repair_tries),
                    Err(e) => {
                        log::error!("cannot reload the event log: {e}");
                        next_repair = Instant::now() + repair.delay(repair_tries);
                    }
                }
            }
            continue;
        }
        stage.store.tick();
        stage.run_due_stalled();
    }
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
            Wake::Timer if stage.store.failing().is_some() => {
                // Nothing is claimed that cannot be recorded: wait for the log to work again.
                next_scan = Instant::now() + poll;
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
                        record_claims(stage, names, &mut unrecorded, true);
                    }
                    let ready: Vec<Ready> = ready
                        .into_iter()
                        .filter(|r| {
                            let name = match r {
                                Ready::File(n) | Ready::Reject(n, _) => n,
                                Ready::BadName(_) => return true,
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

/// The most input bytes claimed with one flush: the batch is read into memory whole.
const MAX_BATCH_BYTES: u64 = 32 * 1024 * 1024;

/// Claims or rejects the ready names, in batches of at most MAX_BATCH_BYTES of input.
fn take(stage: &Stage, scanner: &mut Scanner, ready: Vec<Ready>, unrecorded: &mut Vec<String>) {
    let size = |r: &Ready| match r {
        Ready::File(n) => {
            stage
                .spool
                .incoming
                .join(n)
                .metadata()
                .map_or(0, |m| m.len())
                + 4096
        }
        _ => 0,
    };
    let mut batch = Vec::new();
    let mut bytes = 0;
    for r in ready {
        let b = size(&r);
        if !batch.is_empty() && bytes + b > MAX_BATCH_BYTES {
            take_batch(
                stage,
                scanner,
                std::mem::take(&mut batch),
                bytes,
                unrecorded,
            );
            bytes = 0;
        }
        bytes += b;
        batch.push(r);
    }
    if !batch.is_empty() {
        take_batch(stage, scanner, batch, bytes, unrecorded);
    }
}

/// Claims (renames into active/, one directory fsync for all) or rejects the ready names;
/// errors are logged and a file stays for a later scan.
fn take_batch(
    stage: &Stage,
    scanner: &mut Scanner,
    ready: Vec<Ready>,
    need: u64,
    unrecorded: &mut Vec<String>,
) {
    // Nothing is moved into active/ that cannot be recorded: the names stay in incoming/ until
    // the log takes writes again and the state disk has room for them.
    if stage.store.failing().is_some() || stage.store.ensure_room(need).is_err() {
        return;
    }
    let mut claimed = Vec::new();
    for r in ready {
        match r {
            Ready::Reject(name, why) => {
                scanner.forget(&name);
                if let Err(e) = stage.reject_unread(&name, &format!("not a workitem: {why}")) {
                    log::error!("cannot reject {name}: {e}");
                }
            }
            Ready::BadName(raw) => {
                scanner.forget(&raw);
                match stage.reject_bad_name(&raw) {
                    Ok(name) => log::warn!("{raw:?} is not a UTF-8 name: rejected as {name}"),
                    Err(e) => log::error!("cannot reject {raw:?}: {e}"),
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
    record_claims(stage, claimed, unrecorded, false);
}

/// Records files now in active/ as jobs and moves them forward; if that fails the names are
/// kept for the next scan.
fn record_claims(stage: &Stage, names: Vec<String>, unrecorded: &mut Vec<String>, again: bool) {
    let recorded = if again {
        stage.intake_again(&names)
    } else {
        stage.intake(&names)
    };
    if let Err(e) = recorded {
        log::error!(
            "claimed {} file(s) but cannot record them yet: {e}",
            names.len()
        );
        unrecorded.extend(names);
    }
}
