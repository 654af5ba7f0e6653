//! The spool: the drop zone `incoming/`, this worker's `active/<worker>/`, `outbox/`, `rejected/`.
//!
//! Invariant: a file is claimed by one `rename(2)` from `incoming/` into `active/<worker>/`, so
//! of several daemons sharing a spool exactly one gets it; a file is read only after it is
//! claimed, never through a symlink, never through a second name (a hard link), and never beyond
//! `max_bytes`. A name that is not UTF-8 is never read either: it is moved to `rejected/` under a
//! safe name.

use crate::config::SpoolConfig;
use crate::durable::{self, DurableError};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
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

/// The liveness mark a running daemon keeps refreshed in its `active/<worker>/`.
/// How often a daemon refreshes its liveness mark.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// A liveness mark not refreshed for this long belongs to a dead daemon.
pub const STALE_AFTER: Duration = Duration::from_secs(60);
pub const ALIVE: &str = ".alive";

/// How old a hidden `*.tmp` file in `outbox/` or `tmp/` must be before a start removes it as the
/// leftover of an interrupted write (a younger one may be a write in progress on another host).
pub const LEFTOVER_AGE: Duration = Duration::from_secs(15 * 60);

/// The shortest time a file with several names (link count > 1) is watched unchanged before it
/// is rejected as a hard link: a writer that cannot rename without replacing (NFS) links the file
/// into `incoming/` and then unlinks its temporary name, and another host's attribute cache may
/// show the old link count for a few seconds after that.
pub const HARD_LINK_HOLD: Duration = Duration::from_secs(10);

/// Is another daemon alive? See [`Spool::liveness`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// Its mark was refreshed recently; the detail says by whom and when.
    Alive(String),
    /// Its mark is stale, or names a process of this host that is not running.
    Dead(String),
    /// It keeps no mark (never started, stopped cleanly, or a version without marks).
    Unknown,
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
    /// Not a regular file, too big, or a hard link: reject it unread.
    Reject(String, String),
    /// A name that is not UTF-8: reject it unread with [`Spool::reject_bad_name`].
    BadName(OsString),
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

    /// Names in `active/<worker>/` (not hidden, but for the AMQP message bodies).
    pub fn active_files(&self) -> Result<Vec<String>, SpoolError> {
        let mut names = list(&self.active)?;
        // Message bodies of the AMQP participant have hidden names (no dropped file has one).
        if let Ok(rd) = std::fs::read_dir(&self.active) {
            names.extend(
                rd.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| crate::amqp::is_amqp_file(n)),
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
    /// `durable::write_atomic_tagged`) in `outbox/` and its liveness mark's temporary files in
    /// `active/<worker>/`. For the start of a daemon; returns the paths removed.
    pub fn remove_leftovers(&self) -> Vec<PathBuf> {
        let now = SystemTime::now();
        let mut removed = Vec::new();
        let alive_tmp = format!(".{ALIVE}.");
        #[derive(PartialEq)]
        enum Dir {
            Outbox,
            Tmp,
            Active,
        }
        for (dir, which) in [
            (&self.outbox, Dir::Outbox),
            (&self.tmp, Dir::Tmp),
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
                    Dir::Active => name.starts_with(&alive_tmp),
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

    /// Writes or refreshes this daemon's liveness mark `active/<worker>/.alive` (host name, pid,
    /// time), for `requeue --worker` on other hosts to see that it is alive.
    pub fn heartbeat(&self) -> Result<(), SpoolError> {
        let body = format!(
            "host={}\npid={}\ntime={}\n",
            host_name(),
            std::process::id(),
            humantime::format_rfc3339_seconds(SystemTime::now())
        );
        durable::write_atomic_unsynced(&self.active.join(ALIVE), body.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Removes the liveness mark (a clean stop).
    pub fn clear_heartbeat(&self) -> Result<(), SpoolError> {
        let path = self.active.join(ALIVE);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DurableError::new("cannot remove", &path, e).into()),
        }
    }

    /// Is `worker`'s daemon alive, by its liveness mark? `Alive` when the mark was refreshed
    /// within `stale_after`, except that a mark naming this host and a process that is not
    /// running is `Dead` at once; `Dead` when it is older; `Unknown` when there is no mark.
    pub fn liveness(&self, worker: &str, stale_after: Duration) -> Liveness {
        let path = self.root.join("active").join(worker).join(ALIVE);
        let Ok(meta) = path.symlink_metadata() else {
            return Liveness::Unknown;
        };
        let mut text = String::new();
        if let Ok(f) = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(&path)
        {
            let _ = f.take(4096).read_to_string(&mut text);
        }
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::trim)
                .unwrap_or("")
                .to_string()
        };
        let (host, pid) = (field("host"), field("pid"));
        let age = meta
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .unwrap_or_default();
        let detail = format!(
            "worker {worker}: host {}, pid {}, mark refreshed {} s ago",
            if host.is_empty() { "?" } else { &host },
            if pid.is_empty() { "?" } else { &pid },
            age.as_secs()
        );
        if !host.is_empty()
            && host == host_name()
            && let Ok(pid) = pid.parse::<i32>()
            && pid > 0
            && !process_running(pid)
        {
            return Liveness::Dead(format!("{detail}; that process is not running"));
        }
        if age <= stale_after {
            Liveness::Alive(detail)
        } else {
            Liveness::Dead(format!(
                "{detail}, more than {} s ago",
                stale_after.as_secs()
            ))
        }
    }
}

/// The most numbered variants of a name tried before giving up.
const MAX_NUMBERED: u32 = 10_000;

/// This host's name, as the liveness mark records it.
fn host_name() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Is a process with this pid running on this host (as far as `kill(pid, 0)` tells)?
fn process_running(pid: i32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e != nix::errno::Errno::ESRCH,
    }
}

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

/// What the scanner keeps of a file to tell whether it changed: size, mtime, link count, ctime.
type Stamp = (u64, i64, i64, u64, i64, i64);

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    (
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.nlink(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
}

/// Watches `incoming/` by repeated scans: decides which names are ready by the drop protocol.
/// Keeps, per name, the stamp seen and when it was first seen so.
pub struct Scanner {
    seen: HashMap<OsString, (Stamp, Instant)>,
    min_age: Duration,
    hard_link_hold: Duration,
    max_bytes: u64,
}

impl Scanner {
    pub fn new(cfg: &SpoolConfig) -> Scanner {
        let min_age = Duration::from_millis(cfg.min_age_ms);
        Scanner {
            seen: HashMap::new(),
            min_age,
            hard_link_hold: min_age.max(HARD_LINK_HOLD),
            max_bytes: cfg.max_bytes,
        }
    }

    /// Sets how long a file with several names must be seen unchanged before it is rejected as
    /// a hard link (default: `min_age`, at least [`HARD_LINK_HOLD`]).
    pub fn with_hard_link_hold(mut self, hold: Duration) -> Scanner {
        self.hard_link_hold = hold;
        self
    }

    /// One pass over `incoming/`. Returns what is ready, and when the next not-yet-stable file
    /// becomes due (so the caller can look again then rather than at the next poll).
    ///
    /// A regular file is ready when its stamp is unchanged for `min_age` (by the scanner's own
    /// observation, or by its mtime). A file with several names (link count > 1) may be a writer's
    /// link-then-unlink: it is rejected only once the scanner itself has seen it unchanged for the
    /// hard-link hold (its mtime says nothing about when it was linked).
    pub fn scan(&mut self, incoming: &Path) -> Result<(Vec<Ready>, Option<Duration>), SpoolError> {
        let rd = std::fs::read_dir(incoming).map_err(|source| SpoolError::Scan {
            path: incoming.to_path_buf(),
            source,
        })?;
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut ready = Vec::new();
        let mut next_due: Option<Duration> = None;
        let mut due = |d: Duration| next_due = Some(next_due.map_or(d, |n: Duration| n.min(d)));
        let mut present = std::collections::HashSet::new();
        for entry in rd.flatten() {
            let raw = entry.file_name();
            if ignored_name(&raw.to_string_lossy()) {
                continue;
            }
            let utf8 = raw.to_str().map(str::to_string);
            let reject = |why: String| match &utf8 {
                Some(name) => Ready::Reject(name.clone(), why),
                None => Ready::BadName(raw.clone()),
            };
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if let Some(why) = not_regular(&meta.file_type()) {
                ready.push(reject(why));
                continue;
            }
            if meta.len() > self.max_bytes {
                ready.push(reject(too_big(meta.len(), self.max_bytes)));
                continue;
            }
            present.insert(raw.clone());
            let key = stamp(&meta);
            let first = match self.seen.get(&raw) {
                Some(&(k, t)) if k == key => t,
                _ => {
                    self.seen.insert(raw.clone(), (key, now));
                    now
                }
            };
            let observed = now.duration_since(first);
            if meta.nlink() > 1 {
                if observed >= self.hard_link_hold {
                    ready.push(reject(hard_link(meta.nlink())));
                } else {
                    due(self.hard_link_hold - observed);
                }
                continue;
            }
            let age = meta
                .modified()
                .ok()
                .and_then(|m| wall.duration_since(m).ok())
                .unwrap_or_default();
            if age >= self.min_age || observed >= self.min_age {
                ready.push(match utf8 {
                    Some(name) => Ready::File(name),
                    None => Ready::BadName(raw),
                });
            } else {
                due(self.min_age - observed.max(age));
            }
        }
        self.seen.retain(|n, _| present.contains(n));
        Ok((ready, next_due))
    }

    /// Forgets a name (it was claimed or rejected).
    pub fn forget(&mut self, name: impl AsRef<OsStr>) {
        self.seen.remove(name.as_ref());
    }
}

/// Opens nothing; checks a single name just announced by inotify as renamed into place. `None`
/// for a name to ignore, and for a file with several names (the next scan decides on it).
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
    if meta.nlink() > 1 {
        return None;
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

    /// Scans until something is ready (or a generous deadline passes).
    fn scan_until_ready(s: &mut Scanner, dir: &Path) -> Vec<Ready> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (ready, due) = s.scan(dir).unwrap();
            if !ready.is_empty() || Instant::now() >= deadline {
                return ready;
            }
            std::thread::sleep(due.unwrap_or(Duration::from_millis(10)));
        }
    }

    #[test]
    fn hard_link_waits_then_is_rejected() {
        let d = tempfile::tempdir().unwrap();
        let inc = d.path().join("incoming");
        std::fs::create_dir(&inc).unwrap();
        std::fs::write(d.path().join("orig"), b"{}").unwrap();
        std::fs::hard_link(d.path().join("orig"), inc.join("a.json")).unwrap();
        let mut s = Scanner::new(&cfg(0)).with_hard_link_hold(Duration::from_millis(50));
        let (ready, due) = s.scan(&inc).unwrap();
        assert!(ready.is_empty(), "not at first sight: {ready:?}");
        assert!(due.is_some());
        let ready = scan_until_ready(&mut s, &inc);
        assert_eq!(ready.len(), 1);
        let Ready::Reject(name, why) = &ready[0] else {
            panic!("{ready:?}")
        };
        assert_eq!(name, "a.json");
        assert!(why.contains("hard link"), "{why}");
        assert!(moved_in_ready(&inc, "a.json", 100).is_none());
    }

    #[test]
    fn default_hard_link_hold_is_not_shorter_than_min_age() {
        let s = Scanner::new(&cfg(0));
        assert_eq!(s.hard_link_hold, HARD_LINK_HOLD);
        let s = Scanner::new(&cfg(60_000));
        assert_eq!(s.hard_link_hold, Duration::from_secs(60));
    }

    #[test]
    fn link_then_unlink_writer_is_claimed_not_rejected() {
        let d = tempfile::tempdir().unwrap();
        let inc = d.path().join("incoming");
        std::fs::create_dir(&inc).unwrap();
        let tmp = d.path().join(".a.tmp");
        std::fs::write(&tmp, b"{}").unwrap();
        std::fs::hard_link(&tmp, inc.join("a.json")).unwrap();
        let mut s = Scanner::new(&cfg(0)).with_hard_link_hold(Duration::from_secs(3600));
        assert!(s.scan(&inc).unwrap().0.is_empty());
        std::fs::remove_file(&tmp).unwrap();
        assert_eq!(s.scan(&inc).unwrap().0, vec![Ready::File("a.json".into())]);
        assert_eq!(
            moved_in_ready(&inc, "a.json", 100),
            Some(Ready::File("a.json".into()))
        );
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
        let mut removed = sp.remove_leftovers();
        removed.sort();
        let mut want = vec![own, other_old, tmp_old, alive_tmp];
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

    #[test]
    fn heartbeat_and_liveness() {
        let d = tempfile::tempdir().unwrap();
        let sp = Spool::new(d.path(), "w1");
        sp.create_dirs().unwrap();
        let hour = Duration::from_secs(3600);
        assert_eq!(sp.liveness("w1", hour), Liveness::Unknown);
        assert_eq!(sp.liveness("nobody", hour), Liveness::Unknown);
        sp.heartbeat().unwrap();
        sp.heartbeat().unwrap();
        match sp.liveness("w1", hour) {
            Liveness::Alive(detail) => {
                assert!(detail.contains(&std::process::id().to_string()), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        assert!(
            sp.active_files().unwrap().is_empty(),
            "the mark is no claimed file"
        );
        assert_eq!(
            std::fs::read_dir(&sp.active).unwrap().count(),
            1,
            "no temporary file left"
        );
        // Stale: not refreshed within stale_after.
        let mark = sp.active.join(ALIVE);
        std::fs::File::options()
            .write(true)
            .open(&mark)
            .unwrap()
            .set_modified(SystemTime::now() - 2 * hour)
            .unwrap();
        assert!(matches!(sp.liveness("w1", hour), Liveness::Dead(_)));
        assert!(matches!(sp.liveness("w1", 3 * hour), Liveness::Alive(_)));
        sp.clear_heartbeat().unwrap();
        sp.clear_heartbeat().unwrap();
        assert_eq!(sp.liveness("w1", hour), Liveness::Unknown);
    }

    #[test]
    fn a_mark_of_this_host_naming_a_gone_process_is_dead_at_once() {
        let d = tempfile::tempdir().unwrap();
        let sp = Spool::new(d.path(), "w2");
        sp.create_dirs().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        std::fs::write(
            sp.active.join(ALIVE),
            format!("host={}\npid={pid}\ntime=now\n", host_name()),
        )
        .unwrap();
        let hour = Duration::from_secs(3600);
        match sp.liveness("w2", hour) {
            Liveness::Dead(detail) => assert!(detail.contains("not running"), "{detail}"),
            other => panic!("{other:?}"),
        }
        // Another host's mark: only its age counts.
        std::fs::write(
            sp.active.join(ALIVE),
            format!("host=elsewhere.invalid\npid={pid}\n"),
        )
        .unwrap();
        assert!(matches!(sp.liveness("w2", hour), Liveness::Alive(_)));
    }
}
