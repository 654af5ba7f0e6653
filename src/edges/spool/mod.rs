//! The spool: the drop zone `incoming/`, this worker's `active/<worker>/` (where claimed
//! inputs wait until they are answered), `outbox/`, `rejected/`. It is one source of
//! workitems ([`watch`]: the claim loop) and one answerer ([`outbox`]); it is also where the
//! engine keeps every held input ([`inputs`]: the engine's `Inputs`, bodies that arrived whole
//! from other sources included), the liveness mark of this worker ([`liveness`]), and the
//! operator's `requeue --worker` of a dead worker's files ([`requeue`]), the farm's host records
//! in `hosts/` and the control drops in `control/` ([`hosts`]).
//!
//! Invariant: a file is claimed by one `rename(2)` from `incoming/` into `active/<worker>/`, so
//! of several daemons sharing a spool exactly one gets it; a file is read only after it is
//! claimed, never through a symlink, never through a second name (a hard link), and never beyond
//! `max_bytes`. A name that is not UTF-8 is never read either: it is moved to `rejected/` under a
//! safe name. Nothing in `rejected/` or `outbox/` is ever replaced.

pub mod checks;
pub mod hosts;
pub mod inputs;
pub mod liveness;
pub mod outbox;
pub mod requeue;
pub mod scanner;
pub mod watch;

pub use liveness::{ALIVE, HEARTBEAT, Liveness, STALE_AFTER};
pub use scanner::{HARD_LINK_HOLD, Ready, Scanner, moved_in_ready};

use crate::durable::{self, DurableError};
use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

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
    #[error("no free name for {name} in {dir}")]
    NoFreeName { dir: PathBuf, name: String },
}

impl SpoolError {
    /// Was the file gone (another daemon took it, or its writer removed it)?
    pub fn is_not_found(&self) -> bool {
        match self {
            SpoolError::Durable(e) => e.is_not_found(),
            SpoolError::Read { source, .. } | SpoolError::Scan { source, .. } => {
                source.kind() == std::io::ErrorKind::NotFound
            }
            _ => false,
        }
    }
}

/// How old a hidden `*.tmp` file in `outbox/` or `tmp/` must be before a start removes it as the
/// leftover of an interrupted write (a younger one may be a write in progress on another host).
pub const LEFTOVER_AGE: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone)]
pub struct Spool {
    pub root: PathBuf,
    pub incoming: PathBuf,
    pub tmp: PathBuf,
    pub active: PathBuf,
    pub outbox: PathBuf,
    pub rejected: PathBuf,
    /// The farm's host records, `hosts/<worker>.json` (one per daemon sharing the spool).
    pub hosts: PathBuf,
    /// Control drops (`control/cancel-*.json`): a `cancel ID` that reaches the holder of a job
    /// through the shared spool.
    pub control: PathBuf,
    pub worker: String,
}

/// A drop-zone name that a writer is still working on (or that is not ours to take).
pub fn ignored_name(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".part")
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
            hosts: root.join("hosts"),
            control: root.join("control"),
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
            &self.hosts,
            &self.control,
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

    /// Names in `active/<worker>/`: claimed files (not hidden) and kept bodies
    /// ([`inputs::is_kept_name`]).
    pub fn active_files(&self) -> Result<Vec<String>, SpoolError> {
        let mut names = list(&self.active)?;
        // Bodies kept for other sources have hidden names (no dropped file has one).
        if let Ok(rd) = std::fs::read_dir(&self.active) {
            names.extend(
                rd.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| inputs::is_kept_name(n)),
            );
        }
        names.sort();
        Ok(names)
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
        if meta.nlink() > 1 {
            return Ok(unreadable(name, &path, hard_link(meta.nlink())));
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
        let sha256 = crate::digest::sha256_hex(&bytes);
        Ok(Claimed {
            name: name.to_string(),
            path,
            bytes,
            sha256,
            unreadable: None,
        })
    }

    /// Moves `from` into `rejected/` (under a free name) with `<name>.reason` beside it.
    /// Returns the name it got there. Nothing in `rejected/` is ever replaced, even by another
    /// daemon rejecting a file of the same name at the same moment: the `.reason` name is taken
    /// first (without replace), then the file is renamed beside it (without replace).
    pub fn reject(&self, from: &Path, name: &str, reason: &str) -> Result<String, SpoolError> {
        let body = format!("{reason}\n");
        for n in 0..MAX_NUMBERED {
            let target = if n == 0 {
                name.to_string()
            } else {
                format!("{name}.{n}")
            };
            let to = self.rejected.join(&target);
            if to.symlink_metadata().is_ok() {
                continue;
            }
            let reason_path = self.rejected.join(format!("{target}.reason"));
            if !durable::write_new(&reason_path, body.as_bytes(), 0o644)? {
                continue;
            }
            match durable::rename_noreplace(from, &to) {
                Ok(true) => return Ok(target),
                Ok(false) => {
                    let _ = std::fs::remove_file(&reason_path);
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&reason_path);
                    return Err(e.into());
                }
            }
        }
        Err(SpoolError::NoFreeName {
            dir: self.rejected.clone(),
            name: name.to_string(),
        })
    }

    /// Moves `incoming/<raw>`, whose name is not UTF-8, unread into `rejected/` under a safe name
    /// (invalid bytes and control characters as `%NN`, never hidden), with the original name
    /// (escaped, `\xNN`) in its `.reason`. Returns the name used.
    pub fn reject_bad_name(&self, raw: &OsStr) -> Result<String, SpoolError> {
        let from = self.incoming.join(raw);
        let what = match from.symlink_metadata() {
            Ok(meta) => not_regular(&meta.file_type())
                .map(|why| format!(" (and it is {why})"))
                .unwrap_or_default(),
            Err(e) => return Err(DurableError::new("cannot reject", &from, e).into()),
        };
        let reason = format!("not a workitem: its name is not UTF-8{what}; the name was {raw:?}");
        self.reject(&from, &safe_name(raw), &reason)
    }

    /// Removes what interrupted writes left: hidden `*.tmp` files in `outbox/` and `tmp/` older
    /// than [`LEFTOVER_AGE`], and at any age this worker's own (tagged with its worker id by
    /// `durable::write_atomic_tagged`) in `outbox/` and every one in `active/<worker>/` (the
    /// temporary files of the liveness mark and of kept bodies: this worker is the only writer
    /// there, and its log's lock is ours). For the start of a daemon; returns the paths removed.
    pub fn remove_leftovers(&self) -> Vec<PathBuf> {
        let now = SystemTime::now();
        let mut removed = Vec::new();
        #[derive(PartialEq)]
        enum Dir {
            Outbox,
            Tmp,
            Active,
        }
        for (dir, which) in [
            (&self.outbox, Dir::Outbox),
            (&self.tmp, Dir::Tmp),
            (&self.hosts, Dir::Tmp),
            (&self.control, Dir::Tmp),
            (&self.active, Dir::Active),
        ] {
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in rd.flatten() {
                let raw = entry.file_name();
                let name = raw.to_string_lossy();
                if !name.starts_with('.') || !name.ends_with(".tmp") {
                    continue;
                }
                let path = entry.path();
                let Ok(meta) = path.symlink_metadata() else {
                    continue;
                };
                if !meta.file_type().is_file() {
                    continue;
                }
                let old = meta
                    .modified()
                    .ok()
                    .and_then(|m| now.duration_since(m).ok())
                    .is_some_and(|age| age >= LEFTOVER_AGE);
                let remove = match which {
                    Dir::Outbox => old || durable::is_tagged_temp(&name, &self.worker),
                    Dir::Tmp => old,
                    Dir::Active => true,
                };
                if !remove {
                    continue;
                }
                match std::fs::remove_file(&path) {
                    Ok(()) => removed.push(path),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => log::warn!("cannot remove leftover {}: {e}", path.display()),
                }
            }
        }
        removed
    }
}

/// The most numbered variants of a name tried before giving up.
const MAX_NUMBERED: u32 = 10_000;

/// A safe file name for a name that is not UTF-8: bytes that are not UTF-8, control characters
/// and `%` as `%NN`; a leading `.` gets a `_` before it; at most 200 bytes (room for `.<n>` and
/// `.reason`).
pub fn safe_name(raw: &OsStr) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for chunk in raw.as_bytes().utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() || c == '%' || c == '/' {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "%{b:02X}");
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "%{b:02X}");
        }
    }
    if out.len() > 200 {
        let mut end = 200;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    if out.is_empty() || out.starts_with('.') {
        out.insert(0, '_');
    }
    out
}

fn hard_link(nlink: u64) -> String {
    format!("a hard link (link count {nlink}): the file has other names")
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SpoolConfig;
    use std::ffi::OsString;

    /// A spool config for tests (also the scanner's).
    pub(crate) fn cfg(min_age_ms: u64) -> SpoolConfig {
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

    #[test]
    fn read_claimed_refuses_a_hard_link() {
        let d = tempfile::tempdir().unwrap();
        let sp = Spool::new(d.path(), "w1");
        sp.create_dirs().unwrap();
        std::fs::write(sp.incoming.join("a.json"), b"{}").unwrap();
        assert!(sp.claim("a.json").unwrap());
        std::fs::hard_link(sp.active.join("a.json"), d.path().join("other")).unwrap();
        let c = sp.read_claimed("a.json", 100).unwrap();
        assert!(c.bytes.is_empty());
        assert!(c.unreadable.unwrap().contains("hard link"));
    }

    #[test]
    fn bad_names_are_found_and_rejected_under_a_safe_name() {
        use std::os::unix::ffi::OsStringExt;
        let d = tempfile::tempdir().unwrap();
        let sp = Spool::new(d.path(), "w1");
        sp.create_dirs().unwrap();
        let raw = OsString::from_vec(b"a\xffb\n.json".to_vec());
        std::fs::write(sp.incoming.join(&raw), b"{}").unwrap();
        let hidden = OsString::from_vec(b".a\xff.json.tmp".to_vec());
        std::fs::write(sp.incoming.join(&hidden), b"{").unwrap();
        let mut s = Scanner::new(&cfg(0));
        let (ready, _) = s.scan(&sp.incoming).unwrap();
        assert_eq!(ready, vec![Ready::BadName(raw.clone())]);
        let got = sp.reject_bad_name(&raw).unwrap();
        assert_eq!(got, "a%FFb%0A.json");
        let reason = std::fs::read_to_string(sp.rejected.join(format!("{got}.reason"))).unwrap();
        assert!(reason.contains(r#""a\xFFb\n.json""#), "{reason}");
        assert_eq!(std::fs::read(sp.rejected.join(&got)).unwrap(), b"{}");
        // The same name again: a free name, nothing replaced.
        std::fs::write(sp.incoming.join(&raw), b"[]").unwrap();
        let got2 = sp.reject_bad_name(&raw).unwrap();
        assert_eq!(got2, "a%FFb%0A.json.1");
        assert_eq!(std::fs::read(sp.rejected.join(&got)).unwrap(), b"{}");
        assert_eq!(std::fs::read(sp.rejected.join(&got2)).unwrap(), b"[]");
        // A directory with such a name goes too.
        let dir = OsString::from_vec(b"d\xfe".to_vec());
        std::fs::create_dir(sp.incoming.join(&dir)).unwrap();
        assert_eq!(
            s.scan(&sp.incoming).unwrap().0,
            vec![Ready::BadName(dir.clone())]
        );
        let got3 = sp.reject_bad_name(&dir).unwrap();
        let reason = std::fs::read_to_string(sp.rejected.join(format!("{got3}.reason"))).unwrap();
        assert!(reason.contains("directory"), "{reason}");
        let left: Vec<_> = std::fs::read_dir(&sp.incoming).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "only the hidden temp file stays");
        let e = sp.reject_bad_name(&raw).unwrap_err();
        assert!(e.is_not_found(), "{e}");
    }

    #[test]
    fn safe_names() {
        use std::os::unix::ffi::OsStrExt;
        let n = |b: &[u8]| safe_name(OsStr::from_bytes(b));
        assert_eq!(n(b"plain\xc3\xa9.json"), "plainé.json");
        assert_eq!(n(b".\xff"), "_.%FF");
        assert_eq!(n(b"100%\xff"), "100%25%FF");
        assert_eq!(n(b"\xc2\x85x"), "%C2%85x");
        assert_eq!(n(b""), "_");
        assert!(n(&[0xffu8; 300]).len() <= 201);
    }

    #[test]
    fn reject_never_replaces() {
        let d = tempfile::tempdir().unwrap();
        let sp = Spool::new(d.path(), "w1");
        sp.create_dirs().unwrap();
        // A reason without its file (a crash between the two): its name stays taken.
        std::fs::write(sp.rejected.join("a.json.reason"), b"old\n").unwrap();
        std::fs::write(sp.incoming.join("a.json"), b"x").unwrap();
        let got = sp
            .reject(&sp.incoming.join("a.json"), "a.json", "why")
            .unwrap();
        assert_eq!(got, "a.json.1");
        assert_eq!(
            std::fs::read_to_string(sp.rejected.join("a.json.reason")).unwrap(),
            "old\n"
        );
        // A file gone before it is moved: an error, and no reason left behind.
        let e = sp
            .reject(&sp.incoming.join("gone.json"), "gone.json", "why")
            .unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert!(!sp.rejected.join("gone.json.reason").exists());
    }

    #[test]
    fn leftovers_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let sp = Spool::new(d.path(), "w1");
        sp.create_dirs().unwrap();
        let old = SystemTime::now() - Duration::from_secs(20 * 60);
        let put = |p: PathBuf, aged: bool| {
            std::fs::write(&p, b"x").unwrap();
            if aged {
                std::fs::File::options()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_modified(old)
                    .unwrap();
            }
            p
        };
        // This worker's interrupted outbox write, fresh: removed.
        durable::write_atomic_tagged(&sp.outbox.join("x.json"), b"{}", 0o644, "w1").unwrap();
        let own = put(sp.outbox.join(".a.json.12-3@w1.tmp"), false);
        let other = put(sp.outbox.join(".a.json.12-4@w2.tmp"), false);
        let other_old = put(sp.outbox.join(".b.json.12-5@w2.tmp"), true);
        let tmp_young = put(sp.tmp.join(".c.json.9-0.tmp"), false);
        let tmp_old = put(sp.tmp.join(".d.json.9-1.tmp"), true);
        let hidden_old = put(sp.outbox.join(".keep"), true);
        let answer_old = put(sp.outbox.join("e.json.tmp"), true);
        let alive_tmp = put(sp.active.join("..alive.7-0.tmp"), false);
        let kept_tmp = put(sp.active.join("..amqp-1-0.json.7-1.tmp"), false);
        let mut removed = sp.remove_leftovers();
        removed.sort();
        let mut want = vec![own, other_old, tmp_old, alive_tmp, kept_tmp];
        want.sort();
        assert_eq!(removed, want);
        for kept in [
            other,
            tmp_young,
            hidden_old,
            answer_old,
            sp.outbox.join("x.json"),
        ] {
            assert!(kept.exists(), "{}", kept.display());
        }
    }
}
