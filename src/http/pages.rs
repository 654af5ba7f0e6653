//! The HTML pages: pure functions from what the log says to markup, and the job page's script.
//! Inline CSS; the only script is `/live.js` (the job page's live log), and every page reads
//! fully without it.
//!
//! Invariant: every value goes in through maud's `html!`, which escapes it, so text from a
//! workitem or a build log (a name holding `<script>`) is shown, never run; the script adds
//! log text as text nodes only.

use crate::domain::{Event, Job, State};
use crate::operate::ops::{self, StatusRow};
use maud::{DOCTYPE, Markup, PreEscaped, html};

/// One row of the status page.
pub struct Row {
    pub status: StatusRow,
    /// Where the job's files are served (its job folder under base_url), when known.
    pub files_url: Option<String>,
    /// The job has a build log (it was accepted for building).
    pub has_log: bool,
}

/// What the status page shows.
pub struct Index {
    pub worker: String,
    pub rows: Vec<Row>,
    /// Jobs per state (all the log's jobs); None while they are being counted at a start.
    pub counts: Option<Vec<(State, i64)>>,
    pub filter: Option<State>,
    pub limit: usize,
    /// The `before` of the next (older) page, if there is one.
    pub older: Option<u64>,
    /// The page is not the newest one.
    pub paged: bool,
    /// Why the log cannot be written now, if so.
    pub failing: Option<String>,
    /// The farm's hosts (their records), for the hosts panel.
    pub hosts: Vec<crate::hosts::Shown>,
}

/// What a job's page shows.
pub struct JobPage {
    pub worker: String,
    pub job: Job,
    pub row: StatusRow,
    pub events: Vec<Event>,
    /// The answer's fields, as (name, value) pairs, in the order people read them.
    pub answer: Vec<(String, String)>,
    /// The whole workitem as the outbox has (or will have) it, pretty-printed.
    pub workitem: Option<String>,
    pub log: Option<LogTail>,
    pub files_url: Option<String>,
    pub image_url: Option<String>,
}

/// The end of a job's build log (positions are stream positions, see
/// [`crate::imaging::logread`]).
pub struct LogTail {
    pub text: String,
    /// Bytes of output before `text` that are not shown (its stream position).
    pub skipped: u64,
    /// The stream position where `text` ends: the live stream of new output starts here.
    pub offset: u64,
    /// The file does not exist (yet).
    pub missing: bool,
    /// The log may still grow: the page streams it.
    pub live: bool,
}

const CSS: &str = r#"
:root{--bg:#f5f6f8;--fg:#1b2130;--muted:#677083;--line:#e2e5eb;--card:#fff;--accent:#2454c7}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;background:var(--bg);color:var(--fg)}
header{background:#1b2130;color:#fff;padding:12px 28px;display:flex;align-items:baseline;gap:18px}
header .brand{color:#fff;text-decoration:none;font-weight:700;font-size:17px;letter-spacing:.01em}
header .sub{color:#a9b1c1;font-size:13px}
header nav{margin-left:auto;display:flex;gap:16px}
header nav a{color:#c9d1e0;font-size:13px;text-decoration:none}
header nav a:hover{color:#fff}
main{padding:22px 28px;max-width:1480px;margin:0 auto}
h1{font-size:20px;margin:0 0 16px;display:flex;align-items:center;gap:12px;flex-wrap:wrap}
a{color:var(--accent)}
.filters{display:flex;flex-wrap:wrap;gap:6px;margin-bottom:16px}
.chip{display:inline-flex;gap:6px;align-items:center;padding:4px 11px;border:1px solid var(--line);border-radius:999px;background:var(--card);color:var(--fg);text-decoration:none;font-size:13px}
.chip:hover{border-color:#b9c0cc}
.chip.on{background:var(--fg);color:#fff;border-color:var(--fg)}
.chip .n{font-weight:600;font-variant-numeric:tabular-nums}
.chip.zero{color:#9aa2b1}
table{width:100%;border-collapse:separate;border-spacing:0;background:var(--card);border:1px solid var(--line);border-radius:10px;overflow:hidden}
th{text-align:left;font-weight:600;font-size:11.5px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);background:#fafbfc;padding:9px 10px;border-bottom:1px solid var(--line);white-space:nowrap}
td{padding:8px 10px;border-bottom:1px solid var(--line);vertical-align:top}
tbody tr:last-child td{border-bottom:0}
tbody tr:hover{background:#f4f7fe}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
td.mono,td.name{white-space:nowrap}
td.result{min-width:190px;max-width:380px;overflow-wrap:anywhere}
.scroll{overflow-x:auto;border-radius:10px}
.nowrap{white-space:nowrap}
.badge{display:inline-flex;align-items:center;padding:2px 9px;border-radius:999px;font-size:12px;font-weight:600;white-space:nowrap}
.s-claimed,.s-moved{background:#eceff4;color:#4a5263}
.s-queued{background:#e3ebff;color:#2243a0}
.s-building{background:#fff1cc;color:#7f5300}
.s-building::before{content:"";width:7px;height:7px;border-radius:50%;background:#e09b00;margin-right:6px;animation:pulse 1.2s ease-in-out infinite}
.s-interrupted{background:#ffe6d1;color:#8f4300}
.s-finished{background:#d9f3ef;color:#0d665a}
.s-done{background:#d8f3e0;color:#166a2e}
.s-error{background:#fde0de;color:#a01f19}
.s-rejected{background:#ece5f6;color:#563c82}
@keyframes pulse{50%{opacity:.25}}
.ok{color:#166a2e;font-weight:600}
.err{color:#a01f19}
#cause{white-space:pre-line}
.muted{color:var(--muted)}
.links a{margin-right:10px;white-space:nowrap}
.pager{margin-top:14px;display:flex;justify-content:space-between;align-items:center;color:var(--muted);font-size:13px}
.banner{background:#fde0de;color:#a01f19;padding:10px 14px;border-radius:8px;margin-bottom:16px;border:1px solid #f3b3ae}
.empty{padding:28px;text-align:center;color:var(--muted)}
.cols{display:grid;grid-template-columns:minmax(0,5fr) minmax(0,7fr);gap:20px;align-items:start}
@media (max-width:1000px){.cols{grid-template-columns:1fr}}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 18px;margin-bottom:20px}
.card h2{font-size:12px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted);margin:0 0 12px;display:flex;align-items:center;gap:10px}
dl{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:5px 18px;margin:0}
dt{color:var(--muted)}
dd{margin:0;overflow-wrap:anywhere}
ol.timeline{list-style:none;margin:0;padding:0 0 0 6px}
ol.timeline li{position:relative;padding:0 0 12px 20px;border-left:2px solid var(--line)}
ol.timeline li:last-child{border-left-color:transparent;padding-bottom:0}
ol.timeline li::before{content:"";position:absolute;left:-7px;top:3px;width:8px;height:8px;border-radius:50%;background:var(--card);border:2px solid #98a1b1}
ol.timeline li.k-finished::before,ol.timeline li.k-delivered::before{border-color:#166a2e;background:#d8f3e0}
ol.timeline li.k-started::before{border-color:#e09b00;background:#fff1cc}
ol.timeline li.bad::before{border-color:#a01f19;background:#fde0de}
.ev-head{display:flex;gap:10px;align-items:baseline}
.ev-kind{font-weight:600}
.ev-time{color:var(--muted);font-size:12px;font-variant-numeric:tabular-nums}
.ev-detail{color:#333b4a;overflow-wrap:anywhere;font-size:13px}
.logbox{display:flex;flex-direction:column-reverse;max-height:560px;overflow:auto;background:#0f1522;border-radius:8px}
pre.log{color:#dfe5ee;padding:12px 14px;font-size:12.5px;line-height:1.45;white-space:pre-wrap;overflow-wrap:anywhere;margin:0}
.warn{color:#8f4300}
pre.json{background:#f7f8fa;border:1px solid var(--line);padding:10px 12px;border-radius:8px;max-height:420px;overflow:auto;font-size:12px;margin:10px 0 0}
.live{font-size:11.5px;padding:2px 9px;border-radius:999px;background:#eceff4;color:#4a5263;text-transform:none;letter-spacing:0;font-weight:600}
.live.on{background:#d8f3e0;color:#166a2e}
details summary{cursor:pointer;color:var(--accent);margin-top:12px}
.s-running{background:#d8f3e0;color:#166a2e}
.s-draining,.s-stopping{background:#ffe6d1;color:#8f4300}
.s-stopped{background:#eceff4;color:#4a5263}
.s-gone{background:#a01f19;color:#fff}
tr.gone td{background:#fff4f3}
.hosts td{vertical-align:middle}
.hosts .me{font-family:system-ui,sans-serif;font-size:12px}
.hosts{margin-bottom:20px}
.hosts h2{font-size:12px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted);margin:0 0 8px}
footer{color:var(--muted);font-size:12px;padding:0 28px 24px;max-width:1480px;margin:0 auto}
"#;

fn layout(title: &str, worker: &str, head_extra: Markup, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · build-image" }
                style { (PreEscaped(CSS)) }
                (head_extra)
            }
            body {
                header {
                    a.brand href="/" { "build-image" }
                    span.sub { "worker " (worker) }
                    nav {
                        a href="/" { "jobs" }
                        a href="/api/jobs" { "API" }
                        a href="/metrics" { "metrics" }
                    }
                }
                main { (body) }
                footer { "build-image " (env!("CARGO_PKG_VERSION")) " · read-only" }
            }
        }
    }
}

fn badge(state: State) -> Markup {
    html! { span class={ "badge s-" (state.as_str()) } { (state.as_str()) } }
}

/// A duration for people: 42.3 s, 3 min 05 s, 1 h 02 min.
pub fn human_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    if secs < 60.0 {
        return format!("{secs:.1} s");
    }
    let s = secs.round() as u64;
    if s < 3600 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    }
}

pub use crate::domain::text::human_size;

/// What the status page and a job's page say of a build stopped by a daemon stop or death
/// (not cancelled by anyone, not failed): it is built again at the next start.
pub const INTERRUPTED: &str = "interrupted, will be built again";

/// An RFC 3339 time as the status table shows it: `11-25 14:03:07` (UTC; the full time is
/// the cell's title).
pub fn table_time(ts: &str) -> String {
    let t = short_time(ts);
    t.get(5..).map(str::to_string).unwrap_or(t)
}

/// An RFC 3339 time as `2026-11-25 14:03:07` (UTC).
pub fn short_time(ts: &str) -> String {
    let t = ts.trim_end_matches('Z').replacen('T', " ", 1);
    t.split('.').next().unwrap_or(&t).to_string()
}

fn query(state: Option<State>, before: Option<u64>, limit: usize) -> String {
    let mut parts = Vec::new();
    if let Some(s) = state {
        parts.push(format!("state={}", s.as_str()));
    }
    if let Some(b) = before {
        parts.push(format!("before={b}"));
    }
    if limit != super::DEFAULT_PAGE {
        parts.push(format!("limit={limit}"));
    }
    if parts.is_empty() {
        "/".into()
    } else {
        format!("/?{}", parts.join("&"))
    }
}

/// The line of an error that says what went wrong, for the status page's row: its first line
/// (an error says its cause first: mic's own error line, or the daemon's reason). An error
/// recorded by an older version ("X exited with status 4; last output: a | b | Error: c"):
/// the last line of that output that reports an error (else its last line).
pub fn cause_line(error: &str) -> &str {
    let first = error.trim().lines().next().unwrap_or("").trim();
    let Some((_, output)) = first.split_once("; last output: ") else {
        return first;
    };
    let lines: Vec<&str> = output.split(" | ").map(str::trim).collect();
    lines
        .iter()
        .rev()
        .find(|l| l.to_ascii_lowercase().contains("error"))
        .or(lines.last())
        .copied()
        .filter(|l| !l.is_empty())
        .unwrap_or(first)
}

fn result_cell(r: &StatusRow) -> Markup {
    if r.state == State::Interrupted {
        return html! { span.warn { (INTERRUPTED) } };
    }
    html! {
        @match (r.result, &r.error) {
            (Some(true), _) => span.ok { "ok" },
            (Some(false), Some(e)) => span.err title=(e) {
                @let c = cause_line(e);
                (c.chars().take(90).collect::<String>())
                @if c.chars().count() > 90 { "…" }
            },
            (Some(false), None) => span.err { "failed" },
            (None, _) => span.muted { "–" },
        }
    }
}

/// The status page: the jobs newest first, filters by state, a page at a time.
pub fn index(p: &Index) -> Markup {
    let counts: Vec<(State, Option<i64>)> = match &p.counts {
        Some(c) => c.iter().map(|(s, n)| (*s, Some(*n))).collect(),
        None => State::ALL.iter().map(|s| (*s, None)).collect(),
    };
    let total: Option<i64> = p.counts.as_ref().map(|c| c.iter().map(|c| c.1).sum());
    // Reload by itself while something moves (no script needed).
    let moving = p.counts.is_none()
        || counts.iter().any(|(s, n)| {
            n.is_some_and(|n| n > 0)
                && matches!(s, State::Claimed | State::Queued | State::Building)
        });
    let head = html! {
        @if moving && !p.paged { meta http-equiv="refresh" content="10"; }
    };
    let title = match p.filter {
        Some(s) => format!("Jobs: {s}"),
        None => "Jobs".into(),
    };
    layout(
        &title,
        &p.worker,
        head,
        html! {
            @if let Some(why) = &p.failing {
                div.banner { strong { "The event log cannot be written: " } (why) ". Nothing is claimed until that is over." }
            }
            (hosts_panel(&p.hosts, &p.worker))
            nav.filters aria-label="filter by state" {
                a class={ "chip" @if p.filter.is_none() { " on" } } href=(query(None, None, p.limit)) {
                    "all" @if let Some(t) = total { span.n { (t) } }
                }
                @for (s, n) in &counts {
                    a class={ "chip" @if p.filter == Some(*s) { " on" } @if *n == Some(0) { " zero" } }
                        href=(query(Some(*s), None, p.limit)) data-state=(s.as_str()) {
                        (s.as_str()) @if let Some(n) = n { span.n { (n) } }
                    }
                }
                @if p.counts.is_none() { span.muted { "counting the jobs…" } }
            }
            div.scroll { table #jobs {
                thead { tr {
                    th.num { "Job" } th { "Image ID" } th { "State" } th { "Name" } th { "Arch" }
                    th { "Type" } th { "Worker" } th { "Started (UTC)" } th.num { "Duration" }
                    th { "Result" } th { "Links" }
                } }
                tbody {
                    @for row in &p.rows {
                        @let r = &row.status;
                        tr data-job=(r.job) data-state=(r.state.as_str()) {
                            td.num { a href={ "/jobs/" (r.job) } { (r.job) } }
                            td.mono { a href={ "/jobs/" (r.job) } { (r.image_id.as_deref().unwrap_or("–")) } }
                            td { (badge(r.state)) }
                            td.name { (r.name.as_deref().unwrap_or("–")) }
                            td.nowrap { (r.arch.as_deref().unwrap_or("–")) }
                            td { (r.image_type.as_deref().unwrap_or("–")) }
                            td { (r.worker.as_deref().unwrap_or("–")) }
                            td.nowrap.muted title=[r.started.as_deref()] { (r.started.as_deref().map(table_time).unwrap_or_else(|| "–".into())) }
                            td.num { (r.duration.map(human_duration).unwrap_or_else(|| "–".into())) }
                            td.result { (result_cell(r)) }
                            td.links {
                                @if row.has_log { a href={ "/jobs/" (r.job) "/log" } { "log" } }
                                @if let Some(u) = &row.files_url { a href=(u) { "files" } }
                            }
                        }
                    }
                }
            }
            }
            @if p.rows.is_empty() {
                div.empty { "No jobs" @if let Some(s) = p.filter { " in state " (s.as_str()) } "." }
            }
            div.pager {
                span {
                    "Newest first, " (p.limit) " per page"
                    @if p.paged { " · " a href=(query(p.filter, None, p.limit)) { "newest" } }
                }
                @if let Some(b) = p.older {
                    a href=(query(p.filter, Some(b), p.limit)) rel="next" { "older jobs →" }
                }
            }
        },
    )
}

/// The farm's hosts: each host's state (a gone one marked, with the jobs it held), slots,
/// queue, running jobs and heartbeat. Job numbers are each host's own: only this host's link.
fn hosts_panel(hosts: &[crate::hosts::Shown], me: &str) -> Markup {
    html! {
        @if !hosts.is_empty() {
            section.hosts #hosts {
                h2 { "Hosts of the farm" }
                div.scroll { table {
                    thead { tr {
                        th { "Worker" } th { "State" } th { "Host" } th.num { "Slots busy" }
                        th.num { "Queued" } th { "Jobs" } th { "Heartbeat" } th { "Version" }
                    } }
                    tbody {
                        @for h in hosts {
                            @let r = &h.record;
                            @let gone = h.shown == "gone";
                            tr class=[gone.then_some("gone")] data-worker=(r.worker) data-shown=(h.shown) {
                                td.mono {
                                    @if let Some(addr) = r.http.as_ref().filter(|_| r.worker != me) {
                                        a href={ "http://" (addr) "/" } { (r.worker) }
                                    } @else { (r.worker) }
                                    @if r.worker == me { " " span.muted.me { "(this host)" } }
                                }
                                td {
                                    span class={ "badge s-" (h.shown) } { (h.shown) }
                                    @if let Some(why) = &r.drained { " " span.muted { (why) } }
                                }
                                td { (r.hostname) " " span.muted { "pid " (r.pid) } }
                                td.num { (r.slots.total - r.slots.free.min(r.slots.total)) " / " (r.slots.total) }
                                td.num { (r.queued) }
                                td.mono {
                                    @if r.running.is_empty() { span.muted { "–" } }
                                    @if gone && !r.running.is_empty() { span.err { "held: " } }
                                    @for (i, j) in r.running.iter().enumerate() {
                                        @if i > 0 { ", " }
                                        @if r.worker == me {
                                            a href={ "/jobs/" (j.job) } { (j.image_id) }
                                        } @else {
                                            span class=[gone.then_some("err")] { (j.image_id) }
                                        }
                                        " " span.muted { "#" (j.job) }
                                    }
                                }
                                td.nowrap.muted title=(r.heartbeat) {
                                    @match h.age_s {
                                        Some(s) if s < 60 => { (s) " s ago" },
                                        Some(s) => { (human_duration(s as f64)) " ago" },
                                        None => { "?" },
                                    }
                                }
                                td.muted { (r.version) }
                            }
                        }
                    }
                } }
            }
        }
    }
}

fn event_class(e: &Event) -> String {
    use crate::domain::EventKind as K;
    let bad = match &e.kind {
        K::Finished { result, .. } => !result,
        K::Pushed { ok, .. } => !ok,
        K::Interrupted { cause, .. } => *cause == crate::domain::Cause::Crash,
        K::Rejected { .. } | K::Invalid { .. } | K::Cancelled { .. } => true,
        _ => false,
    };
    format!("k-{}{}", e.kind.name(), if bad { " bad" } else { "" })
}

/// What the timeline says of `e`: the job's error (the cause, shown with its facts) is not
/// repeated.
fn event_detail(e: &Event, j: &Job) -> String {
    let d = ops::event_detail(e);
    match j.error.as_deref().map(str::trim) {
        Some(err) if !err.is_empty() && d.contains(err) => {
            d.replace(err, "[the cause, shown with the job's facts]")
        }
        _ => d,
    }
}

/// A job's page: its facts, its events as a timeline, its answer and its build log's tail
/// (streamed while it builds, with `/live.js`).
pub fn job(p: &JobPage) -> Markup {
    let j = &p.job;
    let r = &p.row;
    let live = p.log.as_ref().is_some_and(|l| l.live);
    let head = html! {
        @if live {
            // Without JavaScript the page reloads itself while the build runs.
            noscript { meta http-equiv="refresh" content="5"; }
            script src="/live.js" defer {}
        }
    };
    let title = format!(
        "Job {} {}",
        j.id,
        j.image_id.as_deref().or(j.file.as_deref()).unwrap_or("")
    );
    layout(
        &title,
        &p.worker,
        head,
        html! {
            h1 {
                a href="/" .muted style="text-decoration:none" { "Jobs" } span.muted { "›" }
                span { "Job " (j.id) }
                @if let Some(id) = &j.image_id { span.mono { (id) } }
                (badge(j.state))
            }
            div.cols {
                div {
                    section.card #facts {
                        h2 { "Job" }
                        dl {
                            dt { "image_id" } dd.mono { (j.image_id.as_deref().unwrap_or("–")) }
                            dt { "name" } dd { (j.name.as_deref().unwrap_or("–")) }
                            dt { "arch" } dd { (j.arch.as_deref().unwrap_or("–")) }
                            dt { "type" } dd { (j.image_type.as_deref().unwrap_or("–")) }
                            dt { "worker" } dd { (j.worker.as_deref().unwrap_or("–")) }
                            dt { "input file" } dd.mono { (j.file.as_deref().unwrap_or("–")) }
                            dt { "attempts" } dd { (j.attempts) }
                            dt { "claimed" } dd { (j.claimed_at.as_deref().map(short_time).unwrap_or_else(|| "–".into())) }
                            dt { "started" } dd { (r.started.as_deref().map(short_time).unwrap_or_else(|| "–".into())) }
                            dt { "finished" } dd { (j.finished_at.as_deref().map(short_time).unwrap_or_else(|| "–".into())) }
                            dt { "duration" } dd { (r.duration.map(human_duration).unwrap_or_else(|| "–".into())) }
                            dt { "result" } dd {
                                @match r.result {
                                    _ if j.state == State::Interrupted => span.warn { (INTERRUPTED) },
                                    Some(true) => span.ok { "ok" },
                                    Some(false) => span.err { "failed" },
                                    None => span.muted { "–" },
                                }
                            }
                            @if let Some(e) = &j.error {
                                dt { @if r.result == Some(false) { "cause" } @else { "error" } }
                                dd.err #cause { (e) }
                            }
                            @if let (Some(false), Some(f)) = (j.result, j.failure) { dt { "failure" } dd { (f.as_str()) ": " (f.advice()) } }
                            @for l in &j.leaks { dt { "leaked" } dd.err { (l.what) ": " (l.why) } }
                            @if j.pinned { dt { "images" } dd #pinned { "pinned: kept out of every expiry" } }
                            @if let Some(e) = &j.expired {
                                dt { "images" } dd.warn #expired { "expired " (short_time(&e.at)) " (" (human_size(e.bytes)) "): " (e.reason) }
                            }
                            @if let Some(why) = &j.reason { dt { "reason" } dd { (why) } }
                            @if let Some(h) = j.held_by { dt { "held by" } dd { a href={ "/jobs/" (h) } { "job " (h) } } }
                            @if let Some(r) = &j.receipt { dt { "answer" } dd.mono { (r.to_string()) } }
                        }
                        p.links {
                            @if let Some(l) = &p.log {
                                a href={ "/jobs/" (j.id) "/log" } title="the whole build log, as this worker keeps it (plain text)" {
                                    "whole build log (" (human_size(l.offset)) ")"
                                }
                            }
                            @if let Some(u) = &p.files_url { a href=(u) { "files" } }
                            @if let Some(u) = &p.image_url { a href=(u) { "image" } }
                            @if let Some(u) = &p.job.urls.provenance_url { a href=(u) title="in-toto statement: the image's sha256 and what it was built from" { "provenance" } }
                            @if let (Some(u), Some(crate::domain::Mode::Kvm)) = (&p.files_url, j.mode) { a href={ (u) "/console.log" } { "guest console" } }
                            a href={ "/api/jobs/" (j.id) } { "JSON" }
                        }
                    }
                    section.card #events {
                        h2 { "Events" }
                        ol.timeline {
                            @for e in &p.events {
                                li class=(event_class(e)) data-kind=(e.kind.name()) {
                                    div.ev-head {
                                        span.ev-kind { (e.kind.name()) }
                                        span.ev-time title=(e.ts) { (short_time(&e.ts)) }
                                        span.muted.mono { "#" (e.seq) }
                                    }
                                    div.ev-detail { (event_detail(e, j)) }
                                }
                            }
                        }
                    }
                }
                div {
                    section.card #log {
                        h2 {
                            "Build log"
                            @if live { span #live .live { "live" } }
                        }
                        @match &p.log {
                            None => p.muted { "This job has no build log (it was never accepted for building)." },
                            Some(l) => {
                                @if l.skipped > 0 {
                                    p.muted { "The last " (human_size(l.offset - l.skipped.min(l.offset))) " of " (human_size(l.offset)) " are shown, scrolled to the end; the first " (human_size(l.skipped)) " are in "
                                        a href={ "/jobs/" (j.id) "/log" } { "the whole build log" } "." }
                                }
                                @if l.missing && !l.live {
                                    p.muted { "The log file does not exist." }
                                }
                                // The box opens at its end (column-reverse): where the build ended, or failed.
                                @if live {
                                    p.muted #logdropped hidden {
                                        "Older output is dropped from this page as new output comes: "
                                        a href={ "/jobs/" (j.id) "/log" } { "the whole build log" } " has it all."
                                    }
                                }
                                div.logbox #logbox {
                                    pre.log #logtext data-stream=[live.then(|| format!("/jobs/{}/log/stream", j.id))]
                                        data-offset=(l.offset) data-keep=(2 * super::LOG_TAIL) { (l.text) }
                                }
                            }
                        }
                    }
                    section.card #answer {
                        h2 { "Answer" }
                        @if p.answer.is_empty() {
                            p.muted { "No answer yet." }
                        } @else {
                            dl {
                                @for (k, v) in &p.answer { dt.mono { (k) } dd { (v) } }
                            }
                        }
                        @if let Some(w) = &p.workitem {
                            details {
                                summary { "the whole workitem" }
                                pre.json { (w) }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// A page saying what went wrong (404, 400, 500).
pub fn error(worker: &str, status: u16, message: &str) -> Markup {
    layout(
        &format!("{status}"),
        worker,
        html! {},
        html! {
            h1 { (status) }
            div.card { p { (message) } p { a href="/" { "all jobs" } } }
        },
    )
}

/// The script of the job page: appends the build log's new output as it comes (server-sent
/// events from `/jobs/ID/log/stream`, from the page's stream position on; a reconnect goes on
/// from the last event's), and reloads the page when the build is over. Text is added as text
/// nodes, never as HTML. The box keeps the log's last `data-keep` characters or so: older
/// output is dropped from the page as new output comes (the whole log is a link away). The
/// box stays at its end (its CSS opens it there) unless the reader scrolled up.
pub const LIVE_JS: &str = r#"(function () {
  var pre = document.getElementById('logtext');
  var badge = document.getElementById('live');
  if (!pre || !pre.dataset.stream || !window.EventSource) return;
  var keep = parseInt(pre.dataset.keep || '131072', 10) || 131072;
  var shown = pre.textContent.length;
  var dropped = false;
  function trim() {
    if (shown <= keep) return;
    var excess = shown - Math.floor(keep * 3 / 4);
    while (excess > 0 && pre.firstChild) {
      var n = pre.firstChild;
      var len = n.nodeValue === null ? 0 : n.nodeValue.length;
      if (len <= excess) { pre.removeChild(n); excess -= len; shown -= len; }
      else { n.deleteData(0, excess); shown -= excess; excess = 0; }
    }
    if (!dropped) {
      dropped = true;
      var note = document.getElementById('logdropped');
      if (note) note.hidden = false;
    }
  }
  var es = new EventSource(pre.dataset.stream + '?from=' + encodeURIComponent(pre.dataset.offset || '0'));
  es.onopen = function () { if (badge) { badge.textContent = 'live'; badge.className = 'live on'; } pre.dataset.live = 'on'; };
  es.onmessage = function (e) {
    pre.appendChild(document.createTextNode(e.data + '\n'));
    shown += e.data.length + 1;
    pre.dataset.offset = e.lastEventId;
    trim();
  };
  es.addEventListener('reset', function () { pre.textContent = ''; shown = 0; });
  es.addEventListener('end', function () {
    es.close();
    if (badge) { badge.textContent = 'build over'; badge.className = 'live'; }
    setTimeout(function () { location.reload(); }, 1500);
  });
  es.onerror = function () { if (badge) { badge.textContent = 'reconnecting'; badge.className = 'live'; } };
})();
"#;

#[cfg(test)]
mod tests {
    use super::job as job_markup;
    use super::*;

    /// The status page of `worker` with `rows` and `hosts`: no counts, filter or paging.
    fn plain_index(worker: &str, rows: Vec<Row>, hosts: Vec<crate::hosts::Shown>) -> String {
        index(&Index {
            worker: worker.into(),
            rows,
            counts: None,
            filter: None,
            limit: 100,
            older: None,
            paged: false,
            failing: None,
            hosts,
        })
        .into_string()
    }

    fn row(name: &str) -> Row {
        Row {
            status: StatusRow {
                job: 7,
                image_id: Some("7-1".into()),
                state: State::Building,
                name: Some(name.into()),
                arch: Some("i586".into()),
                image_type: Some("fs".into()),
                worker: Some("w1".into()),
                file: Some("a.json".into()),
                source: "spool".into(),
                started: Some("2026-11-25T10:00:00.123Z".into()),
                duration: Some(75.0),
                attempts: 1,
                result: Some(false),
                error: Some("<img src=x onerror=alert(1)>".into()),
                leaks: vec![],
                failure: None,
                images: None,
                image_sha256: None,
                provenance_url: None,
            },
            files_url: Some("http://x/\"><script>alert(2)</script>".into()),
            has_log: true,
        }
    }

    #[test]
    fn the_hosts_panel_marks_a_gone_host_with_its_jobs() {
        use crate::hosts::{HostRecord, HostState, RunningJob, Slots};
        let t0 = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let rec = |w: &str, job: &str| HostRecord {
            worker: w.into(),
            hostname: "<b>h</b>".into(),
            version: "1".into(),
            pid: 9,
            state: HostState::Running,
            drained: None,
            slots: Slots { total: 1, free: 0 },
            running: vec![RunningJob {
                job: 4,
                image_id: job.into(),
                since: None,
            }],
            queued: 2,
            heartbeat: humantime::format_rfc3339_millis(t0).to_string(),
            started: humantime::format_rfc3339_seconds(t0).to_string(),
            interval_s: 1,
            http: Some("127.0.0.1:1".into()),
        };
        let mut live = rec("w1", "live-1");
        live.heartbeat =
            humantime::format_rfc3339_millis(t0 + std::time::Duration::from_secs(9)).to_string();
        let hosts = crate::hosts::shown(
            [live, rec("w2", "<script>x</script>")],
            t0 + std::time::Duration::from_secs(10),
        );
        let page = plain_index("w1", vec![], hosts);
        assert!(
            page.contains("data-worker=\"w2\" data-shown=\"gone\""),
            "{page}"
        );
        assert!(page.contains("<tr class=\"gone\""), "{page}");
        assert!(page.contains("held: "), "{page}");
        assert!(page.contains("&lt;script&gt;x&lt;/script&gt;"), "{page}");
        assert!(!page.contains("<script>x") && !page.contains("<b>h</b>"));
        assert!(
            page.contains("data-worker=\"w1\" data-shown=\"running\""),
            "{page}"
        );
        assert!(
            page.contains("href=\"/jobs/4\""),
            "this host's job is linked"
        );
        assert!(
            page.contains("href=\"http://127.0.0.1:1/\""),
            "the other host's page"
        );
    }

    #[test]
    fn input_text_is_escaped() {
        let page = index(&Index {
            worker: "<b>w</b>".into(),
            rows: vec![row("<script>alert(1)</script>")],
            counts: Some(vec![(State::Building, 1)]),
            filter: None,
            limit: 100,
            older: Some(3),
            paged: false,
            failing: Some("<i>disk</i>".into()),
            hosts: vec![],
        })
        .into_string();
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!page.contains("<img src=x"));
        assert!(!page.contains("<b>w</b>") && !page.contains("<i>disk</i>"));
        assert!(page.contains("href=\"http://x/&quot;&gt;&lt;script&gt;"));
        assert!(page.contains("href=\"/?before=3\""), "older page link");
        assert!(
            page.contains("http-equiv=\"refresh\""),
            "reloads while building"
        );
    }

    /// A build stopped by a daemon stop is not shown as failed: the row and the page say it
    /// is built again, and its timeline does not mark the stop as bad (a crash it does).
    #[test]
    fn an_interrupted_build_is_not_shown_as_failed() {
        let mut r = row("n");
        r.status.state = State::Interrupted;
        r.status.result = None;
        r.status.error = None;
        let page = plain_index("w", vec![r], vec![]);
        assert!(page.contains(INTERRUPTED), "{page}");
        let job = Job {
            id: 7,
            state: State::Interrupted,
            ..Job::default()
        };
        let ev = |cause| Event {
            seq: 9,
            ts: "2026-11-25T10:00:00Z".into(),
            job: 7,
            kind: crate::domain::EventKind::Interrupted {
                reason: "the daemon stopped: the build was killed".into(),
                cause,
            },
        };
        assert_eq!(
            event_class(&ev(crate::domain::Cause::Stop)),
            "k-interrupted"
        );
        assert_eq!(
            event_class(&ev(crate::domain::Cause::Crash)),
            "k-interrupted bad"
        );
        let page = job_page(job, vec![ev(crate::domain::Cause::Stop)]);
        assert!(page.contains(INTERRUPTED), "{page}");
        assert!(!page.contains("failed"), "{page}");
    }

    fn job_page(job: Job, events: Vec<Event>) -> String {
        let status = ops::status_row(&job);
        job_markup(&JobPage {
            worker: "w".into(),
            row: status,
            events,
            answer: vec![],
            workitem: None,
            log: Some(LogTail {
                text: "last line\n".into(),
                skipped: 71_237_900,
                offset: 71_237_900 + 65_536,
                missing: false,
                live: false,
            }),
            files_url: None,
            image_url: None,
            job,
        })
        .into_string()
    }

    /// Sizes are in KiB and MiB, and the big log's tail opens at its end.
    #[test]
    fn sizes_for_people_and_the_tail_at_its_end() {
        assert_eq!(human_size(512), "512 bytes");
        assert_eq!(human_size(65_536), "64.0 KiB");
        assert_eq!(human_size(71_237_900), "67.9 MiB");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
        let page = job_page(
            Job {
                id: 3,
                state: State::Done,
                result: Some(true),
                ..Job::default()
            },
            vec![],
        );
        assert!(page.contains("the first 67.9 MiB are in"), "{page}");
        assert!(page.contains("whole build log (68.0 MiB)"), "{page}");
        assert!(!page.contains("71237900 bytes"), "{page}");
        assert!(page.contains("class=\"logbox\""), "{page}");
        assert!(CSS.contains(".logbox{display:flex;flex-direction:column-reverse"));
    }

    #[test]
    fn the_row_says_the_cause() {
        let e = "/x/mic exited with status 4; last output: mic arg: --arch=armv7hl | Error <creator>: failed to create image (fail 4) | bye";
        assert_eq!(
            cause_line(e),
            "Error <creator>: failed to create image (fail 4)"
        );
        assert_eq!(
            cause_line("/x/mic exited with status 4; last output: a | b"),
            "b"
        );
        assert_eq!(cause_line("timed out after 30 s"), "timed out after 30 s");
        assert_eq!(cause_line("x; last output: "), "x; last output:");
        // today's errors: the cause first, the command's status after it
        assert_eq!(
            cause_line(
                "Error <creator>: failed to resolve package foo\n/x/mic exited with status 1"
            ),
            "Error <creator>: failed to resolve package foo"
        );
    }

    #[test]
    fn durations_and_times() {
        assert_eq!(human_duration(4.25), "4.2 s");
        assert_eq!(human_duration(185.0), "3 min 05 s");
        assert_eq!(human_duration(3720.0), "1 h 02 min");
        assert_eq!(human_duration(-1.0), "-");
        assert_eq!(
            short_time("2026-11-25T10:00:00.123Z"),
            "2026-11-25 10:00:00"
        );
    }
}
