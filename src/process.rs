//! Child processes: each runs in its own process group, with a timeout and a cancel channel;
//! when it ends, times out or is cancelled, the whole group is killed and the leader reaped.
//!
//! Invariant: nothing else in the program sends signals. The group is killed while the leader is
//! still an unreaped zombie (`waitid(WNOWAIT)`), so its pgid cannot have been reused.
//!
//! A thread may name a registry directory (`register_groups_in`): every group it starts is then
//! written there (the thread's file `t<tid>` holding the pgid and the leader's start time,
//! blanked once the group is gone) so that a daemon restarted after SIGKILL can kill the groups
//! its previous life left running (`kill_registered_groups`). One file per thread, written in
//! place: no file is created or deleted per child (on ext4, creating and deleting an inode per
//! child costs more than the child's own spawn).

use crossbeam_channel::{Receiver, bounded, never, select};
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("empty command line")]
    Empty,
    #[error("{program} not found (is it installed and on PATH?)")]
    NotFound { program: String },
    #[error("{program} is not executable: permission denied")]
    NotExecutable { program: String },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("waiting for {program} failed: {source}")]
    Wait {
        program: String,
        source: std::io::Error,
    },
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Exited(i32),
    Signalled(i32),
    TimedOut,
    Cancelled,
}

impl Outcome {
    pub fn success(self) -> bool {
        self == Outcome::Exited(0)
    }

    pub fn exit_code(self) -> Option<i32> {
        match self {
            Outcome::Exited(c) => Some(c),
            _ => None,
        }
    }

    /// "exited with status 2", "timed out after 30 s", ...
    pub fn describe(self, timeout: Duration) -> String {
        match self {
            Outcome::Exited(c) => format!("exited with status {c}"),
            Outcome::Signalled(s) => format!("was killed by signal {s}"),
            Outcome::TimedOut => format!("timed out after {} s", timeout.as_secs()),
            Outcome::Cancelled => "was cancelled".to_string(),
        }
    }
}

/// Where a child's output goes.
pub enum Output {
    Null,
    /// stdout and stderr both appended to this file.
    File(File),
}

pub struct Run<'a> {
    pub argv: &'a [OsString],
    pub env: Vec<(String, String)>,
    pub stdin: Option<Vec<u8>>,
    pub output: Output,
    pub timeout: Duration,
    /// A message or a disconnect cancels the child.
    pub cancel: Option<&'a Receiver<()>>,
}

/// A thread's registry file, removed when the thread ends.
struct Slot {
    dir: PathBuf,
    path: PathBuf,
    file: Option<File>,
    busy: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

thread_local! {
    static REGISTRY: std::cell::RefCell<Option<Slot>> = const { std::cell::RefCell::new(None) };
}

/// A registry record: fixed width, so a rewrite in place replaces the whole of the last one.
fn record(pgid: i32, start: u64) -> String {
    format!("{pgid:>10} {start:>20}\n")
}

/// A blank record, as long as `record`'s.
fn blank() -> String {
    format!("{:31}\n", "")
}

/// Children started by this thread from now on are registered in `dir` while they run.
pub fn register_groups_in(dir: &Path) {
    let tid = nix::unistd::gettid();
    REGISTRY.with(|r| {
        if r.borrow().as_ref().is_some_and(|s| s.dir == dir) {
            return;
        }
        *r.borrow_mut() = Some(Slot {
            dir: dir.to_path_buf(),
            path: dir.join(format!("t{tid}")),
            file: None,
            busy: false,
        })
    });
}

/// The start time (clock ticks since boot) of a process, from /proc.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Live (not zombie) members of a process group, with their start times.
fn group_members(pgid: i32) -> Vec<(i32, u64)> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
            // state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
            // cutime cstime priority nice threads itrealvalue starttime
            let pgrp: i32 = fields.get(2)?.parse().ok()?;
            let start: u64 = fields.get(19)?.parse().ok()?;
            (pgrp == pgid && fields.first() != Some(&"Z")).then_some((pid, start))
        })
        .collect()
}

/// Kills the groups registered in `dir` by an earlier life of this daemon that are still
/// running, and empties the registry. A group is killed only if its members all started no
/// earlier than the registered leader (so a reused id is left alone). Returns the pgids killed.
pub fn kill_registered_groups(dir: &Path) -> Vec<i32> {
    let mut killed = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return killed;
    };
    for e in rd.flatten() {
        let path = e.path();
        // `t<tid>`: "pgid start" (or blank); an older daemon's `<pgid>`: "start".
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let fields: Vec<&str> = text.split_whitespace().collect();
        let (pgid, start): (Option<i32>, Option<u64>) = match fields.as_slice() {
            [pgid, start] => (pgid.parse().ok(), start.parse().ok()),
            [start] => (
                e.file_name().to_str().and_then(|n| n.parse().ok()),
                start.parse().ok(),
            ),
            _ => (None, None),
        };
        if let (Some(pgid), Some(start)) = (pgid, start) {
            let members = group_members(pgid);
            if !members.is_empty() && members.iter().all(|(_, st)| *st >= start) {
                log::warn!("killing process group {pgid} left running by an earlier daemon");
                kill_group(Pid::from_raw(pgid));
                killed.push(pgid);
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    killed
}

/// A running group's registration: the thread's record, or (for a child started while the
/// thread's record is in use) a file of its own.
enum Registered {
    None,
    Slot,
    Own(PathBuf),
}

impl Registered {
    fn new(pid: i32) -> Registered {
        let Some(start) = start_time(pid) else {
            return Registered::None;
        };
        REGISTRY.with(|r| {
            let mut r = r.borrow_mut();
            let Some(slot) = r.as_mut() else {
                return Registered::None;
            };
            if slot.busy {
                let _ = std::fs::create_dir_all(&slot.dir);
                // Not fsynced (neither is the thread's record): the registry is for a daemon
                // that was killed while the machine ran on; a machine that went down took every
                // process group with it.
                let path = slot.dir.join(pid.to_string());
                return match crate::durable::write_atomic_unsynced(
                    &path,
                    start.to_string().as_bytes(),
                    0o644,
                ) {
                    Ok(()) => Registered::Own(path),
                    Err(e) => {
                        log::warn!("cannot register process group {pid}: {e}");
                        Registered::None
                    }
                };
            }
            if slot.file.is_none() {
                let _ = std::fs::create_dir_all(&slot.dir);
                match std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&slot.path)
                {
                    Ok(f) => slot.file = Some(f),
                    Err(e) => {
                        log::warn!("cannot register process group {pid}: {e}");
                        return Registered::None;
                    }
                }
            }
            let written = slot.file.as_ref().map(|f| {
                use std::os::unix::fs::FileExt;
                f.write_all_at(record(pid, start).as_bytes(), 0)
            });
            match written {
                Some(Ok(())) => {
                    slot.busy = true;
                    Registered::Slot
                }
                Some(Err(e)) => {
                    log::warn!("cannot register process group {pid}: {e}");
                    Registered::None
                }
                None => Registered::None,
            }
        })
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        match self {
            Registered::None => {}
            Registered::Own(path) => {
                let _ = std::fs::remove_file(path);
            }
            Registered::Slot => REGISTRY.with(|r| {
                if let Some(slot) = r.borrow_mut().as_mut() {
                    if let Some(f) = &slot.file {
                        use std::os::unix::fs::FileExt;
                        let _ = f.write_all_at(blank().as_bytes(), 0);
                    }
                    slot.busy = false;
                }
            }),
        }
    }
}

/// Where a daemon registers the process groups it starts (see the module's doc).
#[derive(Debug, Clone, Default)]
pub struct Registry {
    dir: Option<PathBuf>,
}

impl Registry {
    pub fn new(dir: PathBuf) -> Registry {
        Registry { dir: Some(dir) }
    }

    pub fn none() -> Registry {
        Registry { dir: None }
    }

    /// Registers the groups the calling thread starts from now on.
    pub fn enter(&self) {
        if let Some(d) = &self.dir {
            register_groups_in(d);
        }
    }

    /// Kills the groups an earlier life of the daemon left running.
    pub fn kill_leftovers(&self) -> Vec<i32> {
        self.dir
            .as_deref()
            .map(kill_registered_groups)
            .unwrap_or_default()
    }
}

/// Runs a command to its end in its own process group.
pub fn run(r: Run<'_>) -> Result<Outcome, ProcessError> {
    let (program, args) = r.argv.split_first().ok_or(ProcessError::Empty)?;
    let name = program.to_string_lossy().into_owned();
    let mut cmd = Command::new(program);
    cmd.args(args).process_group(0);
    for (k, v) in &r.env {
        cmd.env(k, v);
    }
    match r.output {
        Output::Null => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        Output::File(f) => {
            let err = f.try_clone().map_err(|source| ProcessError::Spawn {
                program: name.clone(),
                source,
            })?;
            cmd.stdout(f).stderr(err);
        }
    }
    cmd.stdin(if r.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    // ETXTBSY: the program file is still open for writing somewhere (being installed, or a
    // descriptor inherited by a concurrently forked child for an instant): try again shortly.
    let mut spawned = cmd.spawn();
    for _ in 0..50 {
        match &spawned {
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => {
                std::thread::sleep(Duration::from_millis(20));
                spawned = cmd.spawn();
            }
            _ => break,
        }
    }
    let mut child = spawned.map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ProcessError::NotFound {
            program: name.clone(),
        },
        std::io::ErrorKind::PermissionDenied => ProcessError::NotExecutable {
            program: name.clone(),
        },
        _ => ProcessError::Spawn {
            program: name.clone(),
            source,
        },
    })?;
    let pid = Pid::from_raw(child.id() as i32);
    let _registered = Registered::new(pid.as_raw());

    if let (Some(data), Some(stdin)) = (r.stdin, child.stdin.take()) {
        feed_stdin(stdin, data);
    }

    let deadline = Instant::now() + r.timeout;
    let never_rx = never();
    let cancel = r.cancel.unwrap_or(&never_rx);
    let waited = match pidfd_open(pid) {
        Some(fd) => wait_pidfd(&fd, deadline, cancel),
        None => wait_thread(pid, deadline, cancel),
    };
    let stopped = match waited {
        Ok(stopped) => stopped,
        Err(source) => {
            kill_group(pid);
            return Err(ProcessError::Wait {
                program: name,
                source,
            });
        }
    };
    // Whatever happened, nothing of the group may outlive the call.
    kill_group(pid);
    let status = child.wait().map_err(|source| ProcessError::Wait {
        program: name.clone(),
        source,
    })?;
    Ok(match stopped {
        Some(o) => o,
        None => match (status.code(), status.signal()) {
            (Some(c), _) => Outcome::Exited(c),
            (None, Some(s)) => Outcome::Signalled(s),
            (None, None) => Outcome::Signalled(0),
        },
    })
}

/// Writes a child's stdin without blocking us: what the pipe takes at once is written here (a
/// workitem usually fits), the rest from a thread; EPIPE (a child that does not read) is
/// ignored.
fn feed_stdin(mut stdin: std::process::ChildStdin, data: Vec<u8>) {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let mut written = 0;
    if fcntl(&stdin, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).is_ok() {
        while written < data.len() {
            match stdin.write(&data[written..]) {
                Ok(0) => return,
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return,
            }
        }
        if written == data.len() || fcntl(&stdin, FcntlArg::F_SETFL(OFlag::empty())).is_err() {
            return;
        }
    }
    std::thread::spawn(move || {
        let _ = stdin.write_all(&data[written..]);
    });
}

/// A pidfd for the child (Linux 5.3+), which becomes readable when the child exits (without
/// reaping it); None where the kernel has none.
fn pidfd_open(pid: Pid) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new file descriptor (or -1); the
    // descriptor is owned by nobody else, so OwnedFd may take it.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid.as_raw(), 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: fd is a valid descriptor just returned to us and not owned elsewhere.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// How often a waiting child's cancel channel is looked at.
const CANCEL_CHECK: Duration = Duration::from_millis(50);

/// Waits on the pidfd until the child exits (None), the deadline passes or cancel fires.
fn wait_pidfd(
    fd: &std::os::fd::OwnedFd,
    deadline: Instant,
    cancel: &Receiver<()>,
) -> std::io::Result<Option<Outcome>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(Some(Outcome::TimedOut));
        }
        match cancel.try_recv() {
            Ok(()) | Err(crossbeam_channel::TryRecvError::Disconnected) => {
                return Ok(Some(Outcome::Cancelled));
            }
            Err(crossbeam_channel::TryRecvError::Empty) => {}
        }
        let slice = (deadline - now).min(CANCEL_CHECK);
        let timeout = PollTimeout::try_from(slice).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(n) if n > 0 => return Ok(None),
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(std::io::Error::from(e)),
        }
    }
}

/// Without pidfds: a thread waits for the child's exit (without reaping it).
fn wait_thread(
    pid: Pid,
    deadline: Instant,
    cancel: &Receiver<()>,
) -> std::io::Result<Option<Outcome>> {
    let (done_tx, done_rx) = bounded::<std::io::Result<()>>(1);
    std::thread::spawn(move || {
        let res = loop {
            match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(_) => break Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => break Err(std::io::Error::from(e)),
            }
        };
        let _ = done_tx.send(res);
    });
    let stopped = select! {
        recv(done_rx) -> res => {
            if let Ok(Err(e)) = res {
                return Err(e);
            }
            None
        }
        recv(cancel) -> _ => Some(Outcome::Cancelled),
        default(deadline.saturating_duration_since(Instant::now())) => Some(Outcome::TimedOut),
    };
    if stopped.is_some() {
        kill_group(pid);
        let _ = done_rx.recv();
    }
    Ok(stopped)
}

fn kill_group(pgid: Pid) {
    match killpg(pgid, Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => log::warn!("cannot kill process group {pgid}: {e}"),
    }
}

/// Kills (SIGKILL) the one process `pid` if its command line (`/proc/<pid>/cmdline`, the
/// arguments NUL-separated) satisfies `matches`; says whether it sent the signal.
///
/// For a daemon that left our process groups (qemu `-daemonize` calls setsid) and is known only
/// by its pid file: the command-line check makes sure a pid reused by an unrelated process is
/// never hit. pid 0, 1 and negative pids (groups) are refused; a zombie has an empty command
/// line and is left alone.
pub fn kill_pid_if(pid: i32, matches: impl FnOnce(&[u8]) -> bool) -> std::io::Result<bool> {
    if pid <= 1 {
        return Ok(false);
    }
    let cmdline = match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if cmdline.is_empty() || !matches(&cmdline) {
        return Ok(false);
    }
    match nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ESRCH) => Ok(false),
        Err(e) => Err(std::io::Error::from(e)),
    }
}

/// Is the process present and not a zombie? (A daemonized or orphaned child is reaped by init,
/// or by nobody in a container, so "exists" alone is not "runs".) Reads /proc.
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Is any live (not zombie) process still in the group `pgid`? Reads /proc.
pub fn group_alive(pgid: i32) -> bool {
    !group_members(pgid).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn run_simple(v: &[&str], timeout: Duration) -> Result<Outcome, ProcessError> {
        let a = argv(v);
        run(Run {
            argv: &a,
            env: vec![],
            stdin: None,
            output: Output::Null,
            timeout,
            cancel: None,
        })
    }

    #[test]
    fn exit_codes() {
        assert_eq!(
            run_simple(&["true"], Duration::from_secs(10)).unwrap(),
            Outcome::Exited(0)
        );
        assert_eq!(
            run_simple(&["sh", "-c", "exit 3"], Duration::from_secs(10)).unwrap(),
            Outcome::Exited(3)
        );
        assert!(matches!(
            run_simple(&["/nonexistent/mic"], Duration::from_secs(1)),
            Err(ProcessError::NotFound { .. })
        ));
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let started = Instant::now();
        let out = run_simple(&["sh", "-c", &script], Duration::from_millis(500)).unwrap();
        assert_eq!(out, Outcome::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(30));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // the grandchild was in the group and was killed (and, reparented to init, reaped)
        let gone = crate::wait::wait_for(Duration::from_secs(10), || {
            nix::sys::signal::kill(Pid::from_raw(pid), None).is_err()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true)
        });
        assert!(gone, "grandchild {pid} survived");
    }

    #[test]
    fn registered_groups_are_killed_by_the_next_life() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("groups");
        let pidfile = dir.path().join("pid");
        let script = format!("echo $$ > {}; sleep 300", pidfile.display());
        let a = argv(&["sh", "-c", &script]);
        let (tx, rx) = bounded::<()>(1);
        let reg2 = reg.clone();
        // a thread that runs the child and is then abandoned, as a SIGKILLed daemon would
        let t = std::thread::spawn(move || {
            register_groups_in(&reg2);
            run(Run {
                argv: &a,
                env: vec![],
                stdin: None,
                output: Output::Null,
                timeout: Duration::from_secs(600),
                cancel: Some(&rx),
            })
        });
        assert!(crate::wait::wait_for(Duration::from_secs(10), || {
            std::fs::read_to_string(&pidfile).is_ok_and(|p| p.trim().parse::<i32>().is_ok())
                && std::fs::read_dir(&reg)
                    .map(|d| {
                        // the entry itself, not write_atomic's hidden temporary file
                        d.flatten()
                            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                            .count()
                            == 1
                    })
                    .unwrap_or(false)
        }));
        let pgid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(group_alive(pgid));
        let killed = kill_registered_groups(&reg);
        assert_eq!(killed, vec![pgid]);
        assert!(crate::wait::wait_for(Duration::from_secs(10), || {
            !group_alive(pgid)
        }));
        assert_eq!(std::fs::read_dir(&reg).unwrap().count(), 0);
        drop(tx);
        let _ = t.join();
        // an entry whose group is gone is only removed
        std::fs::write(reg.join("999999"), "1").unwrap();
        assert!(kill_registered_groups(&reg).is_empty());
        assert_eq!(std::fs::read_dir(&reg).unwrap().count(), 0);
    }

    #[test]
    fn cancel_and_stdin() {
        let (tx, rx) = bounded(1);
        tx.send(()).unwrap();
        let a = argv(&["sleep", "300"]);
        let out = run(Run {
            argv: &a,
            env: vec![],
            stdin: None,
            output: Output::Null,
            timeout: Duration::from_secs(60),
            cancel: Some(&rx),
        })
        .unwrap();
        assert_eq!(out, Outcome::Cancelled);

        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("out")).unwrap();
        let a = argv(&["sh", "-c", "cat; echo \"$X\""]);
        let out = run(Run {
            argv: &a,
            env: vec![("X".into(), "y".into())],
            stdin: Some(b"hello ".to_vec()),
            output: Output::File(f),
            timeout: Duration::from_secs(10),
            cancel: None,
        })
        .unwrap();
        assert_eq!(out, Outcome::Exited(0));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out")).unwrap(),
            "hello y\n"
        );
    }

    #[test]
    fn kill_pid_if_checks_the_command_line() {
        let mut child = Command::new("sleep").arg("301").spawn().unwrap();
        let pid = child.id() as i32;
        let has =
            |needle: &'static [u8]| move |c: &[u8]| c.windows(needle.len()).any(|w| w == needle);
        // until the child has exec'd, its command line is ours
        assert!(crate::wait::wait_for(Duration::from_secs(10), || {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| has(b"sleep\x00301")(&c))
        }));
        assert!(!kill_pid_if(pid, has(b"qemu-system")).unwrap());
        assert!(
            child.try_wait().unwrap().is_none(),
            "a non-matching pid was killed"
        );
        assert!(!kill_pid_if(1, |_| true).unwrap());
        assert!(!kill_pid_if(0, |_| true).unwrap());
        assert!(kill_pid_if(pid, has(b"sleep\x00301")).unwrap());
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(9));
        // reaped: gone
        assert!(!kill_pid_if(pid, has(b"sleep\x00301")).unwrap());
    }

    #[test]
    fn stdin_larger_than_a_pipe_is_fed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!("cat > {}", out.display());
        let a = argv(&["sh", "-c", &script]);
        for len in [10usize, 1 << 20] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let o = run(Run {
                argv: &a,
                env: vec![],
                stdin: Some(data.clone()),
                output: Output::Null,
                timeout: Duration::from_secs(60),
                cancel: None,
            })
            .unwrap();
            assert_eq!(o, Outcome::Exited(0));
            assert_eq!(std::fs::read(&out).unwrap(), data, "{len} bytes");
        }
    }
}
