//! `pin`, `unpin`, `gc [--dry-run]`: the images' retention, through the daemon or the log.

use super::access::{call, expect};
use crate::config::Config;
use crate::domain::text::{escape, human_size};
use crate::operate::control::{Request, Response};

fn unexpected(r: &Response) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer from the daemon: {r:?}")
}

pub fn pin(cfg: &Config, id: &str, pin: bool) -> anyhow::Result<i32> {
    let req = Request::Pin {
        id: id.to_string(),
        pin,
    };
    let r = expect(call(cfg, req, |_| true)?)?;
    let Response::Pinned {
        job,
        pinned,
        changed,
    } = r
    else {
        return Err(unexpected(&r));
    };
    let what = if pinned { "pinned" } else { "not pinned" };
    if changed {
        println!("job {job} ({}) {what}", escape(id));
    } else {
        println!("job {job} ({}) was already {what}", escape(id));
    }
    Ok(0)
}

pub fn gc(cfg: &Config, dry_run: bool) -> anyhow::Result<i32> {
    let r = expect(call(cfg, Request::Gc { dry_run }, |_| true)?)?;
    let Response::Gc { dry_run, expired } = r else {
        return Err(unexpected(&r));
    };
    let verb = if dry_run { "would expire" } else { "expired" };
    for p in &expired {
        println!(
            "job {} {} {verb}: {} file(s), {}: {}",
            p.job,
            escape(p.image_id.as_deref().unwrap_or("-")),
            p.files.len(),
            human_size(p.bytes),
            escape(&p.reason)
        );
    }
    let total: u64 = expired.iter().map(|p| p.bytes).sum();
    println!(
        "{} image(s), {} {verb}{}",
        expired.len(),
        human_size(total),
        if dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        }
    );
    Ok(0)
}
