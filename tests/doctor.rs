//! `build-image doctor`, run as the built binary on temp setups: a good one exits 0 with every
//! line ok (or a warning the host explains), bad ones exit 1 with FAIL lines naming the paths,
//! and doctor never creates or leaves anything behind.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_build-image"));
    c.env_remove("BUILD_IMAGE_CONFIG").env("RUST_LOG", "warn");
    c
}

#[derive(Debug, Clone, PartialEq)]
struct Line {
    status: String,
    what: String,
    detail: String,
}

#[derive(Debug)]
struct Report {
    code: i32,
    lines: Vec<Line>,
    stdout: String,
}

impl Report {
    /// The one line about `what`.
    fn line(&self, what: &str) -> &Line {
        let found: Vec<&Line> = self.lines.iter().filter(|l| l.what == what).collect();
        assert_eq!(
            found.len(),
            1,
            "one {what:?} line expected in:\n{}",
            self.stdout
        );
        found[0]
    }

    fn status(&self, what: &str) -> &str {
        &self.line(what).status
    }
}

/// Parses doctor's output: `STATUS<pad to 6>what: detail` lines, then the summary, whose numbers
/// must agree with the lines.
fn parse(code: i32, stdout: &str) -> Report {
    let all: Vec<&str> = stdout.lines().collect();
    let (summary, body) = all.split_last().expect("doctor printed nothing");
    let mut lines = Vec::new();
    for l in body {
        let (label, rest) = l.split_at(6.min(l.len()));
        let status = label.trim_end().to_string();
        assert!(
            ["ok", "WARN", "FAIL"].contains(&status.as_str()),
            "bad status in {l:?}"
        );
        assert_eq!(label.len(), 6, "status column not 6 wide in {l:?}");
        assert!(!rest.starts_with(' '), "misaligned: {l:?}");
        let (what, detail) = rest
            .split_once(": ")
            .unwrap_or_else(|| panic!("no 'what: detail' in {l:?}"));
        lines.push(Line {
            status,
            what: what.to_string(),
            detail: detail.to_string(),
        });
    }
    let count = |s: &str| lines.iter().filter(|l| l.status == s).count();
    assert_eq!(
        *summary,
        format!(
            "{} checks: {} ok, {} warnings, {} failed",
            lines.len(),
            count("ok"),
            count("WARN"),
            count("FAIL")
        ),
        "summary disagrees with the lines:\n{stdout}"
    );
    assert_eq!(code, i32::from(count("FAIL") > 0), "exit code:\n{stdout}");
    Report {
        code,
        lines,
        stdout: stdout.to_string(),
    }
}

fn doctor(config: Option<&Path>, cwd: &Path) -> Report {
    let mut cmd = bin();
    cmd.current_dir(cwd);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let out = cmd.arg("doctor").output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let code = out.status.code().expect("doctor killed by a signal");
    eprintln!(
        "doctor exit {code}\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(code, &stdout)
}

fn script(path: &Path, body: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

const SPOOL_DIRS: [&str; 8] = [
    "incoming",
    "tmp",
    "active/w1",
    "outbox",
    "rejected",
    "hosts",
    "control",
    "state/w1",
];

/// Every path under `dir`, sorted: to see that doctor changed nothing.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn root(&self) -> &Path {
        self.dir.path()
    }
    fn spool(&self) -> PathBuf {
        self.root().join("spool")
    }
    fn config(&self, toml: &str) -> PathBuf {
        let p = self.root().join("build-image.toml");
        std::fs::write(&p, toml).unwrap();
        p
    }
}

#[test]
fn good_setup_exits_0_with_every_check_ok() {
    let s = Setup::new();
    for d in SPOOL_DIRS {
        std::fs::create_dir_all(s.spool().join(d)).unwrap();
    }
    let images = s.root().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mic = s.root().join("bin/mic");
    script(&mic, "echo \"mic 1.0.test\"; exit 0", 0o755);
    let push = s.root().join("bin/push");
    script(&push, "exit 0", 0o755);
    let config = s.config(&format!(
        "[worker]\nbase_dir = {images:?}\nmic_path = {mic:?}\nsudo = false\n\
         mic_opts = [\"--copy-kernel\", \"--shell\"]\n\n\
         [spool]\ndir = {spool:?}\nworker_id = \"w1\"\n\n[hooks]\npush = {push:?}\n",
        spool = s.spool(),
    ));
    let before = tree(s.root());

    let r = doctor(Some(&config), s.root());
    assert_eq!(r.code, 0);
    assert_eq!(tree(s.root()), before, "doctor changed the tree");

    assert_eq!(r.status("config"), "ok");
    assert_eq!(
        r.line("config").detail,
        format!("{} (parsed)", config.display())
    );
    assert_eq!(r.line("mic_opts").detail, "--copy-kernel --shell");
    assert_eq!(r.status("mic"), "ok");
    assert_eq!(
        r.line("mic").detail,
        format!("{}: mic 1.0.test", mic.display())
    );
    assert_eq!(r.status("sudo"), "ok");
    assert_eq!(
        r.line("base_dir"),
        &Line {
            status: "ok".into(),
            what: "base_dir".into(),
            detail: format!("{} (writable)", images.display()),
        }
    );
    assert_eq!(r.status("spool folders"), "ok");
    assert_eq!(
        r.line("spool folders").detail,
        format!(
            "incoming/ tmp/ active/w1/ outbox/ rejected/ hosts/ control/ under {}",
            s.spool().display()
        )
    );
    assert_eq!(r.status("spool same filesystem"), "ok");
    assert_eq!(r.status("spool rename"), "ok");
    assert!(r.line("spool rename").detail.contains(".doctor-"));
    assert_eq!(r.status("state_dir"), "ok");
    assert!(
        r.line("state_dir")
            .detail
            .starts_with(&s.spool().join("state/w1").display().to_string())
    );
    assert_eq!(r.status("push"), "ok");
    assert!(
        r.line("push")
            .detail
            .starts_with(&push.display().to_string())
    );
    // The temp dir's filesystem is the host's business: a network one is only a warning here.
    assert_ne!(r.status("spool filesystem"), "FAIL");
    assert_ne!(r.status("state_dir filesystem"), "FAIL");
    // Native mode: no KVM checks.
    assert!(r.lines.iter().all(|l| l.what != "vm_ssh_key"));
    // no daemon runs: nothing to ask about leaked resources
    assert_eq!(r.status("leaked resources"), "ok");
    assert_eq!(r.lines.len(), 13, "{}", r.stdout);
}

#[test]
fn bad_native_setup_fails_naming_the_paths_and_creates_nothing() {
    let s = Setup::new();
    std::fs::create_dir_all(s.spool().join("incoming")).unwrap();
    let afile = s.root().join("afile");
    std::fs::write(&afile, "not a directory").unwrap();
    let base = afile.join("images");
    let mic = s.root().join("nowhere/mic");
    let push = s.root().join("push");
    script(&push, "exit 0", 0o644);
    let config = s.config(&format!(
        "[worker]\nbase_dir = {base:?}\nmic_path = {mic:?}\nsudo = false\n\n\
         [spool]\ndir = {spool:?}\nworker_id = \"w1\"\n\n[hooks]\npush = {push:?}\n",
        spool = s.spool(),
    ));
    let before = tree(s.root());

    let r = doctor(Some(&config), s.root());
    assert_eq!(r.code, 1);
    assert_eq!(tree(s.root()), before, "doctor changed the tree");

    let l = r.line("mic");
    assert_eq!(l.status, "FAIL");
    assert!(l.detail.contains(&mic.display().to_string()), "{l:?}");
    assert!(l.detail.contains("not found"), "{l:?}");

    let l = r.line("base_dir");
    assert_eq!(l.status, "FAIL");
    assert_eq!(
        l.detail,
        format!(
            "{} cannot be created: {} is not a directory",
            base.display(),
            afile.display()
        )
    );

    // missing folders the daemon can create are a warning, not a failure
    let l = r.line("spool folders");
    assert_eq!(l.status, "WARN");
    for missing in ["tmp", "active/w1", "outbox", "rejected"] {
        let p = s.spool().join(missing).display().to_string();
        assert!(l.detail.contains(&p), "{p} not named: {l:?}");
    }
    assert!(
        !l.detail
            .contains(&s.spool().join("incoming").display().to_string()),
        "incoming/ exists: {l:?}"
    );
    assert!(l.detail.contains("will be created"));
    // tmp/ is missing: no rename test, and nothing was created for it
    assert!(r.lines.iter().all(|l| l.what != "spool rename"));
    assert!(!s.spool().join("tmp").exists());

    let l = r.line("push");
    assert_eq!(l.status, "FAIL");
    assert!(
        l.detail
            .starts_with(&format!("{} is not executable (mode 0644)", push.display())),
        "{l:?}"
    );
    // the state dir does not exist yet: the daemon makes it, that is fine
    assert_eq!(r.status("state_dir"), "ok");
}

#[test]
fn bad_kvm_setup_fails_on_the_ssh_key_and_vm_files() {
    let s = Setup::new();
    for d in SPOOL_DIRS {
        std::fs::create_dir_all(s.spool().join(d)).unwrap();
    }
    let images = s.root().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let key = s.root().join("id_rsa");
    std::fs::write(&key, "-----BEGIN OPENSSH PRIVATE KEY-----\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let kernel = s.root().join("vm/vmlinuz");
    let base_img = s.root().join("vm/base.qcow2");
    let img_tmp = s.root().join("overlays");
    let config = s.config(&format!(
        "[worker]\nbase_dir = {images:?}\nmic_path = \"/nowhere/mic\"\nsudo = false\nuse_kvm = true\n\
         vm_accel = \"tcg\"\nvm_ssh_key = {key:?}\nvm_kernel = {kernel:?}\nvm_base_img = {base_img:?}\n\
         img_tmp = {img_tmp:?}\n\n\
         [spool]\ndir = {spool:?}\nworker_id = \"w1\"\nwatch = \"poll\"\n",
        spool = s.spool(),
    ));
    let before = tree(s.root());

    let r = doctor(Some(&config), s.root());
    assert_eq!(r.code, 1);
    assert_eq!(tree(s.root()), before, "doctor changed the tree");

    let l = r.line("vm_ssh_key");
    assert_eq!(l.status, "FAIL");
    assert!(
        l.detail
            .starts_with(&format!("{}: mode 0644", key.display())),
        "{l:?}"
    );
    assert!(l.detail.contains("chmod 600"), "{l:?}");
    for (what, path) in [("vm_kernel", &kernel), ("vm_base_img", &base_img)] {
        let l = r.line(what);
        assert_eq!(l.status, "FAIL", "{l:?}");
        assert!(
            l.detail.starts_with(&path.display().to_string()),
            "{what}: {l:?}"
        );
    }
    assert_eq!(r.status("vm_initrd"), "ok", "optional, not set");
    // builds create img_tmp: missing is fine, and doctor does not make it
    assert_eq!(r.status("img_tmp"), "ok");
    assert!(
        r.line("img_tmp")
            .detail
            .starts_with(&img_tmp.display().to_string())
    );
    assert!(!img_tmp.exists());
    // vm_accel = "tcg": /dev/kvm is not needed, whatever this host has
    assert_eq!(r.status("/dev/kvm"), "ok");
    for what in ["qemu-system-x86_64", "qemu-img", "ssh", "scp"] {
        let l = r.line(what);
        assert!(
            l.status == "ok" || l.detail.contains(what),
            "a failing probe names its program: {l:?}"
        );
    }
    // mic runs inside the guest in KVM mode: a host without it is fine
    assert_eq!(r.status("mic"), "ok");
    assert_eq!(r.status("spool folders"), "ok");
    assert_eq!(
        r.status("spool filesystem"),
        "ok",
        "watch = poll suits any fs"
    );

    // the key fixed: that line turns ok
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = doctor(Some(&config), s.root());
    assert_eq!(r.status("vm_ssh_key"), "ok");
}

#[test]
fn no_config_says_built_in_defaults_and_creates_no_spool() {
    let dir = tempfile::tempdir().unwrap();
    let r = doctor(None, dir.path());
    assert_eq!(
        r.line("config").detail,
        "built-in defaults (no --config, no BUILD_IMAGE_CONFIG)"
    );
    // ./spool does not exist: reported as to be created, not made
    assert_eq!(r.status("spool folders"), "WARN");
    assert!(r.line("spool folders").detail.contains("spool/incoming"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn fresh_setup_with_the_mic_fixture_passes() {
    // a fresh spool (nothing made yet), a temp base_dir, the fixture as mic, no push, no KVM
    let s = Setup::new();
    let images = s.root().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mic = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mic");
    let config = s.config(&format!(
        "[worker]\nbase_dir = {images:?}\nmic_path = {mic:?}\nsudo = false\n\n\
         [spool]\ndir = {spool:?}\nworker_id = \"w1\"\nwatch = \"poll\"\n",
        spool = s.spool(),
    ));
    let before = tree(s.root());

    let r = doctor(Some(&config), s.root());
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(tree(s.root()), before, "doctor changed the tree");
    assert_eq!(r.status("mic"), "ok");
    assert_eq!(
        r.line("mic").detail,
        format!("{}: mic 0.0-fixture", mic.display())
    );
    let l = r.line("spool folders");
    assert_ne!(l.status, "FAIL", "{l:?}");
    assert!(l.detail.contains("will be created"), "{l:?}");
    assert!(!s.spool().exists());
    assert!(r.lines.iter().all(|l| l.status != "FAIL"), "{}", r.stdout);

    // mic2: the other fixture name answers too
    let mic2 = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mic-image-creator");
    let config = s.config(&format!(
        "[worker]\nbase_dir = {images:?}\nmic_path = {mic2:?}\nict = \"mic2\"\nsudo = false\n\n\
         [spool]\ndir = {spool:?}\nworker_id = \"w1\"\nwatch = \"poll\"\n",
        spool = s.spool(),
    ));
    let r = doctor(Some(&config), s.root());
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(
        r.line("mic2").detail,
        format!("{}: mic-image-creator 0.0-fixture", mic2.display())
    );
}
