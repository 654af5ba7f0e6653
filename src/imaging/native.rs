//! Native mode: mic runs on this host, in its own process group, output into the job log.

use super::{BuildEnd, Prepared, mic, planned_urls, url_for};
use crate::config::WorkerConfig;
use crate::process::{self, Output, Registry, Run};
use crate::workitem::Spec;
use crossbeam_channel::Receiver;

pub fn build(
    w: &WorkerConfig,
    spec: &Spec,
    prepared: &Prepared,
    cancel: &Receiver<()>,
    registry: &Registry,
) -> BuildEnd {
    let mut urls = planned_urls(w, spec);
    // The job directory, the kickstart and the log were made by `super::prepare`.
    let dir = prepared.dir();
    let log = prepared.log();
    let argv = mic::mic_command(spec, prepared.ks(), dir, w);
    if let Err(e) = log.line(&format!("$ {}", mic::display(&argv))) {
        return BuildEnd::failed(
            format!("cannot write job log {}: {e}", log.path().display()),
            urls,
        );
    }
    let outcome = process::run(Run {
        argv: &argv,
        env: vec![],
        stdin: None,
        output: Output::Sink(log.sink()),
        timeout: w.timeout(),
        cancel: Some(cancel),
        registry,
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
    match prepared.new_image() {
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
                "{tool} exited 0 but left no image file (none new or changed under {})",
                dir.display()
            ),
            urls,
        ),
    }
}
