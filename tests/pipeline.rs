//! End to end: the real daemon (in-process) on a temp spool, the mic fixture, the push fixture.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn read_shared(rel: &str) -> String {
    std::fs::read_to_string(shared().join(rel)).unwrap_or_else(|e| panic!("../shared/{rel}: {e}"))
}

/// What a successful job must show.
struct Expect<'a> {
    id: &'a str,
    dir_rel: &'a str,
    name: &'a str,
    ty: &'a str,
    release: Option<&'a str>,
    extra: &'a [&'a str],
}

/// Checks a successful reply: OUT fields, job dir, ks, log with the command line, exact argv.
fn check_success(farm: &Farm, reply: &Value, fields: &Value, x: Expect<'_>) {
    let Expect {
        id,
        dir_rel,
        name,
        ty,
        release,
        extra,
    } = x;
    let img = &fields["image"];
    assert_eq!(img["result"], json!(true), "{reply:#}");
    assert_eq!(fields["result"], json!(true));
    assert!(fields.get("__error__").is_none());
    let files_url = format!("http://img.test/images/{dir_rel}");
    assert_eq!(img["files_url"], json!(files_url));
    assert_eq!(img["logfile_url"], json!(format!("{files_url}/{name}.log")));
    let image_url = img["image_url"].as_str().unwrap();
    assert!(
        image_url.starts_with(&format!("{files_url}/")),
        "{image_url}"
    );
    // the image URL names a real file, the largest one
    let image_path = farm
        .base()
        .join(image_url.trim_start_matches("http://img.test/images/"));
    assert_eq!(
        std::fs::metadata(&image_path).unwrap().len(),
        65536,
        "{image_path:?}"
    );
    if let Some(r) = release {
        assert!(
            image_url.contains(&format!("/{r}/images/{name}/")),
            "{image_url}"
        );
    }
    let msg = fields["msg"].as_array().unwrap();
    let last = msg.last().unwrap().as_str().unwrap();
    assert_eq!(
        last,
        format!(
            "Image {name} build for arch i586 succeeded: image {image_url} (files {files_url}, log {files_url}/{name}.log)"
        )
    );
    let job_dir = farm.base().join(dir_rel);
    let ks = std::fs::read_to_string(job_dir.join(format!("{name}.ks"))).unwrap();
    assert_eq!(ks, img["kickstart"].as_str().unwrap());
    let log = std::fs::read_to_string(job_dir.join(format!("{name}.log"))).unwrap();
    let mic = fixtures().join("mic");
    let mut want = vec![
        "create".to_string(),
        ty.to_string(),
        job_dir.join(format!("{name}.ks")).display().to_string(),
        "--arch=i586".into(),
        format!("--outdir={}", job_dir.display()),
    ];
    if let Some(r) = release {
        want.push(format!("--release={r}"));
    }
    if ty == "fs" {
        want.push("--pack-to=@NAME@.tar.bz2".into());
    }
    want.extend(extra.iter().map(|s| s.to_string()));
    // the build's own mic config (its tmpdir in the build's place), before the extra_opts
    let opts = extra
        .iter()
        .filter(|a| !a.starts_with("--tokenmap="))
        .count();
    want.insert(
        want.len() - opts,
        format!("--config={}", job_dir.join(".build-tmp/mic.conf").display()),
    );
    assert_eq!(fixture_argv(&log), want, "argv of {id}");
    let cmdline = format!("] $ {} create {ty} ", mic.display());
    assert!(
        log.contains(&cmdline),
        "log lacks the command line {cmdline:?}:\n{log}"
    );
    // pushes: BUILDING (with logfile_url, no result yet) then DONE with the reply
    let pushes = farm.wait_pushes(id, 2);
    let statuses: Vec<&str> = pushes.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(statuses, vec!["BUILDING", "DONE"], "pushes of {id}");
    let building = &pushes[0].1;
    let bf = building.get("fields").unwrap_or(building);
    assert_eq!(bf["image"]["logfile_url"], img["logfile_url"]);
    assert!(bf["image"].get("result").is_none());
    assert_eq!(&pushes[1].1, reply, "DONE push carries the outbox workitem");
}

#[test]
fn shared_workitems_and_kickstarts_end_to_end() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();

    let bare: Value = serde_json::from_str(&read_shared("workitems/bare-old-api.json")).unwrap();
    let env: Value = serde_json::from_str(&read_shared("workitems/envelope-new-api.json")).unwrap();
    let invalid: Value =
        serde_json::from_str(&read_shared("workitems/invalid-missing-fields.json")).unwrap();
    farm.drop_json("bare-old-api.json", &bare);
    farm.drop_json("envelope-new-api.json", &env);
    farm.drop_json("invalid-missing-fields.json", &invalid);
    let mut kickstarts = Vec::new();
    for entry in std::fs::read_dir(shared().join("kickstarts")).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        let ks = std::fs::read_to_string(&p).unwrap();
        let id = format!("ks-{name}");
        let mut wi = json!({"fields": {"image": {
            "image_id": id, "kickstart": ks, "image_type": "raw", "name": name, "arch": "i586",
            "release": "0.1", "tokenmap": "RELEASE:0.1", "extra_opts": ["--pkgmgr=zypp", "--record-pkgs=name; touch /tmp/owned"]
        }, "msg": [], "custom": {"keep": [1, "two", null]}}, "participant_name": "build_image"});
        wi["fei"] = json!({"wfid": format!("wf-{name}")});
        farm.drop_json(&format!("{id}.json"), &wi);
        kickstarts.push((id, name, wi));
    }
    assert_eq!(kickstarts.len(), 3);

    // old API, bare fields, fs with release
    let r = farm.wait_outbox("bare-old-api.json", T);
    check_success(
        &farm,
        &r,
        &r,
        Expect {
            id: "ci-nightly-0001",
            dir_rel: "requests/ci-nightly-0001",
            name: "mer-core-i586-sdkvm",
            ty: "fs",
            release: Some("0.20111020.1"),
            extra: &[],
        },
    );
    assert_eq!(r["kickstart"], bare["kickstart"], "flat keys kept");
    assert_eq!(r["msg"][0], json!("queued by nightly cron"));
    assert_eq!(
        r["image"]["image_id"],
        json!("ci-nightly-0001"),
        "old API copied into image"
    );

    // envelope, new API, prefix with a slash, empty release, extra_opts
    let r = farm.wait_outbox("envelope-new-api.json", T);
    assert_eq!(r["fei"], env["fei"]);
    assert_eq!(r["participant_name"], json!("build_image"));
    assert_eq!(r["fields"]["params"], json!({}));
    assert_eq!(r["fields"]["ev"], json!({}));
    check_success(
        &farm,
        &r,
        &r["fields"],
        Expect {
            id: "42-1700000000",
            dir_rel: "web/alice/42-1700000000",
            name: "meego-core-ia32-mint",
            ty: "loop",
            release: None,
            extra: &["--save-kernel"],
        },
    );

    // invalid: answered, not rejected, with the missing fields named; ERROR pushed
    let r = farm.wait_outbox("invalid-missing-fields.json", T);
    let f = &r["fields"];
    assert_eq!(f["result"], json!(false));
    assert_eq!(f["image"]["result"], json!(false));
    let err = f["image"]["error"].as_str().unwrap();
    assert!(err.contains("image_type, arch"), "{err}");
    assert!(err.contains("extra_opts must be a list"), "{err}");
    assert_eq!(f["__error__"], json!(format!("Image build FAILED: {err}")));
    assert!(
        f["msg"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .as_str()
            .unwrap()
            .contains("failed")
    );
    assert_eq!(
        f["image"]["extra_opts"],
        json!("--oops"),
        "input kept as given"
    );
    let statuses: Vec<String> = farm
        .wait_pushes("7-1", 1)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(statuses, vec!["ERROR"]);
    assert!(
        !farm.base().join("requests/7-1").exists(),
        "no job dir for an invalid workitem"
    );

    for (id, name, wi) in &kickstarts {
        let r = farm.wait_outbox(&format!("{id}.json"), T);
        assert_eq!(r["fei"], wi["fei"]);
        assert_eq!(r["fields"]["custom"], json!({"keep": [1, "two", null]}));
        check_success(
            &farm,
            &r,
            &r["fields"],
            Expect {
                id,
                dir_rel: &format!("requests/{id}"),
                name,
                ty: "raw",
                release: Some("0.1"),
                extra: &[
                    "--tokenmap=RELEASE:0.1",
                    "--pkgmgr=zypp",
                    "--record-pkgs=name; touch /tmp/owned",
                ],
            },
        );
    }

    // two valid workitems and the kickstarts push BUILDING and DONE, the invalid one ERROR
    farm.wait_pushed_events(2 * (2 + kickstarts.len()) + 1);
    d.stop().expect("clean stop");
    assert!(
        list(&farm.incoming()).iter().all(|n| n.starts_with('.')),
        "incoming empty"
    );
    assert!(
        list(&farm.active()).is_empty(),
        "active empty: {:?}",
        list(&farm.active())
    );
    // the log tells each job's story in order
    let events = farm.events();
    let kinds_of = |file: &str| -> Vec<String> {
        let job = events.iter().find(|e| matches!(&e.kind, build_image::domain::EventKind::Claimed { file: f, .. } if f == file)).unwrap().job;
        events
            .iter()
            .filter(|e| e.job == job && !is_building_push(e))
            .map(|e| e.kind.name().to_string())
            .collect()
    };
    assert_eq!(
        kinds_of("bare-old-api.json"),
        [
            "claimed",
            "queued",
            "started",
            "finished",
            "delivered",
            "pushed"
        ]
    );
    assert_eq!(
        kinds_of("invalid-missing-fields.json"),
        ["claimed", "invalid", "delivered", "pushed"]
    );
    for w in events.windows(2) {
        assert!(w[0].seq < w[1].seq);
    }
}

#[test]
fn mic_cases_from_the_mic_test_suite() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.worker.mic_opts = vec!["--copy-kernel".into()];
    let d = farm.start();
    let cases_dir = shared().join("testdata/mic_cases");
    let mut cases: Vec<_> = std::fs::read_dir(&cases_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    assert!(cases.len() >= 14);
    for (i, case) in cases.iter().enumerate() {
        let options = std::fs::read_to_string(case.join("options")).unwrap();
        let ty = options.split_whitespace().nth(2).unwrap().to_string();
        let ks = std::fs::read_to_string(case.join("out.ks")).unwrap();
        let wi = json!({"image": {"image_id": format!("case-{i}"), "kickstart": ks, "image_type": ty,
            "name": format!("case{i}"), "arch": "armv7hl", "extra_opts": ["--pkgmgr=zypp"]}});
        farm.drop_json(&format!("case-{i}.json"), &wi);
    }
    for (i, case) in cases.iter().enumerate() {
        let options = std::fs::read_to_string(case.join("options")).unwrap();
        let ty = options.split_whitespace().nth(2).unwrap();
        let r = farm.wait_outbox(&format!("case-{i}.json"), T);
        assert_eq!(r["image"]["result"], json!(true), "{case:?}: {r:#}");
        let dir = farm.base().join(format!("requests/case-{i}"));
        let log = std::fs::read_to_string(dir.join(format!("case{i}.log"))).unwrap();
        let argv = fixture_argv(&log);
        assert_eq!(argv[..2], ["create".to_string(), ty.to_string()]);
        assert_eq!(argv[3], "--arch=armv7hl");
        assert_eq!(
            argv.last().unwrap(),
            "--copy-kernel",
            "worker mic_opts last"
        );
        assert_eq!(argv[argv.len() - 2], "--pkgmgr=zypp");
    }
    d.stop().unwrap();
}

#[test]
fn mic2_command_line() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.worker.ict = build_image::config::Ict::Mic2;
    farm.cfg.worker.mic_path = Some(fixtures().join("mic-image-creator"));
    let d = farm.start();
    let mut wi = workitem("m2", "lang en_US\n");
    wi["image"]["release"] = json!("r7");
    farm.drop_json("m2.json", &wi);
    let r = farm.wait_outbox("m2.json", T);
    assert_eq!(r["image"]["result"], json!(true), "{r:#}");
    let dir = farm.base().join("requests/m2");
    let log = std::fs::read_to_string(dir.join("img-m2.log")).unwrap();
    assert_eq!(
        fixture_argv(&log),
        vec![
            "--format=loop".to_string(),
            format!("--config={}", dir.join("img-m2.ks").display()),
            "--arch=i586".into(),
            format!("--outdir={}", dir.display()),
            "--release=r7".into(),
        ]
    );
    d.stop().unwrap();
}
