//! Durable file operations: writes go to a hidden temporary file beside the target, are fsynced,
//! renamed over the target, and the directory is fsynced; moves are renames plus a directory
//! fsync. A reader never sees a half-written file, and a crash leaves the old or the new file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
    write_replacing(path, bytes, mode, true)
}

/// Writes `bytes` to `path` atomically (tmp + rename: a reader sees the old or the new file,
/// never half of one) but without the fsyncs: only for files derived from the event log and
/// written again from it before they are used after a crash (the kickstart of a build).
pub fn write_atomic_unsynced(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DurableError> {
    write_replacing(path, bytes, mode, false)
}

fn write_replacing(path: &Path, bytes: &[u8], mode: u32, sync: bool) -> Result<(), DurableError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| DurableError::new("cannot create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| DurableError::new("cannot write", &tmp, e))?;
        if sync {
            f.sync_all()
                .map_err(|e| DurableError::new("cannot fsync", &tmp, e))?;
        }
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
    if let Some(dir) = to.parent() {
        sync_dir(dir)?;
    }
    if let Some(dir) = from.parent()
        && Some(dir) != to.parent()
    {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Renames `from` to `to` unless `to` exists (Ok(false) then), durably.
pub fn rename_noreplace(from: &Path, to: &Path) -> Result<bool, DurableError> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => {}
        Err(nix::errno::Errno::EEXIST) => return Ok(false),
        Err(nix::errno::Errno::EINVAL) => {
            // The file system does not take the flag (NFS, FUSE): link fails on a taken name.
            match std::fs::hard_link(from, to) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
                Err(e) => return Err(DurableError::new("cannot link", to, e)),
            }
            std::fs::remove_file(from).map_err(|e| DurableError::new("cannot remove", from, e))?;
        }
        Err(e) => return Err(DurableError::new("cannot rename", from, e.into())),
    }
    if let Some(dir) = to.parent() {
        sync_dir(dir)?;
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
}
