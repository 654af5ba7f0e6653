//! `build-image log ID [--follow]` through the binary: with a daemon running (over its control
//! socket) and without one (from the log and the file), following a build as it prints, waiting
//! for a queued job, the exit status = the job's result, and a log cut by its size bound.

mod common;

use common::*;
use std::io::Read;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A `log --follow` child whose stdout and stderr are collected by threads as they come.
struct Follower {
    child: Guard,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
}

fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = Arc::clone(&buf);
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

impl Follower {
    fn start(farm: &Farm, id: &str) -> Follower {
        let mut child: Child = farm
            .bin()
            .args(["log", id, "--follow"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = collect(child.stdout.take().unwrap());
        let err = collect(child.stderr.take().unwrap());
        Follower {
            child: Guard(child),
            out,
            err,
        }
    }
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }
    fn err(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }
    /// Its exit code, once its output has been read to the end.
    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let code = wait_exit(&mut self.child.0, timeout);
        // the reader threads see EOF right after the exit
        let (out, err) = (Arc::clone(&self.out), Arc::clone(&self.err));
        wait_for(Duration::from_secs(5), || {
            Arc::strong_count(&out) == 2 && Arc::strong_count(&err) == 2
        });
        code
    }
}

fn log_of(farm: &Farm, id: &str) -> std::path::PathBuf {
    farm.base().join(format!("requests/{id}/img-{id}.log"))
}

/// Kills the sleep child the mic fixture printed last (its build then goes on and succeeds).
fn end_sleep(farm: &Farm, id: &str, nth: usize) {
    let log = log_of(farm, id);
    let mut pid = None;
    assert!(
        wait_for(Duration::from_secs(60), || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let pids: Vec<i32> = text
                .lines()
                .filter_map(|l| l.strip_prefix("mic-fixture child pid: "))
                .filter_map(|p| p.trim().parse().ok())
                .collect();
            pid = pids.get(nth - 1).copied();
            pid.is_some()
        }),
        "sleep {nth} of {id} never started"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid.unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[test]
fn follow_through_the_daemon_prints_as_it_grows_and_exits_with_the_result() {
    let mut farm = Farm::new();
    farm.cfg.worker.workers = 1;
    let _daemon = farm.start_binary();
    farm.drop_json(
        "slow.json",
        &workitem("slow", "# mic-fixture: spew 3\n# mic-fixture: sleep 300\n"),
    );
    // queued behind "slow" (one build slot): the follower waits for its build to start
    farm.drop_json("next.json", &workitem("next", "# mic-fixture: spew 2\n"));
    farm.wait_mic_running("slow");
    let mut slow = Follower::start(&farm, "slow");
    let mut next = Follower::start(&farm, "next");
    assert!(
        wait_for(Duration::from_secs(20), || slow
            .out()
            .contains("mic-fixture: sleeping")),
        "the follower did not print the running build's output: {:?} {:?}",
        slow.out(),
        slow.err()
    );
    assert!(
        !slow.out().contains("Info: Finished"),
        "printed what was not written yet"
    );
    assert!(
        wait_for(Duration::from_secs(20), || next
            .err()
            .contains("waiting for its build to start")),
        "{:?}",
        next.err()
    );
    assert_eq!(
        slow.child.0.try_wait().unwrap(),
        None,
        "exited before the end"
    );

    end_sleep(&farm, "slow", 1);
    assert_eq!(
        slow.wait(Duration::from_secs(60)),
        Some(0),
        "{}",
        slow.err()
    );
    assert_eq!(
        next.wait(Duration::from_secs(60)),
        Some(0),
        "{}",
        next.err()
    );
    // every byte of the log, in order, once
    for (f, id) in [(&slow, "slow"), (&next, "next")] {
        let file = std::fs::read_to_string(log_of(&farm, id)).unwrap();
        assert_eq!(f.out(), file, "{id}");
        assert!(file.contains("Info: Finished"), "{file}");
    }

    // a failing build: the follower exits 1 and says why
    farm.drop_json("bad.json", &workitem("bad", "# mic-fixture: fail 3\n"));
    let mut bad = Follower::start(&farm, "bad");
    assert_eq!(bad.wait(Duration::from_secs(60)), Some(1));
    assert!(
        bad.out().contains("failed to create image"),
        "{}",
        bad.out()
    );
    assert!(bad.err().contains("failed"), "{}", bad.err());

    // answered without a build (invalid: no arch): no log, exit 1 with the reason
    let mut invalid = workitem("inv", "ks\n");
    invalid["image"].as_object_mut().unwrap().remove("arch");
    farm.drop_json("inv.json", &invalid);
    farm.wait_outbox("inv.json", Duration::from_secs(30));
    for follow in [false, true] {
        let mut c = farm.bin();
        c.args(["log", "inv"]);
        if follow {
            c.arg("--follow");
        }
        let (code, out, err) = output(&mut c);
        assert_eq!(code, 1, "{out} {err}");
        assert!(err.contains("answered without a build"), "{err}");
        assert!(out.is_empty(), "{out}");
    }

    // not a workitem at all (rejected, known by its job number only): no log either
    build_image::cli::drop_file(&farm.spool(), "junk.json", b"[1]").unwrap();
    assert!(wait_for(Duration::from_secs(30), || farm
        .rejected()
        .join("junk.json.reason")
        .exists()));
    let (_, rows, _) = output(farm.bin().args(["status", "--json", "--state", "rejected"]));
    let rows: serde_json::Value = serde_json::from_str(&rows).unwrap();
    let job = rows[0]["job"].as_u64().unwrap().to_string();
    let (code, out, err) = output(farm.bin().args(["log", &job, "--follow"]));
    assert_eq!(code, 1, "{out} {err}");
    assert!(err.contains("answered without a build (rejected)"), "{err}");

    // no such job (--follow first gives a file just dropped the time to be claimed)
    for follow in [false, true] {
        let mut c = farm.bin();
        c.args(["log", "no-such-job"]);
        if follow {
            c.arg("--follow");
        }
        let (code, _, err) = output(&mut c);
        assert_eq!(code, 1);
        assert!(err.contains("no job with image_id"), "{err}");
    }
    // usage
    let (code, _, _) = output(farm.bin().args(["log"]));
    assert_eq!(code, 2);
}

#[test]
fn without_a_daemon_from_the_file_and_a_queued_job_is_waited_for() {
    let mut farm = Farm::new();
    farm.cfg.worker.workers = 1;
    farm.cfg.worker.grace = 0;
    let mut daemon = farm.start_binary();
    farm.drop_json("a.json", &workitem("a", "# mic-fixture: sleep 300\n"));
    farm.wait_mic_running("a");
    farm.drop_json("b.json", &workitem("b", "# mic-fixture: spew 4\n"));
    assert!(
        wait_for(Duration::from_secs(20), || {
            let (code, _, err) = output(farm.bin().args(["log", "b"]));
            code == 1 && err.contains("no build log yet")
        }),
        "b never queued"
    );
    sigterm(&daemon.0);
    assert_eq!(wait_exit(&mut daemon.0, Duration::from_secs(30)), Some(0));

    // No daemon: a's log (its build interrupted) is printed from the file.
    let (code, out, err) = output(farm.bin().args(["log", "a"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, std::fs::read_to_string(log_of(&farm, "a")).unwrap());
    assert!(out.contains("mic-fixture: sleeping"));
    // b is queued in the log: no log yet; --follow waits, across the daemon's start
    let (code, _, err) = output(farm.bin().args(["log", "b"]));
    assert_eq!(code, 1);
    assert!(err.contains("b) is queued: no build log yet"), "{err}");
    let mut b = Follower::start(&farm, "b");
    assert!(
        wait_for(Duration::from_secs(20), || b
            .err()
            .contains("waiting for its build to start")),
        "{}",
        b.err()
    );
    let _daemon = farm.start_binary();
    end_sleep(&farm, "a", 2); // a is built again first (attempt 2)
    assert_eq!(b.wait(Duration::from_secs(60)), Some(0), "{}", b.err());
    assert_eq!(
        b.out(),
        std::fs::read_to_string(log_of(&farm, "b")).unwrap()
    );
    assert_eq!(b.out().matches("mic-fixture: output line").count(), 4);
}

#[test]
fn a_log_cut_by_its_bound_is_followed_and_prints_as_the_file_reads() {
    let mut farm = Farm::new();
    farm.cfg.worker.workers = 1;
    farm.cfg.worker.job_log_max_mb = 1;
    let mut daemon = farm.start_binary();
    farm.drop_json("hold.json", &workitem("hold", "# mic-fixture: sleep 300\n"));
    farm.wait_mic_running("hold");
    // 3 MB of output into a log bounded to 1 MiB: cut several times while it is followed
    farm.drop_json("big.json", &workitem("big", "# mic-fixture: spew 30000\n"));
    let mut f = Follower::start(&farm, "big");
    assert!(
        wait_for(Duration::from_secs(20), || f
            .err()
            .contains("waiting for its build to start")),
        "{}",
        f.err()
    );
    end_sleep(&farm, "hold", 1);
    assert_eq!(f.wait(Duration::from_secs(60)), Some(0), "{}", f.err());
    let file = std::fs::read_to_string(log_of(&farm, "big")).unwrap();
    assert!(file.len() < 1536 * 1024 + 100, "{}", file.len());
    let marker_at = file
        .find("bytes of output omitted ...]\n")
        .expect("the file was cut");
    let after_marker = marker_at + "bytes of output omitted ...]\n".len();
    let head = 512 * 1024;
    let printed = f.out();
    assert!(printed.starts_with(&file[..head]), "the head, whole");
    assert!(printed.ends_with(&file[after_marker..]), "the tail, whole");
    assert!(printed.contains("Info: Finished"));
    // every line printed is a line written (or, before a note of what was cut, its start)
    let spew = "mic-fixture: output line of a chatty creator, padded to one hundred bytes \
                .....................";
    let lines: Vec<&str> = printed.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let note_next = lines.get(i + 1).is_some_and(|n| n.starts_with("[... "));
        let whole =
            l.starts_with("[... ") || !l.starts_with("mic-fixture: output line") || *l == spew;
        assert!(whole || note_next, "torn line {i}: {l:?}");
    }

    sigterm(&daemon.0);
    assert_eq!(wait_exit(&mut daemon.0, Duration::from_secs(30)), Some(0));
    // read after the fact, without a daemon: the same text as the file
    let (code, out, err) = output(farm.bin().args(["log", "big"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, file);
    // a reader that goes away (`log big | head -c 10`): a quiet exit
    let mut c = farm
        .bin()
        .args(["log", "big"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ten = [0u8; 10];
    c.stdout.take().unwrap().read_exact(&mut ten).unwrap(); // then dropped: the pipe closes
    let out = c.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
