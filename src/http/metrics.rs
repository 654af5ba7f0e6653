//! The numbers `/metrics` serves, kept in memory: seeded once from the stored projections when
//! the daemon starts (before it records anything), then changed by every recorded event (an
//! [`Observer`] of the store). A scrape reads only these numbers, never the log, so it costs
//! the same at any log size.
//!
//! Invariant: `build_image_jobs{state}` is the number of jobs whose folded state is `state`:
//! each event moves its job from the state before it to the state after it.

use crate::journal::{Event, EventKind, Job, Journal, JournalError, State};
use crate::store::{Change, Observer, lock};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// The buckets of `build_image_build_duration_seconds`: 10 s to 4 h (mic builds take minutes).
pub const DURATION_BUCKETS: [f64; 11] = [
    10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

/// The content type of the exposition (OpenMetrics text, which Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    jobs: Family<StateLabel, Gauge>,
    builds: Family<ResultLabel, Counter>,
    duration: Histogram,
    push_failures: Counter,
    oldest_queued: Gauge<f64, AtomicU64>,
    last_seq_gauge: Gauge,
    log_writable: Gauge,
    last_seq: AtomicU64,
    /// When each job now queued entered the queue.
    queued: Mutex<HashMap<u64, SystemTime>>,
    /// One scrape at a time (the gauges computed at scrape time are set, then encoded).
    scrape: Mutex<()>,
    /// Jobs counted per state, kept beside the gauges for the status page's filter counts.
    counts: [AtomicI64; State::ALL.len()],
}

fn state_index(s: State) -> usize {
    State::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

fn ts(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(s).ok()
}

impl Metrics {
    /// Empty metrics, every family registered (every state present, at 0).
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("build_image");
        let jobs = Family::<StateLabel, Gauge>::default();
        let builds = Family::<ResultLabel, Counter>::default();
        let duration = Histogram::new(DURATION_BUCKETS);
        let push_failures = Counter::default();
        let oldest_queued = Gauge::<f64, AtomicU64>::default();
        let last_seq_gauge = Gauge::default();
        let log_writable = Gauge::default();
        registry.register(
            "jobs",
            "Jobs in each state (claimed, queued, building, interrupted, finished, done, error, rejected, moved)",
            jobs.clone(),
        );
        registry.register(
            "builds",
            "Builds that ran to their end, by result (failure: mic failed, timed out, left no image, or was cancelled while running)",
            builds.clone(),
        );
        registry.register(
            "build_duration_seconds",
            "Duration of the builds that ran to their end, from started to finished",
            duration.clone(),
        );
        registry.register(
            "push_failures",
            "Runs of the push utility that failed (exit status, timeout, or could not start)",
            push_failures.clone(),
        );
        registry.register(
            "oldest_queued_age_seconds",
            "How long the job queued longest has been waiting for a build slot (0: none queued)",
            oldest_queued.clone(),
        );
        registry.register(
            "last_event_seq",
            "The seq of the last event recorded in the log",
            last_seq_gauge.clone(),
        );
        registry.register(
            "log_writable",
            "1 while the event log takes writes, 0 while it cannot (disk full, write errors): nothing is claimed then",
            log_writable.clone(),
        );
        for s in State::ALL {
            let _ = jobs.get_or_create(&StateLabel { state: s.as_str() });
        }
        for result in ["success", "failure"] {
            let _ = builds.get_or_create(&ResultLabel { result });
        }
        Metrics {
            registry,
            jobs,
            builds,
            duration,
            push_failures,
            oldest_queued,
            last_seq_gauge,
            log_writable,
            last_seq: AtomicU64::new(0),
            queued: Mutex::new(HashMap::new()),
            scrape: Mutex::new(()),
            counts: std::array::from_fn(|_| AtomicI64::new(0)),
        }
    }

    /// Metrics seeded from the log's stored projections (one read of them, at start): jobs
    /// by state, and, per job that was built, its last build (a retried job's earlier builds
    /// and failed BUILDING pushes are not in the projections, so the counters start below
    /// the log's whole history; they count exactly from then on).
    pub fn seeded(journal: &Journal) -> Result<Metrics, JournalError> {
        let started = std::time::Instant::now();
        let m = Metrics::new();
        let jobs = journal.projections()?;
        for job in jobs.values() {
            if let (Some(result), Some(start), Some(end)) =
                (job.result, &job.started_at, &job.finished_at)
                && job.was_built()
                && matches!(job.state, State::Finished | State::Done | State::Error)
            {
                m.build_ended(result, start, end);
            }
            let failed_pushes = job
                .final_push_attempts
                .saturating_sub(u32::from(job.final_pushed));
            m.push_failures.inc_by(failed_pushes.into());
        }
        m.set_jobs(journal, &jobs)?;
        m.last_seq.fetch_max(journal.last_seq(), Ordering::SeqCst);
        log::info!(
            "metrics counted from the projections of {} job(s) in {:?}",
            jobs.len(),
            started.elapsed()
        );
        Ok(m)
    }

    /// Sets the per-state gauges and the queue from `jobs` (every job of the log).
    fn set_jobs(&self, journal: &Journal, jobs: &crate::journal::Jobs) -> Result<(), JournalError> {
        let mut counts = [0i64; State::ALL.len()];
        let mut queued = HashMap::new();
        for job in jobs.values() {
            counts[state_index(job.state)] += 1;
            if job.state == State::Queued {
                queued.insert(job.id, queued_since(journal, job)?);
            }
        }
        for (i, s) in State::ALL.iter().enumerate() {
            self.counts[i].store(counts[i], Ordering::SeqCst);
            self.jobs
                .get_or_create(&StateLabel { state: s.as_str() })
                .set(counts[i]);
        }
        *lock(&self.queued) = queued;
        Ok(())
    }

    fn build_ended(&self, result: bool, started: &str, finished: &str) {
        let label = ResultLabel {
            result: if result { "success" } else { "failure" },
        };
        self.builds.get_or_create(&label).inc();
        if let (Some(a), Some(b)) = (ts(started), ts(finished)) {
            let secs = b.duration_since(a).unwrap_or(Duration::ZERO).as_secs_f64();
            self.duration.observe(secs);
        }
    }

    fn move_job(&self, before: Option<State>, after: State) {
        if before == Some(after) {
            return;
        }
        if let Some(b) = before {
            self.counts[state_index(b)].fetch_sub(1, Ordering::SeqCst);
            self.jobs
                .get_or_create(&StateLabel { state: b.as_str() })
                .dec();
        }
        self.counts[state_index(after)].fetch_add(1, Ordering::SeqCst);
        self.jobs
            .get_or_create(&StateLabel {
                state: after.as_str(),
            })
            .inc();
    }

    /// Jobs per state now (what the gauges say), in `State::ALL` order.
    pub fn job_counts(&self) -> Vec<(State, i64)> {
        State::ALL
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, self.counts[i].load(Ordering::SeqCst)))
            .collect()
    }

    /// The text exposition, at `now`; `log_writable` says whether the log takes writes.
    pub fn render(&self, now: SystemTime, log_writable: bool) -> String {
        let _one = lock(&self.scrape);
        let oldest = lock(&self.queued).values().min().copied();
        let age = oldest.map_or(0.0, |t| {
            now.duration_since(t)
                .unwrap_or(Duration::ZERO)
                .as_secs_f64()
        });
        self.oldest_queued.set(age);
        self.last_seq_gauge
            .set(i64::try_from(self.last_seq.load(Ordering::SeqCst)).unwrap_or(i64::MAX));
        self.log_writable.set(i64::from(log_writable));
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
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
    fn recorded(&self, events: &[Event], changes: &[Change]) {
        for (ev, c) in events.iter().zip(changes) {
            self.last_seq.fetch_max(ev.seq, Ordering::SeqCst);
            self.move_job(c.before, c.after);
            match &ev.kind {
                EventKind::Finished { result, .. } if c.before == Some(State::Building) => {
                    if let Some(start) = &c.started_at {
                        self.build_ended(*result, start, &ev.ts);
                    }
                }
                EventKind::Pushed { ok: false, .. } => {
                    self.push_failures.inc();
                }
                _ => {}
            }
            if c.after == State::Queued && c.before != Some(State::Queued) {
                let at = ts(&ev.ts).unwrap_or_else(SystemTime::now);
                lock(&self.queued).insert(ev.job, at);
            } else if c.after != State::Queued && c.before == Some(State::Queued) {
                lock(&self.queued).remove(&ev.job);
            }
        }
    }

    fn reloaded(&self, journal: &Journal) {
        // Events appended but not flushed before a write error are gone: count the jobs again.
        // (The counters keep what they counted: a counter never goes down.)
        match journal.projections() {
            Ok(jobs) => {
                if let Err(e) = self.set_jobs(journal, &jobs) {
                    log::warn!("metrics: cannot count the jobs again: {e}");
                }
            }
            Err(e) => log::warn!("metrics: cannot count the jobs again: {e}"),
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

    fn line<'a>(text: &'a str, name: &str) -> Option<&'a str> {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
    }

    #[test]
    fn events_move_jobs_and_count_builds() {
        let m = Metrics::new();
        let finished = EventKind::Finished {
            result: true,
            error: None,
            urls: Default::default(),
        };
        let failed_push = EventKind::Pushed {
            status: crate::journal::Status::Done,
            exit: Some(1),
            ok: false,
            error: None,
        };
        m.recorded(
            &[
                ev(1, EventKind::Cancelled { reason: "x".into() }),
                ev(2, finished.clone()),
                ev(3, failed_push),
            ],
            &[
                change(None, State::Queued),
                change(Some(State::Building), State::Finished),
                change(Some(State::Done), State::Done),
            ],
        );
        let text = m.render(SystemTime::now(), true);
        assert_eq!(
            line(&text, "build_image_jobs{state=\"finished\"}"),
            Some("1")
        );
        assert_eq!(line(&text, "build_image_jobs{state=\"queued\"}"), Some("1"));
        assert_eq!(
            line(&text, "build_image_builds_total{result=\"success\"}"),
            Some("1")
        );
        assert_eq!(
            line(&text, "build_image_builds_total{result=\"failure\"}"),
            Some("0")
        );
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
            &[ev(4, finished)],
            &[change(Some(State::Queued), State::Finished)],
        );
        let text = m.render(SystemTime::now(), false);
        assert_eq!(
            line(&text, "build_image_builds_total{result=\"success\"}"),
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
                .iter()
                .find(|(s, _)| *s == State::Finished)
                .map(|c| c.1),
            Some(2)
        );
    }
}
