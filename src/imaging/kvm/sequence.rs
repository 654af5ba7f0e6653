//! The guest sequence of one KVM build (REFERENCE.md "KVM mode", steps 1-8): a guest (a warm
//! one taken from the pool, or one booted for this build), the job copied in, mic, the results
//! copied out, and the teardown. The guest itself (files, overlay, qemu, ssh, teardown) is a
//! [`Machine`].
//!
//! Invariant: [`Guest::teardown`] runs once whatever happened before (`Drop` calls it): the
//! machine is torn down and the pool is told (a taken warm guest is never returned to it).

use super::machine::{Machine, Step, Stop, copy_console};
use super::pool::{Pool, Taken};
use super::{commands, open_up, share, warm};
use crate::config::WorkerConfig;
use crate::domain::workitem::Spec;
use crate::imaging::Prepared;
use crate::imaging::jobdir::CONSOLE_LOG;
use crate::imaging::joblog::failure;
use crate::process::{Outcome, Registry};
use crossbeam_channel::Receiver;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How the build got its guest, for the pool's book.
enum Origin {
    /// Not yet (or nothing to tell the pool).
    None,
    /// A warm guest of the pool, by its id in the book.
    Warm(u64),
    /// Booted by the build itself while the pool was on.
    Cold,
}

/// One build's guest: its inputs, and the machine it runs in.
pub(super) struct Guest<'a> {
    w: &'a Arc<WorkerConfig>,
    spec: &'a Spec,
    prepared: &'a Prepared,
    cancel: &'a Receiver<()>,
    registry: &'a Registry,
    pool: Option<&'a Pool>,
    /// The host job directory.
    dir: PathBuf,
    m: Machine,
    origin: Origin,
}

impl<'a> Guest<'a> {
    /// A build that has made nothing yet; `pool`: the warm guests, when `vm_warm > 0`.
    pub(super) fn new(
        w: &'a Arc<WorkerConfig>,
        spec: &'a Spec,
        prepared: &'a Prepared,
        cancel: &'a Receiver<()>,
        registry: &'a Registry,
        pool: Option<&'a Pool>,
    ) -> Guest<'a> {
        let dir = prepared.dir().to_path_buf();
        Guest {
            w,
            spec,
            prepared,
            cancel,
            registry,
            pool,
            m: Machine::new(
                Arc::clone(w),
                prepared.log().clone(),
                cancel.clone(),
                registry.clone(),
                dir.join(CONSOLE_LOG),
                dir.clone(),
            ),
            dir,
            origin: Origin::None,
        }
    }
}

impl Guest<'_> {
    /// A line in the job log.
    pub(super) fn note(&mut self, text: &str) {
        self.m.note(text);
    }

    pub(super) fn run(&mut self) -> Step<PathBuf> {
        let w = Arc::clone(self.w);
        self.note(&format!(
            "KVM build of {} ({} for {}) in a throw-away guest",
            self.spec.name, self.spec.image_type, self.spec.arch
        ));
        let guest_dir = commands::guest_job_dir(self.spec);
        let guest_ks = format!("{guest_dir}/{}.ks", self.spec.name);
        if !self.take_warm(&guest_dir, &guest_ks)? {
            self.boot_own(&guest_dir, &guest_ks)?;
        }

        let mic_line = commands::mic_remote(self.spec, &guest_ks, &guest_dir, &w);
        let argv = self.m.ssh_line(&mic_line);
        let timeout = w.timeout();
        let outcome = self.m.exec(&argv, None, timeout, true)?;
        let tool = w.mic_path().to_string_lossy().into_owned();
        if !outcome.success() {
            let how = match outcome {
                Outcome::Exited(255) => {
                    "ssh to the guest failed or the guest went away (exit 255)".to_string()
                }
                Outcome::Exited(c) => format!("exited with status {c}"),
                o => o.describe(timeout),
            };
            // mic's own error lines say the cause; ssh's failure, a timeout or a signal is the
            // cause itself.
            let reason_first = !matches!(outcome, Outcome::Exited(c) if c != 255);
            let text = failure(
                &format!("{tool} failed in the guest: {how}"),
                &self.m.output_text(),
                reason_first,
            );
            return Err(match outcome {
                Outcome::Exited(c) if c != 255 => Stop::Image(text),
                _ => Stop::Failed(text),
            });
        }
        self.note(&format!("{tool} exited with status 0 in the guest"));

        if !w.use_9p_cache {
            let parent = self.dir.parent().map(Path::to_path_buf).ok_or_else(|| {
                Stop::Failed(format!(
                    "job directory {} has no parent",
                    self.dir.display()
                ))
            })?;
            let argv = self.m.scp_dir_from(&guest_dir, &parent);
            self.m
                .must("copying the results back from the guest", &argv, None)?;
        } else if matches!(self.origin, Origin::Warm(_)) {
            self.move_share()?;
        }
        open_up(&self.dir);
        self.prepared.new_image().ok_or_else(|| {
            Stop::Image(format!(
                "{tool} exited 0 but left no image file (none new or changed under {})",
                self.dir.display()
            ))
        })
    }

    /// A warm guest's results: its 9p output folder (its own, in img_tmp) moved into the job
    /// directory once the guest is off (nothing writes to it any more); its copy of the
    /// kickstart is not moved (the job's own stays).
    fn move_share(&mut self) -> Step<()> {
        self.m.stop_guest();
        let share = self.m.share_out.clone();
        let _ = std::fs::remove_file(share.join(format!("{}.ks", self.spec.name)));
        let moved = share::move_output(&share, &self.dir)
            .map_err(|e| Stop::Failed(format!("moving the guest's output: {e}")))?;
        self.note(&format!(
            "{} file(s) moved from {} into the job directory",
            moved.files,
            share.display()
        ));
        for p in &moved.skipped {
            self.note(&format!(
                "not a regular file, left out: {} (in the guest's output)",
                p.display()
            ));
        }
        Ok(())
    }

    /// Takes a ready warm guest from the pool and prepares it in one ssh session (health
    /// check, job directory, 9p mounts, kickstart, `mic --version`); false when none is ready
    /// (the build then boots its own). A guest failing its health check, or whose ssh fails,
    /// is destroyed and the next one tried.
    fn take_warm(&mut self, guest_dir: &str, guest_ks: &str) -> Step<bool> {
        let Some(pool) = self.pool else {
            return Ok(false);
        };
        loop {
            let Some(taken) = pool.take() else {
                self.note("no warm guest is ready: booting one for this build");
                pool.cold_started();
                self.origin = Origin::Cold;
                return Ok(false);
            };
            self.adopt(taken);
            let cachedir = self.w.mic_cachedir.to_string_lossy().into_owned();
            let remote = warm::take_remote(
                guest_dir,
                guest_ks,
                self.w.use_9p_cache.then_some(cachedir.as_str()),
                &commands::mic_version_remote(self.w),
            );
            let argv = self.m.ssh_line(&remote);
            let ks = self.spec.kickstart.as_bytes().to_vec();
            let (outcome, out) = self.m.capture(&argv, Some(ks), self.w.timeout(), true)?;
            let (health, version) = warm::take_answer(&out);
            let verdict = if outcome == Outcome::Exited(255) {
                Err("ssh to it failed (exit 255)".to_string())
            } else {
                warm::health_verdict(&health, super::pool::unix_now())
            };
            if let Err(why) = verdict {
                self.note(&format!(
                    "the warm guest failed its health check ({why}): destroyed, never used"
                ));
                self.teardown();
                continue;
            }
            if !outcome.success() {
                return Err(Stop::Failed(failure(
                    &format!(
                        "preparing the warm guest for the build failed: ssh {}",
                        outcome.describe(self.w.timeout())
                    ),
                    &out,
                    false,
                )));
            }
            if let Some(line) = version {
                self.prepared.note_mic_version(&line);
            }
            self.prepared.note_boot(0.0);
            return Ok(true);
        }
    }

    /// The build's guest is the warm one taken: its steps now go to the job log (after its boot
    /// log), a cancel of the build stops them, and its console is the job's.
    fn adopt(&mut self, taken: Taken) {
        let Taken {
            id,
            mut machine,
            ready_at,
        } = taken;
        let boot_log = std::fs::read_to_string(machine.log().path()).unwrap_or_default();
        machine.hand_over(
            self.prepared.log().clone(),
            self.cancel.clone(),
            self.registry.clone(),
        );
        let console = self.dir.join(CONSOLE_LOG);
        copy_console(&machine.console, &console);
        machine.console_copy = Some(console);
        let waited = ready_at.elapsed().map(|d| d.as_secs()).unwrap_or(0);
        let old = std::mem::replace(&mut self.m, machine);
        drop(old); // nothing made: nothing to tear down
        self.origin = Origin::Warm(id);
        let stem = self.m.stem.display().to_string();
        self.note(&format!(
            "took the warm guest {stem} (qemu pid {}, ssh on 127.0.0.1:{}; its ssh answered \
             {:.1} s after its start; ready for {waited} s); its boot:",
            self.m.qemu_pid.unwrap_or(0),
            self.m.port,
            self.m.boot_seconds,
        ));
        for line in boot_log.lines() {
            self.note(&format!("  | {line}"));
        }
    }

    /// The build boots a guest of its own (`vm_warm = 0`, or none ready), as always.
    fn boot_own(&mut self, guest_dir: &str, guest_ks: &str) -> Step<()> {
        let w = Arc::clone(self.w);
        let accel = self.m.check_host()?;
        self.m.start_files(&self.spec.dir_id)?;
        let (disk, format) = self.m.make_overlay()?;
        self.m.start_guest(accel, &disk, &format)?;
        self.m.wait_for_ssh(CONSOLE_LOG)?;
        self.prepared.note_boot(self.m.boot_seconds);
        self.m.copy_host_config(&[guest_dir])?;
        if w.use_9p_cache {
            let cache = w.mic_cachedir.to_string_lossy().into_owned();
            for (tag, dir) in [
                (commands::TAG_CACHE, cache.as_str()),
                (commands::TAG_OUTPUT, guest_dir),
            ] {
                let argv = self.m.ssh_line(&commands::mount_9p(tag, dir));
                self.m.must(
                    &format!(
                        "mounting {tag} over 9p on {dir} in the guest (does the guest kernel \
                         have CONFIG_9P_FS and CONFIG_NET_9P_VIRTIO?)"
                    ),
                    &argv,
                    None,
                )?;
            }
            // the shared job directory already holds the kickstart
        } else {
            let argv = self.m.ssh_line(&commands::write_stdin_to(guest_ks));
            let ks = self.spec.kickstart.as_bytes().to_vec();
            self.m
                .must("copying the kickstart to the guest", &argv, Some(ks))?;
        }
        // the guest's mic, as the provenance states it (a guest that cannot say is no failure)
        let argv = self.m.ssh_line(&commands::mic_version_remote(&w));
        let (outcome, text) = self.m.capture(&argv, None, Duration::from_secs(60), true)?;
        if outcome.success()
            && let Some(line) = text.lines().map(str::trim).find(|l| !l.is_empty())
        {
            self.prepared.note_mic_version(line);
        }
        Ok(())
    }

    /// Step 8 ([`Machine::teardown`]), then the pool is told the guest is gone. Once.
    pub(super) fn teardown(&mut self) {
        self.m.teardown();
        match std::mem::replace(&mut self.origin, Origin::None) {
            Origin::Warm(id) => {
                if let Some(p) = self.pool {
                    p.done(id)
                }
            }
            Origin::Cold => {
                if let Some(p) = self.pool {
                    p.cold_ended()
                }
            }
            Origin::None => {}
        }
    }
}

impl Drop for Guest<'_> {
    /// A panic between start and teardown still stops the guest and tells the pool.
    fn drop(&mut self) {
        self.teardown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn open_up_makes_group_and_other_writable() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/f"), b"x").unwrap();
        std::fs::set_permissions(
            d.path().join("sub/f"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        open_up(d.path());
        let mode = |p: &str| {
            std::fs::metadata(d.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("sub/f"), 0o666);
        assert_eq!(mode("sub") & 0o066, 0o066);
    }
}
