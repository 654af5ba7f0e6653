//! One throw-away guest, whatever it is for: its files in img_tmp and their lock, the overlay (a
//! qcow2 file or an LVM snapshot), booting qemu, waiting for its ssh, the connection held open
//! to it (warm guests), and the teardown. A build's guest ([`super::sequence::Guest`]) is a
//! [`Machine`] plus the job; a warm guest is a [`Machine`] the pool booted ahead
//! ([`super::pool`]) and hands to one build.
//!
//! Invariant: [`Machine::teardown`] runs once whatever happened before (a failure, a timeout, a
//! cancel, a panic: `Drop` calls it): the guest is powered off or its qemu killed, its held ssh
//! connection ended, the overlay removed, the files in img_tmp removed; only an LVM snapshot
//! that cannot be removed keeps its record (and the lock is let go), for the next start's
//! recovery.

use super::absolute;
use super::commands::{self, Accel, Ssh, Vm};
use super::orphans::{STEM_DIRS, STEM_EXTS, kill_vm, new_stem, read_pid, with_ext};
use super::preflight::{kvm_usable, message, preflight};
mod held;

use crate::config::WorkerConfig;
use crate::health::Status;
use crate::imaging::joblog::{OutputTail, failure};
use crate::imaging::{JobLog, mic};
use crate::process::{self, Capture, Outcome, Output, Registry, Run};
use crossbeam_channel::{Receiver, TryRecvError};
use held::Master;
use nix::fcntl::Flock;
use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// At most this long for the guest to power off, then its qemu is killed.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);
/// One ssh probe while waiting for the guest.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts at starting qemu when another program took the forwarded port meanwhile.
const PORT_ATTEMPTS: usize = 5;

/// Why a build (or a warm guest's boot) stopped early.
pub(super) enum Stop {
    /// The host, qemu, the guest or ssh failed (an infrastructure failure).
    Failed(String),
    /// mic itself failed in the guest (the image's failure).
    Image(String),
    Cancelled,
}

pub(super) type Step<T> = Result<T, Stop>;

/// The guest's disk: a qcow2 overlay file, or an LVM snapshot (its /dev path).
enum Overlay {
    File(PathBuf),
    Lv(PathBuf),
}

/// One guest: where its steps are logged, what cancels them, and what it has made so far (for
/// the teardown).
pub(super) struct Machine {
    w: Arc<WorkerConfig>,
    log: JobLog,
    cancel: Receiver<()>,
    registry: Registry,
    /// `<img_tmp>/build-image-vm-<dir_id>-<random>`: the guest's files are this plus an extension.
    pub(super) stem: PathBuf,
    lock: Option<Flock<File>>,
    overlay: Option<Overlay>,
    pub(super) qemu_pid: Option<i32>,
    pub(super) port: u16,
    key: PathBuf,
    ssh_up: bool,
    torn_down: bool,
    /// Where qemu writes the guest's serial console.
    pub(super) console: PathBuf,
    /// With the 9p cache: the host folder the guest sees as `mic_output`.
    pub(super) share_out: PathBuf,
    /// With a held connection: ssh's `ControlPath=` option for it.
    control: Option<OsString>,
    master: Option<Master>,
    /// A warm guest's console (in img_tmp) is copied here at the teardown: the job's
    /// `console.log`.
    pub(super) console_copy: Option<PathBuf>,
    /// From qemu's start to ssh answering, seconds (0 until it answered).
    pub(super) boot_seconds: f64,
    /// The last output of the command [`Machine::exec`] ran last: what its error quotes.
    output: OutputTail,
}

impl Machine {
    /// A guest that has made nothing yet; its console goes to `console`, and with the 9p cache
    /// the guest's `mic_output` is `share_out`.
    pub(super) fn new(
        w: Arc<WorkerConfig>,
        log: JobLog,
        cancel: Receiver<()>,
        registry: Registry,
        console: PathBuf,
        share_out: PathBuf,
    ) -> Machine {
        Machine {
            w,
            log,
            cancel,
            registry,
            stem: PathBuf::new(),
            lock: None,
            overlay: None,
            qemu_pid: None,
            port: 0,
            key: PathBuf::new(),
            ssh_up: false,
            torn_down: true,
            console,
            share_out,
            control: None,
            master: None,
            console_copy: None,
            boot_seconds: 0.0,
            output: OutputTail::new(),
        }
    }

    /// From now on the guest's steps go to `log` and `cancel` stops them (a warm guest taken by
    /// a build).
    pub(super) fn hand_over(&mut self, log: JobLog, cancel: Receiver<()>, registry: Registry) {
        self.log = log;
        self.cancel = cancel;
        self.registry = registry;
    }

    pub(super) fn log(&self) -> &JobLog {
        &self.log
    }

    /// Whether the guest's qemu and (if any) its held connection still run.
    pub(super) fn alive(&self) -> bool {
        self.qemu_pid.is_some_and(process::pid_alive)
            && self.master.as_ref().is_none_or(|m| !m.thread.is_finished())
    }

    /// A line in the log (a log that cannot be written is reported once, then ignored: the
    /// build's outcome does not depend on it).
    pub(super) fn note(&mut self, text: &str) {
        if let Err(e) = self.log.line(text) {
            log::warn!("cannot write job log {}: {e}", self.log.path().display());
        }
    }

    pub(super) fn path(&self, ext: &str) -> PathBuf {
        with_ext(&self.stem, ext)
    }

    fn ssh(&self, connect_timeout: u64) -> Ssh<'_> {
        Ssh {
            key: &self.key,
            port: self.port,
            connect_timeout,
        }
    }

    /// `argv` (an ssh or scp line) through the held connection when there is one.
    fn via(&self, argv: Vec<OsString>) -> Vec<OsString> {
        match &self.control {
            Some(c) => super::warm::through_master(&argv, c),
            None => argv,
        }
    }

    /// `ssh ... <remote>` to the guest (through the held connection when there is one).
    pub(super) fn ssh_line(&self, remote: &str) -> Vec<OsString> {
        self.via(self.ssh(10).ssh(remote))
    }

    pub(super) fn scp_to(&self, local: &Path, remote_path: &str) -> Vec<OsString> {
        self.via(self.ssh(10).scp_to(local, remote_path))
    }

    pub(super) fn scp_dir_from(&self, remote_dir: &str, local_parent: &Path) -> Vec<OsString> {
        self.via(self.ssh(10).scp_dir_from(remote_dir, local_parent))
    }

    /// Runs one command, its output into the log after a line with the command.
    pub(super) fn exec(
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
            cancel: cancellable.then_some(&self.cancel),
            registry: &self.registry,
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

    /// What the last [`Machine::exec`] printed last.
    pub(super) fn output_text(&self) -> String {
        self.output.text()
    }

    /// Runs one step that must succeed; `what` names it in the error.
    pub(super) fn must(
        &mut self,
        what: &str,
        argv: &[OsString],
        stdin: Option<Vec<u8>>,
    ) -> Step<()> {
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
    /// into the log when `log_it`.
    pub(super) fn capture(
        &mut self,
        argv: &[OsString],
        stdin: Option<Vec<u8>>,
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
            stdin,
            output: Output::Capture(capture.clone()),
            timeout,
            cancel: Some(&self.cancel),
            registry: &self.registry,
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

    /// Step 1: everything the guest needs is there, before anything is made (the preflight
    /// `doctor` shows too; its first failure fails the build).
    pub(super) fn check_host(&mut self) -> Step<Accel> {
        let w = Arc::clone(&self.w);
        if let Some(c) = preflight(&w).into_iter().find(|c| c.status == Status::Fail) {
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

    /// The guest's stem in img_tmp and its lock, taken before any other file is made.
    pub(super) fn start_files(&mut self, dir_id: &str) -> Step<()> {
        let (stem, lock) = new_stem(&self.w.img_tmp, dir_id, random()).map_err(Stop::Failed)?;
        self.stem = stem;
        self.lock = Some(lock);
        self.torn_down = false;
        Ok(())
    }

    /// The guest with the stem (and its held lock) made for it already.
    pub(super) fn with_stem(mut self, stem: PathBuf, lock: Flock<File>) -> Machine {
        self.stem = stem;
        self.lock = Some(lock);
        self.torn_down = false;
        self
    }

    pub(super) fn uses_9p(&self) -> bool {
        self.w.use_9p_cache
    }

    /// Step 5: the host's mic (or mic2), proxy and resolver configuration into the guest, each
    /// when the host has it; `dirs` are made in the guest with the configuration's folders.
    pub(super) fn copy_host_config(&mut self, dirs: &[&str]) -> Step<()> {
        let mic_conf = match self.w.ict {
            crate::config::Ict::Mic => "/etc/mic/mic.conf",
            crate::config::Ict::Mic2 => "/etc/mic2/mic2.conf",
        };
        let conf_dir = Path::new(mic_conf)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut all = vec![conf_dir.as_str(), "/etc/sysconfig"];
        all.extend_from_slice(dirs);
        let argv = self.ssh_line(&commands::mkdir_p(&all));
        let what = if dirs.is_empty() {
            "creating the configuration folders in the guest"
        } else {
            "creating the job directory in the guest"
        };
        self.must(what, &argv, None)?;
        for file in [mic_conf, "/etc/sysconfig/proxy", "/etc/resolv.conf"] {
            let local = Path::new(file);
            if !local.is_file() {
                self.note(&format!("{file}: not on this host, not copied"));
                continue;
            }
            let argv = self.scp_to(local, file);
            self.must(&format!("copying {file} to the guest"), &argv, None)?;
        }
        Ok(())
    }

    /// Step 2: an LVM snapshot when the base is a logical volume, else a qcow2 overlay file.
    pub(super) fn make_overlay(&mut self) -> Step<(PathBuf, String)> {
        let w = Arc::clone(&self.w);
        let base = absolute(w.vm_base_img.as_deref().unwrap_or(Path::new("")));
        if base.starts_with("/dev") {
            let (outcome, out) =
                self.capture(&commands::lvdisplay(w.sudo, &base), None, w.timeout(), true)?;
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
        let (outcome, out) =
            self.capture(&commands::qemu_img_info(&base), None, w.timeout(), true)?;
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
    pub(super) fn start_guest(&mut self, accel: Accel, disk: &Path, format: &str) -> Step<()> {
        let w = Arc::clone(&self.w);
        let pidfile = self.path("pid");
        // an earlier attempt's console is not this one's
        let _ = std::fs::remove_file(&self.console);
        let kernel = absolute(w.vm_kernel.as_deref().unwrap_or(Path::new("")));
        let initrd = w.vm_initrd.as_deref().map(absolute);
        let cache = absolute(&w.mic_cachedir);
        let share = absolute(&self.share_out);
        let console = self.console.clone();
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
                share_9p: w.use_9p_cache.then_some((cache.as_path(), share.as_path())),
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
    /// for. Sets [`Machine::boot_seconds`].
    pub(super) fn wait_for_ssh(&mut self, console_name: &str) -> Step<()> {
        let w = Arc::clone(&self.w);
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
                && !process::pid_alive(pid)
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
            let (outcome, out) = self.capture(&argv, None, timeout, false)?;
            if outcome.success() {
                self.ssh_up = true;
                self.boot_seconds = started.elapsed().as_secs_f64();
                self.note(&format!(
                    "guest's ssh answered after {:.1} s ({probes} probe(s)); its console is \
                     {console_name}",
                    self.boot_seconds
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

    /// The last lines of the guest's serial console, one line.
    pub(super) fn console_tail(&self, n: usize) -> String {
        let text = std::fs::read(&self.console).unwrap_or_default();
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

    /// The guest's part of the teardown: powered off (killed when it does not go, or at once
    /// when its ssh never answered), its held connection ended. Again is a no-op.
    pub(super) fn stop_guest(&mut self) {
        let short = self.w.timeout().min(SHUTDOWN_WAIT);
        if let Some(pid) = self.qemu_pid.take() {
            if self.ssh_up {
                let argv = self.ssh_line(&commands::shutdown());
                // ssh may lose the connection as the guest goes down: any end is fine
                let _ = self.exec(&argv, None, short, false);
                self.note(&format!(
                    "waiting up to {} s for qemu (pid {pid}) to end",
                    short.as_secs()
                ));
                if crate::wait::wait_for(short, || !process::pid_alive(pid)) {
                    self.note("guest powered off");
                }
            }
            if process::pid_alive(pid) {
                self.kill_qemu(pid);
            }
        }
        self.end_master();
    }

    /// A warm guest nobody will use: no clean power-off (nothing in it is worth one), killed.
    pub(super) fn discard(&mut self) {
        self.ssh_up = false;
        self.teardown();
    }

    /// Step 8: sync and power off the guest, wait for its qemu to end (kill it when it does
    /// not), end the held connection, remove the overlay and the files. Runs once, whatever
    /// happened before; nothing here can be cancelled.
    pub(super) fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        let w = Arc::clone(&self.w);
        self.stop_guest();
        if let Some(copy) = self.console_copy.take() {
            copy_console(&self.console, &copy);
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
        for ext in STEM_DIRS {
            let _ = std::fs::remove_dir_all(self.path(ext));
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

impl Drop for Machine {
    /// A panic between start and teardown still stops the guest and removes the overlay.
    fn drop(&mut self) {
        self.teardown();
    }
}

pub(super) fn program(argv: &[OsString]) -> String {
    argv.iter()
        .find(|a| *a != "sudo" && *a != "-n")
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Random bits from the kernel (the time and pid when /dev/urandom cannot be read).
pub(super) fn random() -> u64 {
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

/// Copies the guest's console file (bounded by what qemu wrote) to `to`; a failure is logged.
pub(super) fn copy_console(from: &Path, to: &Path) {
    if let Err(e) = std::fs::copy(from, to)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        log::warn!("cannot copy {} to {}: {e}", from.display(), to.display());
    }
}
