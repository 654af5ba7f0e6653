//! The BOSS participant against a real RabbitMQ (a private node started by each test, see
//! tests/common/broker.rs): workitems consumed from `build_image`, answers on
//! `ruote_workitems`, two daemons on one queue, a daemon SIGKILLed, the broker restarted,
//! forget, cancel, a malformed message, the spool while the broker is away.

mod common;

use common::broker::{self, Broker, ruote};
use common::workers::start_worker;
use common::{Farm, wait_for};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

const Q: &str = "build_image";
const R: &str = "ruote_workitems";

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

fn farm_with(broker: &Broker, workers: usize, prefetch: u32) -> Farm {
    let mut farm = Farm::new();
    farm.cfg.amqp.url = Some(broker.url());
    farm.cfg.amqp.prefetch = prefetch;
    farm.cfg.worker.workers = workers;
    farm.cfg.hooks.push = None;
    farm
}

/// Answers taken so far, by wfid.
#[derive(Default)]
struct Answers {
    by_wfid: HashMap<String, Vec<Value>>,
}

impl Answers {
    fn collect(&mut self, broker: &Broker) {
        for (body, mode) in broker.take(R) {
            assert_eq!(mode, Some(2), "answers are persistent");
            let v: Value = serde_json::from_slice(&body).expect("an answer is JSON");
            let wfid = v["fei"]["wfid"].as_str().expect("fei kept").to_string();
            self.by_wfid.entry(wfid).or_default().push(v);
        }
    }
    fn distinct(&self) -> usize {
        self.by_wfid.len()
    }
    fn duplicates(&self) -> usize {
        self.by_wfid.values().map(|v| v.len() - 1).sum()
    }
    fn wait(&mut self, broker: &Broker, n: usize, timeout: Duration) {
        let ok = wait_for(timeout, || {
            self.collect(broker);
            self.distinct() >= n
        });
        assert!(ok, "only {} of {n} answered", self.distinct());
    }
}

#[test]
fn hundred_workitems_two_daemons_a_kill_and_a_broker_restart() {
    if !broker::available() {
        return;
    }
    let mut broker = Broker::start();
    let farm = farm_with(&broker, 2, 0);
    let ks = "# mic-fixture: sleep 0.3\n";
    let bodies: Vec<Vec<u8>> = (0..100).map(|n| bytes(&ruote(n, ks))).collect();
    broker.publish(Q, &bodies);
    let a = farm.start();
    let mut b = start_worker(&farm, "w2");
    let mut answers = Answers::default();
    answers.wait(&broker, 15, Duration::from_secs(120));
    // SIGKILL the second daemon mid-run, and start it again.
    let killed_at = build_image::journal::now_ts();
    b.0.kill().unwrap();
    b.0.wait().unwrap();
    let b2 = start_worker(&farm, "w2");
    answers.wait(&broker, 45, Duration::from_secs(120));
    // The broker goes away and comes back.
    let broker_stopped_at = build_image::journal::now_ts();
    broker.stop_node();
    broker.start_node();
    answers.wait(&broker, 100, Duration::from_secs(240));
    // A little longer, to catch late duplicates.
    std::thread::sleep(Duration::from_millis(500));
    answers.collect(&broker);
    for n in 0..100 {
        let got = &answers.by_wfid[&format!("wf-{n}")];
        for v in got {
            assert_eq!(v["fei"], ruote(n, ks)["fei"], "fei kept");
            let img = &v["fields"]["image"];
            assert_eq!(v["fields"]["result"], json!(true), "{v}");
            assert_eq!(img["result"], json!(true));
            for k in ["files_url", "image_url", "logfile_url"] {
                assert!(
                    img[k]
                        .as_str()
                        .is_some_and(|u| u.starts_with("http://img.test/")),
                    "{k} in {v}"
                );
            }
        }
    }
    let dups = answers.duplicates();
    println!(
        "100 workitems, 2 daemons (one SIGKILLed and restarted), broker restarted: {dups} duplicate answer(s)"
    );
    // The windows (docs/amqp.md): a claim flushed but not acked when the daemon died (at most
    // prefetch = 2 messages), answers confirmed but `delivered` not yet flushed (at most the
    // 2 build slots' worth), publishes in flight when the broker stopped (both daemons).
    assert!(dups <= 12, "{dups} duplicates: more than the windows allow");
    assert_eq!(broker.depth(Q), 0, "every workitem was taken");
    let mut b2 = b2;
    common::sigterm(&b2.0);
    assert_eq!(
        common::wait_exit(&mut b2.0, Duration::from_secs(60)),
        Some(0)
    );
    a.stop().unwrap();
    // Both daemons took work; every job of both is settled; 100 workitems, 100 builds at least.
    println!("w2 SIGKILLed at {killed_at}; broker stopped at {broker_stopped_at}");
    let mut claims_of: HashMap<String, Vec<String>> = HashMap::new();
    for w in ["w1", "w2"] {
        let j = common::open_journal(&farm.spool().join("state").join(w));
        for e in j.since(0).filter_map(Result::ok) {
            if let build_image::domain::EventKind::Queued { image_id, .. } = &e.kind {
                claims_of
                    .entry(image_id.clone())
                    .or_default()
                    .push(format!("{w} {}", e.ts));
            }
            if let build_image::domain::EventKind::Duplicate { .. } = &e.kind {
                println!("{w}: job {} got a re-delivery at {}", e.job, e.ts);
            }
        }
    }
    for (id, c) in &claims_of {
        if c.len() > 1 {
            println!("{id} accepted twice: {c:?}");
        }
    }
    for w in ["w1", "w2"] {
        let j = common::open_journal(&farm.spool().join("state").join(w));
        let claims = j
            .since(0)
            .filter_map(Result::ok)
            .filter(|e| {
                matches!(
                    &e.kind,
                    build_image::domain::EventKind::Claimed {
                        source: Some(_),
                        ..
                    }
                )
            })
            .count();
        println!("{w}: {claims} message(s) claimed");
        assert!(claims >= 5, "{w} claimed {claims}");
        assert_eq!(
            j.open_jobs().unwrap(),
            Vec::<u64>::new(),
            "{w} has open jobs"
        );
    }
    let builds = common::mic_runs_total(&farm);
    println!("{builds} build(s) for 100 workitems");
    assert!(builds >= 100, "{builds} builds for 100 workitems");
}

#[test]
fn forget_cancel_malformed_outage_and_the_spool() {
    if !broker::available() {
        return;
    }
    common::init_log();
    let mut broker = Broker::start();
    let farm = farm_with(&broker, 1, 2);
    let d = farm.start();
    let mut answers = Answers::default();

    // A malformed message: rejected without requeue, kept in rejected/ with a reason.
    broker.publish(Q, &[b"this is not json".to_vec()]);
    let rejected = farm.rejected();
    assert!(
        // the reason is written first, then the body is moved beside it: wait for both
        wait_for(Duration::from_secs(30), || {
            let names = common::list(&rejected);
            let amqp = |reason: bool| {
                names
                    .iter()
                    .any(|n| n.starts_with("amqp-") && n.ends_with(".reason") == reason)
            };
            amqp(true) && amqp(false)
        }),
        "no rejected body: {:?}",
        common::list(&rejected)
    );
    let body = common::list(&rejected)
        .into_iter()
        .find(|n| n.starts_with("amqp-") && !n.ends_with(".reason"))
        .unwrap();
    assert_eq!(
        std::fs::read(rejected.join(&body)).unwrap(),
        b"this is not json"
    );
    assert!(wait_for(Duration::from_secs(10), || broker.depth(Q) == 0));

    // forget: built, no reply.
    let mut f = ruote(1, "# ks\n");
    f["fields"]["params"]["forget"] = json!(true);
    broker.publish(Q, &[bytes(&f)]);

    // Cancel of a running job, and of one that waits (one build slot).
    let slow = "# mic-fixture: sleep 60\n";
    broker.publish(Q, &[bytes(&ruote(2, slow))]);
    farm.wait_mic_running("img2");
    broker.publish(Q, &[bytes(&ruote(3, slow))]);
    let cancel = |n: usize| json!({"fei": ruote(n, "")["fei"], "cancel": true});
    broker.publish(Q, &[bytes(&cancel(3))]);
    broker.publish(Q, &[bytes(&cancel(2))]);
    answers.wait(&broker, 2, Duration::from_secs(60));
    for n in [2, 3] {
        let v = &answers.by_wfid[&format!("wf-{n}")][0];
        assert_eq!(v["fields"]["result"], json!(false), "{v}");
        assert_eq!(v["fields"]["image"]["error"], json!("cancelled"), "{v}");
    }
    assert_eq!(
        common::mic_runs(&farm, "img3"),
        0,
        "a cancelled queued job is never built"
    );
    assert!(!answers.by_wfid.contains_key("wf-1"), "forget: no reply");
    // The forget job was built and is done.
    assert!(wait_for(Duration::from_secs(30), || events(&farm)
        .iter()
        .any(|e| e["kind"] == json!("delivered")
            && e["withheld"]
                .as_str()
                .is_some_and(|o| o.contains("forget")))));
    assert_eq!(common::mic_runs(&farm, "img1"), 1, "{:?}", events(&farm));

    // A reply that falls due while the broker is down is published when it returns; the
    // spool is served meanwhile.
    // (img4's build ends only once the broker is down: it waits for this file)
    let broker_down = farm.root().join("broker-down");
    let ks4 = format!("# mic-fixture: wait-for {}\n", broker_down.display());
    broker.publish(Q, &[bytes(&ruote(4, &ks4))]);
    farm.wait_mic_running("img4");
    broker.stop_node();
    std::fs::write(&broker_down, b"").unwrap();
    farm.drop_json("spool.json", &common::workitem("sp1", "# ks\n"));
    let out = farm.wait_outbox("spool.json", Duration::from_secs(60));
    assert_eq!(out["result"], json!(true), "{out}");
    // img4's build ends while the broker is away: finished, not delivered.
    assert!(wait_for(Duration::from_secs(30), || {
        let evs = events(&farm);
        let job = job_of(&evs, "img4");
        evs.iter()
            .any(|e| e["kind"] == json!("finished") && e["job"] == json!(job))
    }));
    broker.start_node();
    answers.wait(&broker, 3, Duration::from_secs(90));
    assert_eq!(answers.by_wfid["wf-4"][0]["fields"]["result"], json!(true));
    // an AMQP answer carries the image's sha256, as an outbox answer does
    let img4 = &answers.by_wfid["wf-4"][0]["fields"]["image"];
    let path4 = farm.base().join(
        img4["image_url"]
            .as_str()
            .unwrap()
            .trim_start_matches("http://img.test/images/"),
    );
    let want4 = build_image::digest::sha256_hex(&std::fs::read(&path4).unwrap());
    assert_eq!(img4["image_sha256"], json!(want4), "{img4}");
    // and its provenance, beside the image
    assert_eq!(
        img4["provenance_url"],
        json!(format!(
            "{}/provenance.json",
            img4["files_url"].as_str().unwrap()
        )),
        "{img4}"
    );
    let dir4 = img4["files_url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://img.test/images/");
    assert!(farm.base().join(dir4).join("provenance.json").is_file());
    assert_eq!(
        out["image"]["image_sha256"].as_str().map(str::len),
        Some(64)
    );

    // redeliver: an AMQP job's answer is published again (not written to the outbox).
    let (code, text, err) = common::output(farm.bin().args(["redeliver", "img4"]));
    assert_eq!(code, 0, "{text}{err}");
    assert!(text.contains("published to ruote_workitems"), "{text}");
    assert!(
        wait_for(Duration::from_secs(60), || {
            answers.collect(&broker);
            answers.by_wfid["wf-4"].len() >= 2
        }),
        "wf-4 not answered again"
    );
    assert_eq!(answers.by_wfid["wf-4"].len(), 2, "answered again, once");
    assert_eq!(answers.by_wfid["wf-4"][0], answers.by_wfid["wf-4"][1]);
    assert!(
        !common::list(&farm.outbox())
            .iter()
            .any(|n| n.starts_with(".amqp")),
        "never a hidden answer in outbox/"
    );

    // status and show name each job's source.
    let (code, text, err) = common::output(farm.bin().args(["status", "--json"]));
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Value> = serde_json::from_str(&text).unwrap();
    let source = |id: &str| {
        rows.iter()
            .find(|r| r["image_id"] == json!(id))
            .map(|r| r["source"].clone())
    };
    assert_eq!(source("img4"), Some(json!("amqp")));
    assert_eq!(source("sp1"), Some(json!("spool")));
    let (code, text, _) = common::output(farm.bin().args(["show", "img4"]));
    assert_eq!(code, 0);
    assert!(text.contains("source     amqp"), "{text}");
    assert!(
        text.contains(&format!(
            "from amqp://127.0.0.1:{}/%2F/build_image",
            broker.port
        )),
        "{text}"
    );
    d.stop().unwrap();

    // doctor reaches the broker, and says so when it is away.
    let (_, text, _) = common::output(farm.bin().arg("doctor"));
    assert!(text.contains("amqp broker"), "{text}");
    assert!(
        !text.contains("guest:guest"),
        "the password is never shown: {text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("amqp broker"))
        .unwrap()
        .to_string();
    assert!(line.trim_start().starts_with("ok"), "{line}");
    broker.stop_node();
    let (_, text, _) = common::output(farm.bin().arg("doctor"));
    let line = text
        .lines()
        .find(|l| l.contains("amqp broker"))
        .unwrap()
        .to_string();
    assert!(line.contains("FAIL"), "{line}");
}

/// The log through the running daemon (`events --json`).
fn events(farm: &Farm) -> Vec<Value> {
    let (code, text, err) = common::output(farm.bin().args(["events", "--json"]));
    assert_eq!(code, 0, "{err}");
    common::export_events(&text)
}

fn job_of(events: &[Value], image_id: &str) -> u64 {
    events
        .iter()
        .find(|e| e["kind"] == json!("queued") && e["image_id"] == json!(image_id))
        .and_then(|e| e["job"].as_u64())
        .unwrap_or(0)
}

/// The steady-state run through the farm work queue: 500 workitems published before two
/// daemons (2 build slots each) start. Every workitem is answered exactly once, nothing is built
/// twice, and the work is split evenly (each daemon takes it from the work queue only while a
/// slot of its own is free, so neither hoards).
#[test]
fn five_hundred_workitems_over_two_daemons_once_each_and_split_evenly() {
    if !broker::available() {
        return;
    }
    const N: usize = 500;
    let broker = Broker::start();
    let farm = farm_with(&broker, 2, 0);
    let ks = "# mic-fixture: sleep 0.05\n";
    let bodies: Vec<Vec<u8>> = (0..N).map(|n| bytes(&ruote(n, ks))).collect();
    broker.publish(Q, &bodies);
    let started = std::time::Instant::now();
    let mut w1 = start_worker(&farm, "w1");
    let mut w2 = start_worker(&farm, "w2");
    let mut answers = Answers::default();
    answers.wait(&broker, N, Duration::from_secs(600));
    let took = started.elapsed();
    // A little longer, to catch a late second answer.
    std::thread::sleep(Duration::from_millis(500));
    answers.collect(&broker);
    for w in [&mut w1, &mut w2] {
        common::sigterm(&w.0);
        assert_eq!(
            common::wait_exit(&mut w.0, Duration::from_secs(60)),
            Some(0)
        );
    }
    assert_eq!(answers.duplicates(), 0, "every workitem answered once");
    for n in 0..N {
        let got = &answers.by_wfid[&format!("wf-{n}")];
        assert_eq!(got[0]["fields"]["result"], json!(true), "{}", got[0]);
    }
    let mut built: HashMap<&str, usize> = HashMap::new();
    let mut queued_by: HashMap<String, &str> = HashMap::new();
    for w in ["w1", "w2"] {
        let j = common::open_journal(&farm.spool().join("state").join(w));
        for e in j.since(0).filter_map(Result::ok) {
            if let build_image::domain::EventKind::Queued { image_id, .. } = &e.kind {
                *built.entry(w).or_default() += 1;
                if let Some(other) = queued_by.insert(image_id.clone(), w) {
                    panic!("{image_id} accepted by {other} and by {w}");
                }
            }
        }
        assert_eq!(
            j.open_jobs().unwrap(),
            Vec::<u64>::new(),
            "{w} has open jobs"
        );
    }
    let (a, b) = (built["w1"], built["w2"]);
    println!(
        "{N} workitems over 2 daemons in {:.1} s: w1 {a}, w2 {b}, 0 duplicates",
        took.as_secs_f64()
    );
    assert_eq!(a + b, N, "each workitem accepted by one daemon");
    assert!(a.min(b) * 100 >= N * 35, "an uneven split: w1 {a}, w2 {b}");
    assert_eq!(common::mic_runs_total(&farm), N, "one build per workitem");
}
