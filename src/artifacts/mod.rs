//! Images as artifacts: what a build's files are known by after the build (their sha256, the
//! `SHA256SUMS` file of a job folder). Formats and digests only: this module reads what it is
//! handed and writes nothing; the builders (`imaging`) decide which files are a build's and
//! where the results go.

pub mod policy;
pub mod sums;
