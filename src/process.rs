//! Child processes: each runs in its own process group, with a timeout and a cancel channel;
//! when it ends, times out or is cancelled, the whole group is killed and the leader reaped.
//!
//! Invariant: nothing else in the program sends signals. The group is killed while the leader is
//! still an unreaped zombie (`waitid(WNOWAIT)`), so its pgid cannot have been reused.

use crossbeam_channel::{Receiver, bounded, never, select};
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::fs::File;
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
    let mut child = cmd.spawn().map_err(|source| match source.kind() {
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

    if let (Some(data), Some(mut stdin)) = (r.stdin, child.stdin.take()) {
        // A child that does not read its stdin must not block us: write from a thread and
        // ignore EPIPE.
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }

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

    let deadline = Instant::now() + r.timeout;
    let never_rx = never();
    let cancel = r.cancel.unwrap_or(&never_rx);
    let stopped = select! {
        recv(done_rx) -> res => {
            if let Ok(Err(source)) = res {
                kill_group(pid);
                return Err(ProcessError::Wait { program: name, source });
            }
            None
        }
        recv(cancel) -> _ => Some(Outcome::Cancelled),
        default(deadline.saturating_duration_since(Instant::now())) => Some(Outcome::TimedOut),
    };
    // Whatever happened, nothing of the group may outlive the call.
    kill_group(pid);
    if stopped.is_some() {
        let _ = done_rx.recv();
    }
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

fn kill_group(pgid: Pid) {
    match killpg(pgid, Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => log::warn!("cannot kill process group {pgid}: {e}"),
    }
}

/// Is any live (not zombie) process still in the group `pgid`? Reads /proc.
pub fn group_alive(pgid: i32) -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return killpg(Pid::from_raw(pgid), None).is_ok();
    };
    rd.flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        // pid (comm) state ppid pgrp ...: comm may contain spaces, so split after the last ')'
        let mut rest = stat.rsplit(')').next().unwrap_or("").split_whitespace();
        let state = rest.next();
        let pgrp = rest.nth(1).and_then(|p| p.parse::<i32>().ok());
        pgrp == Some(pgid) && state != Some("Z")
    })
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
}
