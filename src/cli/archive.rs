//! `import`, `backup`, `compact`, `repush`, `redeliver`: the log over years (see
//! `crate::operate::archive`). All but `import` go through a running daemon, or the log when none runs.

use super::access::{call, expect};
use crate::config::Config;
use crate::domain::text::escape;
use crate::operate::archive::{self, format_time, parse_time};
use crate::operate::control::{Request, Response};
use anyhow::Context;
use std::path::Path;
use std::time::SystemTime;

fn unexpected(r: &Response) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer from the daemon: {r:?}")
}

/// A path as the daemon (another working directory) must see it.
fn absolute(p: &Path) -> anyhow::Result<std::path::PathBuf> {
    std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))
}

/// A command-line time (see `archive::parse_time`; a span counts back from now), as RFC 3339:
/// clap's value parser, so a bad time is a usage error (exit 2).
pub fn time_arg(s: &str) -> Result<String, String> {
    parse_time(s, SystemTime::now()).map(format_time)
}

pub fn import(cfg: &Config, file: &Path, partial: bool) -> anyhow::Result<i32> {
    let dir = cfg.state_dir();
    let reader = if file == Path::new("-") {
        archive::open_export(std::io::BufReader::new(std::io::stdin()))
    } else {
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        archive::open_export(std::io::BufReader::new(f))
    }
    .with_context(|| format!("cannot read {}", file.display()))?;
    let report = archive::import(reader, &dir, partial)
        .with_context(|| format!("cannot import {}", file.display()))?;
    if let Some(why) = &report.partial {
        eprintln!(
            "build-image: WARNING: {} is not a whole export: {why}. --partial: its {} event(s) were imported as they are; events after them may be missing",
            file.display(),
            report.events
        );
    }
    println!(
        "imported {} event(s) of {} job(s) into {} (last seq {}){}",
        report.events,
        report.jobs,
        report.dir.display(),
        report.last_seq,
        if report.partial.is_some() {
            ", PARTIAL: the export was not whole"
        } else {
            ""
        }
    );
    Ok(0)
}

pub fn backup(cfg: &Config, dir: &Path) -> anyhow::Result<i32> {
    let dir = absolute(dir)?;
    let r = expect(call(cfg, Request::Backup { dir }, |_| true)?)?;
    let Response::BackedUp(r) = r else {
        return Err(unexpected(&r));
    };
    println!(
        "backed up {} event(s), up to seq {}, into {}",
        r.events,
        r.upto,
        r.dir.display()
    );
    Ok(0)
}

pub fn compact(cfg: &Config, before: &str, archive_file: &Path) -> anyhow::Result<i32> {
    let now = SystemTime::now();
    if parse_time(before, now).is_ok_and(|t| t > now) {
        return Err(super::Usage(format!(
            "--before {before} is in the future (now is {}): compact moves jobs settled before a time that has passed",
            format_time(now)
        ))
        .into());
    }
    let before = before.to_string();
    let archive = absolute(archive_file)?;
    let r = expect(call(cfg, Request::Compact { before, archive }, |_| true)?)?;
    let Response::Compacted(r) = r else {
        return Err(unexpected(&r));
    };
    match &r.archive {
        Some(a) => println!(
            "moved {} event(s) of {} job(s) to {}; {} event(s) left in the log (compacted event {}, job {})",
            r.events,
            r.jobs,
            a.display(),
            r.kept,
            r.seq.unwrap_or_default(),
            r.job.unwrap_or_default()
        ),
        None => println!("no job to move: nothing written, the log is unchanged"),
    }
    if r.kept_for_folder > 0 {
        println!(
            "{} settled job(s) kept: their job folder still exists under base_dir",
            r.kept_for_folder
        );
    }
    Ok(0)
}

pub fn repush(cfg: &Config, since: &str, until: Option<&str>) -> anyhow::Result<i32> {
    let now = SystemTime::now();
    let until = match until {
        Some(u) => u.to_string(),
        None => format_time(now),
    };
    if let (Ok(a), Ok(b)) = (parse_time(since, now), parse_time(&until, now))
        && b <= a
    {
        return Err(super::Usage(format!(
            "the window is empty: --until {until} is not after --since {since}"
        ))
        .into());
    }
    let since = since.to_string();
    let r = expect(call(
        cfg,
        Request::Repush {
            since: since.clone(),
            until: until.clone(),
        },
        |_| true,
    )?)?;
    let Response::Repushed(rows) = r else {
        return Err(unexpected(&r));
    };
    let mut failed = 0;
    for p in &rows {
        let how = match (&p.ok, &p.error) {
            (true, _) => "ok".to_string(),
            (false, Some(e)) => format!("FAILED: {}", escape(e)),
            (false, None) => "FAILED".to_string(),
        };
        failed += usize::from(!p.ok);
        println!(
            "job {} {} {} {how}",
            p.job,
            escape(p.image_id.as_deref().unwrap_or("-")),
            p.status.as_str()
        );
    }
    println!(
        "{} final push(es) of jobs finished in [{since}, {until}) run again, {failed} failed",
        rows.len()
    );
    Ok(if failed == 0 { 0 } else { 1 })
}

/// `redeliver` with no daemon running and `[amqp] url` set: the answer of an AMQP job is
/// published by a publish-only client of this command (connected, and the broker's confirm
/// awaited, for at most `patience`). None when a daemon runs (it answers the request).
fn redeliver_offline(
    cfg: &Config,
    id: &str,
    patience: std::time::Duration,
) -> anyhow::Result<Option<crate::operate::archive::Redelivered>> {
    if cfg.amqp.url.is_none()
        || crate::operate::control::Client::connect(&cfg.state_dir()).is_some()
    {
        return Ok(None);
    }
    let Some(host) = super::access::open_offline(cfg)? else {
        return Ok(None);
    };
    let Some(participant) = crate::edges::amqp::Participant::start(&host.engine, false)? else {
        return Ok(None);
    };
    let deadline = std::time::Instant::now() + patience;
    let result = loop {
        match crate::operate::archive::redeliver(&host, id) {
            Err(crate::operate::archive::ArchiveError::Engine(
                crate::engine::EngineError::Deferred(why),
            )) => {
                if std::time::Instant::now() >= deadline {
                    break Err(anyhow::anyhow!(
                        "the answer could not be published within {patience:?}: {why}"
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            r => break r.map_err(anyhow::Error::from),
        }
    };
    participant.stop(&host.engine);
    result.map(Some)
}

pub fn redeliver(cfg: &Config, id: &str) -> anyhow::Result<i32> {
    let r = match redeliver_offline(cfg, id, std::time::Duration::from_secs(30))? {
        Some(r) => r,
        None => {
            let r = expect(call(
                cfg,
                Request::Redeliver { id: id.to_string() },
                |_| true,
            )?)?;
            let Response::Redelivered(r) = r else {
                return Err(unexpected(&r));
            };
            r
        }
    };
    // where it went: outbox/<name>, or published to the reply queue (docs/amqp.md)
    println!(
        "job {} ({}) answered again: {}",
        r.job,
        escape(id),
        escape(&r.to.to_string())
    );
    if !r.identical {
        eprintln!(
            "build-image: WARNING: the answer differs from the one recorded at its delivery (the log has no sha256 of it, or this version writes answers differently)"
        );
    }
    Ok(0)
}
