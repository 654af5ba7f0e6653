//! `build-image doctor`: checks the configuration and the host, one line per check.

use crate::config::Config;
use std::path::Path;

/// Runs every check, prints one line each, returns the exit code (0 ok, 1 a check failed).
pub fn run(cfg: &Config, config_path: Option<&Path>) -> i32 {
    let _ = (cfg, config_path);
    println!("doctor: not implemented yet");
    1
}
