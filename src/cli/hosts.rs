//! `hosts`: the farm's hosts, from the spool's `hosts/` records and (when a daemon of this
//! config runs) the records it heard on the farm exchange; a host whose record is stale is
//! shown as GONE with the jobs it held.

use crate::config::Config;
use crate::domain::text::escape;
use crate::edges::spool::Spool;
use crate::hosts::Shown;
use crate::operate::control::{Client, Request, Response};
use anyhow::Context;
use comfy_table::{Table, presets::NOTHING};
use std::time::SystemTime;

/// The farm's hosts as this host sees them (no daemon needed).
pub fn list(cfg: &Config) -> anyhow::Result<Vec<Shown>> {
    let spool = Spool::new(&cfg.spool.dir, &cfg.worker_id());
    let mut records = spool
        .host_records()
        .with_context(|| format!("cannot read the host records in {}", spool.hosts.display()))?;
    if let Some(c) = Client::connect(&cfg.state_dir())
        && let Ok(Response::Hosts { hosts }) = c.call(&Request::Hosts, |_| true)
    {
        records.extend(hosts.into_iter().map(|s| s.record));
    }
    Ok(crate::hosts::shown(records, SystemTime::now()))
}

pub fn run(cfg: &Config, json: bool) -> anyhow::Result<i32> {
    let hosts = list(cfg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&hosts)?);
        return Ok(0);
    }
    if hosts.is_empty() {
        println!(
            "no host records in {} (a daemon writes its own there while it runs)",
            Spool::new(&cfg.spool.dir, &cfg.worker_id()).hosts.display()
        );
        return Ok(0);
    }
    print!("{}", table(&hosts));
    Ok(0)
}

/// The table of `hosts` (pure).
pub fn table(hosts: &[Shown]) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(vec![
        "WORKER",
        "STATE",
        "HOST",
        "SLOTS",
        "QUEUED",
        "JOBS",
        "HEARTBEAT",
        "VERSION",
        "PID",
    ]);
    for h in hosts {
        let r = &h.record;
        let jobs: Vec<String> = r
            .running
            .iter()
            .map(|j| format!("{} (#{})", escape(&j.image_id), j.job))
            .collect();
        let jobs = match (h.shown.as_str(), jobs.is_empty()) {
            (_, true) => "-".to_string(),
            ("gone", false) => format!("held: {}", jobs.join(", ")),
            _ => jobs.join(", "),
        };
        let mut state = if h.shown == "gone" {
            "GONE".to_string()
        } else {
            h.shown.clone()
        };
        if let Some(why) = &r.drained {
            state.push_str(&format!(" ({})", escape(why)));
        }
        t.add_row(vec![
            escape(&r.worker).into_owned(),
            state,
            escape(&r.hostname).into_owned(),
            format!(
                "{}/{} busy",
                r.slots.total - r.slots.free.min(r.slots.total),
                r.slots.total
            ),
            r.queued.to_string(),
            jobs,
            h.age_s
                .map_or_else(|| "?".to_string(), |s| format!("{s} s ago")),
            escape(&r.version).into_owned(),
            r.pid.to_string(),
        ]);
    }
    format!("{t}\n")
}
