//! Child output: the pipe that stdout and stderr share, pumped by a thread (`Pump`) into the
//! caller's sink, and the bounded sink kept in memory (`Capture`: head and tail) that `output`
//! reads.
//!
//! Invariant: all child output passes through here, so callers can bound it. The pump never
//! blocks the child (a write error of the sink drops the rest of the output) and never hangs the
//! caller: once the group is killed, what is still in the pipe is read for at most `DRAIN`, so an
//! escaped grandchild holding the pipe cannot keep the call waiting.

use super::{Outcome, Output, ProcessError, Registry, Run, run};
use nix::fcntl::OFlag;
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How much output [`output`] keeps: the first and the last half of this.
pub const CAPTURE_LIMIT: usize = 64 * 1024;

/// After the group is killed, output still in the pipe is read for at most this long.
const DRAIN: Duration = Duration::from_secs(2);

/// Bytes kept in memory: the first `limit / 2` and the last `limit / 2`, with a count of what
/// was dropped between them.
struct Bounded {
    limit: usize,
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    omitted: u64,
}

impl Bounded {
    fn new(limit: usize) -> Bounded {
        Bounded {
            limit: limit.max(2),
            head: Vec::new(),
            tail: std::collections::VecDeque::new(),
            omitted: 0,
        }
    }

    fn push(&mut self, mut data: &[u8]) {
        let half = self.limit / 2;
        if self.head.len() < half {
            let n = (half - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        let keep = self.limit - half;
        if data.len() >= keep {
            self.omitted += (self.tail.len() + data.len() - keep) as u64;
            self.tail.clear();
            self.tail.extend(&data[data.len() - keep..]);
            return;
        }
        let over = (self.tail.len() + data.len()).saturating_sub(keep);
        self.omitted += over as u64;
        self.tail.drain(..over);
        self.tail.extend(data);
    }

    fn text(&self) -> String {
        let mut out = String::from_utf8_lossy(&self.head).into_owned();
        if self.omitted > 0 {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&format!(
                "[... {} bytes of output omitted ...]\n",
                self.omitted
            ));
        }
        let (a, b) = self.tail.as_slices();
        let mut tail = a.to_vec();
        tail.extend_from_slice(b);
        out.push_str(&String::from_utf8_lossy(&tail));
        out
    }
}

/// A child's output kept in memory, bounded: cloned handles share it.
#[derive(Clone)]
pub struct Capture(Arc<Mutex<Bounded>>);

impl Capture {
    /// Keeps at most `limit` bytes: the first and the last half of the output.
    pub fn new(limit: usize) -> Capture {
        Capture(Arc::new(Mutex::new(Bounded::new(limit))))
    }

    /// What was kept (lossily decoded), with a marker line where output was dropped.
    pub fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).text()
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs a short command (a probe) and returns how it ended with its combined stdout and stderr,
/// bounded to [`CAPTURE_LIMIT`] (head and tail).
pub fn output(
    argv: &[OsString],
    timeout: Duration,
    registry: &Registry,
) -> Result<(Outcome, String), ProcessError> {
    let capture = Capture::new(CAPTURE_LIMIT);
    let outcome = run(Run {
        argv,
        env: vec![],
        stdin: None,
        output: Output::Capture(capture.clone()),
        timeout,
        cancel: None,
        registry,
    })?;
    Ok((outcome, capture.text()))
}

/// The reading end of a child's output pipe, pumped by a thread into the sink.
pub(super) struct Pump {
    /// Closed (dropped) to tell the pump the group is gone: drain, then stop.
    stop: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pump {
    pub(super) fn start(out: OwnedFd, sink: Box<dyn Write + Send>) -> std::io::Result<Pump> {
        let (stop_rx, stop_tx) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
        let thread = std::thread::Builder::new()
            .name("child-output".into())
            .spawn(move || pump(out, stop_rx, sink))?;
        Ok(Pump {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The group is gone: what is still in the pipe is read (up to EOF, or DRAIN at most).
    pub(super) fn finish(&mut self) {
        self.stop = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Copies the pipe into the sink until EOF; once `stop` is closed, until EOF or DRAIN.
fn pump(out: OwnedFd, stop: OwnedFd, mut sink: Box<dyn Write + Send>) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut buf = vec![0u8; 64 * 1024];
    let mut deadline: Option<Instant> = None;
    let mut sink_ok = true;
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
            }
        };
        let (out_ready, stop_ready) = {
            let mut fds = vec![PollFd::new(out.as_fd(), PollFlags::POLLIN)];
            if deadline.is_none() {
                fds.push(PollFd::new(stop.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
            }
            let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), fds.get(1).is_some_and(ready))
        };
        if stop_ready {
            deadline = Some(Instant::now() + DRAIN);
        }
        if !out_ready {
            continue;
        }
        match nix::unistd::read(&out, &mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if sink_ok && let Err(e) = sink.write_all(&buf[..n]) {
                    log::warn!("child output lost: {e}");
                    sink_ok = false;
                }
            }
            Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::EAGAIN) => {}
            Err(_) => break,
        }
    }
    let _ = sink.flush();
}

#[cfg(test)]
mod tests {
    use super::super::kill_pid_if;
    use super::super::tests::argv;
    use super::*;

    #[test]
    fn output_is_captured_bounded() {
        let a = argv(&[
            "sh",
            "-c",
            "echo start; head -c 300000 /dev/zero | tr '\\0' x; echo; echo end >&2; exit 3",
        ]);
        let (o, text) = output(&a, Duration::from_secs(30), &Registry::none()).unwrap();
        assert_eq!(o, Outcome::Exited(3));
        assert!(text.starts_with("start\n"), "{}", &text[..20]);
        assert!(text.ends_with("end\n"));
        assert!(text.contains("bytes of output omitted ...]"));
        assert!(text.len() < CAPTURE_LIMIT + 100, "{}", text.len());
        let (o, text) = output(
            &argv(&["sh", "-c", "echo hi"]),
            Duration::from_secs(10),
            &Registry::none(),
        )
        .unwrap();
        assert_eq!((o, text.as_str()), (Outcome::Exited(0), "hi\n"));
    }

    #[test]
    fn an_escaped_grandchild_holding_the_pipe_does_not_hang_us() {
        // setsid takes the grandchild out of the group: it survives the kill and keeps the pipe
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "setsid sh -c 'echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 300' & \
             while [ ! -s {p} ]; do sleep 0.01; done; echo parent; exit 0",
            p = pidfile.display()
        );
        let (o, text) = output(
            &argv(&["sh", "-c", &script]),
            Duration::from_secs(60),
            &Registry::none(),
        )
        .unwrap();
        assert_eq!(o, Outcome::Exited(0));
        assert!(text.contains("parent"), "{text}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(kill_pid_if(pid, |c| c.starts_with(b"sleep")).unwrap());
    }
}
