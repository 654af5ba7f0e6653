//! Builds that go wrong: mic failing, hanging past the timeout, missing; push utility failing or
//! hanging. Each ends in exactly one correct outbox workitem and the right pushes.

mod common;

use build_image::domain::{EventKind, Status};
use common::*;
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[test]
fn mic_failing_is_an_error_reply() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    farm.drop_json(
        "f.json",
        &workitem("f1", "# mic-fixture: fail 3\nlang en_US\n"),
    );
    let r = farm.wait_outbox("f.json", T);
    let err = r["image"]["error"].as_str().unwrap();
    assert_eq!(r["image"]["result"], json!(false));
    assert_eq!(r["result"], json!(false));
    assert!(err.contains("mic exited with status 3"), "{err}");
    assert!(
        err.contains("failed to create image (mic-fixture: fail 3)"),
        "mic's own words: {err}"
    );
    assert_eq!(r["__error__"], json!(format!("Image build FAILED: {err}")));
    assert_eq!(
        r["image"]["logfile_url"],
        json!("http://img.test/images/requests/f1/img-f1.log")
    );
    assert_eq!(
        r["image"]["files_url"],
        json!("http://img.test/images/requests/f1")
    );
    assert!(r["image"].get("image_url").is_none());
    let msg = r["msg"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.starts_with("Image img-f1 build for arch i586 failed: "),
        "{msg}"
    );
    let statuses: Vec<String> = farm.wait_pushes("f1", 2).into_iter().map(|p| p.0).collect();
    assert_eq!(statuses, ["BUILDING", "ERROR"]);
    d.stop().unwrap();
}

#[test]
fn mic_exiting_0_without_an_image_is_not_a_success() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    farm.drop_json("n.json", &workitem("n1", "# mic-fixture: noimage\n"));
    let r = farm.wait_outbox("n.json", T);
    assert_eq!(r["image"]["result"], json!(false));
    assert!(
        r["image"]["error"]
            .as_str()
            .unwrap()
            .contains("left no image file"),
        "{r:#}"
    );
    d.stop().unwrap();
}

#[test]
fn mic_hanging_past_timeout_is_killed_with_its_group() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.worker.timeout = 1;
    // one build (a timeout is an infrastructure failure, else tried again: tests/classes.rs)
    farm.cfg.worker.infra_retries = 0;
    let d = farm.start();
    farm.drop_json("h.json", &workitem("h1", "# mic-fixture: sleep 300\n"));
    let r = farm.wait_outbox("h.json", T);
    assert_eq!(r["image"]["result"], json!(false));
    let err = r["image"]["error"].as_str().unwrap();
    assert!(err.contains("timed out after 1 s"), "{err}");
    let log = std::fs::read_to_string(farm.base().join("requests/h1/img-h1.log")).unwrap();
    let pids = fixture_pids(&log);
    assert_eq!(pids.len(), 2, "mic and its sleep child: {log}");
    assert!(
        wait_for(Duration::from_secs(10), || pids.iter().all(|p| !alive(*p))),
        "{pids:?} survived"
    );
    assert!(
        !build_image::process::group_alive(pids[0]),
        "group {} still has members",
        pids[0]
    );
    d.stop().unwrap();
}

#[test]
fn missing_mic_is_a_clear_error() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.worker.mic_path = Some("/nonexistent/bin/mic".into());
    // a mic that cannot start is the host's failure, tried again infra_retries times
    farm.cfg.worker.infra_retries = 0;
    let d = farm.start();
    farm.drop_json("m.json", &workitem("m1", "ks\n"));
    let r = farm.wait_outbox("m.json", T);
    assert_eq!(r["image"]["result"], json!(false));
    assert_eq!(
        r["image"]["error"],
        json!("/nonexistent/bin/mic not found (is it installed and on PATH?)")
    );
    let statuses: Vec<String> = farm.wait_pushes("m1", 2).into_iter().map(|p| p.0).collect();
    assert_eq!(statuses, ["BUILDING", "ERROR"]);
    d.stop().unwrap();
}

#[test]
fn failing_push_is_recorded_and_holds_nothing_back() {
    init_log();
    let farm = Farm::new();
    std::fs::write(farm.hook_dir().join("push.fail"), b"").unwrap();
    let d = farm.start();
    farm.drop_json("good.json", &workitem("g1", "ks\n"));
    farm.drop_json("bad.json", &workitem("b1", "# mic-fixture: fail 1\n"));
    let good = farm.wait_outbox("good.json", T);
    assert_eq!(
        good["image"]["result"],
        json!(true),
        "a failing push does not fail the build"
    );
    let bad = farm.wait_outbox("bad.json", T);
    assert_eq!(bad["image"]["result"], json!(false));
    farm.wait_pushed_events(4);
    d.stop().unwrap();
    let events = farm.events();
    let pushed: Vec<(Status, bool, Option<i32>)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Pushed {
                status, ok, exit, ..
            } => Some((*status, *ok, *exit)),
            _ => None,
        })
        .collect();
    assert_eq!(pushed.len(), 4, "{pushed:?}");
    assert!(
        pushed.iter().all(|(_, ok, exit)| !ok && *exit == Some(1)),
        "{pushed:?}"
    );
    assert_eq!(pushed.iter().filter(|p| p.0 == Status::Done).count(), 1);
    assert_eq!(pushed.iter().filter(|p| p.0 == Status::Error).count(), 1);
    let hook_log = std::fs::read_to_string(farm.cfg.state_dir().join("hooks.log")).unwrap();
    assert!(hook_log.contains("job database unreachable"), "{hook_log}");
}

#[test]
fn hanging_or_missing_push_is_timed_out() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.hooks.timeout = 1;
    std::fs::write(farm.hook_dir().join("push.hang"), b"").unwrap();
    let d = farm.start();
    farm.drop_json("a.json", &workitem("a1", "ks\n"));
    let r = farm.wait_outbox("a.json", T);
    assert_eq!(r["image"]["result"], json!(true));
    // the pushes run apart from the answer: wait for both to be recorded
    assert!(wait_for(T, || {
        let (_, out, _) = output(farm.bin().args(["events", "--kind", "pushed", "--json"]));
        event_lines(&out).count() >= 2
    }));
    d.stop().unwrap();
    let errors: Vec<String> = farm
        .events()
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Pushed {
                ok: false, error, ..
            } => error.clone(),
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), 2);
    assert!(
        errors.iter().all(|e| e.ends_with("timed out after 1 s")),
        "{errors:?}"
    );

    let mut farm = Farm::new();
    farm.cfg.hooks.push = Some("/nonexistent/push".into());
    let d = farm.start();
    farm.drop_json("b.json", &workitem("b1", "ks\n"));
    assert_eq!(
        farm.wait_outbox("b.json", T)["image"]["result"],
        json!(true)
    );
    farm.wait_pushed_events(2);
    d.stop().unwrap();
    let errors: Vec<String> = farm
        .events()
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Pushed {
                ok: false, error, ..
            } => error.clone(),
            _ => None,
        })
        .collect();
    assert!(
        errors.len() == 2
            && errors
                .iter()
                .all(|e| e.contains("/nonexistent/push not found")),
        "{errors:?}"
    );
}
