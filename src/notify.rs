//! The service manager's notifications (systemd `Type=notify`, through the sd-notify crate):
//! `READY=1` once recovery is done and the daemon claims, `STOPPING=1` when a stop begins,
//! `EXTEND_TIMEOUT_USEC` while the stop runs (builds get `[worker] grace`, far longer than a
//! stop timeout), and `WATCHDOG=1` at half the `WATCHDOG_USEC` the manager set.
//!
//! Without `NOTIFY_SOCKET` every call is a no-op. A notification that cannot be sent is logged
//! and never stops the daemon.

use crossbeam_channel::{Sender, bounded};
use sd_notify::NotifyState;
use std::time::{Duration, Instant};

/// What one `EXTEND_TIMEOUT_USEC` asks for: the manager kills the service if no new one (and no
/// exit) comes within it, so a daemon that hangs in its stop is still killed.
pub const EXTEND_BY: Duration = Duration::from_secs(30);
/// How often the extension is sent again while a stop runs.
pub const EXTEND_EVERY: Duration = Duration::from_secs(5);
/// Beyond the grace, how long a stop may take to kill the builds, record them and flush the log
/// before the extensions end (the unit's TimeoutStopSec covers a stop with no grace).
pub const AFTER_GRACE: Duration = Duration::from_secs(60);

fn send(what: &str, states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("cannot tell the service manager {what}: {e}");
    }
}

/// Recovery is done and the daemon claims.
pub fn ready(status: &str) {
    send("READY", &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A stop begins.
pub fn stopping(status: &str) {
    send(
        "STOPPING",
        &[NotifyState::Stopping, NotifyState::Status(status)],
    );
}

/// The watchdog interval the service manager asks for (`WatchdogSec`), if any; the daemon pings
/// at half of it.
pub fn watchdog_every() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

pub fn watchdog() {
    send("WATCHDOG", &[NotifyState::Watchdog]);
}

/// Is stderr the journal stream systemd connected (`JOURNAL_STREAM` = its `dev:inode`, and
/// stderr still is that file)? Then the journal stamps each line and the daemon's own timestamp
/// is left out (one line per event, its time once).
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr()).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

/// The `EXTEND_TIMEOUT_USEC` value for `d` (saturating).
pub fn usec(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Sends `EXTEND_TIMEOUT_USEC` (and `WATCHDOG=1`, when a watchdog is on) every
/// [`EXTEND_EVERY`] from its start until it is dropped or `until` passes.
pub struct Extender {
    stop: Option<Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Extender {
    pub fn start(until: Instant) -> Extender {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Extender {
                stop: None,
                thread: None,
            };
        }
        let (tx, rx) = bounded::<()>(1);
        let watchdog = watchdog_every().is_some();
        let thread = std::thread::Builder::new()
            .name("stop-extender".into())
            .spawn(move || {
                while Instant::now() < until {
                    let mut states = vec![NotifyState::ExtendTimeoutUsec(usec(EXTEND_BY))];
                    if watchdog {
                        states.push(NotifyState::Watchdog);
                    }
                    send("EXTEND_TIMEOUT_USEC", &states);
                    // a message or a dropped sender: the stop is over
                    if !matches!(
                        rx.recv_timeout(EXTEND_EVERY),
                        Err(crossbeam_channel::RecvTimeoutError::Timeout)
                    ) {
                        return;
                    }
                }
            });
        match thread {
            Ok(t) => Extender {
                stop: Some(tx),
                thread: Some(t),
            },
            Err(e) => {
                log::warn!("cannot start the stop's timeout extensions: {e}");
                Extender {
                    stop: None,
                    thread: None,
                }
            }
        }
    }
}

impl Drop for Extender {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usec_saturates() {
        assert_eq!(usec(Duration::from_secs(30)), 30_000_000);
        assert_eq!(usec(Duration::from_secs(100_000)), u32::MAX);
    }
}
