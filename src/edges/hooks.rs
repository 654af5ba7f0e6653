//! Status hooks: `<push> <STATUS>` with the workitem JSON on stdin, never through a shell.
//!
//! Invariant: a push can fail, hang or be missing, and that is only ever recorded (a `pushed`
//! event with ok=false); it never holds a build or the outbox back. Its output goes to
//! `hooks.log` (bounded per push, the file rotated), and nothing about that file can fail a
//! push.

use crate::config::HooksConfig;
use crate::domain::Status;
use crate::engine::ports::{Pushed, StatusPush};
use crate::health::{Check, find_on_path};
use crate::process::{self, Capture, Outcome, Output, ProcessError, Registry, Run};
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// Output of one push kept for hooks.log: its first and last halves.
const PUSH_OUTPUT_LIMIT: usize = 64 * 1024;

/// The push utility's command line.
pub fn push_command(push: &Path, status: Status) -> Vec<OsString> {
    vec![push.as_os_str().to_owned(), status.as_str().into()]
}

/// Runs the push utility; one at a time or several at once from any threads.
pub struct Hooks {
    push: Option<PathBuf>,
    timeout: Duration,
    registry: Registry,
    log: HookLog,
}

impl Hooks {
    /// `log` is hooks.log (created mode 0600, rotated to `<log>.1` past `cfg.log_max_mb`).
    pub fn new(cfg: &HooksConfig, log: PathBuf, registry: Registry) -> Hooks {
        let max = cfg.log_max_mb.saturating_mul(1024 * 1024);
        Hooks::with_log_limit(cfg, log, registry, max)
    }

    fn with_log_limit(cfg: &HooksConfig, log: PathBuf, registry: Registry, max: u64) -> Hooks {
        Hooks {
            push: cfg.push.clone(),
            timeout: Duration::from_secs(cfg.timeout),
            registry,
            log: HookLog {
                path: log,
                max: max.max(PUSH_OUTPUT_LIMIT as u64 * 2),
                file: Mutex::new(None),
            },
        }
    }
}

/// The engine's status push, through the push utility.
impl StatusPush for Hooks {
    /// Runs the push utility once for `job` with the workitem (`stdin`, encoded); its output
    /// goes to hooks.log as one block. `None` when no push utility is configured. A message or
    /// a disconnect on `cancel` kills it (a stopping daemon does not wait for a hanging utility).
    fn push_status(
        &self,
        job: u64,
        status: Status,
        stdin: Vec<u8>,
        image_id: &str,
        cancel: Option<&crossbeam_channel::Receiver<()>>,
    ) -> Option<Pushed> {
        let push = self.push.as_ref()?;
        let argv = push_command(push, status);
        let capture = Capture::new(PUSH_OUTPUT_LIMIT);
        let started = crate::journal::now_ts();
        let res = process::run(Run {
            argv: &argv,
            env: vec![
                ("BUILD_IMAGE_STATUS".into(), status.as_str().into()),
                ("BUILD_IMAGE_ID".into(), image_id.into()),
            ],
            stdin: Some(stdin),
            output: Output::Capture(capture.clone()),
            timeout: self.timeout,
            cancel,
            registry: &self.registry,
        });
        let how = match &res {
            Ok(o) if o.success() => "ok".to_string(),
            Ok(Outcome::Exited(c)) => format!("exit {c}"),
            Ok(Outcome::TimedOut) => format!("timed out after {} s", self.timeout.as_secs()),
            Ok(Outcome::Signalled(s)) => format!("killed by signal {s}"),
            Ok(Outcome::Cancelled) => "cancelled".to_string(),
            Ok(o @ Outcome::Stalled(_)) => o.describe(self.timeout),
            Err(ProcessError::NotFound { .. }) => "not found".to_string(),
            Err(e) => format!("not run: {e}"),
        };
        let mut block = format!(
            "[{started}] job {job} image_id {} status {}: $ {}\n",
            one_line(image_id),
            status.as_str(),
            crate::imaging::mic::display(&argv)
        );
        for line in capture.text().lines() {
            block.push_str("  | ");
            block.push_str(&one_line(line));
            block.push('\n');
        }
        block.push_str(&format!(
            "[{}] job {job} {}: {how}\n",
            crate::journal::now_ts(),
            status.as_str()
        ));
        self.log.write(block.as_bytes());
        Some(match res {
            Ok(o) if o.success() => Pushed {
                exit: Some(0),
                ok: true,
                error: None,
            },
            Ok(o) => Pushed {
                exit: o.exit_code(),
                ok: false,
                error: Some(format!("{} {}", push.display(), o.describe(self.timeout))),
            },
            Err(e) => Pushed {
                exit: None,
                ok: false,
                error: Some(e.to_string()),
            },
        })
    }
}

/// Control characters (a carriage return, an escape) would break the one-entry-per-line form.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() && c != '\t' { ' ' } else { c })
        .collect()
}

/// hooks.log: blocks appended whole under a lock, the file rotated past `max` bytes.
struct HookLog {
    path: PathBuf,
    max: u64,
    file: Mutex<Option<File>>,
}

impl HookLog {
    /// Appends one block; a failure is only logged (and the file reopened next time).
    fn write(&self, block: &[u8]) {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = self.write_locked(&mut file, block) {
            log::warn!("cannot write {}: {e}", self.path.display());
            *file = None;
        }
    }

    fn write_locked(&self, file: &mut Option<File>, block: &[u8]) -> std::io::Result<()> {
        if file.is_none() {
            *file = Some(self.open()?);
        }
        let size = match file.as_ref() {
            Some(f) => f.metadata()?.len(),
            None => 0,
        };
        if size > 0 && size + block.len() as u64 > self.max {
            let mut rotated = self.path.as_os_str().to_owned();
            rotated.push(".1");
            std::fs::rename(&self.path, &rotated)?;
            *file = Some(self.open()?);
        }
        match file.as_mut() {
            Some(f) => f.write_all(block),
            None => Ok(()),
        }
    }

    fn open(&self) -> std::io::Result<File> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&self.path)?;
        // an older version made it world-readable
        if f.metadata()?.permissions().mode() & 0o077 != 0 {
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(f)
    }
}

/// What `doctor` checks of the push utility: set, found, executable (it is not run).
pub fn check(hooks: &HooksConfig) -> Check {
    let what = "push";
    let Some(push) = &hooks.push else {
        return Check::ok(what, "not set: statuses are only logged");
    };
    if push.as_os_str().is_empty() {
        return Check::warn(
            what,
            "push = \"\" is set but empty: every push will fail; remove the key to only log statuses",
        );
    }
    let path = if push.components().count() == 1 && !push.is_absolute() {
        match find_on_path(push) {
            Some(p) => p,
            None => {
                return Check::fail(what, format!("{} not found on PATH", push.display()));
            }
        }
    } else {
        push.clone()
    };
    match std::fs::metadata(&path) {
        Err(e) => Check::fail(what, format!("{}: {e}", path.display())),
        Ok(m) if !m.is_file() => Check::fail(what, format!("{} is not a file", path.display())),
        Ok(m) => match nix::unistd::access(&path, nix::unistd::AccessFlags::X_OK) {
            Ok(()) => Check::ok(what, format!("{} is executable (not run)", path.display())),
            Err(e) => Check::fail(
                what,
                format!(
                    "{} is not executable (mode {:04o}): {}",
                    path.display(),
                    m.permissions().mode() & 0o7777,
                    e.desc()
                ),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line() {
        let v = push_command(Path::new("/usr/bin/img-push"), Status::Done);
        assert_eq!(
            v,
            vec![OsString::from("/usr/bin/img-push"), OsString::from("DONE")]
        );
    }

    fn config(push: Option<PathBuf>) -> HooksConfig {
        HooksConfig {
            push,
            timeout: 30,
            retries: 0,
            retry_delay_ms: 0,
            log_max_mb: 1,
        }
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("push");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn missing_failing_and_good_push() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("hooks.log");
        let wi = serde_json::json!({"image": {"image_id": "x"}});
        let h = Hooks::new(&config(None), log.clone(), Registry::none());
        assert_eq!(
            h.push_status(1, Status::Done, serde_json::to_vec(&wi).unwrap(), "x", None),
            None
        );
        let h = Hooks::new(
            &config(Some(d.path().join("nope"))),
            log.clone(),
            Registry::none(),
        );
        let p = h
            .push_status(1, Status::Done, serde_json::to_vec(&wi).unwrap(), "x", None)
            .unwrap();
        assert!(!p.ok);
        assert!(p.error.unwrap().contains("not found"));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("job 1 DONE: not found"), "{text}");
        let script = script(
            d.path(),
            "cat > \"$0.$1.json\"; echo \"$BUILD_IMAGE_STATUS $BUILD_IMAGE_ID\" > \"$0.env\"; echo said; exit 0",
        );
        let h = Hooks::new(&config(Some(script)), log.clone(), Registry::none());
        let p = h
            .push_status(2, Status::Done, serde_json::to_vec(&wi).unwrap(), "x", None)
            .unwrap();
        assert!(p.ok, "{p:?}");
        let got: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.path().join("push.DONE.json")).unwrap())
                .unwrap();
        assert_eq!(got, wi);
        assert_eq!(
            std::fs::read_to_string(d.path().join("push.env")).unwrap(),
            "DONE x\n"
        );
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("job 2 image_id x status DONE: $ "), "{text}");
        assert!(text.contains("  | said\n"), "{text}");
        assert!(text.contains("job 2 DONE: ok\n"), "{text}");
        let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_loud_push_keeps_hooks_log_bounded_and_whole() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("hooks.log");
        let push = script(
            d.path(),
            "i=0; while [ $i -lt 30 ]; do head -c 1000000 /dev/zero | tr '\\0' 'y' | fold -w 100; i=$((i+1)); done; exit 3",
        );
        let h = Hooks::new(&config(Some(push)), log.clone(), Registry::none());
        let wi = serde_json::json!({});
        let p = h
            .push_status(
                7,
                Status::Building,
                serde_json::to_vec(&wi).unwrap(),
                "big",
                None,
            )
            .unwrap();
        assert_eq!(p.exit, Some(3));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.len() < 2 * PUSH_OUTPUT_LIMIT, "{} bytes", text.len());
        assert!(text.contains("bytes of output omitted ...]"));
        assert!(
            text.ends_with("job 7 BUILDING: exit 3\n"),
            "{}",
            &text[text.len() - 80..]
        );
        for line in text.lines() {
            assert!(
                line.starts_with('[') || line.starts_with("  | "),
                "a broken line: {line:?}"
            );
        }
    }

    #[test]
    fn concurrent_pushes_write_whole_blocks_and_the_log_rotates() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("hooks.log");
        let push = script(
            d.path(),
            "i=0; while [ $i -lt 300 ]; do echo \"line $i of $BUILD_IMAGE_ID\"; i=$((i+1)); done",
        );
        let h = std::sync::Arc::new(Hooks::with_log_limit(
            &config(Some(push)),
            log.clone(),
            Registry::none(),
            200_000,
        ));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let h = std::sync::Arc::clone(&h);
                std::thread::spawn(move || {
                    for i in 0..10 {
                        let id = format!("t{t}-{i}");
                        let p = h
                            .push_status(i, Status::Done, b"{}".to_vec(), &id, None)
                            .unwrap();
                        assert!(p.ok, "{p:?}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let rotated = d.path().join("hooks.log.1");
        assert!(rotated.exists(), "not rotated");
        for f in [&log, &rotated] {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(text.len() as u64 <= 200_000, "{} bytes", text.len());
            // blocks are whole: every output line sits between its own header and outcome
            let mut current: Option<String> = None;
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("  | ") {
                    let id = current.as_deref().expect("output outside a block");
                    assert!(rest.ends_with(&format!(" of {id}")), "{line} in block {id}");
                } else if line.contains(" status DONE: $ ") {
                    assert!(current.is_none(), "a block started inside another");
                    let id = line
                        .split(" image_id ")
                        .nth(1)
                        .unwrap()
                        .split(' ')
                        .next()
                        .unwrap();
                    current = Some(id.to_string());
                } else {
                    assert!(line.ends_with("DONE: ok"), "{line}");
                    current = None;
                }
            }
            assert!(current.is_none());
        }
    }

    #[test]
    fn push_states() {
        let d = tempfile::tempdir().unwrap();
        let mut h = HooksConfig::default();
        assert_eq!(check(&h).status, crate::health::Status::Ok);
        h.push = Some(PathBuf::new());
        assert_eq!(check(&h).status, crate::health::Status::Warn);
        h.push = Some(d.path().join("nope"));
        let c = check(&h);
        assert_eq!(c.status, crate::health::Status::Fail);
        assert!(c.detail.contains("nope"));
        let plain = d.path().join("plain");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        h.push = Some(plain);
        let c = check(&h);
        assert_eq!(c.status, crate::health::Status::Fail);
        assert!(c.detail.contains("not executable (mode 0644)"), "{c:?}");
        h.push = Some(script(d.path(), "exit 0"));
        assert_eq!(check(&h).status, crate::health::Status::Ok);
        h.push = Some("sh".into());
        assert_eq!(check(&h).status, crate::health::Status::Ok, "found on PATH");
    }
}
