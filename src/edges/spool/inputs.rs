//! `active/<worker>/` as the engine's [`Inputs`]: the place where this worker's claimed inputs
//! wait until they are answered. Dropped files arrive here by the claim's rename; bodies that
//! came whole from another source (a message) are kept here under a hidden name of their own,
//! `.<origin>-<nanos>-<n>.json`, which no dropped file can have (`incoming/` ignores hidden
//! names).
//!
//! Invariants: a kept body is written tmp + fsync + rename without replace, and the folder is
//! fsynced before `keep` returns, so its claim is never recorded before it is durable; an input
//! is read without following a symlink and never beyond `max_bytes`; a rejected input goes to
//! `rejected/` under a visible name (a kept body's leading dot dropped), never over another.

use super::{Spool, SpoolError};
use crate::domain::Origin;
use crate::engine::ports::{Held, InputRead, Inputs, PortError, PortResult};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// Is this name in `active/` a kept body (`.<word>-<digits>-<digits>.json`)?
pub fn is_kept_name(name: &str) -> bool {
    let Some(stem) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".json")) else {
        return false;
    };
    let mut parts = stem.split('-');
    let word = parts.next().unwrap_or_default();
    let numbers: Vec<&str> = parts.collect();
    !word.is_empty()
        && word.bytes().all(|b| b.is_ascii_lowercase())
        && numbers.len() == 2
        && numbers
            .iter()
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A free name for a body kept for `origin`.
fn kept_name(origin: &Origin) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        ".{}-{nanos}-{}.json",
        origin.name(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn port(e: SpoolError) -> PortError {
    let no_space = matches!(&e, SpoolError::Durable(d) if d.is_no_space());
    PortError {
        message: e.to_string(),
        no_space,
    }
}

impl Inputs for Spool {
    fn read(&self, name: &str, max_bytes: u64) -> InputRead {
        match self.read_claimed(name, max_bytes) {
            Ok(c) => InputRead {
                name: c.name,
                bytes: c.bytes,
                sha256: c.sha256,
                unreadable: c.unreadable,
            },
            Err(e) => InputRead {
                name: name.to_string(),
                unreadable: Some(if e.is_not_found() {
                    "the claimed file disappeared from active/ before it was read".into()
                } else {
                    e.to_string()
                }),
                ..InputRead::default()
            },
        }
    }

    fn keep(&self, origin: &Origin, bodies: &[&[u8]]) -> PortResult<Vec<String>> {
        let mut names = Vec::with_capacity(bodies.len());
        let written = bodies.iter().try_for_each(|body| {
            let name = kept_name(origin);
            let path = self.active_path(&name);
            names.push(name);
            crate::durable::write_new(&path, body, 0o644).map(|_| ())
        });
        let done = written.and_then(|()| crate::durable::sync_dir(&self.active));
        if let Err(e) = done {
            for n in &names {
                let _ = std::fs::remove_file(self.active_path(n));
            }
            return Err(port(e.into()));
        }
        Ok(names)
    }

    fn name_for(&self, origin: &Origin) -> String {
        kept_name(origin)
    }

    fn keep_named(&self, name: &str, body: &[u8]) -> PortResult<()> {
        let path = self.active_path(name);
        let done = crate::durable::write_new(&path, body, 0o644)
            .and_then(|_| crate::durable::sync_dir(&self.active));
        if let Err(e) = done {
            let _ = std::fs::remove_file(&path);
            return Err(port(e.into()));
        }
        Ok(())
    }

    fn release(&self, name: &str) -> PortResult<()> {
        let path = self.active_path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(PortError::from_io(
                format!("cannot remove {}: {e}", path.display()),
                &e,
            )),
        }
    }

    fn reject(&self, name: &str, reason: &str) -> PortResult<String> {
        // A kept body's hidden name is shown in rejected/.
        Spool::reject(
            self,
            &self.active_path(name),
            name.trim_start_matches('.'),
            reason,
        )
        .map_err(port)
    }

    fn holds(&self, name: &str) -> bool {
        self.active_path(name).symlink_metadata().is_ok()
    }

    fn held(&self) -> PortResult<Vec<Held>> {
        Ok(self
            .active_files()
            .map_err(port)?
            .into_iter()
            .map(|name| Held {
                kept: is_kept_name(&name),
                // A claimed file was dropped into incoming/; a kept body's origin is not told
                // by its name (one whose claim was never recorded is released).
                origin: Origin::Spool,
                name,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_names_are_hidden_unique_and_known() {
        let origin = Origin::Broker { source: None };
        let a = kept_name(&origin);
        let b = kept_name(&origin);
        assert_ne!(a, b);
        assert!(a.starts_with(".amqp-"), "{a}");
        assert!(is_kept_name(&a) && super::super::ignored_name(&a));
        for not in [
            "amqp-1-2.json",
            ".alive",
            ".amqp-1.json",
            ".amqp-1-2.json.tmp",
            "..amqp-1-2.json.3-4.tmp",
            ".-1-2.json",
        ] {
            assert!(!is_kept_name(not), "{not}");
        }
    }

    #[test]
    fn bodies_are_kept_read_back_rejected_visibly_and_released() {
        let d = tempfile::tempdir().unwrap();
        let sp = Spool::new(d.path(), "w1");
        sp.create_dirs().unwrap();
        let origin = Origin::Broker { source: None };
        let names = sp.keep(&origin, &[b"{}", b"not json"]).unwrap();
        assert_eq!(names.len(), 2);
        let held = sp.held().unwrap();
        assert!(held.iter().all(|h| h.kept), "{held:?}");
        let r = Inputs::read(&sp, &names[0], 100);
        assert_eq!((r.bytes.as_slice(), r.unreadable), (&b"{}"[..], None));
        let shown = Inputs::reject(&sp, &names[1], "not JSON").unwrap();
        assert!(!shown.starts_with('.'), "{shown}");
        assert_eq!(
            std::fs::read(sp.rejected.join(&shown)).unwrap(),
            b"not json"
        );
        sp.release(&names[0]).unwrap();
        sp.release(&names[0]).unwrap();
        assert!(!sp.holds(&names[0]));
        let gone = Inputs::read(&sp, "nothing.json", 100);
        assert!(gone.unreadable.unwrap().contains("disappeared"));
    }
}
