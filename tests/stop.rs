//! The stop: nothing said is left unsaid (DESIGN.md). A daemon stopped right after its last
//! answer, with a push utility that takes two seconds a call, pushes every BUILDING and final
//! status before it exits, within the grace; a second signal cuts that drain, `status` says
//! what is left, and the next start pushes the rest.

mod common;

use build_image::domain::{EventKind, Status};
use common::*;
use std::time::{Duration, Instant};

const JOBS: usize = 3;

/// A farm with a slow job database (each push takes two seconds), and JOBS answered workitems,
/// served by the binary (returned running).
fn farm_answered() -> (Farm, Guard) {
    let farm = Farm::new();
    std::fs::write(farm.hook_dir().join("push.delay"), "2\n").unwrap();
    let daemon = farm.start_binary();
    for i in 0..JOBS {
        farm.drop_json(
            &format!("s{i}.json"),
            &workitem(&format!("st-{i}"), "# ks\n"),
        );
    }
    for i in 0..JOBS {
        let out = farm.wait_outbox(&format!("s{i}.json"), Duration::from_secs(60));
        assert_eq!(out["image"]["result"], true, "{out}");
    }
    (farm, daemon)
}

/// The statuses the push fixture recorded, per image_id.
fn recorded(farm: &Farm, id: &str) -> Vec<String> {
    farm.pushes_for(id).into_iter().map(|(s, _)| s).collect()
}

#[test]
fn a_stop_right_after_the_last_answer_pushes_every_status_first() {
    let (farm, mut daemon) = farm_answered();
    // the last answer is in: stop now, with most pushes still queued (2 threads, 2 s each)
    let before = farm.pushes().len();
    assert!(before < 2 * JOBS, "the pushes were not behind: {before}");
    let asked = Instant::now();
    sigterm(&daemon.0);
    let code = wait_exit(&mut daemon.0, Duration::from_secs(60));
    let took = asked.elapsed();
    assert_eq!(code, Some(0));
    // within the grace (30 s in the farm's config), and not cut short
    assert!(took < Duration::from_secs(30), "{took:?}");
    for i in 0..JOBS {
        let id = format!("st-{i}");
        assert_eq!(recorded(&farm, &id), vec!["BUILDING", "DONE"], "{id}");
    }
    // and the log knows: every final push recorded, none left for the next start
    let done = farm
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
        .count();
    assert_eq!(done, JOBS);
    let (code, _, err) = output(farm.bin().args(["status"]));
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("wait for their final status push"), "{err}");
}

#[test]
fn a_second_signal_cuts_the_drain_and_the_next_start_pushes_the_rest() {
    let (farm, mut daemon) = farm_answered();
    let asked = Instant::now();
    let before = farm.pushes().len();
    sigterm(&daemon.0);
    // the stop has begun (signals sent back to back may arrive as one): once a push more is
    // made, the drain runs; cut it
    assert!(wait_for(Duration::from_secs(30), || farm.pushes().len() > before));
    sigterm(&daemon.0);
    let code = wait_exit(&mut daemon.0, Duration::from_secs(60));
    assert_eq!(code, Some(0));
    // cut: the drain would have taken seconds more (2 threads, 2 s a push)
    let done_before: usize = (0..JOBS)
        .map(|i| {
            recorded(&farm, &format!("st-{i}"))
                .iter()
                .filter(|s| *s == "DONE")
                .count()
        })
        .sum();
    assert!(
        done_before < JOBS,
        "every DONE pushed though the drain was cut ({:?})",
        asked.elapsed()
    );
    // status says so (no daemon runs: the command reads the log itself)
    let (code, _, err) = output(farm.bin().args(["status"]));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("wait for their final status push") && err.contains("next daemon start"),
        "{err}"
    );
    // the next start pushes the rest: every job's DONE
    std::fs::remove_file(farm.hook_dir().join("push.delay")).unwrap();
    let daemon = farm.start_binary();
    for i in 0..JOBS {
        let id = format!("st-{i}");
        assert!(
            wait_for(Duration::from_secs(60), || recorded(&farm, &id)
                .contains(&"DONE".to_string())),
            "{id}: {:?}",
            recorded(&farm, &id)
        );
    }
    drop(daemon);
}

#[test]
fn a_push_utility_that_hangs_does_not_hold_the_stop() {
    let mut farm = Farm::new();
    farm.cfg.hooks.timeout = 2;
    std::fs::write(farm.hook_dir().join("push.hang"), "").unwrap();
    let mut daemon = farm.start_binary();
    for i in 0..JOBS {
        farm.drop_json(
            &format!("h{i}.json"),
            &workitem(&format!("hang-{i}"), "# ks\n"),
        );
    }
    for i in 0..JOBS {
        farm.wait_outbox(&format!("h{i}.json"), Duration::from_secs(60));
    }
    // every push hangs until its 2 s timeout; each push thread has several queued
    sigterm(&daemon.0);
    assert_eq!(wait_exit(&mut daemon.0, Duration::from_secs(60)), Some(0));
    // at the stop, the first push that gave no answer ended the drain: the final statuses
    // behind it were not each waited for, they are left for the next start
    let final_attempts = farm
        .events()
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                EventKind::Pushed {
                    status: Status::Done,
                    ..
                }
            )
        })
        .count();
    assert!(
        final_attempts < JOBS,
        "{final_attempts} final pushes waited for: {:#?}",
        farm.events()
            .iter()
            .map(|e| format!("{} {} {}", e.ts, e.job, e.summary()))
            .collect::<Vec<_>>()
    );
    let (code, _, err) = output(farm.bin().args(["status"]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("wait for their final status push"), "{err}");
}
