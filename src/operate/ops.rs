//! What operators ask of the log: job listings, one job's story, the events, and the replay
//! check. Pure functions of the journal and the spool, so a running daemon (over its control
//! socket) and a command that opened the log itself give the same answers.

use crate::config::Config;
use crate::domain::lifecycle::{self, Policy};
use crate::domain::workitem;
use crate::domain::{Event, EventKind, Job, Jobs, State, Tag};
use crate::edges::spool::Spool;
use crate::imaging;
use crate::journal::{Journal, JournalError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::time::{Instant, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Spool(#[from] crate::edges::spool::SpoolError),
    #[error("{}", not_found(.0))]
    NotFound(String),
    /// A bare number that is the image_id of one job and the number of another.
    #[error(
        "{id:?} is ambiguous: it is the image_id of job {by_image} and the number of job {job}{}; say #{job} (or --job {job}) for job {job}, #{by_image} for the job with image_id {id}",
        image_of.as_deref().map(|i| format!(" (image_id {i})")).unwrap_or_default()
    )]
    Ambiguous {
        id: String,
        by_image: u64,
        job: u64,
        image_of: Option<String>,
    },
    #[error("{0:?} is not a job number: write #N (or --job N) with N a number, or an image_id")]
    BadNumber(String),
}

/// What a reference that names no job is told (`#N`: no job number N).
pub fn not_found(id: &str) -> String {
    match id.strip_prefix('#') {
        Some(n) => format!("no job number {n}"),
        None => format!("no job with image_id or job number {id:?}"),
    }
}

pub type Result<T> = std::result::Result<T, OpsError>;

/// One line of `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusRow {
    pub job: u64,
    pub image_id: Option<String>,
    pub state: State,
    pub name: Option<String>,
    pub arch: Option<String>,
    pub image_type: Option<String>,
    pub worker: Option<String>,
    pub file: Option<String>,
    pub started: Option<String>,
    /// Seconds from start to finish (or to now, while building).
    pub duration: Option<f64>,
    pub attempts: u32,
    pub result: Option<bool>,
    pub error: Option<String>,
    /// Where the workitem came from: `spool` (a dropped file) or `amqp` (a message).
    #[serde(default)]
    pub source: String,
    /// What its builds left on the host and could not free (`leaked`), until freed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leaks: Vec<crate::domain::job::Leak>,
    /// A failed build's class: image, infrastructure or cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<crate::domain::Failure>,
    /// What became of a built job's images: `pinned` or `expired` (absent: kept by the policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<String>,
    /// The sha256 of the image at `image_url` (a successful build).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
    /// The build's provenance statement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance_url: Option<String>,
}

fn seconds_between(from: &str, to: Option<&str>) -> Option<f64> {
    let start = humantime::parse_rfc3339(from).ok()?;
    let end = match to {
        Some(t) => humantime::parse_rfc3339(t).ok()?,
        None => SystemTime::now(),
    };
    end.duration_since(start).ok().map(|d| d.as_secs_f64())
}

pub fn status_row(job: &Job) -> StatusRow {
    let duration = job.started_at.as_deref().and_then(|s| {
        let end = match job.state {
            State::Building => None,
            _ => Some(job.finished_at.as_deref().unwrap_or(s)),
        };
        seconds_between(s, end)
    });
    StatusRow {
        job: job.id,
        image_id: job.image_id.clone(),
        state: job.state,
        name: job.name.clone(),
        arch: job.arch.clone(),
        image_type: job.image_type.clone(),
        worker: job.worker.clone(),
        file: job.file.clone(),
        started: job.started_at.clone(),
        duration,
        attempts: job.attempts,
        result: job.result,
        error: job.error.clone(),
        source: job.origin.name().to_string(),
        leaks: job.leaks.clone(),
        failure: job.failure,
        images: if job.expired.is_some() {
            Some("expired".into())
        } else if job.pinned {
            Some("pinned".into())
        } else {
            None
        },
        image_sha256: job.urls.image_sha256.clone(),
        provenance_url: job.urls.provenance_url.clone(),
    }
}

/// `status`: newest first, filtered by state, at most `limit` rows.
pub fn status(jobs: &Jobs, state: Option<State>, limit: Option<usize>) -> Vec<StatusRow> {
    jobs.values()
        .rev()
        .filter(|j| state.is_none_or(|s| j.state == s))
        .take(limit.unwrap_or(usize::MAX))
        .map(status_row)
        .collect()
}

/// Finds the job a reference names. `#N` is job number N, and only that. Anything else is an
/// image_id: the job that holds it (the newest accepted for building with it), else the newest
/// with it (an invalid or conflicting one); a bare number that is no image_id is the job with
/// that number, and one that is both an image_id and the number of another job is refused as
/// ambiguous, naming both (a reference is never guessed).
pub fn resolve(journal: &Journal, id: &str) -> Result<u64> {
    let exists = |n: u64| -> Result<bool> { Ok(n > 0 && journal.fold_job(n)?.is_some()) };
    if let Some(n) = id.strip_prefix('#') {
        let n: u64 = n.parse().map_err(|_| OpsError::BadNumber(id.to_string()))?;
        return if exists(n)? {
            Ok(n)
        } else {
            Err(OpsError::NotFound(format!("#{n}")))
        };
    }
    let by_image = image_holder(journal, id)?;
    let number = id
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| id.parse::<u64>().ok())
        .flatten();
    match (by_image, number) {
        (Some(j), Some(n)) if j != n && exists(n)? => Err(OpsError::Ambiguous {
            id: id.to_string(),
            by_image: j,
            job: n,
            image_of: journal.fold_job(n)?.and_then(|job| job.image_id),
        }),
        (Some(j), _) => Ok(j),
        (None, Some(n)) if exists(n)? => Ok(n),
        _ => Err(OpsError::NotFound(id.to_string())),
    }
}

/// The job an image_id names: the one that holds it (the newest accepted for building with
/// it), else the newest with it.
fn image_holder(journal: &Journal, id: &str) -> Result<Option<u64>> {
    let ids = journal.jobs_for_image(id)?;
    for job in ids.iter().rev() {
        if journal.projection(*job)?.is_some_and(|j| j.accepted) {
            return Ok(Some(*job));
        }
    }
    Ok(ids.last().copied())
}

/// `show`: one job's events, state and current workitem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub job: Job,
    pub events: Vec<Event>,
    /// The workitem as the outbox has it (or will have it: before the end, with the URLs known
    /// so far and no result).
    pub workitem: Option<Value>,
    pub log_path: Option<String>,
    pub logfile_url: Option<String>,
}

pub fn show(journal: &Journal, cfg: &Config, id: &str) -> Result<JobView> {
    let job_id = resolve(journal, id)?;
    let events = journal.job_events(job_id)?;
    let job = crate::domain::job::fold(&events)
        .remove(&job_id)
        .ok_or_else(|| OpsError::NotFound(id.to_string()))?;
    let mut workitem = None;
    let mut log_path = None;
    let mut logfile_url = None;
    let input = journal.input(job_id)?;
    for ev in &events {
        match (&ev.kind, &input) {
            (EventKind::Queued { spec, .. }, Some(input)) => {
                let path = imaging::log_path(&cfg.worker, spec);
                logfile_url = imaging::url_for(&cfg.worker, &path);
                log_path = Some(path.display().to_string());
                let urls = if job.result.is_some() {
                    job.urls.clone()
                } else {
                    imaging::planned_urls(&cfg.worker, spec)
                };
                workitem = Some(workitem::reply(
                    input,
                    job.result,
                    job.error.as_deref(),
                    &urls,
                ));
            }
            (EventKind::Invalid { .. }, Some(input)) => {
                workitem = Some(workitem::reply(
                    input,
                    job.result,
                    job.error.as_deref(),
                    &job.urls,
                ));
            }
            _ => {}
        }
    }
    Ok(JobView {
        job,
        events,
        workitem,
        log_path,
        logfile_url,
    })
}

/// Which events `events` prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventFilter {
    pub since: u64,
    pub image: Option<String>,
    pub kind: Option<Tag>,
    /// The export form: `queued` and `invalid` events carry their job's input workitem.
    #[serde(default)]
    pub inputs: bool,
}

/// The events matching `f`, in order, from seq `f.since` on.
pub fn events(journal: &Journal, f: &EventFilter) -> Result<Vec<Event>> {
    events_page(journal, f, usize::MAX)
}

/// The input bytes an export page holds at most (beyond its first event).
const PAGE_INPUT_BYTES: usize = 16 * 1024 * 1024;

/// The first `max` events matching `f` (a page of a long export: the next starts after the last).
pub fn events_page(journal: &Journal, f: &EventFilter, max: usize) -> Result<Vec<Event>> {
    let keep = |e: &Event| f.kind.is_none_or(|k| e.kind.tag() == k);
    let mut out = match &f.image {
        Some(image) => {
            let mut out = Vec::new();
            for job in journal.jobs_for_image(image)? {
                out.extend(
                    journal
                        .job_events(job)?
                        .into_iter()
                        .filter(|e| e.seq >= f.since && keep(e)),
                );
            }
            out.sort_by_key(|e| e.seq);
            out.truncate(max);
            out
        }
        None => {
            let mut out = Vec::new();
            for e in journal.since(f.since) {
                if out.len() >= max {
                    break;
                }
                let e = e?;
                if keep(&e) {
                    out.push(e);
                }
            }
            out
        }
    };
    if f.inputs {
        // Inputs can be megabytes each: a page ends once it holds PAGE_INPUT_BYTES of them.
        let mut bytes = 0;
        let mut full = Vec::with_capacity(out.len());
        for e in out {
            if bytes >= PAGE_INPUT_BYTES {
                break;
            }
            let e = journal.with_input(e)?;
            if let EventKind::Queued { input, .. } | EventKind::Invalid { input, .. } = &e.kind {
                bytes += input.0.len();
            }
            full.push(e);
        }
        out = full;
    }
    Ok(out)
}

/// One event as a line for people.
pub fn event_line(e: &Event) -> String {
    // a farm-level event belongs to no job: `farm` where the job would be
    let job = if e.job == crate::domain::FARM {
        "farm".to_string()
    } else {
        format!("job {}", e.job)
    };
    format!(
        "{:>8} {} {job:<10} {:<11} {}",
        e.seq,
        e.ts,
        e.kind.name(),
        event_detail(e)
    )
}

/// What an event says, for people (the end of its `event_line`).
pub fn event_detail(e: &Event) -> String {
    match &e.kind {
        EventKind::Claimed {
            file,
            worker,
            bytes,
            sha256,
            source,
        } => format!(
            "{file} by {worker}, {bytes} bytes, sha256 {}{}",
            &sha256[..sha256.len().min(12)],
            source
                .as_deref()
                .map(|s| format!(", from {s}"))
                .unwrap_or_default()
        ),
        EventKind::Duplicate { file, sha256, .. } => format!(
            "{file}: a byte-identical re-drop (sha256 {}), answered with this job's answer",
            &sha256[..sha256.len().min(12)]
        ),
        EventKind::Rejected { file, reason } => format!("{file}: {reason}"),
        EventKind::Invalid {
            image_id, error, ..
        } => format!("{} {error}", image_id.as_deref().unwrap_or("-")),
        EventKind::Queued { image_id, spec, .. } => format!(
            "{image_id} {} {} {} prefix {}",
            spec.name, spec.arch, spec.image_type, spec.prefix
        ),
        EventKind::Started { mode, attempt } => format!("{mode:?} attempt {attempt}"),
        EventKind::Finished {
            result,
            error,
            urls,
            failure,
            boot_seconds,
        } => {
            let boot = boot_seconds
                .map(|b| format!(" (guest booted in {b:.1} s)"))
                .unwrap_or_default();
            match (result, error) {
                (true, _) => format!(
                    "ok {}{}{boot}",
                    urls.image_url.as_deref().unwrap_or(""),
                    urls.image_sha256
                        .as_deref()
                        .map(|h| format!(" sha256 {h}"))
                        .unwrap_or_default()
                ),
                (false, e) => format!(
                    "failed{}: {}{boot}",
                    failure.map(|f| format!(" ({f})")).unwrap_or_default(),
                    e.as_deref().unwrap_or("")
                ),
            }
        }
        EventKind::Delivered(d) => match &d.copy {
            Some(c) => format!("{} (the answer for the re-drop {c})", d.receipt),
            None => d.receipt.to_string(),
        },
        EventKind::Pushed {
            status,
            exit,
            ok,
            error,
        } => format!(
            "{} {}{}",
            status.as_str(),
            if *ok { "ok" } else { "FAILED" },
            match (exit, error) {
                (_, Some(e)) => format!(": {e}"),
                (Some(c), None) if *c != 0 => format!(" (exit {c})"),
                _ => String::new(),
            }
        ),
        EventKind::Interrupted { reason, cause } => format!("{reason} ({cause:?})"),
        EventKind::Compacted { reason, .. } => reason.clone(),
        EventKind::Leaked { what, why } => format!("{what}: {why}"),
        EventKind::LeakFreed { what } => what.clone(),
        EventKind::Pinned {} => "kept out of every expiry".into(),
        EventKind::Unpinned {} => "back under the retention policy".into(),
        EventKind::Drained { reason } => format!("the host claims nothing more: {reason}"),
        EventKind::Undrained {} => "the host takes work again".into(),
        EventKind::CancelNoted { fei, expires } => format!(
            "a cancel of fei {fei} heard on the farm exchange, kept until {}",
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(*expires)
            )
        ),
        EventKind::Expired {
            files,
            bytes,
            reason,
        } => format!(
            "{} file(s) deleted ({}): {reason}",
            files.len(),
            crate::domain::text::human_size(*bytes)
        ),
        EventKind::Cancelled { reason } | EventKind::Requeued { reason, .. } => reason.clone(),
    }
}

/// What `replay` found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplayReport {
    pub events: u64,
    pub jobs: usize,
    pub seconds: f64,
    pub events_per_second: f64,
    pub disagreements: Vec<String>,
}

/// Folds the whole log from empty and compares it with what is derived from it (each job as its
/// own index reads it, the open marks a start loads) and with the spool of `spool.worker`.
pub fn replay(journal: &Journal, spool: &Spool, policy: &Policy) -> Result<ReplayReport> {
    // The jobs numbered below `jobs_before` opened before `horizon` (read in this order).
    let jobs_before = journal.next_job();
    let horizon = journal.next_seq();
    let started = Instant::now();
    let (jobs, n) = journal.fold_jobs(Some(horizon))?;
    let seconds = started.elapsed().as_secs_f64();
    let mut d = Vec::new();

    // The job index: each job folded from the events it lists.
    for (id, job) in &jobs {
        match journal.projection(*id)? {
            None => d.push(format!("job {id}: its events are not in the job index")),
            Some(p) if p.last_seq >= horizon => {} // recorded after we started: newer, not wrong
            Some(p) if &p != job => d.push(format!(
                "job {id}: through the job index it is {} (seq {}), the log says {} (seq {})",
                p.state, p.last_seq, job.state, job.last_seq
            )),
            Some(_) => {}
        }
    }
    // The open marks: every job the lifecycle keeps open is loaded at a start.
    let marked: HashSet<u64> = journal.open_jobs()?.into_iter().collect();
    for (id, job) in &jobs {
        if lifecycle::is_open(job, policy) && !marked.contains(id) {
            d.push(format!("job {id} is {}, but not marked open", job.state));
        }
    }
    for id in marked.iter().filter(|id| !jobs.contains_key(id)) {
        if *id < jobs_before {
            d.push(format!("job {id}: marked open, with no events"));
        }
    }

    // The spool.
    let worker = &spool.worker;
    let mine: Vec<&Job> = jobs
        .values()
        .filter(|j| j.worker.as_deref() == Some(worker.as_str()))
        .collect();
    // Which job holds each file of active/: its own input while it is not answered, or a
    // re-drop not answered yet.
    let mut holder: HashMap<&str, &Job> = HashMap::new();
    let mut last_by_file: HashMap<&str, &Job> = HashMap::new();
    for j in &mine {
        if let Some(f) = &j.file {
            last_by_file.insert(f, j);
            if lifecycle::is_live(j) && !j.state.is_answered() {
                holder.insert(f, j);
            }
        }
        for c in j.copies.iter().filter(|c| c.unanswered()) {
            holder.insert(&c.file, j);
        }
    }
    let active = spool.active_files().unwrap_or_default();
    let active_set: HashSet<&str> = active.iter().map(String::as_str).collect();
    for name in &active {
        if holder.contains_key(name.as_str()) {
            continue;
        }
        match last_by_file.get(name.as_str()) {
            Some(j) => d.push(format!(
                "active/{worker}/{name}: its job {} is {}, yet the file is still there",
                j.id, j.state
            )),
            None => d.push(format!("active/{worker}/{name}: no job claims it")),
        }
    }
    for (f, j) in &holder {
        if !active_set.contains(f) {
            d.push(format!(
                "job {} ({}) is {}, but its file active/{worker}/{f} is gone",
                j.id,
                j.image_id.as_deref().unwrap_or("-"),
                j.state
            ));
        }
    }
    let mut delivered: HashSet<&str> = mine
        .iter()
        .filter_map(|j| j.receipt.as_ref()?.outbox_name())
        .collect();
    let mut claimed_here: HashSet<&str> = mine.iter().filter_map(|j| j.file.as_deref()).collect();
    for j in &mine {
        for c in &j.copies {
            claimed_here.insert(&c.file);
            if let Some(o) = c.receipt.as_ref().and_then(|r| r.outbox_name()) {
                delivered.insert(o);
            }
        }
    }
    for name in crate::edges::spool::list_names(&spool.outbox).unwrap_or_default() {
        if claimed_here.contains(name.as_str()) && !delivered.contains(name.as_str()) {
            d.push(format!(
                "outbox/{name}: this worker claimed {name} but the log has no delivered event for it"
            ));
        }
    }
    Ok(ReplayReport {
        events: n,
        jobs: jobs.len(),
        seconds,
        events_per_second: if seconds > 0.0 {
            n as f64 / seconds
        } else {
            0.0
        },
        disagreements: d,
    })
}
