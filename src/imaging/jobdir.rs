//! The job directory of one attempt: made (or opened) under base_dir, the kickstart written,
//! the job log started ([`prepare`]), and after the build the image this attempt wrote
//! ([`Prepared::new_image`]) and the files of the build hashed, `SHA256SUMS` written
//! ([`Prepared::seal`]).
//!
//! Invariant: every path written is under `base_dir/prefix/dir_id`, whose parts were validated
//! by `workitem::normalise`, reached from base_dir one component at a time without following a
//! symlink that was already there; the image is a file that is new or changed since `prepare`,
//! never one an earlier attempt left.

use super::joblog::job_log_limit;
use super::place::{Place, Release};
use super::{JobLog, job_dir, mode};
use crate::artifacts::provenance::{self, PROVENANCE_FILE, Repo};
use crate::artifacts::sums::{self, FileSum};
use crate::config::WorkerConfig;
use crate::domain::workitem::Spec;
use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag, renameat};
use nix::sys::stat::{Mode as FileMode, SFlag, fchmod, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

/// KVM: the guest's serial console, kept in the job folder (never taken for the image).
pub const CONSOLE_LOG: &str = "console.log";

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
    /// The names (relative to the job directory) of the kickstart, the log, the console,
    /// `SHA256SUMS` and the provenance files: never the image, never a file of the build.
    skip: [PathBuf; 6],
    /// The kickstart's sha256 and its repos (tokenmap applied), taken from the text written.
    ks_sha256: String,
    repos: Vec<Repo>,
    /// What [`Prepared::seal`] hashed.
    sealed: std::sync::Mutex<Option<Sealed>>,
    before: HashMap<PathBuf, FileId>,
    place: Place,
    /// KVM: seconds the guest took to answer ssh (noted by the builder).
    boot: std::sync::Mutex<Option<f64>>,
    /// KVM: what the guest's `mic --version` printed (noted by the builder).
    mic_version: std::sync::Mutex<Option<String>>,
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

    /// Notes how long the build's guest took to boot (KVM).
    pub fn note_boot(&self, seconds: f64) {
        *self.boot.lock().unwrap_or_else(|p| p.into_inner()) = Some(seconds);
    }

    /// How long the build's guest took to boot, if it booted one.
    pub fn boot_seconds(&self) -> Option<f64> {
        *self.boot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes what the build's mic said of its version (KVM: the guest's).
    pub fn note_mic_version(&self, line: &str) {
        *self.mic_version.lock().unwrap_or_else(|p| p.into_inner()) = Some(line.to_string());
    }

    /// What [`Prepared::note_mic_version`] noted.
    pub fn mic_version(&self) -> Option<String> {
        self.mic_version
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The build's place (its temp dir, cgroup or marker).
    pub fn place(&self) -> &Place {
        &self.place
    }

    /// Releases the build's place after the build, whatever its end: each thing freed, and each
    /// thing that could not be, is a line of the job log.
    pub fn release(self) -> Release {
        let r = self.place.release();
        for line in &r.freed {
            let _ = self.log.line(&format!("released: {line}"));
        }
        for l in &r.leaked {
            let _ = self.log.line(&format!("leaked: {}: {}", l.what, l.why));
        }
        if r.freed.is_empty() && r.leaked.is_empty() {
            let _ = self.log.line("released: nothing was left");
        }
        r
    }

    /// The image this attempt wrote: the largest of [`Prepared::build_files`] (the first by
    /// path among equals).
    pub fn new_image(&self) -> Option<PathBuf> {
        let mut best: Option<(i64, PathBuf)> = None;
        for (rel, size) in self.build_files() {
            let better = match &best {
                None => true,
                Some((s, p)) => size > *s || (size == *s && rel < *p),
            };
            if better {
                best = Some((size, rel));
            }
        }
        best.map(|(_, rel)| self.path.join(rel))
    }

    /// The files this attempt wrote, by path relative to the job directory, with their sizes:
    /// every non-hidden regular file under it (hidden directories not entered, symlinks not
    /// followed), other than the kickstart, the log, the console and `SHA256SUMS`, that is new
    /// or changed since `prepare`.
    pub fn build_files(&self) -> Vec<(PathBuf, i64)> {
        let mut files: Vec<(PathBuf, i64)> = snapshot(&self.dir)
            .into_iter()
            .filter(|(rel, id)| !self.skip.contains(rel) && self.before.get(rel) != Some(id))
            .map(|(rel, id)| (rel, id.size))
            .collect();
        files.sort();
        files
    }

    /// Hashes every file of [`Prepared::build_files`] once and writes `SHA256SUMS` listing them
    /// (tmp, fsync, rename); `image` (a path under the job directory, one of those files) is
    /// the image whose sha256 the answer carries.
    pub fn seal(&self, image: &Path) -> Result<Sealed, String> {
        let image_rel = image
            .strip_prefix(&self.path)
            .map_err(|_| format!("the image {} is not in the job directory", image.display()))?
            .to_path_buf();
        let mut files = Vec::new();
        for (rel, _) in self.build_files() {
            let fd = open_beneath(&self.dir, &rel).map_err(|e| {
                format!(
                    "cannot open {} to hash it: {e}",
                    self.path.join(&rel).display()
                )
            })?;
            let (sha256, bytes) = sums::hash_reader(File::from(fd)).map_err(|e| {
                format!(
                    "cannot read {} to hash it: {e}",
                    self.path.join(&rel).display()
                )
            })?;
            files.push(FileSum {
                path: rel,
                sha256,
                bytes,
            });
        }
        let image_sha256 = files
            .iter()
            .find(|f| f.path == image_rel)
            .map(|f| f.sha256.clone())
            .ok_or_else(|| format!("the image {} is gone", image.display()))?;
        write_in(&self.dir, sums::SUMS_FILE, &sums::render(&files), true).map_err(|e| {
            format!(
                "cannot write {}: {e}",
                self.path.join(sums::SUMS_FILE).display()
            )
        })?;
        let _ = self.log.line(&format!(
            "{}: {} file(s), image {} sha256 {image_sha256}",
            sums::SUMS_FILE,
            files.len(),
            image_rel.display()
        ));
        let sealed = Sealed {
            image: image.to_path_buf(),
            image_sha256,
            files,
        };
        *self.sealed.lock().unwrap_or_else(|p| p.into_inner()) = Some(sealed.clone());
        Ok(sealed)
    }

    /// What [`Prepared::seal`] hashed, if the build got that far.
    pub fn sealed(&self) -> Option<Sealed> {
        self.sealed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The kickstart's file name in the job folder and its sha256.
    pub fn kickstart_sha256(&self) -> (String, String) {
        let name = self.skip[0].to_string_lossy().into_owned();
        (name, self.ks_sha256.clone())
    }

    /// The kickstart's `repo --baseurl`s, tokenmap applied.
    pub fn repos(&self) -> &[Repo] {
        &self.repos
    }

    /// The package list mic wrote (`<name>.packages`, with `--record-pkgs=name`) among the
    /// sealed files, read (it is small; at most 64 MiB is taken).
    pub fn packages(&self, name: &str) -> Result<Option<provenance::Packages>, String> {
        let want = format!("{name}.packages");
        let Some(file) = self.sealed().and_then(|s| {
            s.files
                .into_iter()
                .filter(|f| f.path.file_name().is_some_and(|n| n == want.as_str()))
                .min_by_key(|f| f.path.components().count())
        }) else {
            return Ok(None);
        };
        let shown = self.path.join(&file.path);
        let fd = open_beneath(&self.dir, &file.path)
            .map_err(|e| format!("cannot open {}: {e}", shown.display()))?;
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(File::from(fd), 64 << 20),
            &mut text,
        )
        .map_err(|e| format!("cannot read {}: {e}", shown.display()))?;
        Ok(Some(provenance::Packages {
            packages: provenance::package_lines(&text),
            file,
        }))
    }

    /// Removes `name` from the job directory (a file that is not there is no error).
    pub fn remove_file(&self, name: &str) -> Result<(), String> {
        match unlinkat(&self.dir, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
            Err(e) => Err(format!(
                "cannot remove {}: {}",
                self.path.join(name).display(),
                e.desc()
            )),
        }
    }

    /// Writes `name` in the job directory (tmp + fsync + rename); its path.
    pub fn write_file(&self, name: &str, data: &[u8]) -> Result<PathBuf, String> {
        let path = self.path.join(name);
        write_in(&self.dir, name, data, true)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    }
}

/// A build's files once hashed: the image, its sha256, and every file `SHA256SUMS` lists.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub image: PathBuf,
    pub image_sha256: String,
    pub files: Vec<FileSum>,
}

/// Opens `rel` under `dir` for reading, without following a symlink anywhere on the way
/// (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`; where the kernel has no `openat2`,
/// `openat` with `O_NOFOLLOW`, which refuses a symlink as the last component).
fn open_beneath(dir: &OwnedFd, rel: &Path) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{OpenHow, ResolveFlag, openat2};
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    match openat2(dir, rel, how) {
        Err(nix::errno::Errno::ENOSYS) => {
            nix::fcntl::openat(dir, rel, flags, FileMode::empty()).map_err(io)
        }
        other => other.map_err(io),
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
/// followed), mode 0644. Without `sync`, tmp + rename only: for files written again before
/// they are used after a crash (a reader still sees the old or the new file, never half).
fn write_in(dir: &OwnedFd, name: &str, data: &[u8], sync: bool) -> std::io::Result<()> {
    // pid and a count: two writes of one process (two threads) never share a temp file
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = format!(".{name}.{}.{n}.tmp", std::process::id());
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
        .and_then(|()| if sync { file.sync_all() } else { Ok(()) })
        .and_then(|()| renameat(dir, tmp.as_str(), dir, name).map_err(io));
    if written.is_err() {
        let _ = unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    }
    written
}

/// Who holds a job folder: the `.owner` file in it (worker, job, sha256 of the input).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    pub worker: String,
    pub job: u64,
    pub sha256: String,
}

/// The owner file's name in a job folder.
pub const OWNER_FILE: &str = ".owner";

/// How a claim of a job folder went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FolderClaim {
    /// This worker holds it (claimed now, or before: recovery, a retry).
    Ours,
    /// Another worker holds it (hosts sharing `base_dir`).
    Held(Owner),
}

/// Claims a job's folder farm-wide, for hosts that share `base_dir`: makes the folder (as a
/// build does: no symlink followed), writes an owner file whole (fsynced) under a name of its
/// own, and links it to `.owner`: a link is exclusive (it fails when `.owner` exists, also over
/// NFSv3+) and the file is whole when it appears. A folder whose `.owner` names this worker is
/// this worker's; one naming another worker is held by it. A folder without `.owner` (made by a
/// version before this one, or by a build on this host) is claimed like a new one.
pub fn claim_folder(
    w: &WorkerConfig,
    spec: &Spec,
    me: &Owner,
) -> Result<FolderClaim, PrepareError> {
    let dir = open_job_dir(w, spec)?;
    let path = job_dir(w, spec).join(OWNER_FILE);
    let fail = |what: &'static str| {
        let path = path.clone();
        move |e: nix::errno::Errno| PrepareError {
            what,
            path,
            source: io(e),
        }
    };
    let tmp = format!(".owner.{}.{}.{}.tmp", me.worker, std::process::id(), me.job);
    let body = serde_json::to_vec(me).unwrap_or_default();
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::openat(
        &dir,
        tmp.as_str(),
        flags,
        FileMode::from_bits_truncate(0o644),
    )
    .map_err(fail("cannot write the owner file of"))?;
    let mut file = File::from(fd);
    file.write_all(&body)
        .and_then(|()| file.sync_all())
        .map_err(|source| PrepareError {
            what: "cannot write the owner file of",
            path: path.clone(),
            source,
        })?;
    drop(file);
    let linked = nix::unistd::linkat(&dir, tmp.as_str(), &dir, OWNER_FILE, AtFlags::empty());
    let _ = unlinkat(&dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    match linked {
        // The link itself is not fsynced: a claim a crash undoes belongs to a job whose claim
        // was not flushed either (its source sends it again, and it is claimed again).
        Ok(()) => Ok(FolderClaim::Ours),
        Err(nix::errno::Errno::EEXIST) => {
            let fd = nix::fcntl::openat(
                &dir,
                OWNER_FILE,
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                FileMode::empty(),
            )
            .map_err(fail("cannot read the owner file of"))?;
            let mut text = Vec::new();
            std::io::Read::read_to_end(&mut File::from(fd), &mut text).map_err(|source| {
                PrepareError {
                    what: "cannot read the owner file of",
                    path: path.clone(),
                    source,
                }
            })?;
            let owner: Owner = serde_json::from_slice(&text).unwrap_or_else(|_| Owner {
                worker: "an unknown worker (its .owner is not readable)".into(),
                job: 0,
                sha256: String::new(),
            });
            Ok(if owner.worker == me.worker {
                FolderClaim::Ours
            } else {
                FolderClaim::Held(owner)
            })
        }
        Err(e) => Err(fail("cannot claim the job folder (link .owner) of")(e)),
    }
}

/// Lets go of `worker`'s claim of a job folder (a dead worker's job handed to the farm again by
/// `requeue --worker`): its `.owner` is removed when it names `worker`. True when one was.
pub fn release_folder(w: &WorkerConfig, spec: &Spec, worker: &str) -> std::io::Result<bool> {
    let path = job_dir(w, spec).join(OWNER_FILE);
    match path.symlink_metadata() {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    let owner: Option<Owner> = serde_json::from_slice(&std::fs::read(&path)?).ok();
    if owner.is_some_and(|o| o.worker == worker) {
        std::fs::remove_file(&path)?;
        return Ok(true);
    }
    Ok(false)
}

/// Lets go of this worker's claim of the folder of a job that was never built (cancelled while
/// queued): `.owner` removed, and the folder if it is then empty (its parents stay). Failures
/// are logged: a folder left behind holds nothing but the claim.
pub fn release_unbuilt(w: &WorkerConfig, spec: &Spec, worker: &str) {
    match release_folder(w, spec, worker) {
        Ok(true) => {
            let _ = std::fs::remove_dir(job_dir(w, spec));
        }
        Ok(false) => {}
        Err(e) => log::warn!(
            "cannot let go of the job folder {}: {e}",
            job_dir(w, spec).display()
        ),
    }
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
    // Not fsynced: written again from the log's input before every build attempt, so a crash
    // costs a rewrite (issue 21).
    write_in(&dir, &ks_name, spec.kickstart.as_bytes(), false).map_err(|source| PrepareError {
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
    let label = format!("{}-{attempt}", spec.dir_id);
    let place = Place::open(w, &path, &label).map_err(|source| PrepareError {
        what: "cannot make the build's place in",
        path: path.clone(),
        source,
    })?;
    log.line(&place.describe()).map_err(log_err)?;
    let before = snapshot(&dir);
    Ok(Prepared {
        dir,
        path,
        ks,
        log,
        skip: [
            PathBuf::from(ks_name),
            PathBuf::from(log_name),
            PathBuf::from(CONSOLE_LOG),
            PathBuf::from(sums::SUMS_FILE),
            PathBuf::from(PROVENANCE_FILE),
            PathBuf::from(crate::artifacts::dsse::ENVELOPE_FILE),
        ],
        ks_sha256: crate::digest::sha256_hex(spec.kickstart.as_bytes()),
        repos: provenance::repos(&spec.kickstart, spec.tokenmap.as_deref()),
        sealed: std::sync::Mutex::new(None),
        before,
        place,
        boot: std::sync::Mutex::new(None),
        mic_version: std::sync::Mutex::new(None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
    fn a_job_folder_is_claimed_once_in_the_farm() {
        let d = tempfile::tempdir().unwrap();
        let w = worker(d.path());
        let sp = spec("requests", "x-1");
        let owner = |worker: &str, job| Owner {
            worker: worker.into(),
            job,
            sha256: "s".into(),
        };
        assert_eq!(
            claim_folder(&w, &sp, &owner("w1", 3)).unwrap(),
            FolderClaim::Ours
        );
        assert_eq!(
            claim_folder(&w, &sp, &owner("w2", 9)).unwrap(),
            FolderClaim::Held(owner("w1", 3))
        );
        assert_eq!(
            claim_folder(&w, &sp, &owner("w1", 4)).unwrap(),
            FolderClaim::Ours,
            "this worker's (a retry, recovery)"
        );
        let names: Vec<String> = std::fs::read_dir(job_dir(&w, &sp))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec![OWNER_FILE.to_string()],
            "no temporary file left"
        );
        // A dead worker's claim let go (requeue --worker): another worker claims it.
        assert!(!release_folder(&w, &sp, "w2").unwrap(), "not w2's");
        assert!(release_folder(&w, &sp, "w1").unwrap());
        assert_eq!(
            claim_folder(&w, &sp, &owner("w2", 9)).unwrap(),
            FolderClaim::Ours
        );
        // A folder made by an older version (no owner file) is claimed like a new one.
        let old = spec("requests", "x-2");
        std::fs::create_dir_all(job_dir(&w, &old)).unwrap();
        assert_eq!(
            claim_folder(&w, &old, &owner("w2", 1)).unwrap(),
            FolderClaim::Ours
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
}
