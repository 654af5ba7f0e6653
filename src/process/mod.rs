//! Child processes: each runs in its own process group, with a timeout and a cancel channel;
//! when it ends, times out or is cancelled, the whole group is killed and the leader reaped.
//!
//! Invariant: nothing else in the program sends signals, but `cgroup` (the processes of one
//! build's place, by its cgroup or its environment marker). The group is killed while the leader is
//! still an unreaped zombie (`waitid(WNOWAIT)`), so its pgid cannot have been reused.
//!
//! This file owns spawning and waiting (`run`: the pidfd or `waitid` wait, the timeout, the
//! cancel channel, stdin), killing the group, and the /proc checks of one process or group
//! (`kill_pid_if`, `pid_alive`, `group_alive`). All child output passes through `capture`:
//! stdout and stderr share one pipe, pumped by a thread into the caller's sink ([`Output`]), so
//! callers can bound it. Every group started through a [`Registry`] (`registry`) is recorded in
//! its directory while it runs, from whatever thread started it.

mod capture;
pub mod cgroup;
mod registry;

pub use capture::{CAPTURE_LIMIT, Capture, output};
pub use registry::Registry;

use capture::Pump;
use registry::group_members;

use crossbeam_channel::{Receiver, bounded, never, select};
use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
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
    /// No output for this many seconds (a stall timeout): killed.
    Stalled(u64),
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
            // Why (an operator's cancel, a daemon's stop) is said by whoever stopped it.
            Outcome::Cancelled => "was stopped: its process group was killed".to_string(),
            Outcome::Stalled(s) => {
                format!("stalled: no output for {s} s (stall_timeout), killed")
            }
        }
    }
}

/// Where a child's output goes. stdout and stderr share one pipe that `run` pumps, so whatever
/// the child prints passes through here (and can be bounded).
pub enum Output {
    /// Both to /dev/null (no pipe).
    Null,
    /// Pumped into this writer until EOF (or, once the group is killed, until a short drain
    /// deadline: an escaped grandchild holding the pipe cannot hang the caller). A write error
    /// of the sink drops the rest of the output but never blocks the child.
    Sink(Box<dyn Write + Send>),
    /// Kept in memory, bounded (head and tail); read it with [`Capture::text`].
    Capture(Capture),
}

pub struct Run<'a> {
    pub argv: &'a [OsString],
    pub env: Vec<(String, String)>,
    pub stdin: Option<Vec<u8>>,
    pub output: Output,
    pub timeout: Duration,
    /// A message or a disconnect cancels the child.
    pub cancel: Option<&'a Receiver<()>>,
    /// Where the child's group is registered while it runs.
    pub registry: &'a Registry,
}

/// Runs a command to its end in its own process group.
pub fn run(r: Run<'_>) -> Result<Outcome, ProcessError> {
    run_with(r, With::default())
}

/// Makes `cmd`'s child write itself into a cgroup (the `cgroup.procs` file given, opened by the
/// caller) before it runs its program, so that nothing it starts can leave the cgroup.
pub fn enter_before_exec(cmd: &mut Command, procs: &std::fs::File) {
    use std::os::fd::AsRawFd;
    let fd = procs.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and calls only write(2), which
    // is async-signal-safe; `fd` stays open in the parent until the spawn returns (the caller
    // holds the file), so it is open in the child.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// What a build's command gets beyond [`Run`].
#[derive(Default)]
pub struct With<'a> {
    /// The child (and all it starts) is put into the cgroup whose `cgroup.procs` this is
    /// before it runs its program.
    pub procs: Option<&'a std::fs::File>,
    /// The child is killed as stalled ([`Outcome::Stalled`]) when it has written no output for
    /// this long (its output must go to a sink or a capture).
    pub stall: Option<Duration>,
    /// The child runs in a private mount namespace of its own (needs root; where it cannot,
    /// it runs in the host's): what it mounts is never seen by the host, and goes when its
    /// last process does.
    pub private_mounts: bool,
}

/// Makes `cmd`'s child enter a private mount namespace before it runs its program: nothing
/// it mounts propagates to the host. Where that fails (not root), it runs on in the host's.
pub fn private_mounts_before_exec(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and calls only unshare(2) and
    // mount(2), which are async-signal-safe, with static arguments.
    unsafe {
        cmd.pre_exec(|| {
            use nix::libc;
            if libc::unshare(libc::CLONE_NEWNS) == 0 {
                let root = b"/\0";
                libc::mount(
                    std::ptr::null(),
                    root.as_ptr().cast(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                );
            }
            Ok(())
        });
    }
}

/// When a child last wrote output: updated by the sink wrapper [`Touching`].
#[derive(Clone)]
struct LastOutput(std::sync::Arc<std::sync::Mutex<Instant>>);

impl LastOutput {
    fn silent_for(&self) -> Duration {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).elapsed()
    }
}

/// A sink that notes when output passed through it.
struct Touching {
    inner: Box<dyn Write + Send>,
    last: LastOutput,
}

impl Write for Touching {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        *self.last.0.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The stall watch of one run: the limit and the last output.
struct Stall {
    limit: Duration,
    last: LastOutput,
}

impl Stall {
    fn check(&self) -> Option<Outcome> {
        (self.last.silent_for() >= self.limit).then_some(Outcome::Stalled(self.limit.as_secs()))
    }
}

/// As [`run`], with what [`With`] adds.
pub fn run_with(r: Run<'_>, with: With<'_>) -> Result<Outcome, ProcessError> {
    let procs = with.procs;
    let (program, args) = r.argv.split_first().ok_or(ProcessError::Empty)?;
    let name = program.to_string_lossy().into_owned();
    let spawn_err = |source: std::io::Error| ProcessError::Spawn {
        program: name.clone(),
        source,
    };
    let mut cmd = Command::new(program);
    cmd.args(args).process_group(0);
    if let Some(procs) = procs {
        enter_before_exec(&mut cmd, procs);
    }
    if with.private_mounts {
        private_mounts_before_exec(&mut cmd);
    }
    for (k, v) in &r.env {
        cmd.env(k, v);
    }
    let sink: Option<Box<dyn Write + Send>> = match r.output {
        Output::Null => None,
        Output::Sink(s) => Some(s),
        Output::Capture(c) => Some(Box::new(c)),
    };
    let mut stall = None;
    let sink = match (sink, with.stall) {
        (Some(inner), Some(limit)) => {
            let last = LastOutput(std::sync::Arc::new(std::sync::Mutex::new(Instant::now())));
            stall = Some(Stall {
                limit,
                last: last.clone(),
            });
            Some(Box::new(Touching { inner, last }) as Box<dyn Write + Send>)
        }
        (sink, _) => sink,
    };
    let mut reader = None;
    match sink {
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        Some(sink) => {
            let (rd, wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
                .map_err(|e| spawn_err(std::io::Error::from(e)))?;
            let wr2 = wr.try_clone().map_err(spawn_err)?;
            cmd.stdout(Stdio::from(wr)).stderr(Stdio::from(wr2));
            reader = Some((rd, sink));
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
    // Our copies of the pipe's writing end go with the command: the pump sees EOF when the
    // child's group has closed it.
    drop(cmd);
    let mut child = spawned.map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ProcessError::NotFound {
            program: name.clone(),
        },
        std::io::ErrorKind::PermissionDenied => ProcessError::NotExecutable {
            program: name.clone(),
        },
        _ => spawn_err(source),
    })?;
    let pid = Pid::from_raw(child.id() as i32);
    let _registered = r.registry.register(pid.as_raw());
    let mut pump = match reader.map(|(rd, sink)| Pump::start(rd, sink)).transpose() {
        Ok(p) => p,
        Err(source) => {
            kill_group(pid);
            let _ = child.wait();
            return Err(spawn_err(source));
        }
    };

    if let (Some(data), Some(stdin)) = (r.stdin, child.stdin.take()) {
        feed_stdin(stdin, data);
    }

    let deadline = Instant::now() + r.timeout;
    let never_rx = never();
    let cancel = r.cancel.unwrap_or(&never_rx);
    let waited = match pidfd_open(pid) {
        Some(fd) => wait_pidfd(&fd, deadline, cancel, stall.as_ref()),
        None => wait_thread(pid, deadline, cancel, stall.as_ref()),
    };
    // Whatever happened, nothing of the group may outlive the call.
    kill_group(pid);
    if let Some(p) = pump.as_mut() {
        p.finish();
    }
    let stopped = match waited {
        Ok(stopped) => stopped,
        Err(source) => {
            let _ = child.wait();
            return Err(ProcessError::Wait {
                program: name,
                source,
            });
        }
    };
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
    stall: Option<&Stall>,
) -> std::io::Result<Option<Outcome>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(Some(Outcome::TimedOut));
        }
        if let Some(o) = stall.and_then(Stall::check) {
            return Ok(Some(o));
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
    stall: Option<&Stall>,
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
    let stopped = loop {
        if let Some(o) = stall.and_then(Stall::check) {
            break Some(o);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Some(Outcome::TimedOut);
        }
        select! {
            recv(done_rx) -> res => {
                if let Ok(Err(e)) = res {
                    return Err(e);
                }
                break None;
            }
            recv(cancel) -> _ => break Some(Outcome::Cancelled),
            default(left.min(CANCEL_CHECK)) => {}
        }
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
    use std::fs::File;

    pub(super) fn argv(v: &[&str]) -> Vec<OsString> {
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
            registry: &Registry::none(),
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
    fn a_silent_child_stalls_and_a_talking_one_does_not() {
        let stalled = |script: &str| {
            let a = argv(&["sh", "-c", script]);
            run_with(
                Run {
                    argv: &a,
                    env: vec![],
                    stdin: None,
                    output: Output::Capture(Capture::new(1024)),
                    timeout: Duration::from_secs(60),
                    cancel: None,
                    registry: &Registry::none(),
                },
                With {
                    procs: None,
                    stall: Some(Duration::from_secs(1)),
                    private_mounts: false,
                },
            )
            .unwrap()
        };
        assert_eq!(stalled("echo hi; sleep 300"), Outcome::Stalled(1));
        assert_eq!(
            stalled("for i in 1 2 3 4 5 6; do echo $i; sleep 0.3; done"),
            Outcome::Exited(0)
        );
        assert!(
            Outcome::Stalled(1)
                .describe(Duration::ZERO)
                .contains("stall_timeout")
        );
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
            registry: &Registry::none(),
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
            output: Output::Sink(Box::new(f)),
            timeout: Duration::from_secs(10),
            cancel: None,
            registry: &Registry::none(),
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
                registry: &Registry::none(),
            })
            .unwrap();
            assert_eq!(o, Outcome::Exited(0));
            assert_eq!(std::fs::read(&out).unwrap(), data, "{len} bytes");
        }
    }
}
