//! Twenty builds in a row killed by `timeout`, each with the mic fixture attaching a loop device,
//! mounting and escaping: the host's loop devices and mounts are exactly as before (counted
//! before and after; this file holds one test, so no other build of this binary runs meanwhile).

mod common;

use common::host::{HostGuard, all_loops, all_mounts, fixture_all_pids};
use common::*;
use serde_json::json;
use std::time::Duration;

#[test]
fn twenty_timeouts_leave_the_host_as_it_was() {
    init_log();
    let mut farm = Farm::new();
    // long enough for the fixture to attach, make a filesystem and mount on a loaded machine
    farm.cfg.worker.timeout = 4;
    farm.cfg.worker.workers = 2;
    // mic's mounts on the host (not in a namespace of its own), for the release to unmount
    farm.cfg.worker.mount_namespace = false;
    // twenty builds, each one killed (a timeout is not tried again here)
    farm.cfg.worker.infra_retries = 0;
    let guard = HostGuard::new(farm.root());
    let (loops, mounts) = (all_loops(), all_mounts());
    eprintln!(
        "before: {} loop device(s), {} mount(s)",
        loops.len(),
        mounts.len()
    );
    let d = farm.start();
    for n in 0..20 {
        farm.drop_json(
            &format!("t{n}.json"),
            &workitem(
                &format!("t{n}"),
                "# mic-fixture: host\n# mic-fixture: sleep 300\n",
            ),
        );
    }
    let mut pids = Vec::new();
    for n in 0..20 {
        let r = farm.wait_outbox(&format!("t{n}.json"), Duration::from_secs(300));
        assert_eq!(r["image"]["result"], json!(false));
        let err = r["image"]["error"].as_str().unwrap_or_default();
        assert!(err.contains("timed out"), "{r:#}");
        let log = std::fs::read_to_string(farm.base().join(format!("requests/t{n}/img-t{n}.log")))
            .unwrap();
        assert!(log.contains("mic-fixture loop: /dev/loop"), "{log}");
        assert!(log.contains("released: detached loop device"), "{log}");
        pids.extend(fixture_all_pids(&log));
    }
    d.stop().unwrap();
    guard.assert_clean(&pids);
    let (loops_after, mounts_after) = (all_loops(), all_mounts());
    eprintln!(
        "after: {} loop device(s), {} mount(s)",
        loops_after.len(),
        mounts_after.len()
    );
    assert_eq!(loops_after, loops, "loop devices before and after");
    assert_eq!(mounts_after.len(), mounts.len(), "mounts before and after");
}
