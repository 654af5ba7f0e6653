//! A build's place of its own ([`Place`]), and its release ([`release`]): what one build may
//! leave on the host (processes, mounts, loop devices, device-mapper entries, its temp dir) is
//! found and freed at the end of every build, and at the next start for a build lost to a crash.
//!
//! A place is: a temp dir `.build-tmp` in the job folder (mic's and its tools' `TMPDIR`), a
//! cgroup v2 of its own where the host has one (`process::cgroup`; `use_cgroup = false` hides
//! it) or else an environment marker the build's processes inherit, and a record
//! (`.build-place`, JSON) of both, written before anything runs, that a later daemon reads.
//!
//! Invariant: only what lies under the build's temp dir is touched (mount points and loop
//! backing files are compared with its canonical path: a job folder may hold another job's
//! folder, never its temp dir); a process is killed only through the cgroup this place made or
//! its own marker value; the temp dir is removed only once no mount is left under it, so a
//! removal never walks into a mounted filesystem.

use crate::config::WorkerConfig;
use crate::process::cgroup::{self, Cgroup, ENV_MARKER};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The temp dir's name in the job folder (hidden: never taken for the image).
pub const TMP_DIR: &str = ".build-tmp";
/// The record's name in the job folder.
pub const RECORD: &str = ".build-place";

/// How long a release waits for killed processes to be gone.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Where mic reads its site config.
const SITE_MIC_CONF: &str = "/etc/mic/mic.conf";

/// A mic config (INI text) with `[create] tmpdir` set to `tmpdir`: the section's own `tmpdir`
/// lines commented out, the new one first in it (the section added when missing).
fn with_tmpdir(text: &str, tmpdir: &str) -> String {
    let mut out = String::new();
    let mut in_create = false;
    let mut done = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_create = t.trim_start_matches('[').trim_end_matches(']').trim() == "create";
            out.push_str(line);
            out.push('\n');
            if in_create && !done {
                out.push_str(&format!("tmpdir = {tmpdir}\n"));
                done = true;
            }
            continue;
        }
        let key = t.split(['=', ':']).next().unwrap_or("").trim();
        if in_create && key == "tmpdir" {
            out.push_str("# (build-image: the build's own tmpdir is set above) ");
        }
        out.push_str(line);
        out.push('\n');
    }
    if !done {
        out.push_str(&format!("\n[create]\ntmpdir = {tmpdir}\n"));
    }
    out
}

/// How long a loop device set to detach itself is given to go before it counts as held.
const DETACH_WAIT: Duration = Duration::from_secs(3);

/// What a place was made of, as recorded in the job folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    marker: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cgroup: Option<PathBuf>,
}

/// A build's place: its temp dir, its cgroup or its environment marker.
pub struct Place {
    job_dir: PathBuf,
    record: Record,
    procs: Option<File>,
    how: String,
    released: bool,
    /// Unmount and detach through `sudo -n` when the daemon is not root.
    sudo: bool,
    /// mic gets a private mount namespace.
    private_mounts: bool,
}

impl Drop for Place {
    /// A place never used (the build did not start after all) is released all the same.
    fn drop(&mut self) {
        if !self.released {
            let r = release(&self.job_dir, self.sudo);
            for l in r.leaked {
                log::warn!("{}: {}", l.what, l.why);
            }
        }
    }
}

/// Something a release could not free: what it is, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leak {
    pub what: String,
    pub why: String,
}

/// What a release did: the lines for the job log, and what it could not free.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Release {
    pub freed: Vec<String>,
    pub leaked: Vec<Leak>,
}

impl Place {
    /// Makes the place of a build in `job_dir` (which exists): the temp dir (emptied of an
    /// earlier attempt's), the cgroup or the marker, and the record. `label` names the cgroup.
    pub fn open(w: &WorkerConfig, job_dir: &Path, label: &str) -> std::io::Result<Place> {
        let tmp = job_dir.join(TMP_DIR);
        if tmp.exists() {
            // an earlier attempt's, released already (or its release failed: tried again)
            let r = release(job_dir, w.sudo);
            if !r.leaked.is_empty() {
                return Err(std::io::Error::other(format!(
                    "the job folder still holds what an earlier build left: {}",
                    r.leaked
                        .iter()
                        .map(|l| format!("{} ({})", l.what, l.why))
                        .collect::<Vec<_>>()
                        .join("; ")
                )));
            }
        }
        std::fs::create_dir(&tmp)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let marker = format!("{}-{nanos}-{label}", std::process::id());
        let (cgroup, how) = if !w.use_cgroup {
            (None, "environment marker (use_cgroup = false)".to_string())
        } else {
            match Cgroup::create(label) {
                Ok(cg) => {
                    let how = format!("cgroup {}", cg.path().display());
                    (Some(cg), how)
                }
                Err(why) => (None, format!("environment marker ({why})")),
            }
        };
        let procs = match cgroup.as_ref().map(Cgroup::procs).transpose() {
            Ok(p) => p,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    let _ = cg.kill_and_remove(Duration::from_secs(1));
                }
                return Err(e);
            }
        };
        // a private mount namespace needs root in the child: the daemon is root and mic runs
        // without sudo (sudo's own rule would have to allow unshare)
        let private_mounts = w.mount_namespace && !w.sudo && nix::unistd::geteuid().is_root();
        let how = if private_mounts {
            format!("{how}, mounts in a private mount namespace")
        } else {
            how
        };
        let record = Record {
            marker,
            cgroup: cgroup.map(|c| c.path().to_path_buf()),
        };
        let json = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
        // Not fsynced: what it names (a cgroup, a marker in live processes) dies with the
        // machine; a daemon killed alone leaves it in the page cache for the next start.
        crate::durable::write_atomic_unsynced(&job_dir.join(RECORD), &json, 0o644)
            .map_err(std::io::Error::other)?;
        Ok(Place {
            job_dir: job_dir.to_path_buf(),
            record,
            procs,
            how,
            released: false,
            sudo: w.sudo,
            private_mounts,
        })
    }

    /// The environment a build's commands get: the marker and `TMPDIR`.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (ENV_MARKER.to_string(), self.record.marker.clone()),
            (
                "TMPDIR".to_string(),
                self.tmp_dir().to_string_lossy().into_owned(),
            ),
        ]
    }

    /// Does mic run in a private mount namespace of its own?
    pub fn private_mounts(&self) -> bool {
        self.private_mounts
    }

    /// The build's temp dir.
    pub fn tmp_dir(&self) -> PathBuf {
        self.job_dir.join(TMP_DIR)
    }

    /// For mic (`ict = "mic"`): writes the build's own mic config, `<temp dir>/mic.conf`, the
    /// site's (`/etc/mic/mic.conf`, if any) with `[create] tmpdir` set to `<temp dir>/mic`, and
    /// `bootstrap.conf` beside it if the site has one (mic reads it beside its config), and
    /// returns the `--config=` option that gives it to mic. mic takes its temp dir only from its
    /// config file, and `--config` replaces the site's file (it is not merged), so the site's
    /// settings are carried over. None when the command line already names a config (`-c`,
    /// `--config`: the operator's or the workitem's is used as it is).
    pub fn mic_config(&self, args: &[std::ffi::OsString]) -> std::io::Result<Option<String>> {
        let named = args.iter().any(|a| {
            let a = a.to_string_lossy();
            a == "-c" || a.starts_with("--config") || (a.starts_with("-c") && !a.starts_with("--"))
        });
        if named {
            return Ok(None);
        }
        let site = Path::new(SITE_MIC_CONF);
        let text = match std::fs::read_to_string(site) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let tmp = self.tmp_dir();
        let mic_tmp = tmp.join("mic");
        std::fs::create_dir_all(&mic_tmp)?;
        let conf = tmp.join("mic.conf");
        let text = with_tmpdir(&text, &mic_tmp.to_string_lossy());
        // private: a site config may hold proxy credentials, and base_dir is served by the web
        // not fsynced: written again before every build attempt
        crate::durable::write_atomic_unsynced(&conf, text.as_bytes(), 0o600)
            .map_err(std::io::Error::other)?;
        if let Some(dir) = site.parent()
            && let Ok(b) = std::fs::read(dir.join("bootstrap.conf"))
        {
            crate::durable::write_atomic_unsynced(&tmp.join("bootstrap.conf"), &b, 0o600)
                .map_err(std::io::Error::other)?;
        }
        Ok(Some(format!("--config={}", conf.display())))
    }

    /// `cgroup.procs` of the build's cgroup (None: the marker alone finds its processes).
    pub fn procs(&self) -> Option<&File> {
        self.procs.as_ref()
    }

    /// How the build's processes are found, for the job log.
    pub fn describe(&self) -> String {
        format!(
            "the build's place: temp dir {}, processes by {}",
            self.tmp_dir().display(),
            self.how
        )
    }

    /// Releases the place (see [`release`]).
    pub fn release(mut self) -> Release {
        self.released = true;
        self.procs = None;
        release(&self.job_dir, self.sudo)
    }
}

/// Frees what a build left in `job_dir`: the processes of the place recorded there (its cgroup
/// killed, its marked processes killed), the mounts under its temp dir (deepest first, lazily
/// if busy), the loop devices whose backing file is under it (device-mapper entries on them
/// first), the temp dir, the record. Safe to run again; a folder with nothing left is an empty
/// release.
///
/// A daemon that is not root unmounts, detaches and removes device-mapper entries through
/// `sudo -n umount|losetup|dmsetup` when `sudo` is set (its sudoers rule must allow them), else
/// tries itself (and records what it may not do as leaked).
pub fn release(job_dir: &Path, sudo: bool) -> Release {
    let priv_ = Privilege::of(sudo);
    let mut r = Release::default();
    let record: Option<Record> = std::fs::read(job_dir.join(RECORD))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(rec) = &record {
        // the record lies in the job folder, which the build can write: only a cgroup this
        // daemon makes (a `build-image-*` child of its own cgroup) is ever killed
        if let Some(path) = rec.cgroup.as_ref().filter(|p| !Cgroup::is_ours(p)) {
            r.leaked.push(Leak {
                what: format!("cgroup {}", path.display()),
                why: "recorded, but not a cgroup this daemon makes: left alone".into(),
            });
        }
        // Every process of the build is in its cgroup (mic entered it before it ran, and
        // what it starts is born there): once the cgroup is killed, emptied and removed,
        // nothing of the build is left, and the marker's `/proc` scan (every process's
        // environment read, a few milliseconds of CPU per build) is not needed. It runs
        // where the build had no cgroup, or its cgroup could not be emptied.
        let mut emptied = false;
        if let Some(path) = rec.cgroup.as_ref().filter(|p| Cgroup::is_ours(p)) {
            match Cgroup::at(path.clone()).kill_and_remove(KILL_WAIT) {
                Ok(n) => {
                    emptied = true;
                    if n > 0 {
                        r.freed.push(format!(
                            "killed {n} process(es) of cgroup {}",
                            path.display()
                        ));
                    }
                }
                Err(why) => r.leaked.push(Leak {
                    what: format!("cgroup {}", path.display()),
                    why,
                }),
            }
        }
        if !emptied {
            match cgroup::kill_marked(&rec.marker, KILL_WAIT) {
                Ok(pids) if pids.is_empty() => {}
                Ok(pids) => r.freed.push(format!(
                    "killed process(es) {pids:?} marked {ENV_MARKER}={}",
                    rec.marker
                )),
                Err(why) => r.leaked.push(Leak {
                    what: format!("processes marked {ENV_MARKER}={}", rec.marker),
                    why,
                }),
            }
        }
    }
    // Only the build's temp dir, where mic works (its config's tmpdir): a job folder may hold
    // another job's (a prefix with a slash nests one in another), whose mounts are not ours.
    let root = std::fs::canonicalize(job_dir)
        .unwrap_or_else(|_| job_dir.to_path_buf())
        .join(TMP_DIR);
    let mounted = mounts_under(&root);
    // nothing mounted, and nothing of the build left alive to mount anything since
    let none_mounted = mounted.is_empty() && r.leaked.is_empty();
    for m in mounted {
        match unmount(&m, priv_) {
            Ok(false) => r.freed.push(format!("unmounted {}", m.display())),
            Ok(true) => r.leaked.push(Leak {
                what: format!("mount {}", m.display()),
                why: "busy: unmounted lazily, its filesystem stays until its last user lets go"
                    .into(),
            }),
            Err(e) => r.leaked.push(Leak {
                what: format!("mount {}", m.display()),
                why: format!("cannot unmount: {e}"),
            }),
        }
    }
    for (dev, backing) in loops_under(&root) {
        for dm in dm_holders(&dev) {
            match dm_remove(&dm, priv_) {
                Ok(()) => r
                    .freed
                    .push(format!("removed device-mapper entry {dm} on {dev}")),
                Err(why) => r.leaked.push(Leak {
                    what: format!("device-mapper entry {dm} on {dev}"),
                    why,
                }),
            }
        }
        let what = format!("loop device {dev} (backing file {})", backing.display());
        // a device just unmounted may be held for a moment more (a last close, a probe)
        let detached = || {
            crate::wait::wait_for(DETACH_WAIT, || {
                loop_backing(&dev).is_none_or(|b| b != backing)
            })
        };
        match detach(&dev, priv_) {
            Ok(()) if detached() => r.freed.push(format!("detached {what}")),
            Ok(()) => r.leaked.push(Leak {
                what,
                why: "in use: it detaches itself once its last user lets go".into(),
            }),
            Err(e) => r.leaked.push(Leak {
                what,
                why: format!("cannot detach: {e}"),
            }),
        }
    }
    let tmp = job_dir.join(TMP_DIR);
    if tmp.exists() {
        // (the mount table is read again only when there was something to unmount)
        if none_mounted || mounts_under(&root).is_empty() {
            match std::fs::remove_dir_all(&tmp) {
                Ok(()) => r
                    .freed
                    .push(format!("removed the temp dir {}", tmp.display())),
                Err(e) => r.leaked.push(Leak {
                    what: format!("temp dir {}", tmp.display()),
                    why: format!("cannot remove: {e}"),
                }),
            }
        } else {
            r.leaked.push(Leak {
                what: format!("temp dir {}", tmp.display()),
                why: "kept: a mount is still under the job folder".into(),
            });
        }
    }
    if record.is_some() && r.leaked.is_empty() {
        let _ = std::fs::remove_file(job_dir.join(RECORD));
    }
    r
}

/// Releases the place of a build lost to a crash (at the next start), recording what was done
/// in its job log as a build's end does.
pub fn release_lost(w: &WorkerConfig, spec: &crate::domain::workitem::Spec) -> Release {
    let dir = super::job_dir(w, spec);
    if !dir.is_dir() {
        return Release::default();
    }
    let r = release(&dir, w.sudo);
    let log_path = super::log_path(w, spec);
    if (!r.freed.is_empty() || !r.leaked.is_empty())
        && log_path.is_file()
        && let Ok(log) = super::JobLog::open(&log_path, super::joblog::job_log_limit(w))
    {
        for line in &r.freed {
            let _ = log.line(&format!("released after the daemon's crash: {line}"));
        }
        for l in &r.leaked {
            let _ = log.line(&format!("leaked: {}: {}", l.what, l.why));
        }
    }
    r
}

/// Mount points at or under `root` (canonical), deepest first, from /proc/self/mountinfo.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| PathBuf::from(cgroup::unescape(p)))
        .filter(|p| p.starts_with(root))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// How the release does what needs root: itself (root, or no sudo), or through `sudo -n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Privilege {
    Own,
    Sudo,
}

impl Privilege {
    fn of(sudo: bool) -> Privilege {
        if sudo && !nix::unistd::geteuid().is_root() {
            Privilege::Sudo
        } else {
            Privilege::Own
        }
    }
}

/// Runs `sudo -n ARGS` to its end: Ok, or Err with its output.
fn sudo(args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let out = std::process::Command::new("sudo")
        .arg("-n")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run sudo: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "sudo -n {}: {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Unmounts `m`; a busy one lazily. Ok(true): it was busy (detached lazily).
fn unmount(m: &Path, p: Privilege) -> Result<bool, String> {
    if p == Privilege::Sudo {
        return match sudo(&["umount".as_ref(), m.as_os_str()]) {
            Ok(()) => Ok(false),
            Err(_) => sudo(&["umount".as_ref(), "-l".as_ref(), m.as_os_str()]).map(|()| true),
        };
    }
    unmount_own(m).map_err(|e| e.to_string())
}

fn unmount_own(m: &Path) -> nix::Result<bool> {
    use nix::mount::{MntFlags, umount2};
    match umount2(m, MntFlags::empty()) {
        Ok(()) => Ok(false),
        Err(nix::errno::Errno::EBUSY) => umount2(m, MntFlags::MNT_DETACH).map(|()| true),
        Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The backing file of loop device `dev` (`/dev/loopN`), None when it has none.
fn loop_backing(dev: &str) -> Option<PathBuf> {
    let name = dev.strip_prefix("/dev/")?;
    let text = std::fs::read(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    let text = text.strip_suffix(b"\n").unwrap_or(&text);
    let text = text.strip_suffix(b" (deleted)").unwrap_or(text);
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(text)))
}

/// Loop devices whose backing file lies under `root` (canonical): (`/dev/loopN`, file).
pub fn loops_under(root: &Path) -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut v: Vec<(String, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            name.starts_with("loop").then(|| format!("/dev/{name}"))
        })
        .filter_map(|dev| loop_backing(&dev).map(|b| (dev, b)))
        .filter(|(_, b)| b.starts_with(root))
        .collect();
    v.sort();
    v
}

/// Device-mapper entries (their names) holding loop device `dev`.
fn dm_holders(dev: &str) -> Vec<String> {
    let Some(name) = dev.strip_prefix("/dev/") else {
        return Vec::new();
    };
    let Ok(rd) = std::fs::read_dir(format!("/sys/block/{name}/holders")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let holder = e.file_name().to_str()?.to_string();
            let n = std::fs::read_to_string(format!("/sys/block/{holder}/dm/name")).ok()?;
            Some(n.trim().to_string())
        })
        .collect()
}

/// Removes a device-mapper entry with `dmsetup remove --retry`.
fn dm_remove(name: &str, p: Privilege) -> Result<(), String> {
    if p == Privilege::Sudo {
        return sudo(&[
            "dmsetup".as_ref(),
            "remove".as_ref(),
            "--retry".as_ref(),
            name.as_ref(),
        ]);
    }
    let out = std::process::Command::new("dmsetup")
        .args(["remove", "--retry", name])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run dmsetup: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "dmsetup remove {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Detaches a loop device (LOOP_CLR_FD). A device still in use is set to detach itself when
/// its last user closes it.
fn detach(dev: &str, p: Privilege) -> Result<(), String> {
    if p == Privilege::Sudo {
        return sudo(&["losetup".as_ref(), "-d".as_ref(), dev.as_ref()]);
    }
    detach_own(dev).map_err(|e| e.to_string())
}

fn detach_own(dev: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const LOOP_CLR_FD: nix::libc::c_ulong = 0x4C01;
    let f = File::open(dev)?;
    // SAFETY: LOOP_CLR_FD takes no argument; the descriptor is a valid open device.
    let rc = unsafe { nix::libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD as _, 0) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        // ENXIO: already detached
        if e.raw_os_error() != Some(nix::libc::ENXIO) {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_site_config_gets_the_builds_tmpdir() {
        let site = "[common]\ndistro_name = x\n\n[create]\ntmpdir= /var/tmp/mic\ncachedir = /c\n";
        let t = with_tmpdir(site, "/j/.build-tmp/mic");
        assert_eq!(
            t,
            "[common]\ndistro_name = x\n\n[create]\ntmpdir = /j/.build-tmp/mic\n\
             # (build-image: the build's own tmpdir is set above) tmpdir= /var/tmp/mic\n\
             cachedir = /c\n"
        );
        assert_eq!(with_tmpdir("", "/t"), "\n[create]\ntmpdir = /t\n");
        let d = tempfile::tempdir().unwrap();
        let w = WorkerConfig {
            use_cgroup: false,
            ..WorkerConfig::default()
        };
        let place = Place::open(&w, d.path(), "t").unwrap();
        let opt = place.mic_config(&[]).unwrap().unwrap();
        assert_eq!(
            opt,
            format!("--config={}", place.tmp_dir().join("mic.conf").display())
        );
        let conf = std::fs::read_to_string(place.tmp_dir().join("mic.conf")).unwrap();
        assert!(conf.contains(&format!(
            "tmpdir = {}",
            place.tmp_dir().join("mic").display()
        )));
        assert_eq!(place.mic_config(&["--config=/x".into()]).unwrap(), None);
        assert_eq!(place.mic_config(&["-c".into(), "/x".into()]).unwrap(), None);
        place.release();
    }

    #[test]
    fn a_forged_record_kills_no_cgroup_it_did_not_make() {
        let Some(mount) = cgroup::v2_mount() else {
            return;
        };
        let d = tempfile::tempdir().unwrap();
        let forged = Record {
            marker: "forged".into(),
            cgroup: Some(mount.clone()),
        };
        std::fs::write(d.path().join(RECORD), serde_json::to_vec(&forged).unwrap()).unwrap();
        let r = release(d.path(), false);
        assert_eq!(r.leaked.len(), 1, "{r:?}");
        assert!(r.leaked[0].why.contains("left alone"), "{r:?}");
        assert!(mount.is_dir());
    }

    #[test]
    fn an_empty_folder_releases_nothing_and_a_tmp_dir_is_removed() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(release(d.path(), false), Release::default());
        let w = WorkerConfig {
            use_cgroup: false,
            ..WorkerConfig::default()
        };
        let place = Place::open(&w, d.path(), "t").unwrap();
        std::fs::write(place.tmp_dir().join("x"), "y").unwrap();
        assert!(place.describe().contains("environment marker"));
        assert!(place.procs().is_none());
        let r = place.release();
        assert!(r.leaked.is_empty(), "{r:?}");
        assert_eq!(r.freed.len(), 1, "{r:?}");
        assert!(!d.path().join(TMP_DIR).exists());
        assert!(!d.path().join(RECORD).exists());
    }
}
