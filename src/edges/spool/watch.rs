//! The spool as a source: the claim loop over `incoming/` (inotify where it works, plus a
//! rescan every `poll_interval_ms`, since over NFS inotify sees nothing), the drop protocol's
//! decisions ([`super::Scanner`]), claims by rename into `active/<worker>/` in batches, handed
//! to the engine's intake as submissions; names that are not workitems are rejected unread.
//!
//! Invariants: nothing is moved into `active/` that cannot be recorded (while the log fails or
//! the state disk lacks room for a batch, the names stay in `incoming/`); a batch of renames is
//! made durable with one fsync of `active/` before its claims are recorded; a batch whose
//! claims could not be recorded is handed over again (never lost, never claimed twice); a
//! drained host (`engine::drain`) claims nothing.

use super::{Ready, Scanner, Spool};
use crate::config::WatchMode;
use crate::domain::origin::{Body, Submission};
use crate::domain::{EventKind, Origin};
use crate::engine::Engine;
use crossbeam_channel::{Receiver, Sender, select, unbounded};
use notify::Watcher;
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

enum Wake {
    Stop,
    Fs(notify::Result<notify::Event>),
    Timer,
}

/// The claim loop's two ends: the engine the claims go to, the spool they come from.
#[derive(Clone, Copy)]
pub struct Claimer<'a> {
    pub engine: &'a Engine,
    pub spool: &'a Spool,
}

/// Claims until `stop`; with `only`, claims just those names and returns once none of them is
/// left in incoming/.
pub fn claim_loop(
    c: Claimer<'_>,
    stop: &Receiver<()>,
    mut only: Option<HashSet<String>>,
) -> anyhow::Result<()> {
    let cfg = &c.engine.cfg.spool;
    let incoming = c.spool.incoming.clone();
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
                        && let Some(r) = super::moved_in_ready(&incoming, name, cfg.max_bytes)
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
                take(c, &mut scanner, ready, &mut unrecorded);
            }
            Wake::Fs(Err(e)) => {
                log::warn!("inotify error ({e}); rescanning");
                next_scan = Instant::now();
            }
            Wake::Timer if c.engine.store.failing().is_some() => {
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
                        record_claims(c, names, &mut unrecorded, true);
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
                        take(c, &mut scanner, chunk.to_vec(), &mut unrecorded);
                    }
                    if let Some(names) = &mut only {
                        names.retain(|n| c.spool.incoming.join(n).symlink_metadata().is_ok());
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
fn take(c: Claimer<'_>, scanner: &mut Scanner, ready: Vec<Ready>, unrecorded: &mut Vec<String>) {
    let size = |r: &Ready| match r {
        Ready::File(n) => c.spool.incoming.join(n).metadata().map_or(0, |m| m.len()) + 4096,
        _ => 0,
    };
    let mut batch = Vec::new();
    let mut bytes = 0;
    for r in ready {
        let b = size(&r);
        if !batch.is_empty() && bytes + b > MAX_BATCH_BYTES {
            take_batch(c, scanner, std::mem::take(&mut batch), bytes, unrecorded);
            bytes = 0;
        }
        bytes += b;
        batch.push(r);
    }
    if !batch.is_empty() {
        take_batch(c, scanner, batch, bytes, unrecorded);
    }
}

/// Claims (renames into active/, one directory fsync for all) or rejects the ready names;
/// errors are logged and a file stays for a later scan.
fn take_batch(
    c: Claimer<'_>,
    scanner: &mut Scanner,
    ready: Vec<Ready>,
    need: u64,
    unrecorded: &mut Vec<String>,
) {
    // Nothing is moved into active/ that cannot be recorded: the names stay in incoming/ until
    // the log takes writes again and the state disk has room for them.
    if c.engine.store.failing().is_some() || c.engine.store.ensure_room(need).is_err() {
        return;
    }
    // A drained host claims nothing: the names stay in incoming/ for the other hosts (and for
    // this one once it is undrained).
    if c.engine.drained().is_some() {
        return;
    }
    let mut claimed = Vec::new();
    for r in ready {
        match r {
            Ready::Reject(name, why) => {
                scanner.forget(&name);
                if let Err(e) = reject_unread(c, &name, &format!("not a workitem: {why}")) {
                    log::error!("cannot reject {name}: {e}");
                }
            }
            Ready::BadName(raw) => {
                scanner.forget(&raw);
                match reject_bad_name(c, &raw) {
                    Ok(name) => log::warn!("{raw:?} is not a UTF-8 name: rejected as {name}"),
                    Err(e) => log::error!("cannot reject {raw:?}: {e}"),
                }
            }
            Ready::File(name) => {
                scanner.forget(&name);
                match c.spool.claim(&name) {
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
    if let Err(e) = crate::durable::sync_dir(&c.spool.active) {
        log::error!("{e}");
    }
    record_claims(c, claimed, unrecorded, false);
}

/// Records files now in active/ as jobs and moves them forward; if that fails the names are
/// kept for the next scan.
fn record_claims(c: Claimer<'_>, names: Vec<String>, unrecorded: &mut Vec<String>, again: bool) {
    let recorded = if again {
        c.engine.submit_again(&Origin::Spool, &names)
    } else {
        c.engine.submit(
            names
                .iter()
                .map(|n| Submission {
                    origin: Origin::Spool,
                    body: Body::Claimed(n.clone()),
                })
                .collect(),
        )
    };
    if let Err(e) = recorded {
        log::error!(
            "claimed {} file(s) but cannot record them yet: {e}",
            names.len()
        );
        unrecorded.extend(names);
    }
}

/// Rejects a name in incoming/ unread (symlink, fifo, directory, too big, hard link): recorded
/// (a job of its own, settled at once), then moved to rejected/ with the reason.
fn reject_unread(c: Claimer<'_>, name: &str, reason: &str) -> anyhow::Result<()> {
    let from = c.spool.incoming.join(name);
    if from.symlink_metadata().is_err() {
        return Ok(());
    }
    c.engine.store.record(
        None,
        EventKind::Rejected {
            file: name.to_string(),
            reason: reason.to_string(),
        },
    )?;
    c.spool.reject(&from, name, reason)?;
    Ok(())
}

/// Rejects a name in incoming/ that is not UTF-8: recorded, then moved to rejected/ under a
/// safe name with the original (escaped) in its `.reason`. Returns the name used.
fn reject_bad_name(c: Claimer<'_>, raw: &std::ffi::OsStr) -> anyhow::Result<String> {
    if c.spool.incoming.join(raw).symlink_metadata().is_err() {
        return Ok(String::new());
    }
    let safe = super::safe_name(raw);
    c.engine.store.record(
        None,
        EventKind::Rejected {
            file: safe,
            reason: format!(
                "the file name is not UTF-8 (as bytes: {})",
                raw.as_encoded_bytes().escape_ascii()
            ),
        },
    )?;
    Ok(c.spool.reject_bad_name(raw)?)
}
