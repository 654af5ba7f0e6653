//! Shared by the benches: sizes and repetitions from the environment, summary statistics, and
//! the generator of realistic event logs (written through the journal's public API, so they are
//! exactly what the daemon would have written for the same job lifecycles).
#![allow(dead_code)]

use build_image::config::WorkerConfig;
use build_image::domain::event::Delivery;
use build_image::domain::workitem;
use build_image::domain::{Event, EventKind, Mode, Receipt, Status};
use build_image::imaging;
use build_image::journal::Journal;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bumped whenever the generated log changes, so that cached logs are made again.
pub const LOG_FORMAT: u32 = 5;

/// Events per job of the generated logs: claimed, queued, started, pushed BUILDING, finished,
/// delivered, pushed DONE.
pub const EVENTS_PER_JOB: u64 = 7;

/// A number from the environment (`1_000_000` and `1e6` forms accepted), else `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.replace('_', "");
            v.parse::<u64>()
                .ok()
                .or_else(|| v.parse::<f64>().ok().map(|f| f as u64))
                .unwrap_or_else(|| panic!("{name}={v:?} is not a number"))
        }
        Err(_) => default,
    }
}

/// BENCH_RUNS: repetitions of each whole-run measurement (default 5).
pub fn runs() -> usize {
    env_u64("BENCH_RUNS", 5).max(1) as usize
}

/// Median, min and max of some measurements.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn stats(xs: &[f64]) -> Stats {
    assert!(!xs.is_empty(), "no measurement");
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Stats {
        median,
        min: v[0],
        max: v[n - 1],
    }
}

/// The `q` quantile (0..=1) of a sample, nearest rank.
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

impl Stats {
    /// `median (min–max)` with `digits` decimals and a unit.
    pub fn show(&self, digits: usize, unit: &str) -> String {
        format!(
            "{:.*}{unit} ({:.*}–{:.*})",
            digits, self.median, digits, self.min, digits, self.max
        )
    }
}

/// Thousands separators for a count or rate.
pub fn big(x: f64) -> String {
    let s = format!("{:.0}", x);
    let (sign, digits) = s.split_at(if s.starts_with('-') { 1 } else { 0 });
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

pub fn met(ok: bool) -> &'static str {
    if ok { "MET" } else { "MISSED" }
}

/// Where generated data is cached: BENCH_DATA_DIR, else `<target dir>/bench-data` (the bench
/// executable lives in `<target dir>/<profile>/deps/`).
pub fn data_dir() -> PathBuf {
    if let Ok(d) = std::env::var("BENCH_DATA_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    let target = exe
        .ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"));
    target.join("bench-data")
}

/// The kickstart the generated workitems carry (the Mer SDK VM one from ../shared when present).
pub fn kickstart() -> String {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/kickstarts/mer-core-i586-sdkvm.ks");
    std::fs::read_to_string(p).unwrap_or_else(|_| FALLBACK_KS.to_string())
}

const FALLBACK_KS: &str = "lang en_US.UTF-8\nkeyboard us\ntimezone --utc UTC\n\
part / --size 500 --ondisk sda --fstype=ext4\nrootpw rootme\n\
user --name mer --groups audio,video --password rootme\n\
repo --name=mer-core --baseurl=http://releases.merproject.org/releases/latest/builds/i586/packages/ --save\n\
repo --name=mer-tools --baseurl=http://repo.pub.meego.com//Mer:/Tools:/Testing/Mer_Core_i586/ --save\n\
%packages --excludedocs\n@Mer Core\nopenssh-server\nnet-tools\nkernel-adaptation-vm\nmic\n%end\n\
%post\nln -s /lib/systemd/system/sshd.service /etc/systemd/system/multi-user.target.wants/sshd.service\n%end\n";

/// A workitem as upstream drops it (new API, bare fields), unique by `image_id`.
pub fn workitem(image_id: &str, ks: &str) -> Value {
    json!({
        "image": {
            "image_id": image_id,
            "kickstart": ks,
            "image_type": "fs",
            "name": format!("mer-core-i586-{image_id}"),
            "arch": "i586",
        },
        "msg": [],
    })
}

/// The seven events of one finished, delivered and pushed job whose id will be `id`.
pub fn job_lifecycle(
    id: u64,
    image_id: &str,
    worker: &str,
    ks: &str,
    w: &WorkerConfig,
) -> Vec<(Option<u64>, EventKind)> {
    let input = workitem(image_id, ks);
    let spec = workitem::normalise(&input).expect("generated workitem is valid");
    let mut urls = imaging::planned_urls(w, &spec);
    urls.image_url = imaging::url_for(
        w,
        &imaging::job_dir(w, &spec).join(format!("{}.tar.bz2", spec.name)),
    );
    let file = format!("{image_id}.json");
    let bytes = serde_json::to_vec_pretty(&input).unwrap().len() as u64;
    vec![
        (
            None,
            EventKind::Claimed {
                file: file.clone(),
                worker: worker.to_string(),
                bytes,
                sha256: format!("{:064x}", id.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                source: None,
            },
        ),
        (
            Some(id),
            EventKind::Queued {
                image_id: image_id.to_string(),
                spec: Box::new(spec),
                input: input.into(),
            },
        ),
        (
            Some(id),
            EventKind::Started {
                mode: Mode::Native,
                attempt: 1,
            },
        ),
        (
            Some(id),
            EventKind::Pushed {
                status: Status::Building,
                exit: Some(0),
                ok: true,
                error: None,
            },
        ),
        (
            Some(id),
            EventKind::Finished {
                result: true,
                error: None,
                urls,
                failure: None,
                boot_seconds: None,
            },
        ),
        (
            Some(id),
            EventKind::Delivered(Delivery {
                receipt: Receipt::Outbox {
                    name: file,
                    sha256: None,
                },
                copy: None,
            }),
        ),
        (
            Some(id),
            EventKind::Pushed {
                status: Status::Done,
                exit: Some(0),
                ok: true,
                error: None,
            },
        ),
    ]
}

/// The policy the generated logs are written under (a push utility, as a farm has).
pub const POLICY: build_image::domain::lifecycle::Policy = build_image::domain::lifecycle::Policy {
    push: true,
    push_retries: 3,
    max_attempts: 2,
};

/// The image_id of the job whose id is `id` in a generated log.
pub fn image_id_of(id: u64) -> String {
    format!("bench-{id}")
}

/// Appends `jobs` finished jobs to the log in `dir` (after what is there), in batches of about
/// 10,000 events with one flush each, and stores each job's projection as the daemon does.
/// Returns the number of events appended.
pub fn append_jobs(journal: &Journal, jobs: u64, worker: &str, w: &WorkerConfig) -> u64 {
    let ks = kickstart();
    let per_batch = 10_000 / EVENTS_PER_JOB;
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut done = 0u64;
    let mut appended = 0u64;
    while done < jobs {
        let n = per_batch.min(jobs - done);
        let first = journal.next_seq();
        let mut items = Vec::with_capacity((n * EVENTS_PER_JOB) as usize);
        for k in 0..n {
            let id = first + k * EVENTS_PER_JOB;
            items.extend(job_lifecycle(id, &image_id_of(id), worker, &ks, w));
        }
        // append_batch stores each job's projection, as the daemon does
        let evs = journal
            .append_batch(items, &|j| {
                build_image::domain::lifecycle::is_open(j, &POLICY)
            })
            .expect("append a batch");
        appended += evs.len() as u64;
        done += n;
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "  generating: {} / {} jobs ({:.0} events/s)",
                big(done as f64),
                big(jobs as f64),
                appended as f64 / started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }
    journal.flush().expect("flush");
    appended
}

/// A generated log of (about) `events` events, cached in `<data dir>/log-v<format>-<events>/`.
pub struct BenchLog {
    pub dir: PathBuf,
    pub events: u64,
    pub jobs: u64,
    pub worker: String,
}

impl BenchLog {
    /// The sled directory.
    pub fn db(&self) -> PathBuf {
        self.dir.join("db")
    }

    /// The image_id of a job in the middle of the log.
    pub fn middle_image_id(&self) -> String {
        image_id_of(1 + (self.jobs / 2) * EVENTS_PER_JOB)
    }

    /// Opens the log with sled's cache at `P4_CACHE_MB` (default: the daemon's 8 MB).
    pub fn open(&self) -> Journal {
        let mb: u64 = std::env::var("P4_CACHE_MB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(8);
        Journal::open_with_cache(&self.db(), mb * 1024 * 1024).expect("open the generated log")
    }
}

pub const BENCH_WORKER: &str = "bench";

/// The worker config the generated URLs are made with.
pub fn bench_worker_config() -> WorkerConfig {
    WorkerConfig {
        base_dir: "/srv/www/images".into(),
        base_url: "http://img.example.org/images".into(),
        ..WorkerConfig::default()
    }
}

/// The cached log of `events` events (rounded down to whole jobs), made if missing or if it
/// does not read back.
pub fn bench_log(events: u64) -> BenchLog {
    let jobs = (events / EVENTS_PER_JOB).max(1);
    let dir = data_dir().join(format!("log-v{LOG_FORMAT}-{events}"));
    let log = BenchLog {
        dir: dir.clone(),
        events: jobs * EVENTS_PER_JOB,
        jobs,
        worker: BENCH_WORKER.into(),
    };
    let marker = dir.join("complete");
    if marker.exists() && log_reads_back(&log) {
        return log;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the bench data dir");
    eprintln!(
        "generating a log of {} events ({} jobs) in {} (cached for later runs)...",
        big(log.events as f64),
        big(jobs as f64),
        dir.display()
    );
    let started = Instant::now();
    {
        let journal = log.open();
        append_jobs(&journal, jobs, BENCH_WORKER, &bench_worker_config());
    }
    eprintln!("  generated in {:.1} s", started.elapsed().as_secs_f64());
    std::fs::write(&marker, format!("{} events\n", log.events)).expect("write marker");
    log
}

/// Does the cached log hold the expected number of events, readable by this build?
fn log_reads_back(log: &BenchLog) -> bool {
    let Ok(journal) = Journal::open(&log.db()) else {
        return false;
    };
    if journal.next_seq() != log.events + 1 {
        return false;
    }
    let first: Option<Event> = journal.get(1).ok().flatten();
    let last: Option<Event> = journal.get(log.events).ok().flatten();
    first.is_some() && last.is_some()
}
