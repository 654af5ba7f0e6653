//! The in-toto framework's own verifiers (Python: in-toto-attestation, securesystemslib), run on
//! a build's provenance through `tests/fixtures/verify_provenance.py`.

use super::fixtures;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The python that has the in-toto framework's verifiers (`.ci/run` makes a venv with them and
/// names its python in `BUILD_IMAGE_TEST_PYTHON`). Missing, the test fails saying what to install.
pub fn python() -> PathBuf {
    const HOW: &str = "BUILD_IMAGE_TEST_PYTHON must name a python3 with the in-toto verifiers: \
                       python3 -m venv target/pyvenv && target/pyvenv/bin/pip install \
                       in-toto-attestation securesystemslib cryptography, then \
                       BUILD_IMAGE_TEST_PYTHON=target/pyvenv/bin/python (.ci/run does this)";
    let p = std::env::var_os("BUILD_IMAGE_TEST_PYTHON").unwrap_or_else(|| panic!("{HOW}"));
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(p);
    let probe = Command::new(&p)
        .args([
            "-c",
            "import in_toto_attestation, securesystemslib, cryptography",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {HOW}", p.display()));
    assert!(
        probe.status.success(),
        "{}: {}; {HOW}",
        p.display(),
        String::from_utf8_lossy(&probe.stderr)
    );
    p
}

/// `verify_provenance.py ARGS...`: exit code and stdout + stderr.
pub fn verifier(args: &[&std::ffi::OsStr]) -> (i32, String) {
    let (code, out, err) = super::output(
        Command::new(python())
            .arg(fixtures().join("verify_provenance.py"))
            .args(args),
    );
    (code, out + &err)
}

/// The in-toto Statement / SLSA Provenance validators on a `provenance.json`.
pub fn check_statement(file: &Path) -> (i32, String) {
    verifier(&["statement".as_ref(), file.as_os_str()])
}
