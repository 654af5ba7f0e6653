//! Builds: the job directory, the job log, running the image creator (natively, or in a KVM
//! guest), and turning what it left behind into the OUT fields.
//!
//! Invariant: every path a build writes is under `base_dir/prefix/dir_id`, whose parts were
//! validated by `workitem::normalise`, reached from base_dir without following a symlink that
//! was already there; a build's result is what mic really did (exit status and an image file on
//! disk that this attempt wrote, see [`Prepared::new_image`]), never assumed.

pub mod kvm;
pub mod logread;
pub mod mic;
pub mod native;

use crate::config::WorkerConfig;
use crate::journal::Mode;
use crate::process::Registry;
use crate::workitem::{Spec, Urls};
use crossbeam_channel::Receiver;
use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag, renameat};
use nix::sys::stat::{Mode as FileMode, SFlag, fchmod, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_encode};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How a build ended.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildEnd {
    Finished {
        result: bool,
        error: Option<String>,
        urls: Urls,
    },
    /// Cancelled through the cancel channel before it finished.
    Cancelled,
}

impl BuildEnd {
    fn failed(error: String, urls: Urls) -> BuildEnd {
        BuildEnd::Finished {
            result: false,
            error: Some(error),
            urls,
        }
    }
}

pub fn mode(w: &WorkerConfig) -> Mode {
    if w.use_kvm { Mode::Kvm } else { Mode::Native }
}

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
    }
}

/// Why a job directory could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct PrepareError {
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl PrepareError {
    /// The disk (or quota) is full: worth waiting for, not a reason to fail the job.
    pub fn is_no_space(&self) -> bool {
        matches!(
            self.source.raw_os_error(),
            Some(nix::libc::ENOSPC) | Some(nix::libc::EDQUOT)
        )
    }
}

/// One file as it was before mic ran: a file that is new, or whose identity, size or time
/// changed since, was written by this attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
}

/// A job directory ready for mic: opened (never through a symlink under base_dir), the
/// kickstart written, the job log started, and what the directory held before the build.
pub struct Prepared {
    dir: OwnedFd,
    path: PathBuf,
    ks: PathBuf,
    log: JobLog,
    /// The names (relative to the job directory) of the kickstart and the log: never the image.
    skip: [PathBuf; 2],
    before: HashMap<PathBuf, FileId>,
}

impl Prepared {
    /// `base_dir/prefix/dir_id`.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// The kickstart written for this attempt.
    pub fn ks(&self) -> &Path {
        &self.ks
    }

    pub fn log(&self) -> &JobLog {
        &self.log
    }

    /// The image this attempt wrote: the largest non-hidden regular file under the job
    /// directory (hidden directories not entered, symlinks not followed), other than the
    /// kickstart and the log, that is new or changed since `prepare`.
    pub fn new_image(&self) -> Option<PathBuf> {
        let now = snapshot(&self.dir);
        let mut best: Option<(i64, &PathBuf)> = None;
        for (rel, id) in &now {
            if self.skip.contains(rel) || self.before.get(rel) == Some(id) {
                continue;
            }
            let better = match best {
                None => true,
                Some((s, p)) => id.size > s || (id.size == s && rel < p),
            };
            if better {
                best = Some((id.size, rel));
            }
        }
        best.map(|(_, rel)| self.path.join(rel))
    }
}

/// Deepest directory level a snapshot looks into.
const SNAPSHOT_DEPTH: usize = 32;

/// Every non-hidden regular file under `dir` (hidden directories not entered, symlinks not
/// followed), by path relative to it.
fn snapshot(dir: &OwnedFd) -> HashMap<PathBuf, FileId> {
    let mut out = HashMap::new();
    if let Ok(d) = Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        FileMode::empty(),
    ) {
        walk(d, PathBuf::new(), 0, &mut out);
    }
    out
}

fn walk(mut d: Dir, rel: PathBuf, depth: usize, out: &mut HashMap<PathBuf, FileId>) {
    use std::os::fd::AsFd;
    // the entries are looked at through a second descriptor while the first one is read
    let Ok(fd) = d.as_fd().try_clone_to_owned() else {
        return;
    };
    let mut subdirs = Vec::new();
    for entry in d.iter().flatten() {
        let name = entry.file_name();
        let bytes = name.to_bytes();
        if bytes.is_empty() || bytes.starts_with(b".") {
            continue;
        }
        let Ok(st) = fstatat(&fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        let path = rel.join(OsStr::from_bytes(bytes));
        match st.st_mode & SFlag::S_IFMT.bits() {
            m if m == SFlag::S_IFDIR.bits() => subdirs.push((name.to_owned(), path)),
            m if m == SFlag::S_IFREG.bits() => {
                out.insert(
                    path,
                    FileId {
                        dev: st.st_dev,
                        ino: st.st_ino,
                        size: st.st_size,
                        mtime: (st.st_mtime, st.st_mtime_nsec),
                    },
                );
            }
            _ => {}
        }
    }
    if depth >= SNAPSHOT_DEPTH {
        return;
    }
    for (name, path) in subdirs {
        if let Ok(sub) = Dir::openat(
            &fd,
            name.as_c_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            FileMode::empty(),
        ) {
            walk(sub, path, depth + 1, out);
        }
    }
}

fn io(e: nix::errno::Errno) -> std::io::Error {
    std::io::Error::from(e)
}

/// Opens `base_dir/prefix/dir_id`, creating what is missing (mode 0775, as the original did),
/// one component at a time from base_dir: base_dir itself may be a symlink, nothing under it
/// is followed through one.
fn open_job_dir(w: &WorkerConfig, spec: &Spec) -> Result<OwnedFd, PrepareError> {
    let target = job_dir(w, spec);
    let fail = |source: std::io::Error| PrepareError {
        what: "cannot create job directory",
        path: target.clone(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o775)
        .create(&w.base_dir)
        .map_err(fail)?;
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut fd =
        nix::fcntl::open(&w.base_dir, dir_flags, FileMode::empty()).map_err(|e| fail(io(e)))?;
    let mut at = w.base_dir.clone();
    let rel = Path::new(&spec.prefix).join(&spec.dir_id);
    for comp in rel.components() {
        let Component::Normal(name) = comp else {
            return Err(fail(std::io::Error::other(format!(
                "{} is not a plain path under base_dir",
                rel.display()
            ))));
        };
        at.push(name);
        let created = match mkdirat(&fd, name, FileMode::from_bits_truncate(0o775)) {
            Ok(()) => true,
            Err(nix::errno::Errno::EEXIST) => false,
            Err(e) => return Err(fail(io(e))),
        };
        let next =
            match nix::fcntl::openat(&fd, name, dir_flags | OFlag::O_NOFOLLOW, FileMode::empty()) {
                Ok(next) => next,
                Err(e) => {
                    let is_link = fstatat(&fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits());
                    return Err(fail(if is_link {
                        std::io::Error::other(format!(
                            "{} is a symbolic link, and no path under base_dir is followed through \
                         one",
                            at.display()
                        ))
                    } else if e == nix::errno::Errno::ENOTDIR {
                        std::io::Error::other(format!("{} is not a directory", at.display()))
                    } else {
                        std::io::Error::other(format!("cannot open {}: {}", at.display(), e.desc()))
                    }));
                }
            };
        if created || at == target {
            fchmod(&next, FileMode::from_bits_truncate(0o775)).map_err(|e| fail(io(e)))?;
        }
        fd = next;
    }
    Ok(fd)
}

/// Writes `name` in `dir` (tmp + fsync + rename, relative to the directory, no symlink
/// followed), mode 0644.
fn write_in(dir: &OwnedFd, name: &str, data: &[u8]) -> std::io::Result<()> {
    let tmp = format!(".{name}.{}.tmp", std::process::id());
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mode = FileMode::from_bits_truncate(0o644);
    let fd = match nix::fcntl::openat(dir, tmp.as_str(), flags, mode) {
        Err(nix::errno::Errno::EEXIST) => {
            // a leftover of an interrupted attempt
            let _ = unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            nix::fcntl::openat(dir, tmp.as_str(), flags, mode).map_err(io)?
        }
        other => other.map_err(io)?,
    };
    let mut file = File::from(fd);
    let written = file
        .write_all(data)
        .and_then(|()| fchmod(&file, mode).map_err(io))
        .and_then(|()| file.sync_all())
        .and_then(|()| renameat(dir, tmp.as_str(), dir, name).map_err(io));
    if written.is_err() {
        let _ = unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    }
    written
}

/// Makes the job directory, writes the kickstart and starts the job log, before a build starts;
/// then notes what the directory holds, so that the image found after the build is one this
/// attempt wrote.
pub fn prepare(w: &WorkerConfig, spec: &Spec, attempt: u32) -> Result<Prepared, PrepareError> {
    let dir = open_job_dir(w, spec)?;
    let path = job_dir(w, spec);
    let ks_name = format!("{}.ks", spec.name);
    let log_name = format!("{}.log", spec.name);
    let ks = path.join(&ks_name);
    write_in(&dir, &ks_name, spec.kickstart.as_bytes()).map_err(|source| PrepareError {
        what: "cannot write the kickstart",
        path: ks.clone(),
        source,
    })?;
    let log_path = path.join(&log_name);
    let log_err = |source| PrepareError {
        what: "cannot write the job log",
        path: log_path.clone(),
        source,
    };
    let log =
        JobLog::open_in(&dir, &log_name, log_path.clone(), job_log_limit(w)).map_err(log_err)?;
    log.line(&format!(
        "build of {} ({} {} {}), attempt {attempt}, {:?} mode",
        spec.image_id,
        spec.name,
        spec.arch,
        spec.image_type,
        mode(w)
    ))
    .map_err(log_err)?;
    let before = snapshot(&dir);
    Ok(Prepared {
        dir,
        path,
        ks,
        log,
        skip: [PathBuf::from(ks_name), PathBuf::from(log_name)],
        before,
    })
}

/// The job log's bound in bytes (`job_log_max_mb`, at least 64 KiB).
fn job_log_limit(w: &WorkerConfig) -> u64 {
    w.job_log_max_mb.saturating_mul(1024 * 1024).max(64 * 1024)
}

/// Why mic cannot be run on this host (not found, not a file, not executable; sudo missing when
/// `sudo = true`), or None when it looks runnable. In KVM mode mic runs in the guest: None.
pub fn mic_missing(w: &WorkerConfig) -> Option<String> {
    if w.use_kvm {
        return None;
    }
    if w.sudo && find_on_path(Path::new("sudo")).is_none() {
        return Some("sudo not found on PATH (sudo = true)".into());
    }
    let mic = w.mic_path();
    let path = if mic.components().count() == 1 && !mic.is_absolute() {
        match find_on_path(&mic) {
            Some(p) => p,
            None => return Some(format!("{} not found on PATH", mic.display())),
        }
    } else {
        mic.clone()
    };
    match std::fs::metadata(&path) {
        Err(e) => Some(format!("{}: {e}", path.display())),
        Ok(m) if !m.is_file() => Some(format!("{} is not a file", path.display())),
        Ok(_) => nix::unistd::access(&path, nix::unistd::AccessFlags::X_OK)
            .err()
            .map(|e| format!("{} is not executable: {}", path.display(), e.desc())),
    }
}

/// A bare program name looked up on PATH, as `Command` does.
fn find_on_path(name: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Room for the marker line between the head and the tail of a bounded job log.
const MARKER_MAX: u64 = 80;

/// The job's log file: every command and its output, each step after a timestamped line.
///
/// Bounded: past its limit it keeps its head (the first half) and its tail (the last half), with
/// one marker line "[... N bytes of output omitted ...]" between them. Output is written
/// through (a `tail -f` sees it at once); when the file passes head + 2 * tail, the part after
/// the head is rewritten as the marker and the last `tail` bytes (each byte is copied O(1) times
/// on average). Clones share the file.
#[derive(Clone)]
pub struct JobLog(Arc<Mutex<LogFile>>);

struct LogFile {
    file: File,
    path: PathBuf,
    head: u64,
    tail: u64,
    len: u64,
    /// Where the kept output after the head (and the marker, once there is one) starts.
    body_start: u64,
    omitted: u64,
}

impl JobLog {
    /// Opens (creates, appends to) the log at `path`, not through a symlink.
    pub fn open(path: &Path, max_bytes: u64) -> std::io::Result<JobLog> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .mode(0o644)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(path)?;
        JobLog::from_file(file, path.to_path_buf(), max_bytes)
    }

    /// Opens (creates, appends to) the log `name` in `dir`, not through a symlink.
    fn open_in(
        dir: &OwnedFd,
        name: &str,
        path: PathBuf,
        max_bytes: u64,
    ) -> std::io::Result<JobLog> {
        let fd = nix::fcntl::openat(
            dir,
            name,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            FileMode::from_bits_truncate(0o644),
        )
        .map_err(io)?;
        JobLog::from_file(File::from(fd), path, max_bytes)
    }

    fn from_file(file: File, path: PathBuf, max_bytes: u64) -> std::io::Result<JobLog> {
        let len = file.metadata()?.len();
        let head = max_bytes / 2;
        let tail = max_bytes - head;
        let mut log = LogFile {
            file,
            path,
            head,
            tail,
            len,
            body_start: head,
            omitted: 0,
        };
        // An earlier attempt's marker, if the log was cut already.
        if len > head {
            let mut buf = [0u8; MARKER_MAX as usize];
            let n = log.file.read_at(&mut buf, head).unwrap_or(0);
            if let Some((omitted, marker_len)) = parse_marker(&buf[..n]) {
                log.omitted = omitted;
                log.body_start = head + marker_len;
            }
        }
        Ok(JobLog(Arc::new(Mutex::new(log))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogFile> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn path(&self) -> PathBuf {
        self.lock().path.clone()
    }

    /// A timestamped line.
    pub fn line(&self, text: &str) -> std::io::Result<()> {
        let line = format!("[{}] {text}\n", crate::journal::now_ts());
        self.lock().append(line.as_bytes())
    }

    /// A writer for a child's output (see [`crate::process::Output::Sink`]).
    pub fn sink(&self) -> Box<dyn Write + Send> {
        Box::new(LogSink(self.clone()))
    }

    /// The last `n` non-empty lines, for error messages: reads the end of the file only.
    pub fn tail(&self, n: usize) -> String {
        let log = self.lock();
        let start = log.len.saturating_sub(4096);
        let mut buf = vec![0u8; (log.len - start) as usize];
        let got = log.file.read_at(&mut buf, start).unwrap_or(0);
        buf.truncate(got);
        drop(log);
        let text = String::from_utf8_lossy(&buf);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(n)..].join(" | ")
    }
}

/// `[\n][... N bytes of output omitted ...]\n` at the start of `buf`: N and the marker's length.
fn parse_marker(buf: &[u8]) -> Option<(u64, u64)> {
    let lead = usize::from(buf.first() == Some(&b'\n'));
    let rest = buf.get(lead..)?;
    let rest = rest.strip_prefix(b"[... ")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let n: u64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let after = rest[digits..].strip_prefix(b" bytes of output omitted ...]\n")?;
    Some((n, (buf.len() - after.len()) as u64))
}

impl LogFile {
    fn append(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, self.len)?;
        self.len += data.len() as u64;
        if self.len > self.head + 2 * self.tail + MARKER_MAX {
            self.cut()?;
        }
        Ok(())
    }

    /// Replaces everything between the head and the last `tail` bytes with the marker line.
    fn cut(&mut self) -> std::io::Result<()> {
        let mut keep_from = self.len - self.tail;
        // start the kept tail on a line when one starts near
        let mut probe = [0u8; 4096];
        let n = self.file.read_at(&mut probe, keep_from)?;
        if let Some(i) = probe[..n].iter().position(|b| *b == b'\n') {
            keep_from += i as u64 + 1;
        }
        self.omitted += keep_from.saturating_sub(self.body_start);
        let mut last = [0u8; 1];
        let head_ends_line = self.head == 0
            || (self.file.read_at(&mut last, self.head - 1)? == 1 && last[0] == b'\n');
        let marker = format!(
            "{}[... {} bytes of output omitted ...]\n",
            if head_ends_line { "" } else { "\n" },
            self.omitted
        );
        let dst0 = self.head + marker.len() as u64;
        // dst0 + tail < keep_from: the copy never overlaps what it still has to read
        let mut buf = vec![0u8; 1 << 20];
        let (mut src, mut dst) = (keep_from, dst0);
        while src < self.len {
            let want = ((self.len - src) as usize).min(buf.len());
            let got = self.file.read_at(&mut buf[..want], src)?;
            if got == 0 {
                break;
            }
            self.file.write_all_at(&buf[..got], dst)?;
            src += got as u64;
            dst += got as u64;
        }
        self.file.write_all_at(marker.as_bytes(), self.head)?;
        self.file.set_len(dst)?;
        self.len = dst;
        self.body_start = dst0;
        Ok(())
    }
}

struct LogSink(JobLog);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().append(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs the build for `spec` with the configured mode, in the directory `prepare` made.
/// `cancel` stops it; every child is registered in `registry`.
pub fn build(
    w: &WorkerConfig,
    spec: &Spec,
    prepared: &Prepared,
    cancel: &Receiver<()>,
    registry: &Registry,
) -> BuildEnd {
    if w.use_kvm {
        kvm::build(w, spec, prepared, cancel, registry)
    } else {
        native::build(w, spec, prepared, cancel, registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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

    fn spec(prefix: &str, id: &str) -> Spec {
        Spec {
            image_id: id.into(),
            dir_id: id.into(),
            kickstart: "# ks\n".into(),
            image_type: "fs".into(),
            name: "n".into(),
            arch: "i586".into(),
            prefix: prefix.into(),
            release: None,
            tokenmap: None,
            extra_opts: vec![],
        }
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

    #[test]
    fn image_is_the_largest_visible_file_this_attempt_wrote() {
        let d = tempfile::tempdir().unwrap();
        let w = worker(d.path());
        let sp = spec("requests", "7-1");
        let dir = job_dir(&w, &sp);
        std::fs::create_dir_all(dir.join("old")).unwrap();
        // left by an earlier attempt: bigger, but not this attempt's
        std::fs::write(dir.join("old/big.img"), vec![0u8; 90_000]).unwrap();
        std::fs::write(dir.join("same.img"), vec![0u8; 10]).unwrap();
        let p = prepare(&w, &sp, 1).unwrap();
        assert_eq!(p.new_image(), None);
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o775);
        assert_eq!(std::fs::read_to_string(dir.join("n.ks")).unwrap(), "# ks\n");
        std::fs::create_dir_all(dir.join("rel/images/n")).unwrap();
        std::fs::create_dir_all(dir.join(".hidden")).unwrap();
        std::fs::write(dir.join("rel/images/n/n.img"), vec![0u8; 3000]).unwrap();
        std::fs::write(dir.join("rel/images/n/small"), vec![0u8; 30]).unwrap();
        std::fs::write(dir.join(".big"), vec![0u8; 9000]).unwrap();
        std::fs::write(dir.join(".hidden/x"), vec![0u8; 9000]).unwrap();
        p.log().line(&"x".repeat(5000)).unwrap();
        std::os::unix::fs::symlink(dir.join("old/big.img"), dir.join("link.img")).unwrap();
        assert_eq!(p.new_image(), Some(dir.join("rel/images/n/n.img")));
        // a file rewritten by this attempt counts
        std::fs::remove_file(dir.join("same.img")).unwrap();
        std::fs::write(dir.join("same.img"), vec![0u8; 5000]).unwrap();
        assert_eq!(p.new_image(), Some(dir.join("same.img")));
    }

    #[test]
    fn a_symlink_under_base_dir_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("images");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, base.join("queue")).unwrap();
        let w = worker(&base);
        let e = match prepare(&w, &spec("queue/user", "9-1"), 1) {
            Err(e) => e,
            Ok(_) => panic!("prepared through a symlink"),
        };
        assert!(!e.is_no_space());
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "{} is a symbolic link",
                base.join("queue").display()
            )),
            "{msg}"
        );
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "wrote outside"
        );

        // the job directory itself, and the log and kickstart inside a real one
        std::fs::create_dir_all(base.join("requests")).unwrap();
        std::os::unix::fs::symlink(&outside, base.join("requests/9-2")).unwrap();
        assert!(prepare(&w, &spec("requests", "9-2"), 1).is_err());
        std::fs::create_dir_all(base.join("requests/9-3")).unwrap();
        std::os::unix::fs::symlink(outside.join("stolen.log"), base.join("requests/9-3/n.log"))
            .unwrap();
        assert!(prepare(&w, &spec("requests", "9-3"), 1).is_err());
        std::fs::create_dir_all(base.join("requests/9-4")).unwrap();
        std::os::unix::fs::symlink(outside.join("stolen.ks"), base.join("requests/9-4/n.ks"))
            .unwrap();
        let p = prepare(&w, &spec("requests", "9-4"), 1).unwrap();
        // the kickstart replaced the link, it did not write through it
        assert!(
            !std::fs::symlink_metadata(p.ks())
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "wrote outside"
        );

        // base_dir itself may be a symlink
        let real = d.path().join("real");
        std::fs::create_dir_all(&real).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("base-link")).unwrap();
        let w = worker(&d.path().join("base-link"));
        prepare(&w, &spec("requests", "1-1"), 1).unwrap();
        assert!(real.join("requests/1-1/n.ks").is_file());
    }

    #[test]
    fn job_log_keeps_head_and_tail() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("n.log");
        let log = JobLog::open(&path, 64 * 1024).unwrap();
        log.line("first line").unwrap();
        let mut sink = log.sink();
        let mut total = 0u64;
        for i in 0..20_000 {
            let line = format!("output line {i:06} {}\n", "z".repeat(40));
            total += line.len() as u64;
            sink.write_all(line.as_bytes()).unwrap();
        }
        log.line("last line").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.len() as u64 <= 64 * 1024 * 2 + MARKER_MAX,
            "{}",
            text.len()
        );
        assert!(text.contains("] first line\n"));
        assert!(text.ends_with("] last line\n"));
        let markers: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("bytes of output omitted"))
            .collect();
        assert_eq!(markers.len(), 1, "{markers:?}");
        let omitted: u64 = markers[0]
            .trim_start_matches("[... ")
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(omitted > total / 2, "{omitted} of {total}");
        // the line after the marker is whole
        let after = text.split("output omitted ...]\n").nth(1).unwrap();
        assert!(after.starts_with("output line "), "{}", &after[..40]);
        assert_eq!(log.tail(1).split("] ").nth(1), Some("last line"));
        assert!(log.tail(2).starts_with("output line 019999"));

        // reopened (a retry): still one marker, the count goes on
        let again = JobLog::open(&path, 64 * 1024).unwrap();
        let mut sink = again.sink();
        for _ in 0..5_000 {
            sink.write_all(format!("more {}\n", "q".repeat(50)).as_bytes())
                .unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("bytes of output omitted").count(), 1);
        assert!(text.contains("] first line\n"));
    }

    #[test]
    fn mic_missing_says_why() {
        let d = tempfile::tempdir().unwrap();
        let mut w = WorkerConfig {
            sudo: false,
            mic_path: Some(d.path().join("mic")),
            ..WorkerConfig::default()
        };
        assert!(mic_missing(&w).unwrap().contains("No such file"));
        std::fs::write(d.path().join("mic"), "#!/bin/sh\n").unwrap();
        assert!(mic_missing(&w).unwrap().contains("not executable"));
        std::fs::set_permissions(
            d.path().join("mic"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        assert_eq!(mic_missing(&w), None);
        w.mic_path = Some("surely-no-such-mic".into());
        assert!(mic_missing(&w).unwrap().contains("not found on PATH"));
        w.use_kvm = true;
        assert_eq!(mic_missing(&w), None);
    }
}
