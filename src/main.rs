fn main() {
    std::process::exit(build_image::cli::main());
}
