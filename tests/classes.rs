//! A failed build says why in a class the farm can act on: `image` (mic exits 1: the same input
//! fails again, not tried again), `infrastructure` (timeout, stall, a full disk under base_dir:
//! tried again automatically up to `infra_retries`, then answered with its class), `cancelled`.
//! The class is in the answer (`image.failure`), the `finished` event, `status`/`show`, the job
//! page and `build_image_builds_total{result,failure}`.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

fn farm() -> Farm {
    let mut farm = Farm::new();
    farm.cfg.http.listen = Some("127.0.0.1:0".into());
    farm
}

fn http_get(farm: &Farm, path: &str) -> String {
    common::web::get(&common::web::http_addr(farm), path).body
}

/// The value of `build_image_builds_total{result="failure",failure=CLASS}`.
fn failures_metric(farm: &Farm, class: &str) -> f64 {
    let want = format!("build_image_builds_total{{result=\"failure\",failure=\"{class}\"}} ");
    let mut v = None;
    wait_for(Duration::from_secs(30), || {
        v = http_get(farm, "/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(want.as_str()))
            .and_then(|x| x.trim().parse().ok());
        v.is_some()
    });
    v.unwrap_or_else(|| panic!("no {want}"))
}

/// The class everywhere it is shown, for the job of `image_id`.
fn assert_class(farm: &Farm, answer: &Value, image_id: &str, class: &str) {
    assert_eq!(answer["image"]["result"], json!(false), "{answer:#}");
    assert_eq!(answer["image"]["failure"], json!(class), "{answer:#}");
    let (code, out, err) = output(farm.bin().args(["status", "--json"]));
    assert_eq!(code, 0, "{err}");
    let rows: Value = serde_json::from_str(&out).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["image_id"] == json!(image_id))
        .unwrap();
    assert_eq!(row["failure"], json!(class), "{row}");
    let (_, table, _) = output(farm.bin().arg("status"));
    assert!(table.contains(&format!("error ({class})")), "{table}");
    let (code, show, err) = output(farm.bin().args(["show", image_id, "--json"]));
    assert_eq!(code, 0, "{err}");
    let show: Value = serde_json::from_str(&show).unwrap();
    assert_eq!(show["job"]["failure"], json!(class), "{show:#}");
    let fin = show["events"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|e| e["kind"] == json!("finished"))
        .unwrap();
    assert_eq!(fin["failure"], json!(class), "{fin}");
    let job = show["job"]["id"].as_u64().unwrap();
    let page = http_get(farm, &format!("/jobs/{job}"));
    assert!(page.contains(&format!("{class}: ")), "{page}");
}

#[test]
fn mic_exiting_1_is_an_image_failure_not_tried_again() {
    init_log();
    let farm = farm();
    let d = farm.start();
    farm.drop_json("i.json", &workitem("i1", "# mic-fixture: fail 1\n"));
    let r = farm.wait_outbox("i.json", T);
    assert_class(&farm, &r, "i1", "image");
    assert_eq!(mic_runs(&farm, "i1"), 1);
    assert_eq!(failures_metric(&farm, "image"), 1.0);
    d.stop().unwrap();
}

#[test]
fn a_timeout_is_an_infrastructure_failure_tried_again_up_to_infra_retries() {
    init_log();
    let mut farm = farm();
    farm.cfg.worker.timeout = 1;
    farm.cfg.worker.infra_retries = 2;
    let d = farm.start();
    farm.drop_json("t.json", &workitem("t1", "# mic-fixture: sleep 300\n"));
    let r = farm.wait_outbox("t.json", T);
    assert_class(&farm, &r, "t1", "infrastructure");
    assert!(
        r["image"]["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 1 s"),
        "{r:#}"
    );
    assert_eq!(
        mic_runs(&farm, "t1"),
        3,
        "one build and infra_retries = 2 more"
    );
    assert_eq!(failures_metric(&farm, "infrastructure"), 3.0);
    let (_, show, _) = output(farm.bin().args(["show", "t1", "--json"]));
    let show: Value = serde_json::from_str(&show).unwrap();
    let requeued: Vec<&Value> = show["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == json!("requeued"))
        .collect();
    assert_eq!(requeued.len(), 2, "{show:#}");
    assert!(
        requeued[1]["reason"]
            .as_str()
            .unwrap()
            .contains("(2 of infra_retries = 2)")
    );
    let statuses: Vec<String> = farm.wait_pushes("t1", 4).into_iter().map(|p| p.0).collect();
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("ERROR"),
        "{statuses:?}"
    );
    d.stop().unwrap();
}

#[test]
fn a_stall_is_an_infrastructure_failure() {
    init_log();
    let mut farm = farm();
    farm.cfg.worker.stall_timeout = 1;
    farm.cfg.worker.infra_retries = 0;
    let d = farm.start();
    farm.drop_json("s.json", &workitem("s1", "# mic-fixture: sleep 300\n"));
    let r = farm.wait_outbox("s.json", T);
    assert_class(&farm, &r, "s1", "infrastructure");
    assert!(
        r["image"]["error"].as_str().unwrap().contains("stalled"),
        "{r:#}"
    );
    assert_eq!(mic_runs(&farm, "s1"), 1, "infra_retries = 0");
    d.stop().unwrap();
}

#[test]
fn a_full_disk_under_base_dir_is_an_infrastructure_failure() {
    init_log();
    let mut farm = farm();
    farm.cfg.worker.infra_retries = 0;
    let base = farm.base();
    let Some(_mount) = Mount::new(&["-t", "tmpfs", "-o", "size=1m", "tmpfs"], &base) else {
        return;
    };
    let d = farm.start();
    farm.drop_json("d.json", &workitem("d1", "# mic-fixture: bytes 4000000\n"));
    let r = farm.wait_outbox("d.json", T);
    assert_eq!(r["image"]["failure"], json!("infrastructure"), "{r:#}");
    assert!(
        r["image"]["error"].as_str().unwrap().contains("is full"),
        "{r:#}"
    );
    d.stop().unwrap();
}

#[test]
fn a_cancelled_build_is_of_class_cancelled() {
    init_log();
    let farm = farm();
    let d = farm.start();
    farm.drop_json("c.json", &workitem("c1", "# mic-fixture: sleep 300\n"));
    farm.wait_mic_running("c1");
    let (code, out, err) = output(farm.bin().args(["cancel", "c1"]));
    assert_eq!(code, 0, "{out}{err}");
    let r = farm.wait_outbox("c.json", T);
    assert_class(&farm, &r, "c1", "cancelled");
    assert_eq!(failures_metric(&farm, "cancelled"), 1.0);
    d.stop().unwrap();
}
