//! The stored form of the events: blocks. A block holds consecutive events (in seq order) in
//! one sled value under the seq of its first event, so a scan pays sled's cost per value once
//! for many events, and a block is compressed as a whole (events of a farm repeat themselves:
//! the same keys, worker, URL prefixes, timestamps that differ in their last digits).
//!
//! Layout: one byte of format, then the body. Format 1: the body as is; format 2: the body
//! compressed with LZ4 (its size first, as `lz4_flex` writes it). The body is a run of entries,
//! each `seq`, `job`, `len << 1 | input` as LEB128 varints, then `len` bytes: the event's JSON
//! (without its input), or, flagged `input`, the input workitem of the event before it (same
//! seq), as read. The job and the flag in front let a reader skip the events of other jobs and
//! the inputs without decoding them. The inputs of a farm repeat themselves too (the same
//! kickstarts, built again and again): compressed together in a block, a repeat costs little.
//!
//! Invariant: the entries of a block are in ascending seq order, and every seq of a block is
//! below the key of the next block, except in one case a crash can leave: a merged block
//! written and the small blocks it replaces not all removed yet. Readers therefore skip an
//! event whose seq is not above the last one they returned.

use std::borrow::Cow;

const RAW: u8 = 1;
const LZ4: u8 = 2;

/// A body is never larger than this: the writer cuts a block once it passes 256 KiB, so a body
/// is at most that plus one event and its input, and an input is at most `max_bytes` (1 GiB at
/// most, see config.rs). A damaged size is refused instead of allocated.
const MAX_BODY: usize = (1 << 30) + (16 << 20);

/// Bodies smaller than this are kept raw (compression would not pay for its header).
const COMPRESS_FROM: usize = 192;

/// Why a stored block cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("block of event {first}: unknown format {format}")]
    Format { first: u64, format: u8 },
    #[error("block of event {first}: {detail}")]
    Damaged { first: u64, detail: String },
}

/// Builds one block from events given in seq order.
#[derive(Default)]
pub struct Builder {
    body: Vec<u8>,
    count: usize,
}

impl Builder {
    /// Adds an event (`input` false) or the input of the event just added (`input` true).
    pub fn push(&mut self, seq: u64, job: u64, json: &[u8], input: bool) {
        put_varint(&mut self.body, seq);
        put_varint(&mut self.body, job);
        put_varint(&mut self.body, (json.len() as u64) << 1 | u64::from(input));
        self.body.extend_from_slice(json);
        if !input {
            self.count += 1;
        }
    }

    /// Events in the block (inputs not counted).
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the body so far (uncompressed).
    pub fn body_bytes(&self) -> usize {
        self.body.len()
    }

    /// The stored value: compressed when that makes it smaller.
    pub fn finish(self) -> Vec<u8> {
        if self.body.len() >= COMPRESS_FROM {
            let packed = lz4_flex::compress_prepend_size(&self.body);
            if packed.len() + 1 < self.body.len() {
                let mut out = Vec::with_capacity(packed.len() + 1);
                out.push(LZ4);
                out.extend_from_slice(&packed);
                return out;
            }
        }
        let mut out = Vec::with_capacity(self.body.len() + 1);
        out.push(RAW);
        out.extend_from_slice(&self.body);
        out
    }
}

/// The body of a stored block (decompressed when it was compressed); `first` (its key) names
/// it in errors.
pub fn body(first: u64, stored: &[u8]) -> Result<Cow<'_, [u8]>, BlockError> {
    match stored.split_first() {
        Some((&RAW, body)) => Ok(Cow::Borrowed(body)),
        Some((&LZ4, packed)) if declared_size(packed).is_some_and(|n| n <= MAX_BODY) => {
            match lz4_flex::decompress_size_prepended(packed) {
                Ok(body) if Some(body.len()) == declared_size(packed) => Ok(Cow::Owned(body)),
                Ok(_) => Err(BlockError::Damaged {
                    first,
                    detail: "it inflates to another size than it says".into(),
                }),
                Err(e) => Err(BlockError::Damaged {
                    first,
                    detail: e.to_string(),
                }),
            }
        }
        Some((&LZ4, _)) => Err(BlockError::Damaged {
            first,
            detail: "its size is not plausible".into(),
        }),
        Some((&format, _)) => Err(BlockError::Format { first, format }),
        None => Err(BlockError::Damaged {
            first,
            detail: "empty".into(),
        }),
    }
}

/// The size LZ4's prefix declares (little-endian u32).
fn declared_size(packed: &[u8]) -> Option<usize> {
    let b: [u8; 4] = packed.get(..4)?.try_into().ok()?;
    Some(u32::from_le_bytes(b) as usize)
}

/// One event of a block body, not decoded.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub seq: u64,
    pub job: u64,
    pub json: &'a [u8],
    /// The input workitem of event `seq`, not an event.
    pub input: bool,
}

/// The entries of a block body, in order; a damaged body ends in one error.
pub fn entries(first: u64, body: &[u8]) -> Entries<'_> {
    Entries {
        first,
        rest: body,
        failed: false,
    }
}

pub struct Entries<'a> {
    first: u64,
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, BlockError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() || self.failed {
            return None;
        }
        let r = (|| {
            let seq = take_varint(&mut self.rest)?;
            let job = take_varint(&mut self.rest)?;
            let flagged = take_varint(&mut self.rest)?;
            let len = usize::try_from(flagged >> 1).ok()?;
            if len > self.rest.len() {
                return None;
            }
            let (json, rest) = self.rest.split_at(len);
            self.rest = rest;
            Some(Entry {
                seq,
                job,
                json,
                input: flagged & 1 == 1,
            })
        })();
        match r {
            Some(e) => Some(Ok(e)),
            None => {
                self.failed = true;
                Some(Err(BlockError::Damaged {
                    first: self.first,
                    detail: "an entry is cut short".into(),
                }))
            }
        }
    }
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

pub fn take_varint(rest: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for (i, &b) in rest.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            *rest = &rest[i + 1..];
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_reads_back_raw_and_compressed() {
        for n in [1u64, 3, 200] {
            let mut b = Builder::default();
            for i in 0..n {
                let json = format!(r#"{{"seq":{},"job":7,"kind":"started"}}"#, 300 + i);
                b.push(300 + i, 7 + i % 2, json.as_bytes(), false);
                if i == 1 {
                    b.push(301, 8, b"{\"image\":{}}", true);
                }
            }
            assert_eq!(b.len() as u64, n);
            let stored = b.finish();
            assert_eq!(stored[0], if n == 200 { LZ4 } else { RAW });
            let body = body(300, &stored).unwrap();
            let all: Vec<Entry<'_>> = entries(300, &body).map(Result::unwrap).collect();
            let inputs: Vec<&Entry<'_>> = all.iter().filter(|e| e.input).collect();
            assert_eq!(inputs.len(), usize::from(n > 1));
            if let Some(i) = inputs.first() {
                assert_eq!((i.seq, i.job, i.json), (301, 8, &b"{\"image\":{}}"[..]));
            }
            let got: Vec<&Entry<'_>> = all.iter().filter(|e| !e.input).collect();
            assert_eq!(got.len() as u64, n);
            for (i, e) in got.iter().enumerate() {
                let i = i as u64;
                assert_eq!((e.seq, e.job), (300 + i, 7 + i % 2));
                assert!(
                    e.json
                        .starts_with(format!(r#"{{"seq":{}"#, 300 + i).as_bytes())
                );
            }
        }
    }

    #[test]
    fn damage_is_an_error_not_a_panic() {
        let mut b = Builder::default();
        b.push(u64::MAX, 1, b"{}", false);
        let stored = b.finish();
        for cut in 0..stored.len() {
            let part = &stored[..cut];
            if let Ok(body) = body(1, part) {
                let all: Vec<_> = entries(1, &body).collect();
                assert!(all.iter().any(Result::is_err) || all.is_empty(), "{cut}");
            }
        }
        assert!(matches!(body(1, &[9, 1]), Err(BlockError::Format { .. })));
        assert!(body(1, &[LZ4, 200, 0, 0, 0, 1]).is_err());
    }
}
