//! The guest sequence of one KVM build (REFERENCE.md "KVM mode", steps 1-8): the build's files
//! in img_tmp and their lock, the overlay (a qcow2 file or an LVM snapshot), booting qemu,
//! waiting for the guest's ssh, copying the job in, running mic, copying the results out, and
//! the teardown.
//!
//! Invariant: [`Guest::teardown`] runs once whatever happened before (a failure, a timeout, a
//! cancel, a panic: `Drop` calls it): the guest is powered off or its qemu killed, the overlay
//! removed, the build's files in img_tmp removed; only an LVM snapshot that cannot be removed
//! keeps its record (and the lock is let go), for the next start's recovery.

use super::commands::{self, Accel, Ssh, Vm};
use super::orphans::{STEM_EXTS, kill_vm, new_stem, read_pid, with_ext};
use super::preflight::{kvm_usable, message, preflight};
use super::{absolute, open_up};
use crate::config::WorkerConfig;
use crate::domain::workitem::Spec;
use crate::health::Status;
use crate::imaging::joblog::{OutputTail, failure};
use crate::imaging::{JobLog, Prepared, mic};
use crate::process::{self, Capture, Outcome, Output, Registry, Run};
use crossbeam_channel::{Receiver, TryRecvError};
use nix::fcntl::Flock;
use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// At most this long for the guest to power off, then its qemu is killed.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);
/// One ssh probe while waiting for the guest.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts at starting qemu when another program took the forwarded port meanwhile.
const PORT_ATTEMPTS: usize = 5;

/// Why a build stopped early.
pub(super) enum Stop {
    /// The host, qemu, the guest or ssh failed (an infrastructure failure).
    Failed(String),
    /// mic itself failed in the guest (the image's failure).
    Image(String),
    Cancelled,
}

type Step<T> = Result<T, Stop>;

/// The guest's disk: a qcow2 overlay file, or an LVM snapshot (its /dev path).
enum Overlay {
    File(PathBuf),
    Lv(PathBuf),
}

/// One build's guest: its inputs, and what it has made so far (for the teardown).
pub(super) struct Guest<'a> {
    w: &'a WorkerConfig,
    spec: &'a Spec,
    log: JobLog,
    prepared: &'a Prepared,
    cancel: &'a Receiver<()>,
    registry: &'a Registry,
    /// The host job directory.
    dir: PathBuf,
    /// `<img_tmp>/build-image-vm-<dir_id>-<random>`: the build's files are this plus an extension.
    stem: PathBuf,
    lock: Option<Flock<File>>,
    overlay: Option<Overlay>,
    qemu_pid: Option<i32>,
    port: u16,
    key: PathBuf,
    ssh_up: bool,
    torn_down: bool,
    /// The last output of the command [`Guest::exec`] ran last: what its error quotes.
    output: OutputTail,
}

impl<'a> Guest<'a> {
    /// A build that has made nothing yet.
    pub(super) fn new(
        w: &'a WorkerConfig,
        spec: &'a Spec,
        prepared: &'a Prepared,
        cancel: &'a Receiver<()>,
        registry: &'a Registry,
    ) -> Guest<'a> {
        Guest {
            w,
            spec,
            log: prepared.log().clone(),
            prepared,
            cancel,
            registry,
            dir: prepared.dir().to_path_buf(),
            stem: PathBuf::new(),
            lock: None,
            overlay: None,
            qemu_pid: None,
            port: 0,
            key: PathBuf::new(),
            ssh_up: false,
            torn_down: true,
            output: OutputTail::new(),
        }
    }
}

impl Guest<'_> {
    /// A line in the job log (a log that cannot be written is reported once, then ignored: the
    /// build's outcome does not depend on it).
    pub(super) fn note(&mut self, text: &str) {
        if let Err(e) = self.log.line(text) {
            log::warn!("cannot write job log {}: {e}", self.log.path().display());
        }
    }

    fn path(&self, ext: &str) -> PathBuf {
        with_ext(&self.stem, ext)
    }

    fn ssh(&self, connect_timeout: u64) -> Ssh<'_> {
        Ssh {
            key: &self.key,
            port: self.port,
            connect_timeout,
        }
    }

    /// Runs one command, its output into the job log after a line with the command.
    fn exec(
        &mut self,
        argv: &[OsString],
        stdin: Option<Vec<u8>>,
        timeout: Duration,
        cancellable: bool,
    ) -> Step<Outcome> {
        self.note(&format!("$ {}", mic::display(argv)));
        self.output = OutputTail::new();
        let outcome = process::run(Run {
            argv,
            env: vec![],
            stdin,
            output: Output::Sink(self.log.sink_keeping(&self.output)),
            timeout,
            cancel: cancellable.then_some(self.cancel),
            registry: self.registry,
        })
        .map_err(|e| Stop::Failed(e.to_string()))?;
        if !outcome.success() {
            self.note(&format!("{} {}", program(argv), outcome.describe(timeout)));
        }
        if outcome == Outcome::Cancelled {
            return Err(Stop::Cancelled);
        }
        Ok(outcome)
    }

    /// Runs one step of the build that must succeed; `what` names it in the error.
    fn must(&mut self, what: &str, argv: &[OsString], stdin: Option<Vec<u8>>) -> Step<()> {
        let timeout = self.w.timeout();
        let outcome = self.exec(argv, stdin, timeout, true)?;
        if outcome.success() {
            return Ok(());
        }
        let how = format!(
            "{what} failed: {} {}",
            program(argv),
            outcome.describe(timeout)
        );
        Err(Stop::Failed(failure(
            &how,
            &self.output.text(),
            outcome.exit_code().is_none(),
        )))
    }

    /// Runs a command whose output is wanted (not only logged): captured (bounded), and copied
    /// into the job log when `log_it`.
    fn capture(
        &mut self,
        argv: &[OsString],
        timeout: Duration,
        log_it: bool,
    ) -> Step<(Outcome, String)> {
        if log_it {
            self.note(&format!("$ {}", mic::display(argv)));
        }
        let capture = Capture::new(process::CAPTURE_LIMIT);
        let outcome = process::run(Run {
            argv,
            env: vec![],
            stdin: None,
            output: Output::Capture(capture.clone()),
            timeout,
            cancel: Some(self.cancel),
            registry: self.registry,
        })
        .map_err(|e| Stop::Failed(e.to_string()))?;
        let text = capture.text();
        if log_it {
            for line in text.lines() {
                self.note(line);
            }
            if !outcome.success() {
                self.note(&format!("{} {}", program(argv), outcome.describe(timeout)));
            }
        }
        if outcome == Outcome::Cancelled {
            return Err(Stop::Cancelled);
        }
        Ok((outcome, text))
    }

    pub(super) fn run(&mut self) -> Step<PathBuf> {
        let w = self.w;
        self.note(&format!(
            "KVM build of {} ({} for {}) in a throw-away guest",
            self.spec.name, self.spec.image_type, self.spec.arch
        ));
        let accel = self.check_host()?;
        self.start_files()?;
        let (disk, format) = self.make_overlay()?;
        self.start_guest(accel, &disk, &format)?;
        self.wait_for_ssh()?;
        let guest_dir = commands::guest_job_dir(self.spec);
        let guest_ks = format!("{guest_dir}/{}.ks", self.spec.name);
        self.prepare_guest(&guest_dir, &guest_ks)?;

        // the guest's mic, as the provenance states it (a guest that cannot say is no failure)
        let argv = self.ssh(10).ssh(&commands::mic_version_remote(w));
        let (outcome, text) = self.capture(&argv, Duration::from_secs(60), true)?;
        if outcome.success()
            && let Some(line) = text.lines().map(str::trim).find(|l| !l.is_empty())
        {
            self.prepared.note_mic_version(line);
        }

        let mic_line = commands::mic_remote(self.spec, &guest_ks, &guest_dir, w);
        let argv = self.ssh(10).ssh(&mic_line);
        let timeout = w.timeout();
        let outcome = self.exec(&argv, None, timeout, true)?;
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
                &self.output.text(),
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
            let argv = self.ssh(10).scp_dir_from(&guest_dir, &parent);
            self.must("copying the results back from the guest", &argv, None)?;
        }
        open_up(&self.dir);
        self.prepared.new_image().ok_or_else(|| {
            Stop::Image(format!(
                "{tool} exited 0 but left no image file (none new or changed under {})",
                self.dir.display()
            ))
        })
    }

    /// Step 1: everything the guest needs is there, before anything is made (the preflight
    /// `doctor` shows too; its first failure fails the build).
    fn check_host(&mut self) -> Step<Accel> {
        let w = self.w;
        if let Some(c) = preflight(w).into_iter().find(|c| c.status == Status::Fail) {
            return Err(Stop::Failed(message(&c)));
        }
        let (accel, line) =
            commands::choose_accel(w.vm_accel, kvm_usable()).map_err(Stop::Failed)?;
        self.note(&line);
        self.key = absolute(w.vm_ssh_key.as_deref().unwrap_or(Path::new("")));
        if w.use_9p_cache {
            std::fs::create_dir_all(&w.mic_cachedir).map_err(|e| {
                Stop::Failed(format!(
                    "cannot create mic_cachedir {}: {e}",
                    w.mic_cachedir.display()
                ))
            })?;
        }
        Ok(accel)
    }

    /// The build's stem in img_tmp and its lock, taken before any other file is made.
    fn start_files(&mut self) -> Step<()> {
        let (stem, lock) =
            new_stem(&self.w.img_tmp, &self.spec.dir_id, random()).map_err(Stop::Failed)?;
        self.stem = stem;
        self.lock = Some(lock);
        self.torn_down = false;
        Ok(())
    }

    /// Step 2: an LVM snapshot when the base is a logical volume, else a qcow2 overlay file.
    fn make_overlay(&mut self) -> Step<(PathBuf, String)> {
        let w = self.w;
        let base = absolute(w.vm_base_img.as_deref().unwrap_or(Path::new("")));
        if base.starts_with("/dev") {
            let (outcome, out) =
                self.capture(&commands::lvdisplay(w.sudo, &base), w.timeout(), true)?;
            if outcome.success() {
                let vg = commands::lv_group(&out).ok_or_else(|| {
                    Stop::Failed(format!(
                        "lvdisplay -c {} printed no volume group: {}",
                        base.display(),
                        out.trim()
                    ))
                })?;
                let name = self
                    .stem
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let lv = Path::new("/dev").join(vg).join(&name);
                // recorded before it exists, so that a crash in between still removes it
                let record = self.path("lv");
                std::fs::write(&record, lv.as_os_str().as_encoded_bytes())
                    .map_err(|e| Stop::Failed(format!("cannot write {}: {e}", record.display())))?;
                self.overlay = Some(Overlay::Lv(lv.clone()));
                let argv = commands::lvcreate_snapshot(w.sudo, &name, &base);
                self.must(
                    &format!("creating an LVM snapshot of {}", base.display()),
                    &argv,
                    None,
                )?;
                return Ok((lv, "raw".into()));
            }
            self.note(&format!(
                "{} is not a logical volume: a qcow2 overlay on it",
                base.display()
            ));
        }
        let (outcome, out) = self.capture(&commands::qemu_img_info(&base), w.timeout(), true)?;
        if !outcome.success() {
            return Err(Stop::Failed(format!(
                "qemu-img info {} {}: {}",
                base.display(),
                outcome.describe(w.timeout()),
                out.trim()
            )));
        }
        let format = commands::backing_format(&out)
            .map_err(|e| Stop::Failed(format!("base image {}: {e}", base.display())))?;
        let overlay = self.path("qcow2");
        self.overlay = Some(Overlay::File(overlay.clone()));
        let argv = commands::qemu_img_create(&base, &format, &overlay);
        self.must(
            &format!("creating an overlay of {}", base.display()),
            &argv,
            None,
        )?;
        Ok((overlay, "qcow2".into()))
    }

    /// Step 3-4: qemu, daemonized, on a forwarded port that was free a moment ago (another
    /// program may take it before qemu binds it: then try another).
    fn start_guest(&mut self, accel: Accel, disk: &Path, format: &str) -> Step<()> {
        let w = self.w;
        let pidfile = self.path("pid");
        let console = self.dir.join(crate::imaging::jobdir::CONSOLE_LOG);
        // an earlier attempt's console is not this one's
        let _ = std::fs::remove_file(&console);
        let kernel = absolute(w.vm_kernel.as_deref().unwrap_or(Path::new("")));
        let initrd = w.vm_initrd.as_deref().map(absolute);
        let cache = absolute(&w.mic_cachedir);
        let dir = absolute(&self.dir);
        for attempt in 1..=PORT_ATTEMPTS {
            let port = free_port().ok_or_else(|| {
                Stop::Failed("no free port for the guest's ssh in 49152-65535".into())
            })?;
            let mac = commands::mac(random());
            let vm = Vm {
                accel,
                memory: &w.vm_memory,
                smp: w.vm_smp,
                kernel: &kernel,
                initrd: initrd.as_deref(),
                append: &w.vm_append,
                mac: &mac,
                port,
                disk,
                disk_format: format,
                pidfile: &pidfile,
                console: &console,
                share_9p: w.use_9p_cache.then_some((cache.as_path(), dir.as_path())),
            };
            let argv = commands::qemu_system(&vm);
            let outcome = self.exec(&argv, None, w.timeout(), true)?;
            if outcome.success() {
                let pid = read_pid(&pidfile).ok_or_else(|| {
                    Stop::Failed(format!(
                        "qemu started but wrote no pid to {}",
                        pidfile.display()
                    ))
                })?;
                self.note(&format!(
                    "guest running: qemu pid {pid}, ssh on 127.0.0.1:{port}"
                ));
                self.qemu_pid = Some(pid);
                self.port = port;
                return Ok(());
            }
            if attempt < PORT_ATTEMPTS && !port_is_free(port) {
                self.note(&format!("port {port} was taken meanwhile: trying another"));
                continue;
            }
            return Err(Stop::Failed(failure(
                &format!("qemu-system-x86_64 {}", outcome.describe(w.timeout())),
                &self.output.text(),
                outcome.exit_code().is_none(),
            )));
        }
        Err(Stop::Failed(format!(
            "qemu could not forward a free port after {PORT_ATTEMPTS} attempts"
        )))
    }

    /// Step 5: ssh answers (up to vm_wait), probing until then; a qemu that died is not waited
    /// for.
    fn wait_for_ssh(&mut self) -> Step<()> {
        let w = self.w;
        let wait = Duration::from_secs(w.vm_wait);
        self.note(&format!(
            "waiting up to {} s (vm_wait) for the guest's ssh on 127.0.0.1:{}",
            w.vm_wait, self.port
        ));
        let started = Instant::now();
        let deadline = started + wait;
        let mut last = String::new();
        let mut probes = 0;
        loop {
            match self.cancel.try_recv() {
                Ok(()) | Err(TryRecvError::Disconnected) => return Err(Stop::Cancelled),
                Err(TryRecvError::Empty) => {}
            }
            if let Some(pid) = self.qemu_pid
                && !crate::process::pid_alive(pid)
            {
                self.qemu_pid = None;
                let console = self.console_tail(20);
                return Err(Stop::Failed(format!(
                    "qemu (pid {pid}) ended while the guest was booting; console: {console}"
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let timeout = left.min(PROBE_TIMEOUT);
            let argv = self.ssh(timeout.as_secs().clamp(1, 10)).ssh("true");
            probes += 1;
            let (outcome, out) = self.capture(&argv, timeout, false)?;
            if outcome.success() {
                self.ssh_up = true;
                let boot = started.elapsed().as_secs_f64();
                self.prepared.note_boot(boot);
                self.note(&format!(
                    "guest's ssh answered after {boot:.1} s ({probes} probe(s)); its console is \
                     {}",
                    crate::imaging::jobdir::CONSOLE_LOG
                ));
                return Ok(());
            }
            last = out.trim().to_string();
            // a short pause between probes, cut short by a cancel
            let pause =
                Duration::from_millis(500).min(deadline.saturating_duration_since(Instant::now()));
            match self.cancel.recv_timeout(pause) {
                Ok(()) => return Err(Stop::Cancelled),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(Stop::Cancelled);
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            }
        }
        let console = self.console_tail(20);
        self.note(&format!("last ssh probe said: {last}"));
        self.note(&format!("guest console (last lines): {console}"));
        Err(Stop::Failed(format!(
            "the guest's ssh on 127.0.0.1:{} did not answer within vm_wait = {} s (key {}, \
             {probes} probe(s); last: {last})",
            self.port,
            w.vm_wait,
            self.key.display()
        )))
    }

    /// Steps 5-6: the host's mic, proxy and resolver configuration, the job directory, the
    /// kickstart, and with the 9p cache the two shares.
    fn prepare_guest(&mut self, guest_dir: &str, guest_ks: &str) -> Step<()> {
        let w = self.w;
        let mic_conf = match w.ict {
            crate::config::Ict::Mic => "/etc/mic/mic.conf",
            crate::config::Ict::Mic2 => "/etc/mic2/mic2.conf",
        };
        let conf_dir = Path::new(mic_conf)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let argv = self.ssh(10).ssh(&commands::mkdir_p(&[
            &conf_dir,
            "/etc/sysconfig",
            guest_dir,
        ]));
        self.must("creating the job directory in the guest", &argv, None)?;
        for file in [mic_conf, "/etc/sysconfig/proxy", "/etc/resolv.conf"] {
            let local = Path::new(file);
            if !local.is_file() {
                self.note(&format!("{file}: not on this host, not copied"));
                continue;
            }
            let argv = self.ssh(10).scp_to(local, file);
            self.must(&format!("copying {file} to the guest"), &argv, None)?;
        }
        if w.use_9p_cache {
            let cache = w.mic_cachedir.to_string_lossy().into_owned();
            for (tag, dir) in [
                (commands::TAG_CACHE, cache.as_str()),
                (commands::TAG_OUTPUT, guest_dir),
            ] {
                let argv = self.ssh(10).ssh(&commands::mount_9p(tag, dir));
                self.must(
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
            let argv = self.ssh(10).ssh(&commands::write_stdin_to(guest_ks));
            let ks = self.spec.kickstart.as_bytes().to_vec();
            self.must("copying the kickstart to the guest", &argv, Some(ks))?;
        }
        Ok(())
    }

    /// The last lines of the guest's serial console, one line.
    fn console_tail(&self, n: usize) -> String {
        let text =
            std::fs::read(self.dir.join(crate::imaging::jobdir::CONSOLE_LOG)).unwrap_or_default();
        let start = text.len().saturating_sub(8192);
        let text = String::from_utf8_lossy(&text[start..]);
        let lines: Vec<&str> = text
            .lines()
            .map(|l| l.trim_matches(|c: char| c.is_whitespace() || c.is_control()))
            .filter(|l| !l.is_empty())
            .collect();
        if lines.is_empty() {
            return "(empty)".into();
        }
        lines[lines.len().saturating_sub(n)..].join(" | ")
    }

    /// Step 8: sync and power off the guest, wait for its qemu to end (kill it when it does
    /// not), remove the overlay and the build's files. Runs once, whatever happened before;
    /// nothing here can be cancelled.
    pub(super) fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        let w = self.w;
        let short = w.timeout().min(SHUTDOWN_WAIT);
        if let Some(pid) = self.qemu_pid.take() {
            if self.ssh_up {
                let argv = self.ssh(10).ssh(&commands::shutdown());
                // ssh may lose the connection as the guest goes down: any end is fine
                let _ = self.exec(&argv, None, short, false);
                self.note(&format!(
                    "waiting up to {} s for qemu (pid {pid}) to end",
                    short.as_secs()
                ));
                if crate::wait::wait_for(short, || !crate::process::pid_alive(pid)) {
                    self.note("guest powered off");
                }
            }
            if crate::process::pid_alive(pid) {
                self.kill_qemu(pid);
            }
        }
        match self.overlay.take() {
            Some(Overlay::File(path)) => match std::fs::remove_file(&path) {
                Ok(()) => self.note(&format!("overlay {} removed", path.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    let msg = format!("cannot remove overlay {}: {e}", path.display());
                    log::warn!("{msg}");
                    self.note(&msg);
                }
            },
            Some(Overlay::Lv(lv)) => {
                let argv = commands::lvremove(w.sudo, &lv);
                match self.exec(&argv, None, w.timeout(), false) {
                    Ok(o) if o.success() => {
                        self.note(&format!("snapshot {} removed", lv.display()))
                    }
                    _ => {
                        let msg = format!(
                            "cannot remove LVM snapshot {} (see the job log {})",
                            lv.display(),
                            self.log.path().display()
                        );
                        log::warn!("{msg}");
                        // keep the record: the next start tries again
                        self.lock = None;
                        return;
                    }
                }
            }
            None => {}
        }
        for ext in STEM_EXTS {
            let _ = std::fs::remove_file(self.path(ext));
        }
        self.lock = None;
    }

    fn kill_qemu(&mut self, pid: i32) {
        let marker = self
            .stem
            .file_name()
            .map(|n| n.as_encoded_bytes().to_vec())
            .unwrap_or_default();
        match kill_vm(pid, &marker) {
            Ok(true) => self.note(&format!("qemu (pid {pid}) killed")),
            Ok(false) => self.note(&format!(
                "qemu (pid {pid}) is gone (or is no longer our guest): nothing to kill"
            )),
            Err(e) => {
                let msg = format!("cannot kill qemu (pid {pid}): {e}");
                log::warn!("{msg}");
                self.note(&msg);
            }
        }
    }
}

impl Drop for Guest<'_> {
    /// A panic between start and teardown still stops the guest and removes the overlay.
    fn drop(&mut self) {
        self.teardown();
    }
}

fn program(argv: &[OsString]) -> String {
    argv.iter()
        .find(|a| *a != "sudo" && *a != "-n")
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Random bits from the kernel (the time and pid when /dev/urandom cannot be read).
fn random() -> u64 {
    let mut b = [0u8; 8];
    match File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u64::from_ne_bytes(b),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t ^ (u64::from(std::process::id()) << 32)
        }
    }
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A port in 49152-65535 nobody listens on right now.
fn free_port() -> Option<u16> {
    (0..64)
        .map(|_| commands::port(random()))
        .find(|p| port_is_free(*p))
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
