//! KVM-mode command lines as pure functions of their inputs: qemu-img, LVM, qemu-system, ssh and
//! scp on the host, and the command strings the guest's shell runs.
//!
//! Invariant: a word that reaches the guest's shell is quoted (`shell_words`), so a workitem
//! field such as an extra_opt `'; touch /x'` arrives as one literal argument; a path inside a
//! qemu option value has its commas doubled, qemu's own escape.

use crate::config::{VmAccel, WorkerConfig};
use crate::domain::workitem::Spec;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

/// Where ssh and scp reach the guest: root, through qemu's forwarded port on the loopback.
pub const GUEST: &str = "root@127.0.0.1";

/// Under this folder of the guest each build has its job directory, `<GUEST_JOB_ROOT>/<dir_id>`:
/// a path of safe characters only, so that no scp or sftp path ever carries a workitem's text.
pub const GUEST_JOB_ROOT: &str = "/var/tmp/build-image";

/// The 9p mount tags, as the original named them.
pub const TAG_CACHE: &str = "mic_cache";
pub const TAG_OUTPUT: &str = "mic_output";

fn words<S: AsRef<OsStr>>(v: &[S]) -> Vec<OsString> {
    v.iter().map(|s| s.as_ref().to_os_string()).collect()
}

fn sudo_prefix(sudo: bool) -> Vec<OsString> {
    if sudo {
        words(&["sudo", "-n"])
    } else {
        Vec::new()
    }
}

/// `text` followed by `path` with every comma doubled (qemu's option-value escape).
fn qemu_value(text: &str, path: &Path) -> OsString {
    let mut bytes = text.as_bytes().to_vec();
    for &b in path.as_os_str().as_bytes() {
        bytes.push(b);
        if b == b',' {
            bytes.push(b',');
        }
    }
    OsString::from_vec(bytes)
}

/// `qemu-img info` of the base image, as JSON (it tells the backing format).
pub fn qemu_img_info(base: &Path) -> Vec<OsString> {
    let mut a = words(&["qemu-img", "info", "--force-share", "--output=json"]);
    a.push(base.into());
    a
}

/// The `format` of a `qemu-img info --output=json` answer.
pub fn backing_format(info_json: &str) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_str(info_json)
        .map_err(|e| format!("qemu-img info printed no JSON ({e})"))?;
    let fmt = v
        .get("format")
        .and_then(|f| f.as_str())
        .ok_or("qemu-img info names no format")?;
    if fmt.is_empty() || !fmt.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("qemu-img info names an odd format {fmt:?}"));
    }
    Ok(fmt.to_string())
}

/// A qcow2 overlay on top of the base image.
pub fn qemu_img_create(base: &Path, base_format: &str, overlay: &Path) -> Vec<OsString> {
    let mut a = words(&["qemu-img", "create", "-f", "qcow2", "-F", base_format, "-b"]);
    a.push(base.into());
    a.push(overlay.into());
    a
}

/// `lvdisplay -c`: exits 0 (and prints one colon-separated line) only for a logical volume.
pub fn lvdisplay(sudo: bool, base: &Path) -> Vec<OsString> {
    let mut a = sudo_prefix(sudo);
    a.extend(words(&["lvdisplay", "-c"]));
    a.push(base.into());
    a
}

/// The volume group of an `lvdisplay -c` line (`/dev/vg/lv:vg:...`).
pub fn lv_group(lvdisplay_out: &str) -> Option<String> {
    let line = lvdisplay_out
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())?;
    let vg = line.split(':').nth(1)?.trim();
    let ok = !vg.is_empty()
        && !vg.starts_with('-')
        && vg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+_.-".contains(c));
    ok.then(|| vg.to_string())
}

/// A snapshot of the base volume as large as its origin, named `name` (in the base's group).
pub fn lvcreate_snapshot(sudo: bool, name: &str, base: &Path) -> Vec<OsString> {
    let mut a = sudo_prefix(sudo);
    a.extend(words(&["lvcreate", "-s", "-l", "100%ORIGIN", "-n", name]));
    a.push(base.into());
    a
}

pub fn lvremove(sudo: bool, lv: &Path) -> Vec<OsString> {
    let mut a = sudo_prefix(sudo);
    a.extend(words(&["lvremove", "-f"]));
    a.push(lv.into());
    a
}

/// The qemu accelerator a build uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The accelerator for `setting`, given whether /dev/kvm is usable (`Err` says why not), and
/// a line for the log; `Err` when KVM is demanded but not usable.
pub fn choose_accel(setting: VmAccel, kvm: Result<(), String>) -> Result<(Accel, String), String> {
    match (setting, kvm) {
        (VmAccel::Tcg, _) => Ok((Accel::Tcg, "accel tcg (vm_accel = \"tcg\")".into())),
        (VmAccel::Kvm, Ok(())) => Ok((Accel::Kvm, "accel kvm (vm_accel = \"kvm\")".into())),
        (VmAccel::Kvm, Err(why)) => Err(format!(
            "vm_accel = \"kvm\" but /dev/kvm is not usable: {why} (set vm_accel = \"tcg\" to \
             emulate, slowly)"
        )),
        (VmAccel::Auto, Ok(())) => Ok((
            Accel::Kvm,
            "accel kvm (vm_accel = \"auto\": /dev/kvm is usable)".into(),
        )),
        (VmAccel::Auto, Err(why)) => Ok((
            Accel::Tcg,
            format!(
                "accel tcg, software emulation (vm_accel = \"auto\": /dev/kvm is not usable: {why})"
            ),
        )),
    }
}

/// Does /proc/cpuinfo show hardware virtualisation (Intel vmx, AMD svm)?
pub fn cpu_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// A MAC address in the original's range, `DE:AD:BE:EF:xx:xx`.
pub fn mac(random: u64) -> String {
    format!(
        "DE:AD:BE:EF:{:02X}:{:02X}",
        (random >> 8) & 0xff,
        random & 0xff
    )
}

/// A port in the dynamic range 49152-65535.
pub fn port(random: u64) -> u16 {
    (49152 + random % (65536 - 49152)) as u16
}

/// Everything the guest is started with.
pub struct Vm<'a> {
    pub accel: Accel,
    pub memory: &'a str,
    pub smp: u32,
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub append: &'a str,
    pub mac: &'a str,
    pub port: u16,
    /// The overlay (qcow2 file or LVM snapshot) and its format.
    pub disk: &'a Path,
    pub disk_format: &'a str,
    pub pidfile: &'a Path,
    /// The guest's serial console is written here.
    pub console: &'a Path,
    /// With the 9p cache: (host mic cache directory, host job directory).
    pub share_9p: Option<(&'a Path, &'a Path)>,
}

/// The original's qemu command line, plus `-pidfile`, the disk format and a console file.
pub fn qemu_system(vm: &Vm<'_>) -> Vec<OsString> {
    let mut a = words(&[
        "qemu-system-x86_64",
        "-machine",
        &format!("accel={}", vm.accel.as_str()),
        "-display",
        "none",
        "-no-reboot",
        "-daemonize",
    ]);
    a.push("-pidfile".into());
    a.push(vm.pidfile.into());
    a.extend(words(&[
        "-m",
        vm.memory,
        "-smp",
        &vm.smp.to_string(),
        "-device",
        "virtio-rng-pci",
    ]));
    a.push("-kernel".into());
    a.push(vm.kernel.into());
    if let Some(initrd) = vm.initrd {
        a.push("-initrd".into());
        a.push(initrd.into());
    }
    a.push("-append".into());
    a.push(vm.append.into());
    a.extend(words(&[
        "-net",
        &format!("nic,model=virtio,macaddr={}", vm.mac),
        "-net",
        &format!("user,hostfwd=tcp:127.0.0.1:{}-:22", vm.port),
    ]));
    a.push("-drive".into());
    a.push(qemu_value(
        &format!(
            "index=0,if=virtio,media=disk,cache=writeback,format={},file=",
            vm.disk_format
        ),
        vm.disk,
    ));
    a.push("-chardev".into());
    a.push(qemu_value("file,id=console,path=", vm.console));
    a.extend(words(&["-serial", "chardev:console"]));
    if let Some((cache, output)) = vm.share_9p {
        for (tag, dir) in [(TAG_CACHE, cache), (TAG_OUTPUT, output)] {
            a.push("-virtfs".into());
            let mut v = qemu_value("local,path=", dir);
            v.push(format!(",mount_tag={tag},security_model=none,id={tag}"));
            a.push(v);
        }
    }
    a
}

/// ssh and scp to root@guest with one key, through the forwarded port.
#[derive(Debug, Clone, Copy)]
pub struct Ssh<'a> {
    pub key: &'a Path,
    pub port: u16,
    /// Seconds to wait for the connection (and the ssh banner).
    pub connect_timeout: u64,
}

impl Ssh<'_> {
    fn options(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        for o in [
            "BatchMode=yes",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "LogLevel=ERROR",
            "IdentitiesOnly=yes",
            &format!("ConnectTimeout={}", self.connect_timeout.max(1)),
            "ServerAliveInterval=15",
            "ServerAliveCountMax=4",
        ] {
            a.push("-o".into());
            a.push(o.into());
        }
        a.push("-i".into());
        a.push(self.key.into());
        a
    }

    /// `ssh ... root@127.0.0.1 <remote>`: `remote` is one string for the guest's shell (make it
    /// with `remote` or the functions below, which quote every word).
    pub fn ssh(&self, remote: &str) -> Vec<OsString> {
        let mut a = words(&["ssh"]);
        a.extend(self.options());
        a.extend(words(&["-p", &self.port.to_string(), GUEST, remote]));
        a
    }

    /// Copies a host file to a guest path (`remote_path` must be a plain path: scp's sftp mode
    /// would glob it, its legacy mode would hand it to a shell).
    pub fn scp_to(&self, local: &Path, remote_path: &str) -> Vec<OsString> {
        let mut a = words(&["scp"]);
        a.extend(self.options());
        a.extend(words(&["-P", &self.port.to_string()]));
        a.push(local.into());
        a.push(format!("{GUEST}:{remote_path}").into());
        a
    }

    /// Copies a guest directory, recursively, into the host directory `local_parent` (a guest
    /// `/x/<id>` lands in `local_parent/<id>`, merged with what is there).
    pub fn scp_dir_from(&self, remote_dir: &str, local_parent: &Path) -> Vec<OsString> {
        let mut a = words(&["scp"]);
        a.extend(self.options());
        a.extend(words(&["-r", "-P", &self.port.to_string()]));
        a.push(format!("{GUEST}:{remote_dir}").into());
        a.push(local_parent.into());
        a
    }
}

/// Words joined into one line for the guest's shell, each quoted.
pub fn remote<S: AsRef<str>>(argv: &[S]) -> String {
    shell_words::join(argv.iter().map(|s| s.as_ref()))
}

/// The guest's job directory for a job.
pub fn guest_job_dir(spec: &Spec) -> String {
    format!("{GUEST_JOB_ROOT}/{}", spec.dir_id)
}

/// Creates directories in the guest.
pub fn mkdir_p(dirs: &[&str]) -> String {
    let mut v = vec!["mkdir", "-p", "--"];
    v.extend_from_slice(dirs);
    remote(&v)
}

/// Writes stdin into a guest file (the kickstart: its name comes from the workitem, so it goes
/// through the quoting shell, never through an scp path).
pub fn write_stdin_to(path: &str) -> String {
    format!("cat > {}", shell_words::quote(path))
}

/// Mounts a 9p share (tag) on a guest directory, creating it first.
pub fn mount_9p(tag: &str, dir: &str) -> String {
    format!(
        "{} && {}",
        mkdir_p(&[dir]),
        remote(&[
            "mount",
            "-t",
            "9p",
            "-o",
            "trans=virtio,version=9p2000.L",
            tag,
            dir
        ])
    )
}

/// mic (or mic2) in the guest, as root: `<mic_path> <mic's arguments>`, every word quoted.
pub fn mic_remote(spec: &Spec, ks: &str, outdir: &str, w: &WorkerConfig) -> String {
    let args = super::super::mic::mic_args(spec, Path::new(ks), Path::new(outdir), w);
    let mut v: Vec<String> = vec![w.mic_path().to_string_lossy().into_owned()];
    v.extend(args.iter().map(|a| a.to_string_lossy().into_owned()));
    remote(&v)
}

/// `mic --version` in the guest (what the provenance states of the guest's mic).
pub fn mic_version_remote(w: &WorkerConfig) -> String {
    remote(&[
        w.mic_path().to_string_lossy().into_owned(),
        "--version".to_string(),
    ])
}

/// Flushes the guest's disks, then powers it off (qemu runs with `-no-reboot`, so a reboot also
/// ends it).
pub fn shutdown() -> String {
    "sync; poweroff || halt -p || reboot".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn s(v: &[OsString]) -> Vec<String> {
        v.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    fn spec() -> Spec {
        Spec {
            extra_opts: vec!["--pkgmgr=zypp".into(), "'; touch /x'".into()],
            ..Spec::sample("mer core", "loop")
        }
    }

    /// Splits a remote command line the way a POSIX shell would.
    fn shell_split(line: &str) -> Vec<String> {
        shell_words::split(line).unwrap()
    }

    #[test]
    fn qemu_img_lines() {
        assert_eq!(
            s(&qemu_img_info(Path::new("/srv/base.img"))),
            vec![
                "qemu-img",
                "info",
                "--force-share",
                "--output=json",
                "/srv/base.img"
            ]
        );
        assert_eq!(
            s(&qemu_img_create(
                Path::new("/srv/base.img"),
                "raw",
                Path::new("/var/tmp/build-image-vm-7-1-ab.qcow2")
            )),
            vec![
                "qemu-img",
                "create",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                "/srv/base.img",
                "/var/tmp/build-image-vm-7-1-ab.qcow2"
            ]
        );
    }

    #[test]
    fn backing_format_from_json() {
        let info = r#"{"virtual-size": 1073741824, "filename": "b.qcow2", "format": "qcow2"}"#;
        assert_eq!(backing_format(info).unwrap(), "qcow2");
        assert!(backing_format("not json").is_err());
        assert!(backing_format(r#"{"filename": "x"}"#).is_err());
        assert!(backing_format(r#"{"format": "raw,x=y"}"#).is_err());
    }

    #[test]
    fn lvm_lines() {
        let base = Path::new("/dev/vg0/mer-base");
        assert_eq!(
            s(&lvdisplay(true, base)),
            vec!["sudo", "-n", "lvdisplay", "-c", "/dev/vg0/mer-base"]
        );
        assert_eq!(
            s(&lvcreate_snapshot(true, "build-image-vm-7-1-ab", base)),
            vec![
                "sudo",
                "-n",
                "lvcreate",
                "-s",
                "-l",
                "100%ORIGIN",
                "-n",
                "build-image-vm-7-1-ab",
                "/dev/vg0/mer-base"
            ]
        );
        assert_eq!(
            s(&lvremove(
                false,
                Path::new("/dev/vg0/build-image-vm-7-1-ab")
            )),
            vec!["lvremove", "-f", "/dev/vg0/build-image-vm-7-1-ab"]
        );
        let out = "  /dev/vg0/mer-base:vg0:3:1:-1:0:20971520:2560:-1:0:-1:253:2\n";
        assert_eq!(lv_group(out).as_deref(), Some("vg0"));
        assert_eq!(lv_group(""), None);
        assert_eq!(lv_group("/dev/x:-rf:3"), None);
    }

    #[test]
    fn accel_choice() {
        let no = || Err("cannot open /dev/kvm read-write: No such file".to_string());
        assert_eq!(choose_accel(VmAccel::Tcg, Ok(())).unwrap().0, Accel::Tcg);
        assert_eq!(choose_accel(VmAccel::Kvm, Ok(())).unwrap().0, Accel::Kvm);
        assert_eq!(choose_accel(VmAccel::Auto, Ok(())).unwrap().0, Accel::Kvm);
        let (a, line) = choose_accel(VmAccel::Auto, no()).unwrap();
        assert_eq!(a, Accel::Tcg);
        assert!(line.contains("/dev/kvm is not usable"), "{line}");
        let err = choose_accel(VmAccel::Kvm, no()).unwrap_err();
        assert!(
            err.contains("/dev/kvm") && err.contains("No such file"),
            "{err}"
        );
        assert!(cpu_has_virt("processor: 0\nflags\t\t: fpu vme vmx sse\n"));
        assert!(cpu_has_virt("flags : fpu svm\n"));
        assert!(!cpu_has_virt("flags : fpu hypervisor vmxx\n"));
    }

    #[test]
    fn mac_and_port_ranges() {
        assert_eq!(mac(0x1234), "DE:AD:BE:EF:12:34");
        assert_eq!(mac(u64::MAX), "DE:AD:BE:EF:FF:FF");
        assert_eq!(port(0), 49152);
        assert_eq!(port(16383), 65535);
        assert_eq!(port(16384), 49152);
        assert!((0..5000u64).all(|r| port(r * 7919) >= 49152));
    }

    #[test]
    fn qemu_system_line() {
        let vm = Vm {
            accel: Accel::Kvm,
            memory: "1G",
            smp: 2,
            kernel: Path::new("/srv/vm/vmlinuz"),
            initrd: None,
            append: "root=/dev/vda panic=1 quiet rw elevator=noop ip=dhcp",
            mac: "DE:AD:BE:EF:12:34",
            port: 50022,
            disk: Path::new("/var/tmp/build-image-vm-7-1-ab.qcow2"),
            disk_format: "qcow2",
            pidfile: Path::new("/var/tmp/build-image-vm-7-1-ab.pid"),
            console: Path::new("/var/tmp/build-image-vm-7-1-ab.console"),
            share_9p: None,
        };
        assert_eq!(
            s(&qemu_system(&vm)),
            vec![
                "qemu-system-x86_64",
                "-machine",
                "accel=kvm",
                "-display",
                "none",
                "-no-reboot",
                "-daemonize",
                "-pidfile",
                "/var/tmp/build-image-vm-7-1-ab.pid",
                "-m",
                "1G",
                "-smp",
                "2",
                "-device",
                "virtio-rng-pci",
                "-kernel",
                "/srv/vm/vmlinuz",
                "-append",
                "root=/dev/vda panic=1 quiet rw elevator=noop ip=dhcp",
                "-net",
                "nic,model=virtio,macaddr=DE:AD:BE:EF:12:34",
                "-net",
                "user,hostfwd=tcp:127.0.0.1:50022-:22",
                "-drive",
                "index=0,if=virtio,media=disk,cache=writeback,format=qcow2,file=/var/tmp/build-image-vm-7-1-ab.qcow2",
                "-chardev",
                "file,id=console,path=/var/tmp/build-image-vm-7-1-ab.console",
                "-serial",
                "chardev:console"
            ]
        );
    }

    #[test]
    fn qemu_system_initrd_tcg_9p_and_commas() {
        let vm = Vm {
            accel: Accel::Tcg,
            memory: "2G",
            smp: 1,
            kernel: Path::new("/k"),
            initrd: Some(Path::new("/i")),
            append: "root=/dev/vda console=ttyS0",
            mac: "DE:AD:BE:EF:00:01",
            port: 65535,
            disk: Path::new("/dev/vg0/build-image-vm-x"),
            disk_format: "raw",
            pidfile: Path::new("/t/p"),
            console: Path::new("/t/a,b"),
            share_9p: Some((Path::new("/var/tmp/mic/cache"), Path::new("/img/q,u/7-1"))),
        };
        let a = s(&qemu_system(&vm));
        assert_eq!(&a[1..3], ["-machine", "accel=tcg"]);
        let at = |opt: &str| {
            let i = a.iter().position(|x| x == opt).unwrap();
            a[i + 1].clone()
        };
        assert_eq!(at("-initrd"), "/i");
        assert_eq!(at("-m"), "2G");
        assert_eq!(at("-smp"), "1");
        assert_eq!(
            at("-drive"),
            "index=0,if=virtio,media=disk,cache=writeback,format=raw,file=/dev/vg0/build-image-vm-x"
        );
        assert_eq!(at("-chardev"), "file,id=console,path=/t/a,,b");
        let virtfs: Vec<&String> = a
            .iter()
            .enumerate()
            .filter(|(i, _)| *i > 0 && a[i - 1] == "-virtfs")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(
            virtfs,
            vec![
                "local,path=/var/tmp/mic/cache,mount_tag=mic_cache,security_model=none,id=mic_cache",
                "local,path=/img/q,,u/7-1,mount_tag=mic_output,security_model=none,id=mic_output"
            ]
        );
    }

    #[test]
    fn ssh_and_scp_lines() {
        let key = PathBuf::from("/etc/img/id_rsa");
        let ssh = Ssh {
            key: &key,
            port: 50022,
            connect_timeout: 10,
        };
        let opts = vec![
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=4",
            "-i",
            "/etc/img/id_rsa",
        ];
        let mut want = vec!["ssh"];
        want.extend(&opts);
        want.extend(["-p", "50022", "root@127.0.0.1", "sync"]);
        assert_eq!(s(&ssh.ssh("sync")), want);

        let mut want = vec!["scp"];
        want.extend(&opts);
        want.extend([
            "-P",
            "50022",
            "/etc/mic/mic.conf",
            "root@127.0.0.1:/etc/mic/mic.conf",
        ]);
        assert_eq!(
            s(&ssh.scp_to(Path::new("/etc/mic/mic.conf"), "/etc/mic/mic.conf")),
            want
        );

        let mut want = vec!["scp"];
        want.extend(&opts);
        want.extend([
            "-r",
            "-P",
            "50022",
            "root@127.0.0.1:/var/tmp/build-image/7-1",
            "/srv/img/requests",
        ]);
        assert_eq!(
            s(&ssh.scp_dir_from("/var/tmp/build-image/7-1", Path::new("/srv/img/requests"))),
            want
        );
    }

    #[test]
    fn guest_commands_quote_every_word() {
        assert_eq!(
            mkdir_p(&["/etc/mic", "/var/tmp/build-image/7-1"]),
            "mkdir -p -- /etc/mic /var/tmp/build-image/7-1"
        );
        assert_eq!(
            write_stdin_to("/var/tmp/build-image/7-1/mer core;$(x).ks"),
            "cat > '/var/tmp/build-image/7-1/mer core;$(x).ks'"
        );
        assert_eq!(
            mount_9p(TAG_CACHE, "/var/tmp/mic/cache"),
            "mkdir -p -- /var/tmp/mic/cache && mount -t 9p -o 'trans=virtio,version=9p2000.L' \
             mic_cache /var/tmp/mic/cache"
        );
        assert_eq!(shutdown(), "sync; poweroff || halt -p || reboot");
    }

    #[test]
    fn mic_over_ssh_keeps_hostile_arguments_literal() {
        let w = WorkerConfig::default();
        let mut sp = spec();
        sp.release = Some("0.2011".into());
        sp.extra_opts.push("$(reboot)".into());
        sp.extra_opts.push("a\"b\\c d".into());
        let dir = guest_job_dir(&sp);
        assert_eq!(dir, "/var/tmp/build-image/7-1");
        let ks = format!("{dir}/{}.ks", sp.name);
        let line = mic_remote(&sp, &ks, &dir, &w);
        // exactly mic's argument vector, once the guest's shell has split it
        let mut want = vec!["/usr/bin/mic".to_string()];
        want.extend(
            crate::imaging::mic::mic_args(&sp, Path::new(&ks), Path::new(&dir), &w)
                .iter()
                .map(|a| a.to_string_lossy().into_owned()),
        );
        assert_eq!(shell_split(&line), want);
        assert!(want.contains(&"'; touch /x'".to_string()));
        assert!(want.contains(&"$(reboot)".to_string()));
        assert!(line.starts_with(
            "/usr/bin/mic create loop '/var/tmp/build-image/7-1/mer core.ks' '--arch=i586'"
        ));
        // run through a real shell: every argument arrives whole
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(line.replacen("/usr/bin/mic", "printf '%s\\n'", 1))
            .output()
            .unwrap();
        let got: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(got, want[1..]);
    }
}
