//! The sha256 of a build's files, taken in one streaming pass over each file, and the
//! `SHA256SUMS` text that lists them in the form `sha256sum -c` reads.
//!
//! Invariant: a file is read once, front to back, in large reads; the digest and the byte count
//! come from the same pass, so the hash an answer carries is the hash of the bytes counted.

use sha2::{Digest, Sha256};
use std::io::{ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// The name of the sums file in a job folder (DESIGN.md, "Images are artifacts").
pub const SUMS_FILE: &str = "SHA256SUMS";

/// Bytes asked for in one read: large enough that the digest, not the system calls, sets the pace.
const CHUNK: usize = 1 << 20;

/// One file of a build: its path relative to the job folder, its sha256 (lowercase hex) and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSum {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
}

/// The sha256 (lowercase hex) and the length of everything `r` yields.
pub fn hash_reader(mut r: impl Read) -> std::io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((crate::digest::hex(&hasher.finalize()), total))
}

/// The text of a `SHA256SUMS` file: one line per file, sorted by path, in `sha256sum`'s text
/// form (`HEX  PATH`). A path holding a backslash, a newline or a carriage return is written the
/// way coreutils writes it (the line starts with `\`, and those characters are escaped), so
/// `sha256sum -c` finds every file; other bytes of a name are written as they are.
pub fn render(files: &[FileSum]) -> Vec<u8> {
    let mut sorted: Vec<&FileSum> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.as_os_str().cmp(b.path.as_os_str()));
    let mut out = Vec::new();
    for f in sorted {
        let name = f.path.as_os_str().as_bytes();
        let escape = name.iter().any(|b| matches!(b, b'\\' | b'\n' | b'\r'));
        if escape {
            out.push(b'\\');
        }
        out.extend_from_slice(f.sha256.as_bytes());
        out.extend_from_slice(b"  ");
        for &b in name {
            match b {
                b'\\' if escape => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b => out.push(b),
            }
        }
        out.push(b'\n');
    }
    out
}

/// The files a `SHA256SUMS` text lists, as [`render`] writes them (and `sha256sum` reads them):
/// each line's path (escapes undone) and hex digest. A line that is not of that form is an
/// error naming it (1-based).
pub fn parse(text: &[u8]) -> Result<Vec<(PathBuf, String)>, String> {
    use std::os::unix::ffi::OsStringExt;
    let mut out = Vec::new();
    for (n, line) in text.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let (escaped, line) = match line.strip_prefix(b"\\") {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let bad = || format!("line {} is not a sha256sum line", n + 1);
        if line.len() < 66 || &line[64..66] != b"  " {
            return Err(bad());
        }
        let hex = std::str::from_utf8(&line[..64]).map_err(|_| bad())?;
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut name = Vec::with_capacity(line.len() - 66);
        let mut it = line[66..].iter();
        while let Some(&b) = it.next() {
            if escaped && b == b'\\' {
                match it.next() {
                    Some(b'\\') => name.push(b'\\'),
                    Some(b'n') => name.push(b'\n'),
                    Some(b'r') => name.push(b'\r'),
                    _ => return Err(bad()),
                }
            } else {
                name.push(b);
            }
        }
        out.push((
            PathBuf::from(std::ffi::OsString::from_vec(name)),
            hex.to_ascii_lowercase(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_what_render_writes() {
        let files: Vec<FileSum> = ["a.raw", "sub/b c.img", "odd\\name\nx", "r\rs"]
            .iter()
            .enumerate()
            .map(|(i, p)| FileSum {
                path: PathBuf::from(p),
                sha256: format!("{i:x}").repeat(64),
                bytes: 1,
            })
            .collect();
        let mut back = parse(&render(&files)).unwrap();
        back.sort();
        let mut want: Vec<(PathBuf, String)> = files
            .iter()
            .map(|f| (f.path.clone(), f.sha256.clone()))
            .collect();
        want.sort();
        assert_eq!(back, want);
        assert!(parse(b"abc  x\n").unwrap_err().contains("line 1"));
    }

    #[test]
    fn hashes_what_it_reads_in_one_pass() {
        let data = vec![7u8; CHUNK * 2 + 5];
        let (hex, n) = hash_reader(&data[..]).unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(hex, crate::digest::sha256_hex(&data));
        let (empty, zero) = hash_reader(&b""[..]).unwrap();
        assert_eq!(zero, 0);
        assert_eq!(
            empty,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn renders_sorted_lines_and_escapes_as_coreutils_does() {
        let sum = |p: &str| FileSum {
            path: p.into(),
            sha256: "ab".repeat(32),
            bytes: 1,
        };
        let text = render(&[sum("b.img"), sum("a dir/x.raw"), sum("odd\\na\nme")]);
        let h = "ab".repeat(32);
        assert_eq!(
            String::from_utf8(text).unwrap(),
            format!("{h}  a dir/x.raw\n{h}  b.img\n\\{h}  odd\\\\na\\nme\n")
        );
    }
}
