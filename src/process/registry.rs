//! Where the process groups of running children are recorded (`Registry`), so that a daemon
//! restarted after SIGKILL can kill what its previous life left running (`kill_leftovers`): the
//! pool of slot files, their fixed-width records, and the members of a group read from /proc.
//!
//! Invariant: every group started through a `Registry` is recorded in its directory while it
//! runs, from whatever thread started it, and its record is blanked when it is gone. A group left
//! by an earlier life is killed only if all its members started no earlier than the recorded
//! leader (so a reused pgid is left alone); this registry's own slots are never touched.

use super::kill_group;
use nix::unistd::Pid;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Where the process groups of running children are recorded, so that a daemon restarted after
/// SIGKILL can kill what its previous life left running ([`Registry::kill_leftovers`]).
///
/// The directory holds a pool of slot files `slot-N`, each one fixed-width record ("pgid
/// start-time") written in place while a group runs and blanked when it is gone: no file is
/// created or deleted per child in the steady state (on ext4, creating and deleting an inode per
/// child costs more than the child's own spawn). A slot is taken by one running child at a time,
/// from any thread. Records are not fsynced: the registry is for a daemon that was killed while
/// the machine ran on; a machine that went down took every process group with it.
#[derive(Clone)]
pub struct Registry(Option<Arc<RegistryInner>>);

struct RegistryInner {
    dir: PathBuf,
    pool: Mutex<SlotPool>,
}

#[derive(Default)]
struct SlotPool {
    free: Vec<Slot>,
    /// Slots `slot-0` .. `slot-<made - 1>` belong to this registry.
    made: usize,
}

struct Slot {
    file: File,
}

impl Registry {
    /// Registers groups in `dir` (created when first needed).
    pub fn new(dir: PathBuf) -> Registry {
        Registry(Some(Arc::new(RegistryInner {
            dir,
            pool: Mutex::new(SlotPool::default()),
        })))
    }

    /// Registers nothing (tests, one-shot commands).
    pub fn none() -> Registry {
        Registry(None)
    }

    /// Kills the groups recorded by an earlier life of this daemon that are still running, and
    /// removes their records (this registry's own slots are left alone). A group is killed only
    /// if its members all started no earlier than the recorded leader (so a reused id is left
    /// alone). Returns the pgids killed.
    pub fn kill_leftovers(&self) -> Vec<i32> {
        let mut killed = Vec::new();
        let Some(inner) = &self.0 else {
            return killed;
        };
        let pool = inner.pool.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(rd) = std::fs::read_dir(&inner.dir) else {
            return killed;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let ours = name
                .strip_prefix("slot-")
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n < pool.made);
            if ours {
                continue;
            }
            let path = e.path();
            // `slot-N` or an older daemon's `t<tid>`: "pgid start" (or blank); `<pgid>`: "start".
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let fields: Vec<&str> = text.split_whitespace().collect();
            let (pgid, start): (Option<i32>, Option<u64>) = match fields.as_slice() {
                [pgid, start] => (pgid.parse().ok(), start.parse().ok()),
                [start] => (name.parse().ok(), start.parse().ok()),
                _ => (None, None),
            };
            if let (Some(pgid), Some(start)) = (pgid, start) {
                let members = group_members(pgid);
                if pgid > 1 && !members.is_empty() && members.iter().all(|(_, st)| *st >= start) {
                    log::warn!("killing process group {pgid} left running by an earlier daemon");
                    kill_group(Pid::from_raw(pgid));
                    killed.push(pgid);
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        killed
    }

    /// Records the group led by `pid` until the returned value is dropped.
    pub(super) fn register(&self, pid: i32) -> Registered<'_> {
        let none = Registered {
            inner: None,
            slot: None,
        };
        let Some(inner) = &self.0 else {
            return none;
        };
        let Some(start) = start_time(pid) else {
            return none;
        };
        let slot = {
            let mut pool = inner.pool.lock().unwrap_or_else(|p| p.into_inner());
            match pool.free.pop() {
                Some(s) => Ok(s),
                None => {
                    let path = inner.dir.join(format!("slot-{}", pool.made));
                    let opened = std::fs::create_dir_all(&inner.dir).and_then(|()| {
                        std::fs::OpenOptions::new()
                            .create(true)
                            .truncate(false)
                            .write(true)
                            .mode(0o600)
                            .custom_flags(nix::libc::O_NOFOLLOW)
                            .open(&path)
                    });
                    match opened {
                        Ok(file) => {
                            pool.made += 1;
                            Ok(Slot { file })
                        }
                        Err(e) => Err(e),
                    }
                }
            }
        };
        let slot = match slot {
            Ok(s) => s,
            Err(e) => {
                log::warn!("cannot register process group {pid}: {e}");
                return none;
            }
        };
        if let Err(e) = slot.file.write_all_at(record(pid, start).as_bytes(), 0) {
            log::warn!("cannot register process group {pid}: {e}");
        }
        Registered {
            inner: Some(inner),
            slot: Some(slot),
        }
    }
}

/// A running group's record; blanked and its slot handed back when dropped.
pub(super) struct Registered<'a> {
    inner: Option<&'a RegistryInner>,
    slot: Option<Slot>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        // A slot that cannot be blanked is not reused (its record names a dead group, which the
        // next life only removes).
        if let (Some(inner), Some(slot)) = (self.inner, self.slot.take())
            && slot.file.write_all_at(blank().as_bytes(), 0).is_ok()
        {
            inner
                .pool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .free
                .push(slot);
        }
    }
}

/// A registry record: fixed width, so a rewrite in place replaces the whole of the last one.
fn record(pgid: i32, start: u64) -> String {
    format!("{pgid:>10} {start:>20}\n")
}

/// A blank record, as long as `record`'s.
fn blank() -> String {
    format!("{:31}\n", "")
}

/// The start time (clock ticks since boot) of a process, from /proc.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Live (not zombie) members of a process group, with their start times.
pub(super) fn group_members(pgid: i32) -> Vec<(i32, u64)> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
            // state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
            // cutime cstime priority nice threads itrealvalue starttime
            let pgrp: i32 = fields.get(2)?.parse().ok()?;
            let start: u64 = fields.get(19)?.parse().ok()?;
            (pgrp == pgid && fields.first() != Some(&"Z")).then_some((pid, start))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::tests::argv;
    use super::super::{Outcome, Output, Run, group_alive, run};
    use super::*;
    use crossbeam_channel::bounded;
    use std::time::Duration;

    #[test]
    fn registered_groups_are_killed_by_the_next_life() {
        let dir = tempfile::tempdir().unwrap();
        let reg_dir = dir.path().join("groups");
        let pidfile = dir.path().join("pid");
        let script = format!("echo $$ > {}; sleep 300", pidfile.display());
        let a = argv(&["sh", "-c", &script]);
        let (tx, rx) = bounded::<()>(1);
        let registry = Registry::new(reg_dir.clone());
        let reg2 = registry.clone();
        // a thread that runs the child and is then abandoned, as a SIGKILLed daemon would
        let t = std::thread::spawn(move || {
            run(Run {
                argv: &a,
                env: vec![],
                stdin: None,
                output: Output::Null,
                timeout: Duration::from_secs(600),
                cancel: Some(&rx),
                registry: &reg2,
            })
        });
        let slot = reg_dir.join("slot-0");
        assert!(crate::wait::wait_for(Duration::from_secs(10), || {
            std::fs::read_to_string(&pidfile).is_ok_and(|p| p.trim().parse::<i32>().is_ok())
                && std::fs::read_to_string(&slot).is_ok_and(|s| !s.trim().is_empty())
        }));
        let pgid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(group_alive(pgid));
        // this life's own slots are never touched
        assert!(registry.kill_leftovers().is_empty());
        assert!(group_alive(pgid));
        // the next life sees them
        let next = Registry::new(reg_dir.clone());
        assert_eq!(next.kill_leftovers(), vec![pgid]);
        assert!(crate::wait::wait_for(Duration::from_secs(10), || {
            !group_alive(pgid)
        }));
        assert_eq!(std::fs::read_dir(&reg_dir).unwrap().count(), 0);
        drop(tx);
        let _ = t.join();
        // an entry whose group is gone is only removed
        std::fs::write(reg_dir.join("999999"), "1").unwrap();
        assert!(next.kill_leftovers().is_empty());
        assert_eq!(std::fs::read_dir(&reg_dir).unwrap().count(), 0);
    }

    #[test]
    fn slots_are_reused_and_blanked() {
        let dir = tempfile::tempdir().unwrap();
        let reg_dir = dir.path().join("groups");
        let registry = Registry::new(reg_dir.clone());
        let a = argv(&["true"]);
        for _ in 0..20 {
            let o = run(Run {
                argv: &a,
                env: vec![],
                stdin: None,
                output: Output::Null,
                timeout: Duration::from_secs(10),
                cancel: None,
                registry: &registry,
            })
            .unwrap();
            assert_eq!(o, Outcome::Exited(0));
        }
        let names: Vec<String> = std::fs::read_dir(&reg_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["slot-0".to_string()]);
        assert!(
            std::fs::read_to_string(reg_dir.join("slot-0"))
                .unwrap()
                .trim()
                .is_empty()
        );
    }
}
