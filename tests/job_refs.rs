//! Job references that cannot be confused (issue 23, defect 1): job numbers are dense; `#N`
//! and `--job N` name job N, a bare word is an image_id, and a bare number that is both an
//! image_id and another job's number is refused as ambiguous, naming both; `/jobs/N` is
//! always job N. Through the binary, against a daemon run in-process with real builds (the
//! mic fixture) and pushes (the push fixture).

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn status(farm: &Farm) -> Vec<Value> {
    let (code, out, err) = output(farm.bin().args(["status", "--json"]));
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn row(farm: &Farm, image_id: &str) -> Value {
    status(farm)
        .into_iter()
        .find(|r| r["image_id"] == image_id)
        .unwrap_or_else(|| panic!("no job {image_id}"))
}

fn submit(farm: &Farm, ks: &str, id: &str) {
    let path = farm.root().join(format!("{id}.ks"));
    std::fs::write(&path, ks).unwrap();
    let (code, out, err) = output(farm.bin().args([
        "submit",
        "--kickstart",
        path.to_str().unwrap(),
        "--name",
        &format!("img-{id}"),
        "--arch",
        "i586",
        "--type",
        "loop",
        "--id",
        id,
    ]));
    assert_eq!((code, out.trim()), (0, id), "{err}");
}

/// GET over HTTP/1.0: (status, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: t\r\n\r\n").as_bytes())
        .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

#[test]
fn a_number_that_is_an_image_id_never_takes_over_a_job() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.worker.workers = 1;
    farm.cfg.http.listen = Some("127.0.0.1:0".into());
    let d = farm.start();

    // one build holds the only slot; the victim waits behind it
    submit(&farm, "# mic-fixture: sleep 60\n", "blocker");
    farm.wait_mic_running("blocker");
    submit(&farm, "ks\n", "victim-1");
    assert!(wait_for(T, || row(&farm, "victim-1")["state"] == "queued"));
    let victim = row(&farm, "victim-1")["job"].as_u64().unwrap();

    // a workitem whose image_id is the victim's job number
    let number = victim.to_string();
    submit(&farm, "ks\n", &number);
    assert!(wait_for(T, || status(&farm).len() == 3
        && row(&farm, &number)["state"] == "queued"));
    let numeric = row(&farm, &number)["job"].as_u64().unwrap();

    // the bare number is both: refused, naming both jobs, and nothing is cancelled
    let (code, out, err) = output(farm.bin().args(["cancel", &number]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("ambiguous"), "{err}");
    assert!(
        err.contains(&format!("job {victim}")) && err.contains(&format!("job {numeric}")),
        "both named: {err}"
    );
    assert!(err.contains(&format!("#{victim}")), "how to say it: {err}");
    for (id, n) in [
        ("show", &number),
        ("retry", &number),
        ("redeliver", &number),
    ] {
        let (code, _, err) = output(farm.bin().args([id, n]));
        assert_eq!(code, 1, "{id}: {err}");
        assert!(err.contains("ambiguous"), "{id}: {err}");
    }
    assert_eq!(row(&farm, "victim-1")["state"], "queued");
    assert_eq!(row(&farm, &number)["state"], "queued");
    assert!(farm.pushes_for("victim-1").is_empty());
    assert!(farm.pushes_for(&number).is_empty());
    // jobs are numbered 1, 2, 3, ... whatever the events between them
    assert_eq!(row(&farm, "blocker")["job"], 1);
    assert_eq!((victim, numeric), (2, 3));

    // the job page of number N is job N, never the job with image_id N
    let addr = std::fs::read_to_string(farm.cfg.state_dir().join("http.addr")).unwrap();
    let addr = addr.trim();
    let (code, page) = get(addr, &format!("/jobs/{victim}"));
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("victim-1"), "{page}");
    let (code, api) = get(addr, &format!("/api/jobs/{victim}"));
    assert_eq!(code, 200, "{api}");
    let api: Value = serde_json::from_str(&api).unwrap();
    assert_eq!(api["job"]["id"].as_u64(), Some(victim));
    assert_eq!(api["job"]["image_id"], "victim-1");
    let (code, api) = get(addr, &format!("/api/jobs/%23{numeric}"));
    assert_eq!(code, 200, "{api}");
    assert_eq!(
        serde_json::from_str::<Value>(&api).unwrap()["job"]["image_id"],
        number.as_str()
    );
    assert_eq!(get(addr, "/jobs/99").0, 404);

    // #N and --job N name the job number; the image_id by its own name
    let (code, out, err) = output(farm.bin().args(["cancel", &format!("#{victim}")]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("job {victim} ")), "{out}");
    let answer = farm.wait_outbox("victim-1.json", T);
    assert_eq!(answer["image"]["result"], false);
    assert_eq!(farm.wait_pushes("victim-1", 1)[0].0, "ERROR");
    assert_eq!(
        row(&farm, &number)["state"],
        "queued",
        "the job with image_id {number} was not touched"
    );
    assert!(farm.pushes_for(&number).is_empty());
    // (the victim is answered now; the bare number is still both)
    let (code, _, err) = output(farm.bin().args(["show", &number]));
    assert_eq!(code, 1);
    assert!(err.contains("ambiguous"), "{err}");
    let show = |args: &[&str]| -> Value {
        let (code, out, err) = output(farm.bin().args(args));
        assert_eq!(code, 0, "{args:?}: {err}");
        serde_json::from_str(&out).unwrap()
    };
    assert_eq!(
        show(&["show", "--job", &numeric.to_string(), "--json"])["job"]["image_id"],
        number.as_str()
    );
    assert_eq!(
        show(&["show", &format!("#{victim}"), "--json"])["job"]["image_id"],
        "victim-1"
    );
    // a bare number that is no image_id is the job with that number
    assert_eq!(show(&["show", "1", "--json"])["job"]["image_id"], "blocker");
    let (code, _, err) = output(farm.bin().args(["cancel", "--job", &numeric.to_string()]));
    assert_eq!(code, 0, "{err}");
    farm.wait_outbox(&format!("{number}.json"), T);
    assert_eq!(farm.wait_pushes(&number, 1)[0].0, "ERROR");

    // references that name nothing, or that are not one
    for (args, want) in [
        (vec!["show", "#99"], "no job number 99"),
        (vec!["log", "#99"], "no job number 99"),
        (vec!["retry", "--job", "99"], "no job number 99"),
        (vec!["show", "no-such"], "no job with image_id"),
    ] {
        let (code, _, err) = output(farm.bin().args(&args));
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let (code, _, err) = output(farm.bin().args(["show", "#x"]));
    assert_eq!(code, 2, "not a reference: a usage error");
    assert!(err.contains("not a job number"), "{err}");
    let (code, _, _) = output(farm.bin().args(["show", "victim-1", "--job", "2"]));
    assert_eq!(code, 2, "an ID and --job: a usage error");
    let (code, _, _) = output(farm.bin().args(["cancel"]));
    assert_eq!(code, 2, "no job named: a usage error");

    output(farm.bin().args(["cancel", "blocker"]));
    farm.wait_outbox("blocker.json", T);
    d.stop().unwrap();
}
