//! The job's log file, bounded: every command of a build and its output, each step after a
//! timestamped line ([`JobLog`]).
//!
//! Invariants:
//! - The file is never longer than its bound (`job_log_max_mb`), its marker line included: a
//!   write that would pass the bound cuts the log first.
//! - Past its bound the file holds its head, one marker line "[... N bytes of output omitted
//!   ...]" and its latest tail, N counting every byte cut so far (across attempts: a reopened
//!   log finds the marker and goes on counting); `logread` relies on this layout.
//! - A cut is seen by readers: while it rewrites the file, the marker is in its cutting form
//!   (`[~~~ ` instead of `[... `, the same length); it takes its final form, with a larger N,
//!   only after the file holds the new tail and has its new length.
//! - The daemon's own lines ([`JobLog::line`]) hold no character a terminal acts on.

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
    w.job_log_max_mb.saturating_mul(1024 * 1024).max(MIN_BOUND)
}

/// Room kept for the marker line between the head and the tail of a bounded job log.
pub(super) const MARKER_MAX: u64 = 80;

/// How the marker line opens: final, and while a cut rewrites the file.
const OPEN: &[u8] = b"[... ";
const OPEN_CUTTING: &[u8] = b"[~~~ ";

/// The marker line of a cut log, as found at the end of its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Marker {
    /// Bytes of output cut out so far.
    pub omitted: u64,
    /// The marker's length in the file (its leading newline included).
    pub len: u64,
    /// A cut is rewriting the file (or its writer died in one).
    pub cutting: bool,
}

/// The smallest bound a job log has.
const MIN_BOUND: u64 = 64 * 1024;

/// The head of a log bounded at `max_bytes`: the first half.
pub(super) fn head_of(max_bytes: u64) -> u64 {
    max_bytes.max(MIN_BOUND) / 2
}

/// The job's log file: every command and its output, each step after a timestamped line.
///
/// Bounded at `max_bytes`: it keeps its head (the first half) and, once more was written, the
/// marker line and its latest tail. When a write would pass the bound, the part after the head
/// is rewritten as the marker and the last `keep` bytes of the output (a quarter of the bound,
/// or a little less), then the log grows again up to the bound: each byte is copied O(1) times
/// on average. Output is written through (a `tail -f` sees it at once). Clones share the file.
#[derive(Clone)]
pub struct JobLog(Arc<Mutex<LogFile>>);

struct LogFile {
    file: File,
    path: PathBuf,
    max: u64,
    head: u64,
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
        let max = max_bytes.max(MIN_BOUND);
        let head = head_of(max);
        let mut log = LogFile {
            file,
            path,
            max,
            head,
            len,
            body_start: head,
            omitted: 0,
        };
        // An earlier attempt's marker, if the log was cut already.
        if let Some(m) = read_marker(&log.file, head, len)? {
            log.omitted = m.omitted;
            log.body_start = head + m.len;
            if m.cutting {
                // Its writer died in a cut: what the file holds is what there is, and
                // readers must not wait for the end of that cut.
                log.finish_marker()?;
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

    /// A timestamped line of the daemon's own (the build's header, a command line, how it
    /// ended), on one line and escaped ([`crate::domain::text::escape`]): `log` prints the file
    /// as it is, so only mic's output is printed raw.
    pub fn line(&self, text: &str) -> std::io::Result<()> {
        let line = format!(
            "[{}] {}\n",
            crate::journal::now_ts(),
            crate::domain::text::escape(text)
        );
        self.lock().append(line.as_bytes())
    }

    /// A writer for a child's output (see [`crate::process::Output::Sink`]).
    pub fn sink(&self) -> Box<dyn Write + Send> {
        Box::new(LogSink(self.clone()))
    }

    /// A writer for a child's output that also keeps its last bytes in `kept`, for the error
    /// that says why the command failed ([`failure`]).
    pub fn sink_keeping(&self, kept: &OutputTail) -> Box<dyn Write + Send> {
        Box::new(KeepingSink(LogSink(self.clone()), kept.clone()))
    }
}

/// The last bytes one command printed (its job log line with the command aside), kept beside
/// the job log while it runs: what its error quotes.
#[derive(Clone, Default)]
pub struct OutputTail(Arc<Mutex<Kept>>);

#[derive(Default)]
struct Kept {
    bytes: Vec<u8>,
    /// Output before `bytes` was let go (its first line is then a part of a line).
    cut: bool,
}

/// How much of a command's output [`OutputTail`] keeps.
const KEPT: usize = 16 * 1024;

impl OutputTail {
    pub fn new() -> OutputTail {
        OutputTail::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, data: &[u8]) {
        let mut kept = self.lock();
        let from = data.len().saturating_sub(KEPT);
        kept.cut |= from > 0;
        kept.bytes.extend_from_slice(&data[from..]);
        if kept.bytes.len() > 2 * KEPT {
            let cut = kept.bytes.len() - KEPT;
            kept.bytes.drain(..cut);
            kept.cut = true;
        }
    }

    /// The output kept, from the start of a line (invalid UTF-8 as U+FFFD).
    pub fn text(&self) -> String {
        let kept = self.lock();
        let mut from = kept.bytes.len().saturating_sub(KEPT);
        if kept.cut || from > 0 {
            from += kept.bytes[from..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
        }
        String::from_utf8_lossy(&kept.bytes[from..]).into_owned()
    }
}

/// At most this many of a command's lines go into an error.
const ERROR_LINES: usize = 3;
/// A line of output longer than this is cut in an error.
const ERROR_LINE_CHARS: usize = 400;

/// Is this a line where a program says it failed: its first word ends in "error" or
/// "exception", or is "fatal" (mic's `Error <creator>: …`, mic2's `Error: …`, the last line of a
/// Python traceback `…Error: …`, `FATAL: …`)?
fn is_error_line(line: &str) -> bool {
    let word: String = line
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
        .collect::<String>()
        .to_ascii_lowercase();
    let rest = line.trim_start()[word.len()..].chars().next();
    let ends_word = matches!(rest, None | Some(':' | ' ' | '<' | '(' | '['));
    ends_word && (word.ends_with("error") || word.ends_with("exception") || word == "fatal")
}

/// What a command's output says about its failure: its last error lines ([`is_error_line`]),
/// or, when it printed none, its last lines; at most [`ERROR_LINES`], in their order, each as a
/// terminal showed it (the text after its last carriage return) and cut at
/// [`ERROR_LINE_CHARS`].
pub fn said(output: &str) -> Vec<String> {
    let lines: Vec<&str> = output
        .split('\n')
        .map(|l| l.rsplit('\r').find(|s| !s.trim().is_empty()).unwrap_or(""))
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let errors: Vec<&str> = lines.iter().copied().filter(|l| is_error_line(l)).collect();
    let pick = if errors.is_empty() { lines } else { errors };
    pick[pick.len().saturating_sub(ERROR_LINES)..]
        .iter()
        .map(|l| match l.char_indices().nth(ERROR_LINE_CHARS) {
            Some((i, _)) => format!("{} …", &l[..i]),
            None => l.to_string(),
        })
        .collect()
}

/// The error of a failed command, its cause on the first line. `how` is what the daemon saw
/// ("mic exited with status 1", "… timed out after 3600 s"); `reason_first`: `how` is the cause
/// (a timeout, a signal) and the output's last lines follow it as context; otherwise the
/// program's own error lines come first and `how` closes the text. A command that printed
/// nothing is `how` alone.
pub fn failure(how: &str, output: &str, reason_first: bool) -> String {
    let said = said(output);
    if said.is_empty() {
        return how.to_string();
    }
    let said = said.join("\n");
    if reason_first {
        format!("{how}; its last output:\n{said}")
    } else {
        format!("{said}\n{how}")
    }
}

/// The marker line for `omitted` bytes, after a head that does not end a line (`lead`), in
/// its final or cutting form (the same length).
fn marker_text(omitted: u64, lead: bool, cutting: bool) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    if lead {
        m.push(b'\n');
    }
    m.extend_from_slice(if cutting { OPEN_CUTTING } else { OPEN });
    m.extend_from_slice(format!("{omitted} bytes of output omitted ...]\n").as_bytes());
    m
}

/// The marker at the start of `buf` (`[\n][... N bytes of output omitted ...]\n`, or its
/// cutting form).
pub(super) fn parse_marker(buf: &[u8]) -> Option<Marker> {
    let lead = usize::from(buf.first() == Some(&b'\n'));
    let rest = buf.get(lead..)?;
    let (rest, cutting) = match rest.strip_prefix(OPEN) {
        Some(r) => (r, false),
        None => (rest.strip_prefix(OPEN_CUTTING)?, true),
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let omitted: u64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let after = rest[digits..].strip_prefix(b" bytes of output omitted ...]\n")?;
    Some(Marker {
        omitted,
        len: (buf.len() - after.len()) as u64,
        cutting,
    })
}

/// The marker of a log of `len` bytes with head `head`, if it was cut.
pub(super) fn read_marker(f: &File, head: u64, len: u64) -> std::io::Result<Option<Marker>> {
    if len <= head {
        return Ok(None);
    }
    let mut buf = [0u8; MARKER_MAX as usize];
    let n = f.read_at(&mut buf, head)?;
    Ok(parse_marker(&buf[..n]))
}

impl LogFile {
    fn append(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        if self.len + data.len() as u64 <= self.max {
            self.file.write_all_at(data, self.len)?;
            self.len += data.len() as u64;
            return Ok(());
        }
        if self.len < self.head {
            // The head is filled first (it is below the bound).
            let n = (self.head - self.len) as usize;
            self.file.write_all_at(&data[..n], self.len)?;
            self.len = self.head;
            data = &data[n..];
        }
        let cut = self.cut(data);
        if cut.is_err() {
            // A cut that failed half-way (a full disk): readers must not wait for its end,
            // and the next write starts from what the file holds.
            let _ = self.finish_marker();
            if let Ok(m) = self.file.metadata() {
                self.len = m.len();
            }
            if let Ok(Some(m)) = read_marker(&self.file, self.head, self.len) {
                self.omitted = m.omitted;
                self.body_start = self.head + m.len;
            }
        }
        cut
    }

    /// The output after the head (the kept output in the file, then `data`) becomes the marker
    /// and its last `keep` bytes or so, from a line start when one is near: the file stays
    /// within the bound before, during and after.
    fn cut(&mut self, data: &[u8]) -> std::io::Result<()> {
        let room = self.max - self.head - MARKER_MAX;
        let keep = room / 2;
        let body_start = self.body_start.min(self.len);
        let in_file = self.len - body_start;
        let total = in_file + data.len() as u64;
        // What is dropped: the first `skip` bytes of (file body, data).
        let mut skip = total.saturating_sub(keep);
        // From a line start when one is near: look at the 4 KiB from there.
        let mut window = Vec::with_capacity(4097);
        let before = skip.saturating_sub(1);
        if before < in_file {
            let mut buf = vec![0u8; (in_file - before).min(4097) as usize];
            self.file.read_exact_at(&mut buf, body_start + before)?;
            window.extend_from_slice(&buf);
        }
        let from_data = before.saturating_sub(in_file) as usize;
        let more = 4097usize.saturating_sub(window.len());
        window.extend_from_slice(
            &data[from_data.min(data.len())..(from_data + more).min(data.len())],
        );
        if skip > 0
            && window.first() != Some(&b'\n')
            && let Some(i) = window.iter().skip(1).position(|b| *b == b'\n')
        {
            skip += i as u64 + 1;
        }
        let omitted = self.omitted + skip;
        let mut last = [0u8; 1];
        let lead = self.file.read_at(&mut last, self.head - 1)? == 1 && last[0] != b'\n';
        let marker = marker_text(omitted, lead, false);
        let dst0 = self.head + marker.len() as u64;
        // 1. The cutting form: readers wait (or read again) from here on.
        self.file
            .write_all_at(&marker_text(omitted, lead, true), self.head)?;
        // 2. The kept output: its part in the file moves down (dst0 <= head + MARKER_MAX <
        //    head + keep <= where it is read from: a forward copy never overwrites what it
        //    has still to read), then the part of `data`.
        let mut dst = dst0;
        if skip < in_file {
            let mut src = body_start + skip;
            debug_assert!(src >= dst);
            let mut buf = vec![0u8; (self.len - src).min(1 << 20) as usize];
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
        }
        let from_data = skip.saturating_sub(in_file) as usize;
        let rest = &data[from_data.min(data.len())..];
        self.file.write_all_at(rest, dst)?;
        dst += rest.len() as u64;
        // 3. Its length, then 4. the final form of the marker.
        self.file.set_len(dst)?;
        self.len = dst;
        self.body_start = dst0;
        self.omitted = omitted;
        self.finish_marker()
    }

    /// Gives the marker at the head its final form (its opening after the newline it may
    /// start with).
    fn finish_marker(&mut self) -> std::io::Result<()> {
        let mut first = [0u8; 1];
        let n = self.file.read_at(&mut first, self.head)?;
        let at = self.head + u64::from(n == 1 && first[0] == b'\n');
        self.file.write_all_at(OPEN, at)
    }
}

struct LogSink(JobLog);

/// [`LogSink`] keeping the last bytes written in an [`OutputTail`] too.
struct KeepingSink(LogSink, OutputTail);

impl Write for KeepingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.1.push(buf);
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

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
        let kept = OutputTail::new();
        let mut sink = log.sink_keeping(&kept);
        let mut total = 0u64;
        for i in 0..20_000 {
            let line = format!("output line {i:06} {}\n", "z".repeat(40));
            total += line.len() as u64;
            sink.write_all(line.as_bytes()).unwrap();
            let len = std::fs::metadata(&path).unwrap().len();
            assert!(len <= 64 * 1024, "{len} bytes after line {i}");
        }
        log.line("last line").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() as u64 <= 64 * 1024, "{}", text.len());
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
        // the command's own output, kept beside the log, starts on a line
        let out = kept.text();
        assert!(
            out.len() <= KEPT && out.starts_with("output line "),
            "{}",
            &out[..40]
        );
        assert!(out.ends_with(&format!("output line 019999 {}\n", "z".repeat(40))));
        assert_eq!(
            said(&out),
            [
                "output line 019997",
                "output line 019998",
                "output line 019999"
            ]
            .map(|l| format!("{l} {}", "z".repeat(40)))
        );

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
        assert!(text.len() as u64 <= 64 * 1024, "{}", text.len());
    }

    /// The file is never longer than its bound, marker included: not after a write, not
    /// while a cut rewrites it (a second thread looks all the time), not after writes larger
    /// than the bound itself; and the marker counts every byte cut out.
    #[test]
    fn the_file_never_passes_its_bound() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("n.log");
        let max = 256 * 1024;
        let log = JobLog::open(&path, max).unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (path, done) = (path.clone(), Arc::clone(&done));
            std::thread::spawn(move || {
                let (mut longest, mut looks) = (0, 0u64);
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    longest = longest.max(std::fs::metadata(&path).unwrap().len());
                    looks += 1;
                }
                (longest, looks)
            })
        };
        let mut sink = log.sink();
        let mut total = 0u64;
        let mut rng = 7u64;
        for i in 0..3000u32 {
            // Writes of 1 byte to 600 KiB (past the bound), lines or not.
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let size = match rng >> 60 {
                0 => (rng >> 20) as usize % (600 * 1024),
                1..=3 => (rng >> 20) as usize % 8192,
                _ => (rng >> 20) as usize % 200,
            };
            let mut chunk = format!("write {i:05} ").into_bytes();
            chunk.resize(size.max(chunk.len()), b'x');
            if rng & 1 == 0 {
                chunk.push(b'\n');
            }
            sink.write_all(&chunk).unwrap();
            total += chunk.len() as u64;
            let len = std::fs::metadata(&path).unwrap().len();
            assert!(len <= max, "{len} bytes after write {i}");
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let (longest, looks) = watcher.join().unwrap();
        assert!(looks > 0);
        assert!(longest <= max, "{longest} bytes seen while it was written");
        // Head + marker + tail account for every byte written.
        let text = std::fs::read(&path).unwrap();
        let head = head_of(max) as usize;
        let m = parse_marker(&text[head..]).expect("a marker after the head");
        assert!(!m.cutting);
        let kept_tail = text.len() as u64 - head as u64 - m.len;
        assert_eq!(head as u64 + m.omitted + kept_tail, total);
        assert!(kept_tail > 0);
    }

    /// A log left in a cut (its writer died in one) is taken up by the next attempt: its
    /// marker gets its final form, and the count goes on.
    #[test]
    fn a_log_left_in_a_cut_is_finished_when_reopened() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("n.log");
        let max = 64 * 1024;
        let head = head_of(max) as usize;
        let mut text = vec![b'h'; head - 1];
        text.push(b'\n');
        text.extend_from_slice(&marker_text(5000, false, true));
        text.extend_from_slice(b"tail\n");
        std::fs::write(&path, &text).unwrap();
        let log = JobLog::open(&path, max).unwrap();
        let now = std::fs::read(&path).unwrap();
        let m = parse_marker(&now[head..]).unwrap();
        assert_eq!((m.omitted, m.cutting), (5000, false));
        let mut sink = log.sink();
        for _ in 0..2000 {
            sink.write_all(&[b'y'; 99]).unwrap();
            sink.write_all(b"\n").unwrap();
        }
        let now = std::fs::read(&path).unwrap();
        assert!(now.len() <= max as usize);
        let m = parse_marker(&now[head..]).unwrap();
        assert!(m.omitted > 5000 + 100_000, "{m:?}");
    }

    #[test]
    fn the_daemons_own_lines_are_escaped_the_output_is_not() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("n.log");
        let log = JobLog::open(&path, 64 * 1024).unwrap();
        log.line("build of t\u{1b}]0;x\u{7}\nFAKE \u{202e}")
            .unwrap();
        log.sink()
            .write_all(b"mic says \x1b[1mbold\x1b[0m\n")
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("] build of t\\u001b]0;x\\u0007\\nFAKE \\u202e\n"),
            "{text:?}"
        );
        assert_eq!(text.lines().count(), 2, "{text:?}");
        assert!(text.ends_with("mic says \x1b[1mbold\x1b[0m\n"), "{text:?}");
    }

    #[test]
    fn a_failure_says_the_programs_own_error_lines_first() {
        let mic = "Info: checking packages\nError <creator>: failed to resolve package foo\n\
                   Info: cleaning up\n";
        assert_eq!(
            failure("/usr/bin/mic exited with status 1", mic, false),
            "Error <creator>: failed to resolve package foo\n/usr/bin/mic exited with status 1"
        );
        // a traceback's last line; no error line: the last lines; a progress bar's last state
        let tb = "Traceback (most recent call last):\n  File \"x\", line 1\nOSError: [Errno 28] No space left\n";
        assert_eq!(said(tb), ["OSError: [Errno 28] No space left"]);
        assert_eq!(said("a\nb\n\nc\nd\n"), ["b", "c", "d"]);
        assert_eq!(
            said("fetching 10%\rfetching 99%\r\nError: no\n"),
            ["Error: no"]
        );
        assert_eq!(said("fetching 10%\rfetching 99%\n"), ["fetching 99%"]);
        assert!(
            said("errors found: 0\nErrorless\n").len() == 2,
            "not error lines"
        );
        // the daemon's reason first when it is the cause
        assert_eq!(
            failure("mic timed out after 5 s", "Info: still going\n", true),
            "mic timed out after 5 s; its last output:\nInfo: still going"
        );
        assert_eq!(
            failure("mic exited with status 2", "", false),
            "mic exited with status 2"
        );
        let long = format!("Error: {}", "x".repeat(1000));
        assert!(said(&long)[0].chars().count() < 410);
    }
}
