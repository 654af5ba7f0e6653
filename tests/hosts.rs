//! The farm's hosts (issue 22, "Several hosts, one farm"): two daemons (the binary) on one
//! spool and one base_dir write their records to hosts/, `build-image hosts` lists both; a
//! SIGKILLed one is shown gone with the job it held once its record is 3 intervals old; a clean
//! stop leaves `stopped`; `cancel ID` run against the host that does not hold the job reaches
//! the holder through a control drop in the spool.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// Two farms on one spool and one base_dir: workers w1 and w2, one build slot each, a host
/// record every second.
fn two() -> (Farm, Farm) {
    let mut a = Farm::new();
    a.cfg.worker.workers = 1;
    a.cfg.worker.host_record_interval = 1;
    let mut cfg_b = a.cfg.clone();
    cfg_b.spool.worker_id = Some("w2".into());
    let b = Farm {
        dir: tempfile::tempdir().unwrap(),
        cfg: cfg_b,
    };
    (a, b)
}

/// `hosts --json` as run with `farm`'s config.
fn hosts(farm: &Farm) -> Vec<Value> {
    let (code, out, err) = output(farm.bin().args(["hosts", "--json"]));
    assert_eq!(code, 0, "{out}{err}");
    serde_json::from_str::<Vec<Value>>(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn host<'a>(list: &'a [Value], worker: &str) -> Option<&'a Value> {
    list.iter().find(|h| h["worker"] == worker)
}

/// `worker`'s record, once `hosts` (run with `farm`'s config) shows it gone.
fn wait_gone(farm: &Farm, worker: &str) -> Value {
    let mut gone = None;
    assert!(
        wait_for(T, || {
            gone = host(&hosts(farm), worker)
                .filter(|h| h["shown"] == "gone")
                .cloned();
            gone.is_some()
        }),
        "{worker} never shown gone: {:?}",
        hosts(farm)
    );
    gone.unwrap()
}

/// The worker whose record lists `image_id` among its running jobs.
fn holder_of(farm: &Farm, image_id: &str) -> String {
    let mut holder = None;
    assert!(
        wait_for(T, || {
            holder = hosts(farm).into_iter().find_map(|h| {
                h["running"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|j| j["image_id"] == image_id))
                    .then(|| h["worker"].as_str().unwrap().to_string())
            });
            holder.is_some()
        }),
        "no host record lists {image_id}: {:?}",
        hosts(farm)
    );
    holder.unwrap()
}

/// Kills the mic fixture's process groups of a build (left by a SIGKILLed daemon).
fn kill_fixture(log: &std::path::Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    for pid in fixture_pids(&text) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Kills the builds of these job logs when dropped (a failing test leaves no build behind: the
/// daemon that ran it may have been SIGKILLed).
struct Builds(Vec<std::path::PathBuf>);

impl Drop for Builds {
    fn drop(&mut self) {
        for l in &self.0 {
            kill_fixture(l);
        }
    }
}

#[test]
fn two_hosts_are_listed_a_killed_one_is_gone_with_its_job_a_stopped_one_stopped() {
    let (fa, fb) = two();
    let (code, out, _) = output(fa.bin().arg("hosts"));
    assert_eq!(code, 0, "no daemon, no spool yet: {out}");
    let a = fa.start_binary();
    let b = fb.start_binary();
    let dir = fa.spool().join("hosts");
    assert!(
        wait_for(T, || dir.join("w1.json").exists()
            && dir.join("w2.json").exists()),
        "records: {:?}",
        list(&dir)
    );
    let list = hosts(&fa);
    assert_eq!(list.len(), 2, "{list:?}");
    for w in ["w1", "w2"] {
        let h = host(&list, w).unwrap();
        assert_eq!(h["shown"], "running", "{h}");
        assert_eq!(h["state"], "running", "{h}");
        assert_eq!(h["slots"]["total"], 1, "{h}");
        assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(h["interval_s"], 1);
        assert!(h["pid"].as_u64().unwrap() > 0);
    }
    assert_eq!(host(&list, "w1").unwrap()["pid"], a.0.id());
    assert_eq!(host(&list, "w2").unwrap()["pid"], b.0.id());

    fa.drop_json(
        "hang-1.json",
        &workitem("hang-1", "# mic-fixture: sleep 600\n"),
    );
    let log = fa.wait_mic_running("hang-1");
    let _builds = Builds(vec![log.clone()]);
    let holder = holder_of(&fa, "hang-1");
    let (mut killed, mut other, other_farm) = if holder == "w1" {
        (a, b, &fb)
    } else {
        (b, a, &fa)
    };
    let other_worker = if holder == "w1" { "w2" } else { "w1" };
    let record = fa.spool().join(format!("hosts/{holder}.json"));
    killed.0.kill().unwrap();
    killed.0.wait().unwrap();
    // its last record
    let beat = std::fs::metadata(&record).unwrap().modified().unwrap();
    let killed_at = Instant::now();

    let gone = wait_gone(other_farm, &holder);
    // gone only once its record is older than 3 intervals (1 s each)
    let age = std::time::SystemTime::now()
        .duration_since(beat)
        .unwrap_or_default();
    assert!(age > Duration::from_secs(3), "gone after {age:?}: {gone}");
    assert!(killed_at.elapsed() < Duration::from_secs(15));
    assert_eq!(gone["state"], "running", "its last record: {gone}");
    assert_eq!(gone["running"][0]["image_id"], "hang-1", "{gone}");
    let live = hosts(other_farm);
    assert_eq!(host(&live, other_worker).unwrap()["shown"], "running");
    let (code, table, err) = output(other_farm.bin().arg("hosts"));
    assert_eq!(code, 0, "{err}");
    let line = table.lines().find(|l| l.contains(&holder)).unwrap();
    assert!(line.contains("GONE"), "{table}");
    assert!(line.contains("held: hang-1 (#1)"), "{table}");
    let line = table.lines().find(|l| l.contains(other_worker)).unwrap();
    assert!(
        line.contains("running") && line.contains("0/1 busy"),
        "{table}"
    );
    kill_fixture(&log);

    sigterm(&other.0);
    assert_eq!(wait_exit(&mut other.0, T), Some(0));
    // no daemon runs: the records are read from the spool
    let after = hosts(&fa);
    assert_eq!(host(&after, other_worker).unwrap()["shown"], "stopped");
    assert_eq!(host(&after, other_worker).unwrap()["state"], "stopped");
    assert_eq!(host(&after, &holder).unwrap()["shown"], "gone");
    let (code, table, _) = output(fa.bin().arg("hosts"));
    assert_eq!(code, 0);
    assert!(
        table
            .lines()
            .any(|l| l.contains(other_worker) && l.contains("stopped")),
        "{table}"
    );
}

#[test]
fn cancel_on_the_other_host_reaches_the_holder_through_the_spool() {
    let (fa, fb) = two();
    let mut a = fa.start_binary();
    let mut b = fb.start_binary();
    fa.drop_json(
        "hang-2.json",
        &workitem("hang-2", "# mic-fixture: sleep 600\n"),
    );
    let log = fa.wait_mic_running("hang-2");
    let _builds = Builds(vec![log.clone()]);
    let holder = holder_of(&fa, "hang-2");
    let not_holder = if holder == "w1" { &fb } else { &fa };
    let pids = fixture_pids(&std::fs::read_to_string(&log).unwrap());
    assert!(!pids.is_empty());

    let (code, out, err) = output(not_holder.bin().args(["cancel", "hang-2"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("on worker {holder}")), "{out}");
    assert!(
        wait_for(Duration::from_secs(10), || pids.iter().all(|p| !alive(*p))),
        "the build's processes outlived the cancel"
    );
    let answer = fa.wait_outbox("hang-2.json", T);
    assert_eq!(answer["image"]["result"], false, "{answer}");
    assert!(
        answer["image"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("cancelled")),
        "{answer}"
    );
    let pushes = fa.wait_pushes("hang-2", 2);
    assert_eq!(
        pushes.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
        ["BUILDING", "ERROR"]
    );
    let control = fa.spool().join("control");
    assert!(
        wait_for(T, || list(&control).is_empty()),
        "the drop and its answer are removed: {:?}",
        list(&control)
    );

    // nobody holds it
    let (code, out, err) = output(not_holder.bin().args(["cancel", "nosuch-9"]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("nobody holds it"), "{err}");
    assert!(list(&control).is_empty(), "{:?}", list(&control));

    // a job folder held by a worker that does not answer: named
    let ghost = fa.base().join("requests/ghost-1");
    std::fs::create_dir_all(&ghost).unwrap();
    std::fs::write(
        ghost.join(".owner"),
        r#"{"worker":"w9","job":4,"sha256":""}"#,
    )
    .unwrap();
    let (code, out, err) = output(not_holder.bin().args(["cancel", "ghost-1"]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("held by worker w9 (its job 4"), "{err}");

    // answered once: one answer, one ERROR push
    sigterm(&a.0);
    sigterm(&b.0);
    assert_eq!(wait_exit(&mut a.0, T), Some(0));
    assert_eq!(wait_exit(&mut b.0, T), Some(0));
    let answers: Vec<String> = list(&fa.outbox())
        .into_iter()
        .filter(|n| n.starts_with("hang-2"))
        .collect();
    assert_eq!(answers, ["hang-2.json"]);
    assert_eq!(fa.push_count("hang-2"), 2);
}

/// Three daemons on one spool, w1 serving HTTP: w3 building `hang-3` and SIGKILLed (gone, with
/// its job), w1 and w2 live (one of them building `busy-4`). Returns w1's address.
struct Three {
    farms: Vec<Farm>,
    guards: Vec<Guard>,
    addr: String,
    logs: Vec<std::path::PathBuf>,
}

impl Drop for Three {
    fn drop(&mut self) {
        for l in &self.logs {
            kill_fixture(l);
        }
    }
}

fn three() -> Three {
    let (mut f1, f2) = two();
    f1.cfg.http.listen = Some("127.0.0.1:0".into());
    let mut cfg3 = f2.cfg.clone();
    cfg3.spool.worker_id = Some("w3".into());
    let f3 = Farm {
        dir: tempfile::tempdir().unwrap(),
        cfg: cfg3,
    };
    let mut w3 = f3.start_binary();
    f3.drop_json(
        "hang-3.json",
        &workitem("hang-3", "# mic-fixture: sleep 600\n"),
    );
    let mut builds = Builds(vec![f3.wait_mic_running("hang-3")]);
    assert_eq!(holder_of(&f3, "hang-3"), "w3");
    let mut cfg4 = f2.cfg.clone();
    cfg4.spool.worker_id = Some("w4".into());
    let f4 = Farm {
        dir: tempfile::tempdir().unwrap(),
        cfg: cfg4,
    };
    let g1 = f1.start_binary();
    let g2 = f2.start_binary();
    let g4 = f4.start_binary();
    let addr = common::web::http_addr(&f1);
    w3.0.kill().unwrap();
    w3.0.wait().unwrap();
    f1.drop_json(
        "busy-4.json",
        &workitem("busy-4", "# mic-fixture: sleep 600\n"),
    );
    builds.0.push(f1.wait_mic_running("busy-4"));
    holder_of(&f1, "busy-4");
    assert!(
        wait_for(T, || host(
            &common::web::get_json(&addr, "/api/hosts")
                .as_array()
                .cloned()
                .unwrap_or_default(),
            "w3"
        )
        .is_some_and(|h| h["shown"] == "gone")),
        "w3 never gone: {}",
        common::web::get_json(&addr, "/api/hosts")
    );
    Three {
        farms: vec![f1, f2, f3, f4],
        guards: vec![g1, g2, g4, w3],
        addr,
        logs: std::mem::take(&mut builds.0),
    }
}

impl Three {
    fn stop(mut self) {
        let (code, out, err) = output(self.farms[0].bin().args(["cancel", "busy-4"]));
        assert_eq!(code, 0, "{out}{err}");
        for g in self.guards.iter_mut().take(3) {
            sigterm(&g.0);
            assert_eq!(wait_exit(&mut g.0, T), Some(0));
        }
    }
}

#[test]
fn the_status_page_shows_the_farm_with_a_draining_host_and_a_gone_one_with_its_job() {
    let t = three();
    // w4 is drained by an operator: its record says so within an interval
    let (code, out, err) = output(
        t.farms[3]
            .bin()
            .args(["drain", "--reason", "kernel update"]),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        wait_for(T, || host(
            &common::web::get_json(&t.addr, "/api/hosts")
                .as_array()
                .cloned()
                .unwrap_or_default(),
            "w4"
        )
        .is_some_and(|h| h["shown"] == "draining")),
        "w4 never shown draining: {}",
        common::web::get_json(&t.addr, "/api/hosts")
    );
    let api = common::web::get_json(&t.addr, "/api/hosts");
    let list = api.as_array().unwrap();
    assert_eq!(list.len(), 4, "{api}");
    assert_eq!(host(list, "w1").unwrap()["shown"], "running");
    assert_eq!(host(list, "w2").unwrap()["shown"], "running");
    assert_eq!(host(list, "w4").unwrap()["shown"], "draining");
    let gone = host(list, "w3").unwrap();
    assert_eq!(gone["running"][0]["image_id"], "hang-3", "{gone}");
    // the same list as the command's
    let cmd: Vec<Value> = hosts(&t.farms[1]);
    assert_eq!(
        cmd.iter()
            .map(|h| (&h["worker"], &h["shown"]))
            .collect::<Vec<_>>(),
        list.iter()
            .map(|h| (&h["worker"], &h["shown"]))
            .collect::<Vec<_>>()
    );

    let page = common::web::get(&t.addr, "/");
    assert_eq!(page.status, 200);
    let row = |w: &str| {
        page.body
            .split("<tr ")
            .find(|r| r.contains(&format!("data-worker=\"{w}\"")))
            .unwrap_or_else(|| panic!("no row of {w}: {}", page.body))
            .to_string()
    };
    let r3 = row("w3");
    assert!(r3.starts_with("class=\"gone\""), "{r3}");
    assert!(r3.contains("badge s-gone") && r3.contains("held: "), "{r3}");
    assert!(r3.contains("hang-3"), "{r3}");
    assert!(row("w1").contains("badge s-running"), "{}", row("w1"));
    assert!(row("w2").contains("badge s-running"), "{}", row("w2"));
    assert!(row("w4").contains("badge s-draining"), "{}", row("w4"));
    assert!(row("w4").contains("kernel update"), "{}", row("w4"));
    assert!(row("w1").contains("(this host)"));

    // rendered by a browser
    if let Some(bin) = common::web::chromium() {
        let tmp = tempfile::tempdir().unwrap();
        let shot = std::env::var_os("HOSTS_PANEL_PNG")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| tmp.path().join("hosts-panel.png"));
        let page = format!("http://{}/", t.addr);
        let dom = common::web::run_chromium(
            &bin,
            &tmp.path().join("p"),
            &["--dump-dom".into(), page.clone()],
        );
        assert!(
            dom.contains("data-worker=\"w3\" data-shown=\"gone\""),
            "{dom}"
        );
        assert!(dom.contains("held: "), "{dom}");
        assert!(
            dom.contains("data-worker=\"w4\" data-shown=\"draining\""),
            "{dom}"
        );
        common::web::run_chromium(
            &bin,
            &tmp.path().join("q"),
            &[
                format!("--screenshot={}", shot.display()),
                "--window-size=1280,900".into(),
                page,
            ],
        );
        assert!(shot.metadata().unwrap().len() > 10_000);
    }
    t.stop();
}

/// An AMQP-only farm (a spool each, one broker): each daemon hears the other's record on the
/// farm exchange; `hosts` (through the daemon's socket) lists both; `cancel` on the host that
/// does not hold the job names the holder from its record; a SIGKILLed host becomes gone.
#[test]
fn over_amqp_the_records_travel_on_the_farm_exchange() {
    if !common::broker::available() {
        return;
    }
    let broker = common::broker::Broker::start();
    let farm = |w: &str| {
        let mut f = Farm::new();
        f.cfg.amqp.url = Some(broker.url());
        f.cfg.worker.workers = 1;
        f.cfg.worker.host_record_interval = 1;
        f.cfg.hooks.push = None;
        f.cfg.spool.worker_id = Some(w.into());
        f
    };
    let (fa, fb) = (farm("w1"), farm("w2"));
    let ga = fa.start_binary();
    let gb = fb.start_binary();
    let both = |f: &Farm| {
        let l = hosts(f);
        ["w1", "w2"]
            .iter()
            .all(|w| host(&l, w).is_some_and(|h| h["shown"] == "running"))
    };
    assert!(
        wait_for(T, || both(&fa) && both(&fb)),
        "{:?} / {:?}",
        hosts(&fa),
        hosts(&fb)
    );
    assert!(
        !fa.spool().join("hosts/w2.json").exists(),
        "w2's record came over AMQP, not through a spool"
    );

    let fei = serde_json::json!({"wfid": "wf-h", "subid": "s", "expid": "0_0_1", "engine_id": "e"});
    let wi = serde_json::json!({
        "fei": fei, "participant_name": "build_image",
        "fields": {"params": {}, "msg": [], "image": {"image_id": "amqp-h", "kickstart": "# mic-fixture: sleep 600\n",
            "image_type": "loop", "name": "img-amqp-h", "arch": "i586"}}
    });
    broker.publish("build_image", &[serde_json::to_vec(&wi).unwrap()]);
    let holder = holder_of(&fa, "amqp-h");
    let (holder_farm, other_farm) = if holder == "w1" {
        (&fa, &fb)
    } else {
        (&fb, &fa)
    };
    let log = holder_farm.wait_mic_running("amqp-h");
    let _builds = Builds(vec![log.clone()]);
    // the other host has heard the holder's record listing the job (within an interval)
    assert_eq!(holder_of(other_farm, "amqp-h"), holder);
    let (code, out, err) = output(other_farm.bin().args(["cancel", "amqp-h"]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&format!(
            "held by worker {holder} (its job 1, by its host record"
        )),
        "{err}"
    );
    assert!(list(&other_farm.spool().join("control")).is_empty());

    let (mut killed, mut live) = if holder == "w1" { (ga, gb) } else { (gb, ga) };
    killed.0.kill().unwrap();
    killed.0.wait().unwrap();
    kill_fixture(&log);
    assert_eq!(
        wait_gone(other_farm, &holder)["running"][0]["image_id"],
        "amqp-h"
    );
    sigterm(&live.0);
    assert_eq!(wait_exit(&mut live.0, T), Some(0));
}
