//! `build-image verify`: a job folder's images checked against its signed provenance. The
//! envelope (`provenance.intoto.jsonl`) must carry a signature of the given key over exactly
//! the bytes of `provenance.json`; then each subject (or the one image asked about) is hashed
//! again and compared with the signed sha256.
//!
//! Invariant: a verdict names what differs. Exit codes: 0 everything matches; 1 something
//! differs (a subject's bytes, the statement, the key); 2 a file is missing (the envelope, the
//! statement, an image).

use super::dsse::{self, ENVELOPE_FILE, Rejected};
use super::key::VerifyKey;
use super::provenance::{PROVENANCE_FILE, Statement};
use super::sums::hash_reader;
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

/// The verdict: one line per finding, and the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub code: i32,
    pub lines: Vec<String>,
}

impl Verdict {
    fn missing(line: String) -> Verdict {
        Verdict {
            code: 2,
            lines: vec![line],
        }
    }
    fn differs(line: String) -> Verdict {
        Verdict {
            code: 1,
            lines: vec![line],
        }
    }
}

/// The job folder an image file is in: the nearest folder above it holding `provenance.json`
/// (at most 8 levels up: mic's `--release` tree puts images three down).
pub fn job_dir_of(image: &Path) -> Option<PathBuf> {
    let image = std::path::absolute(image).ok()?;
    image
        .ancestors()
        .skip(1)
        .take(8)
        .find(|d| d.join(PROVENANCE_FILE).is_file())
        .map(Path::to_path_buf)
}

fn read(path: &Path) -> Result<Vec<u8>, Verdict> {
    std::fs::read(path).map_err(|e| {
        if e.kind() == ErrorKind::NotFound {
            Verdict::missing(format!("missing: {}", path.display()))
        } else {
            Verdict::missing(format!("cannot read {}: {e}", path.display()))
        }
    })
}

/// A subject's name as a path under the job folder: plain components only.
fn under(dir: &Path, name: &str) -> Option<PathBuf> {
    let rel = Path::new(name);
    let plain = rel.components().all(|c| matches!(c, Component::Normal(_)));
    (plain && !name.is_empty()).then(|| dir.join(rel))
}

/// Checks the job folder `dir` against its signed statement with `key`; `only` (a path under
/// `dir`) limits the subjects checked to that file, which must be one of them.
pub fn verify(dir: &Path, only: Option<&Path>, key: &VerifyKey) -> Verdict {
    match check(dir, only, key) {
        Ok(v) | Err(v) => v,
    }
}

fn check(dir: &Path, only: Option<&Path>, key: &VerifyKey) -> Result<Verdict, Verdict> {
    let envelope_file = dir.join(ENVELOPE_FILE);
    let statement_file = dir.join(PROVENANCE_FILE);
    let envelope = read(&envelope_file)?;
    let written = read(&statement_file)?;
    let payload = dsse::open(&envelope, key).map_err(|r| {
        Verdict::differs(match r {
            Rejected::OtherKey { found, .. } => format!(
                "{}: signed by another key (fingerprint {found}), not {} ({})",
                envelope_file.display(),
                key.fingerprint,
                key.path.display()
            ),
            other => format!("{}: {other}", envelope_file.display()),
        })
    })?;
    if payload != written {
        return Err(Verdict::differs(format!(
            "{}: signature does not match (the file differs from the statement signed in {})",
            statement_file.display(),
            envelope_file.display()
        )));
    }
    let statement: Statement = serde_json::from_slice(&payload).map_err(|e| {
        Verdict::differs(format!(
            "{}: signed, but not a statement this program reads: {e}",
            statement_file.display()
        ))
    })?;
    let mut subjects: Vec<(PathBuf, String, String)> = Vec::new();
    for s in &statement.subject {
        let name = s.name.clone().unwrap_or_default();
        let want = s.digest.get("sha256").cloned().unwrap_or_default();
        let Some(path) = under(dir, &name) else {
            return Err(Verdict::differs(format!(
                "{}: subject {name:?} is not a path in the job folder",
                statement_file.display()
            )));
        };
        subjects.push((path, name, want));
    }
    if let Some(file) = only {
        let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
        subjects.retain(|(p, _, _)| *p == file);
        if subjects.is_empty() {
            return Err(Verdict::differs(format!(
                "{}: not a subject of {}",
                file.display(),
                statement_file.display()
            )));
        }
    }
    let mut out = Verdict {
        code: 0,
        lines: Vec::new(),
    };
    for (path, name, want) in &subjects {
        let hashed = std::fs::File::open(path).and_then(hash_reader);
        match hashed {
            Ok((got, _)) if got == *want => out.lines.push(format!("ok: {name}")),
            Ok((got, _)) => {
                out.code = out.code.max(1);
                out.lines
                    .push(format!("differs: {name}: sha256 {got}, signed {want}",));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                out.code = 2;
                out.lines.push(format!("missing: {}", path.display()));
            }
            Err(e) => {
                out.code = 2;
                out.lines
                    .push(format!("cannot read {}: {e}", path.display()));
            }
        }
    }
    if out.code == 0 {
        out.lines.push(format!(
            "verified: {} file(s) match {}, signed by {} ({})",
            subjects.len(),
            statement_file.display(),
            key.fingerprint,
            key.path.display()
        ));
    }
    Ok(out)
}
