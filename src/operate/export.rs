//! The export form of the log: what `events --json` prints, what `compact` writes to its
//! archives and what `import` reads. JSON Lines, one event a line (a `queued` or `invalid` event
//! carrying its input), ended by one trailer line that says the export is whole:
//!
//! ```text
//! {"trailer":"build-image export","events":N,"sha256":"<hex>"}
//! ```
//!
//! `events` is the number of event lines before it, `sha256` the digest of those lines' bytes
//! as written, each with its newline. A trailer has no `seq`, so it is never read as an event.
//!
//! Invariant: an export is taken whole only when its trailer is its last line and matches the
//! lines before it; a file cut short (at a line boundary or not), an empty file, or lines
//! changed or lost are found, and `import` refuses them unless told to take what is there.

use crate::domain::Event;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::io::BufRead;

/// The value of a trailer's `trailer` key.
pub const TRAILER: &str = "build-image export";

/// The last line of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    /// Always [`TRAILER`]: what marks the line as the trailer.
    pub trailer: String,
    /// The event lines before it.
    pub events: u64,
    /// sha256 (hex) of the bytes of those lines, each with its newline.
    pub sha256: String,
}

/// The count and digest of the event lines of an export, as they are written or read.
#[derive(Clone, Default)]
pub struct Digest {
    events: u64,
    sha: Sha256,
}

impl Digest {
    /// Counts one event line: its bytes as written, its newline included.
    pub fn line(&mut self, bytes: &[u8]) {
        self.events += 1;
        self.sha.update(bytes);
    }

    pub fn events(&self) -> u64 {
        self.events
    }

    /// The trailer of the lines counted so far.
    pub fn trailer(&self) -> Trailer {
        Trailer {
            trailer: TRAILER.to_string(),
            events: self.events,
            sha256: crate::digest::hex(&self.sha.clone().finalize()),
        }
    }

    /// The trailer as the line that ends the export (newline included).
    pub fn trailer_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(&self.trailer()).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

/// One event as a line of the export (newline included).
pub fn event_line(ev: &Event) -> serde_json::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(ev)?;
    line.push(b'\n');
    Ok(line)
}

/// Why an export is not whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotWhole {
    #[error(
        "it has no trailer line: it may be cut short (an empty file, or an export written by a version before the trailer)"
    )]
    NoTrailer,
    #[error(
        "its trailer says {want} event line(s) (sha256 {want_sha}), but {got} event line(s) (sha256 {got_sha}) come before it: lines were lost or changed"
    )]
    Mismatch {
        want: u64,
        want_sha: String,
        got: u64,
        got_sha: String,
    },
    #[error("its last line ({0}) is cut short")]
    Cut(usize),
}

/// A bad line of an export (refused whatever the trailer says).
#[derive(Debug, thiserror::Error)]
pub enum BadLine {
    #[error("line {0}: {1}")]
    Io(usize, std::io::Error),
    #[error("line {0}: not an event of the log: {1}")]
    NotAnEvent(usize, serde_json::Error),
    #[error("line {line} follows the trailer (line {trailer}): two exports joined, or lines added")]
    AfterTrailer { line: usize, trailer: usize },
}

/// Reads the events of an export in order, counting and digesting their lines; once the
/// reader is done, [`Reader::check`] says whether the export was whole.
pub struct Reader<R> {
    input: R,
    line: usize,
    buf: Vec<u8>,
    digest: Digest,
    trailer: Option<(usize, Trailer)>,
    /// A last line with no newline that is not an event: cut short (the end of the reading).
    cut: Option<usize>,
    done: bool,
}

impl<R: BufRead> Reader<R> {
    pub fn new(input: R) -> Reader<R> {
        Reader {
            input,
            line: 0,
            buf: Vec::new(),
            digest: Digest::default(),
            trailer: None,
            cut: None,
            done: false,
        }
    }

    /// The next event (None at the end), with the length of its line.
    pub fn next_event(&mut self) -> Result<Option<(Event, usize)>, BadLine> {
        while !self.done {
            self.buf.clear();
            let n = self
                .input
                .read_until(b'\n', &mut self.buf)
                .map_err(|e| BadLine::Io(self.line + 1, e))?;
            if n == 0 {
                self.done = true;
                break;
            }
            self.line += 1;
            let complete = self.buf.ends_with(b"\n");
            let text = self.buf.trim_ascii();
            if text.is_empty() {
                continue;
            }
            if let Some((at, _)) = &self.trailer {
                return Err(BadLine::AfterTrailer {
                    line: self.line,
                    trailer: *at,
                });
            }
            match serde_json::from_slice::<Event>(text) {
                Ok(ev) => {
                    self.digest.line(&self.buf);
                    return Ok(Some((ev, self.buf.len())));
                }
                Err(e) => {
                    if let Ok(t) = serde_json::from_slice::<Trailer>(text)
                        && t.trailer == TRAILER
                    {
                        self.trailer = Some((self.line, t));
                        continue;
                    }
                    if !complete {
                        self.cut = Some(self.line);
                        self.done = true;
                        break;
                    }
                    return Err(BadLine::NotAnEvent(self.line, e));
                }
            }
        }
        Ok(None)
    }

    /// After the last event: Ok when the export was whole (its trailer last, matching the
    /// lines before it), else why not.
    pub fn check(&self) -> Result<(), NotWhole> {
        if let Some(line) = self.cut {
            return Err(NotWhole::Cut(line));
        }
        let Some((_, t)) = &self.trailer else {
            return Err(NotWhole::NoTrailer);
        };
        let got = self.digest.trailer();
        if t.events != got.events || t.sha256 != got.sha256 {
            return Err(NotWhole::Mismatch {
                want: t.events,
                want_sha: t.sha256.clone(),
                got: got.events,
                got_sha: got.sha256,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::EventKind;

    fn export(n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut d = Digest::default();
        for seq in 1..=n {
            let ev = Event {
                seq,
                ts: "2026-01-01T00:00:00.000Z".into(),
                job: seq,
                kind: EventKind::Cancelled { reason: "r".into() },
            };
            let line = event_line(&ev).unwrap();
            d.line(&line);
            out.extend(line);
        }
        out.extend(d.trailer_line());
        out
    }

    fn read(bytes: &[u8]) -> (Result<Vec<u64>, String>, Result<(), NotWhole>) {
        let mut r = Reader::new(bytes);
        let mut seqs = Vec::new();
        loop {
            match r.next_event() {
                Ok(Some((ev, _))) => seqs.push(ev.seq),
                Ok(None) => return (Ok(seqs), r.check()),
                Err(e) => return (Err(e.to_string()), r.check()),
            }
        }
    }

    #[test]
    fn a_whole_export_reads_back_and_checks() {
        let bytes = export(3);
        let last = String::from_utf8(bytes.clone()).unwrap();
        let trailer: serde_json::Value =
            serde_json::from_str(last.lines().last().unwrap()).unwrap();
        assert_eq!(trailer["trailer"], TRAILER);
        assert_eq!(trailer["events"], 3);
        assert!(trailer.get("seq").is_none());
        assert_eq!(read(&bytes), (Ok(vec![1, 2, 3]), Ok(())));
        // an empty log's export: the trailer alone
        assert_eq!(read(&export(0)), (Ok(vec![]), Ok(())));
    }

    #[test]
    fn what_is_not_whole_is_found() {
        let bytes = export(3);
        let text = String::from_utf8(bytes.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // cut at a line boundary: no trailer
        let cut = format!("{}\n{}\n", lines[0], lines[1]);
        assert_eq!(
            read(cut.as_bytes()),
            (Ok(vec![1, 2]), Err(NotWhole::NoTrailer))
        );
        // empty
        assert_eq!(read(b""), (Ok(vec![]), Err(NotWhole::NoTrailer)));
        // cut inside a line
        let mid = &bytes[..lines[0].len() + 10];
        assert_eq!(read(mid), (Ok(vec![1]), Err(NotWhole::Cut(2))));
        // a line in the middle that is not an event: an error
        let bad = format!("{}\nnot json\n{}\n", lines[0], lines[3]);
        assert!(
            read(bad.as_bytes())
                .0
                .unwrap_err()
                .starts_with("line 2: not an event")
        );
        // a line lost in the middle
        let lost = format!("{}\n{}\n{}\n", lines[0], lines[2], lines[3]);
        assert!(matches!(
            read(lost.as_bytes()).1,
            Err(NotWhole::Mismatch {
                want: 3,
                got: 2,
                ..
            })
        ));
        // a line changed
        let changed = text.replacen("\"r\"", "\"s\"", 1);
        assert!(matches!(
            read(changed.as_bytes()).1,
            Err(NotWhole::Mismatch {
                want: 3,
                got: 3,
                ..
            })
        ));
        // an object that only looks like a trailer: not an event, so refused
        let other = format!(
            "{}\n{}\n",
            lines[0],
            lines[3].replace(TRAILER, "some other export")
        );
        assert!(
            read(other.as_bytes())
                .0
                .unwrap_err()
                .starts_with("line 2: not an event")
        );
        // two exports joined
        let joined = format!("{text}{text}");
        assert!(
            read(joined.as_bytes())
                .0
                .unwrap_err()
                .contains("follows the trailer")
        );
    }
}
