//! The edges: how work arrives and how answers and statuses leave. Each adapter owns its
//! config section, its URL or file-name conventions and its health checks, and speaks to the
//! engine only through submissions and the engine's ports.
//!
//! - [`spool`]: dropped files (the claim loop), the outbox (the answerer of `outbox`
//!   replies), and `active/<worker>/` as the place every held input waits;
//! - [`amqp`]: the BOSS participant (workitem messages in, answers published);
//! - [`hooks`]: the status push utility.

pub mod amqp;
pub mod hooks;
pub mod spool;
