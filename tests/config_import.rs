//! `config import OLD.conf` and `--config OLD.conf` through the binary, on the shipped example
//! of an original IMG build_image.conf; the INI reading compared, value by value, with Python's
//! own configparser on the same files (fixtures, and generated ones).

mod common;

use build_image::config::{Config, Ict};
use common::*;
use std::path::{Path, PathBuf};

fn example() -> PathBuf {
    shared().join("legacy/build_image.conf")
}

/// The `[worker]` keys of the INI file, read by the simplest reading there is.
fn ini_worker_keys(text: &str) -> Vec<(String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
        } else if section == "worker" {
            let (k, v) = line.split_once('=').unwrap();
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

#[test]
fn the_shipped_example_converts_and_keeps_every_keys_meaning() {
    let (code, toml, err) = output(bin().args(["config", "import"]).arg(example()));
    assert_eq!(code, 0, "{err}");
    let cfg = Config::parse(&toml, Path::new("converted.toml")).expect("the output loads");
    let w = &cfg.worker;
    let text = std::fs::read_to_string(example()).unwrap();
    let keys = ini_worker_keys(&text);
    assert!(keys.len() >= 14, "{keys:?}");
    let yes_no = |v: &str| match v {
        "yes" => true,
        "no" => false,
        other => panic!("not yes/no: {other}"),
    };
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    for (k, v) in &keys {
        match k.as_str() {
            "base_dir" => assert_eq!(w.base_dir, Path::new(v)),
            "base_url" => assert_eq!(&w.base_url, v),
            "use_kvm" => assert_eq!(w.use_kvm, yes_no(v)),
            "ict" => assert_eq!(w.ict, if v == "mic2" { Ict::Mic2 } else { Ict::Mic }),
            "mic_opts" => {
                assert_eq!(w.mic_opts, v.split(':').collect::<Vec<_>>());
                assert_eq!(w.mic_opts, ["--pack-to=@NAME@.tar.bz2", "--copy-kernel"]);
            }
            "fs_pack" => assert_eq!(&w.fs_pack, v),
            "timeout" => assert_eq!(w.timeout, v.parse::<u64>().unwrap()),
            "img_tmp" => assert_eq!(w.img_tmp, Path::new(v)),
            "vm_kernel" => assert_eq!(path(&w.vm_kernel).as_ref(), Some(v)),
            "vm_ssh_key" => assert_eq!(path(&w.vm_ssh_key).as_ref(), Some(v)),
            "vm_base_img" => assert_eq!(path(&w.vm_base_img).as_ref(), Some(v)),
            "use_9p_cache" => assert_eq!(w.use_9p_cache, yes_no(v)),
            "mic_cachedir" => assert_eq!(w.mic_cachedir, Path::new(v)),
            "vm_wait" => assert_eq!(w.vm_wait, v.parse::<u64>().unwrap()),
            other => panic!("the example has a key this test does not compare: {other}"),
        }
        // and the comment says where it came from
        assert!(
            toml.contains(&format!("# from [worker] {k} = {v}")),
            "{k}: {toml}"
        );
    }
    // yes/no are booleans, not strings that happen to load
    assert!(toml.contains("\nuse_kvm = false\n") && toml.contains("\nuse_9p_cache = true\n"));
    // [boss] is the broker's URL
    assert!(
        toml.contains("url = \"amqp://boss:boss@boss.example.org:5672/boss\""),
        "{toml}"
    );
}

#[test]
fn unknown_keys_are_reported_and_bad_values_refused() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("old.conf");
    std::fs::write(
        &f,
        "[worker]\nbase_dir = /srv\nfrobnicate = yes\n[web]\nport = 80\n",
    )
    .unwrap();
    let (code, toml, err) = output(bin().args(["config", "import"]).arg(&f));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("[worker] frobnicate, [web] port"), "{err}");
    assert!(toml.contains("# [worker] frobnicate = yes: not a key build-image knows"));
    assert!(toml.contains("# [web] port = 80: not a section build-image knows"));
    Config::parse(&toml, Path::new("x")).unwrap();

    for (ini, want) in [
        ("[worker]\nuse_kvm = perhaps\n", "not a boolean"),
        ("[worker]\nvm_wait = 20s\n", "not a whole number of seconds"),
        ("[worker]\ntimeout = 0\n", "out of range"),
        ("not ini at all", "not an INI file"),
    ] {
        std::fs::write(&f, ini).unwrap();
        let (code, out, err) = output(bin().args(["config", "import"]).arg(&f));
        assert_eq!(code, 2, "{ini:?}: {err}");
        assert!(err.contains(want), "{ini:?}: {err}");
        assert!(out.is_empty(), "{out}");
    }
    let (code, _, err) = output(bin().args(["config", "import"]).arg(d.path().join("none")));
    assert_eq!(code, 2);
    assert!(err.contains("cannot read"), "{err}");
    let (code, _, err) = output(bin().args(["config", "import", "/dev/zero"]));
    assert_eq!(code, 2);
    assert!(err.contains("larger than"), "{err}");
}

#[test]
fn an_ini_file_given_to_config_names_config_import() {
    for cmd in [&["status"][..], &["run", "--once"][..]] {
        let (code, _, err) = output(bin().arg("--config").arg(example()).args(cmd));
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("looks like the original IMG build_image.conf (INI)"),
            "{err}"
        );
        assert!(
            err.contains(&format!(
                "build-image config import {}",
                example().display()
            )),
            "{err}"
        );
    }
    // through the environment too
    let (code, _, err) = output(bin().env("BUILD_IMAGE_CONFIG", example()).arg("status"));
    assert_eq!(code, 2);
    assert!(err.contains("config import"), "{err}");
    let d = tempfile::tempdir().unwrap();
    // a TOML file with an unknown key is not called INI either: the key is named
    let f = d.path().join("k.toml");
    std::fs::write(&f, "[worker]\nbase_dirr = \"/x\"\n").unwrap();
    let (code, _, err) = output(bin().arg("--config").arg(&f).arg("status"));
    assert_eq!(code, 2);
    assert!(err.contains("base_dirr") && !err.contains("INI"), "{err}");
    // a TOML file with a mistake is not called INI
    let f = d.path().join("c.toml");
    std::fs::write(&f, "[spool]\ndir = \"x\"\nmin_age_ms = = 3\n").unwrap();
    let (code, _, err) = output(bin().arg("--config").arg(&f).arg("status"));
    assert_eq!(code, 2);
    assert!(!err.contains("INI"), "{err}");
}

/// Python's configparser, set as `legacy::ini` says (`RawConfigParser(inline_comment_prefixes=
/// (';',))`, the file opened with `utf-8-sig`), on each file: one JSON line each, its sections
/// with their keys and values as Python shows them and its `[DEFAULT]` keys, or the name of the
/// error it raised.
const PYTHON_READS: &str = r#"
import configparser, json, sys
for path in sys.argv[1:]:
    p = configparser.RawConfigParser(inline_comment_prefixes=(';',))
    try:
        with open(path, encoding='utf-8-sig') as f:
            p.read_file(f)
        print(json.dumps({"sections": [[s, [[k, v] for k, v in p[s].items()]] for s in p.sections()],
                          "defaults": [[k, v] for k, v in p.defaults().items()]}))
    except configparser.Error as e:
        print(json.dumps({"error": type(e).__name__}))
"#;

fn python_reads(files: &[PathBuf]) -> Vec<serde_json::Value> {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(PYTHON_READS)
        .args(files)
        .output()
        .expect("python3 runs (.ci/run installs it): the INI reading is checked against it");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), files.len());
    lines
}

/// What `legacy::ini` reads, in the form of [`PYTHON_READS`] (an error only as "error").
fn rust_reads(file: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(file).unwrap();
    match build_image::legacy::ini::parse(&text) {
        Ok(ini) => serde_json::json!({"sections": ini.sections, "defaults": ini.defaults}),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    }
}

fn compare_with_python(files: &[PathBuf]) {
    for (file, py) in files.iter().zip(python_reads(files)) {
        let ours = rust_reads(file);
        let text = std::fs::read_to_string(file).unwrap();
        if py.get("error").is_some() {
            assert!(
                ours.get("error").is_some(),
                "{}: Python refuses it ({}), build-image reads {ours}\n{text:?}",
                file.display(),
                py["error"]
            );
        } else {
            assert_eq!(ours, py, "{}:\n{text:?}", file.display());
        }
    }
}

#[test]
fn the_ini_is_read_as_pythons_configparser_reads_it() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures().join("ini"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "{files:?}");
    files.push(example());
    compare_with_python(&files);
}

#[test]
fn generated_ini_files_read_as_python_reads_them() {
    // Lines put together from the pieces where readers differ: indentation (spaces, tabs,
    // Unicode spaces), comment characters, delimiters, headers, line ends; most lines are keys,
    // so that most files are read rather than refused.
    const KEYS: &[&str] = &["key", "Mic_Opts", "timeout", "a b", "é", "k;x", "k#"];
    const DELIMS: &[&str] = &[" = ", "=", ":", " : ", "\t=\t", " =", ": "];
    const PIECES: &[&str] = &[
        "--a", "--b:--c", "value", ";", " ;", "\t;", "#", " # ", "=", ":", "%(x)s", "é",
        "\u{3000}", "\u{1c}", "\"\"", " ", "[", "]", "[worker]",
    ];
    const OTHER: &[&str] = &[
        "[worker]",
        "[boss]",
        "[DEFAULT]",
        "[x]y] z",
        "; comment",
        "# comment",
        "",
        "[]",
        "words only",
    ];
    const INDENTS: &[&str] = &["", "", "", " ", "  ", "\t", "\u{3000}", "\u{1f}"];
    const ENDS: &[&str] = &["\n", "\n", "\n", "\r\n", "\r", "\n\n"];
    let d = tempfile::tempdir().unwrap();
    let mut seed: u64 = 0x5eed_1234_abcd_0042;
    let mut next = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut files = Vec::new();
    for i in 0..1000 {
        let mut text = String::new();
        if next(10) == 0 {
            text.push('\u{feff}');
        }
        if next(10) != 0 {
            text.push_str("[worker]\n");
        }
        for _ in 0..1 + next(8) {
            text.push_str(INDENTS[next(INDENTS.len())]);
            if next(10) < 7 {
                text.push_str(KEYS[next(KEYS.len())]);
                text.push_str(DELIMS[next(DELIMS.len())]);
                for _ in 0..next(4) {
                    text.push_str(PIECES[next(PIECES.len())]);
                }
            } else if next(20) == 0 {
                text.push_str(KEYS[next(KEYS.len())]); // a key again: refused
            } else {
                text.push_str(OTHER[next(OTHER.len())]);
            }
            text.push_str(ENDS[next(ENDS.len())]);
        }
        let f = d.path().join(format!("g{i:03}.conf"));
        std::fs::write(&f, &text).unwrap();
        files.push(f);
    }
    compare_with_python(&files);
    // enough of them are read, not refused, for the comparison to mean something
    let read = files
        .iter()
        .filter(|f| rust_reads(f).get("error").is_none())
        .count();
    assert!(
        read >= 400,
        "only {read} of {} generated files read",
        files.len()
    );
}

/// The three ways the old reading went wrong (continuation lines, a comment-looking value before
/// one, a byte-order mark), through the binary.
#[test]
fn continuation_lines_comments_and_a_bom_convert_as_python_reads_them() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("old.conf");
    let import = |text: &str| {
        std::fs::write(&f, text).unwrap();
        output(bin().args(["config", "import"]).arg(&f))
    };
    // an option continued on an indented line is not lost
    let (code, toml, err) = import("[worker]\nmic_opts = --a\n  --b\n");
    assert_eq!(code, 0, "{err}");
    let cfg = Config::parse(&toml, Path::new("x")).unwrap();
    assert_eq!(cfg.worker.mic_opts, ["--a", "--b"], "{toml}");

    // a value ending in `#` continued on the next line: one value of two lines (as Python reads
    // it); a path of two lines is refused, never turned into a live key
    let (code, toml, err) = import("[worker]\nmic_path = '/tmp/evil' #\n  foo\n");
    assert_eq!(code, 2, "{toml}\n{err}");
    assert!(toml.is_empty(), "{toml}");
    assert!(
        err.contains("mic_path") && err.contains("several lines"),
        "{err}"
    );
    // in a key build-image does not know, the continuation stays in its comment
    let (code, toml, err) = import("[worker]\nfrob = x #\n  mic_path = /tmp/evil\n");
    assert_eq!(code, 1, "{err}");
    let cfg = Config::parse(&toml, Path::new("x")).unwrap();
    assert_eq!(cfg.worker.mic_path, None, "{toml}");
    assert!(
        toml.contains("# [worker] frob = x #\\nmic_path = /tmp/evil: not a key"),
        "{toml}"
    );

    // a byte-order mark (a file saved by some editors) reads as the file without it
    let plain = std::fs::read_to_string(example()).unwrap();
    let (code, with_bom, err) = import(&format!("\u{feff}{plain}"));
    assert_eq!(code, 0, "{err}");
    let (code, without, err) = import(&plain);
    assert_eq!(code, 0, "{err}");
    assert_eq!(with_bom, without);
    Config::parse(&with_bom, Path::new("x")).unwrap();
}
