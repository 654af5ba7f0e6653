//! Faults the daemon outlives without a restart (DESIGN.md), each through the public interface:
//! the binary or the daemon run in-process, on real files and processes with the mic and push
//! fixtures.

mod common;

use common::*;
use serde_json::{Value, json};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

const T: Duration = Duration::from_secs(60);

fn json_out(farm: &Farm, args: &[&str]) -> Value {
    let (code, out, err) = output(farm.bin().args(args));
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
}

/// Kills a process group when dropped, so that a failing test leaves no mic fixture behind.
struct GroupGuard(i32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Kills the process groups of the processes running `program` (a path unique to one test's
/// farm), as found in /proc; returns how many.
fn kill_groups_running(program: &Path) -> usize {
    let needle = program.as_os_str().as_bytes();
    let mut killed = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if !cmdline.split(|b| *b == 0).any(|arg| arg == needle) {
            continue;
        }
        if let Ok(pgid) = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))) {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            killed += 1;
        }
    }
    killed
}

#[test]
fn a_hanging_push_holds_back_no_claim_build_or_answer() {
    let mut farm = Farm::new();
    farm.cfg.hooks.timeout = 300;
    let hang = farm.hook_dir().join("push.hang");
    std::fs::write(&hang, b"").unwrap();
    let daemon = farm.start_binary();
    let ids: Vec<String> = (1..=6).map(|i| format!("hp-{i}")).collect();
    for id in &ids {
        farm.drop_json(&format!("{id}.json"), &workitem(id, "ks\n"));
    }
    let outbox = farm.outbox();
    assert!(
        wait_for(T, || ids
            .iter()
            .all(|id| outbox.join(format!("{id}.json")).exists())),
        "not all answered while the pushes hang; outbox has {:?}",
        list(&outbox)
    );
    for id in &ids {
        let r = farm.outbox_file(&format!("{id}.json")).unwrap();
        assert_eq!(r["image"]["result"], json!(true), "{id}: {r}");
    }
    assert!(list(&farm.incoming()).is_empty());
    assert!(
        farm.pushes().is_empty(),
        "no push got through a hanging utility"
    );

    // Cleanup without waiting out the pushes' timeout: the daemon is killed, and the next start
    // kills the push processes it left and pushes the statuses again (the utility answers now).
    drop(daemon);
    kill_groups_running(&farm.hook_dir().join("push"));
    std::fs::remove_file(&hang).unwrap();
    let (code, _, err) = output(farm.bin().args(["run", "--once"]));
    assert_eq!(code, 0, "{err}");
    for id in &ids {
        assert!(
            farm.pushes_for(id).iter().any(|p| p.0 == "DONE"),
            "{id}: {:?}",
            farm.pushes_for(id)
        );
    }
}

#[test]
fn status_and_cancel_answer_during_grace_and_a_second_sigterm_ends_it() {
    let mut farm = Farm::new();
    farm.cfg.worker.workers = 1;
    farm.cfg.worker.grace = 600;
    let stderr_path = farm.root().join("daemon.err");
    let child = farm
        .bin()
        .arg("run")
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("start the daemon");
    let mut child = Guard(child);
    let inc = farm.incoming();
    assert!(
        wait_for(T, || inc.is_dir()),
        "daemon did not set up the spool"
    );

    farm.drop_json(
        "hang.json",
        &workitem("g-hang", "# mic-fixture: sleep 300\n"),
    );
    let log = farm.wait_mic_running("g-hang");
    let pids = fixture_pids(&std::fs::read_to_string(&log).unwrap());
    let _group = GroupGuard(pids[0]);
    farm.drop_json("queued.json", &workitem("g-queued", "ks\n"));
    assert!(
        wait_for(T, || json_out(
            &farm,
            &["status", "--json", "--state", "queued"]
        )
        .as_array()
        .is_some_and(|a| a.len() == 1)),
        "g-queued never queued"
    );

    sigterm(&child.0);
    assert!(
        wait_for(T, || std::fs::read_to_string(&stderr_path)
            .is_ok_and(|t| t.contains("stopping"))),
        "the daemon never began to stop: {}",
        std::fs::read_to_string(&stderr_path).unwrap_or_default()
    );

    // in the grace: status answers and shows the running build
    let (code, out, err) = output(farm.bin().args(["status", "--json"]));
    assert_eq!(code, 0, "status during grace: {err}");
    let rows: Value = serde_json::from_str(&out).unwrap();
    let hang = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["image_id"] == json!("g-hang"))
        .cloned()
        .unwrap_or_else(|| panic!("no g-hang row: {out}"));
    assert_eq!(hang["state"], json!("building"), "{hang}");

    // ... and cancel answers the queued job
    let (code, out, err) = output(farm.bin().args(["cancel", "g-queued"]));
    assert_eq!(code, 0, "cancel during grace: {out}{err}");
    let r = farm.wait_outbox("queued.json", T);
    assert_eq!(r["image"]["result"], json!(false));
    assert_eq!(r["image"]["error"], json!("cancelled"));
    assert_eq!(
        child.0.try_wait().unwrap(),
        None,
        "still in its grace (600 s)"
    );

    // a second SIGTERM ends the grace at once
    sigterm(&child.0);
    assert_eq!(wait_exit(&mut child.0, Duration::from_secs(30)), Some(0));
    assert!(
        !build_image::process::group_alive(pids[0]),
        "mic's group outlived the daemon"
    );
    assert!(pids.iter().all(|p| !alive(*p)));
    assert!(
        farm.outbox_file("hang.json").is_none(),
        "interrupted, not answered"
    );
    let events = farm.events();
    let job = events
        .iter()
        .find(|e| {
            e.kind.name() == "claimed"
                && serde_json::to_value(e).unwrap()["file"] == json!("hang.json")
        })
        .expect("hang.json claimed")
        .job;
    let last = events
        .iter()
        .rfind(|e| e.job == job)
        .map(|e| serde_json::to_value(e).unwrap())
        .unwrap();
    assert_eq!(last["kind"], json!("interrupted"), "{last}");
    assert_eq!(last["cause"], json!("stop"), "{last}");
}

#[test]
fn an_idle_control_client_does_not_hold_a_stop() {
    let farm = Farm::new();
    let mut child = farm.start_binary();
    let sock = farm.cfg.state_dir().join("control.sock");
    let mut conn = None;
    assert!(
        wait_for(T, || {
            conn = std::os::unix::net::UnixStream::connect(&sock).ok();
            conn.is_some()
        }),
        "no control socket at {}",
        sock.display()
    );
    sigterm(&child.0);
    assert_eq!(
        wait_exit(&mut child.0, Duration::from_secs(30)),
        Some(0),
        "the stop waited for an idle client"
    );
    drop(conn);
}

#[test]
fn non_utf8_names_are_moved_to_rejected_under_a_safe_name() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    let raw = OsStr::from_bytes(b"bad\xff\xfe.json");
    std::fs::write(
        farm.incoming().join(raw),
        serde_json::to_vec(&workitem("nu-1", "ks\n")).unwrap(),
    )
    .unwrap();
    let (inc, rej) = (farm.incoming(), farm.rejected());
    assert!(
        wait_for(T, || std::fs::read_dir(&inc).unwrap().next().is_none()
            && list(&rej).iter().any(|n| n.ends_with(".reason"))),
        "not moved: incoming {:?}, rejected {:?}",
        list(&inc),
        list(&rej)
    );
    // every name in rejected/ is UTF-8
    for e in std::fs::read_dir(&rej).unwrap().flatten() {
        assert!(e.file_name().to_str().is_some(), "{:?}", e.file_name());
    }
    let names = list(&rej);
    assert_eq!(names.len(), 2, "{names:?}");
    let reason_name = names.iter().find(|n| n.ends_with(".reason")).unwrap();
    let kept = reason_name.trim_end_matches(".reason");
    assert!(names.iter().any(|n| n == kept), "{names:?}");
    assert!(kept.starts_with("bad") && kept.ends_with(".json"), "{kept}");
    // the file was moved unread and whole
    assert_eq!(
        serde_json::from_slice::<Value>(&std::fs::read(rej.join(kept)).unwrap()).unwrap(),
        workitem("nu-1", "ks\n")
    );
    let reason = std::fs::read_to_string(rej.join(reason_name)).unwrap();
    let lower = reason.to_lowercase();
    assert!(
        lower.contains("bad\\xff\\xfe.json"),
        "the original bytes, escaped: {reason}"
    );
    assert!(reason.contains("UTF-8"), "{reason}");
    assert!(
        list(&farm.outbox()).is_empty(),
        "never read, never answered"
    );

    let rows = json_out(&farm, &["status", "--json"]);
    let rows = rows.as_array().unwrap();
    assert!(
        rows.iter().any(|r| r["state"] == json!("rejected")),
        "{rows:?}"
    );
    d.stop().unwrap();
}

#[test]
fn hard_links_are_never_read() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    let outside = farm.root().join("outside.json");
    std::fs::write(
        &outside,
        serde_json::to_vec(&workitem("hl-1", "ks\n")).unwrap(),
    )
    .unwrap();
    std::fs::hard_link(&outside, farm.incoming().join("linked.json")).unwrap();
    let rej = farm.rejected();
    // the reason is written first, then the file moved beside it
    assert!(
        wait_for(T, || rej.join("linked.json.reason").exists()
            && rej.join("linked.json").exists()),
        "not rejected: rejected has {:?}, incoming {:?}",
        list(&rej),
        list(&farm.incoming())
    );
    let reason = std::fs::read_to_string(rej.join("linked.json.reason")).unwrap();
    assert!(reason.contains("link"), "{reason}");
    assert!(list(&farm.incoming()).is_empty());
    assert!(
        list(&farm.outbox()).is_empty(),
        "a hard link was answered: {:?}",
        list(&farm.outbox())
    );
    assert!(!farm.base().join("requests/hl-1").exists(), "never built");
    assert_eq!(
        serde_json::from_slice::<Value>(&std::fs::read(&outside).unwrap()).unwrap(),
        workitem("hl-1", "ks\n"),
        "the other name is untouched"
    );
    d.stop().unwrap();
}

/// Runs `cat PATH` as user nobody; None when no tool for that is present.
fn cat_as_nobody(path: &Path) -> Option<(i32, String, String)> {
    let tool_ok = |t: &str| {
        Command::new(t)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    let mut cmd = if tool_ok("setpriv") {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
        c
    } else if tool_ok("runuser") {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]);
        c
    } else {
        return None;
    };
    Some(output(cmd.arg("cat").arg(path)))
}

#[test]
fn state_files_are_not_readable_by_others() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    farm.drop_json("a.json", &workitem("perm-1", "ks\n"));
    farm.wait_outbox("a.json", T);
    farm.wait_pushes("perm-1", 2);
    d.stop().unwrap();

    let state = farm.cfg.state_dir();
    let mode = |p: &Path| p.symlink_metadata().unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700, "{}", state.display());
    for name in ["db", "conf", "hooks.log", "log.mark"] {
        assert!(state.join(name).exists(), "{name} in {:?}", list(&state));
    }
    let mut files = Vec::new();
    let mut stack = vec![state.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    for f in &files {
        assert_eq!(
            mode(f) & 0o044,
            0,
            "{} is readable by group or others: {:o}",
            f.display(),
            mode(f)
        );
    }

    // as another user: first the state dir keeps it out, then (the dir opened up for the check)
    // the file's own mode does
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED (reading as nobody): not running as root");
        return;
    }
    // the folders above the state dir are opened so that only the state dir and its files decide
    let mut p = state.parent().unwrap().to_path_buf();
    while p.starts_with(farm.root()) {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        if p == farm.root() {
            break;
        }
        p = p.parent().unwrap().to_path_buf();
    }
    let Some((code, _, err)) = cat_as_nobody(&state.join("db")) else {
        eprintln!("SKIPPED (reading as nobody): neither setpriv nor runuser");
        return;
    };
    assert_ne!(code, 0, "nobody read the log: {err}");
    assert!(err.contains("Permission denied"), "{err}");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o711)).unwrap();
    for name in ["db", "hooks.log"] {
        let (code, _, err) = cat_as_nobody(&state.join(name)).unwrap();
        assert_ne!(code, 0, "nobody read {name} through an open dir: {err}");
        assert!(err.contains("Permission denied"), "{err}");
    }
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn config_values_out_of_range_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[worker]\ntimeout = 9223372036854775807\n", "timeout"),
        ("[worker]\nworkers = 100000\n", "workers"),
        ("[worker]\ntimeout = 0\n", "timeout"),
        ("[worker]\ngrace = 9223372036854775807\n", "grace"),
        ("[spool]\npoll_interval_ms = 0\n", "poll_interval_ms"),
        ("[hooks]\nretries = 100000\n", "retries"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let cfg = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&cfg, text).unwrap();
        for cmd in ["status", "run"] {
            let child = bin()
                .args(["--config", cfg.to_str().unwrap(), cmd])
                .current_dir(dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut child = Guard(child);
            let code = wait_exit(&mut child.0, T);
            let mut err = String::new();
            use std::io::Read;
            child
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert_eq!(code, Some(2), "{cmd} with {text:?}: {err}");
            assert!(
                err.contains(key),
                "{cmd} with {text:?}: key not named: {err}"
            );
            assert!(!err.contains("panicked"), "{cmd} with {text:?}: {err}");
        }
    }
}

#[test]
fn requeue_refuses_a_live_worker_unless_forced() {
    let farm = Farm::new();
    let mut a = farm.start_binary();
    let mut cfg_b = farm.cfg.clone();
    cfg_b.spool.worker_id = Some("w2".into());
    let farm_b = Farm {
        dir: tempfile::tempdir().unwrap(),
        cfg: cfg_b,
    };
    assert_eq!(farm_b.cfg.state_dir(), farm.spool().join("state/w2"));
    let mut b = farm_b.start_binary();
    let w2 = farm.spool().join("active/w2");
    // the liveness mark is written once recovery is done: w2 does not take the file itself
    assert!(
        wait_for(T, || w2.join(".alive").exists()),
        "w2 never marked itself alive: {:?}",
        list(&w2)
    );
    std::fs::write(
        w2.join("by-hand.json"),
        serde_json::to_vec(&workitem("rq-1", "ks\n")).unwrap(),
    )
    .unwrap();

    let (code, out, err) = output(farm.bin().args(["requeue", "--worker", "w2"]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("looks alive"), "{err}");
    assert!(w2.join("by-hand.json").exists(), "refused: not moved");

    let (code, out, err) = output(farm.bin().args(["requeue", "--worker", "w2", "--force"]));
    assert_eq!(code, 0, "{out}{err}");
    let r = farm.wait_outbox("by-hand.json", T);
    assert_eq!(r["image"]["result"], json!(true));
    assert!(!w2.join("by-hand.json").exists());

    sigterm(&a.0);
    sigterm(&b.0);
    assert_eq!(wait_exit(&mut a.0, T), Some(0));
    assert_eq!(wait_exit(&mut b.0, T), Some(0));
}

#[test]
fn leftovers_of_interrupted_writes_are_removed_at_start() {
    init_log();
    let farm = Farm::new();
    build_image::edges::spool::Spool::new(&farm.spool(), "w1")
        .create_dirs()
        .unwrap();
    let tmp = farm.spool().join("tmp");
    let ours = farm.outbox().join(".a.json.123-4@w1.tmp");
    let theirs = farm.outbox().join(".b.json.456-7@w2.tmp");
    let old = tmp.join(".x.json.999-1.tmp");
    let fresh = tmp.join(".y.tmp");
    for p in [&ours, &theirs, &old, &fresh] {
        std::fs::write(p, b"{\"partial\":").unwrap();
    }
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(2 * 3600))
        .unwrap();
    let d = farm.start();
    assert!(
        wait_for(T, || !ours.exists() && !old.exists()),
        "leftovers stayed: outbox {:?}, tmp {:?}",
        list(&farm.outbox()),
        list(&tmp)
    );
    // one pass removed them; what may still be written stays
    assert!(fresh.exists(), "a fresh temp file in tmp/ was removed");
    assert!(
        theirs.exists(),
        "another worker's fresh temp file in outbox/ was removed"
    );
    d.stop().unwrap();
    assert!(fresh.exists() && theirs.exists());
}

#[test]
fn urls_are_percent_encoded_and_names_refuse_control_characters() {
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    let mut sp = workitem("url-1", "ks\n");
    sp["image"]["name"] = json!("my image");
    farm.drop_json("space.json", &sp);
    let mut nl = workitem("url-2", "ks\n");
    nl["image"]["name"] = json!("bad\nname");
    farm.drop_json("newline.json", &nl);

    let r = farm.wait_outbox("newline.json", T);
    assert_eq!(r["image"]["result"], json!(false), "{r}");
    let err = r["image"]["error"].as_str().unwrap_or_default();
    assert!(err.contains("name"), "{err}");
    assert!(!farm.base().join("requests/url-2").exists(), "never built");

    let r = farm.wait_outbox("space.json", T);
    assert_eq!(r["image"]["result"], json!(true), "{r}");
    for key in ["image_url", "logfile_url"] {
        let url = r["image"][key].as_str().unwrap();
        assert!(url.contains("my%20image"), "{key} = {url}");
        assert!(!url.contains(' '), "{key} = {url}");
    }
    d.stop().unwrap();
}

#[test]
fn unknown_state_and_kind_are_usage_errors() {
    let farm = Farm::new();
    let (code, _, err) = output(farm.bin().args(["status", "--state", "bogus"]));
    assert_eq!(code, 2, "{err}");
    for s in ["queued", "building", "done", "rejected"] {
        assert!(err.contains(s), "{s} not named: {err}");
    }
    let (code, _, err) = output(farm.bin().args(["events", "--kind", "bogus"]));
    assert_eq!(code, 2, "{err}");
    for k in ["claimed", "delivered", "pushed", "interrupted"] {
        assert!(err.contains(k), "{k} not named: {err}");
    }
}

#[test]
fn run_once_exits_1_when_a_final_push_failed_after_its_retries() {
    init_log();
    let mut farm = Farm::new();
    farm.cfg.hooks.retries = 1;
    farm.cfg.hooks.retry_delay_ms = 50;
    std::fs::write(farm.hook_dir().join("push.fail"), b"").unwrap();
    build_image::edges::spool::Spool::new(&farm.spool(), "w1")
        .create_dirs()
        .unwrap();
    farm.drop_json("a.json", &workitem("once-push", "ks\n"));
    let (code, _, err) = output(farm.bin().args(["run", "--once"]));
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        farm.outbox_file("a.json").expect("answered")["image"]["result"],
        json!(true),
        "the build itself succeeded"
    );
    assert!(farm.pushes().is_empty());
    let failed: Vec<Value> = farm
        .events()
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .filter(|e| e["kind"] == json!("pushed") && e["status"] == json!("DONE"))
        .collect();
    assert!(
        failed.len() >= 2 && failed.iter().all(|e| e["ok"] == json!(false)),
        "DONE tried, then retried once, never ok: {failed:?}"
    );
}

#[test]
fn a_second_daemon_names_the_pid_holding_the_log() {
    let farm = Farm::new();
    let mut first = farm.start_binary();
    let sock: PathBuf = farm.cfg.state_dir().join("control.sock");
    assert!(wait_for(T, || sock.exists()), "first daemon not up");
    let (code, _, err) = output(farm.bin().arg("run"));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("locked"), "{err}");
    let pid = first.0.id().to_string();
    assert!(err.contains(&pid), "pid {pid} not named: {err}");
    sigterm(&first.0);
    assert_eq!(wait_exit(&mut first.0, T), Some(0));
}

#[test]
fn control_socket_requests_are_bounded_in_size_and_connections() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    init_log();
    let farm = Farm::new();
    let d = farm.start();
    let sock = farm.cfg.state_dir().join("control.sock");
    assert!(wait_for(Duration::from_secs(20), || sock.exists()));
    // a request line longer than 64 KiB is refused, not read on forever
    let mut c = UnixStream::connect(&sock).unwrap();
    let big = format!(
        "{{\"op\":\"show\",\"id\":\"{}\"}}\n",
        "x".repeat(100 * 1024)
    );
    let _ = c.write_all(big.as_bytes());
    let mut line = String::new();
    BufReader::new(&c).read_line(&mut line).unwrap();
    assert!(line.contains("longer than"), "{line}");
    // 32 idle connections are served; the 33rd is told the daemon is busy
    let idle: Vec<UnixStream> = (0..32)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let busy = wait_for(Duration::from_secs(20), || {
        let extra = UnixStream::connect(&sock).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut l = String::new();
        let _ = BufReader::new(&extra).read_line(&mut l);
        l.contains("busy")
    });
    assert!(busy, "no busy answer past 32 connections");
    drop(idle);
    // once they are gone, requests are answered again
    assert!(wait_for(Duration::from_secs(20), || output(
        farm.bin().args(["status", "--json"])
    )
    .0 == 0));
    d.stop().unwrap();
}
