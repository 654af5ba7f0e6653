//! The service manager: the daemon's notifications on a NOTIFY_SOCKET datagram socket (as
//! systemd reads them), and `systemd-analyze verify` on contrib/build-image.service.

mod common;

use common::*;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every datagram received on the socket, with when it came.
type Seen = Arc<Mutex<Vec<(Instant, String)>>>;

fn listen(path: &Path) -> Seen {
    let sock = UnixDatagram::bind(path).unwrap();
    let seen: Seen = Arc::default();
    let s = Arc::clone(&seen);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            s.lock().unwrap().push((Instant::now(), msg));
        }
    });
    seen
}

/// The lines `KEY=...` received so far, in order.
fn lines(seen: &Seen, key: &str) -> Vec<(Instant, String)> {
    seen.lock()
        .unwrap()
        .iter()
        .flat_map(|(t, m)| {
            m.lines()
                .filter(|l| l.starts_with(&format!("{key}=")))
                .map(|l| (*t, l.to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn notifies_ready_watchdog_stopping_and_extends_the_stop_while_grace_runs() {
    let mut farm = Farm::new();
    farm.cfg.worker.grace = 120;
    let sock = farm.root().join("notify.sock");
    let seen = listen(&sock);
    let child = farm
        .bin()
        .arg("run")
        .env("NOTIFY_SOCKET", &sock)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = Guard(child);

    assert!(
        wait_for(Duration::from_secs(30), || !lines(&seen, "READY")
            .is_empty()),
        "no READY=1: {:?}",
        seen.lock().unwrap()
    );
    assert_eq!(lines(&seen, "READY")[0].1, "READY=1");
    // READY means recovery is done and the daemon answers and claims
    let (code, _, err) = output(farm.bin().arg("status"));
    assert_eq!(code, 0, "{err}");
    assert!(farm.cfg.state_dir().join("control.sock").exists());
    // WATCHDOG_USEC=0.4 s: pings at half of it
    assert!(
        wait_for(Duration::from_secs(10), || lines(&seen, "WATCHDOG").len()
            >= 3),
        "{:?}",
        seen.lock().unwrap()
    );
    assert!(lines(&seen, "STOPPING").is_empty());

    // a slow build holds the stop's grace: the stop timeout is extended while it runs
    farm.drop_json("slow.json", &workitem("slow", "# mic-fixture: sleep 300\n"));
    let log = farm.wait_mic_running("slow");
    sigterm(&daemon.0);
    assert!(
        wait_for(Duration::from_secs(10), || !lines(&seen, "STOPPING")
            .is_empty()),
        "no STOPPING=1"
    );
    assert!(
        wait_for(Duration::from_secs(20), || lines(
            &seen,
            "EXTEND_TIMEOUT_USEC"
        )
        .len()
            >= 2),
        "not extended twice: {:?}",
        lines(&seen, "EXTEND_TIMEOUT_USEC")
    );
    let ext = lines(&seen, "EXTEND_TIMEOUT_USEC");
    assert_eq!(ext[0].1, "EXTEND_TIMEOUT_USEC=30000000");
    let gap = ext[1].0 - ext[0].0;
    assert!(
        gap >= Duration::from_secs(4) && gap < Duration::from_secs(15),
        "{gap:?}"
    );
    let stopping_at = lines(&seen, "STOPPING")[0].0;
    assert!(lines(&seen, "READY")[0].0 <= stopping_at);
    assert!(ext[0].0 >= stopping_at, "extended before the stop");
    assert_eq!(
        daemon.0.try_wait().unwrap(),
        None,
        "the build holds the stop"
    );

    // the build ends (its sleep is killed, so mic goes on and succeeds): the daemon exits 0
    let pids = fixture_pids(&std::fs::read_to_string(&log).unwrap());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[1]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(wait_exit(&mut daemon.0, Duration::from_secs(60)), Some(0));
    assert_eq!(
        farm.outbox_file("slow.json").unwrap()["image"]["result"],
        serde_json::json!(true)
    );
}

#[test]
fn no_notify_socket_no_notifications_and_no_harm() {
    // NOTIFY_SOCKET names nothing: the daemon starts, logs a warning, and works
    let farm = Farm::new();
    let err_file = farm.root().join("daemon.err");
    let mut child = Guard(
        farm.bin()
            .arg("run")
            .env("NOTIFY_SOCKET", farm.root().join("nobody-listens.sock"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&err_file).unwrap())
            .spawn()
            .unwrap(),
    );
    let inc = farm.incoming();
    assert!(wait_for(Duration::from_secs(20), || inc.is_dir()));
    farm.drop_json("a.json", &workitem("a", "ks\n"));
    farm.wait_outbox("a.json", Duration::from_secs(30));
    sigterm(&child.0);
    assert_eq!(wait_exit(&mut child.0, Duration::from_secs(30)), Some(0));
    let err = std::fs::read_to_string(&err_file).unwrap();
    assert!(
        err.contains("cannot tell the service manager READY"),
        "{err}"
    );
}

/// `systemd-analyze verify` on the shipped unit. Verify checks that ExecStart's program
/// exists, and /usr/local/bin/build-image does not on a test machine: so a copy is verified
/// with only the program path in ExecStart rewritten to the binary under test; every other line
/// is the shipped one.
#[test]
fn the_unit_verifies() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/build-image.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    let shipped = "ExecStart=/usr/local/bin/build-image ";
    assert_eq!(
        text.matches(shipped).count(),
        1,
        "the unit's ExecStart changed"
    );
    let d = tempfile::tempdir().unwrap();
    let copy = d.path().join("build-image.service");
    std::fs::write(
        &copy,
        text.replace(
            shipped,
            &format!("ExecStart={} ", env!("CARGO_BIN_EXE_build-image")),
        ),
    )
    .unwrap();
    let out = match std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            let why = format!("systemd-analyze cannot run ({e}): install systemd");
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    // warnings (an unknown key, a bad value) do not fail verify: none is allowed either
    assert!(
        !said.contains("build-image.service"),
        "systemd-analyze complains: {said}"
    );
    for key in [
        "Type=notify",
        "KillMode=mixed",
        "WatchdogSec=",
        "Restart=on-failure",
        "TimeoutStopSec=",
    ] {
        assert!(text.contains(&format!("\n{key}")), "{key} missing");
    }
}

/// Under systemd (stderr is the journal stream named by JOURNAL_STREAM) the daemon's lines carry
/// no timestamp of their own: the journal adds it. Elsewhere they keep theirs.
#[test]
fn journal_lines_leave_the_time_to_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let farm = Farm::new();
    for (journal, stale) in [(true, false), (false, true), (false, false)] {
        let err_file = farm.root().join(format!("err-{journal}-{stale}"));
        let f = std::fs::File::create(&err_file).unwrap();
        let m = f.metadata().unwrap();
        let mut cmd = farm.bin();
        cmd.arg("run")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(f);
        if journal {
            cmd.env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()));
        } else if stale {
            // set, but stderr was redirected elsewhere since: not the journal
            cmd.env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino() + 1));
        }
        let mut child = Guard(cmd.spawn().unwrap());
        assert!(wait_for(Duration::from_secs(20), || {
            std::fs::read_to_string(&err_file).is_ok_and(|t| t.contains("build-image "))
        }));
        sigterm(&child.0);
        assert_eq!(wait_exit(&mut child.0, Duration::from_secs(30)), Some(0));
        let text = std::fs::read_to_string(&err_file).unwrap();
        for line in text.lines() {
            assert_eq!(
                line.starts_with("[INFO ") || line.starts_with("[WARN "),
                journal,
                "journal={journal}: {line}"
            );
        }
    }
}
