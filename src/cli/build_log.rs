//! `log ID [--follow]`: prints a job's build log; with `--follow`, keeps printing as it grows
//! until the job ends, and exits with its result. Through the running daemon, or from the log
//! and the file when none runs (each poll asks anew, so a daemon starting or stopping meanwhile
//! is followed through).

use super::access::{call, expect, open_offline};
use crate::config::Config;
use crate::domain::text::{escape, escape_lines};
use crate::operate::Host;
use crate::operate::control::{self, Request, Response};
use crate::operate::joblog::LogChunk;
use std::io::Write;
use std::time::{Duration, Instant};

/// The longest a command holds the log's lock while it reads a long build log with no daemon
/// running (a daemon starting meanwhile waits for the lock, a few seconds at most).
const HOLD: Duration = Duration::from_millis(500);

/// The log opened by this command (no daemon runs), kept across the chunks of one read.
struct Held {
    host: Host,
    since: Instant,
}

/// Asks the daemon, or, when none runs, the log opened here: opened once for the chunks that
/// follow each other at once (a long log is read in many), and let go after [`HOLD`].
fn ask(cfg: &Config, held: &mut Option<Held>, req: Request) -> anyhow::Result<Response> {
    if held.as_ref().is_some_and(|h| h.since.elapsed() >= HOLD) {
        *held = None;
    }
    if held.is_none() && !control::socket_path(&cfg.state_dir()).exists() {
        *held = open_offline(cfg)?.map(|host| Held {
            host,
            since: Instant::now(),
        });
    }
    match held {
        Some(h) => expect(control::handle(&h.host, req, |_| true)),
        None => expect(call(cfg, req, |_| true)?),
    }
}

/// How often a follower asks again when it has read everything.
const POLL: Duration = Duration::from_millis(200);

/// Exit codes (documented in `--help`).
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;

/// What to tell the user once the job has ended, and the exit code.
fn ending(c: &LogChunk) -> (Option<String>, i32) {
    let code = if c.result == Some(true) {
        EXIT_OK
    } else {
        EXIT_FAILED
    };
    let what = job_name(c);
    let why = escape_lines(c.error.as_deref().unwrap_or("no result"));
    let note = match (c.result, c.exists, c.built) {
        (Some(true), _, _) => None,
        (_, _, false) => Some(format!(
            "{what} was answered without a build ({}): {why}",
            c.state
        )),
        (Some(false), _, true) => Some(format!("{what} failed: {why}")),
        (None, _, true) => Some(format!("{what} ended without a result ({})", c.state)),
    };
    (note, code)
}

/// The job as the follower's own lines name it (its image_id escaped: these lines are the
/// command's; the build's output is printed as it is).
fn job_name(c: &LogChunk) -> String {
    match &c.image_id {
        Some(i) => format!("job {} ({})", c.job, escape(i)),
        None => format!("job {}", c.job),
    }
}

pub fn run(cfg: &Config, id: &str, follow: bool) -> anyhow::Result<i32> {
    match print_log(cfg, id, follow) {
        // The reader went away (`log ID | head`): stop quietly. A follower did not see the
        // job's result, so it does not claim success.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(if follow { EXIT_FAILED } else { EXIT_OK })
        }
        r => r,
    }
}

fn print_log(cfg: &Config, id: &str, follow: bool) -> anyhow::Result<i32> {
    // Without a daemon the log is opened at each poll, and each opening logs an info line:
    // keep stderr to what the follower says (RUST_LOG set by the user still rules).
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let mut held: Option<Held> = None;
    let mut from = 0u64;
    let mut job = None;
    let mut waiting_said = false;
    let mut at_line_start = true;
    // A job just dropped is not in the log until the daemon claims it: a follower gives it the
    // time a claim takes (the file's minimum age and two rescans) and a few seconds more.
    let spool = &cfg.spool;
    let claim_time = Duration::from_millis(
        spool
            .min_age_ms
            .saturating_add(spool.poll_interval_ms.saturating_mul(2)),
    ) + Duration::from_secs(5);
    let give_up = std::time::Instant::now() + claim_time;
    let mut unknown_said = false;
    let mut out = std::io::stdout().lock();
    loop {
        let req = Request::Log {
            id: id.to_string(),
            job,
            from,
        };
        let r = ask(cfg, &mut held, req)?;
        let Response::Log(c) = r else {
            anyhow::bail!("unexpected answer from the daemon: {r:?}");
        };
        let Some(c) = c else {
            let no_job = crate::operate::ops::not_found(id);
            if !follow || std::time::Instant::now() >= give_up {
                anyhow::bail!(no_job);
            }
            if !unknown_said {
                eprintln!(
                    "build-image: {no_job} yet: waiting up to {} s for it to be claimed",
                    claim_time.as_secs()
                );
                unknown_said = true;
            }
            held = None; // never hold the lock a starting daemon needs
            std::thread::sleep(POLL);
            continue;
        };
        job = Some(c.job);
        if c.restarted {
            writeln!(
                out,
                "[... the log was replaced: printing it from its start ...]"
            )?;
        }
        if c.skipped > 0 {
            // The same line the log's bound writes into the file (so a log read after the
            // fact prints as the file reads).
            if !at_line_start {
                writeln!(out)?;
            }
            writeln!(out, "[... {} bytes of output omitted ...]", c.skipped)?;
            at_line_start = true;
        }
        out.write_all(c.text.as_bytes())?;
        if let Some(last) = c.text.as_bytes().last() {
            at_line_start = *last == b'\n';
        }
        out.flush()?;
        let progressed = c.next > from || c.restarted;
        from = c.next;
        if c.next < c.end && progressed {
            continue; // more is there already
        }
        if !follow {
            if c.exists {
                return Ok(EXIT_OK);
            }
            let why = if c.ended && !c.built {
                ending(&c).0.unwrap_or_else(|| "it has no build log".into())
            } else if !c.ended {
                format!(
                    "{} is {}: no build log yet (--follow waits for it)",
                    job_name(&c),
                    c.state
                )
            } else {
                format!(
                    "{}: its build log {} is gone",
                    job_name(&c),
                    escape(c.path.as_deref().unwrap_or("-"))
                )
            };
            anyhow::bail!(why);
        }
        if c.ended {
            if c.built && !c.exists {
                eprintln!(
                    "build-image: {}: its build log {} is gone",
                    job_name(&c),
                    escape(c.path.as_deref().unwrap_or("-"))
                );
            }
            let (note, code) = ending(&c);
            if let Some(n) = note {
                eprintln!("build-image: {n}");
            }
            return Ok(code);
        }
        if !c.exists && !waiting_said {
            eprintln!(
                "build-image: {} is {}: waiting for its build to start",
                job_name(&c),
                c.state
            );
            waiting_said = true;
        }
        held = None;
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::State;

    fn chunk(state: State, result: Option<bool>, built: bool) -> LogChunk {
        LogChunk {
            job: 7,
            image_id: Some("x-1".into()),
            state,
            ended: state.has_ended(),
            result,
            error: result
                .is_some_and(|r| !r)
                .then(|| "mic exited with status 3".into()),
            path: None,
            built,
            exists: built,
            text: String::new(),
            start: 0,
            next: 0,
            skipped: 0,
            end: 0,
            restarted: false,
        }
    }

    #[test]
    fn the_exit_status_is_the_result() {
        assert_eq!(ending(&chunk(State::Done, Some(true), true)), (None, 0));
        let (note, code) = ending(&chunk(State::Error, Some(false), true));
        assert_eq!(code, 1);
        assert_eq!(
            note.as_deref(),
            Some("job 7 (x-1) failed: mic exited with status 3")
        );
        let (note, code) = ending(&chunk(State::Error, Some(false), false));
        assert_eq!(code, 1);
        assert!(note.unwrap().contains("answered without a build (error)"));
        let (note, code) = ending(&chunk(State::Moved, None, true));
        assert_eq!(code, 1);
        assert!(note.unwrap().contains("ended without a result (moved)"));
    }
}
