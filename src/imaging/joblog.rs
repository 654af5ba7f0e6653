//! The job's log file, bounded: every command of a build and its output, each step after a
//! timestamped line ([`JobLog`]).
//!
//! Invariant: past its bound the file holds its head, one marker line "[... N bytes of output
//! omitted ...]" and its latest tail, N counting every byte cut so far (across attempts: a
//! reopened log finds the marker and goes on counting); `logread` relies on this layout.

use crate::config::WorkerConfig;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode as FileMode;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The job log's bound in bytes (`job_log_max_mb`, at least 64 KiB).
pub(super) fn job_log_limit(w: &WorkerConfig) -> u64 {
    w.job_log_max_mb.saturating_mul(1024 * 1024).max(64 * 1024)
}

/// Room for the marker line between the head and the tail of a bounded job log.
pub(super) const MARKER_MAX: u64 = 80;

/// The job's log file: every command and its output, each step after a timestamped line.
///
/// Bounded: past its limit it keeps its head (the first half) and its tail (the last half), with
/// one marker line "[... N bytes of output omitted ...]" between them. Output is written
/// through (a `tail -f` sees it at once); when the file passes head + 2 * tail, the part after
/// the head is rewritten as the marker and the last `tail` bytes (each byte is copied O(1) times
/// on average). Clones share the file.
#[derive(Clone)]
pub struct JobLog(Arc<Mutex<LogFile>>);

struct LogFile {
    file: File,
    path: PathBuf,
    head: u64,
    tail: u64,
    len: u64,
    /// Where the kept output after the head (and the marker, once there is one) starts.
    body_start: u64,
    omitted: u64,
}

impl JobLog {
    /// Opens (creates, appends to) the log at `path`, not through a symlink.
    pub fn open(path: &Path, max_bytes: u64) -> std::io::Result<JobLog> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .mode(0o644)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(path)?;
        JobLog::from_file(file, path.to_path_buf(), max_bytes)
    }

    /// Opens (creates, appends to) the log `name` in `dir`, not through a symlink.
    pub(super) fn open_in(
        dir: &OwnedFd,
        name: &str,
        path: PathBuf,
        max_bytes: u64,
    ) -> std::io::Result<JobLog> {
        let fd = nix::fcntl::openat(
            dir,
            name,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            FileMode::from_bits_truncate(0o644),
        )
        .map_err(std::io::Error::from)?;
        JobLog::from_file(File::from(fd), path, max_bytes)
    }

    fn from_file(file: File, path: PathBuf, max_bytes: u64) -> std::io::Result<JobLog> {
        let len = file.metadata()?.len();
        let head = max_bytes / 2;
        let tail = max_bytes - head;
        let mut log = LogFile {
            file,
            path,
            head,
            tail,
            len,
            body_start: head,
            omitted: 0,
        };
        // An earlier attempt's marker, if the log was cut already.
        if len > head {
            let mut buf = [0u8; MARKER_MAX as usize];
            let n = log.file.read_at(&mut buf, head).unwrap_or(0);
            if let Some((omitted, marker_len)) = parse_marker(&buf[..n]) {
                log.omitted = omitted;
                log.body_start = head + marker_len;
            }
        }
        Ok(JobLog(Arc::new(Mutex::new(log))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogFile> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn path(&self) -> PathBuf {
        self.lock().path.clone()
    }

    /// A timestamped line.
    pub fn line(&self, text: &str) -> std::io::Result<()> {
        let line = format!("[{}] {text}\n", crate::journal::now_ts());
        self.lock().append(line.as_bytes())
    }

    /// A writer for a child's output (see [`crate::process::Output::Sink`]).
    pub fn sink(&self) -> Box<dyn Write + Send> {
        Box::new(LogSink(self.clone()))
    }

    /// The last `n` non-empty lines, for error messages: reads the end of the file only.
    pub fn tail(&self, n: usize) -> String {
        let log = self.lock();
        let start = log.len.saturating_sub(4096);
        let mut buf = vec![0u8; (log.len - start) as usize];
        let got = log.file.read_at(&mut buf, start).unwrap_or(0);
        buf.truncate(got);
        drop(log);
        let text = String::from_utf8_lossy(&buf);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(n)..].join(" | ")
    }
}

/// `[\n][... N bytes of output omitted ...]\n` at the start of `buf`: N and the marker's length.
pub(super) fn parse_marker(buf: &[u8]) -> Option<(u64, u64)> {
    let lead = usize::from(buf.first() == Some(&b'\n'));
    let rest = buf.get(lead..)?;
    let rest = rest.strip_prefix(b"[... ")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let n: u64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let after = rest[digits..].strip_prefix(b" bytes of output omitted ...]\n")?;
    Some((n, (buf.len() - after.len()) as u64))
}

impl LogFile {
    fn append(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, self.len)?;
        self.len += data.len() as u64;
        if self.len > self.head + 2 * self.tail + MARKER_MAX {
            self.cut()?;
        }
        Ok(())
    }

    /// Replaces everything between the head and the last `tail` bytes with the marker line.
    fn cut(&mut self) -> std::io::Result<()> {
        let mut keep_from = self.len - self.tail;
        // start the kept tail on a line when one starts near
        let mut probe = [0u8; 4096];
        let n = self.file.read_at(&mut probe, keep_from)?;
        if let Some(i) = probe[..n].iter().position(|b| *b == b'\n') {
            keep_from += i as u64 + 1;
        }
        self.omitted += keep_from.saturating_sub(self.body_start);
        let mut last = [0u8; 1];
        let head_ends_line = self.head == 0
            || (self.file.read_at(&mut last, self.head - 1)? == 1 && last[0] == b'\n');
        let marker = format!(
            "{}[... {} bytes of output omitted ...]\n",
            if head_ends_line { "" } else { "\n" },
            self.omitted
        );
        let dst0 = self.head + marker.len() as u64;
        // dst0 + tail < keep_from: the copy never overlaps what it still has to read
        let mut buf = vec![0u8; 1 << 20];
        let (mut src, mut dst) = (keep_from, dst0);
        while src < self.len {
            let want = ((self.len - src) as usize).min(buf.len());
            let got = self.file.read_at(&mut buf[..want], src)?;
            if got == 0 {
                break;
            }
            self.file.write_all_at(&buf[..got], dst)?;
            src += got as u64;
            dst += got as u64;
        }
        self.file.write_all_at(marker.as_bytes(), self.head)?;
        self.file.set_len(dst)?;
        self.len = dst;
        self.body_start = dst0;
        Ok(())
    }
}

struct LogSink(JobLog);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().append(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_log_keeps_head_and_tail() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("n.log");
        let log = JobLog::open(&path, 64 * 1024).unwrap();
        log.line("first line").unwrap();
        let mut sink = log.sink();
        let mut total = 0u64;
        for i in 0..20_000 {
            let line = format!("output line {i:06} {}\n", "z".repeat(40));
            total += line.len() as u64;
            sink.write_all(line.as_bytes()).unwrap();
        }
        log.line("last line").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.len() as u64 <= 64 * 1024 * 2 + MARKER_MAX,
            "{}",
            text.len()
        );
        assert!(text.contains("] first line\n"));
        assert!(text.ends_with("] last line\n"));
        let markers: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("bytes of output omitted"))
            .collect();
        assert_eq!(markers.len(), 1, "{markers:?}");
        let omitted: u64 = markers[0]
            .trim_start_matches("[... ")
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(omitted > total / 2, "{omitted} of {total}");
        // the line after the marker is whole
        let after = text.split("output omitted ...]\n").nth(1).unwrap();
        assert!(after.starts_with("output line "), "{}", &after[..40]);
        assert_eq!(log.tail(1).split("] ").nth(1), Some("last line"));
        assert!(log.tail(2).starts_with("output line 019999"));

        // reopened (a retry): still one marker, the count goes on
        let again = JobLog::open(&path, 64 * 1024).unwrap();
        let mut sink = again.sink();
        for _ in 0..5_000 {
            sink.write_all(format!("more {}\n", "q".repeat(50)).as_bytes())
                .unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("bytes of output omitted").count(), 1);
        assert!(text.contains("] first line\n"));
    }
}
