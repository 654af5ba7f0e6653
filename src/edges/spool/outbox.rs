//! The outbox: where answers go, and under which name.
//!
//! Invariant: an answer never replaces another job's answer. A job's answer goes to
//! `outbox/<input name>`; when that name holds something else than this job's own answer
//! (an earlier one, whose sha256 the job's `delivered` events keep, or the same bytes), it goes
//! to `outbox/<stem>.<job>.json` (then `<stem>.<job>.<n>.json`). Writes are tmp + fsync +
//! rename without replace (another daemon sharing the outbox cannot be overwritten either);
//! the same answer written twice is found in place and not written again. The outbox is the
//! answerer of the reply destination `outbox` (an engine `Answerer`).

use crate::domain::{Job, Receipt};
use crate::durable::{self, DurableError};
use crate::engine::ports::{Answer, AnswerError, Answerer};
use sha2::{Digest, Sha256};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Durable(#[from] DurableError),
    #[error("no free answer name for {name} in {dir} after {tries} tries")]
    NoName {
        name: String,
        dir: PathBuf,
        tries: usize,
    },
}

impl OutboxError {
    pub fn is_no_space(&self) -> bool {
        match self {
            OutboxError::Durable(e) => e.is_no_space(),
            OutboxError::NoName { .. } => false,
        }
    }
}

/// An answer written: its name in the outbox and the sha256 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub name: String,
    pub sha256: String,
}

pub struct Outbox {
    dir: PathBuf,
    /// Tags this daemon's temporary files (removed at its next start if a crash left them).
    tag: String,
}

/// How many names are tried before giving up (a flooded outbox is an operator's problem).
const MAX_NAMES: usize = 1000;

/// The names an answer for `input` of job `job` may take, in order.
pub fn candidates(input: &str, job: u64) -> impl Iterator<Item = String> {
    let (stem, ext) = match input.strip_suffix(".json") {
        Some(stem) => (stem.to_string(), ".json"),
        None => (input.to_string(), ""),
    };
    let first = std::iter::once(input.to_string());
    let numbered = (1..).map(move |n| {
        if n == 1 {
            format!("{stem}.{job}{ext}")
        } else {
            format!("{stem}.{job}.{n}{ext}")
        }
    });
    first.chain(numbered)
}

/// What is at a candidate name.
enum Found {
    Free,
    Same,
    Own,
    Other,
}

impl Outbox {
    pub fn new(dir: &Path, tag: &str) -> Outbox {
        Outbox {
            dir: dir.to_path_buf(),
            tag: tag.to_string(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `bytes` as the answer of job `job` for its input file `input`. `own` are the
    /// sha256 of this job's earlier answers: a file holding one of them is this job's and may
    /// be replaced; a file holding anything else is another's and is left alone.
    pub fn deliver(
        &self,
        input: &str,
        job: u64,
        bytes: &[u8],
        own: &[String],
    ) -> Result<Delivery, OutboxError> {
        let sha = crate::digest::sha256_hex(bytes);
        if let Err(e) = std::fs::metadata(&self.dir)
            && e.kind() == std::io::ErrorKind::NotFound
        {
            log::warn!("{} is gone: creating it again", self.dir.display());
            std::fs::create_dir_all(&self.dir)
                .map_err(|e| DurableError::new("cannot create", &self.dir, e))?;
        }
        let mut tmp: Option<PathBuf> = None;
        let result = (|| {
            for name in candidates(input, job).take(MAX_NAMES) {
                let target = self.dir.join(&name);
                // A name can be taken between the look and the rename: look again.
                for _ in 0..3 {
                    match self.look(&target, &sha, own) {
                        Found::Same => {
                            return Ok(Delivery {
                                name,
                                sha256: sha.clone(),
                            });
                        }
                        Found::Other => break,
                        found => {
                            let t = match &tmp {
                                Some(t) => t.clone(),
                                None => {
                                    let t = self.write_tmp(&name, bytes)?;
                                    tmp = Some(t.clone());
                                    t
                                }
                            };
                            let placed = match found {
                                Found::Own => durable::rename(&t, &target).map(|_| true)?,
                                _ => durable::rename_noreplace(&t, &target)?,
                            };
                            if placed {
                                tmp = None;
                                return Ok(Delivery {
                                    name,
                                    sha256: sha.clone(),
                                });
                            }
                        }
                    }
                }
            }
            Err(OutboxError::NoName {
                name: input.to_string(),
                dir: self.dir.clone(),
                tries: MAX_NAMES,
            })
        })();
        if let Some(t) = tmp {
            let _ = std::fs::remove_file(t);
        }
        result
    }

    fn look(&self, target: &Path, sha: &str, own: &[String]) -> Found {
        let Ok(meta) = target.symlink_metadata() else {
            return Found::Free;
        };
        if !meta.is_file() {
            return Found::Other;
        }
        let Ok(f) = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(target)
        else {
            return Found::Other;
        };
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut f = f;
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => h.update(&buf[..n]),
                Err(_) => return Found::Other,
            }
        }
        let have = crate::digest::hex(&h.finalize());
        if have == sha {
            Found::Same
        } else if own.contains(&have) {
            Found::Own
        } else {
            Found::Other
        }
    }

    /// Writes the bytes to a hidden temporary file in the outbox, fsynced.
    fn write_tmp(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, DurableError> {
        let tmp = durable::temp_path(&self.dir.join(name), Some(&self.tag));
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp)
                .map_err(|e| DurableError::new("cannot create", &tmp, e))?;
            f.write_all(bytes)
                .map_err(|e| DurableError::new("cannot write", &tmp, e))?;
            f.sync_all()
                .map_err(|e| DurableError::new("cannot fsync", &tmp, e))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(tmp)
    }
}

/// A job's answer goes to `outbox/<its input's name>` (a re-drop's to the re-drop's name), by
/// the rule above.
impl Answerer for Outbox {
    fn send(&self, job: &Job, copy: Option<&str>, answer: &Answer) -> Result<Receipt, AnswerError> {
        let input = match copy {
            Some(file) => file.to_string(),
            None => job
                .file
                .clone()
                .unwrap_or_else(|| format!("job-{}.json", job.id)),
        };
        let d = self
            .deliver(&input, job.id, &answer.to_bytes(), &job.answers)
            .map_err(|e| {
                if e.is_no_space() {
                    AnswerError::Later(format!("outbox full: {e}"))
                } else {
                    AnswerError::Failed(e.to_string())
                }
            })?;
        Ok(Receipt::Outbox {
            name: d.name,
            sha256: Some(d.sha256),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_names() {
        let c: Vec<String> = candidates("a.json", 7).take(3).collect();
        assert_eq!(c, vec!["a.json", "a.7.json", "a.7.2.json"]);
        let c: Vec<String> = candidates("job", 7).take(2).collect();
        assert_eq!(c, vec!["job", "job.7"]);
    }

    #[test]
    fn never_replaces_another_answer() {
        let d = tempfile::tempdir().unwrap();
        let o = Outbox::new(d.path(), "w1");
        let a = o.deliver("a.json", 1, b"one", &[]).unwrap();
        assert_eq!(a.name, "a.json");
        // the same answer again: found in place
        assert_eq!(o.deliver("a.json", 1, b"one", &[]).unwrap(), a);
        // job 2 with the same input name: its own name
        let b = o.deliver("a.json", 2, b"two", &[]).unwrap();
        assert_eq!(b.name, "a.2.json");
        assert_eq!(std::fs::read(d.path().join("a.json")).unwrap(), b"one");
        // job 1 answers again (a retry): its own earlier answer is replaced
        let a2 = o
            .deliver("a.json", 1, b"one again", std::slice::from_ref(&a.sha256))
            .unwrap();
        assert_eq!(a2.name, "a.json");
        assert_eq!(
            std::fs::read(d.path().join("a.json")).unwrap(),
            b"one again"
        );
        // a job whose earlier answer was taken away and replaced by another's
        std::fs::write(d.path().join("c.json"), b"someone else's").unwrap();
        let c = o.deliver("c.json", 3, b"three", &["x".into()]).unwrap();
        assert_eq!(c.name, "c.3.json");
        // nothing hidden is left behind
        let hidden = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .count();
        assert_eq!(hidden, 0);
    }
}
