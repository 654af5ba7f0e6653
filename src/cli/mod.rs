//! The command line: parses arguments, loads the config, and calls the library. One file per
//! command family; the dispatcher is a flat match.
//!
//! Exit codes: 0 success, 1 failure (a build failed, a check failed, a disagreement), 2 usage or
//! config error (an `[artifacts]` key that cannot be used is one), 3 `submit --wait` timed out.

pub mod access;
pub mod actions;
pub mod archive;
pub mod artifacts;
pub mod build_log;
pub mod config_import;
pub mod doctor;
pub mod hosts;
pub mod query;
pub mod retention;
pub mod submit;

use crate::config::Config;
use crate::domain::text::escape;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "build-image",
    version,
    about = "Builds OS images with mic from workitems dropped into a spool directory",
    after_help = "Exit codes: 0 success, 1 failure, 2 usage or configuration error (see each command's --help).\n\
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

/// How a command names a job: an image_id, `#N` for job number N, or `--job N`.
#[derive(Args, Debug, Clone)]
pub struct JobRef {
    /// The job: its image_id (the job that holds it), or #N for job number N. A bare number
    /// that is both an image_id and another job's number is refused as ambiguous.
    #[arg(
        required_unless_present = "job",
        conflicts_with = "job",
        value_name = "ID"
    )]
    pub id: Option<String>,
    /// The job with this number (the same as #N).
    #[arg(long, value_name = "N")]
    pub job: Option<u64>,
}

impl JobRef {
    /// The reference as the operator protocol takes it (`#N` for a number given with --job);
    /// a `#` not followed by a number is a usage error.
    pub fn reference(&self) -> anyhow::Result<String> {
        match (self.job, &self.id) {
            (Some(n), _) => Ok(format!("#{n}")),
            (None, Some(id)) => match id.strip_prefix('#') {
                Some(n) if n.parse::<u64>().is_err() => Err(Usage(format!(
                    "{id:?} is not a job number: write #N (or --job N) with N a number, or an image_id"
                ))
                .into()),
                _ => Ok(id.clone()),
            },
            (None, None) => Err(Usage("no job named: give an ID or --job N".into()).into()),
        }
    }
}

/// What `ID` means, said in the help of every command that takes one.
macro_rules! job_ref_help {
    () => {
        "ID is an image_id (the job that holds it), or #N (or --job N) for job number N. A bare number \
         that is no image_id is that job number; one that is both an image_id and another job's number \
         is refused as ambiguous, naming both."
    };
}

/// A usage error found after parsing (exit 2, as clap's own).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: watch incoming/, build, answer in outbox/.
    #[command(
        after_help = "Examples:\n  build-image run\n  build-image --config /etc/build-image.toml run\n  \
                            build-image run --once        # from cron: drain incoming/ and exit\n\n\
                            SIGTERM or SIGINT: stop claiming, let running builds finish (up to [worker] grace seconds), exit 0.\n\
                            Exit codes: 0 stopped cleanly (--once: every job succeeded), 1 a job failed (--once) or the daemon \
                            could not start (e.g. another daemon holds the state dir), 2 configuration error."
    )]
    Run {
        /// Claim what is in incoming/ now, wait for those builds, exit (0 all succeeded, 1 otherwise).
        #[arg(long)]
        once: bool,
    },
    /// Drop workitems into incoming/ safely (write to tmp/, then rename).
    #[command(after_help = "Examples:\n  build-image submit job1.json job2.json\n  \
                            build-image submit --kickstart mer.ks --name mer-core --arch i586 --type fs --wait\n  \
                            build-image submit --kickstart ks --name n --arch armv7hl --type loop --release 0.1 \
                            --extra-opt=--pkgmgr=zypp --id nightly-42\n\n\
                            Prints the image_id of each workitem dropped (generated when --id is not given).\n\
                            Exit codes: 0 dropped (with --wait: built successfully), 1 a file could not be dropped \
                            (with --wait: the build failed or the input was rejected), 2 usage error (with --kickstart: also \
                            arguments that make no valid workitem, e.g. a --name with a '/'; nothing is dropped), 3 --wait timed out.")]
    Submit(Box<submit::SubmitArgs>),
    /// One line per job: id, state, name, arch, type, worker, started, duration, result (a
    /// failure with its class); then a LEAKED line for what a build left and could not free.
    #[command(
        after_help = "Examples:\n  build-image status\n  build-image status --state building\n  \
                            build-image status --state error --wide   # every line of each error\n  \
                            build-image status --json --limit 20\n\n\
                            States: claimed, queued, building, interrupted, finished (answer not yet in the outbox), \
                            done, error, rejected, moved.\n\
                            RESULT: ok, or the error's first line (mic's own error, or the daemon's reason: a timeout, \
                            a cancel); --wide shows every line. Text from a workitem or a build is printed with control \
                            and bidirectional formatting characters escaped (\\n, \\u001b, \\u202e).\n\
                            Exit codes: 0, 1 the log cannot be read, 2 usage."
    )]
    Status {
        /// A JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// Every line of each error (the table shows its first line, the cause, whole).
        #[arg(long)]
        wide: bool,
        /// Only jobs in this state (claimed, queued, building, interrupted, finished, done,
        /// error, rejected, moved).
        #[arg(long, value_parser = parse_state)]
        state: Option<crate::domain::State>,
        /// At most this many jobs (newest first).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Check an image against its build's signed provenance (provenance.intoto.jsonl).
    #[command(
        after_help = concat!("Examples:\n  build-image verify 42-1700000000\n  \
                            build-image verify /srv/images/requests/42-1700000000/mer-core.img\n  \
                            build-image verify '#17' --key /etc/build-image/provenance.pub\n\n\
                            The envelope's signature is checked with --key, else [artifacts] verify_key, else the \
                            public half of [artifacts] sign_key; provenance.json must be the signed statement byte for \
                            byte; then every image file the statement names (for IMAGE_FILE: that one) is hashed again \
                            and compared. Works with the daemon running or stopped.\n", job_ref_help!(), "\n\
                            Exit codes: 0 everything matches, 1 something differs (an image's bytes: that file is named; \
                            the statement: signature does not match; the key: signed by another key), 2 a file is \
                            missing (the envelope, the statement, an image) or usage.")
    )]
    Verify {
        /// The job (image_id, or #N) or an image file.
        #[arg(value_name = "ID|IMAGE_FILE")]
        target: String,
        /// The OpenSSH public key (ed25519) to check the signature with.
        #[arg(long, value_name = "FILE.pub")]
        key: Option<PathBuf>,
    },
    /// A job's events and its current workitem fields (by image_id, or #N for job number N).
    #[command(
        after_help = concat!("Examples:\n  build-image show 42-1700000000\n  build-image show '#17' --json\n  \
                            build-image show --job 17\n\n", job_ref_help!(), "\n\
                            Exit codes: 0, 1 no such job (or an ambiguous ID), 2 usage.")
    )]
    Show {
        #[command(flatten)]
        id: JobRef,
        /// The job, its events and its workitem as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The event log, as text or JSON Lines.
    #[command(
        after_help = "Examples:\n  build-image events --since 1000\n  build-image events --image 42-1700000000 --json\n  \
                            build-image events --kind finished --follow\n  \
                            build-image events --json > log.jsonl   # the export: `import` reads it back\n\n\
                            --json is the export form: each queued or invalid event carries its input workitem (input), \
                            and the last line is the trailer, {\"trailer\":\"build-image export\",\"events\":N,\"sha256\":\"...\"} \
                            (the number of event lines and the sha256 of their bytes): `import` takes only an export that \
                            ends with its trailer. An event has a seq; the trailer has none.\n\
                            --follow keeps printing new events until interrupted (no trailer: it never ends).\n\
                            Exit codes: 0, 1 the log cannot be read, 2 usage."
    )]
    Events {
        /// Start at this seq.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Only the events of jobs with this image_id.
        #[arg(long)]
        image: Option<String>,
        /// Only events of this kind (claimed, rejected, invalid, queued, started, finished,
        /// delivered, pushed, cancelled, requeued, interrupted, duplicate, compacted).
        #[arg(long, value_parser = parse_kind)]
        kind: Option<crate::domain::Tag>,
        /// Keep printing new events.
        #[arg(long)]
        follow: bool,
        /// JSON Lines.
        #[arg(long)]
        json: bool,
    },
    /// A job's build log (mic's output); --follow keeps printing it until the job ends.
    #[command(
        after_help = concat!("Examples:\n  build-image log 42-1700000000\n  build-image log '#17' --follow\n  \
                            build-image submit --kickstart mer.ks --name mer-core --arch i586 --type fs --id n-1 && \
                            build-image log n-1 --follow\n\n\
                            Works through the running daemon, or from the event log and the file when none runs. \
                            --follow waits for a queued job's build to start (and, for an id not in the log yet, for a \
                            file just dropped to be claimed: [spool] min_age_ms + 2 x poll_interval_ms + 5 s), prints \
                            the output as it comes, and ends when the job is answered. Output the log's size bound ([worker] job_log_max_mb) \
                            cut out before it was read is shown as one \"[... N bytes of output omitted ...]\" line.\n", job_ref_help!(), "\n\
                            Exit codes: without --follow: 0 the log was printed, 1 no such job (or an ambiguous ID), or it has no build log \
                            (queued and never built, or answered without a build: not a workitem, invalid, a \
                            conflict, cancelled before it ran), 2 usage. With --follow: 0 the job succeeded, 1 it \
                            failed (or was answered without a build, or no such job, or an ambiguous ID), 2 usage.")
    )]
    Log {
        #[command(flatten)]
        id: JobRef,
        /// Keep printing as the log grows, until the job ends; exit with its result.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Fold the log from empty; compare it with its indexes (job index, open marks) and the spool.
    #[command(
        after_help = "Examples:\n  build-image replay\n  build-image replay --json\n\n\
                            Prints each disagreement (files in active/ no job claims, jobs whose file is gone, outbox \
                            files with no delivered event, jobs the job index or the open marks see otherwise than the log) and the replay speed.\n\
                            Exit codes: 0 no disagreement, 1 disagreements (or the log cannot be read), 2 usage."
    )]
    Replay {
        /// The report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Build a finished job again (same workitem, attempt + 1).
    #[command(after_help = concat!("Examples:\n  build-image retry 42-1700000000\n  build-image retry '#17'\n\n\
                            Only a job that was built can be built again: one answered without a build (invalid, \
                            a conflict, cancelled before it ran) is refused with the reason.\n\
                            Without a running daemon the job is queued in the log and built by the next start.\n", job_ref_help!(), "\n\
                            Exit codes: 0 queued, 1 no such job (or an ambiguous ID), or it is not finished, or it was never built, 2 usage."))]
    Retry {
        #[command(flatten)]
        id: JobRef,
    },
    /// Cancel a queued job (never built) or a running one (its process group is killed).
    #[command(after_help = concat!("Examples:\n  build-image cancel 42-1700000000\n  build-image cancel --job 17\n\n\
                            The job is answered in the outbox with the error \"cancelled\" and ERROR is pushed. An image_id \
                            no job of this host has is sent to the other hosts of a shared spool (control/): the one \
                            holding it cancels it; after 8 s with no taker the command says nobody holds it, or names the \
                            host that does (its job folder's .owner, its host record).\n", job_ref_help!(), "\n\
                            Exit codes: 0 cancelled (here or by the host holding it), 1 no such job on any host (or an \
                            ambiguous ID) or it is not queued/running, 2 usage."))]
    Cancel {
        #[command(flatten)]
        id: JobRef,
    },
    /// Move a dead worker's claimed files (active/W/) back to incoming/.
    #[command(
        after_help = "Examples:\n  build-image requeue --worker buildhost2\n\n\
                            Only for a host that is down for good: refused while W's daemon is alive (it refreshes \
                            active/W/.alive), unless --force.\n\
                            Exit codes: 0 moved (or nothing to move), 1 refused or failed, 2 usage."
    )]
    Requeue {
        /// The worker id of the dead host.
        #[arg(long)]
        worker: String,
        /// Move the files even though the worker looks alive.
        #[arg(long)]
        force: bool,
    },
    /// Keep a job's images out of every expiry (retention, the disk budget).
    #[command(after_help = concat!("Examples:\n  build-image pin 42-1700000000\n  build-image pin '#17'\n\n\
                            Only a built image can be pinned, and not once it expired. Pinning a pinned job changes nothing.\n", job_ref_help!(), "\n\
                            Exit codes: 0 pinned (or already), 1 no such job (or an ambiguous ID), no image, or expired, 2 usage."))]
    Pin {
        #[command(flatten)]
        id: JobRef,
    },
    /// Give a pinned job's images back to the retention policy.
    #[command(after_help = concat!("Examples:\n  build-image unpin 42-1700000000\n\n", job_ref_help!(), "\n\
                            Exit codes: 0 unpinned (or was not pinned), 1 no such job (or an ambiguous ID), 2 usage."))]
    Unpin {
        #[command(flatten)]
        id: JobRef,
    },
    /// Take this host out of the farm: it claims nothing more; its running builds finish.
    #[command(
        after_help = "Examples:\n  build-image drain --reason 'kernel update'\n  build-image undrain\n\n\
                            While drained the host claims nothing from incoming/ (the files stay there for the other hosts) \
                            and takes nothing from the AMQP work queue (it still moves the participant queue and applies cancels); \
                            the builds it holds go on and are answered; it stays up, and drained across restarts. \
                            Recorded as a `drained` event, through the daemon or in the log when none runs. \
                            status, /healthz (503) and /metrics (build_image_drained) show it.\n\
                            Exit codes: 0 drained (or already, for that reason), 1 the log cannot be written, 2 usage."
    )]
    Drain {
        /// Why (shown by status and /healthz).
        #[arg(long, default_value = "drained by the operator")]
        reason: String,
    },
    /// Take a drained host back into the farm.
    #[command(after_help = "Examples:\n  build-image undrain\n\n\
                            Recorded as an `undrained` event, through the daemon or in the log when none runs.\n\
                            Exit codes: 0 undrained (or was not drained), 1 the log cannot be written, 2 usage.")]
    Undrain,
    /// Expire the images the retention policy names now ([artifacts] keep_days, keep_last, min_free_mb).
    #[command(
        after_help = "Examples:\n  build-image gc --dry-run\n  build-image gc\n\n\
                            Prints one line per image: the job, its image_id, what it frees and why (the rule). \
                            --dry-run prints the same list and changes nothing. Expiry deletes the files the job's SHA256SUMS \
                            lists; never its log, kickstart, answer, SHA256SUMS or provenance, never a pinned job's. \
                            The daemon runs the same pass every minute when a rule is set.\n\
                            Exit codes: 0 done (also when nothing expires), 1 the log cannot be read or written, 2 usage."
    )]
    Gc {
        /// Print what would expire; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Configuration tools: `config import OLD.conf` converts IMG's build_image.conf.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Build the event log of an empty state dir from an export (`events --json`) or an archive.
    #[command(
        after_help = "Examples:\n  build-image events --json > log.jsonl      # export (the daemon may run)\n  \
                            build-image import log.jsonl                # into the empty state dir of the config\n  \
                            build-image import archive.jsonl.gz         # gzip is recognised\n\n\
                            The events keep their seq, time and job number; the job states are folded from them at the next start. \
                            An export is taken only whole: ended by its trailer line, whose count and sha256 match the lines \
                            before it. One cut short (an empty file included), or with lines lost or changed, is refused; \
                            --partial takes the events it holds, and says what was wrong. \
                            The upgrade path when the stored form of the log changes: export with the old version, \
                            import with the new (docs/operations.md); an export of a version without the trailer needs --partial.\n\
                            Exit codes: 0 imported (with --partial: also when the export was not whole, said on stderr), \
                            1 FILE cannot be read, the state dir is not empty, a line is not an event, or the export is not whole (nothing is \
                            written), 2 usage."
    )]
    Import {
        /// JSON Lines, one event a line, ended by the trailer (gzip-compressed or not); - for stdin.
        file: PathBuf,
        /// Take an export that is not whole (no trailer, or one that does not match; a last line
        /// cut short is left out): the events it holds are imported, and what was wrong is said.
        #[arg(long)]
        partial: bool,
    },
    /// Copy the event log, consistent, while the daemon runs.
    #[command(
        after_help = "Examples:\n  build-image backup /var/backups/build-image/$(date +%F)\n\n\
                            DIR must be new or empty, and outside the spool's incoming/, tmp/, active/, outbox/, rejected/, \
                            state/ and the state dir (a daemon takes what it finds there). It gets every event up to the log's \
                            durable end when the backup began, as a state dir: restore by putting it in place of the state \
                            dir while no daemon runs (docs/operations.md).\n\
                            Exit codes: 0 backed up, 1 DIR is not empty, is inside the spool's folders or the state dir, or \
                            the copy failed, 2 usage."
    )]
    Backup {
        /// A new or empty folder.
        dir: PathBuf,
    },
    /// Move the events of jobs settled before a time into an archive, and rewrite the log without them.
    #[command(
        after_help = "Examples:\n  build-image compact --before 90days --archive /var/archive/build-image-2026-08.jsonl\n  \
                            build-image compact --before 2026-01-01T00:00:00Z --archive old.jsonl\n\n\
                            TIME: RFC 3339 (2026-01-01T00:00:00Z; without a zone, UTC) or a span back from now as \
                            humantime reads it (90days, 2weeks, 12h); a time in the future is refused.\n\
                            Moved: the jobs with nothing left to do whose last event is older than TIME, except those whose \
                            job folder still exists under base_dir (their image_id guards it). The archive (JSON Lines, like \
                            events --json, ended by its trailer; gzip-compressed for a name ending in .gz; never replaced; \
                            never inside the spool's folders or the state dir) is written and fsynced first; the log is rewritten beside the old \
                            one and swapped in, recorded by a compacted event (a job of its own: the next job number). A crash leaves the old or the new log.\n\
                            Exit codes: 0 compacted (or nothing to move), 1 refused (FILE exists, or is inside the spool's \
                            folders or the state dir) or failed, 2 usage (a bad or future TIME)."
    )]
    Compact {
        /// Jobs settled before this time (RFC 3339, or a span back from now: 90days).
        #[arg(long, value_parser = archive::time_arg)]
        before: String,
        /// The archive to write (must not exist); gzip-compressed when it ends in .gz.
        #[arg(long)]
        archive: PathBuf,
    },
    /// Run the final push (DONE/ERROR) again for the jobs finished in a time window.
    #[command(
        after_help = "Examples:\n  build-image repush --since 2026-11-24T00:00:00Z\n  \
                            build-image repush --since 36h --until 12h\n\n\
                            For a job database restored from a backup: every answered job (not a conflict) that finished \
                            in [--since, --until) has its final status pushed again now, one at a time, each recorded as \
                            a pushed event. TIME: RFC 3339 or a span back from now (humantime: 36h, 2days); --until must \
                            come after --since.\n\
                            Exit codes: 0 every push succeeded (or none was in the window), 1 a push failed or no push \
                            utility is configured, 2 usage (a bad TIME, or --until not after --since)."
    )]
    Repush {
        /// Start of the window (inclusive).
        #[arg(long, value_parser = archive::time_arg)]
        since: String,
        /// End of the window (exclusive; default: now).
        #[arg(long, value_parser = archive::time_arg)]
        until: Option<String>,
    },
    /// Write a job's answer to the outbox again (an answer upstream lost).
    #[command(after_help = concat!("Examples:\n  build-image redeliver 42-1700000000\n  build-image redeliver '#17'\n\n\
                            The same answer as its first delivery, to outbox/<input name>; if that name holds another \
                            job's answer, to outbox/<stem>.<job>.json (an answer never replaces another's). Recorded as a \
                            delivered event; nothing is pushed.\n", job_ref_help!(), "\n\
                            Exit codes: 0 written, 1 no such job (or an ambiguous ID) or it is not answered, 2 usage."))]
    Redeliver {
        #[command(flatten)]
        id: JobRef,
    },
    /// The farm's hosts: each daemon's record (hosts/ in the spool, the farm exchange).
    #[command(
        after_help = "Examples:\n  build-image hosts\n  build-image hosts --json\n\n\
                            A host whose record is older than 3 of its intervals ([worker] host_record_interval) is GONE, \
                            shown with the jobs it held; a clean stop leaves `stopped`. Works with no daemon running.\n\
                            Exit codes: 0 listed (also none), 1 the spool's hosts/ cannot be read, 2 usage."
    )]
    Hosts {
        /// A JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check the configuration and the host: mic, sudo, folders, KVM prerequisites, and what
    /// builds left on the host and could not free (asked of the running daemon).
    #[command(
        after_help = "Examples:\n  build-image doctor\n  build-image --config /etc/build-image.toml doctor\n\n\
                            One line per check: ok, WARN or FAIL, with what was checked.\n\
                            Exit codes: 0 no check failed (warnings allowed), 1 a check failed, 2 usage or config error."
    )]
    Doctor,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the TOML for an original IMG build_image.conf (INI).
    #[command(
        after_help = "Examples:\n  build-image config import /etc/skynet/build_image.conf > /etc/build-image/build-image.toml\n  \
                            build-image config import old.conf && echo every key mapped\n\n\
                            [worker] keys keep their names: yes/no (true/false, on/off, 1/0) become booleans, mic_opts \
                            (colon-separated, or the older comma-separated form) a list, times whole seconds. [boss] \
                            becomes a commented [amqp] url. A comment above each key names the INI key it came from; \
                            keys build-image does not know are listed on stderr and kept as comments.\n\
                            Exit codes: 0 converted, every key mapped; 1 converted, some keys left out (listed on \
                            stderr); 2 the file cannot be read, is empty (no key at all), is not INI, or a value cannot \
                            be converted (nothing printed), or usage."
    )]
    Import {
        /// The original INI file.
        file: PathBuf,
    },
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
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if crate::notify::stderr_is_journal() {
        logger.format_timestamp(None); // journald stamps each line itself
    }
    logger.init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    // Needs no configuration (and must work when --config names the INI file itself).
    if let Command::Config(ConfigCommand::Import { file }) = &cli.command {
        return config_import::run(file);
    }
    let cfg = match load_config(&cli.global) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("build-image: {}", escape(&describe(&e)));
            return 2;
        }
    };
    let res = match cli.command {
        Command::Run { once } => run(cfg, once),
        Command::Submit(args) => submit::run(&cfg, &args),
        Command::Status {
            json,
            wide,
            state,
            limit,
        } => query::status(&cfg, query::StatusForm { json, wide }, state, limit),
        Command::Show { id, json } => id.reference().and_then(|r| query::show(&cfg, &r, json)),
        Command::Events {
            since,
            image,
            kind,
            follow,
            json,
        } => query::events(
            &cfg,
            crate::operate::ops::EventFilter {
                since,
                image,
                kind,
                inputs: json,
            },
            follow,
            json,
        ),
        Command::Replay { json } => query::replay(&cfg, json),
        Command::Log { id, follow } => id
            .reference()
            .and_then(|r| build_log::run(&cfg, &r, follow)),
        Command::Retry { id } => id.reference().and_then(|r| actions::retry(&cfg, &r)),
        Command::Cancel { id } => id.reference().and_then(|r| actions::cancel(&cfg, &r)),
        Command::Requeue { worker, force } => actions::requeue(&cfg, &worker, force),
        Command::Pin { id } => id.reference().and_then(|r| retention::pin(&cfg, &r, true)),
        Command::Unpin { id } => id.reference().and_then(|r| retention::pin(&cfg, &r, false)),
        Command::Gc { dry_run } => retention::gc(&cfg, dry_run),
        Command::Drain { reason } => actions::drain(&cfg, Some(&reason)),
        Command::Undrain => actions::drain(&cfg, None),
        Command::Config(ConfigCommand::Import { file }) => Ok(config_import::run(&file)),
        Command::Hosts { json } => hosts::run(&cfg, json),
        Command::Doctor => Ok(doctor::run(&cfg, cli.global.config.as_deref())),
        Command::Verify { target, key } => artifacts::verify(&cfg, &target, key.as_deref()),
        Command::Import { file, partial } => archive::import(&cfg, &file, partial),
        Command::Backup { dir } => archive::backup(&cfg, &dir),
        Command::Compact { before, archive } => archive::compact(&cfg, &before, &archive),
        Command::Repush { since, until } => archive::repush(&cfg, &since, until.as_deref()),
        Command::Redeliver { id } => id.reference().and_then(|r| archive::redeliver(&cfg, &r)),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("build-image: {}", escape(&describe(&e)));
            if e.downcast_ref::<Usage>().is_some()
                || e.downcast_ref::<crate::artifacts::key::KeyError>()
                    .is_some()
            {
                2
            } else {
                1
            }
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

/// A channel that gets a message for each SIGTERM or SIGINT: the first stops the daemon,
/// a second one ends the grace period at once.
pub fn stop_on_signals() -> anyhow::Result<crossbeam_channel::Receiver<()>> {
    let (tx, rx) = crossbeam_channel::unbounded::<()>();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("cannot install signal handlers")?;
    std::thread::spawn(move || {
        for (n, sig) in signals.forever().enumerate() {
            if n == 0 {
                log::info!("signal {sig} received: stopping");
            } else {
                log::warn!("signal {sig} received again: ending the grace period now");
            }
            if tx.send(()).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

fn parse_state(s: &str) -> Result<crate::domain::State, String> {
    crate::domain::State::parse(s).ok_or_else(|| {
        format!(
            "no such state; the states are: {}",
            crate::domain::State::ALL.map(|s| s.as_str()).join(", ")
        )
    })
}

fn parse_kind(s: &str) -> Result<crate::domain::Tag, String> {
    crate::domain::Tag::parse(s).ok_or_else(|| {
        format!(
            "no such event kind; the kinds are: {}",
            crate::operate::control::kinds()
        )
    })
}

fn run(cfg: Config, once: bool) -> anyhow::Result<i32> {
    let stop = stop_on_signals()?;
    if once {
        let all_ok = crate::daemon::run_once(cfg, stop)?;
        return Ok(if all_ok { 0 } else { 1 });
    }
    crate::daemon::run(cfg, stop)?;
    Ok(0)
}

/// Drops one workitem file: write into tmp/ (a hidden name of this process), fsync, rename into
/// incoming/ without ever replacing a file there. When `incoming/<name>` is taken it uses the
/// first free `<stem>.<n>.json` (`<name>.<n>` for a name without `.json`). Returns the path used.
pub fn drop_file(spool_dir: &std::path::Path, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};

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
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // Hidden and ending in .tmp (a leftover is cleaned at the daemon's start), unique per process
    // and per drop, so that two submits of files with the same base name never share it.
    let mut short = name;
    if short.len() > 100 {
        let mut end = 100;
        while !short.is_char_boundary(end) {
            end -= 1;
        }
        short = &short[..end];
    }
    let tmp = tmp_dir.join(format!(".{short}.{}-{n}.tmp", std::process::id()));
    let written = (|| -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("cannot fsync {}", tmp.display()))?;
        Ok(())
    })();
    let dropped = written.and_then(|()| {
        const MAX_TRIES: u32 = 10_000;
        for i in 0..MAX_TRIES {
            let target = incoming.join(numbered_name(name, i));
            if crate::durable::rename_noreplace(&tmp, &target)? {
                return Ok(target);
            }
        }
        anyhow::bail!(
            "incoming/{name} and {MAX_TRIES} numbered variants of it are taken: nothing dropped"
        )
    });
    if dropped.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    dropped
}

/// `name` itself for 0, else `<stem>.<n>.json` (`<name>.<n>` for a name without `.json`).
fn numbered_name(name: &str, n: u32) -> String {
    if n == 0 {
        return name.to_string();
    }
    match name.strip_suffix(".json") {
        Some(stem) if !stem.is_empty() => format!("{stem}.{n}.json"),
        _ => format!("{name}.{n}"),
    }
}

#[cfg(test)]
mod drop_tests {
    use super::*;

    #[test]
    fn numbered_names() {
        assert_eq!(numbered_name("a.json", 0), "a.json");
        assert_eq!(numbered_name("a.json", 1), "a.1.json");
        assert_eq!(numbered_name("a.b.json", 2), "a.b.2.json");
        assert_eq!(numbered_name("job", 3), "job.3");
        assert_eq!(numbered_name(".json", 1), ".json.1");
    }

    #[test]
    fn drop_never_replaces() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("tmp")).unwrap();
        std::fs::create_dir(d.path().join("incoming")).unwrap();
        let a = drop_file(d.path(), "a.json", b"1").unwrap();
        let b = drop_file(d.path(), "a.json", b"2").unwrap();
        let c = drop_file(d.path(), "a.json", b"3").unwrap();
        let inc = d.path().join("incoming");
        assert_eq!(a, inc.join("a.json"));
        assert_eq!(b, inc.join("a.1.json"));
        assert_eq!(c, inc.join("a.2.json"));
        for (p, want) in [(a, b"1"), (b, b"2"), (c, b"3")] {
            assert_eq!(&std::fs::read(p).unwrap(), want);
        }
        assert_eq!(drop_file(d.path(), "x", b"4").unwrap(), inc.join("x"));
        assert_eq!(drop_file(d.path(), "x", b"5").unwrap(), inc.join("x.1"));
        assert_eq!(std::fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    }
}
