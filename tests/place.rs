//! A build leaves nothing behind: with the mic fixture doing to the host what mic does (a loop
//! device on an image in its temp dir, an ext4 on it mounted, /proc bound into that root, a
//! `setsid` double-forked sleeper working in it), every end of a build -- success, mic failing,
//! `timeout`, `cancel`, a stop ended by a second signal, SIGKILL of the daemon then a start --
//! leaves no loop device, mount or process of the build, no temp dir, the build slot free, and
//! the job's log saying what was released. Each test runs with the build's cgroup v2 and again
//! with cgroups switched off (the environment marker alone).

mod common;

use common::host::{HostGuard, fixture_all_pids};
use common::*;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);
const HOST: &str = "# mic-fixture: host\n";

fn farm(cgroup: bool) -> Farm {
    let mut farm = Farm::new();
    farm.cfg.worker.use_cgroup = cgroup;
    farm.cfg.worker.workers = 1;
    // mic's mounts on the host, for the release to find (the private namespace: at the end)
    farm.cfg.worker.mount_namespace = false;
    // one build per job (an infrastructure failure is tried again: tests/classes.rs)
    farm.cfg.worker.infra_retries = 0;
    farm
}

fn job_dir(farm: &Farm, id: &str) -> PathBuf {
    farm.base().join(format!("requests/{id}"))
}

fn job_log(farm: &Farm, id: &str) -> String {
    std::fs::read_to_string(job_dir(farm, id).join(format!("img-{id}.log"))).unwrap_or_default()
}

/// Waits until the fixture has attached, mounted and escaped (its sleeper's pid printed).
fn wait_host_touched(farm: &Farm, id: &str) {
    assert!(
        wait_for(T, || job_log(farm, id)
            .contains("mic-fixture escaped pid: ")),
        "the fixture of {id} never touched the host: {}",
        job_log(farm, id)
    );
}

/// Nothing of the build is left, and its log lists what was released.
fn assert_released(farm: &Farm, guard: &HostGuard, id: &str, cgroup: bool) {
    let log = job_log(farm, id);
    assert!(log.contains("mic-fixture loop: /dev/loop"), "{log}");
    // mic worked in the tmpdir of the build's own mic config, in the build's place
    let mic_tmp = job_dir(farm, id).join(".build-tmp/mic");
    assert!(
        log.contains(&format!("mic-fixture: temp dir {}", mic_tmp.display())),
        "{log}"
    );
    let pids = fixture_all_pids(&log);
    assert!(pids.len() >= 2, "the fixture's pids: {log}");
    guard.assert_clean(&pids);
    assert!(
        !job_dir(farm, id).join(".build-tmp").exists(),
        "the temp dir is left"
    );
    assert!(!job_dir(farm, id).join(".build-place").exists());
    for want in [
        "unmounted ",
        "/root/proc",
        "detached loop device /dev/loop",
        "removed the temp dir",
        "killed ",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("released") && l.contains(want)),
            "no release of {want:?} in the job log:\n{log}"
        );
    }
    let how = if cgroup {
        "processes by cgroup "
    } else {
        "processes by environment marker"
    };
    assert!(log.contains(how), "{log}");
    assert!(!log.contains("leaked:"), "{log}");
}

/// The one build slot is free: a plain job after it is built.
fn assert_slot_free(farm: &Farm, id: &str) {
    farm.drop_json(&format!("{id}.json"), &workitem(id, "lang en_US\n"));
    let r = farm.wait_outbox(&format!("{id}.json"), T);
    assert_eq!(r["image"]["result"], json!(true), "{r:#}");
}

fn success(cgroup: bool) {
    init_log();
    let farm = farm(cgroup);
    let guard = HostGuard::new(farm.root());
    let d = farm.start();
    farm.drop_json("s.json", &workitem("s1", HOST));
    let r = farm.wait_outbox("s.json", T);
    assert_eq!(r["image"]["result"], json!(true), "{r:#}");
    assert_released(&farm, &guard, "s1", cgroup);
    assert_slot_free(&farm, "s2");
    d.stop().unwrap();
}

#[test]
fn success_leaves_nothing_cgroup() {
    success(true);
}

#[test]
fn success_leaves_nothing_marker() {
    success(false);
}

fn mic_failing(cgroup: bool) {
    init_log();
    let farm = farm(cgroup);
    let guard = HostGuard::new(farm.root());
    let d = farm.start();
    farm.drop_json(
        "f.json",
        &workitem("f1", &format!("{HOST}# mic-fixture: fail 1\n")),
    );
    let r = farm.wait_outbox("f.json", T);
    assert_eq!(r["image"]["result"], json!(false), "{r:#}");
    assert_released(&farm, &guard, "f1", cgroup);
    assert_slot_free(&farm, "f2");
    d.stop().unwrap();
}

#[test]
fn mic_failing_leaves_nothing_cgroup() {
    mic_failing(true);
}

#[test]
fn mic_failing_leaves_nothing_marker() {
    mic_failing(false);
}

fn timeout(cgroup: bool) {
    init_log();
    let mut farm = farm(cgroup);
    // long enough for the fixture to attach, make a filesystem and mount on a loaded machine
    farm.cfg.worker.timeout = 8;
    let guard = HostGuard::new(farm.root());
    let d = farm.start();
    farm.drop_json(
        "t.json",
        &workitem("t1", &format!("{HOST}# mic-fixture: sleep 300\n")),
    );
    let r = farm.wait_outbox("t.json", T);
    let err = r["image"]["error"].as_str().unwrap_or_default();
    assert!(err.contains("timed out"), "{r:#}");
    assert_released(&farm, &guard, "t1", cgroup);
    assert_slot_free(&farm, "t2");
    d.stop().unwrap();
}

#[test]
fn timeout_leaves_nothing_cgroup() {
    timeout(true);
}

#[test]
fn timeout_leaves_nothing_marker() {
    timeout(false);
}

fn cancel(cgroup: bool) {
    init_log();
    let farm = farm(cgroup);
    let guard = HostGuard::new(farm.root());
    let d = farm.start();
    farm.drop_json(
        "c.json",
        &workitem("c1", &format!("{HOST}# mic-fixture: sleep 300\n")),
    );
    wait_host_touched(&farm, "c1");
    let (code, out, err) = output(farm.bin().args(["cancel", "c1"]));
    assert_eq!(code, 0, "{out}{err}");
    let r = farm.wait_outbox("c.json", T);
    assert_eq!(r["image"]["error"], json!("cancelled"), "{r:#}");
    assert_released(&farm, &guard, "c1", cgroup);
    assert_slot_free(&farm, "c2");
    d.stop().unwrap();
}

#[test]
fn cancel_leaves_nothing_cgroup() {
    cancel(true);
}

#[test]
fn cancel_leaves_nothing_marker() {
    cancel(false);
}

fn second_signal(cgroup: bool) {
    init_log();
    let mut farm = farm(cgroup);
    farm.cfg.worker.grace = 600;
    let guard = HostGuard::new(farm.root());
    let mut child = farm.start_binary();
    farm.drop_json(
        "g.json",
        &workitem("g1", &format!("{HOST}# mic-fixture: sleep 300\n")),
    );
    wait_host_touched(&farm, "g1");
    sigterm(&child.0);
    // the first signal starts the grace: the build runs on
    assert!(!wait_for(Duration::from_millis(500), || child
        .0
        .try_wait()
        .unwrap()
        .is_some()));
    sigterm(&child.0);
    assert_eq!(wait_exit(&mut child.0, T), Some(0));
    assert_released(&farm, &guard, "g1", cgroup);
    drop(child);
}

#[test]
fn a_second_signal_leaves_nothing_cgroup() {
    second_signal(true);
}

#[test]
fn a_second_signal_leaves_nothing_marker() {
    second_signal(false);
}

fn sigkill_then_start(cgroup: bool) {
    init_log();
    let farm = farm(cgroup);
    let guard = HostGuard::new(farm.root());
    let go = farm.root().join("go");
    let child = farm.start_binary();
    farm.drop_json(
        "k.json",
        &workitem(
            "k1",
            &format!("{HOST}# mic-fixture: wait-for {}\n", go.display()),
        ),
    );
    wait_host_touched(&farm, "k1");
    let first = fixture_all_pids(&job_log(&farm, "k1"));
    assert!(
        !guard.leftovers(&first).is_empty(),
        "the fixture touched the host"
    );
    drop(child); // SIGKILL: the build and all it made stay behind
    assert!(
        !guard.leftovers(&first).is_empty(),
        "a killed daemon frees nothing"
    );
    std::fs::write(&go, "").unwrap();
    let d = farm.start();
    let r = farm.wait_outbox("k.json", T);
    assert_eq!(r["image"]["result"], json!(true), "{r:#}");
    let log = job_log(&farm, "k1");
    for want in [
        "released after the daemon's crash: unmounted ",
        "released after the daemon's crash: detached loop device",
        "released after the daemon's crash: removed the temp dir",
    ] {
        assert!(log.contains(want), "no {want:?} in:\n{log}");
    }
    assert_released(&farm, &guard, "k1", cgroup);
    guard.assert_clean(&first);
    assert_slot_free(&farm, "k2");
    d.stop().unwrap();
}

#[test]
fn sigkill_then_start_leaves_nothing_cgroup() {
    sigkill_then_start(true);
}

#[test]
fn sigkill_then_start_leaves_nothing_marker() {
    sigkill_then_start(false);
}

/// `/metrics`' value of `build_image_leaked_resources` (None before the jobs are counted).
fn leaked_metric(farm: &Farm) -> Option<f64> {
    use std::io::{Read, Write};
    let addr = std::fs::read_to_string(farm.cfg.state_dir().join("http.addr")).ok()?;
    let mut s = std::net::TcpStream::connect(addr.trim()).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("build_image_leaked_resources "))
        .and_then(|v| v.trim().parse().ok())
}

/// A mount held busy by an outside process (kept by the test) cannot be freed: it is a `leaked`
/// event, shown by `status`, `doctor` and `/metrics`, and freed by a later pass once the holder
/// is gone.
#[test]
fn a_mount_held_busy_is_a_leak_until_its_holder_goes() {
    init_log();
    let mut farm = farm(true);
    farm.cfg.http.listen = Some("127.0.0.1:0".into());
    let guard = HostGuard::new(farm.root());
    let d = farm.start();
    farm.drop_json(
        "l.json",
        &workitem("l1", &format!("{HOST}# mic-fixture: sleep 300\n")),
    );
    wait_host_touched(&farm, "l1");
    let log = job_log(&farm, "l1");
    let root = log
        .lines()
        .find_map(|l| l.strip_prefix("mic-fixture mount: "))
        .map(PathBuf::from)
        .unwrap();
    // an outside process working in the mounted root: not the build's, so never killed
    let holder = Guard(
        std::process::Command::new("sleep")
            .arg("600")
            .current_dir(&root)
            .spawn()
            .unwrap(),
    );
    let (code, out, err) = output(farm.bin().args(["cancel", "l1"]));
    assert_eq!(code, 0, "{out}{err}");
    farm.wait_outbox("l.json", T);
    let mut status = String::new();
    assert!(
        wait_for(T, || {
            status = output(farm.bin().arg("status")).1;
            status.contains("LEAKED job 1: loop device /dev/loop")
        }),
        "status shows no leak:\n{status}\n{}",
        job_log(&farm, "l1")
    );
    assert!(status.contains("in use"), "{status}");
    let rows: serde_json::Value =
        serde_json::from_str(&output(farm.bin().args(["status", "--json"])).1).unwrap();
    let leaks = rows[0]["leaks"].as_array().cloned().unwrap_or_default();
    assert!(!leaks.is_empty(), "{rows:#}");
    let (code, doctor, _) = output(farm.bin().arg("doctor"));
    assert_eq!(code, 1, "{doctor}");
    assert!(
        doctor.lines().any(|l| l.starts_with("FAIL")
            && l.contains("leaked resources")
            && l.contains("loop device")),
        "{doctor}"
    );
    let mut metric = None;
    assert!(
        wait_for(T, || {
            metric = leaked_metric(&farm);
            metric.is_some_and(|m| m >= 1.0)
        }),
        "{metric:?}"
    );
    assert!(job_log(&farm, "l1").contains("leaked: loop device /dev/loop"));
    // the holder goes: a later pass frees what was left
    drop(holder);
    assert!(
        wait_for(T, || leaked_metric(&farm) == Some(0.0)),
        "{:?}",
        leaked_metric(&farm)
    );
    let status = output(farm.bin().arg("status")).1;
    assert!(!status.contains("LEAKED"), "{status}");
    let (_, doctor, _) = output(farm.bin().arg("doctor"));
    assert!(
        doctor.lines().any(|l| l.contains("leaked resources: none")),
        "{doctor}"
    );
    guard.assert_clean(&fixture_all_pids(&job_log(&farm, "l1")));
    d.stop().unwrap();
    let kinds: Vec<String> = farm
        .events()
        .iter()
        .map(|e| e.kind.name().to_string())
        .collect();
    assert!(kinds.iter().any(|k| k == "leaked"), "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "leak_freed"), "{kinds:?}");
}

fn stall(cgroup: bool) {
    init_log();
    let mut farm = farm(cgroup);
    // mkfs is silent for a moment: longer than that on a loaded machine
    farm.cfg.worker.stall_timeout = 5;
    farm.cfg.worker.timeout = 120;
    let guard = HostGuard::new(farm.root());
    let d = farm.start();
    farm.drop_json(
        "st.json",
        &workitem("st1", &format!("{HOST}# mic-fixture: sleep 300\n")),
    );
    let r = farm.wait_outbox("st.json", T);
    let err = r["image"]["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("mic stalled: no output for 5 s (stall_timeout), killed"),
        "{r:#}"
    );
    assert_released(&farm, &guard, "st1", cgroup);
    assert_slot_free(&farm, "st2");
    d.stop().unwrap();
}

#[test]
fn stall_timeout_leaves_nothing_cgroup() {
    stall(true);
}

#[test]
fn stall_timeout_leaves_nothing_marker() {
    stall(false);
}

/// Where the daemon is root and mic runs without sudo, mic gets a private mount namespace: what
/// it mounts never shows on the host, and goes with its processes; the loop devices it attached
/// (the host's) are detached by the release all the same.
fn namespace(cancel: bool) {
    init_log();
    let mut farm = farm(true);
    farm.cfg.worker.mount_namespace = true;
    let guard = HostGuard::new(farm.root());
    let d = farm.start();
    let ks = if cancel {
        format!("{HOST}# mic-fixture: sleep 300\n")
    } else {
        HOST.to_string()
    };
    farm.drop_json("n.json", &workitem("n1", &ks));
    if cancel {
        wait_host_touched(&farm, "n1");
        let log = job_log(&farm, "n1");
        assert!(log.contains("mic-fixture mount: "), "{log}");
        assert!(
            common::host::mounts_under(&guard.root).is_empty(),
            "mic's mounts are not the host's"
        );
        let (code, out, err) = output(farm.bin().args(["cancel", "n1"]));
        assert_eq!(code, 0, "{out}{err}");
    }
    let r = farm.wait_outbox("n.json", T);
    assert_eq!(r["image"]["result"], json!(!cancel), "{r:#}");
    let log = job_log(&farm, "n1");
    assert!(log.contains("mounts in a private mount namespace"), "{log}");
    assert!(
        log.contains("released: detached loop device /dev/loop"),
        "{log}"
    );
    assert!(log.contains("released: killed "), "{log}");
    assert!(!log.contains("leaked:"), "{log}");
    guard.assert_clean(&fixture_all_pids(&log));
    assert!(!job_dir(&farm, "n1").join(".build-tmp").exists());
    assert_slot_free(&farm, "n2");
    d.stop().unwrap();
}

#[test]
fn a_private_mount_namespace_success_leaves_nothing() {
    namespace(false);
}

#[test]
fn a_private_mount_namespace_cancel_leaves_nothing() {
    namespace(true);
}

/// A prefix with a slash nests one job folder in another: the release of the outer job's build
/// touches nothing of the inner job's build, which runs on.
#[test]
fn a_nested_job_folder_keeps_its_mounts_when_the_outer_build_ends() {
    init_log();
    let mut farm = farm(true);
    farm.cfg.worker.workers = 2;
    let guard = HostGuard::new(farm.root());
    let go = farm.root().join("go");
    let d = farm.start();
    let mut outer = workitem(
        "o1",
        &format!("{HOST}# mic-fixture: wait-for {}\n", go.display()),
    );
    outer["image"]["prefix"] = json!("nest");
    let mut inner = workitem("i1", &format!("{HOST}# mic-fixture: sleep 300\n"));
    inner["image"]["prefix"] = json!("nest/o1");
    farm.drop_json("o.json", &outer);
    farm.drop_json("i.json", &inner);
    let outer_log = farm.base().join("nest/o1/img-o1.log");
    let inner_dir = farm.base().join("nest/o1/i1");
    let inner_log = inner_dir.join("img-i1.log");
    for log in [&outer_log, &inner_log] {
        assert!(
            wait_for(T, || std::fs::read_to_string(log)
                .is_ok_and(|l| l.contains("mic-fixture escaped pid: "))),
            "{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    std::fs::write(&go, "").unwrap();
    let r = farm.wait_outbox("o.json", T);
    assert_eq!(r["image"]["result"], json!(true), "{r:#}");
    // the inner build's mounts, loop device and sleeper are untouched
    let inner_root = std::fs::canonicalize(&inner_dir).unwrap();
    assert_eq!(
        common::host::mounts_under(&inner_root).len(),
        2,
        "{}",
        std::fs::read_to_string(&outer_log).unwrap()
    );
    assert_eq!(common::host::loops_under(&inner_root).len(), 1);
    let pids = fixture_all_pids(&std::fs::read_to_string(&inner_log).unwrap());
    assert!(pids.iter().all(|p| alive(*p)), "{pids:?}");
    let (code, out, err) = output(farm.bin().args(["cancel", "i1"]));
    assert_eq!(code, 0, "{out}{err}");
    farm.wait_outbox("i.json", T);
    guard.assert_clean(&pids);
    d.stop().unwrap();
}
