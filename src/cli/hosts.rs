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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::{HostRecord, HostState, RunningJob, Slots};
    use std::time::Duration;

    #[test]
    fn the_table_marks_a_gone_host_with_the_jobs_it_held() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let rec = |w: &str, state, at: SystemTime, jobs: &[&str]| HostRecord {
            worker: w.into(),
            hostname: format!("{w}.lab"),
            version: "1.2".into(),
            pid: 42,
            state,
            drained: None,
            slots: Slots {
                total: 2,
                free: 2 - jobs.len(),
            },
            running: jobs
                .iter()
                .enumerate()
                .map(|(i, j)| RunningJob {
                    job: i as u64 + 1,
                    image_id: j.to_string(),
                    since: None,
                })
                .collect(),
            queued: 1,
            heartbeat: humantime::format_rfc3339_millis(at).to_string(),
            started: humantime::format_rfc3339_seconds(at).to_string(),
            interval_s: 5,
            http: None,
        };
        let now = t0 + Duration::from_secs(20);
        let hosts = crate::hosts::shown(
            [
                rec("b1", HostState::Running, now, &["img-a"]),
                rec("b2", HostState::Running, t0, &["img-b", "img-c"]),
                rec("b3", HostState::Stopped, t0, &[]),
            ],
            now,
        );
        let text = table(&hosts);
        let line = |w: &str| text.lines().find(|l| l.contains(w)).unwrap().to_string();
        assert!(text.lines().next().unwrap().contains("WORKER"), "{text}");
        assert!(line("b1").contains("running") && line("b1").contains("1/2 busy"));
        assert!(line("b1").contains("img-a (#1)") && !line("b1").contains("held"));
        assert!(line("b2").contains("GONE"), "{text}");
        assert!(
            line("b2").contains("held: img-b (#1), img-c (#2)"),
            "{text}"
        );
        assert!(line("b2").contains("20 s ago"), "{text}");
        assert!(
            line("b3").contains("stopped") && line("b3").contains(" - "),
            "{text}"
        );
    }
}
