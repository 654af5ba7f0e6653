//! Test helpers: a temp spool + base_dir with the mic and push fixtures, the daemon run
//! in-process, and waits on conditions (never fixed sleeps).
#![allow(dead_code)]

pub mod broker;
pub mod host;
pub mod provenance;
pub mod web;
pub mod workers;

use build_image::config::Config;
use build_image::domain::Event;
use build_image::journal::Journal;
use crossbeam_channel::{Sender, bounded};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use build_image::wait::wait_for;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

pub struct Farm {
    pub dir: tempfile::TempDir,
    pub cfg: Config,
}

impl Farm {
    /// A spool, a base_dir, the mic fixture (no sudo), and the push fixture copied beside it.
    pub fn new() -> Farm {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let push = root.join("hook/push");
        std::fs::create_dir_all(root.join("hook")).unwrap();
        std::fs::copy(fixtures().join("push"), &push).unwrap();
        let toml = format!(
            r#"
[worker]
base_dir = "{base}"
base_url = "http://img.test/images"
mic_path = "{mic}"
sudo = false
workers = 2
timeout = 30
grace = 30

[spool]
dir = "{spool}"
worker_id = "w1"
poll_interval_ms = 100
min_age_ms = 50

[hooks]
push = "{push}"
timeout = 5
"#,
            base = root.join("images").display(),
            mic = fixtures().join("mic").display(),
            spool = root.join("spool").display(),
            push = push.display(),
        );
        let cfg = Config::parse(&toml, Path::new("test.toml")).expect("test config");
        Farm { dir, cfg }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }
    pub fn spool(&self) -> PathBuf {
        self.cfg.spool.dir.clone()
    }
    pub fn base(&self) -> PathBuf {
        self.cfg.worker.base_dir.clone()
    }
    pub fn incoming(&self) -> PathBuf {
        self.spool().join("incoming")
    }
    pub fn outbox(&self) -> PathBuf {
        self.spool().join("outbox")
    }
    pub fn rejected(&self) -> PathBuf {
        self.spool().join("rejected")
    }
    pub fn active(&self) -> PathBuf {
        self.spool().join("active/w1")
    }
    pub fn hook_dir(&self) -> PathBuf {
        self.root().join("hook")
    }

    /// Starts the daemon in-process.
    pub fn start(&self) -> Daemon {
        let (tx, rx) = bounded(1);
        let cfg = self.cfg.clone();
        let handle = std::thread::spawn(move || build_image::daemon::run(cfg, rx));
        let (inc, act) = (self.incoming(), self.active());
        assert!(
            wait_for(Duration::from_secs(10), || inc.is_dir() && act.is_dir()),
            "daemon did not create the spool"
        );
        Daemon {
            stop: tx,
            handle: Some(handle),
        }
    }

    /// Drops a workitem the safe way (tmp + rename).
    pub fn drop_json(&self, name: &str, v: &Value) {
        build_image::cli::drop_file(&self.spool(), name, &serde_json::to_vec_pretty(v).unwrap())
            .expect("drop");
    }

    pub fn outbox_file(&self, name: &str) -> Option<Value> {
        let bytes = std::fs::read(self.outbox().join(name)).ok()?;
        Some(serde_json::from_slice(&bytes).expect("outbox file is JSON"))
    }

    /// Waits for outbox/<name>, and parses it.
    pub fn wait_outbox(&self, name: &str, timeout: Duration) -> Value {
        let p = self.outbox().join(name);
        assert!(
            wait_for(timeout, || p.exists()),
            "no outbox/{name} within {timeout:?}; outbox has {:?}",
            list(&self.outbox())
        );
        self.outbox_file(name).unwrap()
    }

    /// Pushes recorded by the push fixture, in order: (status, stdin JSON, env text).
    pub fn pushes(&self) -> Vec<(String, Value, String)> {
        let dir = self.hook_dir().join("pushes");
        let mut names: Vec<String> = list(&dir)
            .into_iter()
            .filter(|n| n.ends_with(".json"))
            .collect();
        names.sort_by_key(|n| {
            n.split('-')
                .next()
                .unwrap_or("0")
                .parse::<u128>()
                .unwrap_or(0)
        });
        names
            .into_iter()
            .map(|n| {
                let status = n
                    .trim_end_matches(".json")
                    .split('-')
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                let v: Value = serde_json::from_slice(&std::fs::read(dir.join(&n)).unwrap())
                    .expect("push stdin is JSON");
                let env = std::fs::read_to_string(dir.join(n.replace(".json", ".env")))
                    .unwrap_or_default();
                (status, v, env)
            })
            .collect()
    }

    /// The pushes made for one image_id.
    pub fn pushes_for(&self, image_id: &str) -> Vec<(String, Value)> {
        self.pushes()
            .into_iter()
            .filter(|(_, _, env)| env.contains(&format!("BUILD_IMAGE_ID={image_id}\n")))
            .map(|(s, v, _)| (s, v))
            .collect()
    }

    /// How many pushes were made for image_id, from their `.env` records only (cheap: the
    /// workitems on their stdin are not read).
    pub fn push_count(&self, image_id: &str) -> usize {
        let dir = self.hook_dir().join("pushes");
        let want = format!("BUILD_IMAGE_ID={image_id}\n");
        list(&dir)
            .into_iter()
            .filter(|n| n.ends_with(".env"))
            .filter(|n| std::fs::read_to_string(dir.join(n)).is_ok_and(|env| env.contains(&want)))
            .count()
    }

    /// Waits until `n` pushes were made for image_id, and returns them.
    pub fn wait_pushes(&self, image_id: &str, n: usize) -> Vec<(String, Value)> {
        assert!(
            wait_for(Duration::from_secs(30), || self.pushes_for(image_id).len()
                >= n),
            "fewer than {n} pushes for {image_id}: {:?}",
            self.pushes_for(image_id)
                .into_iter()
                .map(|p| p.0)
                .collect::<Vec<_>>()
        );
        self.pushes_for(image_id)
    }

    /// All events of the log (the daemon must be stopped).
    pub fn events(&self) -> Vec<Event> {
        let j = open_journal(&self.cfg.state_dir());
        j.since(0).collect::<Result<_, _>>().expect("read log")
    }
}

pub fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every file below `dir`, relative, sorted.
pub fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

pub struct Daemon {
    stop: Sender<()>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Daemon {
    /// Asks it to stop and waits; returns its result.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.handle
            .take()
            .unwrap()
            .join()
            .expect("daemon thread panicked")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.stop.send(());
            let _ = h.join();
        }
    }
}

/// A minimal valid workitem (new API, bare fields).
pub fn workitem(id: &str, ks: &str) -> Value {
    serde_json::json!({
        "image": {"image_id": id, "kickstart": ks, "image_type": "loop", "name": format!("img-{id}"), "arch": "i586"},
        "msg": []
    })
}

/// The mic argv the fixture printed into a job log.
pub fn fixture_argv(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.strip_prefix("mic-fixture arg: "))
        .map(str::to_string)
        .collect()
}

pub fn init_log() {
    let _ = env_logger::builder()
        .is_test(true)
        .filter_level(log::LevelFilter::Info)
        .try_init();
}

/// Is the process alive (present and not a zombie)?
pub fn alive(pid: i32) -> bool {
    build_image::process::pid_alive(pid)
}

/// The pids the mic fixture printed into a job log (its own, then its child's).
pub fn fixture_pids(log: &str) -> Vec<i32> {
    log.lines()
        .filter_map(|l| {
            l.strip_prefix("mic-fixture pid: ")
                .or_else(|| l.strip_prefix("mic-fixture child pid: "))
        })
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

impl Farm {
    /// Writes the farm's config as a TOML file, for the binary.
    pub fn config_file(&self) -> PathBuf {
        let p = self.root().join("build-image.toml");
        // tmp + rename: a process started just before reads a whole file, never a truncated one
        let tmp = self.root().join(format!(
            ".build-image.toml.{:?}.tmp",
            std::thread::current().id()
        ));
        std::fs::write(&tmp, toml::to_string(&self.cfg).expect("config as TOML")).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        p
    }

    /// The binary with this farm's config.
    pub fn bin(&self) -> std::process::Command {
        let mut c = bin();
        c.arg("--config").arg(self.config_file());
        c
    }
}

/// The built binary, with no config from the environment.
pub fn bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_build-image"));
    c.env_remove("BUILD_IMAGE_CONFIG").env("RUST_LOG", "warn");
    c
}

/// Runs a command to its end: (exit code, stdout, stderr).
pub fn output(cmd: &mut std::process::Command) -> (i32, String, String) {
    let out = cmd.output().expect("run the binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits for a child to exit; kills it if it does not in time.
pub fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let mut status = None;
    let done = wait_for(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if !done {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    status.and_then(|s| s.code())
}

pub fn sigterm(child: &std::process::Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

/// A child process that is SIGKILLed when dropped (so a failing test leaves no daemon behind).
pub struct Guard(pub std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Farm {
    /// Waits until the mic fixture of `image_id` (default name `img-<id>`) is sleeping, i.e. a
    /// build is running; returns its job log path.
    pub fn wait_mic_running(&self, image_id: &str) -> PathBuf {
        let log = self
            .base()
            .join(format!("requests/{image_id}/img-{image_id}.log"));
        assert!(
            wait_for(Duration::from_secs(60), || std::fs::read_to_string(&log)
                .is_ok_and(|l| l.contains("mic-fixture: sleeping"))),
            "mic of {image_id} never ran"
        );
        log
    }

    /// Starts the binary as a daemon with this farm's config, and waits for its spool.
    pub fn start_binary(&self) -> Guard {
        let child = self
            .bin()
            .arg("run")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the daemon");
        let inc = self.incoming();
        assert!(
            wait_for(Duration::from_secs(20), || inc.is_dir()),
            "daemon did not set up the spool"
        );
        Guard(child)
    }
}

/// A mount that is undone when dropped.
pub struct Mount(pub PathBuf);

impl Mount {
    /// Mounts with `mount ARGS... DIR`; needs root (CI runs as root). Outside CI, a machine
    /// where mounting is not allowed skips the test (returns None); in CI that is a failure.
    pub fn new(args: &[&str], dir: &Path) -> Option<Mount> {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(args)
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Mount(dir.to_path_buf())),
            other => {
                let why = format!("cannot mount {args:?} on {}: {other:?}", dir.display());
                assert!(std::env::var_os("CI").is_none(), "{why}");
                eprintln!("SKIPPED: {why}");
                None
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

impl Farm {
    /// Waits until the log holds at least `n` pushed events: pushes run apart from the builds,
    /// so an answer in the outbox does not mean its pushes are recorded yet.
    pub fn wait_pushed_events(&self, n: usize) {
        assert!(
            wait_for(Duration::from_secs(60), || {
                let (_, out, _) = output(self.bin().args(["events", "--kind", "pushed", "--json"]));
                event_lines(&out).count() >= n
            }),
            "fewer than {n} pushed events"
        );
    }
}

/// Is this a BUILDING push? (It runs apart from the build, so its record can land anywhere
/// after `started`: tests of the order of a job's events leave it out.)
pub fn is_building_push(e: &Event) -> bool {
    matches!(
        e.kind,
        build_image::domain::EventKind::Pushed {
            status: build_image::domain::Status::Building,
            ..
        }
    )
}

/// How many times mic ran for `image_id` (default name `img-<id>`), from its job log.
pub fn mic_runs(farm: &Farm, image_id: &str) -> usize {
    std::fs::read_to_string(
        farm.base()
            .join(format!("requests/{image_id}/img-{image_id}.log")),
    )
    .map(|l| l.matches("mic-fixture argc:").count())
    .unwrap_or(0)
}

/// Builds run for every job folder under base_dir/requests (all workers).
pub fn mic_runs_total(farm: &Farm) -> usize {
    let dir = farm.base().join("requests");
    list(&dir)
        .iter()
        .map(|id| {
            std::fs::read_to_string(dir.join(id).join(format!("img-{id}.log")))
                .map(|l| l.matches("mic-fixture argc:").count())
                .unwrap_or(0)
        })
        .sum()
}

/// Is this line an export's trailer (a JSON object with `trailer` and no `seq`)?
pub fn is_trailer(line: &str) -> bool {
    serde_json::from_str::<Value>(line)
        .is_ok_and(|v| v.get("trailer").is_some() && v.get("seq").is_none())
}

/// The event lines of an export (`events --json`, an archive), checked to end with the
/// trailer that counts and digests them; the trailer left out.
pub fn export_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let last = lines.pop().unwrap_or_default();
    assert!(
        is_trailer(&last),
        "the last line is not the trailer: {last:?}"
    );
    let trailer: Value = serde_json::from_str(&last).unwrap();
    assert_eq!(trailer["trailer"], "build-image export");
    assert_eq!(
        trailer["events"].as_u64(),
        Some(lines.len() as u64),
        "{last}"
    );
    assert_eq!(trailer["sha256"], lines_sha256(&lines).as_str(), "{last}");
    lines
}

/// The sha256 (hex) of lines, each with its newline: what a trailer says of them.
fn lines_sha256(lines: &[String]) -> String {
    use sha2::Digest;
    let mut sha = sha2::Sha256::new();
    for l in lines {
        sha.update(l.as_bytes());
        sha.update(b"\n");
    }
    sha.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The events of an export, as JSON values (trailer checked, left out).
pub fn export_events(text: &str) -> Vec<Value> {
    export_lines(text)
        .iter()
        .map(|l| serde_json::from_str(l).expect("an event line is JSON"))
        .collect()
}

/// Event lines made a whole export again: the lines and their trailer.
pub fn whole_export(lines: &[String]) -> String {
    let mut out: String = lines.iter().map(|l| format!("{l}\n")).collect();
    out.push_str(&format!(
        "{{\"trailer\":\"build-image export\",\"events\":{},\"sha256\":\"{}\"}}\n",
        lines.len(),
        lines_sha256(lines)
    ));
    out
}

/// The event lines of an `events --json` output read while it may still be written to (the
/// trailer, if there, left out).
pub fn event_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().filter(|l| !is_trailer(l))
}

/// Opens the log of a state dir a daemon has just closed: sled releases its lock a little after
/// the last handle is dropped (spacejam/sled#1234, and later still on a FUSE file system), so a
/// `Locked` is waited out (up to 10 s), as the daemon's own start does.
pub fn open_journal(dir: &Path) -> Journal {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Journal::open(dir) {
            Err(build_image::journal::JournalError::Locked(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => return other.unwrap_or_else(|e| panic!("open log {}: {e}", dir.display())),
        }
    }
}

/// Opens the sled database of a state dir a daemon has just closed: sled releases its lock a
/// little after the last handle is dropped (spacejam/sled#1234), so the lock is waited for (up
/// to 10 s), as the daemon's own start does.
pub fn open_sled(dir: &Path) -> sled::Db {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sled::open(dir) {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => return other.unwrap(),
        }
    }
}
