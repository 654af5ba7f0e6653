//! Retention and the disk budget, end to end: real builds (the mic fixture) into a real
//! base_dir, `gc --dry-run` / `gc` / `pin` / `unpin` run as the binary, back-dated events
//! through `events --json` and `import`, and a tmpfs base_dir filled past `min_free_mb` while the
//! daemon runs.

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// A workitem whose image (`bytes` long) is named `name`.
fn named(id: &str, name: &str, bytes: u64) -> Value {
    let mut w = workitem(id, &format!("# mic-fixture: bytes {bytes}\n"));
    w["image"]["name"] = json!(name);
    w
}

fn job_dir(farm: &Farm, id: &str) -> PathBuf {
    farm.base().join("requests").join(id)
}

/// The files a job folder's SHA256SUMS lists (read here without the daemon's parser).
fn listed(farm: &Farm, id: &str) -> Vec<PathBuf> {
    let dir = job_dir(farm, id);
    let text = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    let files: Vec<PathBuf> = text
        .lines()
        .map(|l| dir.join(l.split_once("  ").unwrap().1))
        .collect();
    assert!(!files.is_empty(), "{text}");
    files
}

/// Every file under the base_dir and the spool, with its size: what a dry run must not change.
fn snapshot(farm: &Farm) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for top in [farm.base(), farm.spool().join("outbox")] {
        let mut stack = vec![top];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let m = std::fs::symlink_metadata(&p).unwrap();
                if m.is_dir() {
                    stack.push(p);
                } else {
                    out.push((p.display().to_string(), m.len()));
                }
            }
        }
    }
    out.sort();
    out
}

/// The job numbers a `gc` output names, in order.
fn gc_jobs(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.starts_with("job "))
        .map(|l| l.split_whitespace().nth(2).unwrap().to_string())
        .collect()
}

/// What the log says of each job's images, by image_id: (pinned, expired reason).
fn images_of(farm: &Farm) -> std::collections::BTreeMap<String, (bool, Option<String>)> {
    let rows = web::bin_json(farm, &["status", "--json"]);
    let mut out = std::collections::BTreeMap::new();
    for r in rows.as_array().unwrap() {
        let Some(id) = r["image_id"].as_str() else {
            continue;
        };
        let shown = bin_show(farm, id);
        let expired = shown
            .lines()
            .find(|l| l.starts_with("images     expired"))
            .map(str::to_string);
        out.insert(id.to_string(), (r["images"] == json!("pinned"), expired));
    }
    out
}

fn bin_show(farm: &Farm, id: &str) -> String {
    let (code, out, err) = output(farm.bin().args(["show", id]));
    assert_eq!(code, 0, "{err}");
    out
}

fn ok(farm: &Farm, args: &[&str]) -> String {
    let (code, out, err) = output(farm.bin().args(args));
    assert_eq!(code, 0, "{args:?}: {out}{err}");
    out
}

/// Builds the workitems one after the other (so their finish order is theirs).
fn build_in_order(farm: &Farm, items: &[(&str, Value)]) {
    for (id, w) in items {
        farm.drop_json(&format!("{id}.json"), w);
        let a = farm.wait_outbox(&format!("{id}.json"), T);
        assert_eq!(a["image"]["result"], json!(true), "{a:#}");
    }
}

#[test]
fn keep_last_expires_exactly_what_the_policy_names_never_a_pinned_one() {
    init_log();
    let mut farm = Farm::new();
    let d = farm.start();
    build_in_order(
        &farm,
        &[
            ("k1", named("k1", "same", 20000)),
            ("k2", named("k2", "same", 20000)),
            ("k3", named("k3", "same", 20000)),
            ("k4", named("k4", "same", 20000)),
            ("o1", named("o1", "other", 20000)),
        ],
    );
    d.stop().unwrap();
    // the policy comes now (a daemon with it would have expired them already)
    farm.cfg.artifacts.keep_last = 2;
    ok(&farm, &["pin", "k1"]);
    assert!(ok(&farm, &["pin", "k1"]).contains("already pinned"));
    let before = snapshot(&farm);
    let seq_before = farm.events().len();

    let dry = ok(&farm, &["gc", "--dry-run"]);
    // the newest two of "same" are k4, k3; k1 is pinned; k2 goes; "other" has one
    assert_eq!(gc_jobs(&dry), ["k2"], "{dry}");
    assert!(dry.contains("keep_last = 2"), "{dry}");
    assert!(dry.contains("dry run: nothing changed"), "{dry}");
    assert_eq!(snapshot(&farm), before, "a dry run changed files");
    assert_eq!(farm.events().len(), seq_before, "a dry run recorded events");

    let k2_files = listed(&farm, "k2");
    let done = ok(&farm, &["gc"]);
    assert_eq!(gc_jobs(&done), gc_jobs(&dry), "{done}");
    for f in &k2_files {
        assert!(!f.exists(), "{} survived its expiry", f.display());
    }
    // never the log, the kickstart, SHA256SUMS, the answer
    let k2 = job_dir(&farm, "k2");
    for keep in ["same.log", "same.ks", "SHA256SUMS"] {
        assert!(k2.join(keep).exists(), "{keep} was deleted");
    }
    assert!(farm.outbox().join("k2.json").exists());
    for id in ["k1", "k3", "k4", "o1"] {
        assert!(listed(&farm, id).iter().all(|f| f.exists()), "{id}");
    }
    let images = images_of(&farm);
    assert!(images["k1"].0, "k1 is pinned: {images:?}");
    assert!(
        images["k2"].1.as_deref().unwrap().contains("keep_last = 2"),
        "{images:?}"
    );
    assert!(
        images.iter().filter(|(_, v)| v.1.is_some()).count() == 1,
        "{images:?}"
    );
    // --wide gives each image's sha256, --json its provenance too
    let wide = ok(&farm, &["status", "--wide"]);
    let k3 = farm.outbox_file("k3.json").unwrap();
    let k3_sha = k3["image"]["image_sha256"].as_str().unwrap();
    assert!(
        wide.lines()
            .any(|l| l.contains("k3") && l.contains(&format!("ok sha256:{k3_sha}"))),
        "{wide}"
    );
    let rows = web::bin_json(&farm, &["status", "--json"]);
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["image_id"] == json!("k3"))
        .unwrap();
    assert_eq!(row["image_sha256"], json!(k3_sha));
    assert!(
        row["provenance_url"]
            .as_str()
            .unwrap()
            .ends_with("/k3/provenance.json"),
        "{row}"
    );
    let status = ok(&farm, &["status"]);
    assert!(
        status
            .lines()
            .any(|l| l.contains("k2") && l.contains("ok (expired)")),
        "{status}"
    );
    assert!(
        status
            .lines()
            .any(|l| l.contains("k1") && l.contains("ok (pinned)")),
        "{status}"
    );

    // again: nothing more; unpinned, k1 goes too (it is the third newest of "same")
    assert!(gc_jobs(&ok(&farm, &["gc"])).is_empty());
    ok(&farm, &["unpin", "k1"]);
    assert_eq!(gc_jobs(&ok(&farm, &["gc", "--dry-run"])), ["k1"]);
    // an expired job cannot be pinned
    let (code, _, err) = output(farm.bin().args(["pin", "k2"]));
    assert_eq!(code, 1);
    assert!(err.contains("expired"), "{err}");
}

/// The export with every event of the job holding `image_id` moved `days` back.
fn backdate(lines: &[String], image_id: &str, days: u64) -> Vec<String> {
    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let job = events
        .iter()
        .find(|e| e["kind"] == json!("queued") && e["image_id"] == json!(image_id))
        .map(|e| e["job"].clone())
        .unwrap();
    events
        .into_iter()
        .map(|mut e| {
            if e["job"] == job {
                let ts = humantime::parse_rfc3339(e["ts"].as_str().unwrap()).unwrap();
                let old = ts - Duration::from_secs(days * 86_400);
                e["ts"] = json!(humantime::format_rfc3339_millis(old).to_string());
            }
            serde_json::to_string(&e).unwrap()
        })
        .collect()
}

/// Moves the state dir aside and imports `export` into a new, empty one.
fn reimport(farm: &Farm, export: &str, name: &str) {
    let state = farm.cfg.state_dir();
    std::fs::rename(&state, farm.root().join(name)).unwrap();
    let file = farm.root().join(format!("{name}.jsonl"));
    std::fs::write(&file, export).unwrap();
    ok(farm, &["import", file.to_str().unwrap()]);
}

#[test]
fn keep_days_with_back_dated_events_and_the_events_go_through_export_import_and_replay() {
    init_log();
    let mut farm = Farm::new();
    let d = farm.start();
    build_in_order(
        &farm,
        &[
            ("d1", named("d1", "a", 10000)),
            ("d2", named("d2", "b", 10000)),
            ("d3", named("d3", "c", 10000)),
        ],
    );
    d.stop().unwrap();
    let lines = export_lines(&ok(&farm, &["events", "--json"]));
    let old = backdate(&backdate(&lines, "d1", 30), "d3", 30);
    reimport(&farm, &whole_export(&old), "state-1");

    farm.cfg.artifacts.keep_days = 7;
    ok(&farm, &["pin", "d3"]);
    let dry = ok(&farm, &["gc", "--dry-run"]);
    assert_eq!(gc_jobs(&dry), ["d1"], "{dry}");
    assert!(
        dry.contains("older than keep_days = 7 (finished 30 day(s) ago)"),
        "{dry}"
    );
    let d1_files = listed(&farm, "d1");
    assert_eq!(gc_jobs(&ok(&farm, &["gc"])), ["d1"]);
    assert!(d1_files.iter().all(|f| !f.exists()));
    // verify of an expired job says so (exit 2: the files are missing, on purpose)
    let key = farm.root().join("k");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let (code, _, err) = output(
        farm.bin()
            .args(["verify", "d1", "--key"])
            .arg(key.with_extension("pub")),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("expired at") && err.contains("keep_days"),
        "{err}"
    );
    ok(&farm, &["unpin", "d3"]);
    ok(&farm, &["pin", "d2"]);

    // pinned, unpinned and expired survive an export and an import, and replay agrees
    let export = ok(&farm, &["events", "--json"]);
    let kinds: Vec<String> = export_events(&export)
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    for k in ["pinned", "unpinned", "expired"] {
        assert!(kinds.iter().any(|x| x == k), "no {k} in {kinds:?}");
    }
    let before = images_of(&farm);
    reimport(&farm, &export, "state-2");
    assert_eq!(images_of(&farm), before);
    assert!(
        before["d2"].0 && !before["d3"].0 && before["d1"].1.is_some(),
        "{before:?}"
    );
    let (code, out, err) = output(farm.bin().args(["replay"]));
    assert_eq!(code, 0, "{out}{err}");
    // d3 is unpinned and 30 days old: it is next
    assert_eq!(gc_jobs(&ok(&farm, &["gc", "--dry-run"])), ["d3"]);

    // A crash between an expiry's event and its deletes: the event is in the log, the files
    // are still there. The next pass deletes them (and chooses nothing new for them).
    let mut lines = export_lines(&ok(&farm, &["events", "--json"]));
    let last: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    let d2_job = web::job_of(&farm, "d2");
    let d2_files = listed(&farm, "d2");
    let under: Vec<String> = d2_files
        .iter()
        .map(|f| f.strip_prefix(farm.base()).unwrap().display().to_string())
        .collect();
    lines.push(
        json!({"seq": last["seq"].as_u64().unwrap() + 1, "ts": last["ts"], "job": d2_job,
               "kind": "expired", "files": under, "bytes": 10045, "reason": "cut short"})
        .to_string(),
    );
    reimport(&farm, &whole_export(&lines), "state-3");
    assert!(d2_files.iter().all(|f| f.exists()));
    assert_eq!(gc_jobs(&ok(&farm, &["gc"])), ["d3"]);
    assert!(
        d2_files.iter().all(|f| !f.exists()),
        "the cut-short expiry was not finished"
    );
}

/// The value of a sample in an exposition.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_full_base_dir_holds_builds_expires_the_oldest_unpinned_image_and_builds_resume() {
    init_log();
    let mut farm = web::http_farm(16);
    let base = farm.base();
    let Some(_tmpfs) = Mount::new(&["-t", "tmpfs", "-o", "size=20m", "tmpfs"], &base) else {
        return;
    };
    farm.cfg.artifacts.min_free_mb = 10;
    let d = farm.start();
    let addr = web::http_addr(&farm);
    let mb4 = 4 << 20;
    build_in_order(
        &farm,
        &[
            ("t1", named("t1", "t", mb4)),
            ("t2", named("t2", "t", mb4)),
            ("t3", named("t3", "t", mb4)),
        ],
    );
    let free = || {
        let st = nix::sys::statvfs::statvfs(&base).unwrap();
        st.blocks_available() as u64 * st.fragment_size() as u64
    };
    assert!(free() < 10 << 20, "the tmpfs has {} bytes free", free());
    let metrics = web::get(&addr, "/metrics").body;
    let kept = |ids: &[&str]| -> f64 {
        ids.iter()
            .flat_map(|id| listed(&farm, id))
            .map(|f| std::fs::metadata(f).unwrap().len())
            .sum::<u64>() as f64
    };
    assert_eq!(
        sample(&metrics, "build_image_artifact_bytes"),
        kept(&["t1", "t2", "t3"]),
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "build_image_expired_total"), 0.0);

    // everything pinned: nothing may expire, the next build waits and status says why
    for id in ["t1", "t2", "t3"] {
        ok(&farm, &["pin", id]);
    }
    farm.drop_json("t4.json", &named("t4", "t", mb4));
    assert!(
        wait_for(T, || {
            let (_, _, err) = output(farm.bin().args(["status"]));
            err.contains("no build starts") && err.contains("min_free_mb = 10")
        }),
        "status never said why t4 waits"
    );
    let (_, out, _) = output(farm.bin().args(["status"]));
    assert!(
        out.lines()
            .any(|l| l.contains("t4") && l.contains("queued")),
        "{out}"
    );
    assert_eq!(mic_runs(&farm, "t4"), 0, "t4 was built below the budget");

    // t2 given back to the policy: the budget expires it (t1 is older, but pinned), t4 builds
    let t2_files = listed(&farm, "t2");
    ok(&farm, &["unpin", "t2"]);
    let a = farm.wait_outbox("t4.json", Duration::from_secs(120));
    assert_eq!(a["image"]["result"], json!(true), "{a:#}");
    assert!(t2_files.iter().all(|f| !f.exists()));
    for id in ["t1", "t3", "t4"] {
        assert!(listed(&farm, id).iter().all(|f| f.exists()), "{id}");
    }
    let (_, _, err) = output(farm.bin().args(["status"]));
    assert!(!err.contains("no build starts"), "{err}");
    let page = web::get(&addr, &format!("/jobs/{}", web::job_of(&farm, "t2"))).body;
    assert!(
        page.contains("id=\"expired\"") && page.contains("disk budget"),
        "{page}"
    );
    let page = web::get(&addr, &format!("/jobs/{}", web::job_of(&farm, "t1"))).body;
    assert!(page.contains("id=\"pinned\""), "{page}");
    let metrics = web::get(&addr, "/metrics").body;
    assert_eq!(
        sample(&metrics, "build_image_artifact_bytes"),
        kept(&["t1", "t3", "t4"]),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "build_image_expired_total"),
        1.0,
        "{metrics}"
    );
    d.stop().unwrap();
    let expired: Vec<_> = farm
        .events()
        .into_iter()
        .filter(|e| e.kind.name() == "expired")
        .collect();
    assert_eq!(expired.len(), 1, "{expired:?}");
}

#[test]
fn doctor_judges_the_disk_budget_against_base_dir() {
    init_log();
    let mut farm = Farm::new();
    std::fs::create_dir_all(farm.base()).unwrap();
    let line = |farm: &Farm| -> String {
        let (_, out, err) = output(farm.bin().arg("doctor"));
        out.lines()
            .find(|l| l.contains("disk budget:"))
            .unwrap_or_else(|| panic!("no disk budget line:\n{out}{err}"))
            .to_string()
    };
    farm.cfg.artifacts.min_free_mb = 1;
    let ok_line = line(&farm);
    assert!(ok_line.starts_with("ok"), "{ok_line}");
    // more than the file system holds: no build would ever start
    farm.cfg.artifacts.min_free_mb = 1 << 30;
    let fail = line(&farm);
    assert!(
        fail.starts_with("FAIL") && fail.contains("no build would ever start"),
        "{fail}"
    );
    // no budget: no line
    farm.cfg.artifacts.min_free_mb = 0;
    let (_, out, _) = output(farm.bin().arg("doctor"));
    assert!(!out.contains("disk budget"), "{out}");
}
