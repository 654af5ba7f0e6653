//! Exit codes follow `--help` (issue 23, defect 10): a usage error exits 2 (`repush` with
//! `--until` before `--since`, `compact --before` a time to come), `config import` of a file
//! with nothing in it is an error, and `backup` and `compact --archive` refuse the spool's
//! folders (a daemon would take what it finds there). Through the binary, against a daemon run
//! in-process with a real build (the mic fixture).

mod common;

use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// A farm whose daemon runs, with one job built, answered and pushed; its export.
fn farm_with_a_job() -> (Farm, Daemon, String) {
    let farm = Farm::new();
    let d = farm.start();
    farm.drop_json("ec-a.json", &workitem("ec-a", "ks\n"));
    farm.wait_outbox("ec-a.json", T);
    farm.wait_pushed_events(2);
    let (_, export, _) = output(farm.bin().args(["events", "--json"]));
    (farm, d, export)
}

#[test]
fn repush_with_until_not_after_since_is_a_usage_error() {
    init_log();
    let (farm, d, _) = farm_with_a_job();
    let pushes = farm.pushes().len();
    let (code, _, err) = output(
        farm.bin()
            .args(["repush", "--since", "1h", "--until", "2h"]),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not after --since"), "{err}");
    let (code, _, err) = output(farm.bin().args([
        "repush",
        "--since",
        "2026-01-02T00:00:00Z",
        "--until",
        "2026-01-02T00:00:00Z",
    ]));
    assert_eq!(code, 2, "an empty window: {err}");
    assert_eq!(farm.pushes().len(), pushes, "nothing pushed");
    d.stop().unwrap();
}

#[test]
fn compact_before_a_time_to_come_is_refused_with_why() {
    init_log();
    let (farm, d, export) = farm_with_a_job();
    std::fs::remove_dir_all(farm.base().join("requests/ec-a")).unwrap();
    let archive = farm.root().join("future.jsonl");
    let (code, out, err) = output(farm.bin().args([
        "compact",
        "--before",
        "2999-01-01T00:00:00Z",
        "--archive",
        archive.to_str().unwrap(),
    ]));
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("in the future"), "{err}");
    assert!(!archive.exists());
    d.stop().unwrap();
    let (_, after, _) = output(farm.bin().args(["events", "--json"]));
    assert_eq!(after, export, "the log is unchanged");
}

#[test]
fn backup_and_archive_refuse_the_spools_folders() {
    init_log();
    let (farm, d, export) = farm_with_a_job();
    let state = farm.cfg.state_dir();
    for dir in [
        farm.incoming().join("bk"),
        farm.spool().join("tmp/bk"),
        farm.active().join("bk"),
        farm.spool().join("active/other-host/bk"),
        farm.outbox().join("bk"),
        farm.rejected().join("bk"),
        farm.spool().join("outbox/../incoming/bk"),
        farm.spool().join("state/another-worker"),
        state.join("bk"),
    ] {
        let (code, out, err) = output(farm.bin().arg("backup").arg(&dir));
        assert_eq!(code, 1, "{}: {out}{err}", dir.display());
        assert!(err.contains("inside"), "{err}");
        assert!(!dir.exists(), "{}", dir.display());
        let archive = dir.with_extension("jsonl");
        let (code, out, err) = output(
            farm.bin()
                .args(["compact", "--before", "0s", "--archive"])
                .arg(&archive),
        );
        assert_eq!(code, 1, "{}: {out}{err}", archive.display());
        assert!(err.contains("inside"), "{err}");
        assert!(!archive.exists());
    }
    // through a symlink too
    let link = farm.root().join("to-incoming");
    std::os::unix::fs::symlink(farm.incoming(), &link).unwrap();
    let (code, _, err) = output(farm.bin().arg("backup").arg(link.join("bk")));
    assert_eq!(code, 1, "{err}");
    assert!(list(&farm.incoming()).is_empty());
    assert!(
        list(&farm.rejected()).is_empty(),
        "{:?}",
        list(&farm.rejected())
    );
    // beside the spool it is fine
    let (code, _, err) = output(farm.bin().arg("backup").arg(farm.root().join("bk")));
    assert_eq!(code, 0, "{err}");
    d.stop().unwrap();
    let (_, after, _) = output(farm.bin().args(["events", "--json"]));
    assert_eq!(after, export, "nothing changed the log");
}

#[test]
fn config_import_of_a_file_with_no_setting_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("empty.conf", ""),
        ("blank.conf", "\n  \n"),
        (
            "comments.conf",
            "# build_image.conf\n; nothing here\n[worker]\n",
        ),
    ] {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let (code, out, err) = output(bin().args(["config", "import"]).arg(&file));
        assert_eq!(code, 2, "{name}: {out}{err}");
        assert!(out.is_empty(), "nothing printed: {out}");
        assert!(err.contains("no setting"), "{err}");
    }
}

#[test]
fn submit_with_arguments_that_make_no_workitem_is_a_usage_error() {
    let farm = Farm::new();
    let ks = farm.root().join("k.ks");
    std::fs::write(&ks, "ks\n").unwrap();
    for (flag, value) in [("--name", "a/b"), ("--arch", "")] {
        let mut args = vec![
            "submit",
            "--kickstart",
            ks.to_str().unwrap(),
            "--name",
            "n",
            "--arch",
            "i586",
            "--type",
            "fs",
        ];
        let at = args.iter().position(|a| *a == flag).unwrap();
        args[at + 1] = value;
        let (code, out, err) = output(farm.bin().args(&args));
        assert_eq!(code, 2, "{flag} {value:?}: {out}{err}");
        assert!(out.is_empty(), "no image_id printed: {out}");
        assert!(!err.is_empty());
    }
    assert!(!farm.incoming().exists() || list(&farm.incoming()).is_empty());
}
