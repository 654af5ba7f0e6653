//! The daemon: wires the parts and runs start and stop. At a start: the log is opened, the
//! engine made with its edges (the spool as the place inputs wait and as the outbox answerer,
//! the push utility, AMQP when `[amqp] url` is set), what a crashed life left is recovered,
//! then the build slots, the timer, the control socket and the HTTP server start, and the
//! spool's claim loop runs in the caller's thread. The stop is [`Running::shutdown`].
//!
//! Invariant (the stop: nothing said is left unsaid): claiming stops as soon as a stop is asked
//! for; running builds get `grace` to finish and are then killed and recorded as
//! `interrupted`; then the pushes asked so far drain (each bounded by the hook timeout, all of
//! them by `grace` from the builds' end); a second signal cuts whichever of the two runs, and
//! what it cut is done by the next start. Queued jobs stay queued in the log for the next start.

use crate::config::Config;
use crate::domain::lifecycle;
use crate::domain::{Job, ReplyTo};
use crate::edges::amqp::Participant;
use crate::edges::hooks::Hooks;
use crate::edges::spool::watch::{Claimer, claim_loop};
use crate::edges::spool::{self, Spool};
use crate::engine::pool::{Closed, Pool};
use crate::engine::store::Store;
use crate::engine::timer::{Periodic, Timer};
use crate::engine::{Engine, Parts};
use crate::operate::Host;
use crate::process::Registry;
use anyhow::Context;
use crossbeam_channel::{Receiver, select};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The folder where running child process groups are registered (see `process`).
pub fn groups_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("groups")
}

/// Runs the daemon until `stop` receives a message (or is disconnected). A second message
/// during the stop's grace kills the running builds (or cuts the pushes' drain) at once.
pub fn run(cfg: Config, stop: Receiver<()>) -> anyhow::Result<()> {
    let running = Running::start(cfg, true)?;
    let result = claim_loop(running.claimer(), &stop, None);
    running.shutdown(&stop)?;
    result
}

/// `run --once`: claims what is in incoming/ when it starts (and finishes what an earlier run
/// left unfinished), waits for those jobs to be settled, and stops. Ok(true) when every one of
/// them succeeded and its final status was pushed (when a push utility is configured). A stop
/// signal ends it early (Ok(false)).
pub fn run_once(cfg: Config, stop: Receiver<()>) -> anyhow::Result<bool> {
    let running = Running::start(cfg, false)?;
    let engine = Arc::clone(&running.host.engine);
    let initial: HashSet<String> = spool::list_names(&running.host.spool.incoming)?
        .into_iter()
        .filter(|n| !spool::ignored_name(n))
        .collect();
    log::info!("--once: {} file(s) in incoming/", initial.len());
    let result = claim_loop(running.claimer(), &stop, Some(initial));
    let policy = *engine.store.policy();
    let mut ok = result.is_ok();
    let mut stopped = false;
    loop {
        let mut ids: HashSet<u64> = running.open_at_start.iter().copied().collect();
        ids.extend(engine.touched());
        if let Ok(journal) = engine.store.journal() {
            ids.extend(running.first_job..journal.next_job());
        }
        let jobs: Vec<Job> = ids
            .into_iter()
            .filter_map(|id| engine.store.job(id))
            .filter(|j| engine.is_mine(j))
            .collect();
        // a job whose build left something that cannot be freed yet is not waited for: its
        // leak stays recorded, and the next start's pass frees it
        let done = |j: &Job| {
            lifecycle::is_settled(j, &policy)
                || lifecycle::next_step(j, &policy) == lifecycle::Step::Release
        };
        if jobs.iter().all(done) {
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

/// A started daemon: its host (engine and spool), the build pool, the timer, the control
/// socket, and the HTTP server and AMQP participant when configured.
struct Running {
    host: Arc<Host>,
    pool: Pool,
    timer: Timer,
    control: crate::operate::control::Server,
    /// The status page, API and metrics (`[http] listen`).
    http: Option<crate::http::Server>,
    /// The BOSS participant (`[amqp] url` set).
    amqp: Option<Participant>,
    /// This host's record keeper (`hosts/<worker>.json`, the farm exchange).
    announcer: Arc<crate::operate::hosts::Announcer>,
    /// The first job number of this run: the jobs from it on were opened by it.
    first_job: u64,
    /// Jobs recovery found open.
    open_at_start: Vec<u64>,
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
        // A sign key that cannot sign (not ed25519, encrypted, unreadable) stops the start: the
        // operator asked for signed provenance.
        if let Some(k) = crate::artifacts::key::sign_key(&cfg.artifacts)? {
            log::info!(
                "provenance signed with {} ({})",
                k.path.display(),
                k.fingerprint
            );
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
        let store = Arc::new(
            Store::open(
                &state_dir,
                cfg.spool.log_cache_mb * 1024 * 1024,
                cfg.policy(),
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
        let builder = crate::imaging::builder(&cfg.worker);
        log::info!(
            "build-image {} worker {worker} spool {} state {} ({} build slot(s), {:?} mode)",
            env!("CARGO_PKG_VERSION"),
            spool.root.display(),
            state_dir.display(),
            cfg.worker.workers,
            builder.mode(),
        );
        if let Some(why) = builder.unavailable() {
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
        let hooks = Hooks::new(&cfg.hooks, state_dir.join("hooks.log"), registry.clone());
        let engine = Arc::new(Engine::new(Parts {
            cfg: Arc::clone(&cfg),
            worker,
            store,
            registry,
            inputs: Arc::new(spool.clone()),
            builder,
            push: Some(Arc::new(hooks)),
            pushes: true,
        })?);
        engine.set_answerer(
            ReplyTo::Outbox,
            Some(Arc::new(spool::outbox::Outbox::new(
                &spool.outbox,
                &spool.worker,
            ))),
        );
        let first_job = engine.store.journal()?.next_job();

        let pool = {
            let engine = Arc::clone(&engine);
            Pool::start(
                cfg.worker.workers,
                Arc::new(move |id| {
                    if let Err(e) = engine.build(id) {
                        engine.stall(id, &e);
                    }
                }),
            )?
        };
        engine.set_queue(pool.sender());

        let mut amqp = Participant::start(&engine, consume)?;
        let open_at_start = engine.recover()?;
        for stray in crate::process::cgroup::sweep_strays() {
            log::info!(
                "removed the empty cgroup {} of a daemon that is gone",
                stray.display()
            );
        }
        if let Some(a) = amqp.as_mut().filter(|_| consume) {
            a.start_intake(Arc::clone(&engine))?;
        }
        // The replay's temporary memory is freed; hand it back to the system rather than keep
        // it for the daemon's whole (mostly idle) life.
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
        unsafe {
            nix::libc::malloc_trim(0);
        }

        let announcer = Arc::new(crate::operate::hosts::Announcer::new(
            Arc::clone(&engine),
            spool.clone(),
            amqp.as_ref()
                .map(|a| Box::new(a.announcer()) as crate::operate::hosts::Publish),
        ));
        let timer = Timer::start(Arc::clone(&engine), duties(&spool, &engine, &announcer))?;
        let host = Arc::new(Host {
            cfg: Arc::clone(&cfg),
            engine,
            spool,
        });
        let control = crate::operate::control::Server::start(Arc::clone(&host))?;
        let http = match metrics {
            Some((listener, (metrics, seeder))) => {
                let app = crate::http::App {
                    host: Arc::clone(&host),
                    metrics,
                };
                let budgets = crate::http::Budgets::new(
                    cfg.http.max_connections as usize,
                    cfg.http.max_streams as usize,
                );
                Some(
                    crate::http::Server::start(app, seeder, listener, budgets)
                        .context("cannot start the HTTP server")?,
                )
            }
            None => None,
        };
        if let Some(h) = &http {
            let _ = announcer.http.set(h.addr().to_string());
        }
        crate::notify::ready(&format!(
            "claiming; {} job(s) open at start",
            open_at_start.len()
        ));
        Ok(Running {
            host,
            pool,
            timer,
            control,
            http,
            amqp,
            announcer,
            first_job,
            open_at_start,
        })
    }

    fn claimer(&self) -> Claimer<'_> {
        Claimer {
            engine: &self.host.engine,
            spool: &self.host.spool,
        }
    }

    /// Stops: no more claims; running builds get `grace` (a second signal on `stop` ends it at
    /// once) while the control socket keeps answering; then the pushes drain (for at most
    /// `grace` more, unless a second signal cuts them); then the connections, the timer and
    /// the log are closed.
    fn shutdown(mut self, stop: &Receiver<()>) -> anyhow::Result<()> {
        if let Some(a) = self.amqp.as_mut() {
            a.stop_intake();
        }
        let engine = Arc::clone(&self.host.engine);
        let running = engine.running();
        log::info!("stopping: no more claims; {running} build(s) running");
        crate::notify::stopping(&format!("stopping; {running} build(s) running"));
        let grace = Duration::from_secs(engine.cfg.worker.grace);
        // The stop timeout of the service manager is extended while the builds' grace, the
        // pushes' drain (and the kill, the records and the flush after them) run, and no longer.
        let _extend = crate::notify::Extender::start(
            Instant::now() + grace + grace + crate::notify::AFTER_GRACE,
        );
        engine.set_stopping();
        engine.set_queue(None);
        let closed = self.pool.close(grace, stop, |why| {
            log::warn!("{why}: killing running builds");
            engine.cancel_running();
        });
        // The builds are over: what the builder keeps between them goes (warm guests).
        engine.stop_builder();
        if closed == Closed::SecondSignal {
            engine.cut_pushes();
        } else {
            engine.drain_pushes(Instant::now() + grace, stop);
        }
        self.control.stop();
        if let Some(h) = self.http {
            h.stop();
        }
        // The last record says `stopped` (not gone), on the farm exchange too.
        self.announcer.last();
        if let Some(a) = self.amqp {
            a.stop(&engine);
        }
        self.timer.stop();
        engine.store.sync()?;
        engine.store.write_mark();
        if let Err(e) = self.host.spool.clear_heartbeat() {
            log::warn!("cannot remove the liveness mark: {e}");
        }
        log::info!("stopped");
        Ok(())
    }
}

/// How often a daemon looks at the spool's control drops (`control/`: a `cancel ID` from
/// another host).
pub const CONTROL_POLL: Duration = Duration::from_secs(1);

/// What the timer thread does besides the engine's own work: write this host's record
/// (`hosts/<worker>.json`, the farm exchange), take the control drops meant for it, refresh this worker's liveness
/// mark in the spool, and ping the service manager's watchdog when it asks for one (from the
/// thread that flushes the log, so a daemon stuck there is restarted).
fn duties(
    spool: &Spool,
    engine: &Arc<Engine>,
    announcer: &Arc<crate::operate::hosts::Announcer>,
) -> Vec<Periodic> {
    let mut duties = Vec::new();
    let a = Arc::clone(announcer);
    duties.push(Periodic {
        every: Duration::from_secs(engine.cfg.worker.host_record_interval),
        run: Box::new(move || a.beat()),
    });
    let (sp, e) = (spool.clone(), Arc::clone(engine));
    duties.push(Periodic {
        every: CONTROL_POLL,
        run: Box::new(move || {
            sp.take_drops(&e);
        }),
    });
    let spool = spool.clone();
    duties.push(Periodic {
        every: spool::HEARTBEAT,
        run: Box::new(move || {
            if let Err(e) = spool.heartbeat() {
                log::warn!("cannot refresh the liveness mark: {e}");
            }
        }),
    });
    if let Some(every) = crate::notify::watchdog_every() {
        duties.push(Periodic {
            every,
            run: Box::new(crate::notify::watchdog),
        });
    }
    duties
}
