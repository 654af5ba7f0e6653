//! Bounds and paths (DESIGN.md): the job log and hooks.log stay bounded however much a child
//! prints; no path under base_dir is followed through a symlink that was already there; and
//! `image_url` only names a file that the job's current attempt wrote.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[test]
fn the_job_log_keeps_its_head_and_tail_within_its_limit() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.worker.job_log_max_mb = 1;
    let d = farm.start();
    let log = farm.base().join("requests/chatty-1/img-chatty-1.log");
    // Its size, looked at all the time while mic writes (a cut included).
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (log, done) = (log.clone(), std::sync::Arc::clone(&done));
        std::thread::spawn(move || {
            let (mut largest, mut looks) = (0u64, 0u64);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(m) = std::fs::metadata(&log) {
                    largest = largest.max(m.len());
                    looks += 1;
                }
            }
            (largest, looks)
        })
    };
    // 3 MB of output from mic
    farm.drop_json(
        "chatty.json",
        &workitem("chatty-1", "# mic-fixture: spew 30000\n"),
    );
    let r = farm.wait_outbox("chatty.json", T);
    assert_eq!(r["image"]["result"], json!(true));
    d.stop().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (largest, looks) = watcher.join().unwrap();
    let size = std::fs::metadata(&log).unwrap().len();
    println!(
        "job log after 3 MB of output, limit 1 MiB: {size} bytes; at most {largest} bytes in {looks} looks while it was written"
    );
    // Its head (half the limit), the marker, and its tail: within the limit, always.
    assert!(size <= 1024 * 1024, "{size} bytes");
    assert!(
        looks > 0 && largest <= 1024 * 1024,
        "{largest} bytes while it was written"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("build of chatty-1"), "the head is kept");
    assert_eq!(
        text.matches("bytes of output omitted").count(),
        1,
        "the marker"
    );
    assert!(
        text.contains("Finished. The image is"),
        "the tail is kept: {}",
        &text[text.len().saturating_sub(300)..]
    );
}

#[test]
fn hooks_log_stays_bounded_and_its_lines_are_whole() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.hooks.log_max_mb = 1;
    // each push prints 3 MB
    std::fs::write(farm.hook_dir().join("push.spew"), "30000\n").unwrap();
    let d = farm.start();
    for i in 0..3 {
        farm.drop_json(
            &format!("h{i}.json"),
            &workitem(&format!("hooks-{i}"), "ks\n"),
        );
    }
    for i in 0..3 {
        farm.wait_outbox(&format!("h{i}.json"), T);
        farm.wait_pushes(&format!("hooks-{i}"), 2);
    }
    d.stop().unwrap();
    let state = farm.cfg.state_dir();
    let mut total = 0;
    for name in ["hooks.log", "hooks.log.1"] {
        let p = state.join(name);
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let size = text.len() as u64;
        total += size;
        println!("{name}: {size} bytes");
        assert!(size <= 2 * 1024 * 1024, "{name}: {size} bytes");
        assert!(text.ends_with('\n'), "{name} ends with a whole line");
        // every push's block ends with its outcome
        assert!(
            text.lines().any(|l| l.contains("DONE: ok")),
            "{name} has push outcomes"
        );
    }
    assert!(total > 0);
    assert!(
        total <= 4 * 1024 * 1024,
        "6 pushes x 3 MB kept in {total} bytes"
    );
}

#[test]
fn a_symlink_already_under_base_dir_is_not_followed() {
    init_log();
    let farm = Farm::new();
    let outside = farm.root().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(farm.base()).unwrap();
    // someone made base_dir/evil point elsewhere
    std::os::unix::fs::symlink(&outside, farm.base().join("evil")).unwrap();
    let d = farm.start();
    let mut wi = workitem("sym-1", "ks\n");
    wi["image"]["prefix"] = json!("evil/queue");
    farm.drop_json("sym.json", &wi);
    let r = farm.wait_outbox("sym.json", T);
    d.stop().unwrap();
    assert_eq!(r["image"]["result"], json!(false));
    let err = r["image"]["error"].as_str().unwrap();
    assert!(err.contains("symbolic link"), "{err}");
    assert!(
        tree(&outside).is_empty(),
        "written outside base_dir: {:?}",
        tree(&outside)
    );
}

#[test]
fn image_url_names_only_a_file_this_attempt_wrote() {
    init_log();
    let farm = Farm::new();
    let flag = farm.root().join("no-image-now");
    let d = farm.start();
    let ks = format!("# mic-fixture: noimage-if {}\nks\n", flag.display());
    farm.drop_json("att.json", &workitem("attempt-1", &ks));
    let r = farm.wait_outbox("att.json", T);
    assert_eq!(r["image"]["result"], json!(true));
    assert!(r["image"]["image_url"].as_str().is_some());
    farm.wait_pushes("attempt-1", 2);
    // the next attempt writes no image: the first attempt's image is not its answer
    std::fs::write(&flag, b"").unwrap();
    let (code, out, err) = output(farm.bin().args(["retry", "attempt-1"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(wait_for(T, || farm
        .outbox_file("att.json")
        .is_some_and(|r| r["image"]["result"] == json!(false))));
    d.stop().unwrap();
    let r = farm.outbox_file("att.json").unwrap();
    assert!(r["image"].get("image_url").is_none(), "{r:#}");
    let err = r["image"]["error"].as_str().unwrap();
    assert!(err.contains("left no image file"), "{err}");
}
