//! What a part of the daemon says about its own health that is not a job's: a connection to a
//! broker, say. A part registers a probe under a name (`amqp`) while it runs; `/healthz`,
//! `/metrics` and `status` ask every probe when they are asked, so what they show is never
//! older than the request.
//!
//! Invariant: a probe only looks (it reads shared state; no I/O, no lock held while it runs
//! other than its own), so asking is cheap and cannot hang a probe request.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// How a part is doing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Condition {
    /// Working as it should.
    pub ok: bool,
    /// What it is doing, or why it is not working (never a secret).
    pub detail: String,
    /// What `/metrics` shows of it, each a gauge family of its own.
    pub gauges: Vec<Gauge>,
}

/// A number a part shows in `/metrics` (a gauge family with no labels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gauge {
    pub name: &'static str,
    pub help: &'static str,
    pub value: i64,
}

type Probe = Arc<dyn Fn() -> Condition + Send + Sync>;

/// The probes of the running parts, by name.
#[derive(Default)]
pub struct Conditions(Mutex<BTreeMap<String, Probe>>);

impl Conditions {
    /// Registers (or replaces) the probe of `name`.
    pub fn register(&self, name: &str, probe: impl Fn() -> Condition + Send + Sync + 'static) {
        self.probes().insert(name.to_string(), Arc::new(probe));
    }

    /// The part `name` is gone (stopped): nothing to show for it.
    pub fn remove(&self, name: &str) {
        self.probes().remove(name);
    }

    /// Every part's condition now, by name.
    pub fn now(&self) -> Vec<(String, Condition)> {
        let probes: Vec<(String, Probe)> = self
            .probes()
            .iter()
            .map(|(n, p)| (n.clone(), Arc::clone(p)))
            .collect();
        probes.into_iter().map(|(n, p)| (n, p())).collect()
    }

    /// The condition of `name`, if such a part runs.
    pub fn get(&self, name: &str) -> Option<Condition> {
        let probe = self.probes().get(name).cloned();
        probe.map(|p| p())
    }

    fn probes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Probe>> {
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn probes_are_asked_when_asked_and_removed() {
        let c = Conditions::default();
        assert!(c.now().is_empty());
        let up = Arc::new(AtomicBool::new(false));
        let u = Arc::clone(&up);
        c.register("amqp", move || Condition {
            ok: u.load(Ordering::SeqCst),
            detail: "x".into(),
            gauges: Vec::new(),
        });
        assert!(!c.get("amqp").unwrap().ok);
        up.store(true, Ordering::SeqCst);
        assert!(c.now()[0].1.ok);
        c.remove("amqp");
        assert_eq!(c.get("amqp"), None);
    }
}
