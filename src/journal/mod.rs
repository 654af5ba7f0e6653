//! The event log: one sled tree, key = big-endian u64 seq, value = the event as JSON.
//!
//! Invariant: `append` returns only after the event is flushed, so a caller acts on a step only
//! once its event is durable. Seqs are handed out under one lock, so the log is totally ordered
//! and a reader that has seen seq N has seen every event before it.

pub mod event;
pub mod fold;

pub use event::{Event, EventKind, Mode, Status};
pub use fold::{Job, Jobs, State};

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(
        "the event log in {0} is locked by another process: is a build-image daemon already running on this state dir?"
    )]
    Locked(PathBuf),
    #[error("cannot open the event log in {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("event log I/O failed: {0}")]
    Sled(#[from] sled::Error),
    #[error("event {seq} in the log is not readable: {source}")]
    Corrupt { seq: u64, source: serde_json::Error },
    #[error("cannot encode an event: {0}")]
    Encode(serde_json::Error),
}

pub type Result<T> = std::result::Result<T, JournalError>;

/// sled's page cache by default: small, so an idle daemon stays small.
pub const DEFAULT_CACHE_BYTES: u64 = 8 * 1024 * 1024;

const EVENTS: &str = "events";
const BY_JOB: &str = "by_job";
const BY_IMAGE: &str = "by_image";
const JOBS: &str = "jobs";
const INPUTS: &str = "inputs";

/// The log and its indexes. `events` is the truth; `by_job` (job ++ seq), `by_image`
/// (image_id ++ 0 ++ job) and `jobs` (job -> its folded state, the projection) are derived from it
/// and can be rebuilt by folding `events` (`build-image replay` checks them).
pub struct Journal {
    db: sled::Db,
    events: sled::Tree,
    by_job: sled::Tree,
    by_image: sled::Tree,
    jobs: sled::Tree,
    inputs: sled::Tree,
    next_seq: Mutex<u64>,
    path: PathBuf,
}

/// Now, as the RFC 3339 UTC text events carry.
pub fn now_ts() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl Journal {
    /// Opens (or creates) the log in `dir` with the default cache (8 MiB). Fails with
    /// [`JournalError::Locked`] when another process holds it.
    pub fn open(dir: &Path) -> Result<Journal> {
        Journal::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens the log with a page cache of `cache_bytes` (sled's cache: memory against replay
    /// speed; see docs/PERFORMANCE.md).
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Journal> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(None)
            .open()
            .map_err(|e| match &e {
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("lock") =>
                {
                    JournalError::Locked(dir.to_path_buf())
                }
                _ => JournalError::Open {
                    path: dir.to_path_buf(),
                    source: e,
                },
            })?;
        let events = db.open_tree(EVENTS)?;
        let next = match events.last()? {
            Some((k, _)) => key_seq(&k) + 1,
            None => 1,
        };
        Ok(Journal {
            by_job: db.open_tree(BY_JOB)?,
            by_image: db.open_tree(BY_IMAGE)?,
            jobs: db.open_tree(JOBS)?,
            inputs: db.open_tree(INPUTS)?,
            db,
            events,
            next_seq: Mutex::new(next),
            path: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event and flushes it. `job = None` opens a new job whose id is this seq.
    pub fn append(&self, job: Option<u64>, kind: EventKind) -> Result<Event> {
        let mut out = self.append_batch(vec![(job, kind)])?;
        out.pop()
            .ok_or_else(|| JournalError::Sled(sled::Error::Unsupported("empty batch".into())))
    }

    /// Appends several events with one flush (group commit).
    pub fn append_batch(&self, items: Vec<(Option<u64>, EventKind)>) -> Result<Vec<Event>> {
        self.append_projected(items, |_| None)
    }

    /// Appends events with one flush; `project` gives, for each event, the job's state after it,
    /// which is stored as the job's projection in the same flush.
    pub fn append_projected(
        &self,
        items: Vec<(Option<u64>, EventKind)>,
        mut project: impl FnMut(&Event) -> Option<Job>,
    ) -> Result<Vec<Event>> {
        let mut out = Vec::with_capacity(items.len());
        {
            let mut next = self.next_seq.lock().unwrap_or_else(|p| p.into_inner());
            let mut batch = sled::Batch::default();
            let mut by_job = sled::Batch::default();
            let mut by_image = sled::Batch::default();
            let mut jobs = sled::Batch::default();
            let mut inputs = sled::Batch::default();
            let mut seq = *next;
            for (job, kind) in items {
                let ev = Event {
                    seq,
                    ts: now_ts(),
                    job: job.unwrap_or(seq),
                    kind,
                };
                let bytes = serde_json::to_vec(&ev).map_err(JournalError::Encode)?;
                batch.insert(&seq.to_be_bytes(), bytes);
                by_job.insert(job_seq_key(ev.job, seq).as_slice(), &[]);
                if let Some(id) = image_id_of(&ev.kind) {
                    by_image.insert(image_key(id, ev.job), &[]);
                }
                if let EventKind::Queued { input, .. } | EventKind::Invalid { input, .. } = &ev.kind
                {
                    let bytes = serde_json::to_vec(input).map_err(JournalError::Encode)?;
                    inputs.insert(&ev.job.to_be_bytes(), bytes);
                }
                if let Some(j) = project(&ev) {
                    let bytes = serde_json::to_vec(&j).map_err(JournalError::Encode)?;
                    jobs.insert(&j.id.to_be_bytes(), bytes);
                }
                out.push(ev);
                seq += 1;
            }
            // Indexes and inputs first: a crash between leaves an index entry (or an input)
            // without its event, which readers skip, never an event missing its index entry.
            self.by_job.apply_batch(by_job)?;
            self.by_image.apply_batch(by_image)?;
            self.inputs.apply_batch(inputs)?;
            self.events.apply_batch(batch)?;
            self.jobs.apply_batch(jobs)?;
            *next = seq;
        }
        self.db.flush()?;
        Ok(out)
    }

    /// The event with this seq.
    pub fn get(&self, seq: u64) -> Result<Option<Event>> {
        match self.events.get(seq.to_be_bytes())? {
            Some(v) => decode(seq, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Events with seq >= `since`, in order.
    pub fn since(&self, since: u64) -> impl Iterator<Item = Result<Event>> + '_ {
        self.events.range(since.to_be_bytes()..).map(|item| {
            let (k, v) = item?;
            decode(key_seq(&k), &v)
        })
    }

    /// The events of one job, in order (through the by_job index).
    pub fn job_events(&self, job: u64) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        for item in self.by_job.scan_prefix(job.to_be_bytes()) {
            let (k, _) = item?;
            let seq = key_seq(&k[8..]);
            if let Some(ev) = self.get(seq)? {
                out.push(ev);
            }
        }
        Ok(out)
    }

    /// The input workitem of a job (stored with its `queued` or `invalid` event).
    pub fn input(&self, job: u64) -> Result<Option<serde_json::Value>> {
        match self.inputs.get(job.to_be_bytes())? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|source| JournalError::Corrupt { seq: job, source }),
            None => Ok(None),
        }
    }

    /// The jobs that carry this image_id, oldest first (through the by_image index).
    pub fn jobs_for_image(&self, image_id: &str) -> Result<Vec<u64>> {
        let mut prefix = image_id.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.by_image.scan_prefix(&prefix) {
            let (k, _) = item?;
            out.push(key_seq(&k[prefix.len()..]));
        }
        Ok(out)
    }

    /// Stores a job's folded state (the projection). Not flushed on its own: it is derived, and
    /// made durable by the next event's flush.
    pub fn put_projection(&self, job: &Job) -> Result<()> {
        let bytes = serde_json::to_vec(job).map_err(JournalError::Encode)?;
        self.jobs.insert(job.id.to_be_bytes(), bytes)?;
        Ok(())
    }

    /// The stored projection of one job.
    pub fn projection(&self, job: u64) -> Result<Option<Job>> {
        match self.jobs.get(job.to_be_bytes())? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|source| JournalError::Corrupt { seq: job, source }),
            None => Ok(None),
        }
    }

    /// Every stored projection.
    pub fn projections(&self) -> Result<Jobs> {
        let mut out = Jobs::new();
        for item in self.jobs.iter() {
            let (k, v) = item?;
            let id = key_seq(&k);
            let job: Job = serde_json::from_slice(&v)
                .map_err(|source| JournalError::Corrupt { seq: id, source })?;
            out.insert(id, job);
        }
        Ok(out)
    }

    /// Rewrites the projections that differ from `jobs` (and drops the ones not in it);
    /// returns how many were rewritten.
    pub fn repair_projections(&self, jobs: &Jobs) -> Result<usize> {
        let stored = self.projections()?;
        let mut fixed = 0;
        for (id, job) in jobs {
            if stored.get(id) != Some(job) {
                self.put_projection(job)?;
                fixed += 1;
            }
        }
        for id in stored.keys().filter(|id| !jobs.contains_key(id)) {
            self.jobs.remove(id.to_be_bytes())?;
            fixed += 1;
        }
        if fixed > 0 {
            self.db.flush()?;
        }
        Ok(fixed)
    }

    /// The seq the next event will get.
    pub fn next_seq(&self) -> u64 {
        *self.next_seq.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Folds the whole log from empty.
    pub fn fold_all(&self) -> Result<Jobs> {
        Ok(self.fold_jobs(None)?.0)
    }

    /// Folds the events below seq `until` (all: None) from empty; returns the jobs and how many
    /// events were read. Jobs are independent, so the work is split by job id over the cores:
    /// each thread reads the log and fully decodes only its own jobs' events (the job id is
    /// taken from the front of the stored JSON, where the encoder puts it).
    pub fn fold_jobs(&self, until: Option<u64>) -> Result<(Jobs, u64)> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 4) as u64;
        let end = until.unwrap_or(u64::MAX);
        let part = |me: u64| -> Result<(Jobs, u64)> {
            let mut jobs = Jobs::new();
            let mut n = 0;
            for item in self.events.range(0u64.to_be_bytes()..end.to_be_bytes()) {
                let (k, v) = item?;
                n += 1;
                let job = match quick_job(&v) {
                    Some(job) => job,
                    None => decode_view(&k, &v)?.job,
                };
                if job % threads != me {
                    continue;
                }
                fold::apply(&mut jobs, &decode_view(&k, &v)?);
            }
            Ok((jobs, n))
        };
        if threads == 1 {
            return part(0);
        }
        let parts: Vec<Result<(Jobs, u64)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|me| s.spawn(move || part(me))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Ok((Jobs::new(), 0))))
                .collect()
        });
        let mut all = Jobs::new();
        let mut n = 0;
        for p in parts {
            let (mut jobs, count) = p?;
            all.append(&mut jobs);
            n = count;
        }
        Ok((all, n))
    }

    /// Calls `f` with each stored event from seq `since` up to (not including) `until`, read
    /// in its stored form without building the typed event (the fast path of replay). Returns
    /// how many it read.
    pub fn fold_range(
        &self,
        since: u64,
        until: Option<u64>,
        mut f: impl FnMut(&fold::EventView<'_>),
    ) -> Result<u64> {
        let mut n = 0;
        let end = until.unwrap_or(u64::MAX);
        for item in self.events.range(since.to_be_bytes()..end.to_be_bytes()) {
            let (k, v) = item?;
            let view: fold::EventView<'_> =
                serde_json::from_slice(&v).map_err(|source| JournalError::Corrupt {
                    seq: key_seq(&k),
                    source,
                })?;
            f(&view);
            n += 1;
        }
        Ok(n)
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

fn job_seq_key(job: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&job.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn image_key(image_id: &str, job: u64) -> Vec<u8> {
    let mut k = image_id.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&job.to_be_bytes());
    k
}

/// The image_id an event ties its job to, for the by_image index.
fn image_id_of(kind: &EventKind) -> Option<&str> {
    match kind {
        EventKind::Queued { image_id, .. } => Some(image_id),
        EventKind::Invalid { image_id, .. } => image_id.as_deref(),
        _ => None,
    }
}

/// The job id from the front of a stored event (`{"seq":N,"ts":"...","job":M,...`), without
/// decoding the rest; None when it is not where the encoder puts it.
fn quick_job(v: &[u8]) -> Option<u64> {
    let head = &v[..v.len().min(96)];
    let at = head.windows(6).position(|w| w == b"\"job\":")? + 6;
    let digits = head[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&head[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

fn decode_view<'a>(k: &[u8], v: &'a [u8]) -> Result<fold::EventView<'a>> {
    serde_json::from_slice(v).map_err(|source| JournalError::Corrupt {
        seq: key_seq(k),
        source,
    })
}

fn key_seq(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = k.len().min(8);
    b[8 - n..].copy_from_slice(&k[k.len() - n..]);
    u64::from_be_bytes(b)
}

fn decode(seq: u64, bytes: &[u8]) -> Result<Event> {
    serde_json::from_slice(bytes).map_err(|source| JournalError::Corrupt { seq, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_reopen_and_lock() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            let a = j
                .append(
                    None,
                    EventKind::Rejected {
                        file: "x".into(),
                        reason: "empty file".into(),
                    },
                )
                .unwrap();
            assert_eq!((a.seq, a.job), (1, 1));
            let b = j
                .append(Some(1), EventKind::Cancelled { reason: "r".into() })
                .unwrap();
            assert_eq!((b.seq, b.job), (2, 1));
            assert!(matches!(
                Journal::open(dir.path()),
                Err(JournalError::Locked(_))
            ));
        }
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.next_seq(), 3);
        let all: Vec<Event> = j.since(0).collect::<Result<_>>().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(j.get(2).unwrap().unwrap().kind.name(), "cancelled");
        assert_eq!(j.fold_all().unwrap()[&1].state, State::Rejected);
        let batch = j
            .append_batch(
                (0..3)
                    .map(|i| {
                        (
                            None,
                            EventKind::Rejected {
                                file: format!("f{i}"),
                                reason: "r".into(),
                            },
                        )
                    })
                    .collect(),
            )
            .unwrap();
        assert_eq!(
            batch.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        let jobs = j.fold_all().unwrap();
        assert_eq!(j.repair_projections(&jobs).unwrap(), 4);
        assert_eq!(j.projections().unwrap(), jobs);
        assert_eq!(j.repair_projections(&jobs).unwrap(), 0);
        let seqs: Vec<u64> = j.job_events(1).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2]);
    }

    #[test]
    fn image_index() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let inv = |id: &str| EventKind::Invalid {
            image_id: Some(id.into()),
            error: "e".into(),
            input: serde_json::json!({}),
        };
        j.append(None, inv("a")).unwrap();
        j.append(None, inv("ab")).unwrap();
        j.append(None, inv("a")).unwrap();
        assert_eq!(j.jobs_for_image("a").unwrap(), vec![1, 3]);
        assert_eq!(j.jobs_for_image("ab").unwrap(), vec![2]);
        assert!(j.jobs_for_image("b").unwrap().is_empty());
    }
}
