//! Images as artifacts, end to end with the real daemon (in-process) and the mic fixture: the
//! answer's `image_sha256` and the job folder's `SHA256SUMS`, checked with coreutils' own
//! `sha256sum`.

mod common;

use common::provenance::{check_statement, python, verifier};
use common::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// The file an answer's `image_url` names.
fn image_path(farm: &Farm, answer: &Value) -> PathBuf {
    let url = answer["image"]["image_url"]
        .as_str()
        .unwrap_or_else(|| panic!("no image_url in {answer:#}"));
    farm.base()
        .join(url.trim_start_matches("http://img.test/images/"))
}

/// What `sha256sum FILE` says of a file.
fn sha256sum(file: &Path) -> String {
    let out = Command::new("sha256sum").arg(file).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// `sha256sum -c SHA256SUMS` run in `dir`: its exit code and what it printed.
fn sha256sum_check(dir: &Path) -> (i32, String) {
    let (code, out, err) = output(
        Command::new("sha256sum")
            .args(["-c", "SHA256SUMS"])
            .current_dir(dir),
    );
    (code, out + &err)
}

#[test]
fn the_answer_carries_the_image_sha256_and_sha256sums_checks_the_build() {
    init_log();
    let farm = web::http_farm(16);
    let d = farm.start();
    let addr = web::http_addr(&farm);
    // a release puts the image two folders down: SHA256SUMS names it by its path in the job folder
    let mut w = workitem("a1", "# mic-fixture: bytes 300000\n");
    w["image"]["release"] = json!("1.0");
    farm.drop_json("a1.json", &w);
    // a failed build: no hash, no SHA256SUMS
    farm.drop_json("f1.json", &workitem("f1", "# mic-fixture: fail 3\n"));
    let ok = farm.wait_outbox("a1.json", T);
    let failed = farm.wait_outbox("f1.json", T);
    let page = web::get(&addr, &format!("/jobs/{}", web::job_of(&farm, "a1")));
    d.stop().unwrap();

    assert_eq!(ok["image"]["result"], json!(true), "{ok:#}");
    let image = image_path(&farm, &ok);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 300000);
    let want = sha256sum(&image);
    assert_eq!(ok["image"]["image_sha256"], json!(want), "{ok:#}");
    // the answer's hash is the finished event's: show, status and the pages read it from the fold
    let finished = farm
        .events()
        .into_iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .find(|e| e["kind"] == json!("finished") && e["urls"]["image_sha256"] == json!(want));
    assert!(
        finished.is_some(),
        "no finished event with the image's sha256"
    );
    // the job page shows it among the answer's fields; show, in its own line and the event's
    assert_eq!(page.status, 200);
    assert!(page.body.contains("image.image_sha256"), "{}", page.body);
    assert!(page.body.contains(&want), "{}", page.body);
    // and links the provenance
    assert!(
        page.body
            .contains("href=\"http://img.test/images/requests/a1/provenance.json\""),
        "{}",
        page.body
    );
    let (code, text, err) = output(farm.bin().args(["show", "a1"]));
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains(&format!("image hash sha256:{want}\n")),
        "{text}"
    );
    assert!(text.contains(&format!(" sha256 {want}\n")), "{text}");

    let job_dir = farm.base().join("requests/a1");
    let sums = std::fs::read_to_string(job_dir.join("SHA256SUMS")).unwrap();
    // every file of the build, by its path in the job folder; not the kickstart nor the log
    let listed: Vec<&str> = sums.lines().map(|l| &l[66..]).collect();
    assert_eq!(
        listed,
        [
            "1.0/images/img-a1/img-a1.img",
            "1.0/images/img-a1/img-a1.ks.copy",
        ],
        "{sums}"
    );
    assert!(sums.contains(&format!("{want}  1.0/images/img-a1/img-a1.img\n")));
    let (code, text) = sha256sum_check(&job_dir);
    assert_eq!(code, 0, "{text}");
    assert_eq!(text.matches(": OK").count(), 2, "{text}");
    // without --record-pkgs mic wrote no package list: the provenance names none
    let p: Value =
        serde_json::from_slice(&std::fs::read(job_dir.join("provenance.json")).unwrap()).unwrap();
    let deps = &p["predicate"]["buildDefinition"]["resolvedDependencies"];
    assert!(deps.is_null(), "{p:#}");

    // the check can fail: one changed byte of the image is named
    let mut bytes = std::fs::read(&image).unwrap();
    bytes[123_456] ^= 1;
    std::fs::write(&image, &bytes).unwrap();
    let (code, text) = sha256sum_check(&job_dir);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("1.0/images/img-a1/img-a1.img: FAILED"),
        "{text}"
    );

    assert_eq!(failed["image"]["result"], json!(false), "{failed:#}");
    assert!(failed["image"].get("image_sha256").is_none(), "{failed:#}");
    assert!(farm.base().join("requests/f1").is_dir());
    assert!(!farm.base().join("requests/f1/SHA256SUMS").exists());
}

#[test]
fn a_second_attempt_lists_only_the_files_it_wrote() {
    init_log();
    let farm = Farm::new();
    // attempt 1 left a file in the job folder, and a SHA256SUMS of its own
    let job_dir = farm.base().join("requests/r1");
    std::fs::create_dir_all(&job_dir).unwrap();
    std::fs::write(job_dir.join("left-by-attempt-1.raw"), vec![1u8; 1 << 20]).unwrap();
    std::fs::write(job_dir.join("SHA256SUMS"), b"stale\n").unwrap();
    // and a signature, from when a sign key was set: it is not of this attempt's statement
    std::fs::write(job_dir.join("provenance.intoto.jsonl"), b"{}\n").unwrap();
    let d = farm.start();
    farm.drop_json("r1.json", &workitem("r1", "# ks\n"));
    let ok = farm.wait_outbox("r1.json", T);
    d.stop().unwrap();
    // the larger old file is neither the image nor listed
    let image = image_path(&farm, &ok);
    assert_eq!(image, job_dir.join("img-r1.img"));
    assert_eq!(ok["image"]["image_sha256"], json!(sha256sum(&image)));
    let sums = std::fs::read_to_string(job_dir.join("SHA256SUMS")).unwrap();
    assert!(!sums.contains("left-by-attempt-1"), "{sums}");
    assert!(!sums.contains("stale"), "{sums}");
    assert!(job_dir.join("provenance.json").is_file());
    assert!(!job_dir.join("provenance.intoto.jsonl").exists());
    let (code, text) = sha256sum_check(&job_dir);
    assert_eq!(code, 0, "{text}");
}

/// `ssh-keygen -t TYPE -N PASS -f DIR/NAME`: the private key's path (`.pub` beside it).
fn keygen(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(args)
        .args(["-q", "-C", "build-image test", "-f"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    path
}

#[test]
fn a_sign_key_that_is_not_ed25519_or_is_encrypted_stops_the_start_naming_the_file() {
    init_log();
    let mut farm = Farm::new();
    let keys = farm.root().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let rsa = keygen(&keys, "rsa", &["-t", "rsa", "-b", "2048", "-N", ""]);
    let enc = keygen(&keys, "enc", &["-t", "ed25519", "-N", "secret"]);
    let good = keygen(&keys, "good", &["-t", "ed25519", "-N", ""]);
    for (key, why) in [(&rsa, "not ed25519"), (&enc, "encrypted")] {
        farm.cfg.artifacts.sign_key = Some(key.clone());
        let named = format!("[artifacts] sign_key {}", key.display());
        // `run` stops before it starts anything, with a config error (exit 2) naming the file
        let err_file = farm.root().join("run.err");
        let child = farm
            .bin()
            .arg("run")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&err_file).unwrap())
            .spawn()
            .unwrap();
        let mut child = Guard(child);
        assert_eq!(wait_exit(&mut child.0, T), Some(2));
        let out = std::fs::read_to_string(&err_file).unwrap();
        assert!(out.contains(&named), "{out}");
        assert!(out.contains(why), "{out}");
        assert!(
            !farm.incoming().exists(),
            "the daemon made its spool before it checked the key"
        );
        // the in-process daemon refuses the same way
        let e = build_image::daemon::run(farm.cfg.clone(), crossbeam_channel::bounded(1).1)
            .unwrap_err();
        assert!(format!("{e:#}").contains(&named), "{e:#}");
        // doctor: a failed check naming the file
        let (code, text, err) = output(farm.bin().arg("doctor"));
        assert_eq!(code, 1, "{text}{err}");
        let line = text
            .lines()
            .find(|l| l.contains("sign_key"))
            .unwrap_or_else(|| panic!("no sign_key check in {text}"));
        assert!(line.contains(&key.display().to_string()), "{line}");
        assert!(line.contains(why), "{line}");
    }
    // a good key passes doctor's check, with its fingerprint
    farm.cfg.artifacts.sign_key = Some(good.clone());
    let (_, text, _) = output(farm.bin().arg("doctor"));
    let line = text.lines().find(|l| l.contains("sign_key")).unwrap();
    assert!(line.contains("ed25519 SHA256:"), "{line}");
    assert!(!line.to_lowercase().contains("fail"), "{line}");
}

fn ts(s: &str) -> std::time::SystemTime {
    humantime::parse_rfc3339_weak(s.trim_end_matches('Z')).unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// Every file `SHA256SUMS` lists in `dir`: (path, sha256).
fn sums_in(dir: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(dir.join("SHA256SUMS"))
        .unwrap()
        .lines()
        .map(|l| (l[66..].to_string(), l[..64].to_string()))
        .collect()
}

#[test]
fn provenance_states_the_build_and_passes_the_in_toto_validators() {
    init_log();
    let python = python(); // before the build: a missing verifier fails at once
    let mut farm = Farm::new();
    farm.cfg.worker.mic_opts = vec!["--record-pkgs=name".into()];
    let d = farm.start();
    let ks = "# ks\nrepo --name=core --baseurl=http://repo.test/@RELEASE@/core/@ARCH@/ --save\n\
              repo --name \"adaptation one\" --baseurl 'http://repo.test/a b/@ARCH@'\n\
              # mic-fixture: bytes 200000\n";
    let mut w = workitem("p1", ks);
    w["image"]["release"] = json!("1.0");
    w["image"]["tokenmap"] = json!("RELEASE:1.0,ARCH:i586");
    w["image"]["extra_opts"] = json!(["--pkgmgr=zypp", "--copy-kernel"]);
    farm.drop_json("p1.json", &w);
    let ok = farm.wait_outbox("p1.json", T);
    d.stop().unwrap();
    assert_eq!(ok["image"]["result"], json!(true), "{ok:#}");

    let job_dir = farm.base().join("requests/p1");
    let file = job_dir.join("provenance.json");
    assert_eq!(
        ok["image"]["provenance_url"],
        json!("http://img.test/images/requests/p1/provenance.json"),
        "{ok:#}"
    );
    // the framework's own validators accept it
    let (code, text) = check_statement(&file);
    assert_eq!(code, 0, "{text}");
    let _ = python;

    let p: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(p["_type"], json!("https://in-toto.io/Statement/v1"));
    assert_eq!(p["predicateType"], json!("https://slsa.dev/provenance/v1"));
    // subjects: every file of the build with the hash SHA256SUMS has (one pass), the image's
    // being the answer's and coreutils'
    let subjects: Vec<(String, String)> = p["subject"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["digest"]["sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(subjects, sums_in(&job_dir), "{p:#}");
    let image = image_path(&farm, &ok);
    let image_sha = sha256sum(&image);
    assert_eq!(ok["image"]["image_sha256"], json!(image_sha));
    assert!(subjects.contains(&("1.0/images/img-p1/img-p1.img".into(), image_sha)));

    let b = &p["predicate"]["buildDefinition"];
    assert!(
        b["buildType"]
            .as_str()
            .unwrap()
            .starts_with("urn:build-image:")
    );
    let ext = &b["externalParameters"];
    assert_eq!(
        ext["kickstart"],
        json!({"name": "img-p1.ks", "sha256": sha256sum(&job_dir.join("img-p1.ks"))})
    );
    assert_eq!(
        ext["image"],
        json!({"image_id": "p1", "name": "img-p1", "arch": "i586", "image_type": "loop",
               "prefix": "requests", "release": "1.0", "tokenmap": "RELEASE:1.0,ARCH:i586"})
    );
    assert_eq!(ext["extra_opts"], json!(["--pkgmgr=zypp", "--copy-kernel"]));
    let int = &b["internalParameters"];
    assert_eq!(int["mode"], json!("native"));
    assert_eq!(
        int["mic"],
        json!({"ict": "mic", "path": fixtures().join("mic").to_str().unwrap(),
               "version": "mic 0.0-fixture", "opts": ["--record-pkgs=name"]})
    );
    assert!(int.get("base_image").is_none(), "{int:#}");
    // the repos after tokenmap, then the package list mic wrote
    let packages = job_dir.join("1.0/images/img-p1/img-p1.packages");
    assert_eq!(
        b["resolvedDependencies"],
        json!([
            {"name": "core", "uri": "http://repo.test/1.0/core/i586/",
             "annotations": {"kind": "repo"}},
            {"name": "adaptation one", "uri": "http://repo.test/a b/i586",
             "annotations": {"kind": "repo"}},
            {"name": "1.0/images/img-p1/img-p1.packages",
             "digest": {"sha256": sha256sum(&packages)},
             "annotations": {"kind": "package-list", "packages":
                ["bash-3.2.57-1.1.i586", "kernel-2.6.37-1.1.i586", "mic-0.0-1.noarch"]}}
        ])
    );

    // who built it, which job, when
    let run = &p["predicate"]["runDetails"];
    assert_eq!(run["builder"]["id"], json!("w1"));
    assert_eq!(
        run["builder"]["version"]["build-image"],
        json!(env!("CARGO_PKG_VERSION"))
    );
    let events = farm.events();
    let started = events
        .iter()
        .find(|e| e.kind.tag().as_str() == "started")
        .unwrap();
    let finished = events
        .iter()
        .find(|e| e.kind.tag().as_str() == "finished")
        .unwrap();
    assert_eq!(
        run["metadata"]["invocationId"],
        json!(started.job.to_string())
    );
    let (on, off) = (
        ts(run["metadata"]["startedOn"].as_str().unwrap()),
        ts(run["metadata"]["finishedOn"].as_str().unwrap()),
    );
    let second = Duration::from_secs(1);
    assert!(ts(&started.ts) <= on + second, "{} vs {on:?}", started.ts);
    assert!(on <= off, "{run:#}");
    assert!(
        off <= ts(&finished.ts) + second,
        "{} vs {off:?}",
        finished.ts
    );
    // the finished event names the statement: show says it
    let (code, text, err) = output(farm.bin().args(["show", "p1"]));
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("provenance http://img.test/images/requests/p1/provenance.json\n"),
        "{text}"
    );
    // unsigned without a sign key
    assert!(!job_dir.join("provenance.intoto.jsonl").exists());

    // the validators can fail: a statement without subjects, and a predicate with a field
    // SLSA Provenance v1 does not have
    let mut bad = p.clone();
    bad["subject"] = json!([]);
    let bad_file = farm.root().join("bad.json");
    std::fs::write(&bad_file, serde_json::to_vec(&bad).unwrap()).unwrap();
    let (code, text) = check_statement(&bad_file);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("At least one subject required"), "{text}");
    let mut bad = p.clone();
    bad["predicate"]["runDetails"]["nonsense"] = json!(1);
    std::fs::write(&bad_file, serde_json::to_vec(&bad).unwrap()).unwrap();
    let (code, text) = check_statement(&bad_file);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("nonsense"), "{text}");
}

/// `build-image verify ARGS...`: exit code and stdout + stderr.
fn verify(farm: &Farm, args: &[&std::ffi::OsStr]) -> (i32, String) {
    let (code, out, err) = output(farm.bin().arg("verify").args(args));
    (code, format!("{out}{err}"))
}

/// Flips one bit of byte `at` of `file`.
fn flip(file: &Path, at: usize) {
    let mut bytes = std::fs::read(file).unwrap();
    bytes[at] ^= 1;
    std::fs::write(file, &bytes).unwrap();
}

#[test]
fn a_signed_build_verifies_and_a_changed_byte_or_key_is_named() {
    init_log();
    let _ = python();
    let mut farm = Farm::new();
    let keys = farm.root().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let key = keygen(&keys, "sign", &["-t", "ed25519", "-N", ""]);
    let other = keygen(&keys, "other", &["-t", "ed25519", "-N", ""]);
    let (pubkey, other_pub) = (key.with_extension("pub"), other.with_extension("pub"));
    farm.cfg.artifacts.sign_key = Some(key.clone());
    let d = farm.start();
    let mut w = workitem("s1", "# mic-fixture: bytes 100000\n");
    w["image"]["release"] = json!("1.0");
    farm.drop_json("s1.json", &w);
    let ok = farm.wait_outbox("s1.json", T);
    assert_eq!(ok["image"]["result"], json!(true), "{ok:#}");
    let job = web::job_of(&farm, "s1");
    // with the daemon running (through its socket), by image_id and by job number
    let (code, text) = verify(&farm, &["s1".as_ref()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("verified: 2 file(s)"), "{text}");
    let (code, text) = verify(&farm, &[format!("#{job}").as_ref()]);
    assert_eq!(code, 0, "{text}");
    d.stop().unwrap();

    let dir = farm.base().join("requests/s1");
    let image = image_path(&farm, &ok);
    let envelope = dir.join("provenance.intoto.jsonl");
    let statement = dir.join("provenance.json");
    let text = std::fs::read_to_string(&envelope).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(e["payloadType"], json!("application/vnd.in-toto+json"));
    let fp = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(&pubkey)
        .output()
        .unwrap();
    let fp = String::from_utf8(fp.stdout).unwrap();
    let keyid = e["signatures"][0]["keyid"].as_str().unwrap().to_string();
    assert!(
        keyid.starts_with("SHA256:") && fp.contains(&keyid),
        "{fp} / {keyid}"
    );
    let dsse = |pub_file: &Path| {
        verifier(&[
            "dsse".as_ref(),
            envelope.as_os_str(),
            pub_file.as_os_str(),
            dir.as_os_str(),
        ])
    };

    // untouched: securesystemslib, the validators and verify (daemon stopped) all agree
    let (code, text) = dsse(&pubkey);
    assert_eq!(code, 0, "{text}");
    let (code, text) = verify(&farm, &["s1".as_ref()]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = verify(&farm, &[image.as_os_str()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("verified: 1 file(s)"), "{text}");
    // verify_key (the public file) does what the sign key's public half does
    let mut pub_only = Farm::new();
    pub_only.cfg.artifacts.verify_key = Some(pubkey.clone());
    let (code, text) = verify(&pub_only, &[image.as_os_str()]);
    assert_eq!(code, 0, "{text}");

    // one image byte: that subject is named, by verify and by the python check
    flip(&image, 4321);
    let name = "1.0/images/img-s1/img-s1.img";
    for arg in ["s1".as_ref(), image.as_os_str()] {
        let (code, text) = verify(&farm, &[arg]);
        assert_eq!(code, 1, "{text}");
        assert!(
            text.contains(&format!("differs: {name}: sha256 ")),
            "{text}"
        );
    }
    let (code, text) = dsse(&pubkey);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(&format!("subject {name}")), "{text}");
    flip(&image, 4321);

    // one statement byte (the kickstart's hash in provenance.json)
    let at = std::fs::read_to_string(&statement)
        .unwrap()
        .find("\"sha256\"")
        .unwrap()
        + 12;
    flip(&statement, at);
    let (code, text) = verify(&farm, &["s1".as_ref()]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("signature does not match"), "{text}");
    let (code, text) = dsse(&pubkey);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("not the payload that was signed"), "{text}");
    flip(&statement, at);
    // ... or one byte of the signed payload in the envelope: securesystemslib refuses it
    let saved = std::fs::read(&envelope).unwrap();
    let mut e2 = e.clone();
    let payload = String::from_utf8(std::fs::read(&statement).unwrap()).unwrap();
    let changed = payload.replacen("\"w1\"", "\"w2\"", 1);
    assert_ne!(changed, payload);
    let b64 = |s: &str| {
        let out = Command::new("base64")
            .arg("-w0")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(s.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    e2["payload"] = json!(b64(&changed));
    std::fs::write(&envelope, format!("{e2}\n")).unwrap();
    std::fs::write(&statement, &changed).unwrap();
    let (code, text) = dsse(&pubkey);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("DSSE signature not verified"), "{text}");
    let (code, text) = verify(&farm, &["s1".as_ref()]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("signature does not match"), "{text}");
    std::fs::write(&envelope, &saved).unwrap();
    std::fs::write(&statement, &payload).unwrap();
    assert_eq!(verify(&farm, &["s1".as_ref()]).0, 0);

    // another key
    let other_fp = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(&other_pub)
        .output()
        .unwrap();
    let other_fp = String::from_utf8(other_fp.stdout).unwrap();
    let (code, text) = verify(
        &farm,
        &["s1".as_ref(), "--key".as_ref(), other_pub.as_os_str()],
    );
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(&format!("signed by another key (fingerprint {keyid})")),
        "{text}"
    );
    assert!(
        other_fp.contains(
            text.split(", not ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
        )
    );
    let (code, text) = dsse(&other_pub);
    assert_eq!(code, 1, "{text}");

    // missing files: exit 2
    let (code, text) = verify(&farm, &[farm.root().join("no/such.img").as_os_str()]);
    assert_eq!(code, 2, "{text}");
    let moved = farm.root().join("moved.img");
    std::fs::rename(&image, &moved).unwrap();
    let (code, text) = verify(&farm, &["s1".as_ref()]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains(&format!("missing: {}", image.display())),
        "{text}"
    );
    std::fs::rename(&moved, &image).unwrap();
    std::fs::remove_file(&envelope).unwrap();
    let (code, text) = verify(&farm, &["s1".as_ref()]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains(&format!("missing: {}", envelope.display())),
        "{text}"
    );
}

#[test]
fn mic_is_asked_its_version_once_per_daemon_start() {
    init_log();
    let mut farm = Farm::new();
    // a copy of the fixture of this test's own: it notes each `--version` in mic.versions
    let bin = farm.root().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(fixtures().join("mic"), bin.join("mic")).unwrap();
    let asked = bin.join("mic.versions");
    std::fs::write(&asked, "").unwrap();
    farm.cfg.worker.mic_path = Some(bin.join("mic"));
    let version_of = |id: &str| {
        let p: Value = serde_json::from_slice(
            &std::fs::read(farm.base().join(format!("requests/{id}/provenance.json"))).unwrap(),
        )
        .unwrap();
        p["predicate"]["buildDefinition"]["internalParameters"]["mic"]["version"].clone()
    };
    let d = farm.start();
    for id in ["v1", "v2"] {
        farm.drop_json(&format!("{id}.json"), &workitem(id, "# ks\n"));
    }
    for id in ["v1", "v2"] {
        let ok = farm.wait_outbox(&format!("{id}.json"), T);
        assert_eq!(ok["image"]["result"], json!(true), "{ok:#}");
        assert_eq!(version_of(id), json!("mic 0.0-fixture"));
    }
    d.stop().unwrap();
    assert_eq!(std::fs::read_to_string(&asked).unwrap().lines().count(), 1);
    // the next start asks again
    let d = farm.start();
    farm.drop_json("v3.json", &workitem("v3", "# ks\n"));
    farm.wait_outbox("v3.json", T);
    d.stop().unwrap();
    assert_eq!(version_of("v3"), json!("mic 0.0-fixture"));
    assert_eq!(std::fs::read_to_string(&asked).unwrap().lines().count(), 2);
}
