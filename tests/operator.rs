//! Operator commands, run as the binary against a real daemon and with none running, on real
//! builds (the mic fixture): outputs parsed as JSON, exit codes checked.

mod common;

use common::*;
use serde_json::{Value, json};
use std::io::BufRead;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

const T: Duration = Duration::from_secs(60);

fn json_out(farm: &Farm, args: &[&str]) -> Value {
    let (code, out, err) = output(farm.bin().args(args));
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
}

/// The events of `events --json` output (its trailer checked and left out).
fn json_lines(text: &str) -> Vec<Value> {
    export_events(text)
}

/// Waits until `n` jobs are queued, as `status` says.
fn wait_queued(farm: &Farm, n: usize) {
    assert!(wait_for(T, || json_out(
        farm,
        &["status", "--json", "--state", "queued"]
    )
    .as_array()
    .is_some_and(|a| a.len() == n)));
}

/// The kinds of a job's events, the BUILDING push left out (see `is_building_push`).
fn kinds(view: &Value) -> Vec<String> {
    view["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !(e["kind"] == "pushed" && e["status"] == "BUILDING"))
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn status_show_events_the_same_with_and_without_a_daemon() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    farm.drop_json("a.json", &workitem("op-a", "ks\n"));
    farm.drop_json("b.json", &workitem("op-b", "# mic-fixture: fail 4\n"));
    farm.wait_outbox("a.json", T);
    farm.wait_outbox("b.json", T);
    farm.wait_pushes("op-a", 2);
    farm.wait_pushes("op-b", 2);
    farm.wait_pushed_events(4);

    let online_status = json_out(&farm, &["status", "--json"]);
    let online_show = json_out(&farm, &["show", "op-a", "--json"]);
    let (code, online_events, _) = output(farm.bin().args(["events", "--json", "--image", "op-b"]));
    assert_eq!(code, 0);
    let (code, table, _) = output(farm.bin().args(["status"]));
    assert_eq!(code, 0);
    d.stop().unwrap();

    // status: newest first, one row per job
    let rows = online_status.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!(
        rows[0]["job"].as_u64() > rows[1]["job"].as_u64(),
        "newest first"
    );
    let row = |id: &str| {
        rows.iter()
            .find(|r| r["image_id"] == json!(id))
            .unwrap()
            .clone()
    };
    let (a, b) = (row("op-a"), row("op-b"));
    assert_eq!(b["state"], json!("error"));
    assert!(b["error"].as_str().unwrap().contains("status 4"));
    assert_eq!(a["state"], json!("done"));
    assert_eq!(a["result"], json!(true));
    assert_eq!(a["worker"], json!("w1"));
    assert_eq!(a["name"], json!("img-op-a"));
    assert_eq!(a["source"], json!("spool"));
    assert!(a["duration"].as_f64().unwrap() >= 0.0);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "JOB", "IMAGE_ID", "STATE", "NAME", "ARCH", "TYPE", "WORKER", "STARTED", "DURATION",
            "RESULT", "SOURCE"
        ]
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains("op-a") && l.contains(" done ") && l.contains(" ok")),
        "{table}"
    );

    // show: events in order and the workitem as the outbox has it
    assert_eq!(
        kinds(&online_show),
        [
            "claimed",
            "queued",
            "started",
            "finished",
            "delivered",
            "pushed"
        ]
    );
    assert_eq!(online_show["workitem"], farm.outbox_file("a.json").unwrap());
    assert_eq!(
        online_show["logfile_url"],
        json!("http://img.test/images/requests/op-a/img-op-a.log")
    );
    assert!(
        online_show["log_path"]
            .as_str()
            .unwrap()
            .ends_with("images/requests/op-a/img-op-a.log")
    );

    // events: JSON Lines of that job only
    let evs = json_lines(&online_events);
    assert_eq!(evs.len(), 7);
    assert!(evs.iter().all(|e| e["job"] == evs[0]["job"]));
    assert!(
        evs.windows(2)
            .all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64())
    );

    // the same answers with no daemon running (the log opened directly)
    assert_eq!(json_out(&farm, &["status", "--json"]), online_status);
    assert_eq!(json_out(&farm, &["show", "op-a", "--json"]), online_show);
    let (code, offline_events, _) =
        output(farm.bin().args(["events", "--json", "--image", "op-b"]));
    assert_eq!(code, 0);
    assert_eq!(offline_events, online_events);
    let (code, text, _) = output(farm.bin().args(["events", "--kind", "finished"]));
    assert_eq!(code, 0);
    assert_eq!(text.lines().count(), 2, "{text}");
    let (code, _, err) = output(farm.bin().args(["show", "no-such-job"]));
    assert_eq!(code, 1);
    assert!(
        err.contains("no job with image_id or job number \"no-such-job\""),
        "{err}"
    );
    let filtered = json_out(&farm, &["status", "--json", "--state", "error"]);
    assert_eq!(filtered.as_array().unwrap().len(), 1);
}

#[test]
fn submit_wait_for_a_good_and_a_failing_build() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.worker.grace = 0;
    let d = farm.start();
    let ks = farm.root().join("good.ks");
    std::fs::write(&ks, "lang en_US\n").unwrap();
    let (code, out, err) = output(farm.bin().args([
        "submit",
        "--kickstart",
        ks.to_str().unwrap(),
        "--name",
        "mer-core",
        "--arch",
        "i586",
        "--type",
        "fs",
        "--release",
        "0.1",
        "--extra-opt=--pkgmgr=zypp",
        "--wait",
        "--timeout",
        "60",
    ]));
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_string();
    assert!(id.starts_with("mer-core-"), "{id}");
    let r = farm.outbox_file(&format!("{id}.json")).unwrap();
    assert_eq!(r["image"]["result"], json!(true));
    assert_eq!(r["image"]["extra_opts"], json!(["--pkgmgr=zypp"]));
    assert_eq!(r["image"]["release"], json!("0.1"));

    let bad = farm.root().join("bad.ks");
    std::fs::write(&bad, "# mic-fixture: fail 2\n").unwrap();
    let (code, out, err) = output(farm.bin().args([
        "submit",
        "--kickstart",
        bad.to_str().unwrap(),
        "--name",
        "n",
        "--arch",
        "i586",
        "--type",
        "loop",
        "--id",
        "bad-1",
        "--wait",
    ]));
    assert_eq!(code, 1, "{err}");
    assert_eq!(out.trim(), "bad-1");
    assert!(err.contains("FAILED"), "{err}");

    // the same id again: its answer is already in the outbox
    let (code, _, err) = output(farm.bin().args([
        "submit",
        "--kickstart",
        bad.to_str().unwrap(),
        "--name",
        "n",
        "--arch",
        "i586",
        "--type",
        "loop",
        "--id",
        "bad-1",
    ]));
    assert_eq!(code, 1);
    assert!(err.contains("outbox/bad-1.json exists already"), "{err}");

    let slow = farm.root().join("slow.ks");
    std::fs::write(&slow, "# mic-fixture: sleep 30\n").unwrap();
    let (code, _, _) = output(farm.bin().args([
        "submit",
        "--kickstart",
        slow.to_str().unwrap(),
        "--name",
        "n",
        "--arch",
        "i586",
        "--type",
        "loop",
        "--wait",
        "--timeout",
        "1",
    ]));
    assert_eq!(code, 3, "timed out");
    let (code, _, err) = output(farm.bin().args([
        "submit",
        "--kickstart",
        slow.to_str().unwrap(),
        "--name",
        "n",
    ]));
    assert_eq!(code, 2, "usage: --arch and --type missing: {err}");
    drop(d);
}

#[test]
fn run_once_exits_0_when_all_succeed_and_1_otherwise() {
    init_log();
    let farm = Farm::new();
    build_image::edges::spool::Spool::new(&farm.spool(), "w1")
        .create_dirs()
        .unwrap();
    farm.drop_json("a.json", &workitem("once-a", "ks\n"));
    farm.drop_json("b.json", &workitem("once-b", "ks\n"));
    let (code, _, err) = output(farm.bin().args(["run", "--once"]));
    assert_eq!(code, 0, "{err}");
    for f in ["a.json", "b.json"] {
        assert_eq!(farm.outbox_file(f).unwrap()["image"]["result"], json!(true));
    }
    assert_eq!(
        farm.pushes_for("once-a").len(),
        2,
        "pushes done before exit"
    );

    farm.drop_json("c.json", &workitem("once-c", "ks\n"));
    farm.drop_json("d.json", &workitem("once-d", "# mic-fixture: fail 1\n"));
    let (code, _, err) = output(farm.bin().args(["run", "--once"]));
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        farm.outbox_file("c.json").unwrap()["image"]["result"],
        json!(true)
    );
    assert_eq!(
        farm.outbox_file("d.json").unwrap()["image"]["result"],
        json!(false)
    );
    assert!(list(&farm.incoming()).is_empty());

    // nothing to do: exit 0 at once
    let (code, _, err) = output(farm.bin().args(["run", "--once"]));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn cancel_a_queued_and_a_running_build() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.worker.workers = 1;
    let d = farm.start();
    farm.drop_json("run.json", &workitem("c-run", "# mic-fixture: sleep 300\n"));
    let log = farm.wait_mic_running("c-run");
    farm.drop_json("queued.json", &workitem("c-queued", "ks\n"));
    wait_queued(&farm, 1);

    let (code, out, err) = output(farm.bin().args(["cancel", "c-queued"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cancelled and answered"), "{out}");
    let r = farm.wait_outbox("queued.json", T);
    assert_eq!(r["image"]["result"], json!(false));
    assert_eq!(r["image"]["error"], json!("cancelled"));
    assert_eq!(
        farm.wait_pushes("c-queued", 1)
            .into_iter()
            .map(|p| p.0)
            .collect::<Vec<_>>(),
        ["ERROR"]
    );
    // never built: no kickstart, no build log, no mic run (its folder may exist: the farm-wide
    // claim of its image_id is made when it is queued)
    for f in ["img-c-queued.ks", "img-c-queued.log"] {
        assert!(
            !farm.base().join("requests/c-queued").join(f).exists(),
            "never built, but {f} is there"
        );
    }
    assert_eq!(mic_runs(&farm, "c-queued"), 0);

    let (code, out, err) = output(farm.bin().args(["cancel", "c-run"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("being cancelled"), "{out}");
    let r = farm.wait_outbox("run.json", T);
    assert_eq!(r["image"]["error"], json!("cancelled"));
    let pids = fixture_pids(&std::fs::read_to_string(&log).unwrap());
    assert!(
        wait_for(Duration::from_secs(10), || {
            !build_image::process::group_alive(pids[0])
        }),
        "group gone"
    );
    assert!(pids.iter().all(|p| !alive(*p)));
    let statuses: Vec<String> = farm
        .wait_pushes("c-run", 2)
        .into_iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(statuses, ["BUILDING", "ERROR"]);

    let (code, _, err) = output(farm.bin().args(["cancel", "c-run"]));
    assert_eq!(code, 1, "already finished");
    assert!(
        err.contains("only a queued or running job can be cancelled"),
        "{err}"
    );
    d.stop().unwrap();
}

#[test]
fn retry_a_failed_build_online_and_offline() {
    init_log();
    let farm = Farm::new();
    let flag = farm.root().join("mirror-is-back");
    let ks = format!("# mic-fixture: fail-unless {}\n", flag.display());
    let d = farm.start();
    farm.drop_json("r.json", &workitem("r-1", &ks));
    assert_eq!(
        farm.wait_outbox("r.json", T)["image"]["result"],
        json!(false)
    );
    farm.wait_pushes("r-1", 2);
    std::fs::write(&flag, b"").unwrap();
    std::fs::remove_file(farm.outbox().join("r.json")).unwrap();
    let (code, out, err) = output(farm.bin().args(["retry", "r-1"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("queued again"), "{out}");
    assert_eq!(
        farm.wait_outbox("r.json", T)["image"]["result"],
        json!(true)
    );
    farm.wait_pushes("r-1", 4);
    let view = json_out(&farm, &["show", "r-1", "--json"]);
    assert!(kinds(&view).contains(&"requeued".to_string()));
    let attempts: Vec<u64> = view["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "started")
        .map(|e| e["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts, [1, 2]);
    d.stop().unwrap();

    // offline: queued in the log, built by the next start
    std::fs::remove_file(farm.outbox().join("r.json")).unwrap();
    let (code, out, err) = output(farm.bin().args(["retry", "r-1"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("built when the daemon starts"), "{out}");
    assert_eq!(
        json_out(&farm, &["status", "--json"])[0]["state"],
        json!("queued")
    );
    let d = farm.start();
    assert_eq!(
        farm.wait_outbox("r.json", T)["image"]["result"],
        json!(true)
    );
    d.stop().unwrap();
    let (code, _, _) = output(farm.bin().args(["retry", "nope"]));
    assert_eq!(code, 1);
}

#[test]
fn requeue_a_dead_workers_files() {
    init_log();
    let farm = Farm::new();
    let spool = build_image::edges::spool::Spool::new(&farm.spool(), "w1");
    spool.create_dirs().unwrap();
    let dead = farm.spool().join("active/deadhost");
    std::fs::create_dir_all(&dead).unwrap();
    std::fs::write(
        dead.join("orphan.json"),
        serde_json::to_vec(&workitem("orphan", "ks\n")).unwrap(),
    )
    .unwrap();
    // no daemon ever ran: there is no log to record the move in
    let (code, _, err) = output(farm.bin().args(["requeue", "--worker", "deadhost"]));
    assert_eq!(code, 1);
    assert!(err.contains("no event log"), "{err}");
    let (code, _, _) = output(farm.bin().args(["run", "--once"]));
    assert_eq!(code, 0);
    let (code, out, err) = output(farm.bin().args(["requeue", "--worker", "deadhost"]));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("1 file(s) of worker deadhost moved back"),
        "{out}"
    );
    assert_eq!(list(&farm.incoming()), ["orphan.json"]);
    let (code, _, _) = output(farm.bin().args(["requeue", "--worker", "w1"]));
    assert_eq!(code, 1, "not our own worker id");
    let d = farm.start();
    assert_eq!(
        farm.wait_outbox("orphan.json", T)["image"]["result"],
        json!(true)
    );
    d.stop().unwrap();
    let evs = json_lines(&output(farm.bin().args(["events", "--json", "--kind", "requeued"])).1);
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0]["from_worker"], json!("deadhost"));
}

#[test]
fn replay_consistent_then_tampered() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.worker.workers = 1;
    farm.cfg.worker.grace = 0;
    let d = farm.start();
    farm.drop_json("ok.json", &workitem("rp-ok", "ks\n"));
    farm.wait_outbox("ok.json", T);
    farm.wait_pushes("rp-ok", 2);
    let (code, out, err) = output(farm.bin().args(["replay"]));
    assert_eq!(code, 0, "through the daemon: {out}{err}");
    assert!(out.contains("0 disagreement(s)"), "{out}");
    farm.drop_json(
        "hang.json",
        &workitem("rp-hang", "# mic-fixture: sleep 300\n"),
    );
    farm.wait_mic_running("rp-hang");
    farm.drop_json("queued.json", &workitem("rp-queued", "ks\n"));
    wait_queued(&farm, 1);
    d.stop().unwrap(); // grace 0: the hanging build is interrupted; the queued one stays queued

    let (code, out, _) = output(farm.bin().args(["replay"]));
    assert_eq!(
        code, 0,
        "stopped with work pending is still consistent: {out}"
    );
    let report = json_out(&farm, &["replay", "--json"]);
    assert!(report["events"].as_u64().unwrap() >= 10);
    assert!(report["events_per_second"].as_f64().unwrap() > 0.0);

    // an operator tampers with the spool
    std::fs::write(farm.active().join("stray.json"), b"{}").unwrap();
    std::fs::remove_file(farm.active().join("queued.json")).unwrap();
    std::fs::write(farm.outbox().join("hang.json"), b"{}").unwrap();
    let (code, out, _) = output(farm.bin().args(["replay"]));
    assert_eq!(code, 1, "{out}");
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("DISAGREE ")).collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("active/w1/stray.json: no job claims it")),
        "{out}"
    );
    assert!(
        lines.iter().any(
            |l| l.contains("(rp-queued) is queued, but its file active/w1/queued.json is gone")
        ),
        "{out}"
    );
    assert!(
        lines.iter().any(|l| l.contains(
            "outbox/hang.json: this worker claimed hang.json but the log has no delivered event"
        )),
        "{out}"
    );
    assert!(out.contains("3 disagreement(s)"));
}

#[test]
fn events_follow_shows_a_new_event_within_a_second() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    farm.drop_json("first.json", &workitem("f-1", "ks\n"));
    farm.wait_pushes("f-1", 2);
    let mut child = Guard(
        farm.bin()
            .args(["events", "--follow", "--json"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = crossbeam_channel::unbounded::<(SystemTime, Value)>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let v: Value = serde_json::from_str(&line).unwrap();
            if tx.send((SystemTime::now(), v)).is_err() {
                break;
            }
        }
    });
    // the history first
    let mut seen = Vec::new();
    assert!(wait_for(T, || {
        seen.extend(rx.try_iter());
        seen.iter().filter(|(_, e)| e["kind"] == "pushed").count() == 2
    }));
    farm.drop_json("second.json", &workitem("f-2", "ks\n"));
    let mut got = None;
    assert!(wait_for(T, || {
        for (at, e) in rx.try_iter() {
            if e["kind"] == "claimed" && e["file"] == "second.json" {
                got = Some((at, e));
            }
        }
        got.is_some()
    }));
    // shown live, while the follower runs; how soon is measured, not asserted (no test asserts a
    // timing: the latency of the pipeline is benchmarked in benches/, see docs/PERFORMANCE.md)
    let (at, e) = got.unwrap();
    let appended = humantime::parse_rfc3339(e["ts"].as_str().unwrap()).unwrap();
    eprintln!(
        "event shown {:?} after it was appended",
        at.duration_since(appended).unwrap_or_default()
    );
    assert!(e["job"].as_u64().is_some(), "{e}");
    drop(child); // killed
    d.stop().unwrap();
}

#[test]
fn cancel_with_no_daemon_and_requeue_with_one() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.worker.workers = 1;
    farm.cfg.worker.grace = 0;
    let d = farm.start();
    farm.drop_json(
        "hang.json",
        &workitem("co-hang", "# mic-fixture: sleep 300\n"),
    );
    farm.wait_mic_running("co-hang");
    farm.drop_json("q.json", &workitem("co-queued", "ks\n"));
    wait_queued(&farm, 1);
    d.stop().unwrap(); // the queued job stays queued in the log

    // no daemon: the queued job is cancelled and answered at once; its ERROR is pushed by
    // the next daemon start (a command pushes nothing)
    let (code, out, err) = output(farm.bin().args(["cancel", "co-queued"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cancelled and answered"), "{out}");
    let r = farm.outbox_file("q.json").expect("answered offline");
    assert_eq!(r["image"]["error"], json!("cancelled"));
    assert!(farm.pushes_for("co-queued").is_empty());

    // a daemon runs: requeue hands a dead worker's file back and it is built
    let dead = farm.spool().join("active/deadhost");
    std::fs::create_dir_all(&dead).unwrap();
    std::fs::write(
        dead.join("lost.json"),
        serde_json::to_vec(&workitem("co-lost", "ks\n")).unwrap(),
    )
    .unwrap();
    let mut farm2 = Farm {
        dir: tempfile::tempdir().unwrap(),
        cfg: farm.cfg.clone(),
    };
    // the hanging build, interrupted by the stop, is built again in one slot; the other
    // builds the requeued file
    farm2.cfg.worker.workers = 2;
    let d = farm2.start();
    assert_eq!(
        farm.wait_pushes("co-queued", 1)
            .into_iter()
            .map(|p| p.0)
            .collect::<Vec<_>>(),
        ["ERROR"]
    );
    let (code, out, err) = output(farm.bin().args(["requeue", "--worker", "deadhost"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("incoming/lost.json"), "{out}");
    assert_eq!(
        farm.wait_outbox("lost.json", T)["image"]["result"],
        json!(true)
    );
    d.stop().unwrap();
}
