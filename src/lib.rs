//! build-image: the `build_image` stage of an image build farm, event-sourced.
//!
//! Data flows one way: `spool` (watch, claim) → `journal` (events, fold) → `pool` → `build`
//! (mic command lines, native, kvm) → outbox (`stage::deliver`) → `hooks`. `daemon::run` is the
//! whole daemon as a library function; `cli` is the command line around it.

pub mod build;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod durable;
pub mod hooks;
pub mod journal;
pub mod ops;
pub mod pool;
pub mod process;
pub mod spool;
pub mod stage;
pub mod wait;
pub mod workitem;
