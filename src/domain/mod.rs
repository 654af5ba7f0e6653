//! The words of the farm, with no I/O and no knowledge of how work arrives or leaves: the
//! workitem and its normalised spec, where a job came from and where its answer goes, the
//! events of a job's life, the job as the fold of its events, the lifecycle's decisions, and
//! which characters are unsafe on a terminal (refused in names, escaped by every printer).
//!
//! Invariant: nothing here imports any other part of the crate; every other part may import
//! it. A job's state changes only by `Job::apply`, and what is left to do for a job is only
//! ever `lifecycle::next_step`.

pub mod event;
pub mod failure;
pub mod farm;
pub mod job;
pub mod lifecycle;
pub mod origin;
pub mod text;
pub mod workitem;

pub use event::{Cause, Event, EventKind, FARM, Input, Mode, Status, Tag};
pub use failure::Failure;
pub use job::{Job, Jobs, State};
pub use origin::{Origin, Receipt, ReplyTo};
