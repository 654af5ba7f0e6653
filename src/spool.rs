//! The spool: the drop zone `incoming/`, this worker's `active/<worker>/`, `outbox/`, `rejected/`.
//!
//! Invariant: a file is claimed by one `rename(2)` from `incoming/` into `active/<worker>/`, so
//! of several daemons sharing a spool exactly one gets it; a file is read only after it is
//! claimed, never through a symlink, and never beyond `max_bytes`.

use crate::config::SpoolConfig;
use crate::durable::{self, DurableError};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot create spool directory {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read spool directory {path}: {source}")]
    Scan {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Durable(#[from] DurableError),
    #[error("cannot read claimed file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct Spool {
    pub root: PathBuf,
    pub incoming: PathBuf,
    pub tmp: PathBuf,
    pub active: PathBuf,
    pub outbox: PathBuf,
    pub rejected: PathBuf,
    pub worker: String,
}

/// A drop-zone name that a writer is still working on (or that is not ours to take).
pub fn ignored_name(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".part")
}

/// What a scan found ready in `incoming/`.
#[derive(Debug, Clone, PartialEq)]
pub enum Ready {
    /// A regular file, stable for min_age: claim it.
    File(String),
    /// Not a regular file, or too big: reject it unread.
    Reject(String, String),
}

/// A claimed file's content and identity.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub name: String,
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    pub sha256: String,
    /// Set when the file turned out not to be readable as a workitem file at all.
    pub unreadable: Option<String>,
}

impl Spool {
    pub fn new(root: &Path, worker: &str) -> Spool {
        Spool {
            root: root.to_path_buf(),
            incoming: root.join("incoming"),
            tmp: root.join("tmp"),
            active: root.join("active").join(worker),
            outbox: root.join("outbox"),
            rejected: root.join("rejected"),
            worker: worker.to_string(),
        }
    }

    /// Creates the spool's folders that are missing; `incoming/` last, so that once it exists the
    /// whole spool does (writers and tests may take it as the sign the spool is ready).
    pub fn create_dirs(&self) -> Result<(), SpoolError> {
        for d in [
            &self.tmp,
            &self.active,
            &self.outbox,
            &self.rejected,
            &self.incoming,
        ] {
            std::fs::create_dir_all(d).map_err(|source| SpoolError::Create {
                path: d.clone(),
                source,
            })?;
        }
        Ok(())
    }

    pub fn active_path(&self, name: &str) -> PathBuf {
        self.active.join(name)
    }

    /// Names in `active/<worker>/` (not hidden).
    pub fn active_files(&self) -> Result<Vec<String>, SpoolError> {
        list(&self.active)
    }

    /// The worker ids that have a folder in `active/`.
    pub fn workers(&self) -> Result<Vec<String>, SpoolError> {
        list(&self.root.join("active"))
    }

    /// Claims `incoming/<name>` by renaming it into `active/<worker>/`. `Ok(false)` when the file
    /// is gone (another daemon took it) or a file of that name is still being worked on here.
    /// The caller makes the rename durable (`durable::sync_dir(&self.active)`, once per batch).
    pub fn claim(&self, name: &str) -> Result<bool, SpoolError> {
        let to = self.active_path(name);
        if to.symlink_metadata().is_ok() {
            return Ok(false);
        }
        match std::fs::rename(self.incoming.join(name), &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                return Err(DurableError::new("cannot claim", &self.incoming.join(name), e).into());
            }
        }
        Ok(true)
    }

    /// Reads a claimed file (no symlink followed, at most `max_bytes`).
    pub fn read_claimed(&self, name: &str, max_bytes: u64) -> Result<Claimed, SpoolError> {
        let path = self.active_path(name);
        let err = |source| SpoolError::Read {
            path: path.clone(),
            source,
        };
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(&path);
        let f = match f {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
                return Ok(unreadable(name, &path, "a symlink".into()));
            }
            Err(e) => return Err(err(e)),
        };
        let meta = f.metadata().map_err(err)?;
        if let Some(why) = not_regular(&meta.file_type()) {
            return Ok(unreadable(name, &path, why));
        }
        if meta.len() > max_bytes {
            return Ok(unreadable(name, &path, too_big(meta.len(), max_bytes)));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        f.take(max_bytes + 1).read_to_end(&mut bytes).map_err(err)?;
        if bytes.len() as u64 > max_bytes {
            return Ok(unreadable(
                name,
                &path,
                too_big(bytes.len() as u64, max_bytes),
            ));
        }
        let sha256 = hex(&Sha256::digest(&bytes));
        Ok(Claimed {
            name: name.to_string(),
            path,
            bytes,
            sha256,
            unreadable: None,
        })
    }

    /// Moves `from` into `rejected/` (under a free name) with `<name>.reason` beside it.
    /// Returns the name it got there.
    pub fn reject(&self, from: &Path, name: &str, reason: &str) -> Result<String, SpoolError> {
        let mut target = name.to_string();
        let mut n = 1;
        while self.rejected.join(&target).symlink_metadata().is_ok()
            || self
                .rejected
                .join(format!("{target}.reason"))
                .symlink_metadata()
                .is_ok()
        {
            target = format!("{name}.{n}");
            n += 1;
        }
        durable::write_atomic(
            &self.rejected.join(format!("{target}.reason")),
            format!("{reason}\n").as_bytes(),
            0o644,
        )?;
        durable::rename(from, &self.rejected.join(&target))?;
        Ok(target)
    }
}

fn unreadable(name: &str, path: &Path, why: String) -> Claimed {
    Claimed {
        name: name.to_string(),
        path: path.to_path_buf(),
        bytes: Vec::new(),
        sha256: String::new(),
        unreadable: Some(why),
    }
}

fn too_big(len: u64, max: u64) -> String {
    format!("too big: {len} bytes, more than max_bytes = {max}")
}

fn not_regular(ft: &std::fs::FileType) -> Option<String> {
    if ft.is_file() {
        None
    } else if ft.is_symlink() {
        Some("a symlink".into())
    } else if ft.is_dir() {
        Some("a directory".into())
    } else if ft.is_fifo() {
        Some("a fifo".into())
    } else if ft.is_socket() {
        Some("a socket".into())
    } else {
        Some("a device or other special file".into())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The non-hidden names in a folder, sorted.
pub fn list_names(dir: &Path) -> Result<Vec<String>, SpoolError> {
    list(dir)
}

fn list(dir: &Path) -> Result<Vec<String>, SpoolError> {
    let rd = std::fs::read_dir(dir).map_err(|source| SpoolError::Scan {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut names: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// Watches `incoming/` by repeated scans: decides which names are ready by the drop protocol.
/// Keeps, per name, the (size, mtime) seen and when it was first seen so.
pub struct Scanner {
    seen: HashMap<String, (u64, i64, i64, Instant)>,
    min_age: Duration,
    max_bytes: u64,
}

impl Scanner {
    pub fn new(cfg: &SpoolConfig) -> Scanner {
        Scanner {
            seen: HashMap::new(),
            min_age: Duration::from_millis(cfg.min_age_ms),
            max_bytes: cfg.max_bytes,
        }
    }

    /// One pass over `incoming/`. Returns what is ready, and when the next not-yet-stable file
    /// becomes due (so the caller can look again then rather than at the next poll).
    pub fn scan(&mut self, incoming: &Path) -> Result<(Vec<Ready>, Option<Duration>), SpoolError> {
        let rd = std::fs::read_dir(incoming).map_err(|source| SpoolError::Scan {
            path: incoming.to_path_buf(),
            source,
        })?;
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut ready = Vec::new();
        let mut next_due: Option<Duration> = None;
        let mut present = std::collections::HashSet::new();
        for entry in rd.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if ignored_name(&name) {
                continue;
            }
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if let Some(why) = not_regular(&meta.file_type()) {
                ready.push(Ready::Reject(name, why));
                continue;
            }
            if meta.len() > self.max_bytes {
                ready.push(Ready::Reject(name, too_big(meta.len(), self.max_bytes)));
                continue;
            }
            present.insert(name.clone());
            let key = (meta.len(), meta.mtime(), meta.mtime_nsec());
            let first = match self.seen.get(&name) {
                Some(&(s, m, n, t)) if (s, m, n) == key => t,
                _ => {
                    self.seen.insert(name.clone(), (key.0, key.1, key.2, now));
                    now
                }
            };
            let observed = now.duration_since(first);
            let age = meta
                .modified()
                .ok()
                .and_then(|m| wall.duration_since(m).ok())
                .unwrap_or_default();
            if age >= self.min_age || observed >= self.min_age {
                ready.push(Ready::File(name));
            } else {
                let due = self.min_age - observed.max(age);
                next_due = Some(next_due.map_or(due, |d: Duration| d.min(due)));
            }
        }
        self.seen.retain(|n, _| present.contains(n));
        Ok((ready, next_due))
    }

    /// Forgets a name (it was claimed or rejected).
    pub fn forget(&mut self, name: &str) {
        self.seen.remove(name);
    }
}

/// Opens nothing; checks a single name just announced by inotify as renamed into place.
pub fn moved_in_ready(incoming: &Path, name: &str, max_bytes: u64) -> Option<Ready> {
    if ignored_name(name) {
        return None;
    }
    let meta = incoming.join(name).symlink_metadata().ok()?;
    if let Some(why) = not_regular(&meta.file_type()) {
        return Some(Ready::Reject(name.to_string(), why));
    }
    if meta.len() > max_bytes {
        return Some(Ready::Reject(
            name.to_string(),
            too_big(meta.len(), max_bytes),
        ));
    }
    Some(Ready::File(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(min_age_ms: u64) -> SpoolConfig {
        SpoolConfig {
            min_age_ms,
            max_bytes: 100,
            ..SpoolConfig::default()
        }
    }

    #[test]
    fn names_ignored() {
        for n in [".x.json", "a.json.tmp", "a.part"] {
            assert!(ignored_name(n), "{n}");
        }
        assert!(!ignored_name("a.json"));
    }

    #[test]
    fn scan_classifies() {
        let d = tempfile::tempdir().unwrap();
        let inc = d.path();
        std::fs::write(inc.join("ok.json"), b"{}").unwrap();
        std::fs::write(inc.join("big.json"), vec![b' '; 101]).unwrap();
        std::fs::write(inc.join("w.part"), b"{").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", inc.join("link.json")).unwrap();
        std::fs::create_dir(inc.join("dir.json")).unwrap();
        nix::unistd::mkfifo(
            &inc.join("fifo.json"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let mut s = Scanner::new(&cfg(0));
        let (mut ready, _) = s.scan(inc).unwrap();
        ready.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
        let names: Vec<String> = ready.iter().map(|r| format!("{r:?}")).collect();
        assert_eq!(ready.len(), 5, "{names:?}");
        assert!(ready.contains(&Ready::File("ok.json".into())));
        assert!(
            names
                .iter()
                .any(|n| n.contains("big.json") && n.contains("too big"))
        );
        assert!(
            names
                .iter()
                .any(|n| n.contains("link.json") && n.contains("symlink"))
        );
        assert!(
            names
                .iter()
                .any(|n| n.contains("dir.json") && n.contains("directory"))
        );
        assert!(
            names
                .iter()
                .any(|n| n.contains("fifo.json") && n.contains("fifo"))
        );
    }

    #[test]
    fn young_file_waits_for_min_age() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.json"), b"{").unwrap();
        let mut s = Scanner::new(&cfg(60_000));
        let (ready, due) = s.scan(d.path()).unwrap();
        assert!(ready.is_empty());
        assert!(due.unwrap() <= Duration::from_secs(60));
    }

    #[test]
    fn claim_read_reject() {
        let d = tempfile::tempdir().unwrap();
        let sp = Spool::new(d.path(), "w1");
        sp.create_dirs().unwrap();
        std::fs::write(sp.incoming.join("a.json"), b"{}").unwrap();
        assert!(sp.claim("a.json").unwrap());
        assert!(!sp.claim("a.json").unwrap(), "gone");
        let c = sp.read_claimed("a.json", 100).unwrap();
        assert_eq!(c.bytes, b"{}");
        assert_eq!(
            c.sha256,
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        let got = sp.reject(&c.path, "a.json", "not JSON").unwrap();
        assert_eq!(got, "a.json");
        std::fs::write(sp.active.join("a.json"), b"x").unwrap();
        let got = sp
            .reject(&sp.active.join("a.json"), "a.json", "again")
            .unwrap();
        assert_eq!(got, "a.json.1");
        assert_eq!(
            std::fs::read_to_string(sp.rejected.join("a.json.1.reason")).unwrap(),
            "again\n"
        );
        assert!(sp.active_files().unwrap().is_empty());
    }
}
