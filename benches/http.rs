//! P6 (docs/PERFORMANCE.md): the HTTP server on a long log.
//!
//! A daemon is started in-process on a generated log of HTTP_EVENTS events (default
//! 1,000,000; the same cached logs as `benches/replay.rs`, 7 events per job) with `[http]` on a
//! loopback port, and asked, over real TCP connections (one request per connection, as the
//! server serves them):
//! - `GET /` (the newest 100 jobs), `GET /?state=rejected` (no such job: the page looks at its
//!   whole budget of 100,000 job ids), `GET /jobs/ID` (a job in the middle of the log);
//! - `GET /api/jobs` (every job) and `GET /api/jobs?limit=100`, against `build-image status
//!   --json` (and `--limit 100`) run as the binary on the same daemon in the same run;
//! - `GET /metrics`, HTTP_SCRAPES times, at two log sizes (HTTP_SMALL_EVENTS, default 70,000,
//!   and HTTP_EVENTS): p50/p99/max per scrape; goal < 5 ms at any size.
//!
//! Also reported: the daemon's start on each log (seeding the metrics from the projections).
//!
//! Env: HTTP_EVENTS, HTTP_SMALL_EVENTS, BENCH_RUNS (default 5), HTTP_SCRAPES (default 200).

mod common;

use build_image::config::Config;
use common::{BenchLog, Stats, big, env_u64, met, quantile, runs, stats};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn main() {
    let events = env_u64("HTTP_EVENTS", 1_000_000);
    let small_events = env_u64("HTTP_SMALL_EVENTS", 70_000);
    let runs = runs();
    let scrapes = env_u64("HTTP_SCRAPES", 200).max(1) as usize;

    let small = common::bench_log(small_events);
    let large = common::bench_log(events);

    let mut lines = Vec::new();
    // The first start on a generated log also stores its projections' format (a one-time fold):
    // start once unmeasured, then compare starts with and without [http].
    for log in [&small, &large] {
        drop(Daemon::start(log, true));
        let mut with = Vec::new();
        let mut counted = Vec::new();
        let mut without = Vec::new();
        for _ in 0..runs.min(3) {
            let d = Daemon::start(log, true);
            with.push(d.started_in.as_secs_f64());
            counted.push(d.counted().as_secs_f64());
            drop(d);
            without.push(Daemon::start(log, false).started_in.as_secs_f64());
        }
        lines.push(format!(
            "start on {} events ({} jobs) to serving: with [http] {}, without {}; the jobs counted for /metrics (on a thread of their own) {} after the start",
            big(log.events as f64),
            big(log.jobs as f64),
            stats(&with).show(2, " s"),
            stats(&without).show(2, " s"),
            stats(&counted).show(2, " s"),
        ));
    }
    let small_metrics = {
        let d = Daemon::start(&small, true);
        d.counted();
        scrape(&d, scrapes)
    };
    let d = Daemon::start(&large, true);
    d.counted();
    let large_metrics = scrape(&d, scrapes);

    let mid = large.middle_image_id();
    let index = time_get(&d, "/", runs * 4, "<tr data-job=");
    let rare = time_get(&d, "/?state=rejected", runs, "No jobs");
    let job = time_get(
        &d,
        &format!("/jobs/{mid}"),
        runs * 4,
        "data-kind=\"finished\"",
    );
    let api_page = time_get(&d, "/api/jobs?limit=100", runs * 4, "\"job\"");
    let api_all = time_get(&d, "/api/jobs", runs, "\"job\"");
    let cli_page = time_cli(&d, &["status", "--json", "--limit", "100"], runs * 4);
    let cli_all = time_cli(&d, &["status", "--json"], runs);

    // The API and the command give the same JSON.
    let (_, body) = get(d.addr, "/api/jobs");
    let out = cli(&d, &["status", "--json"]);
    let same = serde_json::from_str::<serde_json::Value>(&body).ok()
        == serde_json::from_str::<serde_json::Value>(&out).ok();
    drop(d);

    let ms = |s: &Stats| s.show(2, " ms");
    println!();
    for l in &lines {
        println!("{l}");
    }
    println!(
        "GET / (newest 100 of {} jobs): {} per request",
        big(large.jobs as f64),
        ms(&index)
    );
    println!(
        "GET /?state=rejected (none: 100,000 ids looked at): {}",
        ms(&rare)
    );
    println!("GET /jobs/{mid}: {}", ms(&job));
    println!(
        "GET /api/jobs?limit=100: {}; status --json --limit 100 (the binary): {}; ratio {:.2}x",
        ms(&api_page),
        ms(&cli_page),
        api_page.median / cli_page.median
    );
    println!(
        "GET /api/jobs ({} jobs): {}; status --json (the binary): {}; ratio {:.2}x; same JSON: {same}",
        big(large.jobs as f64),
        ms(&api_all),
        ms(&cli_all),
        api_all.median / cli_all.median
    );
    for (log, m) in [(&small, &small_metrics), (&large, &large_metrics)] {
        println!(
            "GET /metrics on {} events: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} scrapes); goal < 5 ms: {}",
            big(log.events as f64),
            m.0,
            m.1,
            m.2,
            scrapes,
            met(m.1 < 5.0)
        );
    }
    assert!(same, "/api/jobs and status --json differ");
}

/// A daemon on a generated log, serving HTTP.
struct Daemon {
    stop: crossbeam_channel::Sender<()>,
    handle: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    addr: std::net::SocketAddr,
    config: PathBuf,
    started_in: Duration,
    /// When it was found serving.
    since_start: Instant,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts a daemon on `log` (with or without `[http]`) and waits until it serves.
    fn start(log: &BenchLog, http: bool) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config {
            worker: common::bench_worker_config(),
            ..Config::default()
        };
        cfg.spool.dir = dir.path().join("spool");
        cfg.spool.worker_id = Some(log.worker.clone());
        cfg.spool.state_dir = Some(log.db());
        cfg.spool.state_min_free_mb = 0;
        if http {
            cfg.http.listen = Some("127.0.0.1:0".into());
        }
        let config = dir.path().join("build-image.toml");
        std::fs::write(&config, toml::to_string(&cfg).expect("config")).expect("write config");
        let addr_file = log.db().join("http.addr");
        let _ = std::fs::remove_file(&addr_file);
        let ready_file = if http {
            addr_file.clone()
        } else {
            log.db().join("control.sock")
        };
        let (stop, rx) = crossbeam_channel::bounded(1);
        let started = Instant::now();
        let handle = std::thread::spawn(move || build_image::daemon::run(cfg, rx));
        while !ready_file.exists() {
            assert!(!handle.is_finished(), "the daemon stopped");
            assert!(started.elapsed() < Duration::from_secs(600), "no http.addr");
            std::thread::sleep(Duration::from_millis(5));
        }
        let started_in = started.elapsed();
        let addr = match std::fs::read_to_string(&addr_file) {
            Ok(a) => a.trim().parse().expect("an address"),
            Err(_) => std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        Daemon {
            stop,
            handle: Some(handle),
            addr,
            config,
            started_in,
            since_start: Instant::now(),
            _dir: dir,
        }
    }
}

impl Daemon {
    /// Waits until /metrics answers (the jobs are counted): the time since the start.
    fn counted(&self) -> Duration {
        loop {
            if get(self.addr, "/metrics").0 == 200 {
                return self.started_in + self.since_start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(h) = self.handle.take() {
            h.join().expect("daemon thread").expect("daemon");
        }
    }
}

/// One GET over a new connection: (status, body).
fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").expect("send");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// `n` requests of `path`, each checked for `expect`: milliseconds per request.
fn time_get(d: &Daemon, path: &str, n: usize, expect: &str) -> Stats {
    let mut ms = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let (status, body) = get(d.addr, path);
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(
            status == 200 && body.contains(expect),
            "{path}: {status} {}",
            &body[..body.len().min(300)]
        );
    }
    stats(&ms)
}

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_build-image"))
}

fn cli(d: &Daemon, args: &[&str]) -> String {
    let out = std::process::Command::new(binary())
        .env_remove("BUILD_IMAGE_CONFIG")
        .env("RUST_LOG", "warn")
        .arg("--config")
        .arg(&d.config)
        .args(args)
        .output()
        .expect("run the binary");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `n` runs of the binary: milliseconds each.
fn time_cli(d: &Daemon, args: &[&str], n: usize) -> Stats {
    let mut ms = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let out = cli(d, args);
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(out.contains("\"job\""));
    }
    stats(&ms)
}

/// `n` scrapes of /metrics: p50, p99 and max in milliseconds.
fn scrape(d: &Daemon, n: usize) -> (f64, f64, f64) {
    let mut ms = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let (status, body) = get(d.addr, "/metrics");
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(status == 200 && body.contains("build_image_jobs{state=\"done\"}"));
    }
    (quantile(&ms, 0.5), quantile(&ms, 0.99), quantile(&ms, 1.0))
}
