//! KVM mode: each build runs mic inside a throw-away guest booted from an overlay of a base image
//! (REFERENCE.md "KVM mode", steps 1-8). `commands` builds the command lines, `preflight` checks
//! the host before anything is made, `sequence` runs the guest's steps (each command through
//! `process::run` with the per-command timeout, each command and its output in the job log),
//! `orphans` frees what a killed daemon left, `warm` keeps the book of guests booted ahead
//! (`vm_warm`, issue 24: its pure parts so far). This module is the [`KvmBuilder`]: it runs one
//! build and says how it ended, and tells `doctor` what KVM mode needs of the host.
//!
//! Invariant: whatever happens (failure, timeout, cancel), a build that started a guest or made
//! an overlay stops the guest and removes the overlay before it returns; what a killed daemon
//! left behind is found by `recover_orphans` on the next start. A build's files in `img_tmp` share
//! one stem, `build-image-vm-<dir_id>-<random>`; its `.lock` file is flock'ed for the build's
//! whole life, so a stem whose lock is free belongs to no running build.

pub mod commands;
mod machine;
mod orphans;
mod pool;
mod preflight;
mod sequence;
pub mod share;
pub mod warm;

pub use orphans::recover_orphans;
pub use preflight::{
    key_mode_verdict, kvm_usable, kvm_verdict, message, preflight, ssh_key, vm_file,
};

use super::tools::{check_sudo, ict_name};
use super::{BuildEnd, Builder, Checks, Prepared, planned_urls};
use crate::config::WorkerConfig;
use crate::domain::Mode;
use crate::domain::workitem::Spec;
use crate::health::{Check, find_on_path, probe};
use crate::process::Registry;
use crossbeam_channel::Receiver;
use machine::Stop;
use sequence::Guest;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Builds in a throw-away KVM guest.
pub struct KvmBuilder {
    w: Arc<WorkerConfig>,
    /// The warm guests (`vm_warm > 0`), from the first `recover` to `stop`.
    pool: Mutex<Option<Arc<pool::Pool>>>,
    /// The base image's sha256, by the (dev, ino, mtime) it was taken at: hashed once per
    /// daemon start, again only when the file changed.
    base_sha256: std::sync::Mutex<Option<(FileKey, String)>>,
}

/// A file's identity and time: (dev, ino, mtime s, mtime ns).
type FileKey = (u64, u64, i64, i64);

/// The [`FileKey`] of `m`: a file replaced (renamed over) or written since has another one.
fn file_key(m: &std::fs::Metadata) -> FileKey {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino(), m.mtime(), m.mtime_nsec())
}

impl KvmBuilder {
    fn pool(&self) -> Option<Arc<pool::Pool>> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn new(w: WorkerConfig) -> KvmBuilder {
        KvmBuilder {
            w: Arc::new(w),
            pool: Mutex::new(None),
            base_sha256: std::sync::Mutex::new(None),
        }
    }

    /// The base image and its sha256 (cached by dev, ino and mtime); None when it cannot be
    /// read (said in the log).
    fn base_image(&self) -> Option<(PathBuf, String)> {
        let base = absolute(self.w.vm_base_img.as_deref()?);
        let mut cache = self.base_sha256.lock().unwrap_or_else(|p| p.into_inner());
        let hashed = std::fs::metadata(&base).and_then(|m| {
            let key = file_key(&m);
            if let Some((k, sha)) = cache.as_ref()
                && *k == key
            {
                return Ok(sha.clone());
            }
            let (sha, _) = crate::artifacts::sums::hash_reader(std::fs::File::open(&base)?)?;
            *cache = Some((key, sha.clone()));
            Ok(sha)
        });
        match hashed {
            Ok(sha) => Some((base, sha)),
            Err(e) => {
                log::warn!(
                    "provenance: cannot hash the base image {}: {e}",
                    base.display()
                );
                None
            }
        }
    }
}

impl Builder for KvmBuilder {
    fn mode(&self) -> Mode {
        Mode::Kvm
    }

    /// Runs a KVM-mode build of `spec` in the job directory `prepare` made; `cancel` stops it
    /// (the guest is still cleaned up).
    fn build(
        &self,
        spec: &Spec,
        prepared: &Prepared,
        cancel: &Receiver<()>,
        registry: &Registry,
    ) -> BuildEnd {
        let w = &self.w;
        let urls = planned_urls(w, spec);
        let pool = self.pool();
        let mut b = Guest::new(w, spec, prepared, cancel, registry, pool.as_deref());
        let run = b.run();
        b.teardown();
        match run {
            Ok(image) => match prepared.seal(&image) {
                Ok(sealed) => BuildEnd::built(w, sealed, urls),
                Err(e) => {
                    b.note(&format!("error: {e}"));
                    BuildEnd::failed(e, urls, crate::domain::Failure::Infrastructure)
                }
            },
            Err(Stop::Cancelled) => {
                b.note("build stopped: the guest is torn down");
                BuildEnd::Cancelled
            }
            Err(Stop::Failed(error)) => {
                b.note(&format!("error: {error}"));
                BuildEnd::failed(error, urls, crate::domain::Failure::Infrastructure)
            }
            Err(Stop::Image(error)) => {
                b.note(&format!("error: {error}"));
                BuildEnd::failed(error, urls, crate::domain::Failure::Image)
            }
        }
    }

    fn host_facts(&self, prepared: &Prepared) -> crate::artifacts::provenance::HostFacts {
        let mut facts = super::mic_facts(&self.w, prepared.mic_version());
        facts.base_image = self.base_image();
        facts
    }

    /// Kills the guests and removes the overlays and LVM snapshots of builds a killed daemon
    /// left ([`recover_orphans`]).
    /// With `vm_warm > 0` the warm pool starts then (after the orphans are gone).
    fn recover(&self, registry: &Registry) {
        recover_orphans(&self.w, registry);
        if self.w.vm_warm > 0 && self.pool().is_none() {
            let memory = guest_memory_check(&self.w, &std::fs::read_to_string("/proc/meminfo"));
            match memory.status {
                crate::health::Status::Ok => {}
                crate::health::Status::Fail => {
                    // the pool's guests are optional: never the reason a host runs out of memory
                    log::error!(
                        "warm pool not started: guest memory: {}; every build boots its own \
                         guest (lower vm_warm or vm_memory)",
                        memory.detail
                    );
                    return;
                }
                crate::health::Status::Warn => {
                    log::warn!("warm pool: guest memory: {}", memory.detail)
                }
            }
            match pool::Pool::start(Arc::clone(&self.w), registry.clone()) {
                Ok(p) => {
                    log::info!(
                        "warm pool: keeping {} guest(s) booted ahead (vm_warm)",
                        self.w.vm_warm
                    );
                    *self.pool.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(p));
                }
                Err(e) => {
                    log::warn!("warm pool: cannot start ({e}): every build boots its own guest")
                }
            }
        }
    }

    /// Kills the warm guests not taken (and removes their files).
    fn stop(&self) {
        let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(p) = pool {
            p.stop();
        }
    }

    fn warm(&self) -> Option<warm::Figures> {
        self.pool().map(|p| p.figures())
    }

    /// mic runs in the guest, sudo (with `sudo = true`) for the LVM commands; then the
    /// preflight, and the programs a build runs on the host: qemu, qemu-img, ssh, scp.
    fn checks(&self) -> Checks {
        Checks {
            tools: vec![mic_not_on_host(&self.w), check_sudo(&self.w, "sudo = true")],
            host: host_checks(&self.w),
        }
    }
}

/// In KVM mode the image creator runs inside the guest, over ssh: the host needs none.
fn mic_not_on_host(w: &WorkerConfig) -> Check {
    Check::ok(
        ict_name(w.ict),
        format!(
            "not run on this host: with use_kvm = true, {} runs inside the guest",
            w.mic_path().display()
        ),
    )
}

/// The preflight, then each program a build runs on the host (run with `--version` or `-V`;
/// scp only looked up on PATH).
fn host_checks(w: &WorkerConfig) -> Vec<Check> {
    let mut checks = preflight(w);
    for (what, argv) in [
        ("qemu-system-x86_64", ["qemu-system-x86_64", "--version"]),
        ("qemu-img", ["qemu-img", "--version"]),
        ("ssh", ["ssh", "-V"]),
    ] {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        checks.push(match probe(&argv) {
            Ok(line) => Check::ok(what, line),
            Err(e) => Check::fail(what, e),
        });
    }
    checks.push(match find_on_path(Path::new("scp")) {
        Some(p) => Check::ok("scp", p.display().to_string()),
        None => Check::fail(
            "scp",
            "scp not found on PATH (results are copied back with it)",
        ),
    });
    checks.extend(warm_check(w));
    if w.vm_warm > 0 {
        checks.push(guest_memory_check(
            w,
            &std::fs::read_to_string("/proc/meminfo"),
        ));
    }
    checks
}

/// With warm guests: do `workers + vm_warm` guests of `vm_memory` fit in the host's memory?
fn guest_memory_check(w: &WorkerConfig, meminfo: &std::io::Result<String>) -> Check {
    let total = match meminfo {
        Ok(text) => warm::mem_total_kib(text),
        Err(_) => None,
    };
    let Some(total) = total else {
        return Check::warn("guest memory", "cannot read MemTotal in /proc/meminfo");
    };
    let guests = w.workers as u64 + w.vm_warm;
    let (status, line) = warm::memory_verdict(guests, &w.vm_memory, total);
    Check::new(status, "guest memory", line)
}

/// With `vm_warm` set: the warm guests in img_tmp (doctor is another process: the files are the
/// truth): a warm guest's stem is `build-image-vm-warm-*`, locked while a daemon keeps it; one
/// with its held connection's socket (`.ctl`) is ready or running a build, one without is
/// booting.
fn warm_check(w: &WorkerConfig) -> Option<Check> {
    (w.vm_warm > 0).then(|| {
        let (up, booting) = orphans::warm_stems(&w.img_tmp);
        Check::ok(
            "vm_warm",
            format!(
                "vm_warm = {}: {up} warm guest(s) up (ready or running a build), {booting} \
                 booting in {} (none while no daemon runs)",
                w.vm_warm,
                w.img_tmp.display()
            ),
        )
    })
}

/// `p` against the current directory (`p` itself when that cannot be read).
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// `chmod -R g+rw,o+rw` of the job directory, as the original did (symlinks not followed).
fn open_up(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                continue;
            }
            if meta.is_dir() {
                stack.push(path.clone());
            }
            let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
            if mode & 0o066 != 0o066 {
                let _ = std::fs::set_permissions(
                    &path,
                    <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(
                        (mode | 0o066) & 0o7777,
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Ict;
    use crate::health::Status;

    #[test]
    fn mic_is_not_run_on_the_host() {
        let w = WorkerConfig {
            ict: Ict::Mic2,
            use_kvm: true,
            ..WorkerConfig::default()
        };
        let c = mic_not_on_host(&w);
        assert_eq!((c.status, c.what.as_str()), (Status::Ok, "mic2"));
        assert_eq!(super::super::builder(&w).mode(), Mode::Kvm);
    }

    #[test]
    fn vm_warm_shows_the_pool_and_its_memory() {
        let d = tempfile::tempdir().unwrap();
        let mut w = WorkerConfig {
            img_tmp: d.path().to_path_buf(),
            ..WorkerConfig::default()
        };
        assert_eq!(warm_check(&w), None, "vm_warm = 0 adds no line");
        w.vm_warm = 1;
        let c = warm_check(&w).unwrap();
        assert_eq!(c.status, Status::Ok);
        assert!(
            c.detail.contains("vm_warm = 1: 0 warm guest(s) up"),
            "{}",
            c.detail
        );
        // one booting (locked, no socket), one up (locked, socket), one a dead daemon left
        let (_s1, _l1) = orphans::new_stem(d.path(), "warm", 1).unwrap();
        let (s2, _l2) = orphans::new_stem(d.path(), "warm", 2).unwrap();
        std::fs::write(orphans::with_ext(&s2, "ctl"), b"").unwrap();
        let (s3, l3) = orphans::new_stem(d.path(), "warm", 3).unwrap();
        drop(l3);
        std::fs::write(orphans::with_ext(&s3, "ctl"), b"").unwrap();
        let (_s4, _l4) = orphans::new_stem(d.path(), "job-7", 4).unwrap();
        let c = warm_check(&w).unwrap();
        assert!(c.detail.contains("1 warm guest(s) up"), "{}", c.detail);
        assert!(c.detail.contains("1 booting"), "{}", c.detail);
        w.workers = 2;
        let c = guest_memory_check(&w, &Ok("MemTotal: 2097152 kB\n".into()));
        assert_eq!(c.status, Status::Fail, "3 x 1 GiB in 2 GiB: {}", c.detail);
        assert!(c.detail.starts_with("3 guest(s)"), "{}", c.detail);
        let c = guest_memory_check(&w, &Err(std::io::ErrorKind::NotFound.into()));
        assert_eq!(c.status, Status::Warn);
    }

    #[test]
    fn a_pool_that_cannot_fit_in_memory_is_not_started() {
        let d = tempfile::tempdir().unwrap();
        let w = WorkerConfig {
            use_kvm: true,
            vm_warm: 1,
            vm_memory: "64T".into(),
            img_tmp: d.path().to_path_buf(),
            ..WorkerConfig::default()
        };
        let b = KvmBuilder::new(w);
        b.recover(&Registry::none());
        assert_eq!(b.warm(), None, "no pool: every build boots its own guest");
        assert!(crate::imaging::kvm::orphans::warm_stems(d.path()) == (0, 0));
        b.stop();
    }
}
