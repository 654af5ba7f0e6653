//! The binary, used as an operator would: start with no config, stop with SIGTERM, bad config,
//! submit, a second daemon on the same state dir.

mod common;

use common::*;
use serde_json::json;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

#[test]
fn run_with_no_config_starts_on_dot_spool_and_sigterm_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Guard(
        bin()
            .arg("run")
            .current_dir(dir.path())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let spool = dir.path().join("spool");
    let up = wait_for(Duration::from_secs(20), || {
        spool.join("incoming").is_dir()
            && spool.join("outbox").is_dir()
            && spool.join("rejected").is_dir()
            && std::fs::read_dir(spool.join("state"))
                .map(|mut d| d.next().is_some())
                .unwrap_or(false)
    });
    assert!(up, "daemon did not set up ./spool");
    sigterm(&child.0);
    assert_eq!(wait_exit(&mut child.0, Duration::from_secs(20)), Some(0));
}

#[test]
fn bad_config_is_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[worker]\nbase_dirr = \"/x\"\n").unwrap();
    let out = bin()
        .args(["--config", cfg.to_str().unwrap(), "run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("base_dirr") && err.contains("c.toml"), "{err}");
    let out = bin()
        .args(["--config", "/nonexistent.toml", "run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.toml"));
    let out = bin().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn submit_drops_files_and_prints_ids() {
    let farm = Farm::new();
    let f = farm.root().join("job.json");
    std::fs::write(&f, b"{}").unwrap();
    let out = bin()
        .args([
            "--spool",
            farm.spool().to_str().unwrap(),
            "submit",
            f.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has no tmp folder"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    build_image::edges::spool::Spool::new(&farm.spool(), "w1")
        .create_dirs()
        .unwrap();
    std::fs::write(&f, serde_json::to_vec(&workitem("sub-1", "ks")).unwrap()).unwrap();
    let out = bin()
        .args([
            "--spool",
            farm.spool().to_str().unwrap(),
            "submit",
            f.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "sub-1\n");
    assert_eq!(list(&farm.incoming()), vec!["job.json"]);
    assert!(list(&farm.spool().join("tmp")).is_empty());
    std::fs::write(farm.root().join("junk.json"), b"[1]").unwrap();
    let out = bin()
        .args([
            "--spool",
            farm.spool().to_str().unwrap(),
            "submit",
            farm.root().join("junk.json").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a workitem"));
}

#[test]
fn sigterm_lets_a_running_build_finish() {
    let mut farm = Farm::new();
    farm.cfg.worker.grace = 60;
    let mut child = farm.start_binary();
    farm.drop_json("slow.json", &workitem("slow", "# mic-fixture: sleep 2\n"));
    farm.wait_mic_running("slow");
    sigterm(&child.0);
    assert_eq!(wait_exit(&mut child.0, Duration::from_secs(60)), Some(0));
    let r = farm.outbox_file("slow.json").expect("finished before exit");
    assert_eq!(r["image"]["result"], json!(true));
}

#[test]
fn sigterm_past_grace_kills_the_build_and_records_interrupted() {
    let mut farm = Farm::new();
    farm.cfg.worker.grace = 1;
    farm.cfg.worker.max_attempts = 1;
    let mut child = farm.start_binary();
    farm.drop_json("hang.json", &workitem("hang", "# mic-fixture: sleep 300\n"));
    let log = farm.wait_mic_running("hang");
    sigterm(&child.0);
    assert_eq!(wait_exit(&mut child.0, Duration::from_secs(30)), Some(0));
    let pids = fixture_pids(&std::fs::read_to_string(&log).unwrap());
    assert!(
        !build_image::process::group_alive(pids[0]),
        "mic's group outlived the daemon"
    );
    assert!(
        farm.outbox_file("hang.json").is_none(),
        "interrupted, not answered"
    );
    let kinds: Vec<String> = farm
        .events()
        .iter()
        .map(|e| e.kind.name().to_string())
        .collect();
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("interrupted"),
        "{kinds:?}"
    );

    // A build interrupted by a stop does not count against max_attempts (= 1 here): the next
    // start builds it again (attempt 2) instead of answering it.
    let child = farm.start_binary();
    assert!(
        wait_for(Duration::from_secs(30), || std::fs::read_to_string(&log)
            .is_ok_and(
                |t| t.contains("attempt 2") && t.matches("mic-fixture: sleeping").count() == 2
            )),
        "not built again"
    );
    assert!(
        farm.outbox_file("hang.json").is_none(),
        "answered instead of built again"
    );
    drop(child); // SIGKILL: a crash, which does count
    let mut child = farm.start_binary();
    assert!(wait_for(Duration::from_secs(20), || farm
        .outbox()
        .join("hang.json")
        .exists()));
    sigterm(&child.0);
    assert_eq!(wait_exit(&mut child.0, Duration::from_secs(30)), Some(0));
    let r = farm.outbox_file("hang.json").unwrap();
    assert_eq!(r["image"]["result"], json!(false));
    let err = r["image"]["error"].as_str().unwrap();
    assert!(err.contains("lost 1 time(s) to a crash"), "{err}");
    assert!(list(&farm.active()).is_empty());
}

#[test]
fn second_daemon_on_the_same_state_dir_refuses() {
    let farm = Farm::new();
    let mut first = farm.start_binary();
    let state = farm.cfg.state_dir();
    assert!(wait_for(Duration::from_secs(20), || state
        .join("db")
        .exists()
        || state.join("conf").exists()));
    let out = farm.bin().arg("run").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("locked by another process"), "{err}");
    sigterm(&first.0);
    assert_eq!(wait_exit(&mut first.0, Duration::from_secs(20)), Some(0));
    assert!(Path::new(&state).exists());
}
