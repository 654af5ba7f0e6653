//! What operators use, over the engine and the spool: the queries of the log ([`ops`]: status,
//! show, events, replay), a job's build log ([`joblog`]), the log over years ([`archive`]:
//! import, backup, compact, repush, redeliver; [`export`]: the export form and its trailer), and
//! the control socket that answers them for a running daemon ([`control`]). The command line
//! (`cli`) and the HTTP server sit on top.
//!
//! Invariant: an operator surface reads the log and acts only through the engine's actions, so
//! what a command, the socket and a page say of a job is the same, daemon running or not.

pub mod archive;
pub mod control;
pub mod export;
pub mod hosts;
pub mod joblog;
pub mod ops;

use crate::config::Config;
use crate::edges::spool::Spool;
use crate::engine::Engine;
use std::sync::Arc;

/// One worker as operators reach it: its config, its engine (with the log), and its spool.
pub struct Host {
    pub cfg: Arc<Config>,
    pub engine: Arc<Engine>,
    pub spool: Spool,
}
