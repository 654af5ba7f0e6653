//! `config import OLD.conf`: prints the TOML for an original IMG `build_image.conf`.

use crate::config::Config;
use crate::legacy;
use std::path::Path;

/// Exit codes (documented in `--help`).
pub const EXIT_ALL_MAPPED: i32 = 0;
pub const EXIT_UNKNOWN_KEYS: i32 = 1;
pub const EXIT_CANNOT: i32 = 2;

pub fn run(file: &Path) -> i32 {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("build-image: cannot read {}: {e}", file.display());
            return EXIT_CANNOT;
        }
    };
    // An [amqp] section when this build has one (it takes the [boss] broker).
    let amqp = Config::parse("[amqp]\n", Path::new("-")).is_ok();
    let out = match legacy::import(&text, &file.display().to_string(), amqp) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("build-image: {}: {e}", file.display());
            return EXIT_CANNOT;
        }
    };
    // What is printed loads: the same checks as `--config` (ranges, values).
    if let Err(e) = Config::parse(&out.toml, Path::new("(the converted configuration)")) {
        eprintln!(
            "build-image: {} converts to a configuration build-image refuses: {e}",
            file.display()
        );
        return EXIT_CANNOT;
    }
    print!("{}", out.toml);
    if out.unknown.is_empty() {
        return EXIT_ALL_MAPPED;
    }
    eprintln!(
        "build-image: {} key(s) of {} have no meaning in build-image and are left out \
         (shown as comments in the output): {}",
        out.unknown.len(),
        file.display(),
        out.unknown.join(", ")
    );
    EXIT_UNKNOWN_KEYS
}
