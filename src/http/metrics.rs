//! The numbers `/metrics` serves, kept in memory: seeded once from the jobs in the log when
//! the daemon starts (before it records anything), then changed by every recorded event (an
//! [`Observer`] of the store). A scrape reads only these numbers, never the log, so it costs
//! the same at any log size.
//!
//! Invariant: `build_image_jobs{state}` is the number of jobs whose folded state is `state`:
//! each event moves its job from the state before it to the state after it.
//!
//! The families, their names and help texts are [`Metrics::families`]; how they are written
//! (the classic text format or OpenMetrics) is [`super::exposition`].

use super::exposition::{Data, Family, Format, Number, encode};
use crate::domain::{Event, EventKind, Failure, Job, State};
use crate::engine::store::{Change, Observer, lock};
use crate::journal::{Journal, JournalError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// The buckets of `build_image_build_duration_seconds`: 10 s to 4 h (mic builds take minutes).
pub const DURATION_BUCKETS: [f64; 11] = [
    10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

/// The buckets of `build_image_guest_boot_seconds`: 1 s to 10 min.
pub const BOOT_BUCKETS: [f64; 9] = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 600.0];

/// Observations of a histogram: the count at or below each bucket's bound (not cumulative
/// here), the sum and the count.
struct Durations {
    bounds: &'static [f64],
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Durations {
    fn new(bounds: &'static [f64]) -> Durations {
        Durations {
            bounds,
            buckets: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, secs: f64) {
        if let Some(i) = self.bounds.iter().position(|le| secs <= *le) {
            self.buckets[i] += 1;
        }
        self.sum += secs;
        self.count += 1;
    }

    /// The histogram's data: cumulative buckets, the sum and the count.
    fn data(&self) -> Data {
        let mut below = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&self.buckets)
            .map(|(le, n)| {
                below += n;
                (*le, below)
            })
            .collect();
        Data::Histogram {
            buckets,
            sum: self.sum,
            count: self.count,
        }
    }
}

/// The `failure` label of a build's end: its class, `none` for a success, `unknown` for a
/// failure recorded before classes.
fn failure_label(result: bool, failure: Option<Failure>) -> &'static str {
    match (result, failure) {
        (true, _) => "none",
        (false, Some(f)) => f.as_str(),
        (false, None) => "unknown",
    }
}

pub struct Metrics {
    /// Builds that ran to their end, by (result, failure class).
    builds: Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>,
    durations: Mutex<Durations>,
    /// KVM: seconds from a build's guest start to its ssh answering.
    boots: Mutex<Durations>,
    /// What builds left on the host and could not free, by job (`leaked` not yet
    /// `leak_freed`).
    leaks: Mutex<std::collections::HashSet<(u64, String)>>,
    /// The bytes of each built job's images that have not expired.
    artifacts: Mutex<HashMap<u64, u64>>,
    /// Images expired (`expired` events).
    expired: AtomicU64,
    push_failures: AtomicU64,
    last_seq: AtomicU64,
    /// When each job now queued entered the queue.
    queued: Mutex<HashMap<u64, SystemTime>>,
    /// Jobs per state (`build_image_jobs`, and the status page's filter counts).
    counts: [AtomicI64; State::ALL.len()],
    /// While `seed` counts the jobs (None once it is done).
    seeding: Mutex<Option<Seeding>>,
    cancel: std::sync::atomic::AtomicBool,
    /// Jobs events touched while `seed` counted: before it reached them, and after.
    touched_while_counting: (AtomicU64, AtomicU64),
}

/// What `seed` needs to know about the events recorded while it counts.
#[derive(Default)]
struct Seeding {
    /// The highest job id counted so far.
    cursor: u64,
    /// The jobs events touched since the start.
    touched: HashMap<u64, Touched>,
    /// The log was reloaded meanwhile: count again at the end.
    reload: bool,
}

struct Touched {
    /// Its state before its first event since the start (None: opened since).
    first_before: Option<State>,
    /// `seed` had counted it (in `first_before`) before its first event.
    counted: bool,
    current: State,
}

fn state_index(s: State) -> usize {
    State::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

fn ts(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(s).ok()
}

impl Metrics {
    /// Empty metrics: every family at 0.
    pub fn new() -> Metrics {
        Metrics {
            builds: Mutex::new(
                std::iter::once(("success", "none"))
                    .chain(Failure::ALL.iter().map(|f| ("failure", f.as_str())))
                    .map(|k| (k, 0))
                    .collect(),
            ),
            durations: Mutex::new(Durations::new(&DURATION_BUCKETS)),
            boots: Mutex::new(Durations::new(&BOOT_BUCKETS)),
            leaks: Mutex::new(std::collections::HashSet::new()),
            artifacts: Mutex::new(HashMap::new()),
            expired: AtomicU64::new(0),
            push_failures: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
            queued: Mutex::new(HashMap::new()),
            counts: std::array::from_fn(|_| AtomicI64::new(0)),
            seeding: Mutex::new(Some(Seeding::default())),
            cancel: std::sync::atomic::AtomicBool::new(false),
            touched_while_counting: (AtomicU64::new(0), AtomicU64::new(0)),
        }
    }

    /// Metrics that count from zero: no log to count (tests).
    pub fn counting_from_zero() -> Metrics {
        let m = Metrics::new();
        *lock(&m.seeding) = None;
        m
    }

    /// Counts the log's jobs, folding them one by one by number through the job index (1 to
    /// the highest number at the start; a job opened since is counted by its events) while the daemon runs and records: run it on a
    /// thread of its own after [`Metrics::new`] was made the store's observer; `cancel` ends
    /// it early. Until it is done, `/metrics` answers 503 and the state counts are unknown.
    ///
    /// Exact for the jobs per state: a job an event touches before the count reaches it is
    /// counted in the state the events left it in; one touched after it was counted is moved
    /// from its counted state (the state before its first event since the start) to its
    /// current one. The counters start from each counted job's last build and failed final
    /// pushes (a retried job's earlier builds, failed BUILDING pushes and the history of jobs
    /// touched before they were counted are not in the projections); every event after the
    /// start is counted exactly.
    pub fn seed(&self, journal: &Journal) -> Result<(), JournalError> {
        let started = std::time::Instant::now();
        let top = journal.last_seq();
        let last_job = journal.last_job();
        let mut counts = [0i64; State::ALL.len()];
        let mut queued = Vec::new();
        let mut jobs = 0u64;
        for id in 1..=last_job {
            if id % 4096 == 0 && self.cancel.load(Ordering::SeqCst) {
                return Ok(());
            }
            let Some(job) = journal.projection(id)? else {
                continue;
            };
            let mut seeding = lock(&self.seeding);
            let Some(sd) = seeding.as_mut() else {
                return Ok(());
            };
            sd.cursor = id;
            if !job.leaks.is_empty() {
                let mut leaks = lock(&self.leaks);
                leaks.extend(job.leaks.iter().map(|l| (id, l.what.clone())));
            }
            match (job.result, job.expired.is_some(), job.urls.artifact_bytes) {
                (Some(true), false, Some(b)) => lock(&self.artifacts).insert(id, b),
                _ => lock(&self.artifacts).remove(&id),
            };
            if sd.touched.contains_key(&id) {
                continue; // its events since the start say where it is
            }
            if job.expired.is_some() {
                self.expired.fetch_add(1, Ordering::SeqCst);
            }
            drop(seeding);
            jobs += 1;
            counts[state_index(job.state)] += 1;
            if job.state == State::Queued {
                queued.push(job.id);
            }
            if let (Some(result), Some(start), Some(end)) =
                (job.result, &job.started_at, &job.finished_at)
                && job.was_built()
                && matches!(job.state, State::Finished | State::Done | State::Error)
            {
                self.build_ended(result, job.failure, start, end);
            }
            let failed_pushes = job
                .final_push_attempts
                .saturating_sub(u32::from(job.final_pushed));
            self.push_failures
                .fetch_add(failed_pushes.into(), Ordering::SeqCst);
        }
        // When each job queued at the start entered the queue (a few: the open jobs).
        let mut since = Vec::new();
        for id in queued {
            if let Some(job) = journal.projection(id)? {
                since.push((id, queued_since(journal, &job)?));
            }
        }
        let mut seeding = lock(&self.seeding);
        let Some(sd) = seeding.take() else {
            return Ok(());
        };
        for t in sd.touched.values() {
            if let (true, Some(b)) = (t.counted, t.first_before) {
                counts[state_index(b)] -= 1;
                self.touched_while_counting.1.fetch_add(1, Ordering::SeqCst);
            } else {
                self.touched_while_counting.0.fetch_add(1, Ordering::SeqCst);
            }
            counts[state_index(t.current)] += 1;
        }
        {
            let mut q = lock(&self.queued);
            for (id, at) in since {
                if !sd.touched.contains_key(&id) {
                    q.insert(id, at);
                }
            }
        }
        self.set_counts(&counts);
        self.last_seq.fetch_max(top, Ordering::SeqCst);
        drop(seeding);
        log::info!(
            "metrics: {jobs} job(s) counted from their projections in {:?}",
            started.elapsed()
        );
        if sd.reload {
            self.reloaded(journal);
        }
        Ok(())
    }

    /// Ends a `seed` under way.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Have the jobs been counted (`seed` is done)?
    pub fn counted(&self) -> bool {
        lock(&self.seeding).is_none()
    }

    fn set_counts(&self, counts: &[i64; State::ALL.len()]) {
        for (i, n) in counts.iter().enumerate() {
            self.counts[i].store(*n, Ordering::SeqCst);
        }
    }

    /// Counts every job again from the projections (after a log repair), at once.
    fn recount(&self, journal: &Journal) -> Result<(), JournalError> {
        let mut counts = [0i64; State::ALL.len()];
        let mut queued = HashMap::new();
        for job in journal.projections()?.values() {
            counts[state_index(job.state)] += 1;
            if job.state == State::Queued {
                queued.insert(job.id, queued_since(journal, job)?);
            }
        }
        self.set_counts(&counts);
        *lock(&self.queued) = queued;
        Ok(())
    }

    fn build_ended(&self, result: bool, failure: Option<Failure>, started: &str, finished: &str) {
        let label = (
            if result { "success" } else { "failure" },
            failure_label(result, failure),
        );
        *lock(&self.builds).entry(label).or_insert(0) += 1;
        if let (Some(a), Some(b)) = (ts(started), ts(finished)) {
            let secs = b.duration_since(a).unwrap_or(Duration::ZERO).as_secs_f64();
            lock(&self.durations).observe(secs);
        }
    }

    fn move_job(&self, before: Option<State>, after: State) {
        if before == Some(after) {
            return;
        }
        if let Some(b) = before {
            self.counts[state_index(b)].fetch_sub(1, Ordering::SeqCst);
        }
        self.counts[state_index(after)].fetch_add(1, Ordering::SeqCst);
    }

    /// Jobs per state now (what the gauges say), in `State::ALL` order; None until counted.
    pub fn job_counts(&self) -> Option<Vec<(State, i64)>> {
        if !self.counted() {
            return None;
        }
        let counts = State::ALL
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, self.counts[i].load(Ordering::SeqCst)))
            .collect();
        Some(counts)
    }

    /// The families at `now`, in the order they are served; `log_writable` says whether the
    /// log takes writes. None while the jobs are still being counted.
    pub fn families(&self, now: SystemTime, log_writable: bool) -> Option<Vec<Family>> {
        if !self.counted() {
            return None;
        }
        let oldest = lock(&self.queued).values().min().copied();
        let age = oldest.map_or(0.0, |t| {
            now.duration_since(t)
                .unwrap_or(Duration::ZERO)
                .as_secs_f64()
        });
        let durations = lock(&self.durations).data();
        let boots = lock(&self.boots).data();
        let builds = lock(&self.builds)
            .iter()
            .map(|((r, f), n)| {
                (
                    vec![("result", r.to_string()), ("failure", f.to_string())],
                    *n,
                )
            })
            .collect();
        let leaked = lock(&self.leaks).len();
        let artifact_bytes: u64 = lock(&self.artifacts).values().sum();
        let load = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let int = |n: u64| Number::Int(i64::try_from(n).unwrap_or(i64::MAX));
        Some(vec![
            Family {
                name: "build_image_jobs",
                help: "Jobs in each state (claimed, queued, building, interrupted, finished, done, error, rejected, moved)",
                data: Data::Gauge(
                    State::ALL
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            let n = self.counts[i].load(Ordering::SeqCst);
                            (vec![("state", s.as_str().to_string())], Number::Int(n))
                        })
                        .collect(),
                ),
            },
            Family {
                name: "build_image_builds",
                help: "Builds that ran to their end, by result and, for a failure, its class (image: mic or the kickstart failed; infrastructure: timeout, stall, guest boot, ssh, disk, killed; cancelled; unknown: recorded before classes)",
                data: Data::Counter(builds),
            },
            Family {
                name: "build_image_build_duration_seconds",
                help: "Duration of the builds that ran to their end, from started to finished",
                data: durations,
            },
            Family {
                name: "build_image_guest_boot_seconds",
                help: "KVM: seconds from a build's guest start to its ssh answering",
                data: boots,
            },
            Family {
                name: "build_image_push_failures",
                help: "Runs of the push utility that failed (exit status, timeout, or could not start)",
                data: Data::Counter(vec![(vec![], load(&self.push_failures))]),
            },
            Family {
                name: "build_image_oldest_queued_age_seconds",
                help: "How long the job queued longest has been waiting for a build slot (0: none queued)",
                data: Data::Gauge(vec![(vec![], Number::Float(age))]),
            },
            Family {
                name: "build_image_last_event_seq",
                help: "The seq of the last event recorded in the log",
                data: Data::Gauge(vec![(vec![], int(load(&self.last_seq)))]),
            },
            Family {
                name: "build_image_log_writable",
                help: "1 while the event log takes writes, 0 while it cannot (disk full, write errors): nothing is claimed then",
                data: Data::Gauge(vec![(vec![], Number::Int(i64::from(log_writable)))]),
            },
            Family {
                name: "build_image_artifact_bytes",
                help: "Bytes of the built images this worker keeps (the files each build's SHA256SUMS lists), not expired",
                data: Data::Gauge(vec![(vec![], int(artifact_bytes))]),
            },
            Family {
                name: "build_image_expired",
                help: "Images expired by the retention policy or the disk budget (expired events)",
                data: Data::Counter(vec![(vec![], load(&self.expired))]),
            },
            Family {
                name: "build_image_leaked_resources",
                help: "What builds left on the host and could not free (a mount held busy, a loop device in use, a process that survived), until a later pass frees it",
                data: Data::Gauge(vec![(
                    vec![],
                    Number::Int(i64::try_from(leaked).unwrap_or(i64::MAX)),
                )]),
            },
        ])
    }

    /// The exposition at `now` in `format`; None while the jobs are still being counted.
    pub fn render(&self, now: SystemTime, log_writable: bool, format: Format) -> Option<String> {
        self.families(now, log_writable).map(|f| encode(&f, format))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Makes new metrics the store's observer (from now on every recorded event is counted) and
/// counts the log's jobs ([`Metrics::seed`]) on a thread of its own, so a start does not wait
/// for a read of every job.
pub fn start_counting(
    store: &crate::engine::store::Store,
) -> std::io::Result<(Arc<Metrics>, Seeder)> {
    let journal = store.journal().map_err(std::io::Error::other)?;
    let metrics = Arc::new(Metrics::new());
    store.set_observer(Arc::clone(&metrics) as Arc<dyn Observer>);
    let m = Arc::clone(&metrics);
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            if let Err(e) = m.seed(&journal) {
                log::error!("metrics: cannot count the jobs of the log: {e}");
            }
        })?;
    Ok((
        Arc::clone(&metrics),
        Seeder {
            metrics,
            thread: Some(thread),
        },
    ))
}

/// The thread counting the log's jobs: ended and joined when dropped.
pub struct Seeder {
    metrics: Arc<Metrics>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Seeder {
    fn drop(&mut self) {
        self.metrics.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// When a queued job entered the queue: the time of the event that last made it queued.
fn queued_since(journal: &Journal, job: &Job) -> Result<SystemTime, JournalError> {
    let mut folded = Job::default();
    let mut since = None;
    for ev in journal.job_events(job.id)? {
        let before = folded.state;
        folded.apply_event(&ev);
        if folded.state == State::Queued && (before != State::Queued || since.is_none()) {
            since = ts(&ev.ts);
        }
    }
    Ok(since.unwrap_or_else(SystemTime::now))
}

impl Observer for Metrics {
    fn recorded(&self, ev: &Event, c: &Change) {
        self.last_seq.fetch_max(ev.seq, Ordering::SeqCst);
        {
            let mut seeding = lock(&self.seeding);
            match seeding.as_mut() {
                Some(sd) => {
                    let cursor = sd.cursor;
                    sd.touched
                        .entry(ev.job)
                        .and_modify(|t| t.current = c.after)
                        .or_insert(Touched {
                            first_before: c.before,
                            counted: c.before.is_some() && ev.job <= cursor,
                            current: c.after,
                        });
                }
                None => self.move_job(c.before, c.after),
            }
        }
        match &ev.kind {
            EventKind::Finished {
                result,
                failure,
                boot_seconds,
                ..
            } if c.before == Some(State::Building) => {
                if let Some(b) = boot_seconds {
                    lock(&self.boots).observe(*b);
                }
                if let Some(start) = &c.started_at {
                    self.build_ended(*result, *failure, start, &ev.ts);
                }
            }
            EventKind::Pushed { ok: false, .. } => {
                self.push_failures.fetch_add(1, Ordering::SeqCst);
            }
            EventKind::Leaked { what, .. } => {
                lock(&self.leaks).insert((ev.job, what.clone()));
            }
            EventKind::LeakFreed { what } => {
                lock(&self.leaks).remove(&(ev.job, what.clone()));
            }
            EventKind::Expired { .. } => {
                lock(&self.artifacts).remove(&ev.job);
                self.expired.fetch_add(1, Ordering::SeqCst);
            }
            EventKind::Requeued { file: None, .. } => {
                lock(&self.artifacts).remove(&ev.job);
            }
            _ => {}
        }
        if let EventKind::Finished {
            result: true, urls, ..
        } = &ev.kind
            && let Some(b) = urls.artifact_bytes
        {
            lock(&self.artifacts).insert(ev.job, b);
        }
        if c.after == State::Queued && c.before != Some(State::Queued) {
            let at = ts(&ev.ts).unwrap_or_else(SystemTime::now);
            lock(&self.queued).insert(ev.job, at);
        } else if c.after != State::Queued && c.before == Some(State::Queued) {
            lock(&self.queued).remove(&ev.job);
        }
    }

    fn recorded_farm(&self, ev: &Event) {
        self.last_seq.fetch_max(ev.seq, Ordering::SeqCst);
    }

    fn reloaded(&self, journal: &Journal) {
        // Events observed but not in the log (an append that failed, events lost with an
        // unflushed tail) are forgotten: count the jobs again. (Counters keep what they
        // counted: a counter never goes down.)
        if let Some(sd) = lock(&self.seeding).as_mut() {
            sd.reload = true;
            return;
        }
        if let Err(e) = self.recount(journal) {
            log::warn!("metrics: cannot count the jobs again: {e}");
        }
        self.last_seq.store(journal.last_seq(), Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(before: Option<State>, after: State) -> Change {
        Change {
            before,
            after,
            started_at: Some("2026-11-24T00:00:00Z".into()),
        }
    }

    fn ev(seq: u64, kind: EventKind) -> Event {
        Event {
            seq,
            ts: "2026-11-24T00:01:30Z".into(),
            job: 1,
            kind,
        }
    }

    /// Counting the jobs while events are recorded gives the same counts as the projections
    /// afterwards: jobs touched before the count reached them, after it, and opened meanwhile.
    #[test]
    fn counting_while_events_are_recorded_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let policy = crate::domain::lifecycle::Policy {
            push: false,
            push_retries: 0,
            max_attempts: 2,
        };
        let store = Arc::new(
            crate::engine::store::Store::open(dir.path(), 8 << 20, policy, Duration::ZERO).unwrap(),
        );
        let reject = |i: u64| {
            (
                None,
                EventKind::Rejected {
                    file: format!("f{i}"),
                    reason: "empty file".into(),
                },
            )
        };
        for batch in 0..16 {
            store
                .record_batch((0..1000).map(|i| reject(batch * 1000 + i)).collect())
                .unwrap();
        }
        let (m, seeder) = start_counting(&store).unwrap();
        // While it counts: move every 7th old job (some before the count reaches them, some
        // after), and open new ones.
        // Old jobs from the end first: the count (from id 1 up) meets them.
        for id in (1..=16_000).rev().step_by(7) {
            store
                .append(vec![(
                    Some(id),
                    EventKind::Requeued {
                        reason: "moved".into(),
                        file: Some(format!("f{id}")),
                        from_worker: Some("w0".into()),
                    },
                )])
                .unwrap();
            if id % 70 == 0 {
                store.append(vec![reject(100_000 + id)]).unwrap();
            }
        }
        store.sync().unwrap();
        assert!(crate::wait::wait_for(Duration::from_secs(60), || m.counted()));
        drop(seeder);
        let jobs = store.journal().unwrap().projections().unwrap();
        let mut want: HashMap<State, i64> = HashMap::new();
        for j in jobs.values() {
            *want.entry(j.state).or_default() += 1;
        }
        for (s, n) in m.job_counts().unwrap() {
            assert_eq!(n, want.get(&s).copied().unwrap_or(0), "{s}");
        }
        assert_eq!(want[&State::Moved], 2286);
        let (before, after) = &m.touched_while_counting;
        eprintln!(
            "touched before the count reached them: {}, after: {}",
            before.load(Ordering::SeqCst),
            after.load(Ordering::SeqCst)
        );
        let text = m
            .render(SystemTime::now(), true, Format::OpenMetrics)
            .unwrap();
        let last = store.journal().unwrap().last_seq();
        assert_eq!(
            line(&text, "build_image_last_event_seq"),
            Some(last.to_string().as_str())
        );
    }

    #[test]
    fn an_event_of_no_job_moves_only_the_last_seq() {
        let dir = tempfile::tempdir().unwrap();
        let policy = crate::config::Config::default().policy();
        let store =
            crate::engine::store::Store::open(dir.path(), 8 << 20, policy, Duration::ZERO).unwrap();
        let (m, seeder) = start_counting(&store).unwrap();
        assert!(crate::wait::wait_for(Duration::from_secs(60), || m.counted()));
        drop(seeder);
        store
            .record(
                Some(crate::domain::FARM),
                EventKind::Drained { reason: "r".into() },
            )
            .unwrap();
        let text = m
            .render(SystemTime::now(), true, Format::OpenMetrics)
            .unwrap();
        assert_eq!(line(&text, "build_image_last_event_seq"), Some("1"));
        assert!(
            m.job_counts().unwrap().iter().all(|(_, n)| *n == 0),
            "{text}"
        );
    }

    fn line<'a>(text: &'a str, name: &str) -> Option<&'a str> {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
    }

    #[test]
    fn events_move_jobs_and_count_builds() {
        let m = Metrics::counting_from_zero();
        let finished = EventKind::Finished {
            result: true,
            error: None,
            urls: Default::default(),
            failure: None,
            boot_seconds: None,
        };
        let failed_push = EventKind::Pushed {
            status: crate::domain::Status::Done,
            exit: Some(1),
            ok: false,
            error: None,
        };
        let cancel = EventKind::Cancelled { reason: "x".into() };
        m.recorded(&ev(1, cancel), &change(None, State::Queued));
        m.recorded(
            &ev(2, finished.clone()),
            &change(Some(State::Building), State::Finished),
        );
        m.recorded(&ev(3, failed_push), &change(Some(State::Done), State::Done));
        let text = m
            .render(SystemTime::now(), true, Format::OpenMetrics)
            .unwrap();
        assert_eq!(
            line(&text, "build_image_jobs{state=\"finished\"}"),
            Some("1")
        );
        assert_eq!(line(&text, "build_image_jobs{state=\"queued\"}"), Some("1"));
        assert_eq!(
            line(
                &text,
                "build_image_builds_total{result=\"success\",failure=\"none\"}"
            ),
            Some("1")
        );
        for f in ["image", "infrastructure", "cancelled"] {
            assert_eq!(
                line(
                    &text,
                    &format!("build_image_builds_total{{result=\"failure\",failure=\"{f}\"}}")
                ),
                Some("0")
            );
        }
        assert_eq!(line(&text, "build_image_push_failures_total"), Some("1"));
        assert_eq!(line(&text, "build_image_last_event_seq"), Some("3"));
        assert_eq!(
            line(&text, "build_image_build_duration_seconds_sum"),
            Some("90.0")
        );
        assert_eq!(
            line(
                &text,
                "build_image_build_duration_seconds_bucket{le=\"120.0\"}"
            ),
            Some("1")
        );
        assert_eq!(
            line(
                &text,
                "build_image_build_duration_seconds_bucket{le=\"60.0\"}"
            ),
            Some("0")
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        // the queued job's age is counted from its queued event
        let age: f64 = line(&text, "build_image_oldest_queued_age_seconds")
            .unwrap()
            .parse()
            .unwrap();
        assert!(age > 0.0, "{age}");
        // a finished event that did not end a running build (cancel before the build) is no build
        m.recorded(
            &ev(4, finished),
            &change(Some(State::Queued), State::Finished),
        );
        let text = m
            .render(SystemTime::now(), false, Format::OpenMetrics)
            .unwrap();
        assert_eq!(
            line(
                &text,
                "build_image_builds_total{result=\"success\",failure=\"none\"}"
            ),
            Some("1")
        );
        assert_eq!(line(&text, "build_image_jobs{state=\"queued\"}"), Some("0"));
        assert_eq!(
            line(&text, "build_image_oldest_queued_age_seconds"),
            Some("0.0")
        );
        assert_eq!(line(&text, "build_image_log_writable"), Some("0"));
        assert_eq!(
            m.job_counts()
                .unwrap()
                .iter()
                .find(|(s, _)| *s == State::Finished)
                .map(|c| c.1),
            Some(2)
        );
    }
}
