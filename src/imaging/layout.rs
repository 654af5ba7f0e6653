//! Where a job's files are and what their URLs are: the job directory `base_dir/prefix/dir_id`,
//! the kickstart and the log in it, and the URL of any path under base_dir.
//!
//! Invariant: pure functions of the worker config and the spec (nothing is read or made); a URL
//! is base_url followed by the path under base_dir, each component of it one percent-encoded
//! segment (no name can add a segment, a query or a fragment of its own).

use crate::config::WorkerConfig;
use crate::domain::workitem::{Spec, Urls};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_encode};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// `base_dir/prefix/dir_id`.
pub fn job_dir(w: &WorkerConfig, spec: &Spec) -> PathBuf {
    w.base_dir.join(&spec.prefix).join(&spec.dir_id)
}

pub fn log_path(w: &WorkerConfig, spec: &Spec) -> PathBuf {
    job_dir(w, spec).join(format!("{}.log", spec.name))
}

pub fn ks_path(w: &WorkerConfig, spec: &Spec) -> PathBuf {
    job_dir(w, spec).join(format!("{}.ks", spec.name))
}

/// What a URL path segment keeps as it is: the unreserved characters (RFC 3986).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The URL of a path under base_dir: base_dir replaced by base_url, each segment under it
/// percent-encoded (as UTF-8, or as the raw bytes of a name that is not).
pub fn url_for(w: &WorkerConfig, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(&w.base_dir).ok()?;
    let mut url = w.base_url.trim_end_matches('/').to_string();
    for part in rel.components() {
        url.push('/');
        url.extend(percent_encode(part.as_os_str().as_bytes(), SEGMENT));
    }
    Some(url)
}

/// files_url and logfile_url, known before the build starts (the BUILDING push carries them).
pub fn planned_urls(w: &WorkerConfig, spec: &Spec) -> Urls {
    Urls {
        files_url: url_for(w, &job_dir(w, spec)),
        image_url: None,
        logfile_url: url_for(w, &log_path(w, spec)),
        image_sha256: None,
        artifact_bytes: None,
        provenance_url: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_replace_base_dir() {
        let w = WorkerConfig {
            base_dir: "/srv/images".into(),
            base_url: "http://img.example/images/".into(),
            ..WorkerConfig::default()
        };
        assert_eq!(
            url_for(&w, Path::new("/srv/images/queue/user/7-1/a.img")).as_deref(),
            Some("http://img.example/images/queue/user/7-1/a.img")
        );
        assert_eq!(url_for(&w, Path::new("/elsewhere/a")), None);
    }

    fn worker(base: &Path) -> WorkerConfig {
        WorkerConfig {
            base_dir: base.to_path_buf(),
            base_url: "http://img.example/images".into(),
            ..WorkerConfig::default()
        }
    }

    #[test]
    fn url_segments_are_percent_encoded() {
        let w = worker(Path::new("/srv/images"));
        assert_eq!(
            url_for(&w, Path::new("/srv/images/q u/7-1/a #1?x%y.img")).as_deref(),
            Some("http://img.example/images/q%20u/7-1/a%20%231%3Fx%25y.img")
        );
        assert_eq!(
            url_for(&w, Path::new("/srv/images/requests/é~_.-/ü.raw")).as_deref(),
            Some("http://img.example/images/requests/%C3%A9~_.-/%C3%BC.raw")
        );
    }
}
