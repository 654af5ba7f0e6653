//! KVM mode. The checks made before a guest is started run everywhere; the rest boot a real
//! guest (scripts/make-test-guest.sh: Debian minbase + sshd + the cloud kernel, the mic stand-in
//! as /usr/bin/mic) under TCG, so they are `#[ignore]`d for a plain `cargo test` and run by
//! `.ci/run` as `cargo test --test kvm -- --ignored --test-threads=1`.

mod common;

use build_image::config::{VmAccel, WorkerConfig};
use build_image::imaging::{BuildEnd, Builder, kvm};
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The test guest, built (or found up to date) by the script.
struct Guest {
    dir: PathBuf,
    has_9p: bool,
}

fn guest() -> Guest {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-test-guest.sh");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/make-test-guest.sh");
    assert!(
        out.status.success(),
        "scripts/make-test-guest.sh failed (it needs root, debootstrap, e2fsprogs, qemu-utils):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{} ({:.0} s)", text.trim(), started.elapsed().as_secs_f64());
    let dir = text
        .lines()
        .filter_map(|l| l.strip_prefix("make-test-guest: "))
        .filter_map(|l| l.split_whitespace().next())
        .map(PathBuf::from)
        .find(|p| p.join("base.qcow2").is_file())
        .expect("the script names the guest directory");
    let has_9p = std::fs::read_to_string(dir.join("has-9p"))
        .map(|s| s.trim() == "yes")
        .unwrap_or(false);
    Guest { dir, has_9p }
}

/// `vm_warm` of the farms of the tests that run with either (`BUILD_IMAGE_TEST_VM_WARM`, 0 when
/// unset): `.ci/run` runs the real-guest tests with 0 and again with 1 (issue 24).
fn vm_warm() -> u64 {
    std::env::var("BUILD_IMAGE_TEST_VM_WARM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The warm guests of `img_tmp` that passed their health check and wait (their own log says
/// so and still exists: a taken guest's log is copied into the job's and removed with it only
/// at its teardown, so a taken one counts until then).
fn warm_ready(w: &WorkerConfig) -> Vec<String> {
    list(&w.img_tmp)
        .into_iter()
        .filter(|n| n.starts_with("build-image-vm-warm-") && n.ends_with(".boot"))
        .filter(|n| {
            std::fs::read_to_string(w.img_tmp.join(n))
                .is_ok_and(|t| t.contains("health check passed: ready"))
        })
        .map(|n| n.trim_end_matches(".boot").to_string())
        .collect()
}

/// With warm guests: waits until `n` are ready (a build then takes one, not a boot of its own).
fn wait_warm(w: &WorkerConfig, n: usize) {
    if w.vm_warm == 0 {
        return;
    }
    let ok = wait_for(Duration::from_secs(900), || warm_ready(w).len() >= n);
    assert!(
        ok,
        "{n} warm guest(s) never got ready; img_tmp: {:?}",
        list(&w.img_tmp)
    );
}

/// With warm guests, the build took one (its log says which, and its boot before the take).
fn assert_took_warm(w: &WorkerConfig, log: &str) {
    if w.vm_warm > 0 {
        assert!(log.contains("took the warm guest "), "{log}");
        assert!(
            log.contains("  | ") && log.contains("health check passed: ready"),
            "{log}"
        );
    }
}

/// A farm whose builds run in the test guest, under TCG (one build slot: 2 cores).
fn kvm_farm(g: &Guest) -> Farm {
    init_log();
    let mut farm = Farm::new();
    let root = farm.root().to_path_buf();
    let w = &mut farm.cfg.worker;
    w.use_kvm = true;
    w.mic_path = None; // /usr/bin/mic, in the guest
    w.sudo = false;
    w.workers = 1;
    w.timeout = 300;
    w.img_tmp = root.join("vmtmp");
    w.vm_base_img = Some(g.dir.join("base.qcow2"));
    w.vm_kernel = Some(g.dir.join("vmlinuz"));
    w.vm_initrd = Some(g.dir.join("initrd.img"));
    w.vm_ssh_key = Some(g.dir.join("id_ed25519"));
    w.vm_append = "root=/dev/vda rw console=ttyS0 panic=1".into();
    w.vm_accel = VmAccel::Tcg;
    w.vm_wait = 240;
    w.vm_warm = vm_warm();
    w.mic_cachedir = root.join("mic-cache");
    // one guest per job: an infrastructure failure is not tried again here
    w.infra_retries = 0;
    farm
}

/// GET `path` from the farm's HTTP server: the whole answer (head and body).
fn http_get(farm: &Farm, path: &str) -> String {
    common::web::get(&common::web::http_addr(farm), path).body
}

/// What a KVM build left in img_tmp (nothing, once it is over).
fn vm_leftovers(w: &WorkerConfig) -> Vec<String> {
    list(&w.img_tmp)
        .into_iter()
        .filter(|n| n.contains("build-image-vm-"))
        .collect()
}

/// Is the process alive (present and not a zombie)?
fn running(pid: i32) -> bool {
    alive(pid)
}

/// The qemu pids a job log names ("guest running: qemu pid N, ...").
fn qemu_pids(log: &str) -> Vec<i32> {
    log.lines()
        .filter_map(|l| l.split("qemu pid ").nth(1))
        .filter_map(|r| r.split(',').next()?.trim().parse().ok())
        .collect()
}

fn job_log(farm: &Farm, id: &str, name: &str) -> String {
    std::fs::read_to_string(
        farm.base()
            .join("requests")
            .join(id)
            .join(format!("{name}.log")),
    )
    .unwrap_or_default()
}

fn kvm_item(id: &str, ks: &str, extra: &[&str]) -> Value {
    json!({
        "image": {"image_id": id, "kickstart": ks, "image_type": "loop",
                  "name": format!("kvm-{id}"), "arch": "i586", "extra_opts": extra},
        "msg": []
    })
}

// ---- before any guest: clear errors, nothing left behind -------------------------------------

fn spec(id: &str) -> build_image::domain::workitem::Spec {
    build_image::domain::workitem::normalise(&kvm_item(id, "# ks\n", &[])).unwrap()
}

/// Runs the KVM builder directly and returns its error.
fn preflight_error(w: &WorkerConfig, id: &str) -> String {
    let (_tx, rx) = crossbeam_channel::bounded::<()>(1);
    let spec = spec(id);
    let prepared = build_image::imaging::prepare(w, &spec, 1).unwrap();
    let registry = build_image::process::Registry::none();
    match kvm::KvmBuilder::new(w.clone()).build(&spec, &prepared, &rx, &registry) {
        BuildEnd::Finished {
            result: false,
            error: Some(e),
            ..
        } => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn kvm_missing_things_are_clear_errors_and_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    std::fs::write(p.join("vmlinuz"), b"k").unwrap();
    std::fs::write(p.join("base.qcow2"), b"b").unwrap();
    std::fs::write(p.join("key"), b"k").unwrap();
    std::fs::set_permissions(p.join("key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let good = WorkerConfig {
        base_dir: p.join("images"),
        use_kvm: true,
        img_tmp: p.join("vmtmp"),
        vm_base_img: Some(p.join("base.qcow2")),
        vm_kernel: Some(p.join("vmlinuz")),
        vm_ssh_key: Some(p.join("key")),
        vm_accel: VmAccel::Tcg,
        ..WorkerConfig::default()
    };

    let w = WorkerConfig {
        vm_base_img: Some(p.join("nope.qcow2")),
        ..good.clone()
    };
    let e = preflight_error(&w, "a1");
    assert!(
        e.contains("base image (vm_base_img)")
            && e.contains(&*p.join("nope.qcow2").to_string_lossy()),
        "{e}"
    );
    let w = WorkerConfig {
        vm_kernel: Some(p.join("no-kernel")),
        ..good.clone()
    };
    let e = preflight_error(&w, "a2");
    assert!(
        e.contains("guest kernel (vm_kernel)") && e.contains("no-kernel"),
        "{e}"
    );
    let w = WorkerConfig {
        vm_initrd: Some(p.join("no-initrd")),
        ..good.clone()
    };
    let e = preflight_error(&w, "a3");
    assert!(e.contains("vm_initrd") && e.contains("no-initrd"), "{e}");
    let w = WorkerConfig {
        vm_ssh_key: None,
        ..good.clone()
    };
    let e = preflight_error(&w, "a4");
    assert!(e.contains("vm_ssh_key") && e.contains("not set"), "{e}");
    let w = WorkerConfig {
        vm_ssh_key: Some(p.join("no-key")),
        ..good.clone()
    };
    let e = preflight_error(&w, "a5");
    assert!(
        e.contains("ssh key (vm_ssh_key)") && e.contains("no-key"),
        "{e}"
    );
    std::fs::set_permissions(p.join("key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = preflight_error(&good, "a6");
    assert!(
        e.contains("ssh key (vm_ssh_key)") && e.contains("0644") && e.contains("chmod 600"),
        "{e}"
    );
    std::fs::set_permissions(p.join("key"), std::fs::Permissions::from_mode(0o600)).unwrap();

    // vm_accel = "kvm" where /dev/kvm cannot run a guest (as on this CI host: no vmx/svm)
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let kvm_host = kvm::commands::cpu_has_virt(&cpuinfo)
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
    if !kvm_host {
        let w = WorkerConfig {
            vm_accel: VmAccel::Kvm,
            ..good.clone()
        };
        let e = preflight_error(&w, "a7");
        assert!(
            e.contains("/dev/kvm is not usable") && e.contains("vm_accel"),
            "{e}"
        );
    }

    // the error is in the job log too; nothing was made in img_tmp
    let log = std::fs::read_to_string(p.join("images/requests/a6/kvm-a6.log")).unwrap();
    assert!(log.contains("error: ssh key (vm_ssh_key)"), "{log}");
    // a directory is no base image: refused before anything runs
    std::fs::create_dir(p.join("base-is-a-dir")).unwrap();
    let w = WorkerConfig {
        vm_base_img: Some(p.join("base-is-a-dir")),
        ..good.clone()
    };
    let e = preflight_error(&w, "a8");
    assert!(
        e.contains("base image (vm_base_img)") && e.contains("neither a file nor a block device"),
        "{e}"
    );
    assert!(vm_leftovers(&good).is_empty(), "{:?}", vm_leftovers(&good));
}

#[test]
fn kvm_bad_base_image_fails_at_the_overlay_and_removes_it() {
    // a base that qemu-img cannot read (a qcow2 header of an unknown version): the overlay step
    // fails, nothing stays in img_tmp
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    if Command::new("qemu-img").arg("--version").output().is_err() {
        eprintln!("qemu-img not installed: skipped");
        return;
    }
    std::fs::write(p.join("vmlinuz"), b"k").unwrap();
    std::fs::write(
        p.join("base-unreadable.qcow2"),
        b"QFI\xfb\x00\x00\x00\x63not a real image header",
    )
    .unwrap();
    std::fs::write(p.join("key"), b"k").unwrap();
    std::fs::set_permissions(p.join("key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let w = WorkerConfig {
        base_dir: p.join("images"),
        use_kvm: true,
        img_tmp: p.join("vmtmp"),
        vm_base_img: Some(p.join("base-unreadable.qcow2")),
        vm_kernel: Some(p.join("vmlinuz")),
        vm_ssh_key: Some(p.join("key")),
        vm_accel: VmAccel::Tcg,
        ..WorkerConfig::default()
    };
    let e = preflight_error(&w, "b1");
    assert!(
        e.contains("qemu-img info") && e.contains("base-unreadable.qcow2"),
        "{e}"
    );
    assert!(vm_leftovers(&w).is_empty(), "{:?}", vm_leftovers(&w));
}

// ---- with a real guest -------------------------------------------------------------------------

/// The guest is gone and img_tmp is clean, once the job is answered.
fn assert_cleaned_up(farm: &Farm, log: &str) {
    let pids = qemu_pids(log);
    assert!(!pids.is_empty(), "no qemu pid in the job log:\n{log}");
    for pid in pids {
        assert!(
            wait_for(Duration::from_secs(10), || !running(pid)),
            "qemu pid {pid} still runs"
        );
    }
    let w = &farm.cfg.worker;
    // with warm guests the pool's next ones (booting or ready) are no build's leftovers
    let ours = |v: Vec<String>| -> Vec<String> {
        v.into_iter()
            .filter(|n| {
                w.vm_warm == 0
                    || !n.starts_with("build-image-vm-warm-")
                    || n.split('.').next().is_some_and(|stem| log.contains(stem))
            })
            .collect()
    };
    assert!(
        wait_for(Duration::from_secs(90), || ours(vm_leftovers(w)).is_empty()),
        "left in img_tmp: {:?}",
        ours(vm_leftovers(w))
    );
}

#[test]
#[ignore = "boots a real guest under TCG (minutes); .ci/run runs it"]
fn kvm_build_in_a_real_guest_through_the_daemon() {
    let _ = common::provenance::python(); // before the guest: a missing verifier fails at once
    let g = guest();
    let mut farm = kvm_farm(&g);
    farm.cfg.http.listen = Some("127.0.0.1:0".into());
    // mic writes its package list (the provenance names it)
    farm.cfg.worker.mic_opts = vec!["--record-pkgs=name".into()];
    let daemon = farm.start();
    wait_warm(&farm.cfg.worker, 1);
    let started = Instant::now();
    // mic (and its stand-in) take options only: the hostile words ride in option values
    let hostile = [
        "--pkgmgr=zypp",
        "--x='; touch /x'",
        "--y=$(touch /tmp/pwned) `id`; reboot",
        "--z=a\"b\\ c",
    ];
    farm.drop_json(
        "k1.json",
        &kvm_item("k1", "# kickstart\n# mic-fixture: bytes 70000\n", &hostile),
    );
    let out = farm.wait_outbox("k1.json", Duration::from_secs(900));
    eprintln!(
        "kvm build answered in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    // the guest's console is kept in the job folder and linked from the job page; its boot
    // time is in the build's end and in /metrics
    let console = farm.base().join("requests/k1/console.log");
    assert!(
        std::fs::metadata(&console).is_ok_and(|m| m.len() > 0),
        "no console.log"
    );
    let (_, show, _) = output(farm.bin().args(["show", "k1", "--json"]));
    let show: Value = serde_json::from_str(&show).unwrap();
    let boot = show["job"]["boot_seconds"].as_f64().unwrap_or_default();
    if farm.cfg.worker.vm_warm == 0 {
        assert!(boot > 0.0, "{show:#}");
    } else {
        assert_eq!(
            boot, 0.0,
            "a warm guest: the build waited for no boot: {show:#}"
        );
    }
    let page = http_get(&farm, "/jobs/1");
    assert!(
        page.contains("href=\"http://img.test/images/requests/k1/console.log\""),
        "{page}"
    );
    let metrics = http_get(&farm, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == "build_image_guest_boot_seconds_count 1"),
        "{metrics}"
    );
    daemon.stop().unwrap();

    let img = &out["image"];
    let log = job_log(&farm, "k1", "kvm-k1");
    assert_eq!(out["result"], json!(true), "{out:#}\n{log}");
    assert_eq!(img["result"], json!(true));
    assert_eq!(
        img["files_url"],
        json!("http://img.test/images/requests/k1")
    );
    assert_eq!(
        img["image_url"],
        json!("http://img.test/images/requests/k1/kvm-k1.img")
    );
    assert_eq!(
        img["logfile_url"],
        json!("http://img.test/images/requests/k1/kvm-k1.log")
    );
    assert!(img.get("error").is_none_or(|e| e.is_null()), "{out:#}");

    // the image was copied back from the guest, and the job dir opened up as the original did
    let dir = farm.base().join("requests/k1");
    let image = dir.join("kvm-k1.img");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 70000);
    assert!(dir.join("kvm-k1.packages").is_file());
    let mode = std::fs::metadata(&image).unwrap().permissions().mode();
    assert_eq!(mode & 0o066, 0o066, "{mode:o}");

    // mic ran in the guest with its real argument vector: hostile words arrived whole
    let argv = fixture_argv(&log);
    assert_eq!(
        argv,
        vec![
            "create",
            "loop",
            "/var/tmp/build-image/k1/kvm-k1.ks",
            "--arch=i586",
            "--outdir=/var/tmp/build-image/k1",
            "--pkgmgr=zypp",
            "--x='; touch /x'",
            "--y=$(touch /tmp/pwned) `id`; reboot",
            "--z=a\"b\\ c",
            "--record-pkgs=name",
        ],
        "{log}"
    );

    // the answer's hash is the copied image's; SHA256SUMS checks the folder
    let sha256sum = |f: &Path| {
        let out = Command::new("sha256sum").arg(f).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()[..64].to_string()
    };
    assert_eq!(img["image_sha256"], json!(sha256sum(&image)), "{out:#}");
    let check = Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    // the provenance: valid for the in-toto framework, mode kvm, the guest's mic, the base
    // image with its sha256, the package list
    assert_eq!(
        img["provenance_url"],
        json!("http://img.test/images/requests/k1/provenance.json")
    );
    let (code, text) = common::provenance::check_statement(&dir.join("provenance.json"));
    assert_eq!(code, 0, "{text}");
    let p: Value =
        serde_json::from_slice(&std::fs::read(dir.join("provenance.json")).unwrap()).unwrap();
    let int = &p["predicate"]["buildDefinition"]["internalParameters"];
    assert_eq!(int["mode"], json!("kvm"), "{p:#}");
    assert_eq!(int["mic"]["version"], json!("mic 0.0-fixture"), "{p:#}");
    let base = g.dir.join("base.qcow2");
    assert_eq!(
        int["base_image"],
        json!({"path": base.to_str().unwrap(), "sha256": sha256sum(&base)}),
        "{p:#}"
    );
    let subjects = p["subject"].as_array().unwrap();
    assert!(
        subjects
            .iter()
            .any(|s| s["name"] == json!("kvm-k1.img")
                && s["digest"]["sha256"] == img["image_sha256"]),
        "{p:#}"
    );
    let deps = p["predicate"]["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .unwrap();
    assert!(
        deps.iter().any(|d| d["name"] == json!("kvm-k1.packages")
            && d["digest"]["sha256"] == json!(sha256sum(&dir.join("kvm-k1.packages")))),
        "{p:#}"
    );

    // the job log tells every step, with timestamps
    for step in [
        "accel tcg (vm_accel = \"tcg\")",
        "$ qemu-img info",
        "$ qemu-img create -f qcow2 -F qcow2 -b",
        "$ qemu-system-x86_64 -machine 'accel=tcg'",
        "guest's ssh answered after",
        "$ ssh ",
        "$ scp ",
        "/usr/bin/mic exited with status 0 in the guest",
        "sync; poweroff",
        "overlay ",
    ] {
        assert!(log.contains(step), "job log lacks {step:?}:\n{log}");
    }
    assert!(log.lines().filter(|l| l.starts_with("[20")).count() > 10);
    assert_took_warm(&farm.cfg.worker, &log);
    assert_cleaned_up(&farm, &log);

    let pushes: Vec<String> = farm.wait_pushes("k1", 2).into_iter().map(|p| p.0).collect();
    assert_eq!(pushes, vec!["BUILDING", "DONE"]);
}

#[test]
#[ignore = "boots a real guest under TCG (minutes); .ci/run runs it"]
fn kvm_mic_failing_in_the_guest_is_an_error_and_the_guest_is_cleaned_up() {
    let g = guest();
    let farm = kvm_farm(&g);
    let _daemon = farm.start();
    wait_warm(&farm.cfg.worker, 1);
    farm.drop_json("k2.json", &kvm_item("k2", "# mic-fixture: fail 3\n", &[]));
    let out = farm.wait_outbox("k2.json", Duration::from_secs(900));
    let log = job_log(&farm, "k2", "kvm-k2");
    assert_eq!(out["result"], json!(false), "{out:#}");
    let err = out["image"]["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("/usr/bin/mic failed in the guest: exited with status 3")
            && err.contains("mic-fixture: fail 3"),
        "{err}"
    );
    // the error as the answer has it, mic's own line first, on one escaped line of the job log
    assert!(
        log.contains(
            "] error: Error <creator>: failed to create image (mic-fixture: fail 3)\\n\
             /usr/bin/mic failed in the guest: exited with status 3\n"
        ),
        "{log}"
    );
    assert_eq!(out["image"]["failure"], json!("image"), "{out:#}");
    assert_took_warm(&farm.cfg.worker, &log);
    assert_cleaned_up(&farm, &log);
}

#[test]
#[ignore = "boots a real guest under TCG (minutes); .ci/run runs it"]
fn kvm_ssh_never_coming_up_is_an_error_and_the_guest_is_killed() {
    let g = guest();
    let mut farm = kvm_farm(&g);
    farm.cfg.worker.vm_wait = 3; // TCG needs ~20 s to reach sshd
    let _daemon = farm.start();
    farm.drop_json("k3.json", &kvm_item("k3", "# ks\n", &[]));
    let out = farm.wait_outbox("k3.json", Duration::from_secs(300));
    let log = job_log(&farm, "k3", "kvm-k3");
    let err = out["image"]["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("ssh on 127.0.0.1:")
            && err.contains("did not answer within vm_wait = 3 s")
            && err.contains("id_ed25519"),
        "{err}"
    );
    assert!(log.contains("guest console (last lines):"), "{log}");
    assert!(log.contains("killed"), "{log}");
    assert_eq!(out["image"]["failure"], json!("infrastructure"), "{out:#}");
    assert!(farm.base().join("requests/k3/console.log").is_file());
    assert_cleaned_up(&farm, &log);
}

#[test]
#[ignore = "boots a real guest under TCG (minutes); .ci/run runs it"]
fn kvm_mic_hanging_past_the_timeout_is_killed_and_the_guest_cleaned_up() {
    let g = guest();
    let mut farm = kvm_farm(&g);
    farm.cfg.worker.timeout = 40; // per command: mic over ssh is cut off after 40 s
    let _daemon = farm.start();
    wait_warm(&farm.cfg.worker, 1);
    farm.drop_json(
        "k6.json",
        &kvm_item("k6", "# mic-fixture: sleep 600\n", &[]),
    );
    let out = farm.wait_outbox("k6.json", Duration::from_secs(600));
    let log = job_log(&farm, "k6", "kvm-k6");
    let err = out["image"]["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("/usr/bin/mic failed in the guest: timed out after 40 s"),
        "{err}\n{log}"
    );
    assert!(log.contains("mic-fixture: sleeping 600 s"), "{log}");
    assert_took_warm(&farm.cfg.worker, &log);
    assert_cleaned_up(&farm, &log);
}

#[test]
#[ignore = "boots a real guest under TCG (minutes); .ci/run runs it"]
fn kvm_build_cancelled_by_a_stopping_daemon_cleans_up_the_guest() {
    let g = guest();
    let mut farm = kvm_farm(&g);
    farm.cfg.worker.grace = 1; // a stop kills running builds after 1 s
    let daemon = farm.start();
    wait_warm(&farm.cfg.worker, 1);
    farm.drop_json(
        "k7.json",
        &kvm_item("k7", "# mic-fixture: sleep 600\n", &[]),
    );
    // (stop waiting too if the job ended without mic starting: the guest never came up)
    assert!(
        wait_for(Duration::from_secs(600), || job_log(&farm, "k7", "kvm-k7")
            .contains("mic-fixture: sleeping")
            || farm.outbox_file("k7.json").is_some()),
        "mic never started in the guest:\n{}",
        job_log(&farm, "k7", "kvm-k7")
    );
    assert!(
        job_log(&farm, "k7", "kvm-k7").contains("mic-fixture: sleeping"),
        "mic never started in the guest:\n{}",
        job_log(&farm, "k7", "kvm-k7")
    );
    daemon.stop().unwrap();
    let log = job_log(&farm, "k7", "kvm-k7");
    assert!(log.contains("build stopped"), "{log}");
    assert!(
        log.contains("interrupted by a daemon stop; built again at the next start"),
        "a stop is not a failure: {log}"
    );
    assert!(
        farm.outbox_file("k7.json").is_none(),
        "interrupted, not answered"
    );
    assert_took_warm(&farm.cfg.worker, &log);
    assert_cleaned_up(&farm, &log);
    // the stop killed the pool's next guest too
    let w = &farm.cfg.worker;
    assert!(vm_leftovers(w).is_empty(), "{:?}", vm_leftovers(w));
}

#[test]
#[ignore = "boots a real guest under TCG (minutes); .ci/run runs it"]
fn kvm_build_with_the_9p_cache() {
    let g = guest();
    if !g.has_9p {
        eprintln!(
            "the test guest has no kernel with 9p (CONFIG_9P_FS / CONFIG_NET_9P_VIRTIO): skipped"
        );
        return;
    }
    let mut farm = kvm_farm(&g);
    farm.cfg.worker.use_9p_cache = true;
    // the cloud kernel has no 9p: the script adds Debian's generic kernel for this
    farm.cfg.worker.vm_kernel = Some(g.dir.join("vmlinuz-9p"));
    farm.cfg.worker.vm_initrd = Some(g.dir.join("initrd-9p.img"));
    let _daemon = farm.start();
    wait_warm(&farm.cfg.worker, 1);
    farm.drop_json("k4.json", &kvm_item("k4", "# ks\n", &["--copy-kernel"]));
    let out = farm.wait_outbox("k4.json", Duration::from_secs(900));
    let log = job_log(&farm, "k4", "kvm-k4");
    assert_eq!(out["result"], json!(true), "{out:#}\n{log}");
    assert!(farm.base().join("requests/k4/kvm-k4.img").is_file());
    assert!(log.contains("mount -t 9p"), "{log}");
    assert!(
        !log.contains(" -r -P "),
        "9p output needs no copy back (no scp -r):\n{log}"
    );
    assert!(log.contains("-virtfs"), "{log}");
    assert_took_warm(&farm.cfg.worker, &log);
    if farm.cfg.worker.vm_warm > 0 {
        // the guest's own share, moved into the job folder; the kickstart stays the job's
        assert!(log.contains("file(s) moved from "), "{log}");
        assert_eq!(
            std::fs::read_to_string(farm.base().join("requests/k4/kvm-k4.ks")).unwrap(),
            "# ks\n"
        );
    }
    assert_cleaned_up(&farm, &log);
}

#[test]
#[ignore = "boots a real guest under TCG (minutes); .ci/run runs it"]
fn kvm_daemon_killed_during_a_build_leaves_no_guest_after_restart() {
    let g = guest();
    let mut farm = kvm_farm(&g);
    farm.cfg.worker.max_attempts = 1; // the restarted daemon answers instead of booting again
    let w = farm.cfg.worker.clone();
    let toml = format!(
        "[worker]\nbase_dir = {base:?}\nbase_url = \"http://img.test/images\"\nuse_kvm = true\n\
         sudo = false\nworkers = 1\nmax_attempts = 1\ntimeout = 300\nimg_tmp = {tmp:?}\n\
         vm_base_img = {img:?}\nvm_kernel = {k:?}\nvm_initrd = {i:?}\nvm_ssh_key = {key:?}\n\
         vm_append = {app:?}\nvm_accel = \"tcg\"\nvm_wait = 240\nvm_warm = {warm}\n\n\
         [spool]\ndir = {spool:?}\nworker_id = \"w1\"\npoll_interval_ms = 100\nmin_age_ms = 50\n",
        base = w.base_dir,
        tmp = w.img_tmp,
        img = w.vm_base_img.as_ref().unwrap(),
        k = w.vm_kernel.as_ref().unwrap(),
        i = w.vm_initrd.as_ref().unwrap(),
        key = w.vm_ssh_key.as_ref().unwrap(),
        app = w.vm_append,
        warm = w.vm_warm,
        spool = farm.spool(),
    );
    let cfg = farm.root().join("kvm.toml");
    std::fs::write(&cfg, toml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_build-image"))
        .args(["--config", cfg.to_str().unwrap(), "run"])
        .env("RUST_LOG", "info")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let inc = farm.incoming();
    assert!(wait_for(Duration::from_secs(20), || inc.is_dir()));
    wait_warm(&w, 1);
    farm.drop_json(
        "k5.json",
        &kvm_item("k5", "# mic-fixture: sleep 600\n", &[]),
    );
    // mic runs in the guest: then the daemon dies
    let running_mic = wait_for(Duration::from_secs(600), || {
        job_log(&farm, "k5", "kvm-k5").contains("mic-fixture: sleeping")
    });
    let log = job_log(&farm, "k5", "kvm-k5");
    assert!(running_mic, "mic never started in the guest:\n{log}");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let pid = *qemu_pids(&log).first().expect("qemu pid in the log");
    assert!(running(pid), "the guest should outlive the killed daemon");
    assert!(!vm_leftovers(&w).is_empty());
    assert_took_warm(&w, &log);
    // every guest the killed daemon left (with warm guests: also the pool's next one)
    let left = vm_leftovers(&w);
    let pids: Vec<i32> = left
        .iter()
        .filter(|n| n.ends_with(".pid"))
        .filter_map(|n| {
            std::fs::read_to_string(w.img_tmp.join(n))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .collect();

    // a new daemon: recovery kills the orphaned guest, removes its overlay, answers the job
    let daemon = farm.start();
    let out = farm.wait_outbox("k5.json", Duration::from_secs(120));
    assert_eq!(out["result"], json!(false), "{out:#}");
    assert!(
        wait_for(Duration::from_secs(30), || !running(pid)),
        "qemu pid {pid} survived the restart"
    );
    for p in &pids {
        assert!(
            wait_for(Duration::from_secs(30), || !running(*p)),
            "qemu pid {p} of the killed daemon survived the restart"
        );
    }
    // the old stems are gone (the new daemon's pool makes new ones)
    let stems: Vec<&str> = left.iter().filter_map(|n| n.split('.').next()).collect();
    let still: Vec<String> = vm_leftovers(&w)
        .into_iter()
        .filter(|n| n.split('.').next().is_some_and(|s| stems.contains(&s)))
        .collect();
    assert!(still.is_empty(), "left in img_tmp: {still:?}");
    daemon.stop().unwrap();
    assert!(vm_leftovers(&w).is_empty(), "{:?}", vm_leftovers(&w));
}

/// Kills a qemu this test started (by pid) when the test ends, whatever happened.
struct QemuGuard(i32);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
        wait_for(Duration::from_secs(10), || !running(self.0));
    }
}

/// Issue 24 (docs/plan-issue-24.md): a guest booted ahead is reached through an ssh connection
/// held open while it waited (`warm::master`), and a take's commands run through it
/// (`warm::through_master`) without a connection of their own: a key that would not be
/// accepted works through it, and no longer once the master is gone. The warm health check
/// passes on a fresh guest.
#[test]
#[ignore = "boots a real guest under TCG (minutes); .ci/run runs it"]
fn kvm_warm_guest_answers_through_its_held_connection() {
    use build_image::imaging::kvm::commands::{self, Accel, Ssh, Vm};
    use build_image::imaging::kvm::warm;
    let g = guest();
    let d = tempfile::tempdir().unwrap();
    let stem = d.path().join("build-image-vm-warm-test");
    let with = |ext: &str| PathBuf::from(format!("{}.{ext}", stem.display()));
    let overlay = with("qcow2");
    let create = commands::qemu_img_create(&g.dir.join("base.qcow2"), "qcow2", &overlay);
    let out = Command::new(&create[0])
        .args(&create[1..])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (kernel, initrd, pidfile, console) = (
        g.dir.join("vmlinuz"),
        g.dir.join("initrd.img"),
        with("pid"),
        with("console"),
    );
    let qemu = commands::qemu_system(&Vm {
        accel: Accel::Tcg,
        memory: "1G",
        smp: 2,
        kernel: &kernel,
        initrd: Some(&initrd),
        append: "root=/dev/vda rw console=ttyS0 panic=1",
        mac: &commands::mac(0x1234),
        port,
        disk: &overlay,
        disk_format: "qcow2",
        pidfile: &pidfile,
        console: &console,
        share_9p: None,
    });
    let status = Command::new("nice")
        .args(["-n", "10"])
        .args(&qemu)
        .status()
        .unwrap();
    assert!(status.success(), "qemu: {status}");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _guard = QemuGuard(pid);

    let key = g.dir.join("id_ed25519");
    let ssh = Ssh {
        key: &key,
        port,
        connect_timeout: 10,
    };
    let answers = |argv: &[std::ffi::OsString]| {
        Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let booted = wait_for(Duration::from_secs(600), || {
        running(pid) && answers(&ssh.ssh("true")).status.success()
    });
    assert!(
        booted,
        "the guest's ssh never answered; console:\n{}",
        std::fs::read_to_string(&console).unwrap_or_default()
    );

    let ctl = warm::control_option(&with("ctl")).expect("a control path ssh takes");
    let master_argv = warm::master(&ssh, &ctl);
    let mut master = Command::new(&master_argv[0])
        .args(&master_argv[1..])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let check = |ctl: &std::ffi::OsString| {
        Command::new("ssh")
            .arg("-o")
            .arg(ctl)
            .args(["-O", "check", "root@127.0.0.1"])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(
        wait_for(Duration::from_secs(120), || check(&ctl)),
        "the master connection never came up"
    );

    // a key the guest does not accept: only the held connection lets this through
    let stranger = d.path().join("stranger");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&stranger)
        .status()
        .unwrap();
    assert!(keygen.success());
    let other = Ssh {
        key: &stranger,
        ..ssh
    };
    let started = Instant::now();
    let first = answers(&warm::through_master(
        &other.ssh("cat /proc/sys/kernel/random/boot_id"),
        &ctl,
    ));
    let took = started.elapsed();
    assert!(first.status.success(), "{first:?}");
    assert_eq!(String::from_utf8_lossy(&first.stdout).trim().len(), 36);
    eprintln!("first command through the held connection: {took:.2?}");

    let health = answers(&warm::through_master(
        &other.ssh(&warm::health_remote()),
        &ctl,
    ));
    assert!(health.status.success(), "{health:?}");
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(
        warm::health_verdict(&String::from_utf8_lossy(&health.stdout), host_now),
        Ok(())
    );

    // the master gone: the same line makes a connection of its own, which the guest refuses
    master.kill().unwrap();
    master.wait().unwrap();
    assert!(!check(&ctl));
    let refused = answers(&warm::through_master(&other.ssh("true"), &ctl));
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        answers(&warm::through_master(&ssh.ssh("true"), &ctl))
            .status
            .success()
    );
}

/// The stem a build's log says it took ("took the warm guest <img_tmp>/<stem> (qemu pid N, ...").
fn taken_stem(log: &str) -> (String, i32) {
    let line = log
        .lines()
        .find_map(|l| l.split("took the warm guest ").nth(1))
        .unwrap_or_else(|| panic!("no warm guest taken:\n{log}"));
    let path = line.split(' ').next().unwrap();
    let stem = Path::new(path)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let pid = line
        .split("qemu pid ")
        .nth(1)
        .and_then(|r| r.split(',').next()?.parse().ok())
        .unwrap();
    (stem, pid)
}

/// Issue 24: warm guests, two build slots and two guests kept warm. The pool shows in
/// `doctor` and `/metrics`; a warm guest killed from outside is replaced; a file build 1 wrote in
/// its guest is absent in build 2's; two builds at once run in two guests; a cancelled build's
/// guest is destroyed, not returned; a stop leaves no qemu and no file.
#[test]
#[ignore = "boots real guests under TCG (minutes); .ci/run runs it"]
fn kvm_warm_pool_isolation_and_faults() {
    if vm_warm() > 0 {
        eprintln!("sets vm_warm itself: run in the pass with BUILD_IMAGE_TEST_VM_WARM unset");
        return;
    }
    let g = guest();
    let mut farm = kvm_farm(&g);
    farm.cfg.http.listen = Some("127.0.0.1:0".into());
    farm.cfg.worker.workers = 2;
    farm.cfg.worker.vm_warm = 2;
    let w = farm.cfg.worker.clone();
    let daemon = farm.start();
    let ready = |n: usize| {
        let ok = wait_for(Duration::from_secs(1200), || warm_ready(&w).len() == n);
        assert!(ok, "not {n} ready: {:?}", list(&w.img_tmp));
        warm_ready(&w)
    };
    let first = ready(2);

    // the pool as doctor (from the files) and /metrics (from the daemon) see it
    let cfg = farm.root().join("doctor.toml");
    std::fs::write(
        &cfg,
        format!(
            "[worker]\nbase_dir = {:?}\nuse_kvm = true\nsudo = false\nworkers = 2\nvm_warm = 2\nimg_tmp = {:?}\n",
            w.base_dir, w.img_tmp
        ),
    )
    .unwrap();
    let (_, doctor, _) = output(bin().args(["--config", cfg.to_str().unwrap(), "doctor"]));
    assert!(
        doctor.contains("vm_warm = 2: 2 warm guest(s) up (ready or running a build), 0 booting"),
        "{doctor}"
    );
    let metrics = http_get(&farm, "/metrics");
    assert!(
        metrics.contains("build_image_warm_guests{state=\"ready\"} 2"),
        "{metrics}"
    );

    // a warm guest killed from outside is destroyed and replaced by a new one
    let victim = &first[0];
    let pid: i32 = std::fs::read_to_string(w.img_tmp.join(format!("{victim}.pid")))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || !vm_leftovers(&w)
            .iter()
            .any(|n| n.starts_with(victim.as_str()))),
        "the killed guest's files stay: {:?}",
        vm_leftovers(&w)
    );
    let again = ready(2);
    assert!(!again.contains(victim), "{again:?}");

    // isolation: build 2 writes no image if build 1's is in its guest; it must succeed
    farm.drop_json("w1.json", &kvm_item("w1", "# ks\n", &[]));
    let out1 = farm.wait_outbox("w1.json", Duration::from_secs(900));
    let log1 = job_log(&farm, "w1", "kvm-w1");
    assert_eq!(out1["result"], json!(true), "{out1:#}\n{log1}");
    ready(2);
    farm.drop_json(
        "w2.json",
        &kvm_item(
            "w2",
            "# ks\n# mic-fixture: noimage-if /var/tmp/build-image/w1/kvm-w1.img\n",
            &[],
        ),
    );
    let out2 = farm.wait_outbox("w2.json", Duration::from_secs(900));
    let log2 = job_log(&farm, "w2", "kvm-w2");
    assert_eq!(out2["result"], json!(true), "{out2:#}\n{log2}");
    let (s1, p1) = taken_stem(&log1);
    let (s2, p2) = taken_stem(&log2);
    assert_ne!((s1, p1), (s2, p2));
    assert!(!running(p1) && !running(p2), "their guests are destroyed");

    // two builds at once, two guests; a cancelled one's guest is destroyed, not returned
    ready(2);
    for id in ["w3", "w4"] {
        farm.drop_json(
            &format!("{id}.json"),
            &kvm_item(id, "# mic-fixture: sleep 600\n", &[]),
        );
    }
    let both = wait_for(Duration::from_secs(900), || {
        ["w3", "w4"]
            .iter()
            .all(|id| job_log(&farm, id, &format!("kvm-{id}")).contains("mic-fixture: sleeping"))
    });
    assert!(both, "{}", job_log(&farm, "w3", "kvm-w3"));
    let (s3, p3) = taken_stem(&job_log(&farm, "w3", "kvm-w3"));
    let (s4, p4) = taken_stem(&job_log(&farm, "w4", "kvm-w4"));
    assert_ne!(s3, s4);
    assert_ne!(p3, p4);
    assert!(running(p3) && running(p4));
    let (code, _, err) = output(farm.bin().args(["cancel", "w3"]));
    assert_eq!(code, 0, "{err}");
    assert!(
        wait_for(Duration::from_secs(120), || !running(p3)),
        "the cancelled build's guest still runs"
    );
    assert!(
        wait_for(Duration::from_secs(60), || !vm_leftovers(&w)
            .iter()
            .any(|n| n.starts_with(s3.as_str()))),
        "{:?}",
        vm_leftovers(&w)
    );
    assert!(running(p4), "the other build's guest is untouched");
    let metrics = http_get(&farm, "/metrics");
    assert!(
        metrics.contains("build_image_warm_takes_total{result=\"warm\"} 4"),
        "{metrics}"
    );
    daemon.stop().unwrap();
    assert!(!running(p4));
    assert!(vm_leftovers(&w).is_empty(), "{:?}", vm_leftovers(&w));
}
