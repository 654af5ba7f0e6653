//! P10 (docs/PERFORMANCE.md, issue 24): how long a KVM build waits before mic runs, with warm
//! guests and without, in the same run. Real guests: the project's test guest
//! (scripts/make-test-guest.sh, run first), under TCG; the daemon in-process (`daemon::run`),
//! one build slot, the spool.
//!
//! For `vm_warm = 0` and then `vm_warm = 1`: WARM_N builds (default 10), one after the other; for
//! each, the time from the build's `started` event (its timestamp in the event log, read after the
//! run) to the moment mic's first output line (`mic-fixture arg:`, the stand-in's first line)
//! is in the job log (polled every 5 ms on the host clock). With `vm_warm = 1` each build is
//! submitted once a warm guest is ready (its own log says so), which is what a farm with
//! `vm_warm = workers` sees when builds last longer than a boot. Prints p50 and max of each.
//!
//! Not run by `cargo bench`'s default set: `cargo bench --bench warm_start` (it takes minutes).

mod common;

use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

fn guest_dir() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-test-guest.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/make-test-guest.sh");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("make-test-guest: "))
        .filter_map(|l| l.split_whitespace().next())
        .map(PathBuf::from)
        .find(|p| p.join("base.qcow2").is_file())
        .expect("the script names the guest directory")
}

fn ready_guests(img_tmp: &Path) -> usize {
    std::fs::read_dir(img_tmp)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("build-image-vm-warm-")
                && n.ends_with(".boot")
                && std::fs::read_to_string(e.path())
                    .is_ok_and(|t| t.contains("health check passed: ready"))
        })
        .count()
}

/// One run of `n` builds with `vm_warm = warm`: seconds from `started` to mic's first output.
fn run(g: &Path, warm: u64, n: usize) -> Vec<f64> {
    let dir = tempfile::Builder::new()
        .prefix("build-image-bench-warm-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    let toml = format!(
        r#"[worker]
base_dir = "{base}"
base_url = "http://img.example.org/images"
sudo = false
workers = 1
timeout = 600
use_kvm = true
vm_accel = "tcg"
vm_wait = 600
vm_warm = {warm}
img_tmp = "{tmp}"
vm_base_img = "{g}/base.qcow2"
vm_kernel = "{g}/vmlinuz"
vm_initrd = "{g}/initrd.img"
vm_ssh_key = "{g}/id_ed25519"
vm_append = "root=/dev/vda rw console=ttyS0 panic=1"
infra_retries = 0

[spool]
dir = "{spool}"
worker_id = "w1"
poll_interval_ms = 100
min_age_ms = 50
"#,
        base = d.join("images").display(),
        tmp = d.join("vmtmp").display(),
        g = g.display(),
        spool = d.join("spool").display(),
    );
    let cfg = build_image::config::Config::parse(&toml, Path::new("bench.toml")).unwrap();
    let state = cfg.state_dir();
    let img_tmp = d.join("vmtmp");
    let spool = build_image::edges::spool::Spool::new(&cfg.spool.dir, "w1");
    spool.create_dirs().unwrap();
    let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
    let daemon = std::thread::spawn(move || build_image::daemon::run(cfg, stop_rx));
    let mut mic_at = Vec::new();
    for i in 0..n {
        if warm > 0 {
            assert!(
                build_image::wait::wait_for(Duration::from_secs(1200), || ready_guests(&img_tmp)
                    >= 1),
                "no warm guest got ready"
            );
        }
        let id = format!("b{warm}-{i}");
        let body = json!({"image": {"image_id": id, "kickstart": "# ks\n", "image_type": "fs",
                                    "name": format!("n{i}"), "arch": "i586"}, "msg": []});
        let name = format!("{id}.json");
        std::fs::write(spool.tmp.join(&name), serde_json::to_vec(&body).unwrap()).unwrap();
        std::fs::rename(spool.tmp.join(&name), spool.incoming.join(&name)).unwrap();
        let log = d.join(format!("images/requests/{id}/n{i}.log"));
        let mut first = None;
        let deadline = Instant::now() + Duration::from_secs(1800);
        while Instant::now() < deadline && !spool.outbox.join(&name).exists() {
            if first.is_none()
                && std::fs::read_to_string(&log).is_ok_and(|t| t.contains("mic-fixture arg:"))
            {
                first = Some(SystemTime::now());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let answer = std::fs::read_to_string(spool.outbox.join(&name)).unwrap_or_default();
        assert!(
            answer.contains("\"result\": true"),
            "build {id} failed: {answer}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        mic_at.push((id, first.expect("mic's first output was seen")));
    }
    stop_tx.send(()).unwrap();
    daemon.join().unwrap().unwrap();
    let journal = build_image::journal::Journal::open(&state).unwrap();
    let secs = mic_at
        .iter()
        .map(|(id, at)| {
            let job = journal.jobs_for_image(id).unwrap()[0];
            let started = journal
                .job_events(job)
                .unwrap()
                .into_iter()
                .find(|e| e.kind.tag() == build_image::domain::event::Tag::Started)
                .expect("a started event");
            let t = humantime::parse_rfc3339(&started.ts).unwrap();
            at.duration_since(t).unwrap_or_default().as_secs_f64()
        })
        .collect();
    secs
}

fn p50_max(xs: &[f64]) -> (f64, f64) {
    let s = common::stats(xs);
    (s.median, s.max)
}

fn main() {
    let n: usize = std::env::var("WARM_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let g = guest_dir();
    let mut rows = Vec::new();
    for warm in [0, 1] {
        let xs = run(&g, warm, n);
        eprintln!(
            "vm_warm = {warm}: {}",
            xs.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        rows.push((warm, p50_max(&xs)));
    }
    println!("P10 started -> mic's first output, {n} builds each, same run (TCG):");
    for (warm, (p50, max)) in &rows {
        println!("  vm_warm = {warm}: p50 {p50:.2} s, max {max:.2} s");
    }
    let ratio = rows[1].1.0 / rows[0].1.0;
    println!("  warm/cold p50: {ratio:.3}x");
}
