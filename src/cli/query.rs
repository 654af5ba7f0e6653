//! `status`, `show`, `events`, `replay`: reading the log, through the daemon or directly.

use super::access::{call, expect};
use crate::config::Config;
use crate::domain::text::{escape, escape_lines};
use crate::domain::{Failure, State};
use crate::operate::control::{Client, Request, Response};
use crate::operate::ops::{self, EventFilter, StatusRow};
use anyhow::Context;
use comfy_table::{Table, presets::NOTHING};
use std::time::Duration;

fn unexpected(r: &Response) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer from the daemon: {r:?}")
}

/// How `status` prints its table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusForm {
    /// A JSON array instead of a table.
    pub json: bool,
    /// Every line of each error (else its first line).
    pub wide: bool,
}

pub fn status(
    cfg: &Config,
    form: StatusForm,
    state: Option<State>,
    limit: Option<usize>,
) -> anyhow::Result<i32> {
    let r = expect(call(cfg, Request::Status { state, limit }, |_| true)?)?;
    let Response::Status {
        rows,
        failing,
        unpushed,
        waiting,
        degraded,
        drained,
    } = r
    else {
        return Err(unexpected(&r));
    };
    if let Some(d) = drained {
        eprintln!(
            "build-image: WARNING: DRAINED since {}: {}; nothing is claimed until `build-image undrain`",
            escape(&d.since),
            escape(&d.reason)
        );
    }
    for what in degraded {
        eprintln!("build-image: WARNING: {}", escape(&what));
    }
    if let Some(why) = failing {
        eprintln!(
            "build-image: WARNING: {}; nothing is claimed until that is over",
            escape(&why)
        );
    }
    if let Some(why) = waiting {
        eprintln!("build-image: WARNING: {}", escape(&why));
    }
    if let Some(note) = unpushed {
        eprintln!("build-image: note: {}", escape(&note));
    }
    if form.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", status_table(&rows, form.wide));
        print!("{}", leak_lines(&rows));
    }
    Ok(0)
}

/// What builds left on the host and could not free, one line each, after the table (escaped).
pub fn leak_lines(rows: &[StatusRow]) -> String {
    let mut out = String::new();
    for r in rows {
        for l in &r.leaks {
            out.push_str(&format!(
                "LEAKED job {}: {}: {}\n",
                r.job,
                escape(&l.what),
                escape(&l.why)
            ));
        }
    }
    out
}

/// The RESULT column of a failed job: its failure class and its error's first line whole (the cause: see
/// `imaging::joblog::failure`), or with `wide` every line; each line escaped.
fn error_cell(error: &str, failure: Option<Failure>, wide: bool) -> String {
    let label = match failure {
        Some(f) => format!("error ({f})"),
        None => "error".to_string(),
    };
    let lines: Vec<&str> = error.lines().filter(|l| !l.trim().is_empty()).collect();
    match lines.as_slice() {
        [] => label,
        [one] => format!("{label}: {}", escape(one)),
        [first, ..] if !wide => format!(
            "{label}: {} (+{} line(s): --wide)",
            escape(first),
            lines.len() - 1
        ),
        all => format!(
            "{label}: {}",
            all.iter().map(|l| escape(l)).collect::<Vec<_>>().join("\n")
        ),
    }
}

/// The aligned table people read; every text from the log escaped (a terminal never acts on it).
pub fn status_table(rows: &[StatusRow], wide: bool) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(vec![
        "JOB", "IMAGE_ID", "STATE", "NAME", "ARCH", "TYPE", "WORKER", "STARTED", "DURATION",
        "RESULT", "SOURCE",
    ]);
    let dash = || "-".to_string();
    let text = |s: &Option<String>| s.as_deref().map_or_else(dash, |s| escape(s).into_owned());
    for r in rows {
        let result = match (r.result, &r.error) {
            (Some(true), _) => {
                let mut cell = match &r.images {
                    Some(what) => format!("ok ({what})"),
                    None => "ok".to_string(),
                };
                if let (true, Some(h)) = (wide, &r.image_sha256) {
                    cell.push_str(&format!(" sha256:{}", escape(h)));
                }
                cell
            }
            (Some(false), Some(e)) => error_cell(e, r.failure, wide),
            (Some(false), None) => "error".to_string(),
            (None, _) => dash(),
        };
        t.add_row(vec![
            r.job.to_string(),
            text(&r.image_id),
            r.state.to_string(),
            text(&r.name),
            text(&r.arch),
            text(&r.image_type),
            text(&r.worker),
            text(&r.started),
            r.duration.map(|d| format!("{d:.1}s")).unwrap_or_else(dash),
            result,
            if r.source.is_empty() {
                dash()
            } else {
                escape(&r.source).into_owned()
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
    // Every text from the log escaped: a terminal never acts on what a workitem or mic said.
    let j = &view.job;
    let text = |s: &Option<String>| escape(s.as_deref().unwrap_or("-")).into_owned();
    println!("job        {}", j.id);
    println!("image_id   {}", text(&j.image_id));
    println!("state      {}", j.state);
    println!("file       {}", text(&j.file));
    println!("worker     {}", text(&j.worker));
    println!("source     {}", j.origin.name());
    println!("attempts   {}", j.attempts);
    if let Some(e) = &j.error {
        // each line of a multi-line error under the first
        println!(
            "error      {}",
            escape_lines(e).replace('\n', "\n           ")
        );
    }
    if let Some(r) = &j.receipt {
        println!("answer     {}", escape(&r.to_string()));
    }
    println!("log        {}", text(&view.log_path));
    println!("log url    {}", text(&view.logfile_url));
    if let Some(h) = &j.urls.image_sha256 {
        println!("image hash sha256:{}", escape(h));
    }
    if j.pinned {
        println!("images     pinned (kept out of every expiry)");
    }
    if let Some(e) = &j.expired {
        println!(
            "images     expired at {} ({}, {} file(s)): {}",
            escape(&e.at),
            crate::domain::text::human_size(e.bytes),
            e.files.len(),
            escape(&e.reason)
        );
    }
    if let Some(p) = &j.urls.provenance_url {
        println!("provenance {}", escape(p));
    }
    println!("\nevents:");
    for e in &view.events {
        println!("{}", escape(&ops::event_line(e)));
    }
    if let Some(w) = &view.workitem {
        // line by line: JSON's own line breaks stay, its strings keep their meaning
        let json = serde_json::to_string_pretty(w)?;
        println!("\nworkitem:\n{}", escape_lines(&json));
    }
    Ok(0)
}

/// Events read from the log at a time when no daemon runs.
const PAGE: usize = 4096;

pub fn events(cfg: &Config, filter: EventFilter, follow: bool, json: bool) -> anyhow::Result<i32> {
    use std::io::Write;
    // With --json, the export: the lines printed are counted and digested for its trailer.
    let digest = std::cell::RefCell::new(crate::operate::export::Digest::default());
    let print = |e: &crate::domain::Event| -> bool {
        let line = if json {
            match crate::operate::export::event_line(e) {
                Ok(line) => line,
                Err(_) => return false,
            }
        } else {
            let mut line = escape(&ops::event_line(e)).into_owned().into_bytes();
            line.push(b'\n');
            line
        };
        let mut out = std::io::stdout().lock();
        let written = out.write_all(&line).and_then(|_| out.flush()).is_ok();
        if written && json {
            digest.borrow_mut().line(&line);
        }
        written
    };
    // The end of an export (not of --follow, which never ends): its trailer.
    let end = || -> anyhow::Result<i32> {
        if json {
            let mut out = std::io::stdout().lock();
            out.write_all(&digest.borrow().trailer_line())
                .and_then(|_| out.flush())
                .context("cannot write the export's trailer")?;
        }
        Ok(0)
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
            let mut stopped = false;
            let res = client.call(&req, |e| {
                next = e.seq + 1;
                stopped = !print(e);
                !stopped
            });
            match res {
                Ok(r @ (Response::Error { .. } | Response::Busy)) => {
                    expect(r)?;
                }
                Ok(_) if !follow => return end(),
                Ok(_) => {} // the daemon stopped: go on reading the log directly
                Err(_) if stopped => return Ok(0), // stdout closed: no trailer
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
                return end();
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
            println!("DISAGREE {}", escape(d));
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
