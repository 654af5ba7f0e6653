//! Reading a job log while it is written: `build-image log [--follow]` (and anything else that
//! shows a build's output) reads it by *stream position*, the count of output bytes written to
//! the log so far, including those the bound has since cut out (see [`super::JobLog`]).
//!
//! Invariant: a chunk is never torn by a cut. A cut (the writer rewriting the part after the
//! head as the marker and the latest tail) first gives the marker its cutting form, and gives
//! it back its final form, with a larger count, only after the file holds the new tail and has
//! its new length; a read is kept only when, before and after it, the marker was the same and
//! final, and the file did not get shorter. A reader that falls behind a cut learns how many
//! bytes it missed.

use super::joblog::{Marker, head_of, read_marker};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

/// The most bytes one read returns.
pub const MAX_CHUNK: usize = 64 * 1024;

/// How a bounded log of `max_bytes` is laid out (as [`super::JobLog`] lays it out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    head: u64,
}

impl Bound {
    pub fn new(max_bytes: u64) -> Bound {
        Bound {
            head: head_of(max_bytes),
        }
    }

    /// The bound of a job log written with this worker config.
    pub fn of(w: &crate::config::WorkerConfig) -> Bound {
        Bound::new(super::joblog::job_log_limit(w))
    }

    /// The stream position where the kept head ends: output the bound cuts out starts here.
    pub fn head(&self) -> u64 {
        self.head
    }
}

/// Bytes of a job log from a stream position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub data: Vec<u8>,
    /// The stream position of `data[0]`: the position asked for, or later when the bytes
    /// between were cut out of the log before they were read (`skipped` of them).
    pub start: u64,
    pub skipped: u64,
    /// The log's stream length when it was read (the position after its last byte).
    pub end: u64,
    /// The log is shorter than the position asked for and has no marker that explains it: it
    /// was replaced (e.g. the job folder was removed and made again); `start` is 0.
    pub restarted: bool,
}

impl Chunk {
    /// The stream position after this chunk.
    pub fn next(&self) -> u64 {
        self.start + self.data.len() as u64
    }
}

/// The marker at the head, if the log was cut.
fn marker(f: &File, b: Bound, len: u64) -> std::io::Result<Option<Marker>> {
    read_marker(f, b.head, len)
}

/// Where stream position `from` is in a file of `len` bytes with `mark`: (file offset, where
/// the readable run ends in the file, bytes skipped, stream length).
fn locate(b: Bound, len: u64, mark: Option<Marker>, from: u64) -> Option<(u64, u64, u64, u64)> {
    match mark {
        None => (from <= len).then_some((from, len, 0, len)),
        Some(Marker {
            omitted, len: mlen, ..
        }) => {
            let end = len - mlen + omitted;
            if from < b.head {
                return Some((from, b.head, 0, end));
            }
            let tail_start = b.head + omitted;
            let skipped = tail_start.saturating_sub(from);
            let from = from.max(tail_start);
            let off = from - omitted + mlen;
            (off <= len).then_some((off, len, skipped, end))
        }
    }
}

/// Reads at most `max` bytes of the log at `path` from stream position `from`. None when there
/// is no file (yet). The file is opened without following a symlink.
pub fn read(path: &Path, b: Bound, from: u64, max: usize) -> std::io::Result<Option<Chunk>> {
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    ensure_regular(&f, path)?;
    const TRIES: u32 = 200;
    for attempt in 0..TRIES {
        // On the last try a log left in a cut (its writer died in it) is read as it is:
        // nobody will finish the cut.
        let last = attempt + 1 == TRIES;
        let len = f.metadata()?.len();
        let mark = marker(&f, b, len)?;
        if mark.is_some_and(|m| m.cutting) && !last {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let (mut from, restarted) = (from, false);
        let located = match locate(b, len, mark, from) {
            Some(l) => Some((l, restarted)),
            None => {
                from = 0;
                locate(b, len, mark, 0).map(|l| (l, true))
            }
        };
        let Some(((off, run_end, skipped, end), restarted)) = located else {
            continue;
        };
        let want = (run_end.saturating_sub(off)).min(max as u64) as usize;
        let mut data = vec![0u8; want];
        let mut got = 0;
        while got < want {
            let n = f.read_at(&mut data[got..], off + got as u64)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        data.truncate(got);
        let len2 = f.metadata()?.len();
        if !last && (len2 < len || marker(&f, b, len2)? != mark) {
            continue;
        }
        return Ok(Some(Chunk {
            data,
            start: from + skipped,
            skipped,
            end,
            restarted,
        }));
    }
    Err(std::io::Error::other(format!(
        "{}: the log kept changing under the reader",
        path.display()
    )))
}

/// A job log is a regular file.
fn ensure_regular(f: &File, path: &Path) -> std::io::Result<()> {
    if f.metadata()?.is_file() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )))
    }
}

/// How many leading bytes of `b` end on a whole UTF-8 sequence: an incomplete sequence at its
/// end is left for the next read (invalid bytes elsewhere are the caller's to replace).
pub fn complete_utf8(b: &[u8]) -> usize {
    for back in 1..=b.len().min(3) {
        let c = b[b.len() - back];
        if c & 0xC0 == 0x80 {
            continue;
        }
        let need = match c {
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        };
        return if need > back { b.len() - back } else { b.len() };
    }
    b.len()
}

#[cfg(test)]
mod tests {
    use super::super::JobLog;
    use super::*;
    use std::io::Write;

    /// Reads the whole stream from `from` the way a follower does, chunk after chunk.
    fn follow(path: &Path, b: Bound, from: &mut u64, out: &mut Vec<u8>, skipped: &mut u64) {
        loop {
            let c = read(path, b, *from, 1000).unwrap().unwrap();
            *skipped += c.skipped;
            out.extend_from_slice(&c.data);
            *from = c.next();
            if c.next() >= c.end {
                return;
            }
        }
    }

    #[test]
    fn follows_across_cuts_and_counts_what_it_missed() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("n.log");
        assert_eq!(read(&path, Bound::new(64 * 1024), 0, 10).unwrap(), None);
        let max = 64 * 1024;
        let b = Bound::new(max);
        let log = JobLog::open(&path, max).unwrap();
        let mut sink = log.sink();
        let mut written = Vec::new();
        let (mut from, mut got, mut skipped) = (0u64, Vec::new(), 0u64);
        for i in 0..6000u32 {
            let line = format!("line {i:05} {}\n", "x".repeat(30));
            sink.write_all(line.as_bytes()).unwrap();
            written.extend_from_slice(line.as_bytes());
            // a reader keeping up for the first part, then falling behind
            if i < 2000 || i % 1500 == 0 {
                follow(&path, b, &mut from, &mut got, &mut skipped);
            }
        }
        follow(&path, b, &mut from, &mut got, &mut skipped);
        assert_eq!(
            from,
            written.len() as u64,
            "stream position = bytes written"
        );
        assert_eq!(got.len() as u64 + skipped, written.len() as u64);
        assert!(skipped > 0);
        // what was read is the stream with holes: the first part exactly, the end exactly
        let keep = 2000 * 42;
        assert_eq!(&got[..keep], &written[..keep]);
        let tail = 10_000;
        assert_eq!(&got[got.len() - tail..], &written[written.len() - tail..]);
        // from scratch after the cuts: head, then a skip to the tail, then the tail
        let (mut from, mut again, mut skipped) = (0u64, Vec::new(), 0u64);
        follow(&path, b, &mut from, &mut again, &mut skipped);
        assert_eq!(&again[..b.head as usize], &written[..b.head as usize]);
        assert_eq!(again.len() as u64 + skipped, written.len() as u64);
        assert!(!String::from_utf8_lossy(&again).contains("omitted"));
    }

    #[test]
    fn a_reader_beside_the_writer_never_sees_a_torn_chunk() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("n.log");
        let max = 64 * 1024;
        let b = Bound::new(max);
        let log = JobLog::open(&path, max).unwrap();
        let writer = std::thread::spawn(move || {
            let mut sink = log.sink();
            let mut written = Vec::new();
            for i in 0..40_000u32 {
                let line = format!("line {i:05} {}\n", "y".repeat(i as usize % 50));
                sink.write_all(line.as_bytes()).unwrap();
                written.extend_from_slice(line.as_bytes());
            }
            written
        });
        let mut chunks = Vec::new();
        let mut from = 0;
        while !writer.is_finished() {
            if let Some(c) = read(&path, b, from, 4096).unwrap() {
                from = c.next();
                chunks.push(c);
            }
        }
        let written = writer.join().unwrap();
        loop {
            let c = read(&path, b, from, 4096).unwrap().unwrap();
            from = c.next();
            let done = c.next() >= c.end;
            chunks.push(c);
            if done {
                break;
            }
        }
        assert_eq!(from, written.len() as u64);
        for c in &chunks {
            assert!(!c.restarted);
            let at = c.start as usize;
            assert_eq!(
                c.data.as_slice(),
                &written[at..at + c.data.len()],
                "chunk at {at} differs from what was written there"
            );
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("bytes of output omitted"),
            "the log was cut meanwhile"
        );
    }

    #[test]
    fn a_replaced_log_restarts() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("n.log");
        std::fs::write(&path, "one\ntwo\n").unwrap();
        let b = Bound::new(64 * 1024);
        let c = read(&path, b, 0, 100).unwrap().unwrap();
        assert_eq!(c.data, b"one\ntwo\n");
        std::fs::write(&path, "3\n").unwrap();
        let c = read(&path, b, 8, 100).unwrap().unwrap();
        assert!(c.restarted);
        assert_eq!((c.start, c.data.as_slice()), (0, b"3\n".as_slice()));
    }

    #[test]
    fn not_through_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(d.path().join("secret"), d.path().join("n.log")).unwrap();
        assert!(read(&d.path().join("n.log"), Bound::new(65536), 0, 10).is_err());
    }

    #[test]
    fn utf8_sequences_are_not_split() {
        let s = "aé€😀".as_bytes();
        assert_eq!(complete_utf8(s), s.len());
        assert_eq!(complete_utf8(&s[..s.len() - 1]), s.len() - 4);
        assert_eq!(complete_utf8(&s[..2]), 1);
        assert_eq!(complete_utf8(b""), 0);
        assert_eq!(complete_utf8(&[0x80, 0x80]), 2);
    }
}
