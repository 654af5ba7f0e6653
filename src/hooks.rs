//! Status hooks: `<push> <STATUS>` with the workitem JSON on stdin, never through a shell.
//!
//! Invariant: a push can fail, hang or be missing, and that is only ever recorded (a `pushed`
//! event with ok=false); it never holds a build or the outbox back.

use crate::config::HooksConfig;
use crate::journal::Status;
use crate::process::{self, Output, Run};
use serde_json::Value;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// What one push attempt did.
#[derive(Debug, Clone, PartialEq)]
pub struct Pushed {
    pub exit: Option<i32>,
    pub ok: bool,
    pub error: Option<String>,
}

/// The push utility's command line.
pub fn push_command(push: &Path, status: Status) -> Vec<OsString> {
    vec![push.as_os_str().to_owned(), status.as_str().into()]
}

/// Runs the push utility once; its output is appended to `hook_log`.
/// `None` when no push utility is configured.
pub fn push_status(
    hooks: &HooksConfig,
    status: Status,
    workitem: &Value,
    image_id: &str,
    hook_log: &Path,
) -> Option<Pushed> {
    let push = hooks.push.as_ref()?;
    let argv = push_command(push, status);
    let timeout = Duration::from_secs(hooks.timeout);
    let output = match OpenOptions::new().create(true).append(true).open(hook_log) {
        Ok(mut f) => {
            let _ = writeln!(
                f,
                "[{}] $ {} (image_id {image_id})",
                crate::journal::now_ts(),
                crate::build::mic::display(&argv)
            );
            Output::File(f)
        }
        Err(e) => {
            log::warn!("cannot open hook log {}: {e}", hook_log.display());
            Output::Null
        }
    };
    let stdin = serde_json::to_vec(workitem).unwrap_or_default();
    let res = process::run(Run {
        argv: &argv,
        env: vec![
            ("BUILD_IMAGE_STATUS".into(), status.as_str().into()),
            ("BUILD_IMAGE_ID".into(), image_id.into()),
        ],
        stdin: Some(stdin),
        output,
        timeout,
        cancel: None,
    });
    Some(match res {
        Ok(o) if o.success() => Pushed {
            exit: Some(0),
            ok: true,
            error: None,
        },
        Ok(o) => Pushed {
            exit: o.exit_code(),
            ok: false,
            error: Some(format!("{} {}", push.display(), o.describe(timeout))),
        },
        Err(e) => Pushed {
            exit: None,
            ok: false,
            error: Some(e.to_string()),
        },
    })
}

/// The push utility of a daemon, with its hooks.log.
pub struct Hooks {
    cfg: HooksConfig,
    log: std::path::PathBuf,
}

impl Hooks {
    pub fn new(cfg: &HooksConfig, log: std::path::PathBuf, _registry: process::Registry) -> Hooks {
        Hooks {
            cfg: cfg.clone(),
            log,
        }
    }

    /// Runs the push utility once for `job`; None when none is configured.
    pub fn push(
        &self,
        _job: u64,
        status: Status,
        workitem: &Value,
        image_id: &str,
    ) -> Option<Pushed> {
        push_status(&self.cfg, status, workitem, image_id, &self.log)
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

    #[test]
    fn missing_failing_and_good_push() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("hooks.log");
        let wi = serde_json::json!({"image": {"image_id": "x"}});
        let mut h = HooksConfig {
            push: None,
            timeout: 5,
            retries: 0,
            retry_delay_ms: 0,
            log_max_mb: 1,
        };
        assert_eq!(push_status(&h, Status::Done, &wi, "x", &log), None);
        h.push = Some(d.path().join("nope"));
        let p = push_status(&h, Status::Done, &wi, "x", &log).unwrap();
        assert!(!p.ok);
        assert!(p.error.unwrap().contains("not found"));
        let script = d.path().join("push");
        std::fs::write(&script, "#!/bin/sh\ncat > \"$0.$1.json\"; echo \"$BUILD_IMAGE_STATUS $BUILD_IMAGE_ID\" > \"$0.env\"; exit 0\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        h.push = Some(script.clone());
        let p = push_status(&h, Status::Done, &wi, "x", &log).unwrap();
        assert!(p.ok, "{p:?}");
        let got: Value =
            serde_json::from_slice(&std::fs::read(d.path().join("push.DONE.json")).unwrap())
                .unwrap();
        assert_eq!(got, wi);
        assert_eq!(
            std::fs::read_to_string(d.path().join("push.env")).unwrap(),
            "DONE x\n"
        );
    }
}
