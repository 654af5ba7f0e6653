//! Warm guests (issue 24, docs/plan-issue-24.md): guests booted ahead, each on a fresh overlay,
//! that a build takes instead of booting its own. This file holds the pure parts: the pool's
//! book (which guests are booting, ready or taken, and how many more to boot within the budget)
//! and the health check a warm guest passes before a build may take it (its command and the
//! verdict on its answer). The guests' lifecycle (qemu, ssh, teardown) is `sequence`'s.
//!
//! Invariants: a guest serves one build: once taken it never becomes ready again (there is no
//! way back into the book but as a new guest); at most `workers + vm_warm` guests are alive at
//! once (booting, ready, and those the builds run in, warm or booted by the build itself); a
//! guest whose health check fails is dropped from the book (and destroyed), never taken.

use super::commands::Ssh;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::time::Instant;

/// One warm guest's place in the book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmState {
    /// qemu started, ssh not answering yet.
    Booting,
    /// ssh answered and the health check passed: a build may take it.
    Ready,
    /// A build runs in it; it is destroyed after that build, never handed out again.
    Taken,
}

/// How many guests are in each state, and how many builds run in a guest they booted
/// themselves (no warm one was ready).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub booting: usize,
    pub ready: usize,
    pub taken: usize,
    pub cold: usize,
}

impl Counts {
    /// Guests alive: each holds `vm_memory` and a qemu.
    pub fn alive(&self) -> usize {
        self.booting + self.ready + self.taken + self.cold
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    state: WarmState,
    /// When it entered its state (the oldest ready guest is taken first).
    since: Instant,
}

/// The pool's book: the warm guests by id (ids are never reused) and the cold builds.
#[derive(Debug)]
pub struct Book {
    /// `vm_warm`: guests kept booting or ready.
    warm: usize,
    /// `workers`: builds at once.
    slots: usize,
    guests: BTreeMap<u64, Entry>,
    next: u64,
    cold: usize,
}

impl Book {
    pub fn new(warm: usize, slots: usize) -> Book {
        Book {
            warm,
            slots,
            guests: BTreeMap::new(),
            next: 1,
            cold: 0,
        }
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts {
            cold: self.cold,
            ..Counts::default()
        };
        for e in self.guests.values() {
            match e.state {
                WarmState::Booting => c.booting += 1,
                WarmState::Ready => c.ready += 1,
                WarmState::Taken => c.taken += 1,
            }
        }
        c
    }

    /// How many more warm guests to start now: enough to have `vm_warm` booting or ready,
    /// without passing `workers + vm_warm` guests alive.
    pub fn boots_wanted(&self) -> usize {
        let c = self.counts();
        let short = self.warm.saturating_sub(c.booting + c.ready);
        let room = (self.slots + self.warm).saturating_sub(c.alive());
        short.min(room)
    }

    /// A new guest is being started: its id.
    pub fn booting(&mut self, now: Instant) -> u64 {
        let id = self.next;
        self.next += 1;
        self.guests.insert(
            id,
            Entry {
                state: WarmState::Booting,
                since: now,
            },
        );
        id
    }

    /// The guest answered and passed its health check; false when it is not a booting guest
    /// of this book (a ready or taken one never goes back to ready).
    pub fn ready(&mut self, id: u64, now: Instant) -> bool {
        match self.guests.get_mut(&id) {
            Some(e) if e.state == WarmState::Booting => {
                *e = Entry {
                    state: WarmState::Ready,
                    since: now,
                };
                true
            }
            _ => false,
        }
    }

    /// A build takes the guest ready longest; None when none is ready (the build then boots
    /// its own, as with `vm_warm = 0`: see [`Book::cold_started`]).
    pub fn take(&mut self, now: Instant) -> Option<u64> {
        let id = self
            .guests
            .iter()
            .filter(|(_, e)| e.state == WarmState::Ready)
            .min_by_key(|(id, e)| (e.since, **id))
            .map(|(id, _)| *id)?;
        self.guests.insert(
            id,
            Entry {
                state: WarmState::Taken,
                since: now,
            },
        );
        Some(id)
    }

    /// The guest is gone from the book: destroyed after its build, dead, or failed its
    /// health check. Its state when it went, if it was in the book.
    pub fn gone(&mut self, id: u64) -> Option<WarmState> {
        self.guests.remove(&id).map(|e| e.state)
    }

    /// A build boots a guest of its own (none was ready).
    pub fn cold_started(&mut self) {
        self.cold += 1;
    }

    /// That build's guest is torn down.
    pub fn cold_ended(&mut self) {
        self.cold = self.cold.saturating_sub(1);
    }
}

/// Free space a warm guest must have under [`super::commands::GUEST_JOB_ROOT`]'s file system
/// before a build may take it.
pub const MIN_FREE_KIB: u64 = 64 * 1024;

/// How far the guest's clock may be from the host's, in seconds.
pub const MAX_CLOCK_SKEW_S: i64 = 5;

/// The health check run in a warm guest over ssh (ssh answering is its first part): the
/// guest's clock, then the free space of the file system the build's directory is on.
pub fn health_remote() -> String {
    "date +%s && df -Pk /var/tmp | tail -n 1".to_string()
}

/// The verdict on [`health_remote`]'s output, given the host's clock (seconds since the
/// epoch) when the answer came: Err says why the guest must be replaced.
pub fn health_verdict(output: &str, host_now: i64) -> Result<(), String> {
    let mut lines = output.lines().map(str::trim).filter(|l| !l.is_empty());
    let clock = lines
        .next()
        .and_then(|l| l.parse::<i64>().ok())
        .ok_or_else(|| format!("the guest's clock could not be read: {output:?}"))?;
    let skew = clock - host_now;
    if skew.abs() > MAX_CLOCK_SKEW_S {
        return Err(format!(
            "the guest's clock is {skew} s off the host's (at most {MAX_CLOCK_SKEW_S} s)"
        ));
    }
    // df -Pk: filesystem, 1024-blocks, used, available, capacity, mounted on
    let free = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|f| f.parse::<u64>().ok())
        .ok_or_else(|| format!("the guest's free space could not be read: {output:?}"))?;
    if free < MIN_FREE_KIB {
        return Err(format!(
            "the guest has {free} KiB free under /var/tmp (at least {MIN_FREE_KIB} KiB)"
        ));
    }
    Ok(())
}

/// The longest control socket path ssh takes (a unix socket's `sun_path`, 108 bytes on Linux,
/// less the room ssh's own temporary name beside it needs: ssh binds `<path>.<16 random>`).
pub const MAX_CONTROL_PATH: usize = 108 - 18;

/// `ControlPath=<path>` for ssh's `-o`, or None when ssh cannot take `path` as it is (too long
/// for a unix socket, or not UTF-8, or holding a `"`): the guest is then reached without a held
/// connection, as with `vm_warm = 0`. `%` is doubled (ssh expands `%` tokens in it) and a path
/// with white space is quoted (ssh splits an option's value there).
pub fn control_option(path: &Path) -> Option<OsString> {
    let text = path.to_str()?;
    if text.len() > MAX_CONTROL_PATH || text.contains('"') || text.contains('\n') {
        return None;
    }
    let text = text.replace('%', "%%");
    let value = if text.contains(char::is_whitespace) {
        format!("\"{text}\"")
    } else {
        text
    };
    Some(format!("ControlPath={value}").into())
}

/// `argv` (an ssh or scp line of [`Ssh`]) through the held connection of `control`
/// ([`control_option`]): with `ControlMaster=no`, a master that is gone means a connection of
/// its own, not a failure.
pub fn through_master(argv: &[OsString], control: &OsString) -> Vec<OsString> {
    let mut a = Vec::with_capacity(argv.len() + 4);
    a.extend(argv.first().cloned());
    for o in [&OsString::from("ControlMaster=no"), control] {
        a.push("-o".into());
        a.push(o.clone());
    }
    a.extend(argv.iter().skip(1).cloned());
    a
}

/// The held connection to a warm guest: `ssh -N` as the master of `control`, run (and killed
/// with the guest) by the pool as a child of its own; it ends when the guest goes.
pub fn master(ssh: &Ssh<'_>, control: &OsString) -> Vec<OsString> {
    let mut line = ssh.ssh("");
    // no remote command: -N instead of the empty one ssh() put last
    line.pop();
    let mut a: Vec<OsString> = vec!["ssh".into(), "-N".into()];
    for o in [
        &OsString::from("ControlMaster=yes"),
        &OsString::from("ControlPersist=no"),
        control,
    ] {
        a.push("-o".into());
        a.push(o.clone());
    }
    a.extend(line.into_iter().skip(1));
    a
}

/// The line that separates the take's preparation from `mic --version`'s answer.
pub const VERSION_MARK: &str = "--- mic --version";

/// The one ssh session a build runs in the warm guest it took, before mic: the health check
/// ([`health_remote`]: its first two output lines), the guest job directory, with the 9p cache
/// both shares mounted (`mic_cache` on `cachedir`, `mic_output` on the job directory), the
/// kickstart written from stdin to `ks` (its name goes through the quoting shell, never an scp
/// path), then [`VERSION_MARK`] and `mic --version` (whose failure is no failure of the
/// session). Any other step failing fails the session.
pub fn take_remote(guest_dir: &str, ks: &str, cachedir: Option<&str>, mic_version: &str) -> String {
    use super::commands::{TAG_CACHE, TAG_OUTPUT, mkdir_p, mount_9p, write_stdin_to};
    let mut steps = vec![health_remote(), mkdir_p(&[guest_dir])];
    if let Some(cache) = cachedir {
        steps.push(mount_9p(TAG_CACHE, cache));
        steps.push(mount_9p(TAG_OUTPUT, guest_dir));
    }
    steps.push(write_stdin_to(ks));
    steps.push(format!("echo {}", shell_words::quote(VERSION_MARK)));
    format!(
        "{} && {{ {mic_version} 2>&1 || true; }}",
        steps
            .iter()
            .map(|s| format!("{{ {s}; }}"))
            .collect::<Vec<_>>()
            .join(" && ")
    )
}

/// The take session's answer split: the health check's part (for [`health_verdict`]) and
/// the first line `mic --version` printed, if any.
pub fn take_answer(output: &str) -> (String, Option<String>) {
    match output.split_once(&format!("{VERSION_MARK}\n")) {
        Some((health, version)) => (
            health.to_string(),
            version
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_string),
        ),
        None => (output.to_string(), None),
    }
}

/// What `/metrics` and `doctor` say of the pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    pub counts: Counts,
    /// Builds that took a ready warm guest.
    pub warm_takes: u64,
    /// Builds that found none ready and booted their own.
    pub cold_takes: u64,
}

/// Memory the host keeps for itself and the daemon beside the guests, MiB.
pub const HOST_RESERVE_MIB: u64 = 512;

/// `vm_memory` (qemu's `-m`: digits with an optional K, M, G or T suffix; none means MiB) in
/// MiB, rounded up; None when it is not such a size.
pub fn qemu_size_mib(s: &str) -> Option<u64> {
    let (digits, unit) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&s[..i], c.to_ascii_uppercase()),
        _ => (s, 'M'),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    match unit {
        'K' => Some(n.div_ceil(1024)),
        'M' => Some(n),
        'G' => n.checked_mul(1024),
        'T' => n.checked_mul(1024 * 1024),
        _ => None,
    }
}

/// `MemTotal` of /proc/meminfo, in KiB.
pub fn mem_total_kib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `guests` guests of `vm_memory` each fit in a host of `mem_total_kib`, leaving
/// [`HOST_RESERVE_MIB`]: Fail when they do not, Warn above 80 % of the host's memory, else Ok;
/// with the line `doctor` shows (the guests are `workers + vm_warm`).
pub fn memory_verdict(
    guests: u64,
    vm_memory: &str,
    mem_total_kib: u64,
) -> (crate::health::Status, String) {
    use crate::health::Status;
    let Some(each) = qemu_size_mib(vm_memory) else {
        return (
            Status::Fail,
            format!("vm_memory = {vm_memory:?} is not a size qemu's -m takes"),
        );
    };
    let need = each.saturating_mul(guests);
    let total = mem_total_kib / 1024;
    let line = format!(
        "{guests} guest(s) (workers + vm_warm) x {each} MiB (vm_memory) = {need} MiB of the \
         host's {total} MiB"
    );
    if need.saturating_add(HOST_RESERVE_MIB) > total {
        (
            Status::Fail,
            format!("{line}: more than it has, less {HOST_RESERVE_MIB} MiB for itself"),
        )
    } else if need.saturating_mul(5) > total.saturating_mul(4) {
        (Status::Warn, format!("{line}: above 80 %"))
    } else {
        (Status::Ok, line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_book_keeps_vm_warm_guests_within_the_budget() {
        let t = Instant::now();
        let mut b = Book::new(2, 2);
        assert_eq!(b.boots_wanted(), 2);
        let g1 = b.booting(t);
        assert_eq!(b.boots_wanted(), 1, "one booting counts as warm");
        let g2 = b.booting(t);
        assert_eq!(b.boots_wanted(), 0);
        assert!(b.ready(g1, t) && b.ready(g2, t + Duration::from_secs(1)));
        // two builds take both: two more may boot (2 slots + 2 warm = 4 guests)
        assert_eq!(b.take(t), Some(g1), "the one ready longest first");
        assert_eq!(b.take(t), Some(g2));
        assert_eq!(b.take(t), None, "none ready: the build boots its own");
        assert_eq!(b.boots_wanted(), 2);
        b.booting(t);
        b.booting(t);
        assert_eq!(b.counts().alive(), 4);
        assert_eq!(b.boots_wanted(), 0);
        // a build that found no warm guest boots its own: the budget holds
        b.gone(g1);
        b.cold_started();
        assert_eq!(b.counts().alive(), 4);
        assert_eq!(b.boots_wanted(), 0);
        b.cold_ended();
        assert_eq!(b.boots_wanted(), 0, "two booting already: vm_warm reached");
        assert_eq!(b.gone(g2), Some(WarmState::Taken));
        assert_eq!(b.gone(g2), None);
    }

    #[test]
    fn a_taken_guest_is_never_ready_again() {
        let t = Instant::now();
        let mut b = Book::new(1, 1);
        let g = b.booting(t);
        assert!(b.ready(g, t));
        assert_eq!(b.take(t), Some(g));
        assert!(!b.ready(g, t), "taken: never back in the pool");
        assert!(!b.ready(99, t), "not in the book");
        assert_eq!(b.take(t), None);
        let h = b.booting(t);
        assert_ne!(h, g, "ids are never reused");
        assert_eq!(
            b.counts(),
            Counts {
                booting: 1,
                taken: 1,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn vm_warm_zero_boots_nothing_ahead() {
        let mut b = Book::new(0, 4);
        assert_eq!(b.boots_wanted(), 0);
        b.cold_started();
        assert_eq!(b.boots_wanted(), 0);
        assert_eq!(b.take(Instant::now()), None);
    }

    #[test]
    fn a_guest_that_fails_its_check_is_dropped_and_replaced() {
        let t = Instant::now();
        let mut b = Book::new(1, 1);
        let g = b.booting(t);
        assert_eq!(b.gone(g), Some(WarmState::Booting));
        assert_eq!(b.boots_wanted(), 1);
        assert_eq!(b.take(t), None);
    }

    fn s(v: &[OsString]) -> Vec<String> {
        v.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn control_paths_ssh_takes() {
        let c = |p: &str| control_option(Path::new(p)).map(|o| o.to_string_lossy().into_owned());
        assert_eq!(
            c("/var/tmp/build-image-vm-warm-0123456789ab.ctl").as_deref(),
            Some("ControlPath=/var/tmp/build-image-vm-warm-0123456789ab.ctl")
        );
        assert_eq!(
            c("/srv/img tmp/100%/x.ctl").as_deref(),
            Some("ControlPath=\"/srv/img tmp/100%%/x.ctl\"")
        );
        assert_eq!(c("/a\"b/x.ctl"), None);
        let long = format!("/{}/x.ctl", "d".repeat(MAX_CONTROL_PATH));
        assert_eq!(c(&long), None, "too long for a unix socket");
    }

    #[test]
    fn lines_through_the_held_connection() {
        let key = std::path::PathBuf::from("/k/id");
        let ssh = Ssh {
            key: &key,
            port: 50022,
            connect_timeout: 10,
        };
        let ctl = control_option(Path::new("/t/g.ctl")).unwrap();
        let plain = ssh.ssh("true");
        let through = through_master(&plain, &ctl);
        assert_eq!(
            s(&through[..5]),
            [
                "ssh",
                "-o",
                "ControlMaster=no",
                "-o",
                "ControlPath=/t/g.ctl"
            ]
        );
        assert_eq!(s(&through[5..]), s(&plain[1..]), "the rest unchanged");
        let scp = ssh.scp_to(Path::new("/etc/resolv.conf"), "/etc/resolv.conf");
        assert_eq!(s(&through_master(&scp, &ctl)[..1]), ["scp"]);

        let m = s(&master(&ssh, &ctl));
        assert_eq!(
            m[..8],
            [
                "ssh",
                "-N",
                "-o",
                "ControlMaster=yes",
                "-o",
                "ControlPersist=no",
                "-o",
                "ControlPath=/t/g.ctl"
            ]
        );
        assert_eq!(
            m[m.len() - 3..],
            ["-p", "50022", "root@127.0.0.1"],
            "no remote command"
        );
        assert!(m.contains(&"BatchMode=yes".to_string()) && m.contains(&"/k/id".to_string()));
    }

    #[test]
    fn the_memory_budget_counts_every_guest() {
        use crate::health::Status;
        for (text, mib) in [
            ("1G", Some(1024)),
            ("512", Some(512)),
            ("512M", Some(512)),
            ("1536k", Some(2)),
            ("2T", Some(2 * 1024 * 1024)),
            ("", None),
            ("G", None),
            ("1.5G", None),
            ("1X", None),
            ("99999999999999999999G", None),
        ] {
            assert_eq!(qemu_size_mib(text), mib, "{text:?}");
        }
        let meminfo = "MemTotal:       24683520 kB\nMemFree:  1 kB\n";
        let total = mem_total_kib(meminfo).unwrap();
        assert_eq!(total, 24683520);
        assert_eq!(mem_total_kib("MemFree: 1 kB\n"), None);
        // 24105 MiB: 2 x 1 GiB fits; 20 x 1 GiB is above 80 %; 24 x 1 GiB does not fit
        let (st, line) = memory_verdict(2, "1G", total);
        assert_eq!(st, Status::Ok, "{line}");
        assert!(
            line.contains("2 guest(s)") && line.contains("2048 MiB"),
            "{line}"
        );
        assert_eq!(memory_verdict(20, "1G", total).0, Status::Warn);
        let (st, line) = memory_verdict(24, "1G", total);
        assert_eq!(st, Status::Fail, "{line}");
        assert_eq!(memory_verdict(1, "lots", total).0, Status::Fail);
    }

    const DF: &str = "/dev/vda 999320 221340 709168 24% /";

    #[test]
    fn health_verdicts() {
        let now = 1_800_000_000;
        assert_eq!(health_verdict(&format!("{now}\n{DF}\n"), now), Ok(()));
        assert_eq!(health_verdict(&format!("{}\n{DF}\n", now - 5), now), Ok(()));
        let late = health_verdict(&format!("{}\n{DF}\n", now - 60), now).unwrap_err();
        assert!(late.contains("-60 s off"), "{late}");
        let full = health_verdict(&format!("{now}\n/dev/vda 999320 999000 320 100% /\n"), now)
            .unwrap_err();
        assert!(full.contains("320 KiB free"), "{full}");
        for bad in [
            "",
            "Tue Dec 2\n",
            &format!("{now}\n"),
            &format!("{now}\nx y z\n"),
        ] {
            assert!(health_verdict(bad, now).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_health_command_reads_the_clock_and_the_job_roots_free_space() {
        let cmd = health_remote();
        assert!(cmd.starts_with("date +%s"), "{cmd}");
        let root = super::super::commands::GUEST_JOB_ROOT;
        assert!(
            root.starts_with("/var/tmp/"),
            "df of the job root's parent: {root}"
        );
        assert!(cmd.contains("df -Pk /var/tmp"), "{cmd}");
    }

    #[test]
    fn the_take_is_one_session_health_first_version_last() {
        let r = take_remote(
            "/var/tmp/build-image/7",
            "/var/tmp/build-image/7/a b.ks",
            None,
            "mic --version",
        );
        assert!(r.starts_with("{ date +%s && df -Pk /var/tmp | tail -n 1; } && { mkdir -p -- /var/tmp/build-image/7; }"), "{r}");
        assert!(
            r.contains("{ cat > '/var/tmp/build-image/7/a b.ks'; }"),
            "{r}"
        );
        assert!(
            r.ends_with("&& { echo '--- mic --version'; } && { mic --version 2>&1 || true; }"),
            "{r}"
        );
        assert!(!r.contains("mount"), "no 9p: {r}");
        let r = take_remote("/g", "/g/k.ks", Some("/var/cache/mic"), "mic --version");
        let cache = r.find("mic_cache /var/cache/mic").unwrap();
        let out = r.find("mic_output /g").unwrap();
        let ks = r.find("cat > /g/k.ks").unwrap();
        assert!(
            cache < out && out < ks,
            "mounts, then the kickstart into the share: {r}"
        );
        // the shell parses it: every brace group closed
        let st = std::process::Command::new("sh")
            .args(["-n", "-c", &r])
            .status()
            .unwrap();
        assert!(st.success(), "{r}");
    }

    #[test]
    fn the_take_answer_splits_at_the_mark() {
        let (h, v) = take_answer(
            "1700000000\n/dev/vda 100 1 99999 1% /\n--- mic --version\n\nmic 0.28.20\n",
        );
        assert_eq!(health_verdict(&h, 1_700_000_001), Ok(()));
        assert_eq!(v.as_deref(), Some("mic 0.28.20"));
        let (h, v) = take_answer("1700000000\n");
        assert_eq!((h.as_str(), v), ("1700000000\n", None));
    }
}
