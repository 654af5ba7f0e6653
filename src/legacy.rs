//! The original IMG `build_image.conf` (INI, read by Python's ConfigParser): `config import`
//! turns it into this program's TOML, and `--config` given one says so instead of a bare TOML
//! parse error.
//!
//! Invariant: every key of the file is accounted for: mapped (with a comment naming the INI key
//! it came from), or reported as unknown (on stderr and as a comment in the output), never
//! dropped in silence. The TOML is built by a pure function of the INI text.

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use std::collections::HashSet;
use std::fmt::Write as _;

#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    #[error("not an INI file: line {line}, column {col}: {msg}")]
    Parse {
        line: usize,
        col: usize,
        msg: String,
    },
    #[error("[{section}] {key} is given twice (ConfigParser refuses that too)")]
    Twice { section: String, key: String },
    #[error("[{section}] {key} = {value:?}: {why}")]
    Value {
        section: String,
        key: String,
        value: String,
        why: String,
    },
}

/// How a `[worker]` value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    /// yes/no, true/false, on/off, 1/0 (ConfigParser's getboolean).
    Bool,
    /// Whole seconds.
    Seconds,
    /// A whole number.
    Count,
    /// mic_opts: the colon-separated list (comma-separated in older IMG releases).
    OptList,
    /// mic or mic2.
    Ict,
}

/// The `[worker]` keys: the original ones (REFERENCE.md) and this program's own (a site may have
/// added them to its INI file while moving).
const WORKER_KEYS: &[(&str, Kind)] = &[
    ("base_dir", Kind::Text),
    ("base_url", Kind::Text),
    ("use_kvm", Kind::Bool),
    ("ict", Kind::Ict),
    ("mic_opts", Kind::OptList),
    ("fs_pack", Kind::Text),
    ("img_tmp", Kind::Text),
    ("vm_kernel", Kind::Text),
    ("vm_initrd", Kind::Text),
    ("vm_ssh_key", Kind::Text),
    ("vm_base_img", Kind::Text),
    ("timeout", Kind::Seconds),
    ("use_9p_cache", Kind::Bool),
    ("mic_cachedir", Kind::Text),
    ("vm_wait", Kind::Seconds),
    // build-image's own
    ("mic_path", Kind::Text),
    ("sudo", Kind::Bool),
    ("workers", Kind::Count),
    ("max_attempts", Kind::Count),
    ("grace", Kind::Seconds),
    ("job_log_max_mb", Kind::Count),
    ("vm_append", Kind::Text),
    ("vm_memory", Kind::Text),
    ("vm_smp", Kind::Count),
    ("vm_accel", Kind::Text),
];

/// The `[boss]` keys, which make the AMQP URL of `[amqp] url`.
const BOSS_KEYS: [&str; 4] = ["amqp_host", "amqp_user", "amqp_pwd", "amqp_vhost"];

/// What `config import` made.
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    pub toml: String,
    /// Keys (and sections) with no meaning here, as `[section] key`.
    pub unknown: Vec<String>,
}

/// A section's name ("" before any section) and its keys with their values, in file order.
type Section = (String, Vec<(String, String)>);

/// Parses INI text as ConfigParser read it: `key = value` or `key: value`, `;` and `#` comment
/// lines, keys case-insensitive (lowered), no quotes or escapes, and (as Python 2's ConfigParser,
/// which IMG ran on) an inline comment after whitespace and `;` removed.
fn parse(text: &str) -> Result<Vec<Section>, LegacyError> {
    let opt = ini::ParseOption {
        enabled_quote: false,
        enabled_escape: false,
        ..Default::default()
    };
    let parsed = ini::Ini::load_from_str_opt(text, opt).map_err(|e| LegacyError::Parse {
        line: e.line,
        col: e.col,
        msg: e.msg.to_string(),
    })?;
    let mut out: Vec<Section> = Vec::new();
    for (section, props) in parsed.iter() {
        let name = section.unwrap_or("").to_string();
        let idx = match out.iter().position(|(n, _)| *n == name) {
            Some(i) => i,
            None => {
                out.push((name.clone(), Vec::new()));
                out.len() - 1
            }
        };
        for (k, v) in props.iter() {
            let key = k.trim().to_ascii_lowercase();
            if out[idx].1.iter().any(|(seen, _)| *seen == key) {
                return Err(LegacyError::Twice { section: name, key });
            }
            out[idx].1.push((key, strip_inline_comment(v).to_string()));
        }
    }
    Ok(out)
}

fn strip_inline_comment(v: &str) -> &str {
    let b = v.as_bytes();
    for i in 1..b.len() {
        if b[i] == b';' && b[i - 1].is_ascii_whitespace() {
            return v[..i].trim_end();
        }
    }
    v.trim()
}

/// Does this text (which is not TOML) look like the original INI form? It parses as INI and has
/// a `[worker]` or `[boss]` section with keys.
pub fn looks_like_ini(text: &str) -> bool {
    parse(text).is_ok_and(|sections| {
        sections
            .iter()
            .any(|(n, keys)| (n == "worker" || n == "boss") && !keys.is_empty())
    })
}

fn bool_of(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "yes" | "true" | "on" => Some(true),
        "0" | "no" | "false" | "off" => Some(false),
        _ => None,
    }
}

/// mic_opts as build-image reads the colon string (empty parts dropped); a value with commas
/// and no colon is the older comma-separated form.
fn opt_list(v: &str) -> (Vec<String>, bool) {
    let comma = !v.contains(':') && v.contains(',');
    let sep = if comma { ',' } else { ':' };
    let list = v
        .split(sep)
        .map(|p| if comma { p.trim() } else { p })
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    (list, comma)
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// What may stand in a userinfo or path part of the AMQP URL as it is.
const URL_PART: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b':')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'@')
    .add(b'[')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// The AMQP URL of a `[boss]` section (the original connected on the default port, 5672).
pub fn amqp_url(host: &str, user: &str, pwd: &str, vhost: &str) -> String {
    let enc = |s: &str| utf8_percent_encode(s, URL_PART).to_string();
    let auth = match (user.is_empty(), pwd.is_empty()) {
        (true, _) => String::new(),
        (false, true) => format!("{}@", enc(user)),
        (false, false) => format!("{}:{}@", enc(user), enc(pwd)),
    };
    format!("amqp://{auth}{host}:5672/{}", enc(vhost))
}

/// The TOML for an original `build_image.conf`. `origin` names it in the output's header;
/// `amqp`: this build has an `[amqp]` section (else `[boss]` becomes a commented one).
pub fn import(text: &str, origin: &str, amqp: bool) -> Result<Imported, LegacyError> {
    let sections = parse(text)?;
    let mut unknown = Vec::new();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# build-image configuration, converted by `build-image config import` from the original\n\
         # IMG file {origin}\n\
         # The comment above each key names the INI key it came from; keys not given keep\n\
         # build-image's defaults (README.md, \"Configuration\")."
    );
    let empty = Vec::new();
    let keys_of = |name: &str| {
        sections
            .iter()
            .find(|(n, _)| n == name)
            .map_or(&empty, |(_, k)| k)
    };
    let value_err = |section: &str, key: &str, value: &str, why: &str| LegacyError::Value {
        section: section.into(),
        key: key.into(),
        value: value.into(),
        why: why.into(),
    };

    let worker = keys_of("worker");
    if !worker.is_empty() {
        out.push_str("\n[worker]\n");
    }
    for (key, raw) in worker {
        let Some((_, kind)) = WORKER_KEYS.iter().find(|(k, _)| k == key) else {
            unknown.push(format!("[worker] {key}"));
            let _ = writeln!(
                out,
                "# [worker] {key} = {raw}: not a key build-image knows; left out"
            );
            continue;
        };
        if raw.contains("%(") {
            return Err(value_err(
                "worker",
                key,
                raw,
                "ConfigParser would interpolate %(name)s here; write the value out in full",
            ));
        }
        let (value, note) = match kind {
            Kind::Text => (toml_str(raw), String::new()),
            Kind::Ict => match raw.as_str() {
                "mic" | "mic2" => (toml_str(raw), String::new()),
                _ => return Err(value_err("worker", key, raw, "ict is mic or mic2")),
            },
            Kind::Bool => match bool_of(raw) {
                Some(b) => (b.to_string(), format!(" (INI boolean {raw:?})")),
                None => {
                    return Err(value_err(
                        "worker",
                        key,
                        raw,
                        "not a boolean (yes/no, true/false, on/off, 1/0)",
                    ));
                }
            },
            Kind::Seconds | Kind::Count => match raw.parse::<u64>() {
                Ok(n) if *kind == Kind::Seconds => (n.to_string(), " (whole seconds)".into()),
                Ok(n) => (n.to_string(), String::new()),
                Err(_) => {
                    return Err(value_err(
                        "worker",
                        key,
                        raw,
                        if *kind == Kind::Seconds {
                            "not a whole number of seconds"
                        } else {
                            "not a whole number"
                        },
                    ));
                }
            },
            Kind::OptList => {
                let (list, comma) = opt_list(raw);
                let items: Vec<String> = list.iter().map(|s| toml_str(s)).collect();
                let how = if comma {
                    " (the older comma-separated form, split on commas)"
                } else {
                    " (colon-separated, split on colons)"
                };
                (format!("[{}]", items.join(", ")), how.to_string())
            }
        };
        let _ = writeln!(out, "# from [worker] {key} = {raw}{note}");
        let _ = writeln!(out, "{key} = {value}");
    }

    let boss = keys_of("boss");
    if !boss.is_empty() {
        let get = |k: &str| {
            boss.iter()
                .find(|(key, _)| key == k)
                .map_or("", |(_, v)| v.as_str())
        };
        for (key, _) in boss {
            if !BOSS_KEYS.contains(&key.as_str()) {
                unknown.push(format!("[boss] {key}"));
            }
        }
        let c = if amqp { "" } else { "# " };
        if amqp {
            let _ = writeln!(
                out,
                "\n# from [boss] amqp_host, amqp_user, amqp_pwd, amqp_vhost: the BOSS broker; \
                 build-image consumes\n# workitems from the queue named after the participant, \
                 as the original did."
            );
        } else {
            let _ = writeln!(
                out,
                "\n# from [boss] amqp_host, amqp_user, amqp_pwd, amqp_vhost: the BOSS broker. \
                 This build of\n# build-image has no [amqp] section: workitems come through \
                 the spool only."
            );
        }
        let _ = writeln!(out, "{c}[amqp]");
        let _ = writeln!(
            out,
            "{c}url = {}",
            toml_str(&amqp_url(
                get("amqp_host"),
                get("amqp_user"),
                get("amqp_pwd"),
                get("amqp_vhost")
            ))
        );
        let _ = writeln!(out, "{c}queue = \"build_image\"");
        for (key, raw) in boss {
            if !BOSS_KEYS.contains(&key.as_str()) {
                let _ = writeln!(
                    out,
                    "# [boss] {key} = {raw}: not a key build-image knows; left out"
                );
            }
        }
    }

    let known: HashSet<&str> = ["worker", "boss"].into();
    for (name, keys) in &sections {
        if known.contains(name.as_str()) {
            continue;
        }
        let label = if name.is_empty() {
            "(before any section)".to_string()
        } else {
            format!("[{name}]")
        };
        if keys.is_empty() && !name.is_empty() {
            unknown.push(format!("{label} (an empty section)"));
        }
        for (key, raw) in keys {
            unknown.push(format!("{label} {key}"));
            let _ = writeln!(
                out,
                "# {label} {key} = {raw}: not a section build-image knows; left out"
            );
        }
    }
    Ok(Imported { toml: out, unknown })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    #[test]
    fn every_kind_of_value() {
        let ini = "; comment\n[worker]\nUse_KVM = YES\nuse_9p_cache = 0\nsudo = off\n\
                   timeout = 600 ; ten minutes\nmic_opts = --save-kernel, --use_comps\n\
                   base_dir: /srv/img\nict = mic2\nvm_wait = 5\nworkers = 3\n";
        let out = import(ini, "x.conf", false).unwrap();
        assert!(out.unknown.is_empty(), "{:?}", out.unknown);
        let cfg = Config::parse(&out.toml, Path::new("x.toml")).unwrap();
        let w = &cfg.worker;
        assert!(w.use_kvm);
        assert!(!w.use_9p_cache);
        assert!(!w.sudo);
        assert_eq!(w.timeout, 600);
        assert_eq!(w.mic_opts, vec!["--save-kernel", "--use_comps"]);
        assert_eq!(w.base_dir, Path::new("/srv/img"));
        assert_eq!(w.ict, crate::config::Ict::Mic2);
        assert_eq!((w.vm_wait, w.workers), (5, 3));
        assert!(
            out.toml
                .contains("# from [worker] use_kvm = YES (INI boolean \"YES\")")
        );
        assert!(out.toml.contains("older comma-separated form"));
    }

    #[test]
    fn colon_options_keep_what_build_image_reads() {
        let out = import("[worker]\nmic_opts = --a=b::--c\n", "x", false).unwrap();
        let cfg = Config::parse(&out.toml, Path::new("x")).unwrap();
        let direct =
            Config::parse("[worker]\nmic_opts = \"--a=b::--c\"\n", Path::new("y")).unwrap();
        assert_eq!(cfg.worker.mic_opts, direct.worker.mic_opts);
        assert_eq!(cfg.worker.mic_opts, vec!["--a=b", "--c"]);
    }

    #[test]
    fn unknown_keys_and_sections_are_reported() {
        let ini = "top = 1\n[worker]\nbase_dirr = /x\n[boss]\namqp_host = h\namqp_port = 1\n[extra]\nk = v\n[empty]\n";
        let out = import(ini, "x", false).unwrap();
        assert_eq!(
            out.unknown,
            vec![
                "[worker] base_dirr",
                "[boss] amqp_port",
                "(before any section) top",
                "[extra] k",
                "[empty] (an empty section)"
            ]
        );
        assert!(out.toml.contains("# [worker] base_dirr = /x: not a key"));
        assert!(out.toml.contains("# [extra] k = v: not a section"));
        Config::parse(&out.toml, Path::new("x")).unwrap();
    }

    #[test]
    fn bad_values_and_duplicates_are_errors() {
        for (ini, want) in [
            ("[worker]\nuse_kvm = maybe\n", "not a boolean"),
            ("[worker]\ntimeout = 1h\n", "whole number of seconds"),
            ("[worker]\ntimeout = -5\n", "whole number of seconds"),
            ("[worker]\nict = mic3\n", "mic or mic2"),
            ("[worker]\ntimeout = 1\nTimeout = 2\n", "given twice"),
            ("[worker\n", "not an INI file"),
            ("[worker]\nimg_tmp = %(base_dir)s/tmp\n", "interpolate"),
        ] {
            let e = import(ini, "x", false).unwrap_err().to_string();
            assert!(e.contains(want), "{ini:?}: {e}");
        }
    }

    #[test]
    fn boss_becomes_amqp() {
        let ini = "[boss]\namqp_host = h\namqp_user = u\namqp_pwd = p\namqp_vhost = v\n";
        let live = import(ini, "x", true).unwrap().toml;
        assert!(
            live.contains("\n[amqp]\nurl = \"amqp://u:p@h:5672/v\"\nqueue = \"build_image\"\n")
        );
        let off = import(ini, "x", false).unwrap().toml;
        assert!(off.contains("\n# [amqp]\n# url = \"amqp://u:p@h:5672/v\"\n"));
        Config::parse(&off, Path::new("x")).unwrap();
    }

    #[test]
    fn amqp_urls_are_encoded() {
        assert_eq!(
            amqp_url("boss.example.org", "boss", "p@ss:w/rd", "/"),
            "amqp://boss:p%40ss%3Aw%2Frd@boss.example.org:5672/%2F"
        );
        assert_eq!(amqp_url("h", "", "", "v"), "amqp://h:5672/v");
    }

    #[test]
    fn ini_is_recognised() {
        assert!(looks_like_ini("[worker]\nbase_dir = /x\n"));
        assert!(looks_like_ini("; c\n[boss]\namqp_host: h\n"));
        assert!(!looks_like_ini("[spool]\ndir = x\n"));
        assert!(!looks_like_ini("worker = \n"));
    }
}
