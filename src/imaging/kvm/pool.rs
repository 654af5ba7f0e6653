//! The warm pool (`[worker] vm_warm`, docs/kvm.md "Warm guests"): guests booted ahead, each on
//! a fresh overlay of the base exactly as a build's own, with an ssh connection held open, so
//! that a build takes one instead of waiting for a boot. A supervisor thread keeps `vm_warm`
//! guests booting or ready (within `workers + vm_warm` guests alive, [`Book`]), each booted on a
//! thread of its own; it replaces a ready guest whose qemu or held connection died; it backs off
//! after boots that fail. Started by the builder's `recover` (after the orphans of an earlier
//! life are gone), stopped by the builder's `stop`.
//!
//! Invariants: a guest is handed to one build and never comes back (the build tears it down);
//! a guest that fails its boot or health check is destroyed, never handed out; at a stop every
//! guest not taken is killed and its files removed (what a SIGKILLed daemon left is found by the
//! next start's orphan finder: each guest's stem is locked for its whole life).

use super::machine::{Machine, Stop};
use super::orphans::new_stem;
use super::warm::{Book, Figures, health_remote, health_verdict};
use crate::config::WorkerConfig;
use crate::imaging::JobLog;
use crate::process::Registry;
use crossbeam_channel::{Receiver, Sender};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// How often the supervisor looks at its guests when nothing wakes it.
const WATCH: Duration = Duration::from_secs(1);
/// A warm guest's own log (`<stem>.boot`) is bounded by this.
const BOOT_LOG_MAX: u64 = 1 << 20;
/// After a failed boot the next one waits this long, doubled per failure in a row, at most
/// [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// A guest handed to a build: its id in the book (given back with [`Pool::done`]) and the
/// guest, its steps still logged to its boot log until the build hands it over.
pub(super) struct Taken {
    pub id: u64,
    pub machine: Machine,
    /// When it turned ready.
    pub ready_at: SystemTime,
}

struct Ready {
    machine: Machine,
    at: SystemTime,
    /// The base image, kernel and initrd it booted from, as they were then.
    inputs: Inputs,
}

/// The boot files' [`super::FileKey`]s, None for one that cannot be read.
type Inputs = Vec<Option<super::FileKey>>;

/// The files a guest boots from (`vm_base_img`, `vm_kernel`, `vm_initrd`), by identity and time:
/// a warm guest whose files changed since it booted is not the guest a build would boot now.
fn inputs(w: &WorkerConfig) -> Inputs {
    [&w.vm_base_img, &w.vm_kernel, &w.vm_initrd]
        .into_iter()
        .map(|p| Some(super::file_key(&std::fs::metadata(p.as_deref()?).ok()?)))
        .collect()
}

struct State {
    book: Book,
    ready: BTreeMap<u64, Ready>,
    boots: Vec<JoinHandle<()>>,
    stopping: bool,
    failures: u32,
    next_boot: Instant,
}

struct Inner {
    w: Arc<WorkerConfig>,
    registry: Registry,
    state: Mutex<State>,
    wake: Condvar,
    /// Dropped at the stop: every boot in progress is cancelled.
    stop: Mutex<Option<Sender<()>>>,
    stopped: Receiver<()>,
    warm_takes: AtomicU64,
    cold_takes: AtomicU64,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The pool of warm guests.
pub struct Pool {
    inner: Arc<Inner>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl Pool {
    /// Starts the supervisor (which boots the first guests at once).
    pub(super) fn start(w: Arc<WorkerConfig>, registry: Registry) -> std::io::Result<Pool> {
        let (stop, stopped) = crossbeam_channel::bounded(1);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                book: Book::new(w.vm_warm as usize, w.workers),
                ready: BTreeMap::new(),
                boots: Vec::new(),
                stopping: false,
                failures: 0,
                next_boot: Instant::now(),
            }),
            w,
            registry,
            wake: Condvar::new(),
            stop: Mutex::new(Some(stop)),
            stopped,
            warm_takes: AtomicU64::new(0),
            cold_takes: AtomicU64::new(0),
        });
        let i = Arc::clone(&inner);
        let supervisor = std::thread::Builder::new()
            .name("warm-pool".into())
            .spawn(move || supervise(&i))?;
        Ok(Pool {
            inner,
            supervisor: Mutex::new(Some(supervisor)),
        })
    }

    /// The guest ready longest, for one build; None when none is ready (the build then boots
    /// its own and says so with [`Pool::cold_started`]). A guest found dead here is destroyed
    /// and the next one tried.
    pub(super) fn take(&self) -> Option<Taken> {
        loop {
            let mut st = self.inner.state();
            if st.stopping {
                return None;
            }
            let id = st.book.take(Instant::now())?;
            let Some(ready) = st.ready.remove(&id) else {
                st.book.gone(id);
                continue;
            };
            let why = if !ready.machine.alive() {
                Some("died while it waited")
            } else if ready.inputs != inputs(&self.inner.w) {
                Some("booted from a base image, kernel or initrd that has changed since")
            } else {
                None
            };
            if let Some(why) = why {
                st.book.gone(id);
                drop(st);
                self.inner.wake.notify_all();
                let mut m = ready.machine;
                log::warn!(
                    "warm guest {} {why}: destroyed, another boots",
                    m.stem.display()
                );
                m.discard();
                continue;
            }
            self.inner.warm_takes.fetch_add(1, Ordering::Relaxed);
            return Some(Taken {
                id,
                machine: ready.machine,
                ready_at: ready.at,
            });
        }
    }

    /// The build's guest `id` (taken) is torn down: a replacement may boot.
    pub(super) fn done(&self, id: u64) {
        self.inner.state().book.gone(id);
        self.inner.wake.notify_all();
    }

    /// A build boots a guest of its own (none was ready): counted in the budget.
    pub(super) fn cold_started(&self) {
        self.inner.cold_takes.fetch_add(1, Ordering::Relaxed);
        self.inner.state().book.cold_started();
    }

    /// That build's guest is torn down.
    pub(super) fn cold_ended(&self) {
        self.inner.state().book.cold_ended();
        self.inner.wake.notify_all();
    }

    pub(super) fn figures(&self) -> Figures {
        Figures {
            counts: self.inner.state().book.counts(),
            warm_takes: self.inner.warm_takes.load(Ordering::Relaxed),
            cold_takes: self.inner.cold_takes.load(Ordering::Relaxed),
        }
    }

    /// Stops the pool: boots in progress cancelled, every guest not taken killed and its files
    /// removed; returns once they are gone. Again is a no-op.
    pub(super) fn stop(&self) {
        self.inner.state().stopping = true;
        self.inner
            .stop
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.inner.wake.notify_all();
        let handle = self
            .supervisor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop();
    }
}

fn supervise(inner: &Arc<Inner>) {
    let mut st = inner.state();
    loop {
        if st.stopping {
            break;
        }
        let dead: Vec<u64> = st
            .ready
            .iter()
            .filter(|(_, r)| !r.machine.alive())
            .map(|(id, _)| *id)
            .collect();
        let mut gone = Vec::new();
        for id in dead {
            st.book.gone(id);
            gone.extend(st.ready.remove(&id));
        }
        st.boots.retain(|h| !h.is_finished());
        let now = Instant::now();
        if now >= st.next_boot {
            for _ in 0..st.book.boots_wanted() {
                let id = st.book.booting(now);
                let i = Arc::clone(inner);
                match std::thread::Builder::new()
                    .name("warm-boot".into())
                    .spawn(move || boot_one(&i, id))
                {
                    Ok(h) => st.boots.push(h),
                    Err(e) => {
                        st.book.gone(id);
                        log::warn!("warm pool: cannot start a boot thread: {e}");
                        break;
                    }
                }
            }
        }
        if !gone.is_empty() {
            drop(st);
            for mut r in gone {
                log::warn!(
                    "warm guest {} died (its qemu or its held connection is gone): destroyed, \
                     another boots",
                    r.machine.stem.display()
                );
                r.machine.discard();
            }
            st = inner.state();
            continue;
        }
        st = inner
            .wake
            .wait_timeout(st, WATCH)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
    let ready: Vec<Ready> = std::mem::take(&mut st.ready).into_values().collect();
    let boots = std::mem::take(&mut st.boots);
    drop(st);
    for mut r in ready {
        r.machine.discard();
    }
    for b in boots {
        let _ = b.join();
    }
}

/// Boots guest `id` of the book; it turns ready, or is destroyed and counted as a failure.
fn boot_one(inner: &Arc<Inner>, id: u64) {
    let before = inputs(&inner.w);
    let booted = boot(inner);
    let mut st = inner.state();
    match booted {
        Ok(machine) if !st.stopping => {
            st.book.ready(id, Instant::now());
            st.failures = 0;
            log::info!(
                "warm guest {} ready (ssh answered after {:.1} s)",
                machine.stem.display(),
                machine.boot_seconds
            );
            st.ready.insert(
                id,
                Ready {
                    machine,
                    at: SystemTime::now(),
                    inputs: before,
                },
            );
        }
        Ok(mut machine) => {
            st.book.gone(id);
            drop(st);
            machine.discard();
            return;
        }
        Err((mut machine, why)) => {
            st.book.gone(id);
            if !st.stopping {
                st.failures = st.failures.saturating_add(1);
                let wait = backoff(st.failures);
                st.next_boot = Instant::now() + wait;
                log::warn!(
                    "warm pool: a guest failed to boot ({why}); the next boot in {} s{}",
                    wait.as_secs(),
                    machine
                        .as_ref()
                        .map(|m| format!(" (its log was {})", m.log().path().display()))
                        .unwrap_or_default()
                );
            }
            drop(st);
            if let Some(m) = machine.as_mut() {
                m.discard();
            }
        }
    }
    inner.wake.notify_all();
}

/// The wait before the next boot after `failures` failed boots in a row.
fn backoff(failures: u32) -> Duration {
    let doubled = BACKOFF_FIRST.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    doubled.min(BACKOFF_MAX)
}

type Booted = Result<Machine, (Option<Box<Machine>>, String)>;

/// A warm guest: its stem, the overlay, qemu (console into `<stem>.console`, with the 9p cache
/// `mic_output` on `<stem>.9p/`, empty), ssh answering, the host's mic, proxy and resolver
/// configuration copied in, the held connection, and the health check.
fn boot(inner: &Arc<Inner>) -> Booted {
    let w = Arc::clone(&inner.w);
    let (stem, lock) =
        new_stem(&w.img_tmp, "warm", super::machine::random()).map_err(|e| (None, e))?;
    let path = |ext: &str| super::orphans::with_ext(&stem, ext);
    let log = match JobLog::open(&path("boot"), BOOT_LOG_MAX) {
        Ok(l) => l,
        Err(e) => {
            let why = format!("cannot open {}: {e}", path("boot").display());
            for ext in ["boot", "lock"] {
                let _ = std::fs::remove_file(path(ext));
            }
            return Err((None, why));
        }
    };
    let mut m = Machine::new(
        w,
        log,
        inner.stopped.clone(),
        inner.registry.clone(),
        path("console"),
        path("9p"),
    )
    .with_stem(stem, lock);
    match steps(&mut m) {
        Ok(()) => Ok(m),
        Err(Stop::Cancelled) => Err((Some(Box::new(m)), "stopped".into())),
        Err(Stop::Failed(why) | Stop::Image(why)) => {
            m.note(&format!("error: {why}"));
            Err((Some(Box::new(m)), why))
        }
    }
}

fn steps(m: &mut Machine) -> Result<(), Stop> {
    m.note("warm guest: booted ahead for the next build");
    let accel = m.check_host()?;
    if m.uses_9p() {
        let share = m.share_out.clone();
        std::fs::create_dir(&share)
            .map_err(|e| Stop::Failed(format!("cannot create {}: {e}", share.display())))?;
    }
    let (disk, format) = m.make_overlay()?;
    m.start_guest(accel, &disk, &format)?;
    let console = Path::new(&m.console)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    m.wait_for_ssh(&console)?;
    m.copy_host_config(&[])?;
    m.hold_connection();
    let argv = m.ssh_line(&health_remote());
    let (outcome, out) = m.capture(&argv, None, Duration::from_secs(60), true)?;
    if !outcome.success() {
        return Err(Stop::Failed(format!(
            "the health check did not run: {}",
            out.trim()
        )));
    }
    health_verdict(&out, unix_now()).map_err(Stop::Failed)?;
    m.note("health check passed: ready");
    Ok(())
}

/// The host's clock, seconds since the epoch.
pub(super) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_base_image_changes_the_inputs() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.qcow2");
        std::fs::write(&base, b"one").unwrap();
        let w = WorkerConfig {
            vm_base_img: Some(base.clone()),
            vm_kernel: Some(d.path().join("missing")),
            ..WorkerConfig::default()
        };
        let before = inputs(&w);
        assert_eq!(before.len(), 3);
        assert!(before[0].is_some() && before[1].is_none() && before[2].is_none());
        assert_eq!(inputs(&w), before, "nothing changed");
        // replaced by rename, as an operator updates an image
        std::fs::write(d.path().join("new"), b"two").unwrap();
        std::fs::rename(d.path().join("new"), &base).unwrap();
        assert_ne!(inputs(&w), before);
    }

    #[test]
    fn failed_boots_back_off_up_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(4), Duration::from_secs(40));
        assert_eq!(backoff(7), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }
}
