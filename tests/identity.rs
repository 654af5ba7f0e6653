//! Identity: one input, one answer (DESIGN.md). Each test is named after a point of that
//! section and goes through the daemon (in-process) or the binary, as users do.

mod common;

use build_image::domain::EventKind;
use common::*;
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// The pushes made for `image_id`, by status.
fn statuses(farm: &Farm, image_id: &str) -> Vec<String> {
    farm.pushes_for(image_id).into_iter().map(|p| p.0).collect()
}

#[test]
fn an_answer_never_replaces_another_jobs_answer() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    farm.drop_json("a.json", &workitem("same-name-1", "ks\n"));
    let first = farm.wait_outbox("a.json", T);
    assert_eq!(first["image"]["image_id"], json!("same-name-1"));
    // upstream has not taken outbox/a.json yet: another job's input of the same name
    farm.drop_json("a.json", &workitem("same-name-2", "ks\n"));
    assert!(
        wait_for(T, || list(&farm.outbox()).len() == 2),
        "{:?}",
        list(&farm.outbox())
    );
    d.stop().unwrap();
    let names = list(&farm.outbox());
    let second_name = names.iter().find(|n| *n != "a.json").unwrap();
    assert!(
        second_name.starts_with("a.") && second_name.ends_with(".json"),
        "{names:?}"
    );
    assert_eq!(
        farm.outbox_file("a.json").unwrap(),
        first,
        "the first answer is untouched"
    );
    let second = farm.outbox_file(second_name).unwrap();
    assert_eq!(second["image"]["image_id"], json!("same-name-2"));
    assert_eq!(second["image"]["result"], json!(true));
    // the delivered events name the files written
    let delivered: Vec<String> = farm
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Delivered(d) => d.receipt.outbox_name().map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, vec!["a.json".to_string(), second_name.clone()]);
}

#[test]
fn a_byte_identical_re_drop_is_the_same_request() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    let wi = workitem("redrop-1", "# mic-fixture: sleep 1\n");
    farm.drop_json("r.json", &wi);
    farm.wait_mic_running("redrop-1");
    // while it builds: the same bytes again under another name
    farm.drop_json("again.json", &wi);
    let first = farm.wait_outbox("r.json", T);
    assert_eq!(first["image"]["result"], json!(true));
    let again = farm.wait_outbox("again.json", T);
    assert_eq!(again, first, "answered with that job's answer");
    farm.wait_pushes("redrop-1", 2);
    // after upstream took the answer: the same bytes under the same name
    std::fs::remove_file(farm.outbox().join("r.json")).unwrap();
    farm.drop_json("r.json", &wi);
    assert_eq!(farm.wait_outbox("r.json", T), first);
    d.stop().unwrap();

    assert_eq!(mic_runs(&farm, "redrop-1"), 1, "built once");
    assert_eq!(
        statuses(&farm, "redrop-1"),
        ["BUILDING", "DONE"],
        "no push for a re-drop"
    );
    let events = farm.events();
    let claims = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Claimed { .. }))
        .count();
    let dups: Vec<u64> = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Duplicate { .. }))
        .map(|e| e.job)
        .collect();
    assert_eq!(claims, 1, "one job");
    assert_eq!(dups.len(), 2, "two duplicate events");
    assert!(dups.iter().all(|j| *j == events[0].job), "of that job");
    assert!(list(&farm.active()).is_empty());
    let (code, out, err) = output(farm.bin().args(["replay"]));
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn another_workitem_with_the_same_image_id_is_a_conflict_and_pushes_nothing() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    farm.drop_json("held.json", &workitem("conflict-1", "ks\n"));
    assert_eq!(
        farm.wait_outbox("held.json", T)["image"]["result"],
        json!(true)
    );
    farm.wait_pushes("conflict-1", 2);
    let mut other = workitem("conflict-1", "other ks\n");
    other["image"]["name"] = json!("other");
    farm.drop_json("other.json", &other);
    let r = farm.wait_outbox("other.json", T);
    assert_eq!(r["image"]["result"], json!(false));
    let err = r["image"]["error"].as_str().unwrap();
    assert!(
        err.contains("conflict") && err.contains("held by job") && err.contains("held.json"),
        "{err}"
    );
    // the held answer is untouched, and the conflict pushed nothing for the image_id
    assert_eq!(
        farm.outbox_file("held.json").unwrap()["image"]["result"],
        json!(true)
    );
    d.stop().unwrap();
    assert_eq!(statuses(&farm, "conflict-1"), ["BUILDING", "DONE"]);
    assert_eq!(mic_runs(&farm, "conflict-1"), 1);
}

#[test]
fn an_image_id_that_cleans_to_the_same_job_folder_is_a_conflict() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    // "rel.2" and "rel2" both name the folder requests/rel2
    farm.drop_json(
        "dot.json",
        &workitem("rel.2", "# mic-fixture: noimage\nks\n"),
    );
    let r = farm.wait_outbox("dot.json", T);
    assert_eq!(r["image"]["result"], json!(false), "mic wrote no image");
    farm.drop_json("plain.json", &workitem("rel2", "ks\n"));
    let r = farm.wait_outbox("plain.json", T);
    assert_eq!(r["image"]["result"], json!(false));
    let err = r["image"]["error"].as_str().unwrap();
    assert!(err.contains("job folder") && err.contains("rel2"), "{err}");
    assert!(r["image"].get("image_url").is_none(), "{r:#}");
    d.stop().unwrap();
    assert!(
        statuses(&farm, "rel2").is_empty(),
        "a conflict pushes nothing"
    );
}

#[test]
fn retry_refuses_a_job_answered_without_a_build() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.worker.workers = 1;
    farm.cfg.worker.grace = 0;
    let d = farm.start();
    // invalid: never built
    farm.drop_json(
        "inv.json",
        &json!({"image": {"image_id": "rt-inv", "kickstart": "ks"}}),
    );
    farm.wait_outbox("inv.json", T);
    // a conflict: never built
    farm.drop_json("held.json", &workitem("rt-held", "ks\n"));
    farm.wait_outbox("held.json", T);
    let mut c = workitem("rt-held", "other\n");
    c["image"]["name"] = json!("c");
    farm.drop_json("conflict.json", &c);
    farm.wait_outbox("conflict.json", T);
    // cancelled before it ran (queued behind a hanging build)
    farm.drop_json(
        "hang.json",
        &workitem("rt-hang", "# mic-fixture: sleep 300\n"),
    );
    farm.wait_mic_running("rt-hang");
    farm.drop_json("q.json", &workitem("rt-queued", "ks\n"));
    let (code, _, err) = output(farm.bin().args(["cancel", "rt-queued"]));
    // the job may not be claimed yet: wait until cancel takes it
    if code != 0 {
        assert!(
            wait_for(T, || output(farm.bin().args(["cancel", "rt-queued"])).0
                == 0),
            "{err}"
        );
    }
    farm.wait_outbox("q.json", T);

    for (id, why) in [
        ("rt-inv", "invalid"),
        ("rt-queued", "cancelled before it ran"),
    ] {
        let (code, out, err) = output(farm.bin().args(["retry", id]));
        assert_eq!(code, 1, "{id}: {out}{err}");
        assert!(
            err.contains("never built") && err.contains(why),
            "{id}: {err}"
        );
    }
    // the conflict job: by its number (its image_id names the holder)
    let (_, out, _) = output(farm.bin().args(["status", "--json"]));
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let conflict = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["file"] == json!("conflict.json"))
        .unwrap()["job"]
        .as_u64()
        .unwrap();
    let (code, _, err) = output(farm.bin().args(["retry", &conflict.to_string()]));
    assert_eq!(code, 1);
    assert!(err.contains("conflict with job"), "{err}");
    // a built job can be retried
    let (code, out, err) = output(farm.bin().args(["retry", "rt-held"]));
    assert_eq!(code, 0, "{out}{err}");
    // nothing was left queued by the refusals
    let (_, out, _) = output(farm.bin().args(["status", "--state", "queued", "--json"]));
    let queued: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        queued
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["image_id"] == json!("rt-held")),
        "{queued:#}"
    );
    d.stop().unwrap();
}
