//! The original IMG `build_image.conf` (INI, read by Python's ConfigParser): `config import`
//! turns it into this program's TOML, and `--config` given one says so instead of a bare TOML
//! parse error. The INI text is read by [`ini`], exactly as Python reads it.
//!
//! Invariant: every key of the file is accounted for: mapped (with a comment naming the INI key
//! it came from), or reported as unknown (on stderr and as a comment in the output), never
//! dropped in silence. The TOML is built by a pure function of the INI text, and nothing of the
//! INI text reaches it unescaped: values are TOML basic strings, and every comment quotes its
//! text with control characters written out (a value's line break can never start a live line).

pub mod ini;

use crate::domain::text::escape;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use std::collections::HashSet;
use std::fmt::Write as _;

#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    #[error("not an INI file ConfigParser reads: {0}")]
    Ini(#[from] ini::IniError),
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

use ini::Section;

/// The sections of the file as Python reads them (see [`ini`]); `[DEFAULT]`'s keys are in every
/// section, and stand as a section of their own only when there is no other.
fn parse(text: &str) -> Result<Vec<Section>, LegacyError> {
    let parsed = ini::parse(text)?;
    let mut sections = parsed.sections;
    if sections.is_empty() && !parsed.defaults.is_empty() {
        sections.push(("DEFAULT".to_string(), parsed.defaults));
    }
    Ok(sections)
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
/// and no colon is the older comma-separated form. A value continued on indented lines holds
/// options on each line: a line ends an option too.
fn opt_list(v: &str) -> (Vec<String>, bool) {
    let comma = !v.contains(':') && v.contains(',');
    let sep = if comma { ',' } else { ':' };
    let list = v
        .split(['\n', sep])
        .map(|p| if comma { p.trim() } else { p })
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    (list, comma)
}

/// A TOML basic string: `"` and `\` escaped, and every character a terminal would act on written
/// as its TOML escape (`\n`, `\t`, `\uXXXX`), so that the printed configuration is safe to show.
fn toml_str(s: &str) -> String {
    let quoted = s.replace('\\', "\\\\").replace('"', "\\\"");
    format!("\"{}\"", escape(&quoted))
}

/// A text of the INI file quoted in a TOML comment: on one line, nothing a terminal acts on.
fn shown(s: &str) -> String {
    escape(s).into_owned()
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
    let origin = shown(origin);
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
            unknown.push(format!("[worker] {}", shown(key)));
            let _ = writeln!(
                out,
                "# [worker] {} = {}: not a key build-image knows; left out",
                shown(key),
                shown(raw)
            );
            continue;
        };
        if raw.contains('\n') && *kind != Kind::OptList {
            return Err(value_err(
                "worker",
                key,
                raw,
                "a value of several lines (indented lines continue the value above them); \
                 this key takes one line",
            ));
        }
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
                Some(b) => (b.to_string(), format!(" (INI boolean \"{}\")", shown(raw))),
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
                let how = match (comma, raw.contains('\n')) {
                    (true, false) => " (the older comma-separated form, split on commas)",
                    (true, true) => {
                        " (the older comma-separated form, split on commas and line ends)"
                    }
                    (false, false) => " (colon-separated, split on colons)",
                    (false, true) => " (colon-separated, split on colons and line ends)",
                };
                (format!("[{}]", items.join(", ")), how.to_string())
            }
        };
        let _ = writeln!(out, "# from [worker] {key} = {}{note}", shown(raw));
        let _ = writeln!(out, "{key} = {value}");
    }

    let boss = keys_of("boss");
    if !boss.is_empty() {
        let get = |k: &str| {
            boss.iter()
                .find(|(key, _)| key == k)
                .map_or("", |(_, v)| v.as_str())
        };
        for (key, raw) in boss {
            if !BOSS_KEYS.contains(&key.as_str()) {
                unknown.push(format!("[boss] {}", shown(key)));
            } else if raw.contains('\n') {
                return Err(value_err(
                    "boss",
                    key,
                    raw,
                    "a value of several lines (indented lines continue the value above them); \
                     this key takes one line",
                ));
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
                    "# [boss] {} = {}: not a key build-image knows; left out",
                    shown(key),
                    shown(raw)
                );
            }
        }
    }

    let known: HashSet<&str> = ["worker", "boss"].into();
    for (name, keys) in &sections {
        if known.contains(name.as_str()) {
            continue;
        }
        let label = format!("[{}]", shown(name));
        if keys.is_empty() {
            unknown.push(format!("{label} (an empty section)"));
        }
        for (key, raw) in keys {
            unknown.push(format!("{label} {}", shown(key)));
            let _ = writeln!(
                out,
                "# {label} {} = {}: not a section build-image knows; left out",
                shown(key),
                shown(raw)
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
        let ini = "[worker]\nbase_dirr = /x\n[boss]\namqp_host = h\namqp_port = 1\n[extra]\nk = v\n[empty]\n";
        let out = import(ini, "x", false).unwrap();
        assert_eq!(
            out.unknown,
            vec![
                "[worker] base_dirr",
                "[boss] amqp_port",
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
            ("top = 1\n[worker]\n", "before any [section]"),
            ("[worker]\nbase_dir = /a\n  /b\n", "several lines"),
            ("[boss]\namqp_host = h\n  evil\n", "several lines"),
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

    #[test]
    fn nothing_of_the_ini_reaches_the_toml_unescaped() {
        // a continuation after a comment-looking value stays in the value, and in comments it
        // is written out: no live line comes from the INI text
        let ini = "[worker]\nmic_opts = --a ; the first\n  --b:--c\nbase_url = x \u{1b}[31m\u{202e}\n\
                   odd\u{7}key = '/tmp/evil' #\n  foo = 1\n[boss]\nx = y\n  [amqp]\n";
        let out = import(ini, "x\u{1b}.conf", false).unwrap();
        let cfg = Config::parse(&out.toml, Path::new("x")).unwrap();
        assert_eq!(cfg.worker.mic_opts, ["--a", "--b", "--c"]);
        assert_eq!(cfg.worker.base_url, "x \u{1b}[31m\u{202e}");
        assert!(
            !out.toml
                .chars()
                .any(|c| c != '\n' && crate::domain::text::is_unsafe(c)),
            "{}",
            out.toml
        );
        let live: Vec<&str> = out
            .toml
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .collect();
        assert_eq!(
            live,
            [
                "[worker]",
                "mic_opts = [\"--a\", \"--b\", \"--c\"]",
                "base_url = \"x \\u001b[31m\\u202e\""
            ],
            "{}",
            out.toml
        );
        assert_eq!(out.unknown, ["[worker] odd\\u0007key", "[boss] x"]);
    }

    #[test]
    fn toml_strings_read_back_as_the_value() {
        for v in [
            "plain",
            "a\"b\\c",
            "x\u{7f}\u{85}\u{9b}\u{202e}\u{2028}\ty",
            "'single'",
            "é ユ",
        ] {
            let t = format!("v = {}\n", toml_str(v));
            let back: toml::Value = toml::from_str(&t).unwrap();
            assert_eq!(back["v"].as_str(), Some(v), "{t}");
        }
    }
}
