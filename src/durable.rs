//! Durable file operations: writes go to a hidden temporary file beside the target, are fsynced,
//! renamed over the target, and the directory is fsynced; moves are renames plus a directory
//! fsync. A reader never sees a half-written file, and a crash leaves the old or the new file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;

#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct DurableError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl DurableError {
    pub fn new(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        DurableError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    /// Was a file or folder missing?
    pub fn is_not_found(&self) -> bool {
        self.source.kind() == std::io::ErrorKind::NotFound
    }

    /// Did the disk fill up?
    pub fn is_no_space(&self) -> bool {
        self.source.raw_os_error() == Some(nix::libc::ENOSPC)
    }
}

/// Writes `bytes` to `path` atomically and durably, with file mode `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DurableError> {
    write_replacing(path, bytes, mode, true, None)
}

/// Like [`write_atomic`], but the hidden temporary file's name carries `tag` (the worker id), so
/// that a leftover of an interrupted write can be told apart as this writer's own
/// ([`is_tagged_temp`]) and removed at the next start whatever its age.
pub fn write_atomic_tagged(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    tag: &str,
) -> Result<(), DurableError> {
    write_replacing(path, bytes, mode, true, Some(tag))
}

/// Writes `bytes` to `path` atomically (tmp + rename: a reader sees the old or the new file,
/// never half of one) but without the fsyncs: only for files derived from the event log and
/// written again from it before they are used after a crash (the kickstart of a build).
pub fn write_atomic_unsynced(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DurableError> {
    write_replacing(path, bytes, mode, false, None)
}

/// Writes `bytes` to `path` durably unless `path` exists: `Ok(false)` (nothing written) when it
/// does. The file appears whole or not at all (tmp + fsync + rename without replace).
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<bool, DurableError> {
    let tmp = temp_path(path, None);
    let result = (|| {
        write_file(&tmp, bytes, mode, true)?;
        rename_noreplace(&tmp, path)
    })();
    if !matches!(result, Ok(true)) {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Only these characters of a tag go into a temporary file's name.
fn clean_tag(tag: &str) -> String {
    tag.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The most bytes of the target's name kept in a temporary file's name (a name near the 255-byte
/// limit must still get a temporary file).
const TEMP_NAME_KEEP: usize = 100;

/// A hidden temporary name beside `path`, unique within this process and across processes:
/// `.<name>.<pid>-<n>.tmp`, or `.<name>.<pid>-<n>@<tag>.tmp` with a tag.
pub fn temp_path(path: &Path, tag: Option<&str>) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.len() > TEMP_NAME_KEEP {
        let mut end = TEMP_NAME_KEEP;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    match tag {
        Some(t) => dir.join(format!(".{name}.{pid}-{n}@{}.tmp", clean_tag(t))),
        None => dir.join(format!(".{name}.{pid}-{n}.tmp")),
    }
}

/// Is `name` the temporary file of a write made with [`write_atomic_tagged`] and this `tag`?
pub fn is_tagged_temp(name: &str, tag: &str) -> bool {
    name.starts_with('.') && name.ends_with(&format!("@{}.tmp", clean_tag(tag)))
}

/// Creates `path` (which must not exist) with `bytes`, fsynced when `sync`.
fn write_file(path: &Path, bytes: &[u8], mode: u32, sync: bool) -> Result<(), DurableError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| DurableError::new("cannot create", path, e))?;
    f.write_all(bytes)
        .map_err(|e| DurableError::new("cannot write", path, e))?;
    if sync {
        f.sync_all()
            .map_err(|e| DurableError::new("cannot fsync", path, e))?;
    }
    Ok(())
}

fn write_replacing(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    sync: bool,
    tag: Option<&str>,
) -> Result<(), DurableError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_path(path, tag);
    let result = (|| {
        write_file(&tmp, bytes, mode, sync)?;
        std::fs::rename(&tmp, path)
            .map_err(|e| DurableError::new("cannot rename into", path, e))?;
        if sync {
            sync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Renames `from` to `to` and makes the rename durable.
pub fn rename(from: &Path, to: &Path) -> Result<(), DurableError> {
    std::fs::rename(from, to).map_err(|e| DurableError::new("cannot rename", from, e))?;
    sync_both(from, to)
}

/// fsyncs the folder of `to`, and that of `from` when it is another one.
fn sync_both(from: &Path, to: &Path) -> Result<(), DurableError> {
    if let Some(dir) = to.parent() {
        sync_dir(non_empty(dir))?;
    }
    if let Some(dir) = from.parent()
        && Some(dir) != to.parent()
    {
        sync_dir(non_empty(dir))?;
    }
    Ok(())
}

/// The parent of a bare file name is "": that is the working directory.
fn non_empty(dir: &Path) -> &Path {
    if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    }
}

/// Renames `from` to `to` unless `to` exists, and makes the rename durable. `Ok(false)` when `to`
/// is taken (nothing moved). Never replaces `to`, even when another process creates it at the
/// same moment: `renameat2(RENAME_NOREPLACE)`, or where the filesystem refuses that flag (NFS,
/// some FUSE filesystems) `link(2)` (which fails on an existing name) then `unlink(2)`; during
/// that fallback the file briefly has two names (link count 2).
pub fn rename_noreplace(from: &Path, to: &Path) -> Result<bool, DurableError> {
    match renameat2_noreplace(from, to) {
        Ok(()) => {}
        Err(Errno::EEXIST) => return Ok(false),
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
            if !link_unlink(from, to)? {
                return Ok(false);
            }
        }
        Err(e) => return Err(DurableError::new("cannot rename", from, e.into())),
    }
    sync_both(from, to)?;
    Ok(true)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn renameat2_noreplace(from: &Path, to: &Path) -> Result<(), Errno> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn renameat2_noreplace(_from: &Path, _to: &Path) -> Result<(), Errno> {
    Err(Errno::ENOSYS)
}

/// The fallback of [`rename_noreplace`]: `Ok(false)` when `to` is taken.
fn link_unlink(from: &Path, to: &Path) -> Result<bool, DurableError> {
    match std::fs::hard_link(from, to) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(DurableError::new("cannot link", from, e)),
    }
    if let Err(e) = std::fs::remove_file(from) {
        // Leave one name, not two: undo the link (`to` is ours, just made).
        let _ = std::fs::remove_file(to);
        return Err(DurableError::new("cannot unlink", from, e));
    }
    Ok(true)
}

/// fsyncs a directory, so that renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    let d = File::open(dir).map_err(|e| DurableError::new("cannot open directory", dir, e))?;
    d.sync_all()
        .map_err(|e| DurableError::new("cannot fsync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_replace_and_leave_no_tmp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        write_atomic(&p, b"one", 0o644).unwrap();
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        let e = write_atomic(&d.path().join("missing/x"), b"", 0o644).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn rename_noreplace_never_replaces() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, b"A").unwrap();
        std::fs::write(&b, b"B").unwrap();
        assert!(!rename_noreplace(&a, &b).unwrap());
        assert_eq!(std::fs::read(&a).unwrap(), b"A");
        assert_eq!(std::fs::read(&b).unwrap(), b"B");
        let c = d.path().join("c");
        assert!(rename_noreplace(&a, &c).unwrap());
        assert!(!a.exists());
        assert_eq!(std::fs::read(&c).unwrap(), b"A");
        let e = rename_noreplace(&a, &d.path().join("x")).unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert!(e.to_string().contains("/a"), "{e}");
    }

    #[test]
    fn link_fallback_never_replaces() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, b"A").unwrap();
        std::fs::write(&b, b"B").unwrap();
        assert!(!link_unlink(&a, &b).unwrap());
        assert_eq!(std::fs::read(&a).unwrap(), b"A");
        assert_eq!(std::fs::read(&b).unwrap(), b"B");
        let c = d.path().join("c");
        assert!(link_unlink(&a, &c).unwrap());
        assert!(!a.exists());
        assert_eq!(std::fs::read(&c).unwrap(), b"A");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&c).unwrap().nlink(), 1);
        assert!(
            link_unlink(&a, &d.path().join("x"))
                .unwrap_err()
                .is_not_found()
        );
    }

    #[test]
    fn write_new_keeps_an_existing_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.reason");
        assert!(write_new(&p, b"one", 0o600).unwrap());
        assert!(!write_new(&p, b"two", 0o600).unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "no tmp left"
        );
    }

    #[test]
    fn tagged_temp_names() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        write_atomic_tagged(&p, b"x", 0o644, "host-1").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"x");
        let tmp = temp_path(&p, Some("host-1"));
        let name = tmp.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with(".a.json.") && name.ends_with(".tmp"),
            "{name}"
        );
        assert!(is_tagged_temp(name, "host-1"));
        assert!(!is_tagged_temp(name, "1"));
        assert!(!is_tagged_temp(name, "st-1"));
        let other = temp_path(&p, Some("x.host-1"));
        assert!(!is_tagged_temp(
            other.file_name().unwrap().to_str().unwrap(),
            "host-1"
        ));
        let plain = temp_path(&p, None);
        assert!(!is_tagged_temp(
            plain.file_name().unwrap().to_str().unwrap(),
            "host-1"
        ));
        assert_ne!(temp_path(&p, None), temp_path(&p, None));
        let odd = temp_path(&p, Some("a/b"));
        assert_eq!(odd.parent(), Some(d.path()));
    }

    #[test]
    fn long_names_still_get_a_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(format!("{}.json", "é".repeat(120)));
        write_atomic(&p, b"x", 0o644).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"x");
    }
}
