//! `build-image doctor`: checks the configuration and the host, one line per check.
//!
//! Each check is a small function that returns a [`Check`] (status, what, detail: the type of
//! `crate::health`, which the builders share); [`report`] formats the list and [`exit_code`]
//! judges it. Each part checks what it needs: the spool (`edges::spool::checks`), the state
//! directory (`engine::statedir::checks`), the push utility (`edges::hooks::check`), the broker
//! (`edges::amqp::check`), the builder (mic and sudo; in KVM mode the preflight, qemu,
//! qemu-img, ssh, scp: [`crate::imaging::Builder::checks`]); this file owns the config's own
//! (the file, mic_opts, base_dir), the order of the report and its verdict.
//!
//! Invariant: a check only looks. The one thing doctor writes is the rename test's hidden temp
//! file (`tmp/.doctor-<pid>.tmp`, a name the daemon ignores), removed before the check returns;
//! missing folders are reported, never created. Every child (`mic --version`, `sudo -n true`,
//! `qemu-img --version`, ...) runs through [`crate::health::probe`] ([`crate::process::output`]
//! with `health::CHILD_TIMEOUT`).

use crate::config::{Config, WorkerConfig};
use crate::health::{Check, Status, dir_to_write};
use std::io::Write;
use std::path::Path;

/// Runs every check, prints one line each, returns the exit code (0 ok, 1 a check failed).
pub fn run(cfg: &Config, config_path: Option<&Path>) -> i32 {
    let checks = all_checks(cfg, config_path);
    // A closed stdout (`doctor | head -1`) must not turn into a panic: the exit code still tells.
    let _ = std::io::stdout()
        .lock()
        .write_all(report(&checks).as_bytes());
    exit_code(&checks)
}

fn all_checks(cfg: &Config, config_path: Option<&Path>) -> Vec<Check> {
    let w = &cfg.worker;
    let builder = crate::imaging::builder(w).checks();
    let mut checks = vec![check_config(config_path), check_mic_opts(w)];
    checks.extend(builder.tools);
    checks.push(check_base_dir(&w.base_dir));
    if let Some(c) = check_budget(cfg) {
        checks.push(c);
    }
    checks.extend(check_keys(&cfg.artifacts));
    checks.extend(crate::edges::spool::checks::checks(cfg));
    checks.extend(crate::engine::statedir::checks(&cfg.state_dir()));
    checks.push(crate::edges::hooks::check(&cfg.hooks));
    if let Some(c) = crate::edges::amqp::check(&cfg.amqp) {
        checks.push(c);
    }
    checks.extend(builder.host);
    checks.extend(check_daemon(cfg));
    checks
}

/// `[artifacts] min_free_mb` against base_dir's file system: a budget larger than the file system
/// can never be met (no build would ever start); one not met now holds builds until images expire.
fn check_budget(cfg: &Config) -> Option<Check> {
    let min = cfg.artifacts.min_free_mb;
    if min == 0 {
        return None;
    }
    let what = "disk budget";
    let st = match nix::sys::statvfs::statvfs(&cfg.worker.base_dir) {
        Ok(st) => st,
        Err(e) => {
            return Some(Check::warn(
                what,
                format!("cannot look at {}: {e}", cfg.worker.base_dir.display()),
            ));
        }
    };
    let frag = st.fragment_size() as u64;
    let total = (st.blocks() as u64).saturating_mul(frag) >> 20;
    let free = (st.blocks_available() as u64).saturating_mul(frag) >> 20;
    Some(if min >= total {
        Check::fail(
            what,
            format!(
                "[artifacts] min_free_mb = {min} but base_dir's file system holds {total} MiB: no build would ever start"
            ),
        )
    } else if free < min {
        Check::warn(
            what,
            format!(
                "base_dir has {free} MiB free, below [artifacts] min_free_mb = {min}: builds wait until images expire (pin, keep_days, keep_last; gc --dry-run)"
            ),
        )
    } else {
        Check::ok(what, format!("{free} MiB free, min_free_mb = {min}"))
    })
}

/// What builds left on the host and could not free, as the running daemon knows it (its
/// `leaked` events not yet freed). Without a daemon: nothing to ask (its next start frees
/// what builds lost to a crash left, and records what it cannot).
/// With a daemon running, also whether it is drained (`build-image drain`): a warning.
fn check_daemon(cfg: &Config) -> Vec<Check> {
    use crate::operate::control::{Client, Request, Response};
    let what = "leaked resources";
    let Some(client) = Client::connect(&cfg.state_dir()) else {
        return vec![Check::ok(what, "no daemon running to ask")];
    };
    let req = Request::Status {
        state: None,
        limit: None,
    };
    match client.call(&req, &mut |_: &crate::domain::Event| true) {
        Ok(Response::Status { rows, drained, .. }) => {
            let drain = match drained {
                Some(d) => Check::warn(
                    "drain",
                    format!(
                        "drained since {}: {}; it claims nothing until `build-image undrain`",
                        d.since, d.reason
                    ),
                ),
                None => Check::ok("drain", "not drained: the daemon takes work"),
            };
            let leaks: Vec<String> = rows
                .iter()
                .flat_map(|r| {
                    r.leaks
                        .iter()
                        .map(move |l| format!("job {}: {} ({})", r.job, l.what, l.why))
                })
                .collect();
            let leaks = if leaks.is_empty() {
                Check::ok(what, "none")
            } else {
                Check::fail(
                    what,
                    format!("{}; see docs/operations.md", leaks.join("; ")),
                )
            };
            vec![leaks, drain]
        }
        Ok(r) => vec![Check::warn(
            what,
            format!("unexpected answer from the daemon: {r:?}"),
        )],
        Err(e) => vec![Check::warn(what, format!("cannot ask the daemon: {e}"))],
    }
}

/// The report: one aligned line per check, then the summary line.
fn report(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        out.push_str(&format!(
            "{:<6}{}: {}\n",
            c.status.label(),
            one_line(&c.what),
            one_line(&c.detail)
        ));
    }
    let count = |s: Status| checks.iter().filter(|c| c.status == s).count();
    out.push_str(&format!(
        "{} checks: {} ok, {} warnings, {} failed\n",
        checks.len(),
        count(Status::Ok),
        count(Status::Warn),
        count(Status::Fail)
    ));
    out
}

fn exit_code(checks: &[Check]) -> i32 {
    if checks.iter().any(|c| c.status == Status::Fail) {
        1
    } else {
        0
    }
}

/// Control characters (a child's newlines, a path's tab) would break the one-line-per-check form.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// config

fn check_config(config_path: Option<&Path>) -> Check {
    match config_path {
        Some(p) => Check::ok("config", format!("{} (parsed)", p.display())),
        None => Check::ok(
            "config",
            "built-in defaults (no --config, no BUILD_IMAGE_CONFIG)",
        ),
    }
}

fn check_mic_opts(w: &WorkerConfig) -> Check {
    if w.mic_opts.is_empty() {
        Check::ok("mic_opts", "none")
    } else {
        Check::ok("mic_opts", shell_words::join(&w.mic_opts))
    }
}

// ---------------------------------------------------------------------------------------------
// directories

/// `[artifacts] sign_key` and `verify_key`, when set: each must be an ed25519 key (the sign
/// key unencrypted); a failure names the file.
fn check_keys(a: &crate::config::ArtifactsConfig) -> Vec<Check> {
    use crate::artifacts::key::{SIGN_KEY, SignKey, VERIFY_KEY, VerifyKey};
    let mut out = Vec::new();
    if let Some(p) = &a.sign_key {
        out.push(match SignKey::load(SIGN_KEY, p) {
            Ok(k) => Check::ok(
                "sign_key",
                format!("{} (ed25519 {})", p.display(), k.fingerprint),
            ),
            Err(e) => Check::fail("sign_key", e.to_string()),
        });
    }
    if let Some(p) = &a.verify_key {
        out.push(match VerifyKey::load(VERIFY_KEY, p) {
            Ok(k) => Check::ok(
                "verify_key",
                format!("{} (ed25519 {})", p.display(), k.fingerprint),
            ),
            Err(e) => Check::fail("verify_key", e.to_string()),
        });
    }
    out
}

fn check_base_dir(dir: &Path) -> Check {
    dir_to_write("base_dir", dir, Status::Warn, "the first build creates it")
}

// ---------------------------------------------------------------------------------------------
// the spool

// ---------------------------------------------------------------------------------------------
// filesystem types

// ---------------------------------------------------------------------------------------------
// the push utility

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_is_aligned_with_a_summary() {
        let checks = vec![
            Check::ok("config", "a.toml"),
            Check::warn("spool filesystem", "nfs"),
            Check::fail("mic", "/usr/bin/mic not found\nsecond line"),
        ];
        let text = report(&checks);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            vec![
                "ok    config: a.toml",
                "WARN  spool filesystem: nfs",
                "FAIL  mic: /usr/bin/mic not found second line",
                "3 checks: 1 ok, 1 warnings, 1 failed",
            ]
        );
        assert_eq!(exit_code(&checks), 1);
        assert_eq!(exit_code(&checks[..2]), 0);
        assert_eq!(report(&[]), "0 checks: 0 ok, 0 warnings, 0 failed\n");
    }

    #[test]
    fn config_and_mic_opts() {
        assert_eq!(
            check_config(Some(Path::new("/etc/b.toml"))),
            Check::ok("config", "/etc/b.toml (parsed)")
        );
        assert!(check_config(None).detail.contains("built-in defaults"));
        let mut w = WorkerConfig::default();
        assert_eq!(check_mic_opts(&w).detail, "none");
        w.mic_opts = vec!["--copy-kernel".into(), "--pack-to=a b".into()];
        assert_eq!(check_mic_opts(&w).detail, "--copy-kernel '--pack-to=a b'");
    }

    #[test]
    fn base_dir_states() {
        let d = tempfile::tempdir().unwrap();
        let c = check_base_dir(d.path());
        assert_eq!(c.status, Status::Ok, "{c:?}");

        let missing = d.path().join("a/b/images");
        let c = check_base_dir(&missing);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(!missing.parent().unwrap().exists(), "created something");

        let file = d.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let c = check_base_dir(&file.join("images"));
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(
            c.detail
                .contains(&format!("{} is not a directory", file.display())),
            "{c:?}"
        );
        let c = check_base_dir(&file);
        assert_eq!(c.status, Status::Fail, "{c:?}");
    }
}
