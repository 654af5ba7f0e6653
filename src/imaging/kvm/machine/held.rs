//! The ssh connection held open to a warm guest (`<stem>.ctl`, docs/kvm.md "Warm guests"): ssh
//! as a control master on a thread of its own while the guest waits, so that the build that
//! takes it opens sessions on it and pays no key exchange.
//!
//! Invariant: the master runs as a child registered like every other (its own process group,
//! killed at a stop); [`Machine::end_master`] ends it and waits for its thread.

use super::Machine;
use crate::imaging::mic;
use crate::process::{self, Output, Run};
use crossbeam_channel::Sender;
use std::thread::JoinHandle;
use std::time::Duration;

/// The held ssh connection's socket must appear within this long.
const MASTER_WAIT: Duration = Duration::from_secs(30);

/// The ssh connection held open to a warm guest: `ssh -N` as a control master, run by
/// `process::run` on a thread of its own; a message (or the sender dropped) ends it.
pub(super) struct Master {
    stop: Sender<()>,
    pub(super) thread: JoinHandle<()>,
}

impl Machine {
    /// A warm guest: the ssh connection held open while it waits (`<stem>.ctl`), so that the
    /// build that takes it pays no key exchange. None of it is a failure: without the socket
    /// (a path ssh cannot take, a master that did not start) the guest is reached as a cold one.
    pub(in crate::imaging::kvm) fn hold_connection(&mut self) {
        let ctl = self.path("ctl");
        let Some(control) = crate::imaging::kvm::warm::control_option(&ctl) else {
            self.note(&format!(
                "{} is too long for an ssh control socket: no held connection",
                ctl.display()
            ));
            return;
        };
        let argv = crate::imaging::kvm::warm::master(&self.ssh(10), &control);
        self.note(&format!("$ {} &", mic::display(&argv)));
        let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
        let registry = self.registry.clone();
        let sink = self.log.sink();
        let thread = std::thread::Builder::new()
            .name("warm-ssh".into())
            .spawn(move || {
                let _ = process::run(Run {
                    argv: &argv,
                    env: vec![],
                    stdin: None,
                    output: Output::Sink(sink),
                    // the guest's whole life; ended by `stop`
                    timeout: Duration::from_secs(365 * 24 * 3600),
                    cancel: Some(&stopped),
                    registry: &registry,
                });
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                self.note(&format!("cannot start the held connection's thread: {e}"));
                return;
            }
        };
        self.master = Some(Master { stop, thread });
        let up = crate::wait::wait_for(MASTER_WAIT, || {
            ctl.exists() || self.master.as_ref().is_none_or(|m| m.thread.is_finished())
        });
        if up && ctl.exists() {
            self.control = Some(control);
            self.note("held connection open");
        } else {
            self.note("the held connection did not open: the guest is reached without it");
            self.end_master();
        }
    }

    pub(super) fn end_master(&mut self) {
        if let Some(m) = self.master.take() {
            let _ = m.stop.send(());
            let _ = m.thread.join();
        }
        self.control = None;
    }
}
