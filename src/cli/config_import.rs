//! `config import OLD.conf`: prints the TOML for an original IMG `build_image.conf`.

use crate::config::Config;
use crate::domain::text::escape;
use crate::legacy;
use std::path::Path;

/// Exit codes (documented in `--help`).
pub const EXIT_ALL_MAPPED: i32 = 0;
pub const EXIT_UNKNOWN_KEYS: i32 = 1;
pub const EXIT_CANNOT: i32 = 2;

/// The largest file taken: an INI configuration is a few KiB.
const MAX_BYTES: u64 = 1024 * 1024;

fn read_bounded(file: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(file)?
        .take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_BYTES} bytes: not a configuration file"
        )));
    }
    String::from_utf8(bytes).map_err(|_| std::io::Error::other("not UTF-8 text"))
}

pub fn run(file: &Path) -> i32 {
    let text = match read_bounded(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "build-image: cannot read {}: {}",
                escape(&file.display().to_string()),
                escape(&e.to_string())
            );
            return EXIT_CANNOT;
        }
    };
    // Nothing to convert is not a conversion: an empty file (or one of blank lines, comments
    // and section headers only) is most likely the wrong file, or one cut short.
    if text
        .lines()
        .map(str::trim)
        .all(|l| l.is_empty() || l.starts_with('#') || l.starts_with(';') || l.starts_with('['))
    {
        eprintln!(
            "build-image: {} holds no setting (it is empty, or only comments and section headers): nothing to convert",
            file.display()
        );
        return EXIT_CANNOT;
    }
    // An [amqp] section when this build has one (it takes the [boss] broker).
    let amqp = Config::parse("[amqp]\n", Path::new("-")).is_ok();
    let out = match legacy::import(&text, &file.display().to_string(), amqp) {
        Ok(o) => o,
        Err(e) => {
            eprintln!(
                "build-image: {}: {}",
                escape(&file.display().to_string()),
                escape(&e.to_string())
            );
            return EXIT_CANNOT;
        }
    };
    // What is printed loads: the same checks as `--config` (ranges, values).
    if let Err(e) = Config::parse(&out.toml, Path::new("(the converted configuration)")) {
        eprintln!(
            "build-image: {} converts to a configuration build-image refuses: {}",
            escape(&file.display().to_string()),
            escape(&e.to_string())
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
        escape(&file.display().to_string()),
        out.unknown.join(", ")
    );
    EXIT_UNKNOWN_KEYS
}
