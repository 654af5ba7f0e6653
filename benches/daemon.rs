//! P1, P2, P3, P5 (docs/PERFORMANCE.md): the whole daemon, as the release binary
//! (`target/release/build-image`, or BUILD_IMAGE_BIN), on temporary spools.
//!
//! The daemon runs with `RUST_LOG=info` (its default) and stderr piped to this bench, which
//! reads its one-line-per-state-change log as it comes: the daemon prints an event's line only
//! after the event is durable (flushed) and applied, so the arrival of `seq N job J claimed F`
//! is the moment F's claim is on disk, and `pushed DONE` the moment the job's final push was
//! made and recorded. No polling of the spool is needed. Every run is checked afterwards
//! against the event log itself.
//!
//! - P1 end-to-end: P1_N workitems (default 2,000) through the daemon (near-instant mic
//!   stand-in, push utility `cat >/dev/null`, 2 build slots), from the first rename into
//!   incoming/ to the last `pushed DONE`; versus the bare work of the same jobs in the same
//!   run: 2 threads, each job = mkdir + push BUILDING + mic + a tmp+write+fsync+rename+dir-fsync
//!   write of the reply + push DONE. Ratio = bare time / daemon time (1.0 = no overhead).
//! - P2 burst: P2_N files (default 10,000) renamed into incoming/; time until every `claimed`
//!   is durable. Two forms: `pre-dropped` (files in place, clock from the daemon's spawn) and
//!   `live` (daemon idle, clock from the first rename). Baseline: P2_BASE_N (default 2,000)
//!   files each created, written and fsynced, one by one, on the same disk.
//! - P3 latency: P3_N drops (default 200), one at a time (write in tmp/, rename into
//!   incoming/), rename → durable `claimed`; with inotify (`watch = "auto"`, default timings)
//!   and `watch = "poll"` (poll_interval_ms = P3_POLL_MS, default 200; min_age_ms = 50).
//! - P5 idle: a daemon whose log holds P5_JOBS finished jobs (default 10,000), idle for P5_SECS
//!   (default 60): utime+stime from /proc/PID/stat, VmHWM and VmRSS from /proc/PID/status.
//!
//! BENCH_KEEP=1 keeps the temporary farms (spool, log, `daemon.log`) for a look afterwards;
//! BUILD_IMAGE_BIN runs another binary (e.g. a wrapper that starts it under a profiler).
//!
//! BENCH_RUNS (default 5) repetitions of each; the median and min–max are printed. Select
//! benchmarks with arguments (`cargo bench --bench daemon -- p2 p3`) or BENCH_ONLY=p1,p5.

mod common;

use build_image::domain::EventKind;
use build_image::journal::Journal;
use common::{Stats, big, env_u64, met, quantile, runs, stats};
use crossbeam_channel::{Receiver, RecvTimeoutError, unbounded};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.to_lowercase())
        .collect();
    let only: Vec<String> = std::env::var("BENCH_ONLY")
        .map(|v| v.split(',').map(|s| s.trim().to_lowercase()).collect())
        .unwrap_or_default();
    let wanted = |name: &str| {
        (args.is_empty() || args.iter().any(|a| a == name))
            && (only.is_empty() || only.iter().any(|a| a == name))
    };
    let bin = binary();
    eprintln!("daemon benches: {} ({} runs each)", bin.display(), runs());
    let mut lines = Vec::new();
    if wanted("p1") {
        lines.push(p1(&bin));
    }
    if wanted("p2") {
        lines.push(p2(&bin));
    }
    if wanted("p3") {
        lines.extend(p3(&bin));
    }
    if wanted("p5") {
        lines.push(p5(&bin));
    }
    println!();
    for l in lines {
        println!("{l}");
    }
    remove_farms();
}

/// Farms made by this run, removed at its end (see `Farm::new`).
static FARMS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn remove_farms() {
    if std::env::var_os("BENCH_KEEP").is_some() {
        return;
    }
    for dir in FARMS.lock().unwrap().drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The daemon binary: BUILD_IMAGE_BIN, else the one cargo built for this bench.
fn binary() -> PathBuf {
    match std::env::var_os("BUILD_IMAGE_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_build-image")),
    }
}

// ---------------------------------------------------------------------------------------------
// A farm: a temporary spool, base_dir, the mic and push stand-ins, a config file.

/// A near-instant mic: parses only --outdir= and the kickstart's name, writes a small image.
const MIC: &str = r#"#!/bin/sh
ks=$3
for a; do case $a in --outdir=*) d=${a#--outdir=};; esac; done
n=${ks##*/}
printf 'image\n' > "$d/${n%.ks}.img"
"#;

/// The push utility: reads the workitem from stdin, nothing else.
const PUSH: &str = "#!/bin/sh\ncat >/dev/null\n";

struct Farm {
    dir: tempfile::TempDir,
    mic: PathBuf,
    push: PathBuf,
}

#[derive(Clone, Copy)]
struct Timing {
    watch: &'static str,
    poll_ms: u64,
    min_age_ms: u64,
}

/// The daemon's defaults.
const DEFAULT_TIMING: Timing = Timing {
    watch: "auto",
    poll_ms: 2000,
    min_age_ms: 1000,
};

impl Farm {
    fn new() -> Farm {
        // Kept until the whole run ends, not removed after each measurement: on ext4 (without a
        // journal) creating files soon after thousands were deleted is several times slower
        // (the allocator skips recently deleted inodes), which would slow whichever measurement
        // follows a removal.
        let dir = tempfile::Builder::new()
            .prefix("build-image-bench-")
            .disable_cleanup(true)
            .tempdir()
            .expect("tempdir");
        FARMS.lock().unwrap().push(dir.path().to_path_buf());
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let script = |name: &str, text: &str| {
            let p = bin.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        let mic = script("mic", MIC);
        let push = script("push", PUSH);
        Farm { dir, mic, push }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }
    fn spool(&self) -> PathBuf {
        self.root().join("spool")
    }
    fn tmp(&self) -> PathBuf {
        self.spool().join("tmp")
    }
    fn incoming(&self) -> PathBuf {
        self.spool().join("incoming")
    }
    fn outbox(&self) -> PathBuf {
        self.spool().join("outbox")
    }
    fn state_dir(&self) -> PathBuf {
        self.spool().join("state/w1")
    }
    fn base(&self) -> PathBuf {
        self.root().join("images")
    }

    /// The spool folders, as the daemon makes them.
    fn create_spool(&self) {
        build_image::edges::spool::Spool::new(&self.spool(), "w1")
            .create_dirs()
            .expect("spool dirs");
        std::fs::create_dir_all(self.state_dir()).unwrap();
    }

    fn config(&self, t: Timing) -> PathBuf {
        let text = format!(
            r#"[worker]
base_dir = "{base}"
base_url = "http://img.example.org/images"
mic_path = "{mic}"
sudo = false
workers = 2
timeout = 600
grace = 0

[spool]
dir = "{spool}"
worker_id = "w1"
watch = "{watch}"
poll_interval_ms = {poll}
min_age_ms = {min_age}

[hooks]
push = "{push}"
timeout = 60
"#,
            base = self.base().display(),
            mic = self.mic.display(),
            spool = self.spool().display(),
            push = self.push.display(),
            watch = t.watch,
            poll = t.poll_ms,
            min_age = t.min_age_ms,
        );
        let p = self.root().join("build-image.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Writes `n` workitems into tmp/ (not yet dropped); returns their names.
    fn prepare(&self, prefix: &str, n: usize) -> Vec<String> {
        let ks = common::kickstart();
        (0..n)
            .map(|i| {
                let id = format!("{prefix}-{i}");
                let name = format!("{id}.json");
                let bytes = serde_json::to_vec_pretty(&common::workitem(&id, &ks)).unwrap();
                std::fs::write(self.tmp().join(&name), bytes).unwrap();
                name
            })
            .collect()
    }

    fn drop_file(&self, name: &str) {
        std::fs::rename(self.tmp().join(name), self.incoming().join(name)).expect("drop");
    }

    /// The event log (the daemon must be stopped).
    fn journal(&self) -> Journal {
        Journal::open(&self.state_dir()).expect("open the daemon's log")
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon process and its log lines.

/// One event line of the daemon's log, with the moment this bench read it.
#[derive(Debug, Clone)]
struct Line {
    at: Instant,
    kind: String,
    /// The first word of the detail: the file of `claimed`, the status of `pushed`.
    detail: String,
}

/// Parses `... seq N job J KIND DETAIL...` (the daemon's line per state change).
fn parse_line(line: &str, at: Instant) -> Option<Line> {
    let start = line.find("] seq ")? + 2;
    let mut words = line[start..].split_whitespace();
    let (s, _, j, _) = (words.next()?, words.next()?, words.next()?, words.next()?);
    if s != "seq" || j != "job" {
        return None;
    }
    Some(Line {
        at,
        kind: words.next()?.to_string(),
        detail: words.next().unwrap_or("").to_string(),
    })
}

struct Daemon {
    child: Child,
    lines: Receiver<Line>,
    spawned: Instant,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    /// Spawns `build-image --config CFG run`, its stderr read by a thread (and kept in
    /// `<farm>/daemon.log`).
    fn spawn(bin: &Path, farm: &Farm, cfg: &Path) -> Daemon {
        let spawned = Instant::now();
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(cfg)
            .arg("run")
            .env_remove("BUILD_IMAGE_CONFIG")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the daemon");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = unbounded();
        let log_path = farm.root().join("daemon.log");
        let reader = std::thread::spawn(move || {
            let mut log = BufWriter::new(File::create(log_path).unwrap());
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                if let Some(l) = parse_line(&line, at) {
                    let _ = tx.send(l);
                }
                let _ = writeln!(log, "{line}");
            }
        });
        Daemon {
            child,
            lines: rx,
            spawned,
            reader: Some(reader),
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the control socket: the daemon has replayed its log, recovered, and is
    /// claiming. Returns the time from spawn.
    fn wait_ready(&mut self, farm: &Farm) -> Duration {
        let sock = farm.state_dir().join("control.sock");
        let deadline = Instant::now() + Duration::from_secs(120);
        while !sock.exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the daemon exited ({status}) before it was ready; see {}",
                    farm.root().join("daemon.log").display()
                );
            }
            assert!(Instant::now() < deadline, "the daemon did not start");
            std::thread::sleep(Duration::from_millis(2));
        }
        self.spawned.elapsed()
    }

    /// Reads event lines until `done` says so; panics after `timeout`.
    fn until(&self, timeout: Duration, what: &str, mut done: impl FnMut(&Line) -> bool) -> Line {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if done(&l) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("timed out waiting for {what}"),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the daemon's log ended while waiting for {what}")
                }
            }
        }
    }

    /// SIGTERM (grace is 0 in the benches' config) and wait for the exit.
    fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                _ if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How many events of each kind the log holds (and pushes by status).
fn census(j: &Journal) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for ev in j.since(0) {
        let ev = ev.expect("read the log");
        let key = match &ev.kind {
            EventKind::Pushed { status, ok, .. } => format!(
                "pushed {}{}",
                status.as_str(),
                if *ok { "" } else { " failed" }
            ),
            EventKind::Finished { result, .. } => format!("finished {result}"),
            k => k.name().to_string(),
        };
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// P1

fn p1(bin: &Path) -> String {
    let n = env_u64("P1_N", 2000) as usize;
    let runs = runs();
    let (mut bare, mut daemon, mut ratio) = (vec![], vec![], vec![]);
    for run in 0..runs {
        let b = p1_bare(n, run);
        let d = p1_daemon(bin, n, run);
        eprintln!(
            "  P1 run {}: bare {b:.2} s, daemon {d:.2} s, ratio {:.2}",
            run + 1,
            b / d
        );
        bare.push(b);
        daemon.push(d);
        ratio.push(b / d);
    }
    let (b, d, r) = (stats(&bare), stats(&daemon), stats(&ratio));
    format!(
        "P1 end-to-end: {n} jobs through the daemon in {} = {:.0} jobs/s; bare work (3 spawns + 1 \
         durable write per job, 2 at a time) {} = {:.0} jobs/s; ratio bare/daemon {} \
         (median of {runs} runs, min–max); goal >= 0.8x: {}",
        d.show(2, " s"),
        n as f64 / d.median,
        b.show(2, " s"),
        n as f64 / b.median,
        r.show(2, "x"),
        met(r.median >= 0.8)
    )
}

/// The bare work of `n` jobs, 2 at a time. Seconds.
fn p1_bare(n: usize, run: usize) -> f64 {
    let farm = Farm::new();
    let out = farm.root().join("outbox");
    let images = farm.base();
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(&images).unwrap();
    let ks = common::kickstart();
    // The same inputs and replies as the daemon's jobs, made before the clock starts.
    let jobs: Vec<(String, Vec<u8>, Vec<u8>)> = (0..n)
        .map(|i| {
            let id = format!("p1-{run}-{i}");
            let input = common::workitem(&id, &ks);
            let urls = build_image::domain::workitem::Urls {
                files_url: Some(format!("http://img.example.org/images/requests/{id}")),
                image_url: Some(format!("http://img.example.org/images/requests/{id}/x.img")),
                logfile_url: Some(format!("http://img.example.org/images/requests/{id}/x.log")),
                // as long as the daemon's: a sha256 in hex
                image_sha256: Some("0".repeat(64)),
                artifact_bytes: Some(65536),
                provenance_url: Some(format!(
                    "http://img.example.org/images/requests/{id}/provenance.json"
                )),
            };
            let reply = build_image::domain::workitem::reply(&input, Some(true), None, &urls);
            (
                id,
                serde_json::to_vec(&input).unwrap(),
                serde_json::to_vec_pretty(&reply).unwrap(),
            )
        })
        .collect();
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..2 {
            let (jobs, farm, out, images) = (&jobs, &farm, &out, &images);
            s.spawn(move || {
                for (id, input, reply) in jobs.iter().skip(t).step_by(2) {
                    let dir = images.join(id);
                    std::fs::create_dir(&dir).unwrap();
                    spawn_push(&farm.push, "BUILDING", id, input);
                    let status = Command::new(&farm.mic)
                        .args(["create", "fs"])
                        .arg(dir.join(format!("{id}.ks")))
                        .arg("--arch=i586")
                        .arg(format!("--outdir={}", dir.display()))
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .expect("spawn mic");
                    assert!(status.success());
                    durable_write(&out.join(format!("{id}.json")), reply);
                    spawn_push(&farm.push, "DONE", id, input);
                }
            });
        }
    });
    started.elapsed().as_secs_f64()
}

fn spawn_push(push: &Path, status: &str, id: &str, input: &[u8]) {
    let mut child = Command::new(push)
        .arg(status)
        .env("BUILD_IMAGE_STATUS", status)
        .env("BUILD_IMAGE_ID", id)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn push");
    child.stdin.take().unwrap().write_all(input).unwrap();
    assert!(child.wait().unwrap().success());
}

/// tmp + write + fsync + rename + directory fsync, as the outbox write does.
fn durable_write(path: &Path, bytes: &[u8]) {
    let dir = path.parent().unwrap();
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::rename(&tmp, path).unwrap();
    File::open(dir).unwrap().sync_all().unwrap();
}

/// `n` jobs through the daemon: first rename into incoming/ to the last final push. Seconds.
fn p1_daemon(bin: &Path, n: usize, run: usize) -> f64 {
    let farm = Farm::new();
    farm.create_spool();
    let cfg = farm.config(DEFAULT_TIMING);
    let names = farm.prepare(&format!("p1-{run}"), n);
    let mut d = Daemon::spawn(bin, &farm, &cfg);
    d.wait_ready(&farm);
    let started = Instant::now();
    for name in &names {
        farm.drop_file(name);
    }
    let mut finals = 0;
    let last = d.until(
        Duration::from_secs(60 + n as u64 / 5),
        "the final pushes",
        |l| {
            if l.kind == "pushed" && l.detail != "BUILDING" {
                finals += 1;
            }
            finals == n
        },
    );
    let secs = last.at.duration_since(started).as_secs_f64();
    d.stop();
    let c = census(&farm.journal());
    let ok = c.get("pushed DONE").copied().unwrap_or(0);
    assert_eq!(
        ok as usize,
        n,
        "every job built and pushed DONE (log: {c:?}; see {})",
        farm.root().join("daemon.log").display()
    );
    assert_eq!(common_count(&farm.outbox()), n, "every reply in outbox/");
    secs
}

fn common_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// P2

fn p2(bin: &Path) -> String {
    let n = env_u64("P2_N", 10_000) as usize;
    let base_n = env_u64("P2_BASE_N", 2000) as usize;
    let runs = runs();
    let (mut pre, mut live, mut base, mut drops) = (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        let b = fsync_loop(base_n);
        let p = p2_once(bin, n, run, false);
        let l = p2_once(bin, n, run, true);
        eprintln!(
            "  P2 run {}: pre-dropped {:.0} claims/s, live {:.0} claims/s (renames {:.0}/s), \
             baseline {b:.0} fsyncs/s",
            run + 1,
            p.0,
            l.0,
            l.1
        );
        base.push(b);
        pre.push(p.0);
        live.push(l.0);
        drops.push(l.1);
    }
    let (p, l, b) = (stats(&pre), stats(&live), stats(&base));
    let ratios: Vec<f64> = pre.iter().zip(&base).map(|(p, b)| p / b).collect();
    let live_ratios: Vec<f64> = live.iter().zip(&base).map(|(p, b)| p / b).collect();
    let r = stats(&ratios);
    format!(
        "P2 burst: {n} claims durable in {:.2} s = {} claims/s ({}–{}) pre-dropped (clock from the \
         daemon's spawn); live burst {} claims/s ({}–{}) while renames ran at {} files/s; \
         baseline write+fsync loop {} files/s ({}–{}); ratio {} pre-dropped, {} live \
         (median of {runs} runs); goal >= 10,000 claims/s: {}",
        n as f64 / p.median,
        big(p.median),
        big(p.min),
        big(p.max),
        big(l.median),
        big(l.min),
        big(l.max),
        big(stats(&drops).median),
        big(b.median),
        big(b.min),
        big(b.max),
        r.show(1, "x"),
        stats(&live_ratios).show(1, "x"),
        met(p.median >= 10_000.0 && l.median >= 10_000.0)
    )
}

/// Files per second of a loop creating, writing (a workitem's size) and fsyncing one file at a
/// time on the spool's disk.
fn fsync_loop(n: usize) -> f64 {
    let farm = Farm::new();
    let dir = farm.root().join("fsync");
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = serde_json::to_vec_pretty(&common::workitem("x", &common::kickstart())).unwrap();
    let started = Instant::now();
    for i in 0..n {
        let mut f = File::create(dir.join(format!("{i}.json"))).unwrap();
        f.write_all(&bytes).unwrap();
        f.sync_all().unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Claims per second of one burst, and (live) the rename rate of the dropper.
fn p2_once(bin: &Path, n: usize, run: usize, live: bool) -> (f64, f64) {
    let farm = Farm::new();
    farm.create_spool();
    let cfg = farm.config(DEFAULT_TIMING);
    let names = farm.prepare(&format!("p2-{run}"), n);
    // Older than min_age, as files dropped while the daemon was down would be.
    std::thread::sleep(Duration::from_millis(DEFAULT_TIMING.min_age_ms + 100));
    let mut drop_rate = 0.0;
    let (d, started) = if live {
        let mut d = Daemon::spawn(bin, &farm, &cfg);
        d.wait_ready(&farm);
        let started = Instant::now();
        for name in &names {
            farm.drop_file(name);
        }
        drop_rate = n as f64 / started.elapsed().as_secs_f64();
        (d, started)
    } else {
        for name in &names {
            farm.drop_file(name);
        }
        let d = Daemon::spawn(bin, &farm, &cfg);
        let started = d.spawned;
        (d, started)
    };
    let mut claimed = 0;
    let last = d.until(
        Duration::from_secs(120 + n as u64 / 50),
        "the claims",
        |l| {
            if l.kind == "claimed" {
                claimed += 1;
            }
            claimed == n
        },
    );
    let secs = last.at.duration_since(started).as_secs_f64();
    d.stop();
    let c = census(&farm.journal());
    assert_eq!(
        c.get("claimed").copied().unwrap_or(0) as usize,
        n,
        "every file claimed once (log: {c:?})"
    );
    (n as f64 / secs, drop_rate)
}

// ---------------------------------------------------------------------------------------------
// P3

fn p3(bin: &Path) -> Vec<String> {
    let n = env_u64("P3_N", 200) as usize;
    let poll = env_u64("P3_POLL_MS", 200);
    let runs = runs();
    let mut out = Vec::new();
    for (label, timing, goal_ms) in [
        (
            "inotify (watch = \"auto\", default timings)",
            DEFAULT_TIMING,
            10.0,
        ),
        (
            "poll (watch = \"poll\")",
            Timing {
                watch: "poll",
                poll_ms: poll,
                min_age_ms: 50,
            },
            poll as f64 + 10.0,
        ),
    ] {
        let (mut p50, mut p99, mut max) = (vec![], vec![], vec![]);
        for run in 0..runs {
            let lat = p3_once(bin, n, run, timing);
            let (a, b, c) = (
                quantile(&lat, 0.5),
                quantile(&lat, 0.99),
                quantile(&lat, 1.0),
            );
            eprintln!(
                "  P3 {} run {}: p50 {a:.2} ms, p99 {b:.2} ms, max {c:.2} ms",
                timing.watch,
                run + 1
            );
            p50.push(a);
            p99.push(b);
            max.push(c);
        }
        let (a, b, c): (Stats, Stats, Stats) = (stats(&p50), stats(&p99), stats(&max));
        let timings = if timing.watch == "poll" {
            format!(
                "poll_interval_ms = {}, min_age_ms = {}",
                timing.poll_ms, timing.min_age_ms
            )
        } else {
            format!(
                "rescan every {} ms, min_age_ms = {}",
                timing.poll_ms, timing.min_age_ms
            )
        };
        out.push(format!(
            "P3 latency {label}: drop→durable claimed over {n} drops: p50 {}, p99 {}, max {} \
             (median of {runs} runs, min–max; {timings}); ratio p99/goal {:.2}; \
             goal p99 < {goal_ms:.0} ms: {}",
            a.show(2, " ms"),
            b.show(2, " ms"),
            c.show(2, " ms"),
            b.median / goal_ms,
            met(b.median < goal_ms || (timing.watch == "poll" && b.median <= goal_ms))
        ));
    }
    out
}

/// Latencies (ms) of `n` single drops, each written in tmp/ then renamed into incoming/ (the
/// clock starts just before the rename) and waited for until its job's final push, then a
/// pseudo-random pause (0–40 ms with inotify; 0 to the poll interval when polling, so the drops
/// fall at every phase of the rescan timer).
fn p3_once(bin: &Path, n: usize, run: usize, timing: Timing) -> Vec<f64> {
    let farm = Farm::new();
    farm.create_spool();
    let cfg = farm.config(timing);
    let mut d = Daemon::spawn(bin, &farm, &cfg);
    d.wait_ready(&farm);
    let ks = common::kickstart();
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ run as u64;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("p3-{}-{run}-{i}", timing.watch);
        let name = format!("{id}.json");
        std::fs::write(
            farm.tmp().join(&name),
            serde_json::to_vec_pretty(&common::workitem(&id, &ks)).unwrap(),
        )
        .unwrap();
        let t0 = Instant::now();
        farm.drop_file(&name);
        let l = d.until(Duration::from_secs(30), "a claim", |l| {
            l.kind == "claimed" && l.detail == name
        });
        lat.push(l.at.duration_since(t0).as_secs_f64() * 1e3);
        d.until(Duration::from_secs(30), "the final push", |l| {
            l.kind == "pushed" && l.detail != "BUILDING"
        });
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Drops follow claims, so without a pause as long as the rescan period they would
        // fall at one phase of the rescan timer.
        let spread = if timing.watch == "poll" {
            timing.poll_ms.max(41)
        } else {
            41
        };
        std::thread::sleep(Duration::from_millis(rng % spread));
    }
    d.stop();
    let c = census(&farm.journal());
    assert_eq!(c.get("claimed").copied().unwrap_or(0) as usize, n, "{c:?}");
    lat
}

// ---------------------------------------------------------------------------------------------
// P5

fn p5(bin: &Path) -> String {
    let jobs = env_u64("P5_JOBS", 10_000);
    let secs = env_u64("P5_SECS", 60);
    let runs = runs();
    let (mut cpu, mut hwm, mut rss, mut start) = (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        let r = p5_once(bin, jobs, secs);
        eprintln!(
            "  P5 run {}: {:.3} CPU s in {secs} s idle, VmHWM {:.1} MB, VmRSS {:.1} MB, ready in {:.2} s",
            run + 1,
            r.0,
            r.1,
            r.2,
            r.3
        );
        cpu.push(r.0 / secs as f64);
        hwm.push(r.1);
        rss.push(r.2);
        start.push(r.3);
    }
    let (c, h) = (stats(&cpu), stats(&hwm));
    format!(
        "P5 idle: {secs} s idle with {} finished jobs ({} events) in the log: CPU {} per idle \
         second (ratio; {:.3} CPU s per {secs} s), peak RSS (VmHWM) {}, RSS at the end {}; \
         start (log opened: open jobs and the events after the stored projections) to ready {} (median of {runs} runs, min–max); \
         goal ~0 CPU (< 0.001 s/s): {}, RSS < 30 MB: {}",
        big(jobs as f64),
        big((jobs * common::EVENTS_PER_JOB) as f64),
        c.show(5, " s/s"),
        c.median * secs as f64,
        h.show(1, " MB"),
        stats(&rss).show(1, " MB"),
        stats(&start).show(2, " s"),
        met(c.median < 0.001),
        met(h.median < 30.0)
    )
}

/// (CPU seconds over the idle period, VmHWM MB, VmRSS MB, seconds to ready).
fn p5_once(bin: &Path, jobs: u64, secs: u64) -> (f64, f64, f64, f64) {
    let farm = Farm::new();
    farm.create_spool();
    let cfg = farm.config(DEFAULT_TIMING);
    {
        let journal = farm.journal();
        let w = build_image::config::WorkerConfig {
            base_dir: farm.base(),
            base_url: "http://img.example.org/images".into(),
            ..Default::default()
        };
        common::append_jobs(&journal, jobs, "w1", &w);
    }
    let mut d = Daemon::spawn(bin, &farm, &cfg);
    let ready = d.wait_ready(&farm).as_secs_f64();
    let pid = d.pid();
    let cpu0 = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(secs));
    let cpu1 = cpu_seconds(pid);
    let (hwm, rss) = memory_mb(pid);
    // Nothing happened: no job was opened by the idle daemon.
    let extra: Vec<Line> = d.lines.try_iter().filter(|l| l.kind == "claimed").collect();
    assert!(extra.is_empty());
    d.stop();
    let c = census(&farm.journal());
    assert_eq!(c.get("pushed DONE").copied().unwrap_or(0), jobs, "{c:?}");
    (cpu1 - cpu0, hwm, rss, ready)
}

/// utime + stime of a process (all its threads), seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks as f64 / hz
}

/// (VmHWM, VmRSS) in MB (2^20 bytes).
fn memory_mb(pid: i32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    };
    (field("VmHWM:"), field("VmRSS:"))
}
