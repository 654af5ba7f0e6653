//! `verify ID|IMAGE_FILE`: an image checked against its build's signed provenance
//! ([`crate::artifacts::verify`]), whether or not a daemon runs (a job is looked up through the
//! daemon, or in the log when none runs; an image file needs neither).

use super::Usage;
use super::access::{call, expect};
use crate::artifacts::verify::{job_dir_of, verify as check};
use crate::config::Config;
use crate::domain::text::escape;
use crate::operate::control::{Request, Response};
use std::path::{Path, PathBuf};

/// Checks `target` (an image file, or a job: image_id or #N) with `--key`, else `[artifacts]
/// verify_key`, else the public half of `sign_key`. Exit 0 matches, 1 differs, 2 missing.
pub fn verify(cfg: &Config, target: &str, key: Option<&Path>) -> anyhow::Result<i32> {
    let Some(key) = crate::artifacts::key::verify_key(&cfg.artifacts, key)? else {
        return Err(Usage(
            "no key to check with: give --key FILE.pub, or set [artifacts] verify_key (or sign_key)"
                .into(),
        )
        .into());
    };
    let as_file = Path::new(target);
    let (dir, only): (PathBuf, Option<&Path>) = if as_file.is_file() {
        match job_dir_of(as_file) {
            Some(d) => (d, Some(as_file)),
            None => {
                eprintln!(
                    "build-image: missing: no {} in a folder above {}",
                    crate::artifacts::provenance::PROVENANCE_FILE,
                    escape(target)
                );
                return Ok(2);
            }
        }
    } else if target.contains('/') {
        eprintln!("build-image: missing: {}", escape(target));
        return Ok(2);
    } else {
        let r = expect(call(
            cfg,
            Request::Show {
                id: target.to_string(),
            },
            |_| true,
        )?)?;
        let Response::Show(view) = r else {
            anyhow::bail!("unexpected answer from the daemon: {r:?}");
        };
        if let Some(e) = &view.job.expired {
            // the images are gone on purpose: say so, rather than a bare "missing"
            eprintln!(
                "build-image: missing: job {}'s images expired at {} ({}); its provenance and SHA256SUMS are kept",
                view.job.id,
                escape(&e.at),
                escape(&e.reason)
            );
            return Ok(2);
        }
        let Some(dir) = view.log_path.as_deref().and_then(|l| Path::new(l).parent()) else {
            anyhow::bail!("job {target} has no job folder (it was never built)");
        };
        (dir.to_path_buf(), None)
    };
    let v = check(&dir, only, &key);
    for line in &v.lines {
        println!("{}", escape(line));
    }
    Ok(v.code)
}
