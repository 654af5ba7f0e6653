//! Bad input: every kind of file that is not a good workitem gets a clear answer (rejected/ with a
//! reason, or an error reply in outbox/), loses nothing, and writes nothing outside base_dir.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn reason(farm: &Farm, name: &str) -> String {
    let p = farm.rejected().join(format!("{name}.reason"));
    // the reason is written first, then the input is moved beside it: wait for both
    let kept = farm.rejected().join(name);
    assert!(
        wait_for(T, || p.exists() && kept.symlink_metadata().is_ok()),
        "{name} not rejected; rejected/ has {:?}",
        list(&farm.rejected())
    );
    std::fs::read_to_string(p).unwrap()
}

#[test]
fn files_that_are_not_workitems_are_rejected_with_a_reason() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.spool.max_bytes = 4096;
    let outside = farm.root().join("outside.json");
    std::fs::write(
        &outside,
        serde_json::to_vec(&workitem("secret", "ks")).unwrap(),
    )
    .unwrap();
    let d = farm.start();
    let inc = farm.incoming();
    std::fs::write(inc.join("garbage.json"), b"{this is not json").unwrap();
    std::fs::write(inc.join("array.json"), b"[{\"image_id\": \"x\"}]").unwrap();
    std::fs::write(inc.join("empty.json"), b"").unwrap();
    std::fs::write(inc.join("string.json"), b"\"hello\"").unwrap();
    std::fs::write(inc.join("big.json"), vec![b' '; 5000]).unwrap();
    std::os::unix::fs::symlink(&outside, inc.join("link.json")).unwrap();
    nix::unistd::mkfifo(
        &inc.join("fifo.json"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    std::fs::create_dir(inc.join("dir.json")).unwrap();

    for (name, want) in [
        ("garbage.json", "not valid JSON"),
        (
            "array.json",
            "JSON array where a workitem object was expected",
        ),
        ("empty.json", "empty file"),
        ("string.json", "JSON string"),
        (
            "big.json",
            "too big: 5000 bytes, more than max_bytes = 4096",
        ),
        ("link.json", "a symlink"),
        ("fifo.json", "a fifo"),
        ("dir.json", "a directory"),
    ] {
        let r = reason(&farm, name);
        assert!(r.contains(want), "{name}: {r}");
        assert!(
            farm.rejected().join(name).symlink_metadata().is_ok(),
            "{name} kept in rejected/"
        );
        assert!(
            !farm.outbox().join(name).exists(),
            "{name} must not be answered"
        );
    }
    // the input is kept as it was: bytes, and the symlink as a symlink (its target untouched)
    assert_eq!(
        std::fs::read(farm.rejected().join("garbage.json")).unwrap(),
        b"{this is not json"
    );
    assert!(
        farm.rejected()
            .join("link.json")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(outside.exists());
    d.stop().unwrap();
    assert!(list(&farm.incoming()).is_empty());
    assert!(list(&farm.active()).is_empty());
    assert!(!farm.base().exists(), "nothing built");
    let events = farm.events();
    let rejected = events
        .iter()
        .filter(|e| e.kind.name() == "rejected")
        .count();
    assert_eq!(rejected, 8);
}

#[test]
fn invalid_workitems_are_answered_with_an_error_and_nothing_escapes_base_dir() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    let base = |id: &str| workitem(id, "lang en_US\n");
    let mut cases: Vec<(&str, Value, &str)> = Vec::new();
    let mut w = base("m1");
    w["image"].as_object_mut().unwrap().remove("arch");
    w["image"].as_object_mut().unwrap().remove("kickstart");
    cases.push((
        "missing.json",
        w,
        "missing mandatory fields: kickstart, arch",
    ));
    let mut w = base("m2");
    w["image"]["extra_opts"] = json!("--save-kernel");
    cases.push((
        "extra-opts.json",
        w,
        "extra_opts must be a list of strings, not string",
    ));
    let mut w = base("m3");
    w["image"]["prefix"] = json!("../../escaped");
    cases.push((
        "prefix.json",
        w,
        "prefix \"../../escaped\" must not have a '.' or '..' component",
    ));
    let mut w = base("m4");
    w["image"]["prefix"] = json!("/etc");
    cases.push((
        "abs-prefix.json",
        w,
        "prefix \"/etc\" must be a relative path",
    ));
    let mut w = base("m5");
    w["image"]["name"] = json!("../../../escaped-name");
    cases.push(("name.json", w, "must be one path component"));
    let mut w = base("m6");
    w["image"]["name"] = json!("a/b");
    cases.push((
        "slash-name.json",
        w,
        "name \"a/b\" must be one path component (no '/')",
    ));
    let w = base("!!!");
    cases.push((
        "bad-id.json",
        w,
        "image_id \"!!!\" has no character of [A-Za-z0-9_-]",
    ));
    let mut w = base("m8");
    w["image"]["release"] = json!("../up");
    cases.push(("release.json", w, "release \"../up\""));
    for (name, wi, _) in &cases {
        farm.drop_json(name, wi);
    }
    for (name, wi, want) in &cases {
        let r = farm.wait_outbox(name, T);
        assert_eq!(r["result"], json!(false), "{name}");
        assert_eq!(r["image"]["result"], json!(false), "{name}");
        let err = r["image"]["error"].as_str().unwrap();
        assert!(err.starts_with("invalid workitem: "), "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
        assert_eq!(r["__error__"], json!(format!("Image build FAILED: {err}")));
        assert!(
            r["image"].get("files_url").is_none(),
            "{name}: no URL for an unbuilt job"
        );
        // every input key is still there, unchanged
        for (k, v) in wi["image"].as_object().unwrap() {
            assert_eq!(&r["image"][k], v, "{name}: {k}");
        }
        let id = wi["image"]["image_id"].as_str().unwrap();
        let statuses: Vec<String> = farm
            .wait_pushes(id, 1)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(statuses, vec!["ERROR"], "{name}");
    }
    d.stop().unwrap();
    let top = list(farm.root());
    assert_eq!(
        top,
        vec!["hook", "spool"],
        "nothing outside the spool (no base_dir either)"
    );
    assert!(!std::path::Path::new("/escaped").exists());
}

#[test]
fn unfinished_names_are_left_alone() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    let inc = farm.incoming();
    let wi = serde_json::to_vec(&workitem("u1", "ks")).unwrap();
    for n in [".hidden.json", "half.json.part", "writing.json.tmp"] {
        std::fs::write(inc.join(n), &wi).unwrap();
    }
    farm.drop_json("sentinel.json", &workitem("s1", "ks"));
    farm.wait_outbox("sentinel.json", T);
    // and a second one, dropped after the first was answered: more than one full rescan
    farm.drop_json("sentinel2.json", &workitem("s2", "ks"));
    farm.wait_outbox("sentinel2.json", T);
    farm.wait_pushes("s2", 2);
    d.stop().unwrap();
    let mut left = list(&inc);
    left.sort();
    assert_eq!(
        left,
        vec![".hidden.json", "half.json.part", "writing.json.tmp"]
    );
    for n in [".hidden.json", "half.json.part", "writing.json.tmp"] {
        assert_eq!(std::fs::read(inc.join(n)).unwrap(), wi, "{n} untouched");
    }
    assert!(list(&farm.rejected()).is_empty());
}
