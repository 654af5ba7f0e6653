//! `status`, `show`, `events`, `replay`: reading the log, through the daemon or directly.

use super::access::{call, expect};
use crate::config::Config;
use crate::domain::State;
use crate::operate::control::{Client, Request, Response};
use crate::operate::ops::{self, EventFilter, StatusRow};
use comfy_table::{Table, presets::NOTHING};
use std::time::Duration;

fn unexpected(r: &Response) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer from the daemon: {r:?}")
}

pub fn status(
    cfg: &Config,
    json: bool,
    state: Option<State>,
    limit: Option<usize>,
) -> anyhow::Result<i32> {
    let r = expect(call(cfg, Request::Status { state, limit }, |_| true)?)?;
    let Response::Status {
        rows,
        failing,
        unpushed,
    } = r
    else {
        return Err(unexpected(&r));
    };
    if let Some(why) = failing {
        eprintln!("build-image: WARNING: {why}; nothing is claimed until that is over");
    }
    if let Some(note) = unpushed {
        eprintln!("build-image: note: {note}");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", status_table(&rows));
        print!("{}", leak_lines(&rows));
    }
    Ok(0)
}

/// What builds left on the host and could not free, one line each, after the table.
pub fn leak_lines(rows: &[StatusRow]) -> String {
    let mut out = String::new();
    for r in rows {
        for l in &r.leaks {
            out.push_str(&format!("LEAKED job {}: {}: {}\n", r.job, l.what, l.why));
        }
    }
    out
}

/// The aligned table people read.
pub fn status_table(rows: &[StatusRow]) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(vec![
        "JOB", "IMAGE_ID", "STATE", "NAME", "ARCH", "TYPE", "WORKER", "STARTED", "DURATION",
        "RESULT", "SOURCE",
    ]);
    let dash = || "-".to_string();
    for r in rows {
        let result = match (r.result, &r.error) {
            (Some(true), _) => "ok".to_string(),
            (Some(false), Some(e)) => {
                let e: String = e.chars().take(60).collect();
                match r.failure {
                    Some(f) => format!("error ({f}): {e}"),
                    None => format!("error: {e}"),
                }
            }
            (Some(false), None) => "error".to_string(),
            (None, _) => dash(),
        };
        t.add_row(vec![
            r.job.to_string(),
            r.image_id.clone().unwrap_or_else(dash),
            r.state.to_string(),
            r.name.clone().unwrap_or_else(dash),
            r.arch.clone().unwrap_or_else(dash),
            r.image_type.clone().unwrap_or_else(dash),
            r.worker.clone().unwrap_or_else(dash),
            r.started.clone().unwrap_or_else(dash),
            r.duration.map(|d| format!("{d:.1}s")).unwrap_or_else(dash),
            result,
            if r.source.is_empty() {
                dash()
            } else {
                r.source.clone()
            },
        ]);
    }
    format!("{t}\n")
}

pub fn show(cfg: &Config, id: &str, json: bool) -> anyhow::Result<i32> {
    let r = expect(call(cfg, Request::Show { id: id.to_string() }, |_| true)?)?;
    let Response::Show(view) = r else {
        return Err(unexpected(&r));
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(0);
    }
    let j = &view.job;
    println!("job        {}", j.id);
    println!("image_id   {}", j.image_id.as_deref().unwrap_or("-"));
    println!("state      {}", j.state);
    println!("file       {}", j.file.as_deref().unwrap_or("-"));
    println!("worker     {}", j.worker.as_deref().unwrap_or("-"));
    println!("source     {}", j.origin.name());
    println!("attempts   {}", j.attempts);
    if let Some(e) = &j.error {
        println!("error      {e}");
    }
    if let Some(r) = &j.receipt {
        println!("answer     {r}");
    }
    println!("log        {}", view.log_path.as_deref().unwrap_or("-"));
    println!("log url    {}", view.logfile_url.as_deref().unwrap_or("-"));
    println!("\nevents:");
    for e in &view.events {
        println!("{}", ops::event_line(e));
    }
    if let Some(w) = &view.workitem {
        println!("\nworkitem:\n{}", serde_json::to_string_pretty(w)?);
    }
    Ok(0)
}

/// Events read from the log at a time when no daemon runs.
const PAGE: usize = 4096;

pub fn events(cfg: &Config, filter: EventFilter, follow: bool, json: bool) -> anyhow::Result<i32> {
    let print = |e: &crate::domain::Event| -> bool {
        let line = if json {
            serde_json::to_string(e).unwrap_or_default()
        } else {
            ops::event_line(e)
        };
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").and_then(|_| out.flush()).is_ok()
    };
    let mut next = filter.since;
    loop {
        let f = EventFilter {
            since: next,
            ..filter.clone()
        };
        let req = Request::Events {
            filter: f.clone(),
            follow,
        };
        // Through a daemon: it streams (and, with --follow, keeps streaming while it runs).
        if let Some(client) = Client::connect(&cfg.state_dir()) {
            let res = client.call(&req, |e| {
                next = e.seq + 1;
                print(e)
            });
            match res {
                Ok(r @ (Response::Error { .. } | Response::Busy)) => {
                    expect(r)?;
                }
                Ok(_) if !follow => return Ok(0),
                Ok(_) => {} // the daemon stopped: go on reading the log directly
                Err(e) if !follow => return Err(e),
                Err(_) => {}
            }
        } else if let Some(host) = super::access::open_offline(cfg)? {
            // A page at a time: an export of a long log is never held whole.
            let journal = host.engine.store.journal()?;
            let evs = ops::events_page(&journal, &f, PAGE)?;
            drop(journal);
            drop(host); // never hold the lock a starting daemon needs
            for e in &evs {
                next = e.seq + 1;
                if !print(e) {
                    return Ok(0);
                }
            }
            if !evs.is_empty() && (evs.len() >= PAGE || f.inputs) {
                continue; // the next page (one cut short by its inputs' size too)
            }
            if !follow {
                return Ok(0);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn replay(cfg: &Config, json: bool) -> anyhow::Result<i32> {
    let r = expect(call(cfg, Request::Replay, |_| true)?)?;
    let Response::Replay(report) = r else {
        return Err(unexpected(&r));
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for d in &report.disagreements {
            println!("DISAGREE {d}");
        }
        println!(
            "replayed {} events ({} jobs) in {:.3} s: {:.0} events/s; {} disagreement(s)",
            report.events,
            report.jobs,
            report.seconds,
            report.events_per_second,
            report.disagreements.len()
        );
    }
    Ok(if report.disagreements.is_empty() {
        0
    } else {
        1
    })
}
