//! A log written in stored form 1 (one JSON value per event, before blocks: the form of main up
//! to 2026-12-01) is opened by this version: moved into blocks at its first opening, and it
//! reads back exactly as the version that wrote it read it. The fixture
//! (tests/fixtures/log-form1/) was written by that version: a log holding every kind of event
//! and an open job (state.tar.gz: the state dir), with what its `events --json`, `status
//! --json` and `show x-a --json` printed.

mod common;

use build_image::journal::STORE_VERSION;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/log-form1")
        .join(name)
}

fn ok(farm: &Farm, args: &[&str]) -> String {
    let (code, out, err) = output(farm.bin().args(args));
    assert_eq!(code, 0, "{args:?}: {out}{err}");
    out
}

/// A farm whose state dir holds the fixture's log.
fn farm_with_old_log() -> Farm {
    let farm = Farm::new();
    let state = farm.cfg.state_dir();
    let parent = state.parent().unwrap();
    std::fs::create_dir_all(parent).unwrap();
    let (code, out, err) = output(
        std::process::Command::new("tar")
            .arg("-xzf")
            .arg(fixture("state.tar.gz"))
            .arg("-C")
            .arg(parent),
    );
    assert_eq!(code, 0, "tar: {out}{err}");
    std::fs::rename(parent.join("state"), &state).unwrap();
    farm
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

/// The fixture's `status --json`, as this version reads the same log. One difference, on
/// purpose: the version that wrote it told a job's source from its file name (a message body
/// had a hidden `.amqp-` name), and so called job 12 "spool" although its `claimed` event
/// records the broker it came from (`source`); this version reads the recorded source.
fn old_status() -> Value {
    let mut status = json(&std::fs::read_to_string(fixture("status.json")).unwrap());
    for row in status.as_array_mut().unwrap() {
        if row["job"] == 12 {
            assert_eq!(row["source"], "spool");
            row["source"] = "amqp".into();
        }
    }
    status
}

/// The fixture's `show x-a --json` job, as this version folds it: every field the writer had,
/// the same, except `outbox` (the file name the answer went to), which is now the typed
/// `receipt` of the delivery; and the job's `origin`, which the writer did not keep.
fn assert_same_job(now: &Value, old: &Value) {
    for (key, value) in old.as_object().unwrap() {
        if key == "outbox" {
            assert_eq!(now["receipt"]["outbox"]["name"], *value, "outbox");
        } else if key == "copies" {
            let (now, old) = (now[key].as_array().unwrap(), value.as_array().unwrap());
            assert_eq!(now.len(), old.len());
            for (n, o) in now.iter().zip(old) {
                assert_eq!((&n["file"], &n["worker"]), (&o["file"], &o["worker"]));
                assert_eq!(n["receipt"]["outbox"]["name"], o["outbox"], "copy outbox");
            }
        } else {
            assert_eq!(now[key], *value, "{key}");
        }
    }
    assert_eq!(now["origin"], "spool");
}

#[test]
fn a_log_of_the_old_stored_form_reads_back_the_same() {
    init_log();
    let farm = farm_with_old_log();
    let old_export = std::fs::read_to_string(fixture("export.jsonl")).unwrap();

    // the first command to open it moves it into the new form; the export is the same lines,
    // ended by the trailer this version writes
    let old_lines: Vec<String> = old_export.lines().map(str::to_string).collect();
    let export = ok(&farm, &["events", "--json"]);
    assert_eq!(export_lines(&export), old_lines);
    {
        let db = open_sled(&farm.cfg.state_dir());
        let names: Vec<String> = db
            .tree_names()
            .iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n == "events"),
            "the old events tree is gone: {names:?}"
        );
        assert!(
            !db.open_tree("tail").unwrap().is_empty()
                || !db.open_tree("blocks").unwrap().is_empty()
        );
        assert_eq!(
            db.get("store_format").unwrap().unwrap().as_ref(),
            STORE_VERSION.to_be_bytes()
        );
    }
    // and reads the same again, in every view
    assert_eq!(ok(&farm, &["events", "--json"]), export);
    let status = json(&ok(&farm, &["status", "--json"]));
    assert_eq!(status, old_status());
    let show = json(&ok(&farm, &["show", "x-a", "--json"]));
    let old_show = json(&std::fs::read_to_string(fixture("show-x-a.json")).unwrap());
    for key in ["events", "workitem"] {
        assert_eq!(show[key], old_show[key], "{key}");
    }
    assert_same_job(&show["job"], &old_show["job"]);
    assert_eq!(show["workitem"]["image"]["image_id"], "x-a");

    // it takes new events after the old ones (the open job, cancelled offline)
    ok(&farm, &["cancel", "x-f"]);
    let lines = export_lines(&ok(&farm, &["events", "--json"]));
    assert!(lines.len() > old_lines.len(), "{lines:#?}");
    assert_eq!(&lines[..old_lines.len()], &old_lines[..]);
    let first_new = json(&lines[old_lines.len()]);
    assert_eq!(first_new["kind"], "cancelled", "{lines:#?}");
    assert_eq!(first_new["job"], 21);
    assert_eq!(first_new["seq"].as_u64(), Some(old_lines.len() as u64 + 1));
    let new_events = lines.len() - old_lines.len();
    let j = common::open_journal(&farm.cfg.state_dir());
    assert_eq!(j.job_events(21).unwrap().len(), 2 + new_events);
    let jobs = j.fold_all().unwrap();
    assert_eq!(jobs.len(), 7);
    // its jobs keep their numbers (the seq of their first event, as the old version numbered
    // them); a new job gets the next number after the highest
    let highest = *jobs.keys().max().unwrap();
    assert_eq!(j.last_job(), highest);
    let new = j
        .append(
            None,
            build_image::domain::EventKind::Rejected {
                file: "new.json".into(),
                reason: "empty file".into(),
            },
            &|_| false,
        )
        .unwrap();
    assert_eq!(new.job, highest + 1);
    assert!(new.seq > new.job, "numbers no longer follow the seqs");
}

#[test]
fn a_move_cut_short_by_a_crash_is_made_again_at_the_next_opening() {
    init_log();
    let farm = farm_with_old_log();
    let old_export = std::fs::read_to_string(fixture("export.jsonl")).unwrap();
    // the process dies after the blocks are written and flushed, before the new form's mark
    let (code, out, err) = output(
        farm.bin()
            .env("BUILD_IMAGE_CRASH_AT", "migrate-written")
            .args(["events", "--json"]),
    );
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        out.is_empty(),
        "nothing printed from a half-moved log: {out}"
    );
    {
        let db = open_sled(&farm.cfg.state_dir());
        assert!(db.get("store_format").unwrap().is_none(), "not marked");
        assert!(
            db.tree_names().iter().any(|n| n.as_ref() == b"events"),
            "the old events are still there"
        );
    }
    // the next opening starts the move over and reads the same log
    let old_lines: Vec<String> = old_export.lines().map(str::to_string).collect();
    assert_eq!(export_lines(&ok(&farm, &["events", "--json"])), old_lines);
    let status = json(&ok(&farm, &["status", "--json"]));
    assert_eq!(status, old_status());
}
