//! The `build-image` binary: parses the command line and runs it (`cli::main`).
fn main() {
    std::process::exit(build_image::cli::main());
}
