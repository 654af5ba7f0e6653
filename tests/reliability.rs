//! Reliability: retried pushes, several daemons on one spool, NFS-style ingestion, duplicates,
//! and faults (disk full, folders removed). Every workitem ends in exactly one answer.

mod common;

use build_image::domain::{EventKind, Status};
use common::*;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn pushed(farm: &Farm) -> Vec<(u64, Status, bool)> {
    farm.events()
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Pushed { status, ok, .. } => Some((e.job, *status, *ok)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_failing_push_is_retried_with_back_off_until_it_succeeds() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.hooks.retries = 3;
    farm.cfg.hooks.retry_delay_ms = 100;
    std::fs::write(farm.hook_dir().join("push.fail-times"), "3\n").unwrap();
    let d = farm.start();
    farm.drop_json("a.json", &workitem("pr-1", "ks\n"));
    farm.wait_outbox("a.json", T);
    // BUILDING fails once, is retried (fails again) and is dropped once DONE supersedes it;
    // DONE: fails, then succeeds on a retry
    let pushes = farm.wait_pushes("pr-1", 1);
    assert_eq!(pushes.last().unwrap().0, "DONE");
    d.stop().unwrap();
    let p = pushed(&farm);
    let done: Vec<bool> = p
        .iter()
        .filter(|x| x.1 == Status::Done)
        .map(|x| x.2)
        .collect();
    assert!(
        done.len() >= 2
            && done.last() == Some(&true)
            && done[..done.len() - 1].iter().all(|ok| !ok),
        "{p:?}"
    );
    assert_eq!(
        p.iter().filter(|x| x.2).count(),
        1,
        "exactly one successful push: {p:?}"
    );
}

#[test]
fn a_push_that_failed_before_a_restart_is_pushed_after_it() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.hooks.retries = 2;
    farm.cfg.hooks.retry_delay_ms = 3_600_000; // not before the restart
    std::fs::write(farm.hook_dir().join("push.fail"), b"").unwrap();
    let d = farm.start();
    farm.drop_json("a.json", &workitem("pr-2", "ks\n"));
    farm.wait_outbox("a.json", T);
    // the push runs apart from the answer: wait until its failure is recorded before stopping
    assert!(
        wait_for(T, || {
            let (_, out, _) = output(farm.bin().args(["events", "--kind", "pushed", "--json"]));
            out.lines()
                .any(|l| l.contains("\"DONE\"") && l.contains("\"ok\":false"))
        }),
        "no failed DONE push recorded"
    );
    d.stop().unwrap();
    assert!(pushed(&farm).iter().any(|x| x.1 == Status::Done && !x.2));
    std::fs::remove_file(farm.hook_dir().join("push.fail")).unwrap();
    let d = farm.start();
    let pushes = farm.wait_pushes("pr-2", 1);
    assert_eq!(pushes[0].0, "DONE");
    assert_eq!(pushes[0].1, farm.outbox_file("a.json").unwrap());
    d.stop().unwrap();
    let p = pushed(&farm);
    assert_eq!(
        p.iter()
            .filter(|x| x.1 == Status::Done)
            .map(|x| x.2)
            .collect::<Vec<_>>(),
        [false, true]
    );
    // settled now: a third start pushes nothing more
    let d = farm.start();
    d.stop().unwrap();
    assert_eq!(pushed(&farm).len(), p.len());
}

#[test]
fn two_daemons_share_one_spool_and_build_each_file_once() {
    init_log();
    let mut a = Farm::new();
    a.cfg.worker.workers = 2;
    let mut b_cfg = a.cfg.clone();
    b_cfg.spool.worker_id = Some("w2".into());
    let b = Farm {
        dir: tempfile::tempdir().unwrap(),
        cfg: b_cfg,
    };
    let (da, db) = (a.start(), b.start());
    const N: usize = 200;
    for i in 0..N {
        a.drop_json(
            &format!("j{i:03}.json"),
            &workitem(&format!("two-{i:03}"), "ks\n"),
        );
    }
    for i in 0..N {
        let r = a.wait_outbox(&format!("j{i:03}.json"), T);
        assert_eq!(r["image"]["result"], json!(true));
    }
    da.stop().unwrap();
    db.stop().unwrap();
    let mut claimed_by: std::collections::HashMap<String, Vec<String>> = Default::default();
    for (farm, w) in [(&a, "w1"), (&b, "w2")] {
        for e in farm.events() {
            if let EventKind::Claimed { file, worker, .. } = e.kind {
                assert_eq!(worker, w);
                claimed_by.entry(file).or_default().push(worker);
            }
        }
    }
    assert_eq!(claimed_by.len(), N);
    assert!(
        claimed_by.values().all(|w| w.len() == 1),
        "a file claimed twice"
    );
    let per_worker = |w: &str| claimed_by.values().filter(|v| v[0] == w).count();
    assert!(
        per_worker("w1") > 0 && per_worker("w2") > 0,
        "both worked: w1 {} w2 {}",
        per_worker("w1"),
        per_worker("w2")
    );
    for i in 0..N {
        let log = std::fs::read_to_string(
            a.base()
                .join(format!("requests/two-{i:03}/img-two-{i:03}.log")),
        )
        .unwrap();
        assert_eq!(
            log.matches("mic-fixture argc:").count(),
            1,
            "two-{i:03} built more than once"
        );
    }
    assert_eq!(list(&a.outbox()).len(), N);
    assert!(list(&a.incoming()).is_empty());
    assert!(
        list(&a.spool().join("active/w1")).is_empty()
            && list(&a.spool().join("active/w2")).is_empty()
    );
}

#[test]
fn the_outbox_removed_while_a_build_runs_is_made_again() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    farm.drop_json("o.json", &workitem("ob-1", "# mic-fixture: sleep 1\n"));
    let log = farm.base().join("requests/ob-1/img-ob-1.log");
    assert!(wait_for(T, || std::fs::read_to_string(&log)
        .is_ok_and(|l| l.contains("sleeping"))));
    std::fs::remove_dir_all(farm.outbox()).unwrap();
    assert_eq!(
        farm.wait_outbox("o.json", T)["image"]["result"],
        json!(true)
    );
    d.stop().unwrap();
}

#[test]
fn a_full_outbox_disk_holds_the_answer_until_space_returns() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.spool.poll_interval_ms = 50;
    std::fs::create_dir_all(farm.spool()).unwrap();
    let Some(_m) = Mount::new(&["-t", "tmpfs", "-o", "size=64k", "tmpfs"], &farm.outbox()) else {
        return;
    };
    let filler = farm.outbox().join(".filler");
    let _ = std::fs::write(&filler, vec![1u8; 200 * 1024]); // fills it: ENOSPC is expected
    let d = farm.start();
    farm.drop_json("full.json", &workitem("nospace-1", "ks\n"));
    // built, but the answer cannot be written: the job waits, nothing is lost
    let log = farm.base().join("requests/nospace-1/img-nospace-1.log");
    assert!(wait_for(T, || std::fs::read_to_string(&log)
        .is_ok_and(|l| l.contains("exited with status 0"))));
    assert!(!wait_for(Duration::from_millis(500), || farm
        .outbox()
        .join("full.json")
        .exists()));
    std::fs::remove_file(&filler).unwrap();
    let r = farm.wait_outbox("full.json", T);
    assert_eq!(r["image"]["result"], json!(true));
    farm.wait_pushes("nospace-1", 2);
    d.stop().unwrap();
    let delivered = farm
        .events()
        .iter()
        .filter(|e| e.kind.name() == "delivered")
        .count();
    assert_eq!(delivered, 1);
}

#[test]
fn a_full_image_disk_defers_the_build_until_space_returns() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.spool.poll_interval_ms = 50;
    let Some(_m) = Mount::new(&["-t", "tmpfs", "-o", "size=64k", "tmpfs"], &farm.base()) else {
        return;
    };
    let filler = farm.base().join("filler");
    let _ = std::fs::write(&filler, vec![1u8; 200 * 1024]);
    let d = farm.start();
    farm.drop_json(
        "full.json",
        &workitem("nospace-2", "# mic-fixture: bytes 1000\n"),
    );
    let status = || output(farm.bin().args(["status", "--json"])).1;
    assert!(
        wait_for(T, || status().contains("\"queued\"")),
        "waits as queued"
    );
    assert!(!wait_for(Duration::from_millis(500), || farm
        .outbox()
        .join("full.json")
        .exists()));
    std::fs::remove_file(&filler).unwrap();
    let r = farm.wait_outbox("full.json", T);
    assert_eq!(r["image"]["result"], json!(true), "{r:#}");
    d.stop().unwrap();
    let started = farm
        .events()
        .iter()
        .filter(|e| e.kind.name() == "started")
        .count();
    assert_eq!(started, 1, "deferred, not failed and retried as attempts");
}

#[test]
fn a_daemon_whose_spool_and_state_dir_vanished_still_stops() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    let sock = farm.cfg.state_dir().join("control.sock");
    assert!(wait_for(T, || sock.exists()), "daemon up");
    std::fs::remove_dir_all(farm.spool()).unwrap();
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(format!("{:?}", d.stop()));
    });
    // It stops (an error about its lost state dir is fair; hanging is not).
    let res = rx.recv_timeout(T).expect("the daemon did not stop");
    eprintln!("stop: {res}");
}

#[test]
fn incoming_vanishing_is_survived() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    std::fs::remove_dir_all(farm.incoming()).unwrap();
    // the daemon keeps running; when the folder is back, files are taken again
    std::fs::create_dir_all(farm.incoming()).unwrap();
    farm.drop_json("back.json", &workitem("vanish-1", "ks\n"));
    assert_eq!(
        farm.wait_outbox("back.json", T)["image"]["result"],
        json!(true)
    );
    d.stop().unwrap();
}

fn bindfs(backing: &Path, view: &Path) -> Option<Mount> {
    std::fs::create_dir_all(view).unwrap();
    let out = Command::new("bindfs").arg(backing).arg(view).output();
    match out {
        Ok(o) if o.status.success() => Some(Mount(view.to_path_buf())),
        other => {
            let why = format!(
                "cannot bindfs {} on {}: {other:?}",
                backing.display(),
                view.display()
            );
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// bindfs shows a backing folder through FUSE; writes made to the backing folder raise no
/// inotify event on the view, as files written by another NFS client.
#[test]
fn nfs_like_spool_without_inotify_is_rescanned_and_slow_writers_are_waited_for() {
    init_log();
    let mut farm = Farm::new();
    let backing = farm.root().join("backing");
    let view = farm.root().join("view");
    std::fs::create_dir_all(backing.join("incoming")).unwrap();
    std::fs::create_dir_all(backing.join("tmp")).unwrap();
    let Some(_m) = bindfs(&backing, &view) else {
        return;
    };
    farm.cfg.spool.dir = view.clone();
    farm.cfg.spool.poll_interval_ms = 500;
    farm.cfg.spool.min_age_ms = 300;
    let d = farm.start();

    // inotify on the view sees nothing of writes made to the backing folder
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut watcher = notify::recommended_watcher(move |e| {
        let _ = tx.send(e);
    })
    .unwrap();
    notify::Watcher::watch(
        &mut watcher,
        &view.join("incoming"),
        notify::RecursiveMode::NonRecursive,
    )
    .unwrap();
    std::fs::write(backing.join("incoming/.probe"), b"x").unwrap();
    let probe_seen = wait_for(Duration::from_millis(500), || {
        rx.try_iter().any(|e: notify::Result<notify::Event>| {
            e.is_ok_and(|e| e.paths.iter().any(|p| p.ends_with(".probe")))
        })
    });
    assert!(
        !probe_seen,
        "bindfs view raised an inotify event for a write to the backing folder"
    );
    std::fs::remove_file(backing.join("incoming/.probe")).unwrap();

    // a renamed drop, written by "another host"
    let bytes = serde_json::to_vec(&workitem("nfs-1", "ks\n")).unwrap();
    std::fs::write(backing.join("tmp/a.json"), &bytes).unwrap();
    std::fs::rename(backing.join("tmp/a.json"), backing.join("incoming/a.json")).unwrap();
    // inotify is blind here (checked above), so only the rescan can find it; how soon is printed,
    // not asserted (no test asserts a timing; P3 in benches/ measures the poll latency)
    let dropped = Instant::now();
    assert!(
        wait_for(T, || farm.outbox().join("a.json").exists()),
        "never picked up by the rescan"
    );
    eprintln!("rescan pick-up and build took {:?}", dropped.elapsed());
    assert_eq!(
        farm.outbox_file("a.json").unwrap()["image"]["result"],
        json!(true)
    );

    // a slow writer that does not rename: 12 pieces 100 ms apart (each gap < min_age 300 ms)
    let bytes = serde_json::to_vec_pretty(&workitem("nfs-2", &"# padding\n".repeat(50))).unwrap();
    let target = backing.join("incoming/slow.json");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&target).unwrap();
        for chunk in bytes.chunks(bytes.len() / 12 + 1) {
            f.write_all(chunk).unwrap();
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let r = farm.wait_outbox("slow.json", T);
    assert_eq!(
        r["image"]["result"],
        json!(true),
        "read only once complete: {r:#}"
    );
    assert!(list(&farm.rejected()).is_empty());
    d.stop().unwrap();
    let claimed: Vec<u64> = farm
        .events()
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Claimed { file, bytes: n, .. } if file == "slow.json" => Some(*n),
            _ => None,
        })
        .collect();
    assert_eq!(
        claimed.last(),
        Some(&(bytes.len() as u64)),
        "the whole file was read: {claimed:?}"
    );
}

#[test]
fn every_final_status_is_pushed_without_a_restart() {
    // Many near-instant builds: a job's final status is asked of the pusher while its BUILDING
    // push may still be under way; none may be lost.
    init_log();
    let mut farm = Farm::new();
    farm.cfg.worker.workers = 2;
    let d = farm.start();
    const N: usize = 300;
    for i in 0..N {
        farm.drop_json(&format!("p{i}.json"), &workitem(&format!("fp-{i}"), "ks\n"));
    }
    let all = wait_for(Duration::from_secs(120), || {
        let (_, out, _) = output(farm.bin().args(["events", "--kind", "pushed", "--json"]));
        event_lines(&out).filter(|l| l.contains("\"DONE\"")).count() >= N
    });
    d.stop().unwrap();
    let done: std::collections::HashSet<u64> = farm
        .events()
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                EventKind::Pushed {
                    status: Status::Done,
                    ok: true,
                    ..
                }
            )
        })
        .map(|e| e.job)
        .collect();
    assert!(all, "{} of {N} final statuses pushed", done.len());
    assert_eq!(done.len(), N);
}
