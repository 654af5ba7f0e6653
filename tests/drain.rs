//! Draining a host (`build-image drain`/`undrain`, docs/operations.md "Draining a host"): the
//! drained host finishes what it builds and claims nothing more, the others take the rest, it
//! stays drained across a restart, `undrain` resumes; over AMQP (a real broker, a private node
//! per test: tests/common/broker.rs) and on a shared spool. Real daemons; mic is the fixture.

mod common;

use common::broker::{self, Broker};
use common::workers::{config_for, start_worker, stop_worker};
use common::{Farm, output, wait_for, web};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const Q: &str = "build_image";
const R: &str = "ruote_workitems";

/// A Ruote workitem whose build takes `secs` seconds (the mic fixture sleeps).
fn ruote(n: usize, secs: u32) -> Vec<u8> {
    serde_json::to_vec(&broker::ruote(n, &format!("# mic-fixture: sleep {secs}\n"))).unwrap()
}

/// The binary run with the config file `cfg`: (exit code, stdout, stderr).
fn run(cfg: &Path, args: &[&str]) -> (i32, String, String) {
    output(common::bin().arg("--config").arg(cfg).args(args))
}

/// The log of the daemon of `cfg` (`events --json`).
fn events(cfg: &Path) -> Vec<Value> {
    let (code, text, err) = run(cfg, &["events", "--json"]);
    assert_eq!(code, 0, "{err}");
    common::export_events(&text)
}

/// How many events of `kind` the log of `cfg` holds.
fn count(cfg: &Path, kind: &str) -> usize {
    events(cfg)
        .iter()
        .filter(|e| e["kind"] == json!(kind))
        .count()
}

/// The farm-level events of the log of `cfg`: (job, kind, reason).
fn farm_events(cfg: &Path) -> Vec<(u64, String, String)> {
    events(cfg)
        .iter()
        .filter(|e| e["kind"] == json!("drained") || e["kind"] == json!("undrained"))
        .map(|e| {
            (
                e["job"].as_u64().unwrap(),
                e["kind"].as_str().unwrap().to_string(),
                e["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// `status` of the daemon of `cfg` once it answers: its stderr.
fn status_warnings(cfg: &Path) -> String {
    let mut err = String::new();
    assert!(
        wait_for(Duration::from_secs(30), || {
            let (code, _, e) = run(cfg, &["status"]);
            err = e;
            code == 0
        }),
        "status: {err}"
    );
    err
}

/// The answers taken so far, by wfid.
#[derive(Default)]
struct Answers(std::collections::BTreeMap<String, Vec<Value>>);

impl Answers {
    fn collect(&mut self, broker: &Broker) {
        for (body, _) in broker.take(R) {
            let v: Value = serde_json::from_slice(&body).unwrap();
            let wfid = v["fei"]["wfid"].as_str().unwrap().to_string();
            self.0.entry(wfid).or_default().push(v);
        }
    }
    fn of(&self, n: usize) -> &[Value] {
        self.0
            .get(&format!("wf-{n}"))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
    /// Waits until img`range` are all answered; then each exactly once, built.
    fn wait_all(&mut self, broker: &Broker, range: std::ops::RangeInclusive<usize>) {
        assert!(
            wait_for(Duration::from_secs(240), || {
                self.collect(broker);
                range.clone().all(|n| !self.of(n).is_empty())
            }),
            "not all of {range:?} answered: {:?}",
            self.0.keys()
        );
        for n in range {
            assert_eq!(
                self.of(n).len(),
                1,
                "img{n} answered once: {:?}",
                self.of(n)
            );
            assert_eq!(self.of(n)[0]["fields"]["result"], json!(true), "img{n}");
        }
    }
}

/// 20 workitems waiting in the broker, two 1-slot daemons: w1 is drained while it builds. It
/// finishes that build (answered) and takes nothing more; w2 builds the rest; every job is
/// answered once. `/healthz`, `/metrics` and `status` say it. `undrain`: w1 takes work again.
/// Drained again and restarted, it is still drained and takes nothing. The farm-level events
/// are in the log, in its export, and in a log imported from that export.
#[test]
fn a_drained_host_takes_nothing_more_from_the_work_queue() {
    if !broker::available() {
        return;
    }
    common::init_log();
    let broker = Broker::start();
    let mut farm = Farm::new();
    farm.cfg.amqp.url = Some(broker.url());
    farm.cfg.worker.workers = 1;
    farm.cfg.hooks.push = None;
    farm.cfg.http.listen = Some("127.0.0.1:0".into());
    let w1 = farm.config_file();
    let mut d = farm.start();
    let w2_daemon = start_worker(&farm, "w2");
    let w2 = config_for(&farm, "w2");
    let addr = web::http_addr(&farm);
    assert_eq!(web::get(&addr, "/healthz").status, 200);

    broker.publish(Q, &(1..=20).map(|n| ruote(n, 2)).collect::<Vec<_>>());
    assert!(
        wait_for(Duration::from_secs(60), || count(&w1, "started") >= 1),
        "w1 builds"
    );
    let (code, out, err) = run(&w1, &["drain", "--reason", "kernel update"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("drained: kernel update"), "{out}");
    let held = count(&w1, "claimed");
    assert!(
        (1..=2).contains(&held),
        "one build at a time: {held} claimed"
    );
    let (code, out, _) = run(&w1, &["drain", "--reason", "kernel update"]);
    assert_eq!(code, 0);
    assert!(out.contains("already drained since"), "{out}");

    let h = web::get(&addr, "/healthz");
    assert_eq!(
        (h.status, h.body.as_str()),
        (503, "drained: kernel update\n")
    );
    let metrics = web::get(&addr, "/metrics").body;
    assert!(
        metrics.lines().any(|l| l == "build_image_drained 1"),
        "{metrics}"
    );
    // the drain moved the last seq too (an event of no job)
    let drained_seq = events(&w1)
        .iter()
        .find(|e| e["kind"] == json!("drained"))
        .and_then(|e| e["seq"].as_u64())
        .unwrap();
    let last: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("build_image_last_event_seq "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(last >= drained_seq, "{last} < {drained_seq}");
    let warn = status_warnings(&w1);
    assert!(
        warn.contains("WARNING: DRAINED since ") && warn.contains(": kernel update"),
        "{warn}"
    );

    let mut answers = Answers::default();
    answers.wait_all(&broker, 1..=20);
    assert_eq!(
        count(&w1, "claimed"),
        held,
        "w1 took nothing after the drain"
    );
    assert_eq!(count(&w1, "delivered"), held, "w1's builds were answered");
    assert_eq!(count(&w2, "claimed"), 20 - held, "w2 built the rest");
    assert!(answers.0.len() == 20);

    // undrain: w1 takes work again
    let (code, out, err) = run(&w1, &["undrain"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("undrained"), "{out}");
    assert_eq!(web::get(&addr, "/healthz").status, 200);
    let metrics = web::get(&addr, "/metrics").body;
    assert!(
        metrics.lines().any(|l| l == "build_image_drained 0"),
        "{metrics}"
    );
    assert!(!status_warnings(&w1).contains("DRAINED"));
    broker.publish(Q, &(21..=26).map(|n| ruote(n, 2)).collect::<Vec<_>>());
    answers.wait_all(&broker, 21..=26);
    let after_undrain = count(&w1, "claimed");
    assert!(after_undrain > held, "w1 took work again after undrain");

    // drained again, then restarted: still drained
    let (code, _, err) = run(&w1, &["drain", "--reason", "disk swap"]);
    assert_eq!(code, 0, "{err}");
    d.stop().unwrap();
    d = farm.start();
    let warn = status_warnings(&w1);
    assert!(
        warn.contains("DRAINED") && warn.contains("disk swap"),
        "{warn}"
    );
    broker.publish(Q, &(27..=30).map(|n| ruote(n, 1)).collect::<Vec<_>>());
    answers.wait_all(&broker, 27..=30);
    assert_eq!(
        count(&w1, "claimed"),
        after_undrain,
        "nothing after the restart"
    );

    // the farm-level events: in the log as job 0, shown by `events` as the farm's
    let want = vec![
        (0, "drained".to_string(), "kernel update".to_string()),
        (0, "undrained".to_string(), String::new()),
        (0, "drained".to_string(), "disk swap".to_string()),
    ];
    assert_eq!(farm_events(&w1), want);
    let (code, text, _) = run(&w1, &["events", "--kind", "drained"]);
    assert_eq!(code, 0);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        text.lines()
            .all(|l| l.contains(" farm ") && l.contains("drained")),
        "{text}"
    );
    stop_worker(w2_daemon);
    d.stop().unwrap();

    // the export round trip (with no daemon: the log opened by the command)
    let (code, export, err) = run(&w1, &["events", "--json"]);
    assert_eq!(code, 0, "{err}");
    let file = farm.root().join("export.jsonl");
    std::fs::write(&file, &export).unwrap();
    let mut cfg = farm.cfg.clone();
    cfg.spool.state_dir = Some(farm.root().join("imported"));
    let imported = farm.root().join("imported.toml");
    std::fs::write(&imported, toml::to_string(&cfg).unwrap()).unwrap();
    let (code, _, err) = run(&imported, &["import", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(farm_events(&imported), want);
    let warn = status_warnings(&imported);
    assert!(
        warn.contains("DRAINED") && warn.contains("disk swap"),
        "{warn}"
    );
    // undrained offline, in the imported log
    let (code, out, err) = run(&imported, &["undrain"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("undrained"), "{out}");
    assert!(!status_warnings(&imported).contains("DRAINED"));
}

/// The same on a shared spool: w1 builds a file and is drained; w2 starts; 19 files dropped are
/// all claimed and built by w2 (none by w1, the files stay in incoming/ for w2); `undrain` and w2
/// stopped: w1 claims again; drained and restarted, w1 claims nothing until w2 is back.
#[test]
fn a_drained_host_claims_nothing_from_a_shared_spool() {
    common::init_log();
    let mut farm = Farm::new();
    farm.cfg.worker.workers = 1;
    farm.cfg.hooks.push = None;
    let w1 = farm.config_file();
    let w2 = config_for(&farm, "w2");
    let ks = |secs: u32| format!("# mic-fixture: sleep {secs}\n");
    let drop_range = |r: std::ops::RangeInclusive<usize>, secs: u32| {
        for n in r {
            farm.drop_json(
                &format!("f{n}.json"),
                &common::workitem(&format!("f{n}"), &ks(secs)),
            );
        }
    };
    let answered = |r: std::ops::RangeInclusive<usize>| {
        for n in r {
            let a = farm.wait_outbox(&format!("f{n}.json"), Duration::from_secs(240));
            assert_eq!(a["result"], json!(true), "f{n}: {a}");
        }
    };
    let mut d = farm.start();
    drop_range(1..=1, 3);
    farm.wait_mic_running("f1");
    let (code, out, err) = run(&w1, &["drain", "--reason", "maintenance"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("drained: maintenance"), "{out}");
    // doctor asks the daemon: a warning (its other checks are the host's business here)
    let (_, out, _) = run(&w1, &["doctor"]);
    let line = out
        .lines()
        .find(|l| l.contains("drain:"))
        .unwrap_or_default();
    assert!(
        line.starts_with("WARN") && line.contains("drained since") && line.contains("maintenance"),
        "{out}"
    );
    let w2_daemon = start_worker(&farm, "w2");
    drop_range(2..=20, 1);
    answered(1..=20);
    assert_eq!(
        count(&w1, "claimed"),
        1,
        "w1 finished its build, claimed nothing more"
    );
    assert_eq!(count(&w1, "delivered"), 1);
    assert_eq!(count(&w2, "claimed"), 19, "w2 built the rest");
    assert_eq!(common::mic_runs_total(&farm), 20, "each built once");

    // undrain, w2 away: w1 claims again
    stop_worker(w2_daemon);
    let (code, _, err) = run(&w1, &["undrain"]);
    assert_eq!(code, 0, "{err}");
    drop_range(21..=23, 1);
    answered(21..=23);
    assert_eq!(count(&w1, "claimed"), 4);

    // drained and restarted: the files wait in incoming/ until another host takes them
    let (code, _, err) = run(&w1, &["drain"]);
    assert_eq!(code, 0, "{err}");
    d.stop().unwrap();
    d = farm.start();
    assert!(status_warnings(&w1).contains("drained by the operator"));
    drop_range(24..=26, 1);
    // three poll intervals and more: still there, unclaimed
    let incoming = farm.incoming();
    let waiting = || {
        (24..=26)
            .filter(|n| incoming.join(format!("f{n}.json")).exists())
            .count()
    };
    assert!(
        !wait_for(Duration::from_secs(3), || waiting() < 3),
        "a drained host claimed from incoming/"
    );
    let w2_daemon = start_worker(&farm, "w2");
    answered(24..=26);
    assert_eq!(count(&w1, "claimed"), 4);
    assert_eq!(count(&w2, "claimed"), 22);
    stop_worker(w2_daemon);
    d.stop().unwrap();
}
