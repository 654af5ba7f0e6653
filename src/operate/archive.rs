//! The log over years: `import`, `backup`, `compact`, `repush`, `redeliver`. Each works the
//! same through a running daemon (its control socket) and on the log itself when none runs
//! (`control::handle` calls these with the daemon's host or one opened over the log).
//!
//! Invariants: everything builds on the export form (`events --json`: JSON Lines, each
//! `queued`/`invalid` event carrying its input) and on `Journal::import_events`, so a backup, an
//! import and a compacted log are the same events with the same seq and time, whatever the
//! stored form; an operator action that changes the log is recorded as events (`compacted`,
//! `pushed`, `delivered`); a compaction writes its archive durably before the log loses a
//! single event, and swaps the log so that a crash leaves the old or the new one.

use crate::domain::lifecycle;
use crate::domain::{Event, EventKind, Job};
use crate::journal::archive as jarchive;
use crate::journal::{Journal, JournalError};
use crate::operate::{Host, export};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Store(#[from] crate::engine::store::StoreError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Ops(#[from] crate::operate::ops::OpsError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
}

pub type Result<T> = std::result::Result<T, ArchiveError>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError {
    let path = path.to_path_buf();
    move |source| ArchiveError::Io { what, path, source }
}

/// A time given on the command line: RFC 3339 (`2026-01-31T00:00:00Z`, or without the zone as
/// UTC: `2026-01-31 00:00:00`), or a span back from `now` as humantime reads it (`90days`,
/// `2weeks 3d`, `12h`).
pub fn parse_time(s: &str, now: SystemTime) -> std::result::Result<SystemTime, String> {
    let s = s.trim();
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    match humantime::parse_duration(s) {
        Ok(d) => now
            .checked_sub(d)
            .filter(|t| *t >= SystemTime::UNIX_EPOCH)
            .ok_or_else(|| format!("{s:?} reaches back before 1970")),
        Err(_) => Err(format!(
            "{s:?} is neither a time (RFC 3339: 2026-01-31T00:00:00Z) nor a span back from now (90days, 12h)"
        )),
    }
}

/// A time as the events write it.
pub fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The time of an event (None: not RFC 3339).
fn event_time(ts: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(ts.trim_end_matches('Z')).ok()
}

/// An archive named `*.gz` is written gzip-compressed.
fn is_gzip_name(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "gz")
}

/// Where the archive's lines go: the file, buffered, gzip-compressed or not.
enum ArchiveWriter {
    Plain(std::io::BufWriter<std::fs::File>),
    Gzip(flate2::write::GzEncoder<std::io::BufWriter<std::fs::File>>),
}

impl ArchiveWriter {
    fn new(f: std::fs::File, gzip: bool) -> ArchiveWriter {
        let buf = std::io::BufWriter::new(f);
        if gzip {
            ArchiveWriter::Gzip(flate2::write::GzEncoder::new(
                buf,
                flate2::Compression::default(),
            ))
        } else {
            ArchiveWriter::Plain(buf)
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            ArchiveWriter::Plain(w) => w.write_all(bytes),
            ArchiveWriter::Gzip(w) => w.write_all(bytes),
        }
    }

    /// Everything written out; the file, to be fsynced.
    fn finish(self) -> std::io::Result<std::fs::File> {
        let buf = match self {
            ArchiveWriter::Plain(w) => w,
            ArchiveWriter::Gzip(w) => w.finish()?,
        };
        buf.into_inner().map_err(|e| e.into_error())
    }
}

/// An export or archive to read: gzip-compressed ones (by their magic bytes) are decompressed.
pub fn open_export(mut r: impl BufRead + 'static) -> std::io::Result<Box<dyn BufRead>> {
    let head = r.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        return Ok(Box::new(std::io::BufReader::new(
            flate2::bufread::MultiGzDecoder::new(r),
        )));
    }
    Ok(Box::new(r))
}

/// Is there a log (or anything else) in `dir`? Import and backup write only into an empty
/// or missing folder.
fn ensure_empty(dir: &Path, what: &str) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut rd) => match rd.next() {
            None => Ok(()),
            Some(e) => Err(ArchiveError::Refused(format!(
                "{what} {} is not empty (it holds {}): {what} writes only into an empty or new folder",
                dir.display(),
                e.map(|e| e.file_name().to_string_lossy().into_owned())
                    .unwrap_or_default()
            ))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("cannot read", dir)(e)),
    }
}

/// `p` as the file system sees it: its longest existing part with symlinks and `..` resolved,
/// the rest (`.` and `..` applied) as written.
fn resolved(p: &Path) -> PathBuf {
    use std::path::Component;
    let parts: Vec<Component<'_>> = p.components().collect();
    for i in (1..=parts.len()).rev() {
        let head: PathBuf = parts[..i].iter().collect();
        if let Ok(mut out) = head.canonicalize() {
            for c in &parts[i..] {
                match c {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    c => out.push(c.as_os_str()),
                }
            }
            return out;
        }
    }
    p.to_path_buf()
}

/// Refuses `path` (what a `backup` or `compact` writes, `what`) inside a folder the daemon
/// takes as its own: the spool's `incoming/`, `tmp/`, `active/`, `outbox/`, `rejected/` (a file
/// there is claimed, answered or moved away by a daemon), its `state/` (where each worker's
/// daemon opens the log named after it) and the state dir.
pub fn outside_spool(host: &Host, path: &Path, what: &str) -> Result<()> {
    let spool = &host.spool;
    let active = spool.root.join("active");
    let states = spool.root.join("state");
    let state = host.cfg.state_dir();
    let path = resolved(path);
    for (dir, name) in [
        (&spool.incoming, "the spool's incoming/"),
        (&spool.tmp, "the spool's tmp/"),
        (&active, "the spool's active/"),
        (&spool.outbox, "the spool's outbox/"),
        (&spool.rejected, "the spool's rejected/"),
        (&states, "the spool's state/"),
        (&state, "the state dir"),
    ] {
        if path.starts_with(resolved(dir)) {
            return Err(ArchiveError::Refused(format!(
                "{what} {} is inside {name} ({}), where a daemon takes what it finds: name a place outside the spool's folders and the state dir",
                path.display(),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// A hidden folder beside `dir` where a log is built before it is renamed into place.
fn staging_dir(dir: &Path) -> Result<PathBuf> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io("cannot create", parent))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "log".into());
    let tmp = parent.join(format!(".{name}.{}.tmp", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io("cannot remove", &tmp))?;
    }
    crate::engine::statedir::prepare_state_dir(&tmp)
        .map_err(crate::engine::store::StoreError::from)?;
    Ok(tmp)
}

/// Runs `build` on a fresh staging folder beside `dir` (which `build` ends by renaming into
/// `dir` with `place`); a failed build leaves nothing behind.
fn build_staged<T>(dir: &Path, build: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let tmp = staging_dir(dir)?;
    let built = build(&tmp);
    if built.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    built
}

/// Closes a log built in `tmp`, writes its high-water mark, and renames it to `dir` (an empty
/// or missing folder).
fn place(journal: Journal, tmp: &Path, dir: &Path) -> Result<()> {
    journal.flush()?;
    let last = journal.last_seq();
    drop(journal);
    crate::durable::write_atomic(
        &crate::engine::statedir::mark_path(tmp),
        format!("{last}\n").as_bytes(),
        0o600,
    )
    .map_err(|e| ArchiveError::Refused(e.to_string()))?;
    if dir.exists() {
        // An empty folder: rename(2) replaces it.
        ensure_empty(dir, "the target")?;
    }
    crate::durable::rename(tmp, dir).map_err(|e| ArchiveError::Refused(e.to_string()))?;
    Ok(())
}

/// A long copy ends when the daemon stops (a stop does not wait for it).
fn not_stopping(stopping: &dyn Fn() -> bool) -> std::result::Result<(), JournalError> {
    if stopping() {
        return Err(JournalError::Refused(
            "the daemon is stopping: nothing was written; run it again".into(),
        ));
    }
    Ok(())
}

/// What `import` did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportReport {
    pub dir: PathBuf,
    pub events: u64,
    pub jobs: u64,
    pub last_seq: u64,
    /// Taken with `--partial` although the export was not whole: why not.
    #[serde(default)]
    pub partial: Option<String>,
}

/// `import FILE`: builds a log in the empty (or missing) state dir `dir` from an export
/// (JSON Lines ended by its trailer, see `export`). Written beside it and renamed into place,
/// so a failed import leaves nothing. An export that is not whole (no trailer, one that does
/// not match, a last line cut short) is refused, unless `partial`: then the events it holds
/// are imported and the report says what was wrong.
pub fn import(reader: impl BufRead, dir: &Path, partial: bool) -> Result<ImportReport> {
    ensure_empty(dir, "the state dir")?;
    build_staged(dir, |tmp| {
        let journal = Journal::open(tmp)?;
        let mut lines = export::Reader::new(reader);
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        let (mut events, mut jobs, mut top) = (0u64, 0u64, 0u64);
        while let Some((ev, len)) = lines
            .next_event()
            .map_err(|e| ArchiveError::Refused(e.to_string()))?
        {
            bytes += len;
            events += 1;
            // a job's first event: numbered above every job before it (checked on import)
            if ev.job > top {
                top = ev.job;
                jobs += 1;
            }
            batch.push(ev);
            if batch.len() >= 1024 || bytes >= 32 << 20 {
                journal.import_events(&batch)?;
                batch.clear();
                bytes = 0;
            }
        }
        journal.import_events(&batch)?;
        let partial = match lines.check() {
            Ok(()) => None,
            Err(why) if partial => Some(why.to_string()),
            Err(why) => {
                return Err(ArchiveError::Refused(format!(
                    "the export is not whole: {why}. Nothing was imported; `import --partial` takes the {events} event(s) it holds"
                )));
            }
        };
        let last_seq = journal.last_seq();
        place(journal, tmp, dir)?;
        Ok(ImportReport {
            dir: dir.to_path_buf(),
            events,
            jobs,
            last_seq,
            partial,
        })
    })
}

/// What `backup` did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupReport {
    pub dir: PathBuf,
    pub events: u64,
    /// The backup holds every event up to this seq (the log's durable end when it began).
    pub upto: u64,
}

/// `backup DIR`: a fresh log in `dir` (empty or missing) holding every event of `journal` up
/// to its durable end, read while the daemon goes on appending: a consistent prefix of the log
/// (every event below a durable seq is in the log), in whatever stored form this version
/// writes. A state dir to start a daemon on (docs/operations.md, restore).
pub fn backup(journal: &Journal, dir: &Path, stopping: &dyn Fn() -> bool) -> Result<BackupReport> {
    ensure_empty(dir, "the backup folder")?;
    // What was appended without a flush of its own (a push's record) is made durable first.
    journal.flush()?;
    let upto = journal.durable_seq();
    build_staged(dir, |tmp| {
        let copy = Journal::open(tmp)?;
        let events = journal.copy_into(&copy, upto + 1, |_| true, |_| not_stopping(stopping))?;
        place(copy, tmp, dir)?;
        Ok(BackupReport {
            dir: dir.to_path_buf(),
            events,
            upto,
        })
    })
}

/// What `compact` did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompactReport {
    /// The jobs moved out, and their events.
    pub jobs: u64,
    pub events: u64,
    /// The events left in the log (the compaction's own event included).
    pub kept: u64,
    /// Settled before the time, kept because their job folder still exists under base_dir
    /// (their image_id and folder still guard it against another job).
    pub kept_for_folder: u64,
    pub archive: Option<PathBuf>,
    /// The seq of the `compacted` event (None: nothing to move).
    pub seq: Option<u64>,
    /// The job number of the `compacted` record.
    #[serde(default)]
    pub job: Option<u64>,
}

/// How long a compaction waits for readers to let go of the log before it swaps it.
const SWAP_PATIENCE: Duration = Duration::from_secs(30);

/// `compact --before TIME --archive FILE`: moves the events of the jobs settled before
/// `before` (their last event older than it, nothing left to do for them), and the cancel
/// notes expired by now (`cancel_noted`, of no job), into `archive`
/// (JSON Lines, the export form; written and fsynced before the log changes), and rewrites
/// the log without them, recorded by a `compacted` event. A job whose job folder still exists
/// under base_dir is kept: its image_id and folder still guard that folder against another
/// job (two jobs never share a job folder).
pub fn compact(host: &Host, before: SystemTime, archive: &Path) -> Result<CompactReport> {
    let dir = host.engine.store.dir().to_path_buf();
    let now = SystemTime::now();
    if before > now {
        return Err(ArchiveError::Refused(format!(
            "--before {} is in the future (now is {}): a job is settled before a time that has passed",
            format_time(before),
            format_time(now)
        )));
    }
    outside_spool(host, archive, "the archive")?;
    if archive.symlink_metadata().is_ok() {
        return Err(ArchiveError::Refused(format!(
            "{} exists: an archive is never replaced; name a new file",
            archive.display()
        )));
    }
    let Some(_lock) = jarchive::swap_lock(&dir)? else {
        return Err(ArchiveError::Refused(
            "another compaction of this log is under way".into(),
        ));
    };
    let journal = host.engine.store.journal()?;
    // What was appended without a flush of its own (a push's record) is made durable first.
    journal.flush()?;
    let horizon = journal.durable_seq() + 1;
    let (jobs, _) = journal.fold_jobs(Some(horizon))?;
    let policy = *host.engine.store.policy();
    let mut removed: HashSet<u64> = HashSet::new();
    let mut kept_for_folder = 0;
    for (id, job) in &jobs {
        if !lifecycle::is_settled(job, &policy) {
            continue;
        }
        let last = journal.get(job.last_seq)?;
        if last
            .as_ref()
            .is_some_and(|e| matches!(e.kind, EventKind::Compacted { .. }))
        {
            continue; // the record of an earlier compaction stays
        }
        let old = last
            .as_ref()
            .and_then(|e| event_time(&e.ts))
            .is_some_and(|t| t < before);
        if !old {
            continue;
        }
        if let Some(spec) = crate::engine::store::spec_of(&journal, job)?
            && crate::imaging::job_dir(&host.cfg.worker, &spec)
                .symlink_metadata()
                .is_ok()
        {
            kept_for_folder += 1;
            continue;
        }
        removed.insert(*id);
    }
    // cancel notes (events of no job) expired by now go to the archive with the jobs
    let now_secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let stale = |ev: &Event| matches!(&ev.kind, EventKind::CancelNoted { expires, .. } if *expires <= now_secs);
    let any_stale = journal
        .farm_events()?
        .iter()
        .any(|e| e.seq < horizon && stale(e));
    if removed.is_empty() && !any_stale {
        return Ok(CompactReport {
            jobs: 0,
            events: 0,
            kept: journal.last_seq(),
            kept_for_folder,
            archive: None,
            seq: None,
            job: None,
        });
    }

    // 1. The archive, durable, before anything leaves the log.
    let tmp_archive = crate::durable::temp_path(archive, None);
    let events = (|| -> Result<u64> {
        use std::os::unix::fs::OpenOptionsExt;
        // Owner only, as the log: the inputs carry kickstarts with password hashes.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp_archive)
            .map_err(io("cannot create", &tmp_archive))?;
        let mut out = ArchiveWriter::new(f, is_gzip_name(archive));
        let mut digest = export::Digest::default();
        for ev in journal.since(0) {
            let ev = ev?;
            if ev.seq >= horizon {
                break;
            }
            if removed.contains(&ev.job) || stale(&ev) {
                let ev = journal.with_input(ev)?;
                let line = export::event_line(&ev).map_err(JournalError::Encode)?;
                out.write_all(&line)
                    .map_err(io("cannot write", &tmp_archive))?;
                digest.line(&line);
            }
        }
        // the export's trailer: an archive imports only whole
        out.write_all(&digest.trailer_line())
            .map_err(io("cannot write", &tmp_archive))?;
        let n = digest.events();
        let f = out.finish().map_err(io("cannot write", &tmp_archive))?;
        f.sync_all().map_err(io("cannot fsync", &tmp_archive))?;
        if !crate::durable::rename_noreplace(&tmp_archive, archive)
            .map_err(|e| ArchiveError::Refused(e.to_string()))?
        {
            return Err(ArchiveError::Refused(format!(
                "{} appeared meanwhile: an archive is never replaced",
                archive.display()
            )));
        }
        Ok(n)
    })();
    let events = match events {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp_archive);
            return Err(e);
        }
    };

    jarchive::crash_point("compact-archived");

    // 2. The kept log, built beside the old one while the daemon goes on.
    let swapping = std::cell::Cell::new(false);
    let unwind = |e: ArchiveError| {
        // Nothing left the log: the archive would only repeat it.
        let _ = std::fs::remove_file(archive);
        let _ = jarchive::finish_swap(&dir);
        e
    };
    let new_dir = jarchive::prepare_new(&dir).map_err(|e| unwind(e.into()))?;
    let built = (|| -> Result<(Journal, u64)> {
        let new = Journal::open(&new_dir)?;
        let stopping = || host.engine.stopping();
        let kept = journal.copy_into(
            &new,
            horizon,
            |e| !removed.contains(&e.job) && !stale(e),
            |_| not_stopping(&stopping),
        )?;
        // The projections too, here, so that the swap below folds only the jobs of the events
        // appended meanwhile (the daemon records nothing while it runs).
        let (jobs, _) = new.fold_jobs(None)?;
        new.rewrite_marks(&jobs, &|j: &Job| lifecycle::is_open(j, &policy))?;
        Ok((new, kept))
    })();
    let (new, mut kept) = built.map_err(unwind)?;
    drop(journal);

    // 3. Under the store's lock: the events appended meanwhile, the compaction's own event,
    //    and the swap.
    let reason = format!(
        "{events} event(s) of {} job(s) settled before {} moved to {}",
        removed.len(),
        format_time(before),
        archive.display()
    );
    let record = EventKind::Compacted {
        file: archive.display().to_string(),
        reason,
        before: format_time(before),
        jobs: removed.len() as u64,
        events,
    };
    let swapped = host.engine.store.with_log_closed(SWAP_PATIENCE, |old| {
        let mut tail = Vec::new();
        for ev in old.since(horizon) {
            let ev = ev?;
            if removed.contains(&ev.job) {
                return Err(JournalError::Refused(format!(
                    "job {} changed while the log was compacted (event {}): nothing was moved; run compact again",
                    ev.job, ev.seq
                )));
            }
            tail.push(old.with_input(ev)?);
        }
        // a job of its own: the next number, so the numbering goes on when the newest jobs
        // went to the archive
        let (seq, job) = (old.next_seq(), old.next_job());
        tail.push(Event {
            seq,
            ts: crate::journal::now_ts(),
            job,
            kind: record,
        });
        new.import_events(&tail)?;
        kept += tail.len() as u64;
        new.flush()?;
        drop(new);
        drop(old);
        swapping.set(true);
        jarchive::swap_in(&dir)?;
        Ok((seq, job))
    });
    let (seq, job) = swapped.map_err(|e| {
        if swapping.get() {
            // The swap may have happened (it is finished at the next open once marked): the
            // archive stays, whatever the log now holds.
            ArchiveError::from(e)
        } else {
            unwind(e.into())
        }
    })?;
    Ok(CompactReport {
        jobs: removed.len() as u64,
        events,
        kept,
        kept_for_folder,
        archive: Some(archive.to_path_buf()),
        seq: Some(seq),
        job: Some(job),
    })
}

/// One job's final status pushed again by `repush`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Repushed {
    pub job: u64,
    pub image_id: Option<String>,
    pub status: crate::domain::Status,
    pub ok: bool,
    pub error: Option<String>,
}

/// The jobs whose final push `repush` runs again: answered (done or error), finished in
/// [since, until), not a conflict (a conflict pushes nothing), oldest first.
pub fn repush_jobs(jobs: &crate::domain::Jobs, since: SystemTime, until: SystemTime) -> Vec<&Job> {
    jobs.values()
        .filter(|j| j.state.is_answered() && j.held_by.is_none())
        .filter(|j| {
            j.finished_at
                .as_deref()
                .and_then(event_time)
                .is_some_and(|t| t >= since && t < until)
        })
        .collect()
}

/// `repush --since T [--until T]`: the final push (DONE or ERROR) of every job finished in the
/// window, run again now through the push utility, each recorded as a `pushed` event.
pub fn repush(host: &Host, since: SystemTime, until: SystemTime) -> Result<Vec<Repushed>> {
    if host.cfg.hooks.push.is_none() {
        return Err(ArchiveError::Refused(
            "no push utility is configured ([hooks] push): there is nothing to push again".into(),
        ));
    }
    if until <= since {
        return Err(ArchiveError::Refused(format!(
            "the window is empty: --until {} is not after --since {}",
            format_time(until),
            format_time(since)
        )));
    }
    let jobs = host.engine.store.journal()?.projections()?;
    let mut out = Vec::new();
    for job in repush_jobs(&jobs, since, until) {
        if host.engine.stopping() {
            return Err(ArchiveError::Refused(format!(
                "the daemon is stopping: {} final push(es) made again before it, the rest not",
                out.len()
            )));
        }
        let Some(p) = host.engine.repush(job)? else {
            continue;
        };
        out.push(Repushed {
            job: job.id,
            image_id: job.image_id.clone(),
            status: job.final_status(),
            ok: p.ok,
            error: p.error,
        });
    }
    Ok(out)
}

/// What `redeliver` did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Redelivered {
    pub job: u64,
    /// Where the answer went again.
    pub to: crate::domain::Receipt,
    /// The bytes are those of the job's last recorded answer (same sha256).
    pub identical: bool,
}

/// `redeliver ID`: the job's answer sent again the way it went the first time.
pub fn redeliver(host: &Host, id: &str) -> Result<Redelivered> {
    let journal = host.engine.store.journal()?;
    let job = crate::operate::ops::resolve(&journal, id)?;
    drop(journal);
    let (receipt, identical) = host.engine.redeliver(job)?;
    Ok(Redelivered {
        job,
        to: receipt,
        identical,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        let now = humantime::parse_rfc3339("2026-11-25T12:00:00Z").unwrap();
        let t = |s| parse_time(s, now).map(format_time);
        assert_eq!(
            t("2026-01-31T00:00:00Z").unwrap(),
            "2026-01-31T00:00:00.000Z"
        );
        assert_eq!(
            t("2026-01-31 00:00:00").unwrap(),
            "2026-01-31T00:00:00.000Z"
        );
        assert_eq!(t("90days").unwrap(), "2026-08-27T12:00:00.000Z");
        assert_eq!(t("12h").unwrap(), "2026-11-25T00:00:00.000Z");
        assert!(t("last tuesday").unwrap_err().contains("RFC 3339"));
        assert!(t("100000years").is_err());
        assert_eq!(
            event_time("2026-11-25T00:00:01.234Z")
                .map(format_time)
                .as_deref(),
            Some("2026-11-25T00:00:01.234Z")
        );
    }
}
