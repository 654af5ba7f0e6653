//! Native mode: mic runs on this host, in its own process group, output into the job log.

use super::{BuildEnd, JobLog, find_image, job_dir, ks_path, log_path, mic, planned_urls, url_for};
use crate::config::WorkerConfig;
use crate::process::{self, Output, Run};
use crate::workitem::Spec;
use crossbeam_channel::Receiver;

pub fn build(w: &WorkerConfig, spec: &Spec, cancel: &Receiver<()>) -> BuildEnd {
    let mut urls = planned_urls(w, spec);
    // The job directory and the kickstart were made by `super::prepare`.
    let dir = job_dir(w, spec);
    let ks = ks_path(w, spec);
    let log_file = log_path(w, spec);
    let mut log = match JobLog::open(&log_file) {
        Ok(l) => l,
        Err(e) => {
            return BuildEnd::failed(
                format!("cannot open job log {}: {e}", log_file.display()),
                urls,
            );
        }
    };
    let argv = mic::mic_command(spec, &ks, &dir, w);
    let out = match log
        .line(&format!("$ {}", mic::display(&argv)))
        .and_then(|_| log.for_child())
    {
        Ok(f) => f,
        Err(e) => {
            return BuildEnd::failed(
                format!("cannot write job log {}: {e}", log_file.display()),
                urls,
            );
        }
    };
    let outcome = process::run(Run {
        argv: &argv,
        env: vec![],
        stdin: None,
        output: Output::File(out),
        timeout: w.timeout(),
        cancel: Some(cancel),
    });
    let tool = argv
        .iter()
        .find(|a| *a != "sudo" && *a != "-n")
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            let _ = log.line(&format!("error: {e}"));
            return BuildEnd::failed(e.to_string(), urls);
        }
    };
    let tail = if outcome.success() {
        String::new()
    } else {
        log.tail(3)
    };
    let _ = log.line(&format!("{tool} {}", outcome.describe(w.timeout())));
    if outcome == process::Outcome::Cancelled {
        return BuildEnd::Cancelled;
    }
    if !outcome.success() {
        return BuildEnd::failed(
            format!(
                "{tool} {}; last output: {tail}",
                outcome.describe(w.timeout())
            ),
            urls,
        );
    }
    match find_image(&dir, &[ks.clone(), log_file.clone()]) {
        Some(image) => {
            urls.image_url = url_for(w, &image);
            BuildEnd::Finished {
                result: true,
                error: None,
                urls,
            }
        }
        None => BuildEnd::failed(
            format!(
                "{tool} exited with status 0 but left no image file under {}",
                dir.display()
            ),
            urls,
        ),
    }
}
