//! KVM mode: each build runs mic inside a throw-away guest booted from an overlay of a base image
//! (REFERENCE.md "KVM mode", steps 1-8). `commands` builds the command lines; this module
//! sequences them, each through `process::run` with the per-command timeout, each command and
//! its output in the job log.
//!
//! Invariant: whatever happens (failure, timeout, cancel), a build that started a guest or made
//! an overlay stops the guest and removes the overlay before it returns; what a killed daemon
//! left behind is found by `recover_orphans` on the next start. A build's files in `img_tmp` share
//! one stem, `build-image-vm-<dir_id>-<random>`; its `.lock` file is flock'ed for the build's
//! whole life, so a stem whose lock is free belongs to no running build.

pub mod commands;

use super::{BuildEnd, JobLog, Prepared, mic, planned_urls, url_for};
use crate::config::{VmAccel, WorkerConfig};
use crate::process::{self, Capture, Outcome, Output, Registry, Run};
use crate::workitem::Spec;
use commands::{Accel, Ssh, Vm};
use crossbeam_channel::{Receiver, TryRecvError};
use nix::fcntl::{Flock, FlockArg};
use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// File names in `img_tmp` that belong to this program start with this.
const STEM_PREFIX: &str = "build-image-vm-";
/// The kinds of file a build keeps in `img_tmp`, by extension.
/// (`out` is no longer made; it is still cleaned up after older versions.)
const STEM_EXTS: [&str; 6] = ["qcow2", "pid", "console", "out", "lv", "lock"];
/// At most this long for the guest to power off, then its qemu is killed.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);
/// One ssh probe while waiting for the guest.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts at starting qemu when another program took the forwarded port meanwhile.
const PORT_ATTEMPTS: usize = 5;

/// Why a build stopped early.
enum Stop {
    Failed(String),
    Cancelled,
}

type Step<T> = Result<T, Stop>;

/// The guest's disk: a qcow2 overlay file, or an LVM snapshot (its /dev path).
enum Overlay {
    File(PathBuf),
    Lv(PathBuf),
}

/// Runs a KVM-mode build of `spec` in the job directory `prepare` made; `cancel` stops it (the
/// guest is still cleaned up).
pub fn build(
    w: &WorkerConfig,
    spec: &Spec,
    prepared: &Prepared,
    cancel: &Receiver<()>,
    registry: &Registry,
) -> BuildEnd {
    let mut urls = planned_urls(w, spec);
    let mut b = Builder {
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
    };
    let run = b.run();
    b.teardown();
    match run {
        Ok(image) => {
            urls.image_url = url_for(w, &image);
            BuildEnd::Finished {
                result: true,
                error: None,
                urls,
            }
        }
        Err(Stop::Cancelled) => {
            b.note("build cancelled");
            BuildEnd::Cancelled
        }
        Err(Stop::Failed(error)) => {
            b.note(&format!("error: {error}"));
            BuildEnd::failed(error, urls)
        }
    }
}

struct Builder<'a> {
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
}

impl Builder<'_> {
    /// A line in the job log (a log that cannot be written is reported once, then ignored: the
    /// build's outcome does not depend on it).
    fn note(&mut self, text: &str) {
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
        let outcome = process::run(Run {
            argv,
            env: vec![],
            stdin,
            output: Output::Sink(self.log.sink()),
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
        Err(Stop::Failed(format!(
            "{what} failed: {} {}; last output: {}",
            program(argv),
            outcome.describe(timeout),
            self.log.tail(3)
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

    fn run(&mut self) -> Step<PathBuf> {
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
            return Err(Stop::Failed(format!(
                "{tool} failed in the guest: {how}; last output: {}",
                self.log.tail(3)
            )));
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
            Stop::Failed(format!(
                "{tool} exited 0 but left no image file (none new or changed under {})",
                self.dir.display()
            ))
        })
    }

    /// Step 1: everything the guest needs is there, before anything is made (the preflight
    /// `doctor` shows too; its first failure fails the build).
    fn check_host(&mut self) -> Step<Accel> {
        let w = self.w;
        if let Some(f) = preflight(w).into_iter().find(|f| f.level == Level::Fail) {
            return Err(Stop::Failed(f.message()));
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
        let tmp = absolute(&self.w.img_tmp);
        std::fs::create_dir_all(&tmp)
            .map_err(|e| Stop::Failed(format!("cannot create img_tmp {}: {e}", tmp.display())))?;
        let id: String = self.spec.dir_id.chars().take(40).collect();
        let name = format!("{STEM_PREFIX}{id}-{:012x}", random() & 0xffff_ffff_ffff);
        self.stem = tmp.join(&name);
        // Locked under a hidden name, then renamed: recovery never sees it unlocked.
        let hidden = tmp.join(format!(".{name}.lock"));
        let file = File::create(&hidden)
            .map_err(|e| Stop::Failed(format!("cannot create {}: {e}", hidden.display())))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| Stop::Failed(format!("cannot lock {}: {e}", hidden.display())))?;
        let lock_path = self.path("lock");
        std::fs::rename(&hidden, &lock_path).map_err(|e| {
            let _ = std::fs::remove_file(&hidden);
            Stop::Failed(format!("cannot rename {}: {e}", hidden.display()))
        })?;
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
        let console = self.path("console");
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
            return Err(Stop::Failed(format!(
                "qemu-system-x86_64 {}; last output: {}",
                outcome.describe(w.timeout()),
                self.log.tail(3)
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
                self.note(&format!(
                    "guest's ssh answered after {:.1} s ({probes} probe(s))",
                    started.elapsed().as_secs_f64()
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
        let text = std::fs::read(self.path("console")).unwrap_or_default();
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
    fn teardown(&mut self) {
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

impl Drop for Builder<'_> {
    /// A panic between start and teardown still stops the guest and removes the overlay.
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Kills the qemu of a build (by pid, only if its command line names the build's stem) and
/// waits a little for it to go.
fn kill_vm(pid: i32, marker: &[u8]) -> std::io::Result<bool> {
    let killed = process::kill_pid_if(pid, |cmdline| {
        !marker.is_empty()
            && cmdline.windows(marker.len()).any(|w| w == marker)
            && cmdline.windows(4).any(|w| w == b"qemu")
    })?;
    if killed {
        crate::wait::wait_for(Duration::from_secs(10), || !crate::process::pid_alive(pid));
    }
    Ok(killed)
}

/// Finds what builds of a previous life of the daemon left in `img_tmp` (a guest still running,
/// an overlay, an LVM snapshot, pid and console files) and removes it. Only stems whose lock is
/// free are touched: a running build (of this or another daemon sharing img_tmp) holds its lock.
/// Returns the stems cleaned.
pub fn recover_orphans(w: &WorkerConfig, registry: &Registry) -> Vec<String> {
    let tmp = absolute(&w.img_tmp);
    let Ok(rd) = std::fs::read_dir(&tmp) else {
        return Vec::new();
    };
    let mut stems: Vec<String> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            if !name.starts_with(STEM_PREFIX) {
                return None;
            }
            let (stem, ext) = name.rsplit_once('.')?;
            STEM_EXTS.contains(&ext).then(|| stem.to_string())
        })
        .collect();
    stems.sort();
    stems.dedup();
    let mut cleaned = Vec::new();
    for name in stems {
        let stem = tmp.join(&name);
        let lock_path = with_ext(&stem, "lock");
        let _lock = match File::open(&lock_path) {
            Ok(f) => match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(l) => Some(l),
                Err(_) => continue, // a live build holds it
            },
            Err(_) => None,
        };
        if let Some(pid) = read_pid(&with_ext(&stem, "pid")) {
            match kill_vm(pid, name.as_bytes()) {
                Ok(true) => {
                    log::warn!("recovery: killed the orphaned guest {name} (qemu pid {pid})")
                }
                Ok(false) => {}
                Err(e) => log::warn!("recovery: cannot kill qemu pid {pid} of {name}: {e}"),
            }
        }
        let mut keep_lv = false;
        if let Ok(lv) = std::fs::read(with_ext(&stem, "lv")) {
            let lv = PathBuf::from(String::from_utf8_lossy(&lv).trim().to_string());
            let ours = lv.starts_with("/dev")
                && lv.file_name().and_then(|n| n.to_str()) == Some(name.as_str());
            if ours && lv.exists() {
                let argv = commands::lvremove(w.sudo, &lv);
                let outcome = process::run(Run {
                    argv: &argv,
                    env: vec![],
                    stdin: None,
                    output: Output::Null,
                    timeout: w.timeout(),
                    cancel: None,
                    registry,
                });
                match outcome {
                    Ok(o) if o.success() => {
                        log::warn!("recovery: removed the orphaned snapshot {}", lv.display())
                    }
                    Ok(o) => {
                        keep_lv = true;
                        log::warn!(
                            "recovery: lvremove -f {} {}",
                            lv.display(),
                            o.describe(w.timeout())
                        );
                    }
                    Err(e) => {
                        keep_lv = true;
                        log::warn!("recovery: lvremove -f {}: {e}", lv.display());
                    }
                }
            }
        }
        if keep_lv {
            continue;
        }
        if with_ext(&stem, "qcow2").exists() {
            log::warn!("recovery: removing the orphaned overlay {name}.qcow2");
        }
        for ext in STEM_EXTS {
            let _ = std::fs::remove_file(with_ext(&stem, ext));
        }
        cleaned.push(name);
    }
    cleaned
}

/// Is /dev/kvm usable for a guest: openable read-write, and the CPU has hardware virtualisation
/// (without vmx/svm, as in a guest without nested virtualisation, /dev/kvm may open but a KVM
/// guest never runs)?
pub fn kvm_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm read-write: {e}"))?;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")
        .map_err(|e| format!("cannot read /proc/cpuinfo: {e}"))?;
    if !commands::cpu_has_virt(&cpuinfo) {
        return Err(
            "the CPU shows no vmx or svm flag in /proc/cpuinfo (no hardware or nested \
                    virtualisation)"
                .into(),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// preflight: what a KVM build needs on this host, looked at without running anything

/// How a preflight finding weighs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One thing the preflight looked at: `what` is the config key or device, `detail` what was
/// found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub what: &'static str,
    pub detail: String,
}

impl Finding {
    fn new(level: Level, what: &'static str, detail: impl Into<String>) -> Finding {
        Finding {
            level,
            what,
            detail: detail.into(),
        }
    }

    /// The finding as one sentence, for a build's error: "ssh key (vm_ssh_key) /k: mode 0644...".
    pub fn message(&self) -> String {
        let label = match self.what {
            "vm_base_img" => "base image (vm_base_img)",
            "vm_kernel" => "guest kernel (vm_kernel)",
            "vm_initrd" => "guest initrd (vm_initrd)",
            "vm_ssh_key" => "ssh key (vm_ssh_key)",
            other => other,
        };
        format!("{label} {}", self.detail)
    }
}

/// Checks, without running or creating anything, what a KVM build needs on this host: the
/// accelerator, the base image, kernel, initrd and ssh key, img_tmp (and mic_cachedir with the
/// 9p cache). Shared by `doctor` and the KVM builder (which fails with the first failure).
pub fn preflight(w: &WorkerConfig) -> Vec<Finding> {
    let mut out = vec![
        kvm_verdict(w.vm_accel, kvm_usable()),
        vm_file("vm_base_img", w.vm_base_img.as_deref(), true),
        vm_file("vm_kernel", w.vm_kernel.as_deref(), true),
        vm_file("vm_initrd", w.vm_initrd.as_deref(), false),
        ssh_key(w.vm_ssh_key.as_deref()),
        dir_to_write(
            "img_tmp",
            &w.img_tmp,
            "the first KVM build creates it for its overlay images",
        ),
    ];
    if w.use_9p_cache {
        out.push(dir_to_write(
            "mic_cachedir",
            &w.mic_cachedir,
            "the first KVM build creates it",
        ));
    }
    out
}

pub fn kvm_verdict(accel: VmAccel, usable: Result<(), String>) -> Finding {
    let what = "/dev/kvm";
    match (usable, accel) {
        (Ok(()), VmAccel::Tcg) => Finding::new(
            Level::Ok,
            what,
            "usable, but vm_accel = \"tcg\" does not use it",
        ),
        (Ok(()), _) => Finding::new(
            Level::Ok,
            what,
            "usable (opens read-write, CPU has vmx/svm)",
        ),
        (Err(e), VmAccel::Kvm) => Finding::new(
            Level::Fail,
            what,
            format!(
                "is not usable: {e}; vm_accel = \"kvm\" needs it (or set vm_accel = \"auto\" or \
                 \"tcg\")"
            ),
        ),
        (Err(e), VmAccel::Auto) => Finding::new(
            Level::Warn,
            what,
            format!("{e}; vm_accel = \"auto\" falls back to tcg, much slower"),
        ),
        (Err(e), VmAccel::Tcg) => Finding::new(
            Level::Ok,
            what,
            format!("not used (vm_accel = \"tcg\"): {e}"),
        ),
    }
}

/// The configured path, or the finding that says it is unset (a failure when `required`) or
/// empty (always a failure: a build reads `vm_initrd = ""` as a path, it does not mean "unset").
fn configured<'a>(
    what: &'static str,
    p: Option<&'a Path>,
    required: bool,
) -> Result<&'a Path, Finding> {
    match p {
        None if required => Err(Finding::new(
            Level::Fail,
            what,
            "not set (needed with use_kvm = true)",
        )),
        None => Err(Finding::new(Level::Ok, what, "not set (optional)")),
        Some(p) if p.as_os_str().is_empty() => Err(Finding::new(
            Level::Fail,
            what,
            format!(
                "{what} = \"\" is an empty path, which a build tries to use; {}",
                if required {
                    "set it (needed with use_kvm = true)"
                } else {
                    "remove the key to leave it unset"
                }
            ),
        )),
        Some(p) => Ok(p),
    }
}

/// A file qemu reads: a regular file or a block device (an LVM volume for the base image).
pub fn vm_file(what: &'static str, path: Option<&Path>, required: bool) -> Finding {
    let path = match configured(what, path, required) {
        Ok(p) => p,
        Err(f) => return f,
    };
    let m = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Finding::new(Level::Fail, what, format!("{}: {e}", path.display())),
    };
    let kind = if m.is_file() {
        format!("file, {} bytes", m.len())
    } else if m.file_type().is_block_device() {
        "block device".to_string()
    } else {
        return Finding::new(
            Level::Fail,
            what,
            format!("{} is neither a file nor a block device", path.display()),
        );
    };
    match File::open(path) {
        Ok(_) => Finding::new(Level::Ok, what, format!("{} ({kind})", path.display())),
        Err(e) => Finding::new(
            Level::Fail,
            what,
            format!("{} is not readable: {e}", path.display()),
        ),
    }
}

/// ssh refuses a private key that group or others may read: mode 0600 or stricter.
pub fn key_mode_verdict(mode: u32) -> Result<(), String> {
    if mode & 0o077 == 0 {
        Ok(())
    } else {
        Err(format!(
            "mode {:04o}: group/other bits set, ssh refuses such a key",
            mode & 0o7777
        ))
    }
}

pub fn ssh_key(path: Option<&Path>) -> Finding {
    let what = "vm_ssh_key";
    let path = match configured(what, path, true) {
        Ok(p) => p,
        Err(f) => return f,
    };
    let m = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Finding::new(Level::Fail, what, format!("{}: {e}", path.display())),
    };
    if !m.is_file() {
        return Finding::new(
            Level::Fail,
            what,
            format!("{} is not a file", path.display()),
        );
    }
    let mode = m.permissions().mode();
    if let Err(e) = key_mode_verdict(mode) {
        return Finding::new(
            Level::Fail,
            what,
            format!("{}: {e}; chmod 600 {}", path.display(), path.display()),
        );
    }
    match File::open(path) {
        Ok(_) => Finding::new(
            Level::Ok,
            what,
            format!("{} (mode {:04o}, readable)", path.display(), mode & 0o7777),
        ),
        Err(e) => Finding::new(
            Level::Fail,
            what,
            format!("cannot read {}: {e}", path.display()),
        ),
    }
}

/// A directory a build creates when missing: fine when it is a writable directory, or when it
/// is missing and its nearest existing ancestor is a writable directory.
pub fn dir_to_write(what: &'static str, dir: &Path, why_missing: &str) -> Finding {
    let writable = |p: &Path| {
        nix::unistd::access(
            p,
            nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
        )
        .map_err(|e| format!("{} is not writable: {}", p.display(), e.desc()))
    };
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Finding::new(
                Level::Fail,
                what,
                format!("{} is not a directory", dir.display()),
            );
        }
        Ok(_) => {
            return match writable(dir) {
                Ok(()) => Finding::new(Level::Ok, what, format!("{} (writable)", dir.display())),
                Err(e) => Finding::new(Level::Fail, what, e),
            };
        }
        Err(_) => {}
    }
    let mut cur = dir.parent();
    while let Some(c) = cur {
        let c = if c.as_os_str().is_empty() {
            Path::new(".")
        } else {
            c
        };
        match std::fs::metadata(c) {
            Ok(m) if m.is_dir() => {
                return match writable(c) {
                    Ok(()) => Finding::new(
                        Level::Ok,
                        what,
                        format!(
                            "{} does not exist yet; {why_missing} (under {}, which is writable)",
                            dir.display(),
                            c.display()
                        ),
                    ),
                    Err(e) => Finding::new(
                        Level::Fail,
                        what,
                        format!(
                            "{} does not exist and cannot be created: {e}",
                            dir.display()
                        ),
                    ),
                };
            }
            Ok(_) => {
                return Finding::new(
                    Level::Fail,
                    what,
                    format!(
                        "{} cannot be created: {} is not a directory",
                        dir.display(),
                        c.display()
                    ),
                );
            }
            Err(_) => {}
        }
        if c == Path::new(".") {
            break;
        }
        cur = c.parent();
    }
    Finding::new(
        Level::Fail,
        what,
        format!("{} cannot be created: no existing parent", dir.display()),
    )
}

fn with_ext(stem: &Path, ext: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_os_string();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn program(argv: &[OsString]) -> String {
    argv.iter()
        .find(|a| *a != "sudo" && *a != "-n")
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 1)
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
            let mode = meta.permissions().mode();
            if mode & 0o066 != 0o066 {
                let _ = std::fs::set_permissions(
                    &path,
                    std::fs::Permissions::from_mode((mode | 0o066) & 0o7777),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_leaves_locked_stems_and_cleans_free_ones() {
        let d = tempfile::tempdir().unwrap();
        let w = WorkerConfig {
            img_tmp: d.path().to_path_buf(),
            sudo: false,
            ..WorkerConfig::default()
        };
        let live = d.path().join("build-image-vm-a-1");
        let dead = d.path().join("build-image-vm-b-2");
        for stem in [&live, &dead] {
            for ext in ["qcow2", "pid", "console", "lock"] {
                std::fs::write(with_ext(stem, ext), b"").unwrap();
            }
        }
        // a pid file naming a process that is not ours: never killed
        let mut sleeper = std::process::Command::new("sleep")
            .arg("302")
            .spawn()
            .unwrap();
        std::fs::write(with_ext(&dead, "pid"), sleeper.id().to_string()).unwrap();
        std::fs::write(d.path().join("unrelated.qcow2"), b"").unwrap();
        let held = Flock::lock(
            File::open(with_ext(&live, "lock")).unwrap(),
            FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        assert_eq!(
            recover_orphans(&w, &Registry::none()),
            vec!["build-image-vm-b-2".to_string()]
        );
        assert!(
            sleeper.try_wait().unwrap().is_none(),
            "a foreign pid was killed"
        );
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                "build-image-vm-a-1.console",
                "build-image-vm-a-1.lock",
                "build-image-vm-a-1.pid",
                "build-image-vm-a-1.qcow2",
                "unrelated.qcow2"
            ]
        );
        drop(held);
        assert_eq!(
            recover_orphans(&w, &Registry::none()),
            vec!["build-image-vm-a-1".to_string()]
        );
        assert_eq!(recover_orphans(&w, &Registry::none()), Vec::<String>::new());
    }

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

    #[test]
    fn kvm_verdicts() {
        let no = || Err("cannot open /dev/kvm read-write: No such file".to_string());
        assert_eq!(kvm_verdict(VmAccel::Kvm, Ok(())).level, Level::Ok);
        assert_eq!(kvm_verdict(VmAccel::Auto, Ok(())).level, Level::Ok);
        assert_eq!(kvm_verdict(VmAccel::Kvm, no()).level, Level::Fail);
        assert_eq!(kvm_verdict(VmAccel::Auto, no()).level, Level::Warn);
        assert_eq!(kvm_verdict(VmAccel::Tcg, no()).level, Level::Ok);
        assert!(
            kvm_verdict(VmAccel::Kvm, no())
                .message()
                .starts_with("/dev/kvm is not usable: ")
        );
    }

    #[test]
    fn ssh_key_mode() {
        assert!(key_mode_verdict(0o100600).is_ok());
        assert!(key_mode_verdict(0o100400).is_ok());
        assert!(key_mode_verdict(0o100700).is_ok());
        assert!(key_mode_verdict(0o100640).is_err());
        assert!(key_mode_verdict(0o100604).is_err());
        assert!(key_mode_verdict(0o100644).unwrap_err().contains("0644"));

        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("id");
        std::fs::write(&key, "key").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let f = ssh_key(Some(&key));
        assert_eq!(f.level, Level::Fail);
        assert!(f.detail.contains("chmod 600"), "{f:?}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(ssh_key(Some(&key)).level, Level::Ok);
        assert_eq!(ssh_key(None).level, Level::Fail);
        assert_eq!(ssh_key(Some(Path::new(""))).level, Level::Fail);
    }

    #[test]
    fn vm_files() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("vmlinuz");
        std::fs::write(&f, "k").unwrap();
        assert_eq!(vm_file("vm_kernel", Some(&f), true).level, Level::Ok);
        assert_eq!(vm_file("vm_kernel", None, true).level, Level::Fail);
        assert_eq!(vm_file("vm_initrd", None, false).level, Level::Ok);
        let c = vm_file("vm_kernel", Some(&d.path().join("nope")), true);
        assert_eq!(c.level, Level::Fail);
        assert!(
            c.message().starts_with("guest kernel (vm_kernel) "),
            "{c:?}"
        );
        assert_eq!(
            vm_file("vm_kernel", Some(d.path()), true).level,
            Level::Fail
        );
        assert_eq!(
            vm_file("vm_initrd", Some(Path::new("")), false).level,
            Level::Fail
        );
        let tmp = |p: &Path| dir_to_write("img_tmp", p, "made by a build");
        assert_eq!(tmp(d.path()).level, Level::Ok);
        assert_eq!(tmp(&d.path().join("new/deeper")).level, Level::Ok);
        assert!(!d.path().join("new").exists());
        assert_eq!(tmp(&f).level, Level::Fail);
        assert_eq!(tmp(&f.join("sub")).level, Level::Fail);
    }
}
