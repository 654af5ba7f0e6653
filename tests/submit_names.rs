//! `submit` never replaces a file in incoming/: two different files with the same base name both
//! arrive, each with its own content, and the second one's new name is said. No daemon runs.

use std::path::Path;
use std::process::{Command, Output};

fn submit(spool: &Path, file: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_build-image"))
        .env_remove("BUILD_IMAGE_CONFIG")
        .arg("--spool")
        .arg(spool)
        .arg("submit")
        .arg(file)
        .output()
        .unwrap()
}

fn workitem(id: &str) -> String {
    serde_json::json!({"image": {
        "image_id": id, "kickstart": "%packages\n%end\n", "image_type": "fs",
        "name": "n", "arch": "i586"
    }})
    .to_string()
}

#[test]
fn same_base_name_twice_keeps_both() {
    let d = tempfile::tempdir().unwrap();
    let spool = d.path().join("spool");
    for sub in ["tmp", "incoming"] {
        std::fs::create_dir_all(spool.join(sub)).unwrap();
    }
    let (one, two) = (d.path().join("one"), d.path().join("two"));
    std::fs::create_dir_all(&one).unwrap();
    std::fs::create_dir_all(&two).unwrap();
    std::fs::write(one.join("a.json"), workitem("first")).unwrap();
    std::fs::write(two.join("a.json"), workitem("second")).unwrap();

    let out = submit(&spool, &one.join("a.json"));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "first");

    let out = submit(&spool, &two.join("a.json"));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "second");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("incoming/a.json was taken: dropped as incoming/a.1.json"),
        "{err}"
    );

    let inc = spool.join("incoming");
    assert_eq!(
        std::fs::read_to_string(inc.join("a.json")).unwrap(),
        workitem("first")
    );
    assert_eq!(
        std::fs::read_to_string(inc.join("a.1.json")).unwrap(),
        workitem("second")
    );
    assert_eq!(std::fs::read_dir(&inc).unwrap().count(), 2);
    assert_eq!(
        std::fs::read_dir(spool.join("tmp")).unwrap().count(),
        0,
        "nothing left in tmp/"
    );
}

#[test]
fn concurrent_submits_of_one_base_name_all_arrive() {
    let d = tempfile::tempdir().unwrap();
    let spool = d.path().join("spool");
    for sub in ["tmp", "incoming"] {
        std::fs::create_dir_all(spool.join(sub)).unwrap();
    }
    let files: Vec<_> = (0..6)
        .map(|i| {
            let dir = d.path().join(format!("src{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let f = dir.join("job.json");
            std::fs::write(&f, workitem(&format!("id{i}"))).unwrap();
            f
        })
        .collect();
    let children: Vec<_> = files
        .iter()
        .map(|f| {
            Command::new(env!("CARGO_BIN_EXE_build-image"))
                .env_remove("BUILD_IMAGE_CONFIG")
                .arg("--spool")
                .arg(&spool)
                .arg("submit")
                .arg(f)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let mut contents: Vec<String> = std::fs::read_dir(spool.join("incoming"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    contents.sort();
    let mut want: Vec<String> = (0..6).map(|i| workitem(&format!("id{i}"))).collect();
    want.sort();
    assert_eq!(contents, want);
}

#[test]
fn wait_reads_the_answer_of_the_name_used() {
    let d = tempfile::tempdir().unwrap();
    let spool = d.path().join("spool");
    for sub in ["tmp", "incoming", "outbox"] {
        std::fs::create_dir_all(spool.join(sub)).unwrap();
    }
    std::fs::write(spool.join("incoming/a.json"), workitem("earlier")).unwrap();
    // Answers already there (no daemon runs): a failure for the taken name, a success for the
    // name the submit will use.
    let answer = |ok: bool| serde_json::json!({"image": {"result": ok}}).to_string();
    std::fs::write(spool.join("outbox/a.json"), answer(false)).unwrap();
    std::fs::write(spool.join("outbox/a.1.json"), answer(true)).unwrap();
    let f = d.path().join("a.json");
    std::fs::write(&f, workitem("mine")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_build-image"))
        .env_remove("BUILD_IMAGE_CONFIG")
        .arg("--spool")
        .arg(&spool)
        .args(["submit", "--wait", "--timeout", "60"])
        .arg(&f)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("dropped as incoming/a.1.json"), "{err}");
    assert!(err.contains("a.1.json: built"), "{err}");
}
