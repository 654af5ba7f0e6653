//! An export says it is whole (issue 23, defect 5): `events --json` ends with a trailer (the
//! number of event lines and the sha256 of their bytes), and `import` refuses an export that
//! is cut short (at a line boundary or not), empty, or changed, leaving the state dir empty;
//! `--partial` takes what there is and says so. Through the binary, on a log written by a
//! daemon run in-process with real builds (the mic fixture).

mod common;

use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// A farm whose log holds a few settled jobs; its export.
fn exported() -> (Farm, String) {
    let farm = Farm::new();
    let d = farm.start();
    for id in ["ex-a", "ex-b", "ex-c"] {
        farm.drop_json(&format!("{id}.json"), &workitem(id, "ks\n"));
    }
    for id in ["ex-a", "ex-b", "ex-c"] {
        farm.wait_outbox(&format!("{id}.json"), T);
    }
    farm.wait_pushed_events(6);
    d.stop().unwrap();
    let (code, text, err) = output(farm.bin().args(["events", "--json"]));
    assert_eq!(code, 0, "{err}");
    (farm, text)
}

/// Imports `bytes` into the empty state dir of a new farm: (exit code, stdout, stderr, farm).
fn import(bytes: &[u8], args: &[&str]) -> (i32, String, String, Farm) {
    let other = Farm::new();
    let file = other.root().join("export.jsonl");
    std::fs::write(&file, bytes).unwrap();
    let (code, out, err) = output(other.bin().arg("import").args(args).arg(&file));
    (code, out, err, other)
}

fn state_is_empty(farm: &Farm) -> bool {
    let state = farm.cfg.state_dir();
    !state.exists() || list(&state).is_empty()
}

#[test]
fn an_export_that_is_not_whole_is_refused_and_partial_says_so() {
    init_log();
    let (_farm, text) = exported();
    let raw: Vec<&str> = text.lines().collect();
    assert!(raw.len() > 10, "{text}");

    // cut at a line boundary (the trailer and the last events gone): refused, nothing written
    let cut = raw[..raw.len() - 4].join("\n") + "\n";
    let (code, out, err, other) = import(cut.as_bytes(), &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("not whole") && err.contains("no trailer"),
        "{err}"
    );
    assert!(err.contains("--partial"), "says the way out: {err}");
    assert!(state_is_empty(&other), "{:?}", list(&other.cfg.state_dir()));

    // an empty file: refused
    let (code, _, err, other) = import(b"", &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no trailer"), "{err}");
    assert!(state_is_empty(&other));

    let lines = export_lines(&text); // ends with a trailer that counts and digests the lines
    assert_eq!(lines.len(), raw.len() - 1);

    // whole: imported, and exported again the same
    let (code, out, err, other) = import(text.as_bytes(), &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("imported {} event(s)", lines.len())),
        "{out}"
    );
    assert!(!err.contains("WARNING"), "{err}");
    let (_, again, _) = output(other.bin().args(["events", "--json"]));
    assert_eq!(again, text);

    // cut inside a line (10 bytes into one), the trailer lost with it: refused
    let at = text[..text.len() / 2].rfind('\n').unwrap() + 11;
    let mid = &text.as_bytes()[..at];
    let (code, _, err, other) = import(mid, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cut short"), "{err}");
    assert!(state_is_empty(&other));

    // a line lost in the middle, the trailer kept: refused
    let mut lost = lines.clone();
    lost.remove(lines.len() / 2);
    let mut lost = lost.join("\n") + "\n";
    lost.push_str(text.lines().last().unwrap());
    lost.push('\n');
    let (code, _, err, other) = import(lost.as_bytes(), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("trailer says"), "{err}");
    assert!(state_is_empty(&other));

    // two exports joined: refused
    let (code, _, err, _) = import(format!("{text}{text}").as_bytes(), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("follows the trailer"), "{err}");

    // --partial: what there is, said loudly
    let (code, out, err, other) = import(cut.as_bytes(), &["--partial"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("WARNING") && err.contains("no trailer"),
        "{err}"
    );
    assert!(out.contains("PARTIAL"), "{out}");
    assert!(
        out.contains(&format!("imported {} event(s)", lines.len() - 3)),
        "{out}"
    );
    let (_, back, _) = output(other.bin().args(["events", "--json"]));
    assert_eq!(export_lines(&back), lines[..lines.len() - 3]);
    let (code, out, err, other) = import(mid, &["--partial"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("cut short"), "{err}");
    let (_, back, _) = output(other.bin().args(["events", "--json"]));
    let whole_lines = text[..at].lines().count() - 1;
    assert_eq!(export_lines(&back), lines[..whole_lines]);
    // a whole export with --partial: nothing to say
    let (code, _, err, _) = import(text.as_bytes(), &["--partial"]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("WARNING"), "{err}");
}

#[test]
fn every_ended_json_listing_has_its_trailer_and_an_archive_too() {
    init_log();
    let (farm, _) = exported();
    // a filtered listing: its own lines counted
    let (code, text, _) = output(farm.bin().args(["events", "--json", "--kind", "finished"]));
    assert_eq!(code, 0);
    assert_eq!(export_lines(&text).len(), 3);
    // with no event at all: the trailer alone, and it imports as an empty log
    let (code, text, _) = output(farm.bin().args(["events", "--json", "--since", "100000"]));
    assert_eq!(code, 0);
    assert!(export_lines(&text).is_empty());
    let (code, out, err, _) = import(text.as_bytes(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("imported 0 event(s)"), "{out}");
    // text output has none
    let (_, text, _) = output(farm.bin().args(["events"]));
    assert!(!text.lines().any(is_trailer), "{text}");
    // a compaction's archive ends with its trailer, and imports whole
    for id in ["ex-a", "ex-b", "ex-c"] {
        std::fs::remove_dir_all(farm.base().join("requests").join(id)).unwrap();
    }
    let archive = farm.root().join("archive.jsonl");
    let (code, out, err) = output(farm.bin().args([
        "compact",
        "--before",
        "0s",
        "--archive",
        archive.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{out}{err}");
    let archived = std::fs::read_to_string(&archive).unwrap();
    assert!(export_lines(&archived).len() > 10);
    let (code, _, err, _) = import(archived.as_bytes(), &[]);
    assert_eq!(code, 0, "{err}");
}
