//! What an operator reads, on real builds (the mic fixture) and the binary's real output: no
//! text from a workitem or a build reaches the terminal raw (hostile names are refused, the rest
//! is escaped), the answer says only what this build did, and the error says the cause.

mod common;

use common::*;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// The characters a terminal acts on or reorders by, other than the line breaks of the output
/// itself: controls (C0, DEL, C1) and the bidirectional formatting characters.
fn raw_controls(s: &str) -> Vec<char> {
    s.chars()
        .filter(|c| {
            (*c != '\n' && c.is_control())
                || ('\u{202a}'..='\u{202e}').contains(c)
                || ('\u{2066}'..='\u{2069}').contains(c)
                || ['\u{200e}', '\u{200f}', '\u{061c}'].contains(c)
        })
        .collect()
}

fn run(farm: &Farm, args: &[&str]) -> (i32, String, String) {
    output(farm.bin().args(args))
}

/// Runs a command and checks that nothing it printed (stdout and stderr) holds a raw control
/// or bidi character; returns its stdout.
fn safe_output(farm: &Farm, args: &[&str]) -> String {
    let (code, out, err) = run(farm, args);
    assert!(code == 0 || code == 1, "{args:?}: exit {code}: {err}");
    for (what, text) in [("stdout", &out), ("stderr", &err)] {
        let bad = raw_controls(text);
        assert!(bad.is_empty(), "{args:?} {what} holds {bad:?}:\n{text}");
    }
    out
}

/// The job that claimed `file`, from the export of its `claimed` event.
fn job_number(farm: &Farm, file: &str) -> u64 {
    let (code, out, err) = run(farm, &["events", "--json", "--kind", "claimed"]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["file"] == json!(file))
        .and_then(|e| e["job"].as_u64())
        .unwrap_or_else(|| panic!("no claim of {file}: {out}"))
}

#[test]
fn control_and_bidi_characters_never_reach_the_terminal() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    // an image_id with a colour, a window title (OSC ... BEL), a new line that would print a
    // fake status row, and a right-to-left override
    let hostile = "t3\u{1b}[31m\u{1b}]0;owned\u{7}\nFAKE-LINE done ok\u{202e}";
    let mut w = workitem("t3", "ks\n");
    w["image"]["image_id"] = json!(hostile);
    farm.drop_json("hostile.json", &w);
    let mut w = workitem("t3b", "ks\n");
    w["image"]["name"] = json!("img\u{202e}4pm.exe");
    farm.drop_json("bidi.json", &w);
    // a build whose mic error carries escape sequences (mic's words are data: the answer keeps
    // them, the printers escape them)
    farm.drop_json(
        "esc.json",
        &workitem(
            "t3c",
            "# mic-fixture: fail-unless /nonexistent/\u{1b}[2J\u{1b}]0;x\u{7}\u{202e}pkg\n",
        ),
    );
    for (file, key, why) in [
        ("hostile.json", "image_id", "control characters"),
        ("bidi.json", "name", "bidirectional formatting characters"),
    ] {
        let r = farm.wait_outbox(file, T);
        assert_eq!(r["image"]["result"], json!(false), "{r:#}");
        let err = r["image"]["error"].as_str().unwrap();
        assert!(err.contains(key) && err.contains(why), "{file}: {err}");
    }
    let r = farm.wait_outbox("esc.json", T);
    let err = r["image"]["error"].as_str().unwrap();
    assert!(
        err.contains("\u{1b}[2J"),
        "the answer keeps mic's words: {err:?}"
    );
    assert_eq!(
        mic_runs_total(&farm),
        1,
        "only the valid workitem was built"
    );
    farm.wait_pushes("t3c", 2);

    let hostile_job = job_number(&farm, "hostile.json").to_string();
    let esc_job = job_number(&farm, "esc.json").to_string();
    let table = safe_output(&farm, &["status"]);
    assert_eq!(table.lines().count(), 1 + 3, "one row per job:\n{table}");
    assert!(
        !table
            .lines()
            .any(|l| l.trim_start().starts_with("FAKE-LINE")),
        "{table}"
    );
    assert!(table.contains("t3\\u001b[31m\\u001b]0;owned\\u0007\\nFAKE-LINE done ok\\u202e"));
    safe_output(&farm, &["status", "--wide"]);
    for job in [&hostile_job, &esc_job] {
        let show = safe_output(&farm, &["show", job]);
        assert!(show.contains("\\u001b"), "escaped, not dropped:\n{show}");
    }
    let events = safe_output(&farm, &["events"]);
    assert!(!events.lines().any(|l| l.starts_with("FAKE-LINE")));
    // `log`: the command's own lines are escaped; the build's output is printed as it is
    let (code, out, err) = run(&farm, &["log", &esc_job]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("\u{1b}[2J"),
        "mic's output is the build's own bytes"
    );
    safe_output(&farm, &["log", &hostile_job]); // answered without a build: the reason, escaped
    let (code, _, err) = run(&farm, &["log", &esc_job, "--follow"]);
    assert_eq!(code, 1);
    assert!(raw_controls(&err).is_empty(), "{err}");
    assert!(err.contains("\\u001b[2J"), "{err}");
    d.stop().unwrap();
    // and the same with no daemon running
    let table = safe_output(&farm, &["status"]);
    assert_eq!(table.lines().count(), 1 + 3, "{table}");
    safe_output(&farm, &["show", &hostile_job]);
}

/// An input with every OUT field set, as a workitem that went through another stage (or a
/// hostile one) may carry them.
fn with_stale_out_fields(id: &str, ks: &str) -> Value {
    let mut w = workitem(id, ks);
    let img = w["image"].as_object_mut().unwrap();
    for (k, v) in [
        ("image_url", json!("javascript:alert(1)")),
        ("files_url", json!("http://elsewhere/files")),
        ("logfile_url", json!("http://elsewhere/log")),
        ("error", json!("a stale error")),
        ("result", json!(true)),
    ] {
        img.insert(k.into(), v);
    }
    w["result"] = json!(true);
    w["__error__"] = json!("Image build FAILED: a stale error");
    w
}

#[test]
fn the_answer_says_only_what_this_build_did() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    farm.drop_json(
        "fail.json",
        &with_stale_out_fields("s6f", "# mic-fixture: fail 2\n"),
    );
    farm.drop_json("ok.json", &with_stale_out_fields("s6o", "ks\n"));
    let mut invalid = with_stale_out_fields("s6i", "ks\n");
    invalid["image"].as_object_mut().unwrap().remove("arch");
    farm.drop_json("invalid.json", &invalid);
    let base = "http://img.test/images/requests";

    let r = farm.wait_outbox("fail.json", T);
    let img = &r["image"];
    assert!(
        img.get("image_url").is_none(),
        "a failed build made no image: {r:#}"
    );
    assert_eq!(img["files_url"], json!(format!("{base}/s6f")));
    assert_eq!(img["logfile_url"], json!(format!("{base}/s6f/img-s6f.log")));
    assert_eq!(
        (&img["result"], &r["result"]),
        (&json!(false), &json!(false))
    );
    let err = img["error"].as_str().unwrap();
    assert!(
        err.contains("exited with status 2") && !err.contains("stale"),
        "{err}"
    );
    assert_eq!(r["__error__"], json!(format!("Image build FAILED: {err}")));

    let r = farm.wait_outbox("ok.json", T);
    let img = &r["image"];
    assert_eq!(img["image_url"], json!(format!("{base}/s6o/img-s6o.img")));
    assert!(
        img.get("error").is_none() && r.get("__error__").is_none(),
        "{r:#}"
    );
    assert_eq!((&img["result"], &r["result"]), (&json!(true), &json!(true)));

    let r = farm.wait_outbox("invalid.json", T);
    for k in ["image_url", "files_url", "logfile_url"] {
        assert!(r["image"].get(k).is_none(), "nothing was built: {k}: {r:#}");
    }
    assert!(r["image"]["error"].as_str().unwrap().contains("arch"));

    // the BUILDING push carries the URLs planned, and no result or error
    let pushes = farm.wait_pushes("s6f", 2);
    let (status, building) = &pushes[0];
    assert_eq!(status, "BUILDING");
    let img = &building["image"];
    assert_eq!(img["logfile_url"], json!(format!("{base}/s6f/img-s6f.log")));
    for k in ["image_url", "error", "result"] {
        assert!(img.get(k).is_none(), "{k}: {building:#}");
    }
    assert!(building.get("result").is_none() && building.get("__error__").is_none());
    d.stop().unwrap();
}

#[test]
fn the_error_says_the_cause_and_status_shows_it_whole() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    let missing = "/nonexistent/repositories/a-package-repository-with-a-long-name/i586/foo";
    farm.drop_json(
        "e.json",
        &workitem("e1", &format!("# mic-fixture: fail-unless {missing}\n")),
    );
    let r = farm.wait_outbox("e.json", T);
    let err = r["image"]["error"].as_str().unwrap();
    let cause = format!("Error <creator>: {missing} is missing (mic-fixture: fail-unless)");
    assert_eq!(
        err.lines().next(),
        Some(cause.as_str()),
        "mic's words first: {err}"
    );
    assert!(
        err.lines()
            .last()
            .unwrap()
            .ends_with("mic exited with status 1"),
        "{err}"
    );
    assert!(
        !err.contains("$ ") && !err.contains("--outdir") && !err.contains("mic-fixture arg"),
        "the command line and mic's chatter stay in the job log: {err}"
    );
    let log = std::fs::read_to_string(farm.base().join("requests/e1/img-e1.log")).unwrap();
    assert!(log.contains("] $ ") && log.contains("--outdir="), "{log}");

    let (code, table, _) = run(&farm, &["status"]);
    assert_eq!(code, 0);
    let row = table.lines().find(|l| l.contains(" e1 ")).unwrap();
    assert!(
        row.contains(&format!("error (image): {cause} (+1 line(s): --wide)")),
        "{row}"
    );
    let (_, wide, _) = run(&farm, &["status", "--wide"]);
    assert!(
        wide.contains(&cause) && wide.contains("mic exited with status 1"),
        "{wide}"
    );
    let (_, show, _) = run(&farm, &["show", "e1"]);
    assert!(show.contains(&format!("error      {cause}\n")), "{show}");
    d.stop().unwrap();
}

#[test]
fn a_build_stopped_by_a_daemon_stop_says_so_and_is_built_again() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.worker.grace = 0; // a stop kills the running build at once
    let go = farm.root().join("go");
    let d = farm.start();
    // mic waits for `go`: the first build runs until the stop kills it
    farm.drop_json(
        "s.json",
        &workitem("s1", &format!("# mic-fixture: wait-for {}\n", go.display())),
    );
    let log = farm.wait_mic_running("s1");
    d.stop().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("interrupted by a daemon stop; built again at the next start"),
        "{text}"
    );
    assert!(!text.contains("cancelled"), "not a cancel: {text}");
    assert!(farm.outbox_file("s.json").is_none(), "not answered");
    let view: Value = serde_json::from_str(&run(&farm, &["show", "s1", "--json"]).1).unwrap();
    assert_eq!(view["job"]["state"], json!("interrupted"), "{view:#}");
    assert!(
        view["job"].get("error").is_none_or(Value::is_null),
        "{view:#}"
    );
    let interrupted = view["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "interrupted")
        .cloned()
        .unwrap();
    assert_eq!(
        interrupted["reason"],
        json!("interrupted by a daemon stop; built again at the next start")
    );

    // built again at the next start
    std::fs::write(&go, "").unwrap();
    let d = farm.start();
    let r = farm.wait_outbox("s.json", T);
    assert_eq!(r["image"]["result"], json!(true), "{r:#}");
    assert_eq!(mic_runs(&farm, "s1"), 2, "a second build ran");
    d.stop().unwrap();
}

/// The README's "Try it": the shipped config and workitem, the binary run as the README runs it
/// (from the top of a checkout, the config in BUILD_IMAGE_CONFIG), the build done with the mic
/// stand-in; the answer, the image and the status page's API are there.
#[test]
fn the_readme_try_it_builds_with_the_mic_stand_in() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let d = tempfile::tempdir().unwrap();
    let top = d.path();
    // the checkout's files the example names, in a folder of its own (it writes ./try/)
    std::fs::create_dir_all(top.join("tests/fixtures")).unwrap();
    std::fs::create_dir_all(top.join("examples")).unwrap();
    std::fs::copy(
        repo.join("tests/fixtures/mic"),
        top.join("tests/fixtures/mic"),
    )
    .unwrap();
    std::fs::copy(
        repo.join("examples/try-workitem.json"),
        top.join("examples/try-workitem.json"),
    )
    .unwrap();
    // the config as shipped, with a free port for the page (tests run side by side)
    let shipped = std::fs::read_to_string(repo.join("examples/try.toml")).unwrap();
    let mut cfg: toml::Table = toml::from_str(&shipped).unwrap();
    assert_eq!(cfg["http"]["listen"].as_str(), Some("127.0.0.1:18080"));
    assert_eq!(
        cfg["worker"]["mic_path"].as_str(),
        Some("tests/fixtures/mic")
    );
    cfg["http"]
        .as_table_mut()
        .unwrap()
        .insert("listen".into(), "127.0.0.1:0".into());
    std::fs::write(
        top.join("examples/try.toml"),
        toml::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let readme_bin = || {
        let mut c = bin();
        c.current_dir(top)
            .env("BUILD_IMAGE_CONFIG", "examples/try.toml");
        c
    };

    std::fs::create_dir_all(top.join("try")).unwrap();
    let mut daemon = Guard(
        readme_bin()
            .arg("run")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let incoming = top.join("try/spool/incoming");
    assert!(
        wait_for(T, || incoming.is_dir()),
        "the daemon made no spool"
    );
    let (code, out, err) =
        output(readme_bin().args(["submit", "--wait", "examples/try-workitem.json"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "try-1");
    let image = "http://localhost/images/requests/try-1/try-image.tar.bz2";
    assert!(
        err.contains(&format!("try-workitem.json: built: {image}")),
        "{err}"
    );
    let answer: Value = serde_json::from_slice(
        &std::fs::read(top.join("try/spool/outbox/try-workitem.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(answer["result"], json!(true), "{answer:#}");
    assert_eq!(answer["image"]["image_url"], json!(image));
    let made = top.join("try/images/requests/try-1/try-image.tar.bz2");
    assert_eq!(
        std::fs::metadata(&made).unwrap().len(),
        65536,
        "the stand-in's image"
    );
    let (code, table, _) = output(readme_bin().arg("status"));
    assert_eq!(code, 0);
    assert!(
        table
            .lines()
            .any(|l| l.contains("try-1") && l.contains(" done ")),
        "{table}"
    );

    // the status page's API answers for the job
    let state = top.join("try/spool/state");
    let addr_file = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path().join("http.addr"))
        .find(|p| p.exists())
        .expect("the page's address");
    let addr = std::fs::read_to_string(addr_file).unwrap();
    let mut s = std::net::TcpStream::connect(addr.trim()).unwrap();
    s.write_all(b"GET /api/jobs/try-1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("\"try-1\""), "{page}");

    sigterm(&daemon.0);
    assert_eq!(wait_exit(&mut daemon.0, T), Some(0), "a clean stop");
}
