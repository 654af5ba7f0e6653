//! A job's build log as the HTTP server shows it: the tail on the job's page
//! ([`read_tail`]) and the text of the live stream ([`read_from`], [`sse_chunk`]), read by
//! file offset.
//!
//! Invariant: the stream sends whole lines only (half a line waits for its end), and a log cut
//! back below the reader's offset is said (`reset`) and read again from its tail.

use super::pages;
use crate::journal::State;

/// The end of a build log shown on a job's page.
pub const LOG_TAIL: u64 = 64 * 1024;

/// May the job's build log still grow (it is waiting for, or in, a build)?
pub fn is_live(s: State) -> bool {
    matches!(
        s,
        State::Claimed | State::Queued | State::Building | State::Interrupted
    )
}

/// The last `max` bytes of a log (from a line start when cut), as text.
pub fn read_tail(path: &std::path::Path, max: u64, live: bool) -> pages::LogTail {
    use std::io::{Read, Seek, SeekFrom};
    let missing = pages::LogTail {
        text: String::new(),
        skipped: 0,
        offset: 0,
        missing: true,
        live,
    };
    let Ok(mut f) = std::fs::File::open(path) else {
        return missing;
    };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return missing;
    };
    let start = len.saturating_sub(max);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.take(max).read_to_end(&mut buf).is_err() {
        return missing;
    }
    let mut skip = 0;
    if start > 0
        && let Some(nl) = buf.iter().position(|b| *b == b'\n')
    {
        skip = nl + 1;
    }
    pages::LogTail {
        text: String::from_utf8_lossy(&buf[skip..]).into_owned(),
        skipped: start + skip as u64,
        offset: start + buf.len() as u64,
        missing: false,
        live,
    }
}

/// One server-sent event carrying log text: a `data:` line per line of text, its `id` the
/// offset in the log after it.
pub fn sse_chunk(text: &str, offset: u64) -> String {
    let mut out = format!("id: {offset}\n");
    for line in text.split('\n') {
        out.push_str("data: ");
        out.push_str(line.trim_end_matches('\r'));
        out.push('\n');
    }
    out.push('\n');
    out
}

/// New log text from `offset`: at most 64 KiB, cut after its last whole line (unless no line
/// ends in it). Returns the text, the new offset, and whether the log was cut back below
/// `offset` (the job log's bound rewrites it): then the text is its tail from the start.
pub(super) fn read_from(
    path: &std::path::Path,
    offset: u64,
) -> std::io::Result<(String, u64, bool)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), 0, false)),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let (start, reset) = if len < offset {
        (len.saturating_sub(LOG_TAIL), true)
    } else {
        (offset, false)
    };
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(64 * 1024).read_to_end(&mut buf)?;
    if let Some(nl) = buf.iter().rposition(|b| *b == b'\n') {
        buf.truncate(nl + 1);
    } else if buf.len() < 64 * 1024 {
        buf.clear(); // half a line: wait for its end
    }
    let end = start + buf.len() as u64;
    if buf.last() == Some(&b'\n') {
        buf.pop();
    }
    Ok((String::from_utf8_lossy(&buf).into_owned(), end, reset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_chunks_split_lines() {
        assert_eq!(sse_chunk("a\r\nb", 9), "id: 9\ndata: a\ndata: b\n\n");
        assert_eq!(sse_chunk("", 1), "id: 1\ndata: \n\n");
    }

    #[test]
    fn reading_a_growing_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log");
        assert_eq!(read_from(&p, 0).unwrap(), (String::new(), 0, false));
        std::fs::write(&p, "one\ntwo\nthr").unwrap();
        assert_eq!(read_from(&p, 0).unwrap(), ("one\ntwo".into(), 8, false));
        assert_eq!(
            read_from(&p, 8).unwrap(),
            (String::new(), 8, false),
            "half a line waits"
        );
        std::fs::write(&p, "x\n").unwrap();
        assert_eq!(
            read_from(&p, 8).unwrap(),
            ("x".into(), 2, true),
            "cut back: from the start"
        );
        let t = read_tail(&p, 64, true);
        assert_eq!(
            (t.text.as_str(), t.offset, t.skipped, t.missing),
            ("x\n", 2, 0, false)
        );
        std::fs::write(&p, "aaaa\nbbbb\ncccc\n").unwrap();
        let t = read_tail(&p, 7, false);
        assert_eq!((t.text.as_str(), t.skipped, t.offset), ("cccc\n", 10, 15));
        assert!(read_tail(&dir.path().join("none"), 7, true).missing);
    }
}
