//! A warm guest's own 9p output share (docs/plan-issue-24.md, "9p shares attached to one build
//! alone"): qemu cannot add a 9p share to a running guest, so a warm guest is started with
//! `mic_output` on `<stem>.9p/`, a directory made for it alone; after the build its files are
//! moved from there into the host job directory with [`move_output`].
//!
//! Invariants: nothing outside `from` is read and nothing outside `to` is written: a symlink or
//! special file the guest made is neither followed nor copied (it is named in
//! [`Moved::skipped`]); a file lands whole, by a rename on one file system or else a copy to a
//! temporary name beside its target, fsynced, then renamed; each folder written to is fsynced.
//! Call it once the guest's qemu is gone, so that nothing changes `from` meanwhile.

use crate::durable;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// What [`move_output`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Files moved.
    pub files: usize,
    /// Paths under `from` (relative) that were not regular files or folders: left where they were.
    pub skipped: Vec<PathBuf>,
}

/// Moves every regular file under `from` to the same relative path under `to` (folders made as
/// needed, a file there replaced).
pub fn move_output(from: &Path, to: &Path) -> Result<Moved, String> {
    let mut moved = Moved::default();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let src_dir = from.join(&rel);
        let dst_dir = to.join(&rel);
        std::fs::create_dir_all(&dst_dir)
            .map_err(|e| format!("cannot create {}: {e}", dst_dir.display()))?;
        let entries = std::fs::read_dir(&src_dir)
            .map_err(|e| format!("cannot read {}: {e}", src_dir.display()))?;
        let mut wrote = false;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot read {}: {e}", src_dir.display()))?;
            let name = entry.file_name();
            let kind = entry
                .file_type()
                .map_err(|e| format!("cannot stat {}: {e}", entry.path().display()))?;
            if kind.is_dir() {
                stack.push(rel.join(&name));
            } else if kind.is_file() {
                move_file(&entry.path(), &dst_dir.join(&name))?;
                moved.files += 1;
                wrote = true;
            } else {
                moved.skipped.push(rel.join(&name));
            }
        }
        if wrote {
            durable::sync_dir(&dst_dir).map_err(|e| e.to_string())?;
        }
    }
    moved.skipped.sort();
    Ok(moved)
}

/// One regular file: renamed when `from` and `to` are on one file system, else copied.
fn move_file(from: &Path, to: &Path) -> Result<(), String> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
            copy_durably(from, to)?;
            std::fs::remove_file(from).map_err(|e| format!("cannot remove {}: {e}", from.display()))
        }
        Err(e) => Err(format!(
            "cannot move {} to {}: {e}",
            from.display(),
            to.display()
        )),
    }
}

/// Copies the regular file `from` (never through a symlink) to a temporary name beside `to`,
/// fsyncs it, then renames it to `to`; its permission bits are kept.
pub fn copy_durably(from: &Path, to: &Path) -> Result<(), String> {
    let mut src = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(from)
        .map_err(|e| format!("cannot open {}: {e}", from.display()))?;
    let meta = src
        .metadata()
        .map_err(|e| format!("cannot stat {}: {e}", from.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", from.display()));
    }
    let tmp = durable::temp_path(to, None);
    let result = (|| {
        let mut dst: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777)
            .open(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        std::io::copy(&mut src, &mut dst)
            .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), tmp.display()))?;
        dst.sync_all()
            .map_err(|e| format!("cannot fsync {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, to)
            .map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), to.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tree(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                let t = e.file_type().unwrap();
                if t.is_dir() {
                    stack.push(e.path());
                    out.push(format!("{rel}/"));
                } else if t.is_symlink() {
                    out.push(format!("{rel}@"));
                } else {
                    out.push(rel);
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn files_move_symlinks_and_specials_stay() {
        let d = tempfile::tempdir().unwrap();
        let (from, to, outside) = (d.path().join("s"), d.path().join("job"), d.path().join("o"));
        std::fs::create_dir_all(from.join("rel/images/x")).unwrap();
        std::fs::create_dir_all(&to).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"host").unwrap();
        std::fs::write(from.join("x.raw"), b"image").unwrap();
        std::fs::write(from.join("rel/images/x/x.ks"), b"ks").unwrap();
        std::fs::write(to.join("x.raw"), b"old").unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), from.join("link")).unwrap();
        std::os::unix::fs::symlink(&outside, from.join("rel/dirlink")).unwrap();
        nix::unistd::mkfifo(&from.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let m = move_output(&from, &to).unwrap();
        assert_eq!(m.files, 2);
        assert_eq!(
            m.skipped,
            vec![
                PathBuf::from("fifo"),
                PathBuf::from("link"),
                PathBuf::from("rel/dirlink")
            ]
        );
        assert_eq!(std::fs::read(to.join("x.raw")).unwrap(), b"image");
        assert_eq!(
            tree(&to),
            [
                "rel/",
                "rel/images/",
                "rel/images/x/",
                "rel/images/x/x.ks",
                "x.raw"
            ]
        );
        assert_eq!(tree(&outside), ["secret"], "nothing followed out");
        assert_eq!(
            tree(&from),
            [
                "fifo",
                "link@",
                "rel/",
                "rel/dirlink@",
                "rel/images/",
                "rel/images/x/"
            ]
        );
    }

    #[test]
    fn a_copy_keeps_the_mode_and_never_follows_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("a");
        std::fs::write(&src, vec![7u8; 300_000]).unwrap();
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o640)).unwrap();
        let dst = d.path().join("b");
        std::fs::write(&dst, b"old").unwrap();
        copy_durably(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), vec![7u8; 300_000]);
        let mode = std::fs::metadata(&dst).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        std::os::unix::fs::symlink(&src, d.path().join("l")).unwrap();
        let e = copy_durably(&d.path().join("l"), &d.path().join("c")).unwrap_err();
        assert!(e.contains("cannot open"), "{e}");
        assert!(!d.path().join("c").exists());
        let mut left = tree(d.path());
        left.retain(|n| n.ends_with(".tmp"));
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn across_file_systems_files_are_copied() {
        // /dev/shm is a tmpfs beside the test's temporary folder where the host has one
        let Ok(shm) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("no /dev/shm: the copy path is tested by the test above");
            return;
        };
        let d = tempfile::tempdir().unwrap();
        use std::os::unix::fs::MetadataExt;
        let same = std::fs::metadata(shm.path()).unwrap().dev()
            == std::fs::metadata(d.path()).unwrap().dev();
        std::fs::write(shm.path().join("img"), b"image").unwrap();
        if same {
            eprintln!("/dev/shm is on the same file system here: the rename path ran");
        }
        let m = move_output(shm.path(), &d.path().join("job")).unwrap();
        assert_eq!(m.files, 1);
        assert_eq!(std::fs::read(d.path().join("job/img")).unwrap(), b"image");
        assert!(!shm.path().join("img").exists());
    }
}
