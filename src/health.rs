//! Checks of the host and the configuration, one type for `doctor` and the builders: a
//! [`Check`] names what was looked at, how it was found ([`Status`]: ok, WARN, FAIL) and the
//! detail; and the looks they share: a program on PATH ([`find_on_path`]), a directory the
//! program writes into ([`writable_dir`], [`dir_to_write`]), a `--version`-style [`probe`].
//!
//! Invariant: a check only looks; nothing here creates, changes or removes a file (a directory
//! that is missing is reported, never made), and a probe's child runs through
//! [`crate::process::output`] with [`CHILD_TIMEOUT`] (in its own process group, killed when the
//! time is up), so a hanging program cannot hang a check.

use crate::process::Registry;
use nix::unistd::AccessFlags;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long one probe (`--version`, `sudo -n true`) may take.
pub const CHILD_TIMEOUT: Duration = Duration::from_secs(10);

/// A probe's output line kept for the report is cut to this many characters.
const DETAIL_LINE_CHARS: usize = 160;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    /// As `doctor` shows it.
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One thing looked at: `what` is the config key, device or program, `detail` what was found
/// (one line of `doctor`'s report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub status: Status,
    pub what: String,
    pub detail: String,
}

impl Check {
    pub fn new(status: Status, what: &str, detail: impl Into<String>) -> Check {
        Check {
            status,
            what: what.to_string(),
            detail: detail.into(),
        }
    }
    pub fn ok(what: &str, detail: impl Into<String>) -> Check {
        Check::new(Status::Ok, what, detail)
    }
    pub fn warn(what: &str, detail: impl Into<String>) -> Check {
        Check::new(Status::Warn, what, detail)
    }
    pub fn fail(what: &str, detail: impl Into<String>) -> Check {
        Check::new(Status::Fail, what, detail)
    }
}

/// A bare program name looked up on PATH, as `Command` does.
pub fn find_on_path(name: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs a short command; `Ok(first line of its output)` when it exits 0, else why not, with
/// the last line of its output.
pub fn probe(argv: &[OsString]) -> Result<String, String> {
    let (outcome, text) = crate::process::output(argv, CHILD_TIMEOUT, &Registry::none())
        .map_err(|e| e.to_string())?;
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    if outcome.success() {
        return Ok(shorten(lines.next().unwrap_or("")));
    }
    let shown: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut msg = format!(
        "`{}` {}",
        shell_words::join(&shown),
        outcome.describe(CHILD_TIMEOUT)
    );
    if let Some(last) = lines.next_back() {
        msg.push_str(": ");
        msg.push_str(&shorten(last));
    }
    Err(msg)
}

fn shorten(line: &str) -> String {
    if line.chars().count() <= DETAIL_LINE_CHARS {
        line.to_string()
    } else {
        let mut s: String = line.chars().take(DETAIL_LINE_CHARS).collect();
        s.push('…');
        s
    }
}

/// The path itself if it exists, else its nearest existing ancestor ("." for a relative path
/// whose first component is missing). `Err` names an ancestor that exists but is no directory.
pub fn nearest_existing(p: &Path) -> Result<PathBuf, PathBuf> {
    let mut cur = Some(p);
    while let Some(c) = cur {
        let c = if c.as_os_str().is_empty() {
            Path::new(".")
        } else {
            c
        };
        match std::fs::metadata(c) {
            Ok(m) if m.is_dir() || c == p => return Ok(c.to_path_buf()),
            Ok(_) => return Err(c.to_path_buf()),
            Err(_) => {}
        }
        if c == Path::new(".") {
            break;
        }
        cur = c.parent();
    }
    Ok(PathBuf::from("/"))
}

/// The directory can be written into (entries made in it): `Err` says why not.
pub fn writable_dir(p: &Path) -> Result<(), String> {
    nix::unistd::access(p, AccessFlags::W_OK | AccessFlags::X_OK)
        .map_err(|e| format!("{} is not writable: {}", p.display(), e.desc()))
}

/// A directory the program writes into, which it creates (with its parents) when missing: ok
/// when it is a writable directory; `missing` when it does not exist yet but its nearest
/// existing ancestor is a writable directory (`why_missing` says who creates it); else a
/// failure that says why.
pub fn dir_to_write(what: &str, dir: &Path, missing: Status, why_missing: &str) -> Check {
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Check::fail(what, format!("{} is not a directory", dir.display()));
        }
        Ok(_) => {
            return match writable_dir(dir) {
                Ok(()) => Check::ok(what, format!("{} (writable)", dir.display())),
                Err(e) => Check::fail(what, e),
            };
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            // ENOTDIR (a file on the way) is looked at below; anything else is reported.
            if e.raw_os_error() != Some(nix::libc::ENOTDIR) {
                return Check::fail(what, format!("cannot look at {}: {e}", dir.display()));
            }
        }
        Err(_) => {}
    }
    match nearest_existing(dir) {
        Err(file) => Check::fail(
            what,
            format!(
                "{} cannot be created: {} is not a directory",
                dir.display(),
                file.display()
            ),
        ),
        Ok(ancestor) => match writable_dir(&ancestor) {
            Ok(()) => Check::new(
                missing,
                what,
                format!(
                    "{} does not exist yet; {why_missing} (under {}, which is writable)",
                    dir.display(),
                    ancestor.display()
                ),
            ),
            Err(e) => Check::fail(
                what,
                format!(
                    "{} does not exist and cannot be created: {e}",
                    dir.display()
                ),
            ),
        },
    }
}

/// What a filesystem type means for a folder that must be shared (the spool) or local (the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Local,
    Network,
    /// FUSE: sshfs and the like are remote, fuse-overlayfs is local; cannot tell.
    Fuse,
}

/// The name and kind of a `statfs` `f_type` magic number.
pub fn fs_kind(magic: u32) -> (String, FsKind) {
    let (name, kind) = match magic {
        0x6969 => ("nfs", FsKind::Network),
        0xFF53_4D42 => ("cifs", FsKind::Network),
        0xFE53_4D42 => ("smb2", FsKind::Network),
        0x517B => ("smb", FsKind::Network),
        0x5346_414F => ("afs", FsKind::Network),
        0x00C3_6400 => ("ceph", FsKind::Network),
        0x7375_7245 => ("coda", FsKind::Network),
        0x0102_1997 => ("9p", FsKind::Network),
        0x7461_636F => ("ocfs2", FsKind::Network),
        0x0116_1970 => ("gfs2", FsKind::Network),
        0x0BD0_0BD0 => ("lustre", FsKind::Network),
        0x4750_4653 => ("gpfs", FsKind::Network),
        0x564C => ("ncp", FsKind::Network),
        0x6573_5546 => ("fuse", FsKind::Fuse),
        0xEF53 => ("ext2/ext3/ext4", FsKind::Local),
        0x5846_5342 => ("xfs", FsKind::Local),
        0x9123_683E => ("btrfs", FsKind::Local),
        0x0102_1994 => ("tmpfs", FsKind::Local),
        0x794C_7630 => ("overlayfs", FsKind::Local),
        0x2FC1_2FC1 => ("zfs", FsKind::Local),
        0xF2F5_2010 => ("f2fs", FsKind::Local),
        _ => return (format!("type {magic:#x}"), FsKind::Local),
    };
    (name.to_string(), kind)
}

/// Reads the filesystem type of `path` (or of its nearest existing ancestor) and judges it.
/// `verdict` gets the path to show (saying which ancestor was looked at when `path` does not
/// exist yet) and the magic number.
pub fn check_fs_type(what: &str, path: &Path, verdict: impl FnOnce(&str, u32) -> Check) -> Check {
    let at = match nearest_existing(path) {
        Ok(p) => p,
        Err(file) => file,
    };
    let shown = if at == path {
        path.display().to_string()
    } else {
        format!(
            "{} (not there yet; looked at {})",
            path.display(),
            at.display()
        )
    };
    match nix::sys::statfs::statfs(&at) {
        // f_type is a 32-bit magic number, whatever the width of the C type holding it.
        Ok(st) => verdict(&shown, st.filesystem_type().0 as u64 as u32),
        Err(e) => Check::warn(
            what,
            format!(
                "cannot read the filesystem type of {}: {}",
                at.display(),
                e.desc()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_existing_ancestor() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(nearest_existing(&d.path().join("x/y")), Ok(d.path().into()));
        assert_eq!(nearest_existing(d.path()), Ok(d.path().into()));
        assert_eq!(
            nearest_existing(Path::new("surely-not-here-doctor/x")),
            Ok(PathBuf::from("."))
        );
        let f = d.path().join("f");
        std::fs::write(&f, "").unwrap();
        assert_eq!(nearest_existing(&f.join("x")), Err(f.clone()));
        assert_eq!(nearest_existing(&f), Ok(f));
    }

    #[test]
    fn probe_reports_output() {
        let argv = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            probe(&argv(&["sh", "-c", "echo; echo first; echo second"])),
            Ok("first".to_string())
        );
        let e = probe(&argv(&["sh", "-c", "echo one; echo last >&2; exit 4"])).unwrap_err();
        assert_eq!(
            e,
            "`sh -c 'echo one; echo last >&2; exit 4'` exited with status 4: last"
        );
    }

    #[test]
    fn filesystem_kinds_and_the_nearest_existing_folder() {
        assert_eq!(fs_kind(0x6969), ("nfs".to_string(), FsKind::Network));
        assert_eq!(fs_kind(0xEF53).1, FsKind::Local);
        assert_eq!(fs_kind(0x6573_5546).1, FsKind::Fuse);
        assert_eq!(fs_kind(0x1234).0, "type 0x1234");
        // this host's temp dir can be read
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("not/yet");
        let c = check_fs_type("x", &missing, |shown, _| Check::ok("x", shown));
        assert_eq!(
            c.detail,
            format!(
                "{} (not there yet; looked at {})",
                missing.display(),
                d.path().display()
            )
        );
        let c = check_fs_type("x", d.path(), |shown, _| Check::ok("x", shown));
        assert_eq!(c.detail, d.path().display().to_string());
    }
}
