//! Files the daemon writes without an fsync of their own (issue 21) are derived again from the
//! event log before they are used: the kickstart, the build's place record and mic config, the
//! job folder itself. A SIGKILLed daemon whose job folders lost them (truncated, garbage,
//! removed: what a power cut can leave of an unsynced write) builds from the recorded input
//! after its restart, and each answer is a success built from the whole kickstart.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

#[test]
fn unsynced_job_folder_files_lost_in_a_crash_are_written_again_from_the_log() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.worker.workers = 1;
    farm.cfg.worker.infra_retries = 0;
    let go = farm.root().join("go");
    // the lines after the directive make the kickstart long enough for a cut to show
    let ks1 = format!(
        "# mic-fixture: wait-for {}\nlang en_US\n{}",
        go.display(),
        "part / --size 500\n".repeat(50)
    );
    let ks2 = format!(
        "lang en_US\n{}",
        "repo --name=x --baseurl=http://x/\n".repeat(50)
    );
    let child = farm.start_binary();
    farm.drop_json("k1.json", &workitem("k1", &ks1));
    let k1 = farm.base().join("requests/k1");
    let k2 = farm.base().join("requests/k2");
    // k1 builds (mic waits for `go`); k2 waits for the one slot, its folder claimed
    assert!(
        wait_for(T, || std::fs::read_to_string(k1.join("img-k1.log"))
            .is_ok_and(|l| l.contains("mic-fixture: sleeping until"))),
        "k1's mic never ran"
    );
    farm.drop_json("k2.json", &workitem("k2", &ks2));
    assert!(
        wait_for(T, || k2.join(".owner").exists()),
        "k2's folder never claimed"
    );
    drop(child); // SIGKILL

    // What an unsynced write can be after a power cut: cut short, garbage, gone.
    let ks_file = k1.join("img-k1.ks");
    assert_eq!(std::fs::read_to_string(&ks_file).unwrap(), ks1);
    std::fs::write(&ks_file, &ks1.as_bytes()[..10]).unwrap();
    assert!(k1.join(".build-place").exists(), "the place was recorded");
    std::fs::write(k1.join(".build-place"), b"").unwrap();
    let _ = std::fs::remove_file(k1.join(".build-tmp/mic.conf"));
    std::fs::remove_dir_all(&k2).unwrap();

    std::fs::write(&go, "").unwrap();
    let d = farm.start();
    for (file, id, ks) in [("k1.json", "k1", &ks1), ("k2.json", "k2", &ks2)] {
        let r = farm.wait_outbox(file, T);
        assert_eq!(r["image"]["result"], json!(true), "{id}: {r:#}");
        let dir = farm.base().join(format!("requests/{id}"));
        assert_eq!(
            std::fs::read_to_string(dir.join(format!("img-{id}.ks"))).unwrap(),
            *ks,
            "{id}: the kickstart written again whole"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join(format!("img-{id}.ks.copy"))).unwrap(),
            *ks,
            "{id}: mic read the whole kickstart"
        );
        assert!(
            dir.join(format!("img-{id}.img")).is_file(),
            "{id}: the image"
        );
    }
    d.stop().unwrap();
    // k1's build was interrupted by the crash and built again; k2 built once
    let events = farm.events();
    let started = |id: &str| {
        let job = events
            .iter()
            .find(|e| {
                matches!(&e.kind, build_image::domain::EventKind::Queued { image_id, .. } if image_id == id)
            })
            .map(|e| e.job)
            .unwrap();
        events
            .iter()
            .filter(|e| {
                e.job == job && matches!(e.kind, build_image::domain::EventKind::Started { .. })
            })
            .count()
    };
    assert_eq!(started("k1"), 2, "k1: interrupted, then built again");
    assert_eq!(started("k2"), 1, "k2: built once, after the restart");
}
