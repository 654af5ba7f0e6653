//! The log over years, through the binary against a real log and the in-process daemon with
//! real builds (the mic fixture) and pushes (the push fixture): export -> import -> export,
//! backup while builds run and a daemon on the restored copy, compaction (archive and replay),
//! repush of a window, redeliver.

mod common;

use build_image::domain::event::Delivery;
use build_image::domain::{Event, EventKind, Receipt, Tag};
use build_image::journal::Journal;
use common::*;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

fn ok(farm: &Farm, args: &[&str]) -> String {
    let (code, out, err) = output(farm.bin().args(args));
    assert_eq!(code, 0, "{args:?}: {out}{err}");
    out
}

/// The event lines of the log's export (its trailer checked and left out).
fn export(farm: &Farm) -> Vec<String> {
    export_lines(&ok(farm, &["events", "--json"]))
}

fn status(farm: &Farm) -> Vec<Value> {
    serde_json::from_str::<Value>(&ok(farm, &["status", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// What a status row says about a job, without the times of its builds.
fn essence(rows: &[Value]) -> Vec<Value> {
    let mut v: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!([
                r["job"],
                r["image_id"],
                r["state"],
                r["result"],
                r["name"],
                r["arch"],
                r["image_type"],
                r["error"]
            ])
        })
        .collect();
    v.sort_by_key(|r| r[0].as_u64());
    v
}

fn seq_of(line: &str) -> u64 {
    serde_json::from_str::<Value>(line).unwrap()["seq"]
        .as_u64()
        .unwrap()
}

fn job_of(line: &str) -> u64 {
    serde_json::from_str::<Value>(line).unwrap()["job"]
        .as_u64()
        .unwrap()
}

/// Waits until every job `status` lists is answered and its final push recorded.
fn wait_settled(farm: &Farm, jobs: usize, pushed: usize) {
    assert!(
        wait_for(T, || {
            let rows = status(farm);
            rows.len() == jobs
                && rows
                    .iter()
                    .all(|r| ["done", "error", "moved"].contains(&r["state"].as_str().unwrap()))
        }),
        "jobs not answered: {:?}",
        status(farm)
    );
    farm.wait_pushed_events(pushed);
}

fn input(id: &str) -> Value {
    workitem(id, "ks\n")
}

/// A log holding every kind of event, written through the journal as the daemon writes it.
fn log_with_every_kind(dir: &Path) {
    build_image::engine::statedir::prepare_state_dir(dir).unwrap();
    let j = open_journal(dir);
    let settled = |_: &build_image::domain::Job| false;
    let spec = |v: &Value| Box::new(build_image::domain::workitem::normalise(v).unwrap());
    // a file from the spool; one of AMQP below keeps its source through the round trip
    let claimed = |file: &str, sha: &str| EventKind::Claimed {
        file: file.into(),
        worker: "w1".into(),
        bytes: 42,
        sha256: sha.into(),
        source: (file == "b.json").then(|| "amqp://127.0.0.1:5672/%2f/build_image".into()),
    };
    let add = |job: Option<u64>, kind: EventKind| j.append(job, kind, &settled).unwrap().job;
    // a built job, interrupted by a stop, retried, delivered, pushed, and re-dropped
    let a = add(None, claimed("a.json", "aa"));
    add(
        Some(a),
        EventKind::Queued {
            image_id: "x-a".into(),
            spec: spec(&input("x-a")),
            input: input("x-a").into(),
        },
    );
    for attempt in [1, 2] {
        add(
            Some(a),
            EventKind::Started {
                mode: build_image::domain::Mode::Native,
                attempt,
            },
        );
        if attempt == 1 {
            add(
                Some(a),
                EventKind::Interrupted {
                    reason: "stopped".into(),
                    cause: build_image::domain::Cause::Stop,
                },
            );
            add(
                Some(a),
                EventKind::Requeued {
                    reason: "retry".into(),
                    file: None,
                    from_worker: None,
                },
            );
        }
    }
    add(
        Some(a),
        EventKind::Finished {
            result: true,
            error: None,
            urls: Default::default(),
            failure: None,
            boot_seconds: None,
        },
    );
    add(
        Some(a),
        EventKind::Delivered(Delivery {
            receipt: Receipt::Outbox {
                name: "a.json".into(),
                sha256: Some("cd".into()),
            },
            copy: None,
        }),
    );
    add(
        Some(a),
        EventKind::Pushed {
            status: build_image::domain::Status::Done,
            exit: Some(0),
            ok: true,
            error: None,
        },
    );
    add(
        Some(a),
        EventKind::Duplicate {
            file: "a2.json".into(),
            worker: "w1".into(),
            bytes: 42,
            sha256: "aa".into(),
            source: None,
        },
    );
    add(
        Some(a),
        EventKind::Delivered(Delivery {
            receipt: Receipt::Outbox {
                name: "a2.json".into(),
                sha256: Some("cd".into()),
            },
            copy: Some("a2.json".into()),
        }),
    );
    add(Some(a), EventKind::Pinned {});
    add(Some(a), EventKind::Unpinned {});
    add(
        Some(a),
        EventKind::Expired {
            files: vec!["requests/x-a/img-x-a.img".into()],
            bytes: 65536,
            reason: "keep_last = 1".into(),
        },
    );
    // invalid, rejected, cancelled, moved, and a compaction's record
    let b = add(None, claimed("b.json", "bb"));
    let mut bad = input("x-b");
    bad["image"]["arch"] = json!(null);
    add(
        Some(b),
        EventKind::Invalid {
            image_id: Some("x-b".into()),
            error: "missing arch".into(),
            held_by: None,
            input: bad.into(),
        },
    );
    let c = add(None, claimed("c.json", "cc"));
    add(
        Some(c),
        EventKind::Rejected {
            file: "c.json".into(),
            reason: "not JSON".into(),
        },
    );
    let d = add(None, claimed("d.json", "dd"));
    add(
        Some(d),
        EventKind::Queued {
            image_id: "x-d".into(),
            spec: spec(&input("x-d")),
            input: input("x-d").into(),
        },
    );
    add(
        Some(d),
        EventKind::Cancelled {
            reason: "by the operator".into(),
        },
    );
    add(
        Some(d),
        EventKind::Leaked {
            what: "mount /srv/images/requests/x-d/.build-tmp/root".into(),
            why: "busy".into(),
        },
    );
    add(
        Some(d),
        EventKind::LeakFreed {
            what: "mount /srv/images/requests/x-d/.build-tmp/root".into(),
        },
    );
    add(
        None,
        EventKind::Requeued {
            reason: "moved".into(),
            file: Some("e.json".into()),
            from_worker: Some("w2".into()),
        },
    );
    // the events of no job (the host's drain)
    let farm = Some(build_image::domain::FARM);
    let drained = EventKind::Drained {
        reason: "maintenance".into(),
    };
    assert_eq!(add(farm, drained), build_image::domain::FARM);
    add(farm, EventKind::Undrained {});
    add(
        farm,
        EventKind::CancelNoted {
            fei: r#"{"wfid":"wf-1"}"#.into(),
            expires: 4_000_000_000,
        },
    );
    add(
        None,
        EventKind::Compacted {
            file: "/archive.jsonl".into(),
            reason: "1 event(s) of 1 job(s) moved".into(),
            before: "2026-01-01T00:00:00.000Z".into(),
            jobs: 1,
            events: 1,
        },
    );
}

#[test]
fn export_import_export_gives_the_same_lines_for_every_kind() {
    init_log();
    let farm = Farm::new();
    log_with_every_kind(&farm.cfg.state_dir());
    let first = export(&farm);
    let kinds: HashSet<String> = first
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for t in Tag::ALL {
        assert!(kinds.contains(t.as_str()), "no {t} event in {first:#?}");
    }
    // the export carries the inputs (the log keeps them apart)
    let queued: Value = serde_json::from_str(
        first
            .iter()
            .find(|l| l.contains("\"kind\":\"queued\""))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(queued["input"], input("x-a"));

    let file = farm.root().join("log.jsonl");
    std::fs::write(&file, ok(&farm, &["events", "--json"])).unwrap();
    let other = Farm::new();
    let out = ok(&other, &["import", file.to_str().unwrap()]);
    assert!(
        out.contains(&format!("imported {} event(s)", first.len())),
        "{out}"
    );
    let second = export(&other);
    assert_eq!(second, first);
    // the imported log is the same log: the same jobs, the same answers to build from
    assert_eq!(status(&other), status(&farm));
    let show = |f: &Farm| {
        serde_json::from_str::<Value>(&ok(f, &["show", "x-a", "--json"])).unwrap()["workitem"]
            .clone()
    };
    assert_eq!(show(&other), show(&farm));
    assert_eq!(show(&other)["image"]["image_id"], "x-a");
    // and once more: stable
    let again = Farm::new();
    let file2 = farm.root().join("log2.jsonl");
    std::fs::write(&file2, whole_export(&second)).unwrap();
    ok(&again, &["import", file2.to_str().unwrap()]);
    assert_eq!(export(&again), first);
    // numbering goes on after the imported events
    let j = open_journal(&again.cfg.state_dir());
    assert_eq!(j.next_seq(), seq_of(first.last().unwrap()) + 1);
}

#[test]
fn import_refuses_a_non_empty_state_dir_and_a_bad_line() {
    init_log();
    let farm = Farm::new();
    log_with_every_kind(&farm.cfg.state_dir());
    let before = export(&farm);
    let file = farm.root().join("log.jsonl");
    std::fs::write(&file, whole_export(&before)).unwrap();
    let (code, _, err) = output(farm.bin().args(["import", file.to_str().unwrap()]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is not empty"), "{err}");
    assert_eq!(export(&farm), before, "the log is untouched");

    // a line that is not an event: refused, nothing written
    let other = Farm::new();
    let bad = farm.root().join("bad.jsonl");
    std::fs::write(&bad, format!("{}\n{{\"seq\": \"x\"}}\n", before[0])).unwrap();
    let (code, _, err) = output(other.bin().args(["import", bad.to_str().unwrap()]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("line 2: not an event"), "{err}");
    // out of order: refused
    let swapped = farm.root().join("swapped.jsonl");
    std::fs::write(&swapped, format!("{}\n{}\n", before[1], before[0])).unwrap();
    let (code, _, err) = output(other.bin().args(["import", swapped.to_str().unwrap()]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("ascending"), "{err}");
    let state = other.cfg.state_dir();
    assert!(
        !state.exists() || list(&state).is_empty(),
        "a failed import leaves nothing: {:?}",
        list(&state)
    );
    assert!(
        list(state.parent().unwrap_or(Path::new("/")))
            .iter()
            .all(|n| !n.ends_with(".tmp")),
        "no staging folder left"
    );
}

#[test]
fn backup_while_builds_run_restores_to_the_same_status() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    for id in ["bk-a", "bk-b", "bk-c", "bk-d"] {
        farm.drop_json(
            &format!("{id}.json"),
            &workitem(id, "# mic-fixture: sleep 2\n"),
        );
    }
    farm.wait_mic_running("bk-a");
    farm.wait_mic_running("bk-b");
    let backup = farm.root().join("backup");
    let out = ok(&farm, &["backup", backup.to_str().unwrap()]);
    let upto: u64 = out
        .split("up to seq ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no seq in {out}"));
    // a second backup into the same folder is refused
    let (code, _, err) = output(farm.bin().args(["backup", backup.to_str().unwrap()]));
    assert_eq!(code, 1);
    assert!(err.contains("not empty"), "{err}");
    wait_settled(&farm, 4, 8);
    let original = status(&farm);
    d.stop().unwrap();

    // The backup is exactly the log's first `upto` events, inputs included.
    let state = farm.cfg.state_dir();
    {
        let orig = open_journal(&state);
        let copy = open_journal(&backup);
        let full = |j: &Journal| -> Vec<Event> {
            j.since(0)
                .map(|e| j.with_input(e.unwrap()).unwrap())
                .collect()
        };
        let want: Vec<Event> = full(&orig).into_iter().filter(|e| e.seq <= upto).collect();
        assert!(want.len() as u64 == upto && upto > 4, "{upto}");
        assert_eq!(full(&copy), want);
    }

    // Restore: the backup in place of the state dir, a daemon started on it.
    std::fs::rename(&state, farm.root().join("state-before")).unwrap();
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(&backup)
        .arg(&state)
        .status()
        .unwrap();
    assert!(cp.success());
    let d = farm.start();
    wait_settled(&farm, 4, 8);
    assert_eq!(essence(&status(&farm)), essence(&original));
    d.stop().unwrap();
    let (code, out, _) = output(farm.bin().arg("replay"));
    assert_eq!(code, 0, "{out}");
}

#[test]
fn compact_moves_settled_jobs_to_the_archive_and_replay_agrees() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    for id in ["cp-a", "cp-b", "cp-c"] {
        farm.drop_json(&format!("{id}.json"), &workitem(id, "ks\n"));
    }
    let mut bad = workitem("cp-d", "ks\n");
    bad["image"]["arch"] = json!(null);
    farm.drop_json("cp-d.json", &bad);
    wait_settled(&farm, 4, 7);
    let rows = status(&farm);
    let job = |id: &str| {
        rows.iter().find(|r| r["image_id"] == id).unwrap()["job"]
            .as_u64()
            .unwrap()
    };
    // a and b had their images cleaned away; c's folder is still there
    for id in ["cp-a", "cp-b"] {
        std::fs::remove_dir_all(farm.base().join("requests").join(id)).unwrap();
    }
    let gone: HashSet<u64> = ["cp-a", "cp-b", "cp-d"].iter().map(|i| job(i)).collect();
    // a build running across the compaction: kept, and it records into the rewritten log
    farm.drop_json("cp-f.json", &workitem("cp-f", "# mic-fixture: sleep 3\n"));
    farm.wait_mic_running("cp-f");
    // an event of no job (the host's drain) is never moved out
    ok(&farm, &["drain", "--reason", "compaction test"]);
    let before = export(&farm);

    let archive = farm.root().join("archive.jsonl");
    let out = ok(
        &farm,
        &[
            "compact",
            "--before",
            "0s",
            "--archive",
            archive.to_str().unwrap(),
        ],
    );
    assert!(out.contains("of 3 job(s)"), "{out}");
    assert!(out.contains("1 settled job(s) kept"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&archive).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "kickstarts carry password hashes");
    // the archive holds every removed event, in the export form, in order
    let archived: Vec<String> = export_lines(&std::fs::read_to_string(&archive).unwrap());
    let want: Vec<String> = before
        .iter()
        .filter(|l| gone.contains(&job_of(l)))
        .cloned()
        .collect();
    assert_eq!(archived, want);
    // the log keeps the rest, and the record of the compaction, numbered on
    let after = export(&farm);
    let kept: Vec<String> = before
        .iter()
        .filter(|l| !gone.contains(&job_of(l)))
        .cloned()
        .collect();
    assert_eq!(after[..kept.len()], kept[..]);
    // around the compaction's record: only the running build's events
    let at = after
        .iter()
        .position(|l| l.contains("\"kind\":\"compacted\""))
        .unwrap();
    let building = job_of(before.last().unwrap());
    assert!(
        after[kept.len()..]
            .iter()
            .enumerate()
            .all(|(i, l)| i + kept.len() == at || job_of(l) == building),
        "{:#?}",
        &after[kept.len()..]
    );
    let record: Value = serde_json::from_str(&after[at]).unwrap();
    assert_eq!(record["kind"], "compacted");
    assert_eq!(record["seq"].as_u64(), Some(seq_of(&after[at - 1]) + 1));
    assert_eq!(record["jobs"], 3);
    let (code, out, _) = output(farm.bin().arg("replay"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 disagreement(s)"), "{out}");
    // an archive is never replaced
    let (code, _, err) = output(farm.bin().args([
        "compact",
        "--before",
        "0s",
        "--archive",
        archive.to_str().unwrap(),
    ]));
    assert_eq!(code, 1);
    assert!(err.contains("never replaced"), "{err}");
    // the drain is kept, and the daemon folded it again from the rewritten log
    let (code, _, err) = output(farm.bin().arg("status"));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("DRAINED since") && err.contains("compaction test"),
        "{err}"
    );
    ok(&farm, &["undrain"]);

    // the daemon goes on with the rewritten log
    farm.drop_json("cp-e.json", &workitem("cp-e", "ks\n"));
    farm.wait_outbox("cp-e.json", T);
    farm.wait_outbox("cp-f.json", T);
    wait_settled(&farm, 4, 6);
    let e = status(&farm)
        .into_iter()
        .find(|r| r["image_id"] == "cp-e")
        .unwrap();
    // the record is a job of its own, numbered after every job before it; the next job after it
    let record_job = record["job"].as_u64().unwrap();
    assert!(gone.iter().all(|j| *j < record_job), "{gone:?} {record}");
    assert!(kept.iter().all(|l| job_of(l) < record_job), "{record}");
    assert_eq!(e["job"].as_u64(), Some(record_job + 1));
    d.stop().unwrap();
    let (code, out, _) = output(farm.bin().arg("replay"));
    assert_eq!(code, 0, "{out}");

    // the archive reads like an export: it imports into an empty state dir
    let other = Farm::new();
    ok(&other, &["import", archive.to_str().unwrap()]);
    assert_eq!(export(&other), want);

    // what an interrupted rewrite leaves (a half-built new log, no swap mark) is cleared at
    // the next open, and the log stands
    let settled_log = export(&farm);
    let half = farm.cfg.state_dir().join(".log.new");
    std::fs::create_dir(&half).unwrap();
    std::fs::write(half.join("db"), b"half a log").unwrap();
    assert_eq!(export(&farm), settled_log);
    assert!(!half.exists());
}

/// Cancel notes (events of no job) expired by now go to the archive, with no job moved; the
/// live ones and the drain stay in the log.
#[test]
fn compact_moves_expired_cancel_notes_and_keeps_the_rest() {
    init_log();
    let farm = Farm::new();
    let dir = farm.cfg.state_dir();
    build_image::engine::statedir::prepare_state_dir(&dir).unwrap();
    {
        let j = open_journal(&dir);
        let open = |_: &build_image::domain::Job| true;
        let add = |job, kind| j.append(job, kind, &open).unwrap();
        let farm_ev = Some(build_image::domain::FARM);
        let note = |fei: &str, expires| EventKind::CancelNoted {
            fei: fei.into(),
            expires,
        };
        add(None, EventKind::Cancelled { reason: "r".into() });
        add(farm_ev, note("old", 1));
        add(farm_ev, note("live", 4_000_000_000));
        add(farm_ev, EventKind::Drained { reason: "d".into() });
    }
    let before = export(&farm);
    let archive = farm.root().join("notes.jsonl");
    ok(
        &farm,
        &[
            "compact",
            "--before",
            "0s",
            "--archive",
            archive.to_str().unwrap(),
        ],
    );
    let archived = export_lines(&std::fs::read_to_string(&archive).unwrap());
    assert_eq!(archived, [before[1].clone()], "the expired note only");
    assert!(archived[0].contains("\"old\""));
    let after = export(&farm);
    let kept: Vec<&String> = before.iter().filter(|l| !l.contains("\"old\"")).collect();
    assert_eq!(after[..3].iter().collect::<Vec<_>>(), kept);
    assert!(after[3].contains("\"kind\":\"compacted\""), "{after:?}");
    assert_eq!(after.len(), 4);
}

#[test]
fn repush_runs_exactly_the_final_pushes_of_the_window() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    farm.drop_json("rp-a.json", &workitem("rp-a", "ks\n"));
    wait_settled(&farm, 1, 2);
    let a_done = status(&farm)[0]["job"].as_u64().unwrap();
    let since = build_image::journal::now_ts();
    assert!(wait_for(T, || build_image::journal::now_ts() > since));
    farm.drop_json("rp-b.json", &workitem("rp-b", "ks\n"));
    farm.drop_json("rp-c.json", &workitem("rp-c", "# mic-fixture: fail 3\n"));
    wait_settled(&farm, 3, 6);
    let count = |id: &str| {
        let p = farm.pushes_for(id);
        (
            p.iter().filter(|(s, _)| s == "BUILDING").count(),
            p.iter().filter(|(s, _)| s != "BUILDING").count(),
        )
    };
    assert_eq!(
        [count("rp-a"), count("rp-b"), count("rp-c")],
        [(1, 1), (1, 1), (1, 1)]
    );
    let pushed_before = export_lines(&ok(&farm, &["events", "--kind", "pushed", "--json"])).len();

    let out = ok(&farm, &["repush", "--since", &since]);
    assert!(out.contains("2 final push(es)"), "{out}");
    assert_eq!(
        [count("rp-a"), count("rp-b"), count("rp-c")],
        [(1, 1), (1, 2), (1, 2)],
        "exactly the final pushes of b and c, again"
    );
    let last = |id: &str| farm.pushes_for(id).last().unwrap().clone();
    assert_eq!(last("rp-b").0, "DONE");
    assert_eq!(last("rp-c").0, "ERROR");
    assert_eq!(last("rp-b").1, farm.outbox_file("rp-b.json").unwrap());
    let pushed: Vec<Value> = export_events(&ok(&farm, &["events", "--kind", "pushed", "--json"]));
    assert_eq!(pushed.len(), pushed_before + 2);
    for p in &pushed[pushed_before..] {
        assert_ne!(p["job"].as_u64(), Some(a_done));
        assert_ne!(p["status"], "BUILDING");
        assert_eq!(p["ok"], true);
    }
    // a window with nothing in it
    let out = ok(
        &farm,
        &[
            "repush",
            "--since",
            "2020-01-01T00:00:00Z",
            "--until",
            "2020-01-02T00:00:00Z",
        ],
    );
    assert!(out.contains("0 final push(es)"), "{out}");
    // a failing utility: recorded, exit 1
    std::fs::write(farm.hook_dir().join("push.fail"), "").unwrap();
    let (code, out, _) = output(farm.bin().args(["repush", "--since", &since]));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAILED"), "{out}");
    d.stop().unwrap();
    // with no daemon, through the log and the same push utility
    std::fs::remove_file(farm.hook_dir().join("push.fail")).unwrap();
    let out = ok(&farm, &["repush", "--since", &since]);
    assert!(out.contains("2 final push(es)"), "{out}");
    assert_eq!(
        [count("rp-a"), count("rp-b"), count("rp-c")],
        [(1, 1), (1, 3), (1, 3)]
    );
    let pushed = ok(&farm, &["events", "--kind", "pushed", "--json"]);
    assert_eq!(export_lines(&pushed).len(), pushed_before + 6, "{pushed}");

    // no push utility: a clear error
    let mut none = Farm::new();
    none.cfg = farm.cfg.clone();
    none.cfg.hooks.push = None;
    let (code, _, err) = output(none.bin().args(["repush", "--since", "1day"]));
    assert_eq!(code, 1);
    assert!(err.contains("no push utility"), "{err}");
}

#[test]
fn redeliver_writes_the_identical_answer() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    farm.drop_json("rd-a.json", &workitem("rd-a", "ks\n"));
    wait_settled(&farm, 1, 2);
    let path = farm.outbox().join("rd-a.json");
    let first = std::fs::read(&path).unwrap();
    let job = status(&farm)[0]["job"].as_u64().unwrap();
    // upstream lost it
    std::fs::remove_file(&path).unwrap();
    let out = ok(&farm, &["redeliver", "rd-a"]);
    assert!(out.contains("outbox/rd-a.json"), "{out}");
    assert_eq!(std::fs::read(&path).unwrap(), first);
    // the name now holds another job's answer: never replaced
    std::fs::write(&path, b"{\"someone\": \"else\"}\n").unwrap();
    let out = ok(&farm, &["redeliver", &job.to_string()]);
    let other = format!("rd-a.{job}.json");
    assert!(out.contains(&other), "{out}");
    assert_eq!(std::fs::read(farm.outbox().join(&other)).unwrap(), first);
    assert_eq!(std::fs::read(&path).unwrap(), b"{\"someone\": \"else\"}\n");
    d.stop().unwrap();
    // with no daemon, through the log
    std::fs::remove_file(farm.outbox().join(&other)).unwrap();
    ok(&farm, &["redeliver", "rd-a"]);
    assert_eq!(std::fs::read(farm.outbox().join(&other)).unwrap(), first);
    let delivered: Vec<Value> =
        export_events(&ok(&farm, &["events", "--kind", "delivered", "--json"]));
    assert_eq!(delivered.len(), 4, "{delivered:?}");
    let sha = &delivered[0]["sha256"];
    assert!(delivered.iter().all(|d| &d["sha256"] == sha));
    // a job that is not answered, or no job: refused
    let (code, _, err) = output(farm.bin().args(["redeliver", "nope"]));
    assert_eq!(code, 1);
    assert!(err.contains("no job"), "{err}");
    // (the other answer gone: replay would rightly name a file it cannot account for)
    std::fs::remove_file(&path).unwrap();
    let (code, out, _) = output(farm.bin().arg("replay"));
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_crash_during_compaction_leaves_the_old_or_the_new_log_and_the_archive() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    for id in ["cr-a", "cr-b"] {
        farm.drop_json(&format!("{id}.json"), &workitem(id, "ks\n"));
    }
    wait_settled(&farm, 2, 4);
    d.stop().unwrap();
    std::fs::remove_dir_all(farm.base().join("requests/cr-a")).unwrap();
    let job_a = status(&farm)
        .into_iter()
        .find(|r| r["image_id"] == "cr-a")
        .unwrap()["job"]
        .as_u64()
        .unwrap();
    let before = export(&farm);
    let (gone, kept): (Vec<String>, Vec<String>) =
        before.iter().cloned().partition(|l| job_of(l) == job_a);
    let compact = |archive: &Path, crash: &str| {
        let out = farm
            .bin()
            .args(["compact", "--before", "0s", "--archive"])
            .arg(archive)
            .env("BUILD_IMAGE_CRASH_AT", crash)
            .output()
            .unwrap();
        out.status
    };

    // killed once the archive is durable, before the log is rewritten: the log is whole, the
    // archive complete (it repeats events still in the log)
    let first = farm.root().join("first.jsonl");
    assert!(!compact(&first, "compact-archived").success());
    assert_eq!(export(&farm), before);
    assert_eq!(
        std::fs::read_to_string(&first).unwrap(),
        whole_export(&gone)
    );

    // killed after the swap mark, before the files moved: the next open finishes the swap
    let second = farm.root().join("second.jsonl");
    assert!(!compact(&second, "compact-marked").success());
    assert!(farm.cfg.state_dir().join("compact.swap").exists());
    let after = export(&farm);
    assert!(!farm.cfg.state_dir().join("compact.swap").exists());
    assert!(!farm.cfg.state_dir().join(".log.new").exists());
    assert_eq!(after[..after.len() - 1], kept[..]);
    assert!(after.last().unwrap().contains("\"kind\":\"compacted\""));
    assert_eq!(
        std::fs::read_to_string(&second).unwrap(),
        whole_export(&gone)
    );
    let (code, out, _) = output(farm.bin().arg("replay"));
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_long_export_comes_in_pages_and_loses_nothing() {
    init_log();
    let farm = Farm::new();
    let dir = farm.cfg.state_dir();
    build_image::engine::statedir::prepare_state_dir(&dir).unwrap();
    let big = "x".repeat(6 << 20);
    {
        let j = open_journal(&dir);
        let settled = |_: &build_image::domain::Job| false;
        let mut batch = Vec::new();
        for i in 0..4200u64 {
            batch.push((
                None,
                EventKind::Rejected {
                    file: format!("f{i}"),
                    reason: "r".into(),
                },
            ));
        }
        j.append_batch(batch, &settled).unwrap();
        for i in 0..3 {
            let mut w = workitem(&format!("big-{i}"), &big);
            w["image"]["arch"] = json!(null);
            j.append(
                None,
                EventKind::Invalid {
                    image_id: Some(format!("big-{i}")),
                    error: "missing arch".into(),
                    held_by: None,
                    input: w.into(),
                },
                &settled,
            )
            .unwrap();
        }
    }
    let lines = export(&farm);
    // more events than a page holds, more input bytes than a page holds
    assert_eq!(lines.len(), 4203);
    let seqs: Vec<u64> = lines.iter().map(|l| seq_of(l)).collect();
    assert_eq!(seqs, (1..=4203).collect::<Vec<u64>>());
    for l in &lines[4200..] {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(
            v["input"]["image"]["kickstart"].as_str().map(str::len),
            Some(big.len())
        );
    }
}

#[test]
fn a_gz_archive_is_gzip_and_imports() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    let mut bad = workitem("gz-a", "ks\n");
    bad["image"]["arch"] = json!(null);
    farm.drop_json("gz-a.json", &bad);
    wait_settled(&farm, 1, 1);
    d.stop().unwrap();
    let before = export(&farm);
    let archive = farm.root().join("old.jsonl.gz");
    ok(
        &farm,
        &[
            "compact",
            "--before",
            "0s",
            "--archive",
            archive.to_str().unwrap(),
        ],
    );
    let plain = std::process::Command::new("gzip")
        .arg("-dc")
        .arg(&archive)
        .output()
        .expect("gzip");
    assert!(plain.status.success());
    assert_eq!(
        String::from_utf8(plain.stdout).unwrap(),
        whole_export(&before)
    );
    let other = Farm::new();
    ok(&other, &["import", archive.to_str().unwrap()]);
    assert_eq!(export(&other), before);
}
