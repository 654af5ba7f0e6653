//! build-image: the `build_image` stage of an image build farm, event-sourced.
//!
//! Data flows one way: `spool` (watch, claim) → `journal` (events, fold) held by `store` →
//! `lifecycle` (what is left to do for a job) carried out by `stage` → `pool` → `imaging` (mic
//! command lines, native, kvm) → `outbox` → `pusher`/`hooks`. `daemon::run` is the whole
//! daemon as a library function; `control` is the operator protocol; `http` the read-only status page, API and metrics; `cli` is the command line
//! around it.

pub mod amqp;
pub mod archive;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod durable;
pub mod health;
pub mod hooks;
pub mod http;
pub mod imaging;
pub mod joblog;
pub mod journal;
pub mod legacy;
pub mod lifecycle;
pub mod notify;
pub mod ops;
pub mod outbox;
pub mod pool;
pub mod process;
pub mod pusher;
pub mod spool;
pub mod stage;
pub mod store;
pub mod wait;
pub mod workitem;
