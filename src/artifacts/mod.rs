//! Images as artifacts: what a build's files are known by after the build (their sha256, the
//! `SHA256SUMS` file of a job folder), the provenance statement that ties them to the build's
//! inputs, its signature, and the check of an image against it. Formats, digests and keys: this
//! module knows files, never the log or a transport; the builders (`imaging`) decide which files
//! are a build's, the engine when the statement is written.

pub mod dsse;
pub mod key;
pub mod policy;
pub mod provenance;
pub mod sums;
pub mod verify;
