//! The read-only HTTP server (`[http] listen`): the status page (`/`), a job's page
//! (`/jobs/ID`, its build log at `/jobs/ID/log`, streamed at `/jobs/ID/log/stream`), the API
//! (`/api/jobs`, `/api/jobs/ID`), `/metrics` and `/healthz`.
//!
//! Invariants:
//! - It changes nothing: only GET and HEAD are served (others: 405), and every answer is read
//!   from the store the daemon records into.
//! - The API answers with the functions the operator commands use (`control::handle` for
//!   `status`, `ops::show` for `show`), so `/api/jobs` is `status --json` and `/api/jobs/ID`
//!   is `show --json`.
//! - `/metrics` reads memory only ([`metrics::Metrics`], kept by the store's observer).
//! - Bounded, each kind of request within a budget of its own ([`Budgets`]: probes, pages up
//!   to `max_connections`, live streams up to `max_streams`; past one, 503 at once), one request per
//!   connection, request heads of at most `MAX_HEAD` bytes read within `HEAD_TIMEOUT`, every
//!   connection cut after `CONNECTION_LIFETIME`; ids are job numbers or image_ids of
//!   `[A-Za-z0-9._-]`, and no path is built from a request (the log's path comes from the job).
//! - A job's build log is read only through the project's one job-log reader
//!   ([`crate::imaging::logread`]), by stream position: what is shown is never torn by the log's
//!   size cut, and what the cut left out is said.
//!
//! It runs on one thread of its own (a single-threaded tokio runtime for hyper); the reads of
//! the log run on a few blocking threads beside it.
//!
//! Its parts: `routes.rs` (what a request asks for), `app.rs` (the handlers, plain functions to
//! a [`Reply`]), `logview.rs` (a job's build log as the pages and the live stream show it),
//! `server.rs` (the listener, its bounds, and hyper), [`pages`] (the markup) and [`metrics`].

mod app;
mod budget;
pub mod exposition;
mod logview;
pub mod metrics;
pub mod pages;
mod routes;
mod server;

pub use app::{App, DEFAULT_PAGE, MAX_PAGE, PAGE_SCAN, Reply, newest};
pub use budget::{Budgets, Kind, PROBES};
pub use logview::{LOG_TAIL, is_live, read_tail, sse_chunk};
pub use routes::{Route, query_params, route, valid_id};
pub use server::{
    CONNECTION_LIFETIME, HEAD_TIMEOUT, MAX_HEAD, PROBE_LIFETIME, STREAM_HEARTBEAT, STREAM_LIFETIME,
    STREAM_POLL, Server,
};
