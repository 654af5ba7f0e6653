//! Text that reaches a terminal: which characters are unsafe there ([`is_unsafe`]: control
//! characters, bidirectional formatting, line and paragraph separators) and [`escape`], the one
//! escaping function every printer of the command line uses.
//!
//! Invariant: the output of [`escape`] holds no unsafe character, reads as the text it escapes,
//! and is valid inside a JSON string literal with the same meaning (`\n`, `\r`, `\t`, `\uXXXX`),
//! so that JSON printed for people can go through it line by line ([`escape_lines`]) unchanged
//! in meaning.

use std::borrow::Cow;

/// The bidirectional formatting characters: ALM, LRM, RLM, the embeddings and overrides
/// (U+202A..U+202E) and the isolates (U+2066..U+2069). Text holding them can show on a screen
/// in another order than it is read by a program.
const BIDI: [char; 12] = [
    '\u{061c}', '\u{200e}', '\u{200f}', '\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}', '\u{202e}',
    '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}',
];

/// A character that a terminal acts on instead of showing (C0 and C1 controls, DEL: escape
/// sequences, bells, new lines, carriage returns), that reorders what is shown (bidirectional
/// formatting), or that breaks a line (U+2028, U+2029).
pub fn is_unsafe(c: char) -> bool {
    c.is_control() || BIDI.contains(&c) || c == '\u{2028}' || c == '\u{2029}'
}

/// The text with every unsafe character written out: `\n`, `\r`, `\t`, or `\uXXXX` (every
/// unsafe character is in the Basic Multilingual Plane). Text without one is borrowed as it is.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_unsafe(c) => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Text of several lines meant as lines (a multi-line error, pretty-printed JSON): each line
/// [`escape`]d, the line breaks kept.
pub fn escape_lines(s: &str) -> String {
    s.split('\n').map(escape).collect::<Vec<_>>().join("\n")
}

/// A size for people: 512 bytes, 64.0 KiB, 67.9 MiB, 1.2 GiB.
pub fn human_size(bytes: u64) -> String {
    const K: f64 = 1024.0;
    let b = bytes as f64;
    if bytes < 1024 {
        format!("{bytes} bytes")
    } else if b < K * K {
        format!("{:.1} KiB", b / K)
    } else if b < K * K * K {
        format!("{:.1} MiB", b / (K * K))
    } else {
        format!("{:.1} GiB", b / (K * K * K))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_characters_are_written_out() {
        assert!(matches!(escape("mer-core é ユーザー"), Cow::Borrowed(_)));
        assert_eq!(
            escape("a\u{1b}[31mb\u{7}\n\r\tc"),
            "a\\u001b[31mb\\u0007\\n\\r\\tc"
        );
        assert_eq!(
            escape("\u{1b}]0;title\u{7}x\u{9b}2J\u{7f}"),
            "\\u001b]0;title\\u0007x\\u009b2J\\u007f"
        );
        assert_eq!(escape("abc\u{202e}fed"), "abc\\u202efed");
        assert_eq!(escape("\u{2066}\u{2069}\u{2028}"), "\\u2066\\u2069\\u2028");
        for c in (0..=0x10ffffu32).filter_map(char::from_u32) {
            let e = escape(&c.to_string()).into_owned();
            assert!(!e.chars().any(is_unsafe), "{c:?} -> {e:?}");
        }
    }

    #[test]
    fn escaped_json_is_the_same_json() {
        let v = serde_json::json!({"a": "x\u{7f}\u{85}\u{202e}\u{1b}y\nz"});
        let pretty = serde_json::to_string_pretty(&v).unwrap();
        let safe = escape_lines(&pretty);
        assert!(!safe.chars().any(|c| c != '\n' && is_unsafe(c)), "{safe}");
        assert_eq!(safe.lines().count(), pretty.lines().count());
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, v);
    }
}
