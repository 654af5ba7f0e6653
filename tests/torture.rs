//! The torture test: the real daemon binary SIGKILLed at random moments, and (every other kill,
//! seeded) inside a shared flush of its log (the test hook `BUILD_IMAGE_FLUSH_STALL_MS`: the
//! K-th flush of a start, before sled's flush or after it with its waiters not yet told), while
//! ≥ 150 workitems flow through it; at the end every input has exactly one answer, nothing is left behind,
//! every job pushed DONE, and `replay` finds no disagreement.
//!
//! Ignored by plain `cargo test` (it takes a minute); `.ci/run` runs it. Seeded: set
//! TORTURE_SEED to repeat a run; the seed is printed.

mod common;

use common::*;
use serde_json::json;
use std::collections::HashSet;
use std::process::{Child, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// xorshift64*: enough randomness for a seeded test, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Starts the daemon; with `stall` (ms), every shared flush of its log stalls inside (the
/// test hook `BUILD_IMAGE_FLUSH_STALL_MS`) and says so on its log.
fn start(farm: &Farm, log: &std::fs::File, stall: Option<u64>) -> Child {
    let mut cmd = farm.bin();
    if let Some(ms) = stall {
        cmd.env("BUILD_IMAGE_FLUSH_STALL_MS", ms.to_string());
    }
    cmd.arg("run")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log.try_clone().unwrap()))
        .spawn()
        .expect("start the daemon")
}

#[test]
#[ignore = "a minute of SIGKILLs; run by .ci/run"]
fn torture_sigkill_at_random_moments_loses_nothing_and_does_nothing_twice() {
    let seed = std::env::var("TORTURE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("TORTURE_SEED={seed}");
    eprintln!("TORTURE_SEED={seed}");
    let mut rng = Rng(seed);

    let mut farm = Farm::new();
    farm.cfg.worker.workers = 2;
    farm.cfg.worker.max_attempts = 100; // every interruption is retried: all must succeed
    farm.cfg.worker.grace = 0;
    farm.cfg.hooks.retries = 20;
    farm.cfg.hooks.retry_delay_ms = 100;
    build_image::edges::spool::Spool::new(&farm.spool(), "w1")
        .create_dirs()
        .unwrap();
    let daemon_log = std::fs::File::create(farm.root().join("daemon.log")).unwrap();

    const N: usize = 160;
    let mut names = Vec::new();
    let drop_some = |farm: &Farm, rng: &mut Rng, names: &mut Vec<String>, k: usize| {
        for _ in 0..k {
            if names.len() == N {
                return;
            }
            let i = names.len();
            let ms = rng.below(300);
            let ks = format!("# mic-fixture: sleep 0.{ms:03}\nlang en_US\n");
            let name = format!("t{i:03}.json");
            farm.drop_json(&name, &workitem(&format!("tort-{i:03}"), &ks));
            names.push(name);
        }
    };

    drop_some(&farm, &mut rng, &mut names, 40);
    let mut kills = 0;
    let log_path = farm.root().join("daemon.log");
    while kills < 8 || names.len() < N {
        // Every other kill (seeded) is timed inside a shared flush of the log: the K-th flush
        // of this start, before sled's flush or after it (its waiters not yet told).
        let in_flush = (rng.below(2) == 0).then(|| {
            (
                20 + rng.below(60),
                1 + rng.below(25),
                if rng.below(2) == 0 {
                    "under way"
                } else {
                    "written"
                },
            )
        });
        let from = std::fs::metadata(&log_path).map_or(0, |m| m.len()) as usize;
        let mut child = Guard(start(&farm, &daemon_log, in_flush.map(|f| f.0)));
        let k = rng.below(30) as usize;
        drop_some(&farm, &mut rng, &mut names, k);
        match in_flush {
            Some((ms, flush, phase)) => {
                let want = format!("flush {flush} {phase}");
                let hit = wait_for(Duration::from_secs(20), || {
                    std::fs::read(&log_path).is_ok_and(|b| {
                        String::from_utf8_lossy(&b[from.min(b.len())..]).contains(&want)
                    })
                });
                println!(
                    "kill {}: inside flush {flush} ({phase}, stall {ms} ms){}",
                    kills + 1,
                    if hit {
                        ""
                    } else {
                        ": not reached in 20 s, killed then"
                    }
                );
            }
            None => {
                // a random moment: somewhere in claiming, building, delivering or pushing
                let ms = 150 + rng.below(1200);
                std::thread::sleep(Duration::from_millis(ms));
                println!("kill {}: at {ms} ms", kills + 1);
            }
        }
        child.0.kill().unwrap(); // SIGKILL
        child.0.wait().unwrap();
        kills += 1;
    }
    println!("{kills} SIGKILLs, {} workitems", names.len());

    let mut child = Guard(start(&farm, &daemon_log, None));
    let all_answered = wait_for(Duration::from_secs(300), || {
        names.iter().all(|n| farm.outbox().join(n).exists())
    });
    let all_pushed = wait_for(Duration::from_secs(120), || {
        (0..N).all(|i| {
            farm.pushes_for(&format!("tort-{i:03}"))
                .iter()
                .any(|p| p.0 == "DONE")
        })
    });
    sigterm(&child.0);
    assert_eq!(wait_exit(&mut child.0, Duration::from_secs(60)), Some(0));
    let log = std::fs::read_to_string(farm.root().join("daemon.log")).unwrap();
    let tail: String = log
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        all_answered,
        "not every input was answered (seed {seed}); daemon log tail:\n{tail}"
    );
    assert!(all_pushed, "not every job pushed DONE (seed {seed})");

    // exactly one answer per input, each a success
    let outbox: HashSet<String> = list(&farm.outbox())
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(
        outbox,
        names.iter().cloned().collect::<HashSet<_>>(),
        "seed {seed}"
    );
    for n in &names {
        let r = farm.outbox_file(n).unwrap();
        assert_eq!(
            r["image"]["result"],
            json!(true),
            "{n} (seed {seed}): {r:#}"
        );
    }
    assert!(
        list(&farm.incoming()).is_empty(),
        "incoming/ empty (seed {seed})"
    );
    assert!(
        list(&farm.active()).is_empty(),
        "active/ empty (seed {seed}): {:?}",
        list(&farm.active())
    );
    assert!(list(&farm.rejected()).is_empty());

    // no mic outlived the daemon that started it
    for i in 0..N {
        let p = farm
            .base()
            .join(format!("requests/tort-{i:03}/img-tort-{i:03}.log"));
        let text = std::fs::read_to_string(&p).unwrap();
        for pid in fixture_pids(&text) {
            assert!(
                !alive(pid)
                    || !std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                        .unwrap_or_default()
                        .contains("mic"),
                "mic {pid} of tort-{i:03} still runs"
            );
        }
    }

    let (code, out, err) = output(farm.bin().args(["replay"]));
    assert_eq!(code, 0, "replay (seed {seed}):\n{out}{err}");
    println!("{}", out.lines().last().unwrap_or(""));
}
