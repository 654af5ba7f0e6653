//! `config import OLD.conf` and `--config OLD.conf` through the binary, on the shipped example
//! of an original IMG build_image.conf.

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
