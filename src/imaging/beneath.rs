//! Removing a file beneath a folder, never through a symlink: what an expiry deletes
//! (`engine::retention`) is named by a file a build wrote (`SHA256SUMS`), so no path in it may
//! lead out of the folder.

use nix::fcntl::OFlag;
use nix::sys::stat::Mode as FileMode;
use nix::unistd::{UnlinkatFlags, unlinkat};
use std::path::{Component, Path};

fn io(e: nix::errno::Errno) -> std::io::Error {
    std::io::Error::from(e)
}

/// Removes the regular file `rel` (a relative path of plain components) beneath `dir`, never
/// through a symlink (its parent is opened with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`; where
/// the kernel has no `openat2`, the path is refused if any directory on it is a symlink).
/// Ok(false) when it is not there.
pub fn remove_beneath(dir: &Path, rel: &Path) -> std::io::Result<bool> {
    use nix::fcntl::{OpenHow, ResolveFlag, openat2};
    let refuse = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a plain relative path", rel.display()),
        )
    };
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(refuse());
    }
    let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
        return Err(refuse());
    };
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let top = match nix::fcntl::open(dir, flags, FileMode::empty()) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(false),
        Err(e) => return Err(io(e)),
    };
    let parent_fd = if parent.as_os_str().is_empty() {
        top
    } else {
        let how = OpenHow::new()
            .flags(flags)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        match openat2(&top, parent, how) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT) => return Ok(false),
            Err(nix::errno::Errno::ENOSYS) => {
                let mut at = dir.to_path_buf();
                for c in parent.components() {
                    at.push(c);
                    if std::fs::symlink_metadata(&at)?.file_type().is_symlink() {
                        return Err(refuse());
                    }
                }
                nix::fcntl::openat(&top, parent, flags, FileMode::empty()).map_err(io)?
            }
            Err(e) => return Err(io(e)),
        }
    };
    match unlinkat(&parent_fd, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ENOENT) => Ok(false),
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_a_file_beneath_never_through_a_symlink_or_out_of_the_folder() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base");
        std::fs::create_dir_all(base.join("a/b")).unwrap();
        std::fs::write(base.join("a/b/x.img"), b"x").unwrap();
        assert!(remove_beneath(&base, Path::new("a/b/x.img")).unwrap());
        assert!(!base.join("a/b/x.img").exists());
        assert!(
            !remove_beneath(&base, Path::new("a/b/x.img")).unwrap(),
            "gone: false"
        );
        // a file outside, reached by .. or through a symlinked folder, stays
        std::fs::write(d.path().join("outside"), b"o").unwrap();
        assert!(remove_beneath(&base, Path::new("../outside")).is_err());
        assert!(remove_beneath(&base, Path::new("/etc/passwd")).is_err());
        std::os::unix::fs::symlink(d.path(), base.join("link")).unwrap();
        assert!(remove_beneath(&base, Path::new("link/outside")).is_err());
        assert!(d.path().join("outside").exists());
    }
}
