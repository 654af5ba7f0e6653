//! The INI text of an original `build_image.conf`, read exactly as Python's configparser reads it
//! with the settings that match how IMG's Python 2 ConfigParser read it:
//! `RawConfigParser(inline_comment_prefixes=(';',))` on the file opened with encoding `utf-8-sig`
//! (every other setting at its default: `=` and `:` delimiters, `#` and `;` comment lines, blank
//! lines kept inside values, a section or key given twice refused, `[DEFAULT]` under every
//! section, keys lower-cased).
//!
//! Invariant: for every text, [`parse`] gives what Python gives: the same sections in the same
//! order, each with the same keys and the same values as `dict(parser[section])`, or an error
//! where Python raises one (tests/config_import.rs compares the two on the same files). Values
//! are not interpolated (`%(name)s` is the caller's to refuse).

/// Why a text is not an INI file ConfigParser would read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IniError {
    #[error("line {line}: {what}")]
    Line { line: usize, what: String },
    #[error("[{section}] is given twice (line {line}; ConfigParser refuses that too)")]
    SectionTwice { section: String, line: usize },
    #[error("[{section}] {key} is given twice (line {line}; ConfigParser refuses that too)")]
    KeyTwice {
        section: String,
        key: String,
        line: usize,
    },
}

/// A section's name and its keys with their values, in file order.
pub type Section = (String, Vec<(String, String)>);

/// What a file holds: the `[DEFAULT]` keys, and every other section with the keys Python shows
/// for it (its own, then the `[DEFAULT]` keys it does not set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ini {
    pub defaults: Vec<(String, String)>,
    pub sections: Vec<Section>,
}

/// Python's `str.isspace()`: Unicode White_Space and the four information separators
/// U+001C..U+001F (which Python counts as space, and its `strip()` and `\s` too).
pub fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn py_strip(s: &str) -> &str {
    s.trim_matches(py_space)
}

/// The lines of a file as Python's text mode reads them (universal newlines: `\r\n`, `\r` and
/// `\n` end a line), after a UTF-8 byte-order mark (what `utf-8-sig` drops).
fn lines(text: &str) -> Vec<String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let mut out: Vec<String> = text.split('\n').map(str::to_string).collect();
    if out.last().is_some_and(String::is_empty) {
        out.pop(); // the end of the last line, not a line
    }
    out
}

/// Where the `;` that starts an inline comment is (the first one at the start of the line or
/// after a space), as a char index.
fn inline_comment(line: &[char]) -> Option<usize> {
    (0..line.len()).find(|&i| line[i] == ';' && (i == 0 || py_space(line[i - 1])))
}

/// Which dictionary the current key is in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Defaults,
    Section(usize),
}

/// Keys and their value lines while reading.
type Keys = Vec<(String, Vec<String>)>;

fn keys_of<'a>(
    defaults: &'a mut Keys,
    sections: &'a mut [(String, Keys)],
    t: Target,
) -> &'a mut Keys {
    match t {
        Target::Defaults => defaults,
        Target::Section(i) => &mut sections[i].1,
    }
}

/// Reads INI text as configparser's `RawConfigParser._read` does (CPython 3.11), line by line.
pub fn parse(text: &str) -> Result<Ini, IniError> {
    let mut defaults: Keys = Vec::new();
    let mut sections: Vec<(String, Keys)> = Vec::new();
    let mut cursect: Option<Target> = None;
    let mut sectname = String::new();
    // the key whose value continues on deeper-indented lines (its index in cursect)
    let mut optname: Option<usize> = None;
    let mut indent_level = 0usize;
    let mut added: Vec<(String, Option<String>)> = Vec::new();
    let mut first_error: Option<IniError> = None;
    for (n, raw) in lines(text).iter().enumerate() {
        let lineno = n + 1;
        let line: Vec<char> = raw.chars().collect();
        let stripped = py_strip(raw);
        let comment_start = if stripped.starts_with('#') || stripped.starts_with(';') {
            Some(0)
        } else {
            inline_comment(&line)
        };
        let before: String = line[..comment_start.unwrap_or(line.len())].iter().collect();
        let value = py_strip(&before);
        if value.is_empty() {
            // empty_lines_in_values: a blank line (not a comment) is part of the value
            if comment_start.is_none()
                && let (Some(t), Some(k)) = (cursect, optname)
            {
                keys_of(&mut defaults, &mut sections, t)[k]
                    .1
                    .push(String::new());
            }
            continue;
        }
        let cur_indent = line.iter().position(|c| !py_space(*c)).unwrap_or(0);
        if let (Some(t), Some(k)) = (cursect, optname)
            && cur_indent > indent_level
        {
            keys_of(&mut defaults, &mut sections, t)[k]
                .1
                .push(value.to_string());
            continue;
        }
        indent_level = cur_indent;
        // a section header: `[`, then the longest text up to a `]` (at least one character)
        if let Some(rest) = value.strip_prefix('[')
            && let Some(end) = rest.rfind(']').filter(|e| *e > 0)
        {
            let name = rest[..end].to_string();
            if name == "DEFAULT" {
                cursect = Some(Target::Defaults);
            } else {
                if added.iter().any(|(s, k)| *s == name && k.is_none())
                    || sections.iter().any(|(s, _)| *s == name)
                {
                    return Err(IniError::SectionTwice {
                        section: name,
                        line: lineno,
                    });
                }
                sections.push((name.clone(), Vec::new()));
                added.push((name.clone(), None));
                cursect = Some(Target::Section(sections.len() - 1));
            }
            sectname = name;
            optname = None;
            continue;
        }
        let Some(t) = cursect else {
            return Err(IniError::Line {
                line: lineno,
                what: "a line before any [section] header (ConfigParser reads nothing \
                       outside a section)"
                    .into(),
            });
        };
        // a key: the text before the first `=` or `:`
        let Some(d) = value.find(['=', ':']) else {
            first_error.get_or_insert(IniError::Line {
                line: lineno,
                what: format!(
                    "{value:?} is neither a [section] header, a `key = value` line, nor a \
                     comment"
                ),
            });
            optname = None;
            continue;
        };
        let key = value[..d].trim_end_matches(py_space).to_lowercase();
        let val = py_strip(&value[d + 1..]).to_string();
        if key.is_empty() {
            first_error.get_or_insert(IniError::Line {
                line: lineno,
                what: format!("{value:?} has no key before its `{}`", &value[d..d + 1]),
            });
        }
        let entry = (sectname.clone(), Some(key.clone()));
        if added.contains(&entry) {
            return Err(IniError::KeyTwice {
                section: sectname,
                key,
                line: lineno,
            });
        }
        added.push(entry);
        let keys = keys_of(&mut defaults, &mut sections, t);
        keys.push((key, vec![val]));
        optname = Some(keys.len() - 1);
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let join = |keys: Keys| -> Vec<(String, String)> {
        keys.into_iter()
            .map(|(k, v)| {
                let v = v.join("\n");
                (k, v.trim_end_matches(py_space).to_string())
            })
            .collect()
    };
    let defaults = join(defaults);
    let sections = sections
        .into_iter()
        .map(|(name, keys)| {
            let mut keys = join(keys);
            for (k, v) in &defaults {
                if !keys.iter().any(|(own, _)| own == k) {
                    keys.push((k.clone(), v.clone()));
                }
            }
            (name, keys)
        })
        .collect();
    Ok(Ini { defaults, sections })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(text: &str) -> Vec<(String, String)> {
        let ini = parse(text).unwrap();
        ini.sections
            .into_iter()
            .find(|(n, _)| n == "worker")
            .map(|(_, k)| k)
            .unwrap_or_default()
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn continuation_lines_and_comments() {
        // an indented line continues the value; a comment line inside it does not end it
        assert_eq!(
            worker("[worker]\nmic_opts = --a\n  --b\n# note\n  --c\nfs_pack = x\n"),
            kv(&[("mic_opts", "--a\n--b\n--c"), ("fs_pack", "x")])
        );
        // `#` is no inline comment: the continuation belongs to the value, not a key
        assert_eq!(
            worker("[worker]\nmic_path = '/tmp/evil' #\n  foo\n"),
            kv(&[("mic_path", "'/tmp/evil' #\nfoo")])
        );
        // ` ;` is one; `a;b` is not
        assert_eq!(
            worker("[worker]\na = 1 ; c\nb = x;y\nc = ;all comment\n"),
            kv(&[("a", "1"), ("b", "x;y"), ("c", "")])
        );
        // blank lines inside a value stay, trailing ones go
        assert_eq!(
            worker("[worker]\na = 1\n\n  2\n\n\nb: 3\n"),
            kv(&[("a", "1\n\n2"), ("b", "3")])
        );
    }

    #[test]
    fn bom_newlines_default_and_case() {
        assert_eq!(
            worker("\u{feff}[worker]\r\nBase_Dir = /x\rTimeout=5\n"),
            kv(&[("base_dir", "/x"), ("timeout", "5")])
        );
        let ini = parse("[DEFAULT]\nt = 1\n[worker]\na = 2\nt = 3\n[boss]\n").unwrap();
        assert_eq!(ini.defaults, kv(&[("t", "1")]));
        assert_eq!(ini.sections[0].1, kv(&[("a", "2"), ("t", "3")]));
        assert_eq!(ini.sections[1].1, kv(&[("t", "1")]));
        // a header is `[` to the last `]`, whatever follows
        assert_eq!(parse("[a]b] x\n").unwrap().sections[0].0, "a]b");
    }

    #[test]
    fn what_configparser_refuses() {
        for (text, want) in [
            ("a = 1\n[worker]\n", "before any [section]"),
            ("[worker]\njust words\n", "neither"),
            ("[worker]\n= v\n", "no key"),
            ("[worker]\na = 1\nA = 2\n", "given twice"),
            ("[worker]\n[worker]\n", "given twice"),
            ("[]\n", "before any"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
