//! More daemons of one farm, run as the binary: the same spool, broker and base_dir as the
//! farm's own config, under another worker id.

use super::{Farm, Guard, bin, sigterm, wait_exit};
use std::path::PathBuf;
use std::time::Duration;

/// The config file of another daemon of `farm` (the same spool, broker and base_dir), as `worker`.
pub fn config_for(farm: &Farm, worker: &str) -> PathBuf {
    let mut cfg = farm.cfg.clone();
    cfg.spool.worker_id = Some(worker.to_string());
    let p = farm.root().join(format!("{worker}.toml"));
    std::fs::write(&p, toml::to_string(&cfg).unwrap()).unwrap();
    p
}

/// Starts the binary as another daemon of the farm, its stderr in `<worker>.stderr`.
pub fn start_worker(farm: &Farm, worker: &str) -> Guard {
    let cfg = config_for(farm, worker);
    let err = std::fs::File::create(farm.root().join(format!("{worker}.stderr"))).unwrap();
    Guard(
        bin()
            .arg("--config")
            .arg(cfg)
            .arg("run")
            .stderr(err)
            .spawn()
            .expect("start the daemon"),
    )
}

/// Stops a daemon started by [`start_worker`] (SIGTERM, exit 0).
pub fn stop_worker(mut g: Guard) {
    sigterm(&g.0);
    assert_eq!(wait_exit(&mut g.0, Duration::from_secs(120)), Some(0));
}
