//! The engine: moves every job through its life, whatever brought it and wherever its answer
//! goes. Sources at the edge hand it submissions ([`intake`]); it records each step in the
//! event log ([`store`]) before acting on it, decides the next step by the lifecycle, runs
//! builds in slots ([`slots`], [`pool`]) through a builder, sends answers through the
//! answerer of each job's reply destination ([`answer`]), pushes statuses ([`pusher`]), and
//! moves stalled or recovered jobs on ([`driver`], [`timer`]). Operator actions on jobs are in
//! [`actions`]; taking the host out of the farm and back is [`drain`].
//!
//! Invariants: the engine knows no transport — what it needs of the world is in [`ports`];
//! every step records its event durably before anything acts on it and can be done again
//! after a crash (recovery is the normal steps run over the open jobs); an input held where
//! inputs wait belongs to exactly one live job (its own input, or an unanswered re-drop).
//!
//! One `Engine` value holds the parts; each part's state lives in its own module's type and
//! each module adds the `Engine` methods of its step.

pub mod actions;
pub mod answer;
pub mod attest;
pub mod backoff;
mod drain;
pub mod driver;
pub mod intake;
pub mod leaks;
pub mod pool;
pub mod ports;
pub mod pusher;
pub mod retention;
pub mod slots;
pub mod statedir;
pub mod store;
pub mod timer;

use crate::config::Config;
use crate::imaging::Builder;
use crate::process::Registry;
use ports::{Inputs, PortError, StatusPush};
use pusher::Pusher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Port(#[from] PortError),
    /// An operator action that does not apply to the job (the reason is the message).
    #[error("{0}")]
    Refused(String),
    /// Not now (a full disk, a peer away, a file still being written): tried again later.
    #[error("deferred: {0}")]
    Deferred(String),
}

impl From<crate::journal::JournalError> for EngineError {
    fn from(e: crate::journal::JournalError) -> Self {
        EngineError::Store(e.into())
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// What the engine is given to work with.
pub struct Parts {
    pub cfg: Arc<Config>,
    /// This daemon's worker id (recorded in claims; a worker moves only its own jobs).
    pub worker: String,
    pub store: Arc<Store>,
    pub registry: Registry,
    /// Where claimed inputs wait.
    pub inputs: Arc<dyn Inputs>,
    pub builder: Arc<dyn Builder>,
    /// The status push (None: statuses are only logged).
    pub push: Option<Arc<dyn StatusPush>>,
    /// False for a command that opened the log while no daemon runs: it pushes nothing by
    /// itself (the lifecycle asks for a final status again at the next start); only an
    /// operator's `repush` runs the push, in the command's own thread.
    pub pushes: bool,
}

pub struct Engine {
    pub cfg: Arc<Config>,
    pub worker: String,
    pub store: Arc<Store>,
    pub registry: Registry,
    /// What the running edges say about their own health (a broker connection).
    pub conditions: crate::conditions::Conditions,
    /// The farm's host records heard on the farm exchange (AMQP), the latest of each worker.
    pub hosts: crate::hosts::Board,
    inputs: Arc<dyn Inputs>,
    builder: Arc<dyn Builder>,
    answerers: answer::Answerers,
    pusher: Pusher,
    slots: slots::Slots,
    stalls: driver::Stalls,
    intake: intake::Intake,
    leak_pass: leaks::LeakPass,
    retention: retention::Retention,
    attest: attest::Attest,
    stopping: AtomicBool,
    /// Opened by a command while no daemon runs (it pushes and builds nothing).
    offline: bool,
}

impl Engine {
    /// The builder's warm pool figures (KVM with `vm_warm > 0`).
    pub fn warm_figures(&self) -> Option<crate::imaging::kvm::warm::Figures> {
        self.builder.warm()
    }

    /// At a stop, once the builds are over: the builder lets go of what it keeps between
    /// builds (warm guests).
    pub fn stop_builder(&self) {
        self.builder.stop();
    }

    pub fn new(p: Parts) -> std::io::Result<Engine> {
        let offline = !p.pushes;
        let push = p.push.filter(|_| p.cfg.hooks.push.is_some());
        let pusher = Pusher::start(Arc::clone(&p.store), push, Arc::clone(&p.cfg), p.pushes)?;
        Ok(Engine {
            cfg: p.cfg,
            worker: p.worker,
            store: p.store,
            registry: p.registry,
            conditions: crate::conditions::Conditions::default(),
            hosts: crate::hosts::Board::default(),
            inputs: p.inputs,
            builder: p.builder,
            answerers: answer::Answerers::default(),
            pusher,
            slots: slots::Slots::default(),
            stalls: driver::Stalls::default(),
            intake: intake::Intake::default(),
            leak_pass: leaks::LeakPass::default(),
            retention: retention::Retention::default(),
            attest: attest::Attest::default(),
            stopping: AtomicBool::new(false),
            offline,
        })
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// A stop began: nothing more is started (builds, claims); running work is left to end.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Was this engine opened by a command while no daemon runs?
    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// Is this job this worker's to move (its claim names this worker, or none)?
    pub fn is_mine(&self, job: &crate::domain::Job) -> bool {
        job.worker.as_deref().is_none_or(|w| w == self.worker)
    }
}

#[cfg(test)]
pub(crate) mod testkit;
