//! The command line: parses arguments, loads the config, and calls the library.
//!
//! Exit codes: 0 success, 1 failure (a build failed, a check failed), 2 usage or config error.

pub mod doctor;

use crate::config::Config;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "build-image",
    version,
    about = "Builds OS images with mic from workitems dropped into a spool directory",
    after_help = "Exit codes: 0 success, 1 failure, 2 usage or configuration error.\n\
                  Logging: RUST_LOG=info (default), debug, warn."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// TOML config file (default: $BUILD_IMAGE_CONFIG, else built-in defaults)
    #[arg(long, global = true, env = "BUILD_IMAGE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Spool directory (overrides [spool] dir)
    #[arg(long, global = true)]
    pub spool: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: watch incoming/, build, answer in outbox/.
    #[command(
        after_help = "Examples:\n  build-image run\n  build-image --config /etc/build-image.toml run\n\n\
                            SIGTERM or SIGINT: stop claiming, let running builds finish (up to [worker] grace seconds), exit 0.\n\
                            Exit codes: 0 stopped cleanly, 2 configuration error, 1 any other failure to start."
    )]
    Run,
    /// Drop workitem files into incoming/ safely (copy to tmp/, then rename).
    #[command(after_help = "Examples:\n  build-image submit job1.json job2.json\n\n\
                            Prints the image_id of each workitem dropped.\n\
                            Exit codes: 0 all dropped, 1 a file could not be read or dropped, 2 usage error.")]
    Submit {
        /// Workitem JSON files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Check the configuration and the host: mic, sudo, folders, KVM prerequisites.
    #[command(after_help = "Examples:\n  build-image doctor\n  build-image --config /etc/build-image.toml doctor\n\n\
                            One line per check: ok, WARN or FAIL, with what was checked.\n\
                            Exit codes: 0 no check failed (warnings allowed), 1 a check failed, 2 usage or config error.")]
    Doctor,
}

/// Loads the config named on the command line (or the defaults) and applies `--spool`.
pub fn load_config(g: &Global) -> anyhow::Result<Config> {
    let mut cfg = match &g.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(s) = &g.spool {
        cfg.spool.dir = s.clone();
    }
    Ok(cfg)
}

pub fn main() -> i32 {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let cfg = match load_config(&cli.global) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("build-image: {}", describe(&e));
            return 2;
        }
    };
    let res = match cli.command {
        Command::Run => run(cfg),
        Command::Submit { files } => submit(&cfg, &files),
        Command::Doctor => Ok(doctor::run(&cfg, cli.global.config.as_deref())),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("build-image: {}", describe(&e));
            1
        }
    }
}

/// An error and its causes on one line, leaving out a cause its parent already quotes.
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn run(cfg: Config) -> anyhow::Result<i32> {
    let (tx, rx) = crossbeam_channel::bounded::<()>(1);
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("cannot install signal handlers")?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            log::info!("signal {sig} received");
            let _ = tx.send(());
        }
    });
    crate::daemon::run(cfg, rx)?;
    Ok(0)
}

/// Drops one workitem file: copy into tmp/, fsync, rename into incoming/.
pub fn drop_file(spool_dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    let tmp_dir = spool_dir.join("tmp");
    let incoming = spool_dir.join("incoming");
    for d in [&tmp_dir, &incoming] {
        anyhow::ensure!(
            d.is_dir(),
            "spool {} has no {} folder: is --spool (or [spool] dir) right, and has the daemon run once?",
            spool_dir.display(),
            d.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
    }
    let tmp = tmp_dir.join(name);
    crate::durable::write_atomic(&tmp, bytes, 0o644)?;
    let target = incoming.join(name);
    crate::durable::rename(&tmp, &target)?;
    Ok(target)
}

fn submit(cfg: &Config, files: &[PathBuf]) -> anyhow::Result<i32> {
    let mut code = 0;
    for f in files {
        let res = (|| -> anyhow::Result<String> {
            let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
            let v = crate::workitem::parse_object(&bytes)
                .with_context(|| format!("{} is not a workitem", f.display()))?;
            let id = crate::workitem::raw_image_id(&v).unwrap_or_default();
            let name = f
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| !crate::spool::ignored_name(n))
                .with_context(|| {
                    format!("{}: not a usable file name for incoming/", f.display())
                })?;
            drop_file(&cfg.spool.dir, name, &bytes)?;
            Ok(id)
        })();
        match res {
            Ok(id) => println!("{id}"),
            Err(e) => {
                eprintln!("build-image: {}", describe(&e));
                code = 1;
            }
        }
    }
    Ok(code)
}
