//! build-image: the `build_image` stage of an image build farm, event-sourced.
//!
//! The layers, from the bottom (docs/architecture.md has the map):
//! - `domain`: the words (workitem, origin and reply destination, events, the job as a fold
//!   of its events, the lifecycle's decisions); `journal`: the event log on disk;
//!   `process`: every child process; `artifacts`: a build's files as artifacts (their sha256,
//!   `SHA256SUMS`); `imaging`: the builders (mic command lines, native, KVM);
//! - `engine`: moves every job through its life (intake, steps, build slots, answering,
//!   pushes, recovery) and knows no transport: it asks the world through its `ports`;
//! - `edges`: the spool and AMQP (sources and answerers) and the push utility;
//! - `operate`: queries, operator actions and the control socket; `http`: the status page,
//!   API and metrics; `cli`: the command line; `daemon::run` wires it all as a library
//!   function.

pub mod artifacts;
pub mod cli;
pub mod conditions;
pub mod config;
pub mod daemon;
pub mod digest;
pub mod domain;
pub mod durable;
pub mod edges;
pub mod engine;
pub mod health;
pub mod hosts;
pub mod http;
pub mod imaging;
pub mod journal;
pub mod legacy;
pub mod notify;
pub mod operate;
pub mod process;
pub mod wait;
