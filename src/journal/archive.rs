//! The log over years, on the journal's side: writing events that already have their seq and
//! time (`import_events`, the one primitive `import`, `backup` and `compact` build on), reading
//! them back in the export form (with their input), copying a filtered log into a fresh one, and
//! swapping a rewritten log in for the old one so that a crash at any moment leaves one of them.
//!
//! Invariants: `import_events` keeps every index as `append` keeps it and never writes a seq at
//! or below the last one; a copy reads only events below a seq known durable, so it is a
//! consistent prefix of the log; a swap is a redo log (a `compact.swap` mark written after the
//! new log is complete): before the mark the old log is untouched, after it the swap is finished
//! by whoever opens the state dir next (`finish_swap`).

use super::{Event, EventKind, FARM, Journal, JournalError, Result, Stored, lock};
use std::path::{Path, PathBuf};

/// Events written per import batch at most (and bytes of inputs, below).
const BATCH_EVENTS: usize = 1024;
const BATCH_BYTES: usize = 32 * 1024 * 1024;

impl Journal {
    /// Writes `events` with their given seq, ts and job (ascending, each above the log's last
    /// seq; gaps allowed; a job not in the log yet numbered above every job before it, as
    /// `append` numbers them), every index as `append` writes it, and the input each `queued` or
    /// `invalid` event carries (the export form) into the inputs tree. Not flushed: the caller
    /// flushes once it has written all it writes (`flush`: one flush for a whole import). The
    /// projections are derived, not imported: `Store::open` folds them, all of them in a fresh
    /// log (no projection format mark yet), else the jobs these events touch (marked).
    pub fn import_events(&self, events: &[Event]) -> Result<()> {
        self.check_broken()?;
        let r = self.import_inner(events);
        if let Err(e) = &r {
            self.set_broken(e);
        }
        r
    }

    fn import_inner(&self, events: &[Event]) -> Result<()> {
        let mut next = lock(&self.next_seq);
        let mut expect = *next;
        let mut next_job = self.next_job();
        let mut known: std::collections::HashSet<u64> = Default::default();
        for ev in events {
            if ev.seq < expect {
                return Err(JournalError::Refused(format!(
                    "event {} comes after event {} (or the log already holds it): events are imported in ascending seq, above the log's last one",
                    ev.seq,
                    expect.saturating_sub(1)
                )));
            }
            if ev.kind.is_farm() != (ev.job == FARM) {
                return Err(JournalError::Refused(format!(
                    "event {} ({}) names job {}: farm-level events, and only they, are of job {FARM}",
                    ev.seq,
                    ev.kind.name(),
                    ev.job
                )));
            }
            if ev.job == FARM {
                expect = ev.seq + 1;
                continue;
            }
            if ev.job > ev.seq {
                return Err(JournalError::Refused(format!(
                    "event {} names job {}, which would open after it",
                    ev.seq, ev.job
                )));
            }
            // A job's first event opens it: numbered above every job opened before it (the
            // newest jobs are the highest numbers: how the log pages and numbers new jobs).
            if ev.job >= next_job {
                next_job = ev.job + 1;
                known.insert(ev.job);
            } else if !known.contains(&ev.job) && self.seqs_of(ev.job)?.is_empty() {
                return Err(JournalError::Refused(format!(
                    "event {} opens job {}, below job {} opened before it: job numbers go up as jobs open",
                    ev.seq,
                    ev.job,
                    next_job - 1
                )));
            } else {
                known.insert(ev.job);
            }
            expect = ev.seq + 1;
        }
        let mut stored = Vec::with_capacity(events.len());
        let mut seqs: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
        for ev in events {
            let mut plain = ev.clone();
            let input = super::take_input(&mut plain.kind);
            let bytes = serde_json::to_vec(&plain).map_err(JournalError::Encode)?;
            seqs.entry(ev.job).or_default().push(ev.seq);
            if let Some((tree, key)) = self.index_entry(ev.job, &ev.kind) {
                tree.insert(key, &[])?;
            }
            stored.push(Stored {
                seq: ev.seq,
                job: ev.job,
                json: bytes,
                input,
            });
        }
        // the jobs these events change are folded at the next start (an imported log is
        // folded whole; a copy's last events may change open jobs): indexed and marked before
        // the events are written, as `append` does
        for (job, new) in &seqs {
            self.add_seqs(*job, new)?;
            if *job != FARM {
                self.mark(*job)?;
            }
        }
        self.write_blocks(&stored)?;
        *next = expect;
        self.next_job
            .store(next_job, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The event in its export form: a `queued` or `invalid` event carries its job's input.
    pub fn with_input(&self, mut ev: Event) -> Result<Event> {
        if let EventKind::Queued { input, .. } | EventKind::Invalid { input, .. } = &mut ev.kind
            && let Some(bytes) = self.input_bytes(ev.job)?
        {
            input.0 = bytes;
        }
        Ok(ev)
    }

    /// Copies the events below seq `end` that `keep` accepts (in their export form, inputs
    /// included) into `dst` with `import_events`, in bounded batches, then flushes `dst` once;
    /// `seen` gets every event read (kept or not). Returns how many were copied.
    pub fn copy_into(
        &self,
        dst: &Journal,
        end: u64,
        mut keep: impl FnMut(&Event) -> bool,
        mut seen: impl FnMut(&Event) -> Result<()>,
    ) -> Result<u64> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut n = 0;
        for ev in self.since(0) {
            let ev = ev?;
            if ev.seq >= end {
                break;
            }
            seen(&ev)?;
            if !keep(&ev) {
                continue;
            }
            let ev = self.with_input(ev)?;
            if let EventKind::Queued { input, .. } | EventKind::Invalid { input, .. } = &ev.kind {
                bytes += input.0.len();
            }
            batch.push(ev);
            n += 1;
            if batch.len() >= BATCH_EVENTS || bytes >= BATCH_BYTES {
                dst.import_events(&batch)?;
                batch.clear();
                bytes = 0;
            }
        }
        dst.import_events(&batch)?;
        dst.flush()?;
        Ok(n)
    }
}

/// A crash at a named step of a rewrite, for the tests of what a crash leaves: the process
/// aborts there when `BUILD_IMAGE_CRASH_AT` names the step.
pub fn crash_point(step: &str) {
    if std::env::var_os("BUILD_IMAGE_CRASH_AT").is_some_and(|v| v == step) {
        log::error!("BUILD_IMAGE_CRASH_AT={step}: aborting");
        std::process::abort();
    }
}

/// The mark of a swap under way: written (fsynced) once the new log is complete.
const SWAP_MARK: &str = "compact.swap";
/// Where the new log is built, and where the old one goes during a swap (inside the state dir).
pub const NEW_DIR: &str = ".log.new";
const OLD_DIR: &str = ".log.old";

/// Is this entry of a state dir one of sled's (the log), rather than ours (control socket,
/// high-water mark, hooks.log, ...)?
fn is_log_entry(name: &str) -> bool {
    matches!(name, "db" | "conf" | "blobs") || name.starts_with("snap.")
}

fn io(what: &str, path: &Path, e: std::io::Error) -> JournalError {
    JournalError::Refused(format!("{what} {}: {e}", path.display()))
}

fn fsync_dir(dir: &Path) -> Result<()> {
    crate::durable::sync_dir(dir).map_err(|e| JournalError::Refused(e.to_string()))
}

/// The fresh directory a rewritten log is built in, inside the state dir `dir` (emptied first:
/// what an earlier, interrupted rewrite left there is not a complete log).
pub fn prepare_new(dir: &Path) -> Result<PathBuf> {
    let new = dir.join(NEW_DIR);
    if new.exists() {
        std::fs::remove_dir_all(&new).map_err(|e| io("cannot remove", &new, e))?;
    }
    std::fs::create_dir(&new).map_err(|e| io("cannot create", &new, e))?;
    Ok(new)
}

/// Puts the complete log built in `dir/.log.new` (closed) in place of the log of `dir`
/// (closed). A crash before the swap mark is durable leaves the old log; after it, the next
/// `finish_swap` completes the swap.
pub fn swap_in(dir: &Path) -> Result<()> {
    let new = dir.join(NEW_DIR);
    fsync_tree(&new)?;
    // The mark names the new log's entries: how a finish after a crash tells an entry already
    // moved in from an old one of the same name.
    let mut list = names(&new)?.join("\n");
    list.push('\n');
    crate::durable::write_atomic(&dir.join(SWAP_MARK), list.as_bytes(), 0o600)
        .map_err(|e| JournalError::Refused(e.to_string()))?;
    crash_point("compact-marked");
    finish_swap(dir)
}

/// Is a swap marked and not finished in `dir` (the new log complete, its files not all moved)?
pub fn swap_pending(dir: &Path) -> bool {
    dir.join(SWAP_MARK).exists()
}

/// Finishes a swap a crash interrupted (the mark is there: the new log is complete), or
/// removes what an interrupted rewrite left (no mark: the old log stands). Idempotent; run
/// before the log of `dir` is opened.
pub fn finish_swap(dir: &Path) -> Result<()> {
    let mark = dir.join(SWAP_MARK);
    let new = dir.join(NEW_DIR);
    let old = dir.join(OLD_DIR);
    if mark.exists() {
        let listed = std::fs::read_to_string(&mark).map_err(|e| io("cannot read", &mark, e))?;
        let listed: Vec<&str> = listed.lines().filter(|l| !l.is_empty()).collect();
        std::fs::create_dir_all(&old).map_err(|e| io("cannot create", &old, e))?;
        // An entry of the state dir is the new log's when the mark lists it and it has left
        // .log.new; every other log entry is the old log's: aside with it first.
        for name in names(dir)? {
            let moved_in = listed.contains(&name.as_str()) && !new.join(&name).exists();
            if is_log_entry(&name) && !moved_in {
                let from = dir.join(&name);
                std::fs::rename(&from, old.join(&name)).map_err(|e| io("cannot move", &from, e))?;
            }
        }
        fsync_dir(dir)?;
        for name in &listed {
            let from = new.join(name);
            if from.exists() {
                std::fs::rename(&from, dir.join(name)).map_err(|e| io("cannot move", &from, e))?;
            }
        }
        fsync_dir(dir)?;
        std::fs::remove_file(&mark).map_err(|e| io("cannot remove", &mark, e))?;
        fsync_dir(dir)?;
    }
    for d in [&new, &old] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(|e| io("cannot remove", d, e))?;
        }
    }
    Ok(())
}

/// The lock a rewrite of the log holds from the first file it writes to the end of its swap
/// (`compact.lock` in the state dir, flock'ed; a crash releases it).
pub type SwapLock = nix::fcntl::Flock<std::fs::File>;

/// Takes the rewrite lock of the state dir `dir`; None while another process holds it.
pub fn swap_lock(dir: &Path) -> Result<Option<SwapLock>> {
    use nix::fcntl::{Flock, FlockArg};
    let path = dir.join("compact.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io("cannot open", &path, e))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(io("cannot lock", &path, e.into())),
    }
}

/// Taken at the opening of a state dir, held until its log is open: waits up to `patience`
/// for a rewrite under way (another process holds the rewrite lock: the log's files are
/// changing), then finishes or clears what an interrupted rewrite left. None: a rewrite still
/// holds the lock.
pub fn open_guard(dir: &Path, patience: std::time::Duration) -> Result<Option<SwapLock>> {
    let deadline = std::time::Instant::now() + patience;
    let held = loop {
        match swap_lock(dir)? {
            Some(l) => break l,
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            None => return Ok(None),
        }
    };
    let left = [SWAP_MARK, NEW_DIR, OLD_DIR]
        .iter()
        .any(|n| dir.join(n).symlink_metadata().is_ok());
    if left {
        log::warn!(
            "{}: finishing what an interrupted rewrite of the log (compact) left",
            dir.display()
        );
        finish_swap(dir)?;
    }
    Ok(Some(held))
}

fn names(dir: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| io("cannot read", dir, e))?;
    Ok(rd
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect())
}

/// fsyncs every file and folder below `dir` (a log sled closed: its files are flushed, this
/// makes their names durable too).
fn fsync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)
        .map_err(|e| io("cannot read", dir, e))?
        .flatten()
    {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            fsync_tree(&p)?;
        } else {
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("cannot fsync", &p, e))?;
        }
    }
    fsync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Input, Tag};

    fn ev(seq: u64, job: u64, kind: EventKind) -> Event {
        Event {
            seq,
            ts: format!("2026-01-01T00:00:{:02}.000Z", seq % 60),
            job,
            kind,
        }
    }

    #[test]
    fn import_keeps_seq_ts_indexes_and_inputs() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let input = Input(br#"{"image":{"image_id":"x-1","kickstart":"ks"}}"#.to_vec());
        let evs = vec![
            ev(
                3,
                3,
                EventKind::Claimed {
                    file: "a.json".into(),
                    worker: "w".into(),
                    bytes: 5,
                    sha256: "aa".into(),
                    source: None,
                },
            ),
            ev(
                7,
                3,
                EventKind::Invalid {
                    image_id: Some("x-1".into()),
                    error: "e".into(),
                    held_by: None,
                    input: input.clone(),
                },
            ),
        ];
        j.import_events(&evs).unwrap();
        assert_eq!(j.next_seq(), 8);
        assert_eq!(j.get(7).unwrap().unwrap().ts, evs[1].ts);
        assert_eq!(j.jobs_for_image("x-1").unwrap(), vec![3]);
        assert_eq!(j.jobs_for_sha("aa").unwrap(), vec![3]);
        assert_eq!(j.job_events(3).unwrap().len(), 2);
        assert_eq!(j.input_bytes(3).unwrap().unwrap().to_vec(), input.0);
        // the stored form does not carry the input; the export form does
        let stored = j.get(7).unwrap().unwrap();
        assert!(
            !serde_json::to_string(&stored)
                .unwrap()
                .contains("kickstart")
        );
        assert_eq!(j.with_input(stored).unwrap(), evs[1]);
        // below the last seq, or out of order: refused, nothing written
        let again = j.import_events(&[ev(5, 5, EventKind::Cancelled { reason: "r".into() })]);
        assert!(matches!(again, Err(JournalError::Refused(_))), "{again:?}");
        assert_eq!(j.next_seq(), 8);
        assert_eq!(Tag::parse("claimed"), Some(Tag::Claimed));
        // job numbers go on after the highest imported job
        assert_eq!(j.next_job(), 4);
        let c = j
            .append_batch(
                vec![(None, EventKind::Cancelled { reason: "r".into() })],
                &|_| false,
            )
            .unwrap();
        assert_eq!((c[0].seq, c[0].job), (8, 4));
        // a job that opens below one opened before it: refused, nothing written
        let cancel = || EventKind::Cancelled { reason: "r".into() };
        let below = j.import_events(&[ev(9, 3, cancel()), ev(10, 2, cancel())]);
        assert!(
            matches!(&below, Err(JournalError::Refused(m)) if m.contains("opens job 2")),
            "{below:?}"
        );
        assert_eq!((j.next_seq(), j.next_job()), (9, 5));
        j.import_events(&[ev(9, 3, cancel()), ev(10, 7, cancel())])
            .unwrap();
        assert_eq!((j.next_seq(), j.next_job()), (11, 8));
    }

    #[test]
    fn farm_events_are_imported_and_copied_as_any_event() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let cancel = || EventKind::Cancelled { reason: "r".into() };
        let drained = || EventKind::Drained {
            reason: "disk".into(),
        };
        // a farm event with a job, a job's event with FARM: refused, nothing written
        for bad in [ev(1, 1, drained()), ev(1, FARM, cancel())] {
            let e = j.import_events(&[bad]);
            assert!(matches!(e, Err(JournalError::Refused(_))), "{e:?}");
        }
        assert_eq!((j.next_seq(), j.next_job()), (1, 1));
        j.import_events(&[
            ev(1, FARM, drained()),
            ev(2, 2, cancel()),
            ev(3, FARM, EventKind::Undrained {}),
            ev(4, FARM, drained()),
        ])
        .unwrap();
        j.flush().unwrap();
        assert_eq!((j.next_seq(), j.next_job()), (5, 3));
        assert_eq!(j.open_jobs().unwrap(), [2], "FARM is never marked open");
        let farm = j.farm_events().unwrap();
        assert_eq!(farm.len(), 3);
        assert_eq!(farm[2], ev(4, FARM, drained()));
        // a copy (backup, compaction) keeps them
        let d2 = tempfile::tempdir().unwrap();
        let copy = Journal::open(d2.path()).unwrap();
        assert_eq!(j.copy_into(&copy, 5, |_| true, |_| Ok(())).unwrap(), 4);
        assert_eq!(copy.farm_events().unwrap(), farm);
        assert_eq!(
            copy.fold_all().unwrap().keys().copied().collect::<Vec<_>>(),
            [2]
        );
    }

    #[test]
    fn no_open_while_a_rewrite_holds_the_lock() {
        let d = tempfile::tempdir().unwrap();
        let held = swap_lock(d.path()).unwrap().expect("free");
        assert!(swap_lock(d.path()).unwrap().is_none());
        std::fs::create_dir(d.path().join(NEW_DIR)).unwrap();
        let none = open_guard(d.path(), std::time::Duration::from_millis(100)).unwrap();
        assert!(none.is_none());
        assert!(
            d.path().join(NEW_DIR).exists(),
            "a rewrite under way is left alone"
        );
        drop(held);
        let guard = open_guard(d.path(), std::time::Duration::ZERO).unwrap();
        assert!(guard.is_some());
        assert!(
            !d.path().join(NEW_DIR).exists(),
            "an interrupted rewrite is cleared"
        );
    }

    #[test]
    fn a_swap_leaves_the_old_or_the_new_log() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        for (name, text) in [("db", "old"), ("conf", "old"), ("snap.01", "old")] {
            std::fs::write(dir.join(name), text).unwrap();
        }
        std::fs::write(dir.join("log.mark"), "9").unwrap();
        // an interrupted build of a new log (no mark): removed, the old log stands
        let new = prepare_new(dir).unwrap();
        std::fs::write(new.join("db"), "new").unwrap();
        finish_swap(dir).unwrap();
        assert!(!new.exists());
        assert_eq!(std::fs::read_to_string(dir.join("db")).unwrap(), "old");
        // the mark written, then a crash half-way through the moves: finished at the next open
        let new = prepare_new(dir).unwrap();
        for (name, text) in [("db", "new"), ("conf", "new"), ("snap.02", "new")] {
            std::fs::write(new.join(name), text).unwrap();
        }
        std::fs::write(dir.join(SWAP_MARK), "db\nconf\nsnap.02\n").unwrap();
        std::fs::create_dir(dir.join(OLD_DIR)).unwrap();
        std::fs::rename(dir.join("db"), dir.join(OLD_DIR).join("db")).unwrap();
        std::fs::rename(dir.join("conf"), dir.join(OLD_DIR).join("conf")).unwrap();
        std::fs::rename(dir.join("snap.01"), dir.join(OLD_DIR).join("snap.01")).unwrap();
        std::fs::rename(new.join("db"), dir.join("db")).unwrap();
        finish_swap(dir).unwrap();
        let mut left: Vec<String> = names(dir).unwrap();
        left.sort();
        assert_eq!(left, vec!["conf", "db", "log.mark", "snap.02"]);
        for name in ["conf", "db", "snap.02"] {
            assert_eq!(std::fs::read_to_string(dir.join(name)).unwrap(), "new");
        }
        assert_eq!(std::fs::read_to_string(dir.join("log.mark")).unwrap(), "9");
    }
}
