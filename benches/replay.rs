//! P4 (docs/PERFORMANCE.md): replay of the event log.
//!
//! - fold from empty: `Journal::fold_all` (and `ops::replay`, which times its own fold) over a
//!   generated log of P4_EVENTS events (default 1,000,000), reported in events/s; compared, in
//!   the same run, with a scan of the same log that decodes every event but folds nothing
//!   (`Journal::since(0)`) and with a raw sled scan of the events tree (no decoding).
//! - `show ID` (`ops::show`) on a log of P4_SHOW_EVENTS events (default 10,000,000), for jobs
//!   spread over the whole log; compared with `show` on the P4_EVENTS log: a ratio near 1 means
//!   the cost does not grow with the log (only that job's events are read).
//!
//! The logs are generated once through the journal's own API (7 events per job: claimed,
//! queued with the Mer SDK kickstart, started, pushed BUILDING, finished, delivered, pushed
//! DONE) and cached under `<target>/bench-data/`. The 10,000,000-event log takes a while to
//! make the first time.
//!
//! Env: P4_EVENTS, P4_SHOW_EVENTS, BENCH_RUNS (default 5), P4_SHOW_CALLS (per run, default 20),
//! P4_CRITERION=0 to skip criterion's own report (the summary lines are printed either way).

mod common;

use build_image::config::Config;
use build_image::edges::spool::Spool;
use build_image::journal::Journal;
use build_image::operate::ops;
use common::{BenchLog, big, env_u64, met, runs, stats};
use criterion::{Criterion, SamplingMode, Throughput};
use std::hint::black_box;
use std::time::{Duration, Instant};

fn main() {
    let fold_events = env_u64("P4_EVENTS", 1_000_000);
    let show_events = env_u64("P4_SHOW_EVENTS", 10_000_000);
    let runs = runs();
    let calls = env_u64("P4_SHOW_CALLS", 20).max(1);

    let small = common::bench_log(fold_events);
    let large = common::bench_log(show_events);
    let cfg = show_config();

    if env_u64("P4_CRITERION", 1) != 0 {
        let mut c = Criterion::default().configure_from_args();
        criterion_benches(&mut c, &small, &large, &cfg);
        c.final_summary();
    }

    // The summary: BENCH_RUNS runs of each measurement, median and min–max.
    let fold = fold_summary(&small, runs);
    let show = show_summary(&small, &large, &cfg, runs, calls);
    println!();
    println!("{fold}");
    println!("{show}");
}

/// The config `show` is given (its URLs are computed from `[worker]`).
fn show_config() -> Config {
    Config {
        worker: common::bench_worker_config(),
        ..Config::default()
    }
}

fn criterion_benches(c: &mut Criterion, small: &BenchLog, large: &BenchLog, cfg: &Config) {
    let secs = env_u64("P4_MEASURE_SECS", 10);
    {
        let journal = small.open();
        let mut g = c.benchmark_group("P4 replay");
        g.sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .measurement_time(Duration::from_secs(secs))
            .throughput(Throughput::Elements(small.events));
        g.bench_function(format!("fold_all {} events", small.events), |b| {
            b.iter(|| black_box(journal.fold_all().expect("fold")).len())
        });
        g.bench_function(format!("decode-only scan {} events", small.events), |b| {
            b.iter(|| {
                journal
                    .since(0)
                    .map(|e| e.expect("decode").seq)
                    .fold(0u64, u64::wrapping_add)
            })
        });
        g.finish();
    }
    {
        let journal = large.open();
        let ids = spread_ids(large, 64);
        let mut i = 0;
        let mut g = c.benchmark_group("P4 show");
        g.sample_size(20)
            .measurement_time(Duration::from_secs(secs.min(5)))
            .throughput(Throughput::Elements(1));
        g.bench_function(format!("show on {} events", large.events), |b| {
            b.iter(|| {
                i = (i + 1) % ids.len();
                black_box(ops::show(&journal, cfg, &ids[i]).expect("show"))
            })
        });
        g.finish();
    }
}

/// image_ids of `n` jobs spread evenly over the log.
fn spread_ids(log: &BenchLog, n: u64) -> Vec<String> {
    (0..n)
        .map(|k| {
            let job = (k * 2 + 1) * log.jobs / (2 * n);
            common::image_id_of(1 + job * common::EVENTS_PER_JOB)
        })
        .collect()
}

/// Seconds of one call.
fn time<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let t = Instant::now();
    let out = f();
    (t.elapsed().as_secs_f64(), out)
}

fn fold_summary(log: &BenchLog, runs: usize) -> String {
    let n = log.events as f64;
    let spool_dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::new(spool_dir.path(), &log.worker);
    spool.create_dirs().expect("spool dirs");
    let (mut open, mut fold, mut decode, mut replay, mut replay_total, mut raw) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        {
            let (t, journal) = time(|| log.open());
            open.push(t);
            let (t, jobs) = time(|| journal.fold_all().expect("fold"));
            assert_eq!(jobs.len() as u64, log.jobs, "the fold saw every job");
            fold.push(t);
            let (t, count) = time(|| {
                journal
                    .since(0)
                    .inspect(|e| assert!(e.is_ok(), "decode"))
                    .count()
            });
            assert_eq!(count as u64, log.events);
            decode.push(t);
            let (t, report) =
                time(|| ops::replay(&journal, &spool, &common::POLICY).expect("replay"));
            assert_eq!(report.events, log.events);
            if !report.disagreements.is_empty() {
                eprintln!(
                    "note: replay found {} disagreement(s), e.g. {}",
                    report.disagreements.len(),
                    report.disagreements[0]
                );
            }
            replay.push(report.seconds);
            replay_total.push(t);
        }
        if let Some(t) = raw_scan(log) {
            raw.push(t);
        }
    }
    let fold_s = stats(&fold);
    let rate = |s: f64| n / s;
    let rates: Vec<f64> = fold.iter().map(|&s| rate(s)).collect();
    let r = stats(&rates);
    let decode_s = stats(&decode);
    let mut line = format!(
        "P4 fold: {} events folded from empty (Journal::fold_all) in {} = {} events/s (min–max \
         {}–{}) over {runs} runs; one-thread decode-only scan (Journal::since) {} ({} events/s); ops::replay fold {} ({} events/s), with its projection \
         and spool checks {}; open {}",
        big(n),
        fold_s.show(3, " s"),
        big(r.median),
        big(r.min),
        big(r.max),
        decode_s.show(3, " s"),
        big(rate(decode_s.median)),
        stats(&replay).show(3, " s"),
        big(rate(stats(&replay).median)),
        stats(&replay_total).show(3, " s"),
        stats(&open).show(3, " s"),
    );
    if !raw.is_empty() {
        let raw_s = stats(&raw);
        line.push_str(&format!(
            "; baseline raw sled scan (no decoding) {} = {} events/s",
            raw_s.show(3, " s"),
            big(rate(raw_s.median))
        ));
        line.push_str(&format!(
            "; ratio fold/raw-scan time {:.2}x",
            fold_s.median / raw_s.median
        ));
    }
    line.push_str(&format!(
        "; ratio to goal {:.2}x; goal >= 1,000,000 events/s: {}",
        r.median / 1e6,
        met(r.median >= 1e6)
    ));
    line
}

/// Seconds to iterate the raw tree of event blocks (keys and values, no decompression, no
/// decoding): the floor any fold of this log pays. None if the tree is not where this bench
/// expects it.
fn raw_scan(log: &BenchLog) -> Option<f64> {
    let db = sled::Config::new()
        .path(log.db())
        .cache_capacity(8 * 1024 * 1024)
        .open()
        .ok()?;
    let tree = db.open_tree("blocks").ok()?;
    let (t, (count, bytes)) = time(|| {
        let mut count = 0u64;
        let mut bytes = 0usize;
        for item in tree.iter() {
            let (_, v) = item.expect("sled scan");
            count += 1;
            bytes += v.len();
        }
        (count, bytes)
    });
    black_box(bytes);
    (count > 0).then_some(t)
}

/// Milliseconds per `show` call over `calls` different jobs spread over the log, per run.
fn show_times(journal: &Journal, log: &BenchLog, cfg: &Config, calls: u64) -> Vec<f64> {
    spread_ids(log, calls)
        .iter()
        .map(|id| {
            let (t, view) = time(|| ops::show(journal, cfg, id).expect("show"));
            assert_eq!(view.events.len() as u64, common::EVENTS_PER_JOB);
            t * 1e3
        })
        .collect()
}

fn show_summary(
    small: &BenchLog,
    large: &BenchLog,
    cfg: &Config,
    runs: usize,
    calls: u64,
) -> String {
    let measure = |log: &BenchLog| {
        let journal = log.open();
        // The very first call after opening the log (sled's cache empty), as a one-shot
        // `build-image show` with no daemon running pays it.
        let (first, _) = time(|| ops::show(&journal, cfg, &log.middle_image_id()).expect("show"));
        let mut per_run = Vec::new();
        let mut all = Vec::new();
        for _ in 0..runs {
            let t = show_times(&journal, log, cfg, calls);
            per_run.push(stats(&t).median);
            all.extend(t);
        }
        (first * 1e3, stats(&per_run), stats(&all))
    };
    let (first_l, run_l, all_l) = measure(large);
    let (first_s, run_s, _) = measure(small);
    format!(
        "P4 show: on {} events (one job: {} events) {} per call (median of {runs} runs of {calls} \
         jobs spread over the log; slowest call {:.3} ms; first call after open {:.3} ms); baseline \
         show on a {}-event log {}, first call {:.3} ms; ratio {:.2}x (1.0 = independent of log \
         size); goal < 10 ms: {}",
        big(large.events as f64),
        common::EVENTS_PER_JOB,
        run_l.show(3, " ms"),
        all_l.max,
        first_l,
        big(small.events as f64),
        run_s.show(3, " ms"),
        first_s,
        run_l.median / run_s.median,
        met(all_l.max < 10.0 && first_l < 10.0),
    )
}
