//! P8 (docs/PERFORMANCE.md): the log's bytes on disk per job, and the fold of a log written the
//! way the daemon writes it.
//!
//! P8_JOBS jobs (default 10,000) are recorded through `Store::record`, two in flight as with two
//! build slots, in the daemon's order and with its flushes (each event that needs one is flushed
//! before the next is recorded; `delivered` and `pushed` ride on the next flush): the same seven
//! events per job as the P4 logs, the input a workitem carrying a kickstart: first the Mer SDK one
//! in every job, then the kickstarts of ../shared in turn, each with a line of its own. Then the
//! store is closed and the bytes its state dir holds on disk (allocated blocks, so a sparse file
//! counts what it uses) are divided by the jobs; the goal is the input's size + 1 KB. The same
//! log is then opened again and folded from empty (`Journal::fold_all`, BENCH_RUNS runs): a log
//! grouped by the daemon's own commits, not by the P4 generator's 10,000-event batches.
//!
//! The log is written under BENCH_DATA_DIR (default `<target>/bench-data`), made anew each run.

mod common;

use build_image::engine::store::Store;
use build_image::journal::Journal;
use common::{big, env_u64, met, runs, stats};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

fn main() {
    let jobs = env_u64("P8_JOBS", 10_000);
    let w = common::bench_worker_config();
    let same = common::kickstart();
    // the kickstarts of ../shared in turn, each with a line of its own per job (so no two
    // inputs are the same)
    let mut all: Vec<String> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/kickstarts"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default();
    if all.is_empty() {
        all.push(same.clone());
    }
    all.sort();
    let variants: [(&str, KickstartFor); 2] = [
        (
            "the same kickstart (Mer SDK) in every job",
            Box::new(|_| same.clone()),
        ),
        (
            "the shared kickstarts in turn, each with a line of its own",
            Box::new(|i| format!("{}\n# build {i}\n", all[i as usize % all.len()])),
        ),
    ];
    for (label, ks_for) in &variants {
        measure(jobs, &w, label, ks_for);
    }
}

/// The kickstart of the job recorded `i`-th.
type KickstartFor<'a> = Box<dyn Fn(u64) -> String + 'a>;

fn measure(
    jobs: u64,
    w: &build_image::config::WorkerConfig,
    label: &str,
    ks_for: &dyn Fn(u64) -> String,
) {
    let dir = common::data_dir().join("p8-log");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench data dir");
    let mut input_total = 0u64;

    let started = Instant::now();
    {
        let store = Store::open(&dir, 8 << 20, common::POLICY, Duration::from_secs(5))
            .expect("open the store");
        let mut next = 0u64;
        while next < jobs {
            let pair: Vec<_> = (0..2.min(jobs - next))
                .map(|k| {
                    let id = store.journal().expect("journal").next_seq() + k;
                    let ks = ks_for(next + k);
                    input_total +=
                        serde_json::to_vec(&common::workitem(&common::image_id_of(id), &ks))
                            .expect("encode")
                            .len() as u64;
                    common::job_lifecycle(id, &common::image_id_of(id), "bench", &ks, w)
                })
                .collect();
            // the claims first (each opens its job: its id is the seq it gets), then each
            // step of both jobs in turn
            let mut ids = Vec::new();
            for life in &pair {
                let ev = store.record(None, life[0].1.clone()).expect("record");
                ids.push(ev.job);
            }
            for step in 1..common::EVENTS_PER_JOB as usize {
                for (life, id) in pair.iter().zip(&ids) {
                    store
                        .record(Some(*id), life[step].1.clone())
                        .expect("record");
                }
            }
            next += pair.len() as u64;
        }
        store.sync().expect("sync");
    }
    let write_s = started.elapsed().as_secs_f64();
    let on_disk = disk_bytes(&dir) as f64;
    let per_job = on_disk / jobs as f64;
    let input_bytes = input_total as f64 / jobs as f64;

    let mut fold = Vec::new();
    let mut events = 0;
    for _ in 0..runs() {
        let journal = Journal::open(&dir).expect("open the log");
        let t = Instant::now();
        let (folded, n) = journal.fold_jobs(None).expect("fold");
        fold.push(t.elapsed().as_secs_f64());
        assert_eq!(folded.len() as u64, jobs, "the fold saw every job");
        events = n;
    }
    let rates: Vec<f64> = fold.iter().map(|s| events as f64 / s).collect();
    let r = stats(&rates);
    println!(
        "P8 log size, {label}: {} jobs ({} events) recorded as the daemon records them in {:.1} s; \
         {} bytes on disk = {} bytes per job; input {} bytes (mean); goal <= input + 1,024 = {}: \
         {} ({:.2}x the goal)",
        big(jobs as f64),
        big(events as f64),
        write_s,
        big(on_disk),
        big(per_job),
        big(input_bytes),
        big(input_bytes + 1024.0),
        met(per_job <= input_bytes + 1024.0),
        per_job / (input_bytes + 1024.0),
    );
    println!(
        "P8 fold of that log: {} events/s (min–max {}–{}) over {} runs",
        big(r.median),
        big(r.min),
        big(r.max),
        fold.len()
    );
}

/// Bytes allocated on disk under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let meta = e.metadata().expect("metadata");
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}
