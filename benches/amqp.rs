//! P7 (docs/PERFORMANCE.md): workitems through the BOSS participant, on a private RabbitMQ node
//! (Debian's rabbitmq-server, started by this bench on 127.0.0.1; see tests/common/broker.rs).
//!
//! - daemon: AMQP_N workitems (default 1,000) published persistent to `build_image`, through
//!   the daemon (in-process `daemon::run`, near-instant mic stand-in, no push utility,
//!   AMQP_WORKERS build slots, default 2, prefetch = slots), until every answer is on
//!   `ruote_workitems`.
//! - plain loop: the same number of messages, in the same run, on the same broker, through
//!   the same client (lapin): a consumer with the same prefetch that acks each message and
//!   publishes it to a reply queue with a publisher confirm, persistent; until every reply is
//!   there.
//!
//! - spool: the same workitems as files through the same daemon without `[amqp]` (renamed
//!   into incoming/ at once), until every answer is in outbox/: what the AMQP path costs
//!   over the spool's.
//! - mic floor: the mic stand-in alone, AMQP_N times, AMQP_WORKERS at a time, with the
//!   daemon's native command line for each workitem (`mic create fs <job dir>/<name>.ks
//!   --arch=i586 --outdir=<job dir> --pack-to=…`, job folders made before the clock), each in
//!   its own process group, output to /dev/null, each waited for: the most any daemon that
//!   runs one mic per workitem could reach here, with nothing else (no broker, no log).
//!
//! The AMQP clocks run from the first publish to the last answer received; the publisher and
//! the answer counter are the same code for both. Ratio = daemon msgs/s / plain msgs/s.
//! BENCH_RUNS (default 5) runs of each, alternating; medians and min–max printed.

#[path = "../tests/common/broker.rs"]
#[allow(dead_code)]
mod broker;
mod common;

use common::{env_u64, met, runs, stats};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A near-instant mic (as in the daemon bench): writes a small image.
const MIC: &str = r#"#!/bin/sh
ks=$3
for a; do case $a in --outdir=*) d=${a#--outdir=};; esac; done
n=${ks##*/}
printf 'image\n' > "$d/${n%.ks}.img"
"#;

fn main() {
    if !Path::new("/usr/sbin/rabbitmq-server").exists() {
        eprintln!("P7 needs rabbitmq-server (apt-get install rabbitmq-server): skipped");
        return;
    }
    let n = env_u64("AMQP_N", 1000) as usize;
    let workers = env_u64("AMQP_WORKERS", 2) as usize;
    let broker = broker::Broker::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let conn = rt.block_on(async {
        Connection::connect(&broker.url(), ConnectionProperties::default())
            .await
            .unwrap()
    });
    eprintln!(
        "P7: {n} workitems, {workers} build slots, {} runs, broker {}",
        runs(),
        broker.url()
    );
    let (mut daemon, mut plain, mut spool, mut floor) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs() {
        let p = plain_loop(&rt, &conn, &broker, n, workers as u16);
        let d = through_daemon(&rt, &conn, &broker, n, workers);
        let s = through_spool(n, workers);
        let f = mic_floor(n, workers);
        eprintln!(
            "run {run}: daemon {d:.0} msgs/s, plain loop {p:.0} msgs/s, spool {s:.0} jobs/s, mic floor {f:.0} spawns/s"
        );
        daemon.push(d);
        plain.push(p);
        spool.push(s);
        floor.push(f);
    }
    let (d, p, s, f) = (stats(&daemon), stats(&plain), stats(&spool), stats(&floor));
    let ratio = d.median / p.median;
    println!();
    println!(
        "P7 AMQP: {n} workitems through the daemon: {} msgs/s; plain consume+ack+publish loop: {} msgs/s; ratio {ratio:.2} (goal >= 0.8: {}); the same jobs through the spool: {} jobs/s (AMQP/spool {:.2})",
        d.show(0, ""),
        p.show(0, ""),
        met(ratio >= 0.8),
        s.show(0, ""),
        d.median / s.median
    );
    // Each run's own ratio too: the floor moves most with the other engineers' load.
    let per_run =
        |a: &[f64], b: &[f64]| stats(&a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<_>>());
    let fp = f.median / p.median;
    println!(
        "P7 mic floor: {n} mic stand-in runs, {workers} at a time: {} spawns/s; floor/plain {fp:.2} (each run: {}; floor >= 0.8x plain: {}); daemon/floor {:.2} (each run: {})",
        f.show(0, ""),
        per_run(&floor, &plain).show(2, ""),
        if fp >= 0.8 { "yes" } else { "NO" },
        d.median / f.median,
        per_run(&daemon, &floor).show(2, ""),
    );
}

/// The mic floor: the stand-in run `n` times, `workers` at a time, with the daemon's native
/// command line, each in its own process group and waited for; spawns/s from the first spawn
/// to the last exit.
fn mic_floor(n: usize, workers: usize) -> f64 {
    let (dir, cfg) = farm(workers, None);
    let w = &cfg.worker;
    let argvs: Vec<Vec<std::ffi::OsString>> = bodies(n, "floor")
        .iter()
        .map(|b| {
            let spec =
                build_image::domain::workitem::normalise(&serde_json::from_slice(b).unwrap())
                    .unwrap();
            let out = build_image::imaging::job_dir(w, &spec);
            std::fs::create_dir_all(&out).unwrap();
            let ks = build_image::imaging::ks_path(w, &spec);
            build_image::imaging::mic::mic_command(&spec, &ks, &out, w)
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                while let Some(argv) = argvs.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let status = Command::new(&argv[0])
                        .args(&argv[1..])
                        .process_group(0)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .unwrap();
                    assert!(status.success(), "mic stand-in: {status}");
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let images = argvs
        .iter()
        .filter(|a| {
            let out = a.iter().find_map(|x| x.to_str()?.strip_prefix("--outdir="));
            std::fs::read_dir(out.unwrap()).unwrap().count() == 1
        })
        .count();
    assert_eq!(images, n, "every run wrote its image");
    keep(dir);
    n as f64 / secs
}

/// A farm: the mic stand-in and a config (with `[amqp] url` when given).
fn farm(workers: usize, url: Option<&str>) -> (tempfile::TempDir, build_image::config::Config) {
    let dir = tempfile::Builder::new()
        .prefix("build-image-bench-amqp-")
        .tempdir()
        .unwrap();
    let mic = dir.path().join("mic");
    std::fs::write(&mic, MIC).unwrap();
    std::fs::set_permissions(&mic, std::fs::Permissions::from_mode(0o755)).unwrap();
    let toml = format!(
        r#"[worker]
base_dir = "{base}"
base_url = "http://img.example.org/images"
mic_path = "{mic}"
sudo = false
workers = {workers}
grace = 0

[spool]
dir = "{spool}"
worker_id = "w1"
{amqp}"#,
        base = dir.path().join("images").display(),
        mic = mic.display(),
        spool = dir.path().join("spool").display(),
        amqp = url.map_or(String::new(), |u| format!("\n[amqp]\nurl = \"{u}\"\n")),
    );
    std::fs::write(dir.path().join("bench.toml"), &toml).unwrap();
    let cfg = build_image::config::Config::parse(&toml, Path::new("bench.toml")).unwrap();
    (dir, cfg)
}

/// The same workitems as files: written into tmp/, then renamed into incoming/ at once (the
/// clock starts at the first rename), until outbox/ has every answer.
fn through_spool(n: usize, workers: usize) -> f64 {
    let (dir, cfg) = farm(workers, None);
    let spool = build_image::edges::spool::Spool::new(&cfg.spool.dir, "w1");
    spool.create_dirs().unwrap();
    let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
    let daemon = std::thread::spawn(move || build_image::daemon::run(cfg, stop_rx));
    let names: Vec<String> = (0..n).map(|i| format!("w{i}.json")).collect();
    for (name, body) in names.iter().zip(bodies(n, "spool")) {
        std::fs::write(spool.tmp.join(name), body).unwrap();
    }
    let start = Instant::now();
    for name in &names {
        std::fs::rename(spool.tmp.join(name), spool.incoming.join(name)).unwrap();
    }
    let done = build_image::wait::wait_for(Duration::from_secs(300), || {
        std::fs::read_dir(&spool.outbox).map_or(0, |d| d.count()) >= n
    });
    let secs = start.elapsed().as_secs_f64();
    assert!(done, "the spool run did not finish");
    stop_tx.send(()).unwrap();
    daemon.join().unwrap().unwrap();
    keep(dir);
    n as f64 / secs
}

fn bodies(n: usize, run: &str) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            serde_json::to_vec(&serde_json::json!({
                "fei": {"wfid": format!("{run}-{i}"), "subid": "s", "expid": "0", "engine_id": "e"},
                "participant_name": "build_image",
                "fields": {"params": {}, "msg": [], "image": {
                    "image_id": format!("{run}-{i}"), "kickstart": "# ks\n", "image_type": "fs",
                    "name": format!("n{i}"), "arch": "i586"}}
            }))
            .unwrap()
        })
        .collect()
}

async fn declare(ch: &lapin::Channel, q: &str) {
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_purge(q.into(), QueuePurgeOptions::default())
        .await
        .unwrap();
}

/// Publishes `bodies` to `queue` (persistent, confirmed: all in flight, then every confirm),
/// and counts the messages arriving on `answers` until `n`; returns msgs/s from the first
/// publish to the last answer.
async fn publish_and_count(
    conn: &Connection,
    queue: &str,
    answers: &str,
    bodies: Vec<Vec<u8>>,
) -> f64 {
    let n = bodies.len();
    let sub = conn.create_channel().await.unwrap();
    let mut counter = sub
        .basic_consume(
            answers.into(),
            "counter".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let start = Instant::now();
    let publisher = async {
        let mut confirms = Vec::with_capacity(n);
        for b in &bodies {
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    b,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap(),
            );
        }
        for c in confirms {
            c.await.unwrap();
        }
    };
    let count = async {
        let mut seen = 0;
        while seen < n {
            match tokio::time::timeout(Duration::from_secs(120), counter.next()).await {
                Ok(Some(Ok(_))) => seen += 1,
                other => panic!("answers stopped after {seen} of {n}: {other:?}"),
            }
        }
    };
    tokio::join!(publisher, count);
    let secs = start.elapsed().as_secs_f64();
    let _ = sub.close(200, "".into()).await;
    let _ = ch.close(200, "".into()).await;
    n as f64 / secs
}

/// The plain loop: consume (prefetch), ack, publish with a confirm, one message at a time.
fn plain_loop(
    rt: &tokio::runtime::Runtime,
    conn: &Connection,
    broker: &broker::Broker,
    n: usize,
    prefetch: u16,
) -> f64 {
    let url = broker.url();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    rt.block_on(async {
        let ch = conn.create_channel().await.unwrap();
        declare(&ch, "plain_in").await;
        declare(&ch, "plain_out").await;
    });
    // Its own thread and runtime, like the daemon's client.
    let worker = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = Connection::connect(&url, ConnectionProperties::default())
                .await
                .unwrap();
            let ch = c.create_channel().await.unwrap();
            ch.basic_qos(prefetch, BasicQosOptions::default())
                .await
                .unwrap();
            let pubch = c.create_channel().await.unwrap();
            pubch
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let mut cons = ch
                .basic_consume(
                    "plain_in".into(),
                    "plain".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            ready_tx.send(()).unwrap();
            loop {
                let next = tokio::time::timeout(Duration::from_millis(200), cons.next()).await;
                match next {
                    Ok(Some(Ok(d))) => {
                        d.ack(BasicAckOptions::default()).await.unwrap();
                        pubch
                            .basic_publish(
                                "".into(),
                                "plain_out".into(),
                                BasicPublishOptions::default(),
                                &d.data,
                                BasicProperties::default().with_delivery_mode(2),
                            )
                            .await
                            .unwrap()
                            .await
                            .unwrap();
                    }
                    Ok(_) => break,
                    Err(_) => {
                        if stop_rx.try_recv().is_ok() {
                            break;
                        }
                    }
                }
            }
            let _ = c.close(200, "".into()).await;
        });
    });
    ready_rx.recv().unwrap();
    let rate = rt.block_on(publish_and_count(
        conn,
        "plain_in",
        "plain_out",
        bodies(n, "plain"),
    ));
    stop_tx.send(()).unwrap();
    worker.join().unwrap();
    rate
}

/// The daemon, in-process, on a fresh spool.
fn through_daemon(
    rt: &tokio::runtime::Runtime,
    conn: &Connection,
    broker: &broker::Broker,
    n: usize,
    workers: usize,
) -> f64 {
    let (dir, cfg) = farm(workers, Some(&broker.url()));
    rt.block_on(async {
        let ch = conn.create_channel().await.unwrap();
        declare(&ch, "build_image").await;
        declare(&ch, "ruote_workitems").await;
    });
    let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
    let daemon = std::thread::spawn(move || build_image::daemon::run(cfg, stop_rx));
    // Wait until it consumes.
    let started = build_image::wait::wait_for(Duration::from_secs(30), || {
        rt.block_on(async {
            let ch = conn.create_channel().await.unwrap();
            let q = ch
                .queue_declare(
                    "build_image".into(),
                    QueueDeclareOptions::durable(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let _ = ch.close(200, "".into()).await;
            q.consumer_count() == 1
        })
    });
    assert!(started, "the daemon never consumed");
    let rate = rt.block_on(publish_and_count(
        conn,
        "build_image",
        "ruote_workitems",
        bodies(n, "daemon"),
    ));
    stop_tx.send(()).unwrap();
    daemon.join().unwrap().unwrap();
    keep(dir);
    rate
}

/// BENCH_KEEP=1 keeps a daemon run's farm (its spool and event log: `build-image --config
/// FARM/bench.toml events --json` has the time of every event) and prints where it is.
fn keep(dir: tempfile::TempDir) {
    if std::env::var_os("BENCH_KEEP").is_some() {
        eprintln!("kept {}", dir.keep().display());
    }
}
