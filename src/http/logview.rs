//! A job's build log as the HTTP server shows it: its end on the job's page ([`read_tail`]),
//! its new output as the events of the live stream ([`stream_step`], [`sse_chunk`]) and the
//! whole of it ([`shown`], for `/jobs/ID/log`). Every read goes through the project's one
//! job-log reader, [`crate::imaging::logread`], by *stream position* (the count of output bytes
//! the log was ever given, including those its size bound cut out).
//!
//! Invariants:
//! - Every position the server hands out or takes back (the page's `data-offset`, each event's
//!   `id`, `?from=`, `Last-Event-ID`) is a stream position, never a file offset, so a cut of
//!   the log does not move it, and nothing shown is torn by a cut (logread never returns a
//!   chunk a cut tore).
//! - Output the bound cut out before it was read is never passed over in silence: it is said
//!   as one line `[... N bytes of output omitted ...]` (the line the bound writes into the
//!   file), on a line of its own.
//! - The stream sends whole lines: half a line waits for its end, unless none will come (the
//!   job is over, the line fills a whole read, or the log's kept head ends inside it).

use super::pages;
use crate::domain::State;
use crate::imaging::logread::{self, Bound, Chunk};
use std::path::Path;

/// The end of a build log shown on a job's page.
pub const LOG_TAIL: u64 = 64 * 1024;

/// May the job's build log still grow (it is waiting for, or in, a build)?
pub fn is_live(s: State) -> bool {
    !s.has_ended()
}

/// The line that says `n` bytes of output were cut out (as the log's bound writes it).
fn omitted_line(n: u64) -> String {
    format!("[... {n} bytes of output omitted ...]")
}

/// What a reader shows of chunk `c` after output that ended a line (`at_line_start`) or not:
/// the omitted line first when the bound cut out bytes before `c`, then its data. Shown after
/// one another from position 0, the chunks of a log whose writer is idle give the file's bytes.
pub fn shown(c: &Chunk, at_line_start: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(c.data.len() + 64);
    if c.skipped > 0 {
        if !at_line_start {
            out.push(b'\n');
        }
        out.extend_from_slice(omitted_line(c.skipped).as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(&c.data);
    out
}

/// The last `max` bytes or so of what the log keeps of its output, from a line start, as
/// text: when they reach into the part the bound cut out, the end of the kept head, the
/// omitted line and the kept tail (as the end of the file reads, but never torn by a cut).
/// For a `live` log, a last line not yet ended is left to the stream. Missing when the file
/// is not there (yet) or cannot be read.
pub fn read_tail(path: &Path, bound: Bound, max: u64, live: bool) -> pages::LogTail {
    match tail(path, bound, max, live) {
        Ok(Some((text, skipped, offset))) => pages::LogTail {
            text,
            skipped,
            offset,
            missing: false,
            live,
        },
        _ => pages::LogTail {
            text: String::new(),
            skipped: 0,
            offset: 0,
            missing: true,
            live,
        },
    }
}

/// (text, the stream position it starts at, the stream position after it).
fn tail(
    path: &Path,
    b: Bound,
    max: u64,
    live: bool,
) -> std::io::Result<Option<(String, u64, u64)>> {
    let Some(probe) = logread::read(path, b, 0, 0)? else {
        return Ok(None);
    };
    let end = probe.end;
    let mut want = end.saturating_sub(max);
    if want > b.head()
        && let Some(at) = logread::read(path, b, want, 0)?
        && at.skipped > 0
        && !at.restarted
    {
        // `want` was cut out: the kept tail whole, and the end of the head before it.
        let tail_len = at.end.saturating_sub(at.start);
        want = b.head().saturating_sub(max.saturating_sub(tail_len));
    }
    // From one byte before: it tells whether `want` starts a line.
    let mut from = want.saturating_sub(1);
    let mut left = (max as usize).saturating_add(1);
    let mut out: Vec<u8> = Vec::new();
    let mut first: Option<u64> = None;
    let mut last: Option<Chunk> = None;
    // The end of the kept head, then the tail after the cut; a few more reads if the log
    // moves meanwhile.
    for _ in 0..8 {
        let Some(mut c) = logread::read(path, b, from, left)? else {
            return Ok(None);
        };
        if c.restarted {
            // Replaced between the reads: what it holds now, from its start.
            out.clear();
            first = None;
        }
        if first.is_none() {
            // Not from a line start: from the next one (a tail the bound kept after a cut
            // starts on a line already).
            if c.start > 0
                && c.skipped == 0
                && let Some(nl) = c.data.iter().position(|x| *x == b'\n')
            {
                c.data.drain(..=nl);
                c.start += nl as u64 + 1;
            }
            c.skipped = 0; // the page says how much comes before
            first = Some(c.start);
        }
        let ends_line = out.last().is_none_or(|x| *x == b'\n');
        out.extend_from_slice(&shown(&c, ends_line));
        left = left.saturating_sub(c.data.len());
        from = c.next();
        let done = c.next() >= c.end || left == 0;
        last = Some(c);
        if done {
            break;
        }
    }
    let (Some(start), Some(last)) = (first, last) else {
        return Ok(None);
    };
    let mut offset = last.next();
    if live {
        // Half a line (or half a UTF-8 sequence) at the end comes with the stream.
        let keep = match last.data.iter().rposition(|x| *x == b'\n') {
            Some(nl) => nl + 1,
            None => logread::complete_utf8(&last.data),
        };
        let cut = last.data.len() - keep;
        out.truncate(out.len() - cut);
        offset -= cut as u64;
    }
    Ok(Some((
        String::from_utf8_lossy(&out).into_owned(),
        start,
        offset,
    )))
}

/// One server-sent event carrying log text: a `data:` line per line of text, its `id` the
/// stream position after it. A lone carriage return also ends a `data:` line (an event
/// stream reads it as a line end).
pub fn sse_chunk(text: &str, position: u64) -> String {
    let mut out = format!("id: {position}\n");
    for line in text.split('\n') {
        for part in line.trim_end_matches('\r').split('\r') {
            out.push_str("data: ");
            out.push_str(part);
            out.push('\n');
        }
    }
    out.push('\n');
    out
}

/// What one read of the live stream sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Server-sent events (empty: nothing new yet).
    pub events: String,
    /// The stream position to read from next.
    pub next: u64,
    /// It went on (or back, to a replaced log's start): read again before waiting.
    pub progressed: bool,
}

/// Reads the log from stream position `from` and says what the live stream sends for it: a
/// `reset` when the log was replaced, the omitted line (its `id` where the kept output goes
/// on) when the bound cut out bytes not yet sent, and the whole lines read (their `id` the
/// position after them). `more_may_come`: the job may still write to the log.
pub fn stream_step(
    path: &Path,
    bound: Bound,
    from: u64,
    more_may_come: bool,
) -> std::io::Result<Step> {
    let Some(c) = logread::read(path, bound, from, logread::MAX_CHUNK)? else {
        return Ok(Step {
            events: String::new(),
            next: from,
            progressed: false,
        });
    };
    let mut events = String::new();
    if c.restarted {
        events.push_str("event: reset\nid: 0\ndata: \n\n");
    }
    if c.skipped > 0 {
        events.push_str(&sse_chunk(&omitted_line(c.skipped), c.start));
    }
    let at_end = c.next() >= c.end;
    // The read stopped short where the kept head ends: the rest of its line was cut out.
    let head_ends = !at_end && c.data.len() < logread::MAX_CHUNK;
    let keep = if (at_end && !more_may_come) || head_ends {
        c.data.len()
    } else if let Some(nl) = c.data.iter().rposition(|x| *x == b'\n') {
        nl + 1
    } else if c.data.len() >= logread::MAX_CHUNK {
        logread::complete_utf8(&c.data) // one line longer than a read: sent in pieces
    } else {
        0 // half a line: wait for its end
    };
    let next = c.start + keep as u64;
    if keep > 0 {
        let data = &c.data[..keep];
        let data = data.strip_suffix(b"\n").unwrap_or(data);
        events.push_str(&sse_chunk(&String::from_utf8_lossy(data), next));
    }
    Ok(Step {
        events,
        next,
        progressed: next != from || c.restarted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imaging::JobLog;
    use std::io::Write;

    const B: u64 = 64 * 1024;

    fn bound() -> Bound {
        Bound::new(B)
    }

    #[test]
    fn sse_chunks_split_lines() {
        assert_eq!(sse_chunk("a\r\nb", 9), "id: 9\ndata: a\ndata: b\n\n");
        assert_eq!(sse_chunk("", 1), "id: 1\ndata: \n\n");
        assert_eq!(
            sse_chunk("10%\r20%", 3),
            "id: 3\ndata: 10%\ndata: 20%\n\n",
            "a lone CR does not end the event's framing"
        );
    }

    #[test]
    fn reading_a_growing_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log");
        let step = |from, more| stream_step(&p, bound(), from, more).unwrap();
        let none = Step {
            events: String::new(),
            next: 0,
            progressed: false,
        };
        assert_eq!(step(0, true), none);
        std::fs::write(&p, "one\ntwo\nthr").unwrap();
        let s = step(0, true);
        assert_eq!(
            (s.events.as_str(), s.next, s.progressed),
            ("id: 8\ndata: one\ndata: two\n\n", 8, true)
        );
        assert_eq!(
            step(8, true),
            Step {
                next: 8,
                ..none.clone()
            },
            "half a line waits"
        );
        let s = step(8, false);
        assert_eq!(
            (s.events.as_str(), s.next),
            ("id: 11\ndata: thr\n\n", 11),
            "unless the job is over: then it is the last line"
        );
        std::fs::write(&p, "x\n").unwrap();
        let s = step(8, true);
        assert_eq!(
            (s.events.as_str(), s.next, s.progressed),
            ("event: reset\nid: 0\ndata: \n\nid: 2\ndata: x\n\n", 2, true),
            "replaced: from the start"
        );
        let t = read_tail(&p, bound(), 64, true);
        assert_eq!(
            (t.text.as_str(), t.offset, t.skipped, t.missing),
            ("x\n", 2, 0, false)
        );
        std::fs::write(&p, "aaaa\nbbbb\ncccc\n").unwrap();
        let t = read_tail(&p, bound(), 7, false);
        assert_eq!((t.text.as_str(), t.skipped, t.offset), ("cccc\n", 10, 15));
        let t = read_tail(&p, bound(), 5, false);
        assert_eq!(
            (t.text.as_str(), t.skipped, t.offset),
            ("cccc\n", 10, 15),
            "a tail that starts on a line start keeps that line"
        );
        std::fs::write(&p, "aaaa\nbb").unwrap();
        let t = read_tail(&p, bound(), 64, true);
        assert_eq!(
            (t.text.as_str(), t.offset),
            ("aaaa\n", 5),
            "a live log's half line comes with the stream"
        );
        let t = read_tail(&p, bound(), 64, false);
        assert_eq!((t.text.as_str(), t.offset), ("aaaa\nbb", 7));
        assert!(read_tail(&dir.path().join("none"), bound(), 7, true).missing);
    }

    /// The line `i` the writers below write.
    fn line(i: u32) -> String {
        format!("line {i:05} {}\n", "y".repeat(i as usize % 50))
    }

    /// The data lines of `events`, in order (an event's lines one after another).
    fn data_lines(events: &str) -> Vec<&str> {
        events
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect()
    }

    #[test]
    fn the_tail_of_a_cut_log_says_what_was_cut_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.log");
        // A bound twice the page's tail: the tail shown reaches back into the head.
        let big = Bound::new(2 * B);
        let log = JobLog::open(&p, 2 * B).unwrap();
        let mut sink = log.sink();
        let mut written = Vec::new();
        for i in 0..8000 {
            sink.write_all(line(i).as_bytes()).unwrap();
            written.extend_from_slice(line(i).as_bytes());
        }
        let file = std::fs::read_to_string(&p).unwrap();
        assert!(file.contains("bytes of output omitted"), "the log was cut");
        let t = read_tail(&p, big, LOG_TAIL, false);
        assert_eq!(
            t.offset,
            written.len() as u64,
            "it ends at the stream's end"
        );
        assert!(
            t.text.starts_with("line "),
            "from a line start: {:?}",
            &t.text[..40]
        );
        assert!(
            t.skipped > 0 && t.skipped < big.head(),
            "the end of the head is shown: {}",
            t.skipped
        );
        assert_eq!(
            t.text.matches("bytes of output omitted").count(),
            1,
            "the cut is said once, where it is"
        );
        assert!(file.ends_with(&t.text), "as the end of the file reads");
        assert!(t.text.len() as u64 >= LOG_TAIL - 100, "{}", t.text.len());
        // Every other line is one that was written, in order; only the head's last one is
        // cut short (by the bound itself, as in the file: the head ends at a byte count).
        let (head, tail) = t.text.split_once("[... ").unwrap();
        let mut nums = Vec::new();
        for (part, cut_last) in [(head, true), (tail.split_once('\n').unwrap().1, false)] {
            let lines: Vec<&str> = part.lines().collect();
            for (k, l) in lines.iter().enumerate() {
                let n: u32 = l[5..10].parse().unwrap();
                if cut_last && k + 1 == lines.len() {
                    assert!(line(n).starts_with(l), "{l:?}");
                } else {
                    assert_eq!(format!("{l}\n"), line(n));
                }
                nums.push(n);
            }
        }
        assert!(nums.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(nums.last(), Some(&7999));
        // The whole log, chunk after chunk as `/jobs/ID/log` reads it, is the file.
        let (mut from, mut whole) = (0, Vec::new());
        loop {
            let c = logread::read(&p, big, from, 1000).unwrap().unwrap();
            let ends_line = whole.last().is_none_or(|x| *x == b'\n');
            whole.extend_from_slice(&shown(&c, ends_line));
            from = c.next();
            if c.next() >= c.end {
                break;
            }
        }
        assert_eq!(String::from_utf8(whole).unwrap(), file);
    }

    #[test]
    fn the_stream_across_a_cut_sends_no_torn_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.log");
        let log = JobLog::open(&p, B).unwrap();
        let writer = std::thread::spawn(move || {
            let mut sink = log.sink();
            let mut total = 0u64;
            for i in 0..40_000u32 {
                let l = line(i);
                // Some lines in two writes: a reader may find half of one.
                let (a, b) = l.as_bytes().split_at(l.len() / 2);
                sink.write_all(a).unwrap();
                sink.write_all(b).unwrap();
                total += l.len() as u64;
            }
            total
        });
        let mut events = String::new();
        let mut from = 0;
        while !writer.is_finished() {
            let s = stream_step(&p, bound(), from, true).unwrap();
            events.push_str(&s.events);
            from = s.next;
        }
        let total = writer.join().unwrap();
        loop {
            let s = stream_step(&p, bound(), from, false).unwrap();
            events.push_str(&s.events);
            from = s.next;
            if !s.progressed {
                break;
            }
        }
        assert_eq!(from, total, "the stream ends at the stream's end");
        assert!(!events.contains("event: reset"));
        let ids: Vec<u64> = events
            .lines()
            .filter_map(|l| l.strip_prefix("id: "))
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] <= w[1]), "positions grow");
        assert_eq!(ids.last(), Some(&total));
        // Every data line is a whole line written, in order, or says what was cut out; the
        // two account for every byte written.
        let (mut sent, mut omitted, mut cuts, mut prev) = (0u64, 0u64, 0, None::<u32>);
        let lines = data_lines(&events);
        for (k, d) in lines.iter().enumerate() {
            if let Some(n) = d
                .strip_prefix("[... ")
                .and_then(|r| r.strip_suffix(" bytes of output omitted ...]"))
            {
                omitted += n.parse::<u64>().unwrap();
                cuts += 1;
                continue;
            }
            let expect = prev.map_or(0, |p| p + 1);
            let n: u32 = d.get(5..10).and_then(|n| n.parse().ok()).unwrap_or(expect);
            if format!("{d}\n") == line(n) {
                sent += d.len() as u64 + 1;
            } else {
                // Only the line the kept head ends in is sent short, right before the cut
                // is said (the bound kept no more of it: the file has it so too).
                let cut_next = lines.get(k + 1).is_some_and(|l| l.starts_with("[... "));
                assert!(
                    cut_next && n == expect && line(n).starts_with(d),
                    "a torn line: {d:?}"
                );
                sent += d.len() as u64;
            }
            assert!(prev.is_none_or(|p| p < n), "{prev:?} then {n}");
            prev = Some(n);
        }
        assert!(cuts > 0, "the log was cut while it was read");
        assert_eq!(sent + omitted, total);
        assert_eq!(prev, Some(39_999));
    }
}
