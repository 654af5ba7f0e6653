//! The handlers: plain functions from a request's route and parameters to a [`Reply`] (the
//! status page, a job's page, the API, `/metrics`, `/healthz`), over the daemon's host.
//!
//! Invariants:
//! - They change nothing: every answer is read from the store the daemon records into.
//! - The API answers with the functions the operator commands use (`control::handle` for
//!   `status`, `ops::show` for `show`), so `/api/jobs` is `status --json` and `/api/jobs/ID`
//!   is `show --json`.
//! - `/metrics` reads memory only ([`Metrics`], kept by the store's observer), and a page of
//!   `/` looks at `PAGE_SCAN` job ids at most: both cost the same at any log size.

use super::exposition::{Data, Family, Format, Number, encode};
use super::logview::{LOG_TAIL, is_live, read_tail};
use super::metrics::Metrics;
use super::pages;
use super::routes::{param, parse_state};
use crate::domain::{Job, State};
use crate::imaging::logread;
use crate::journal::{Journal, JournalError};
use crate::operate::Host;
use crate::operate::control::{self, Request as CtlRequest, Response as CtlResponse};
use crate::operate::ops;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

/// Jobs on one page of `/` unless `?limit=` says otherwise (at most `MAX_PAGE`).
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;
/// Job ids one page of `/` looks at, at most: with a rare state as filter, a page may end
/// early (its "older" link goes on from there), so a page costs the same at any log size.
pub const PAGE_SCAN: u64 = 100_000;

/// A finished answer, before it becomes an HTTP response (built by the handlers, which are
/// plain functions, turned into hyper's type in one place).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

const HTML: &str = "text/html; charset=utf-8";
const JSON: &str = "application/json";
pub(super) const TEXT: &str = "text/plain; charset=utf-8";

impl Reply {
    pub(super) fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status,
            content_type,
            body: body.into(),
        }
    }

    fn json<T: serde::Serialize>(v: &T) -> Reply {
        match serde_json::to_string_pretty(v) {
            Ok(mut s) => {
                s.push('\n');
                Reply::new(200, JSON, s)
            }
            Err(e) => Reply::api_error(500, &format!("cannot encode the answer: {e}")),
        }
    }

    pub(super) fn api_error(status: u16, message: &str) -> Reply {
        let body = serde_json::json!({ "error": message }).to_string() + "\n";
        Reply::new(status, JSON, body)
    }
}

/// What the handlers share: the daemon's host (engine, spool, config) and metrics.
pub struct App {
    pub host: Arc<Host>,
    pub metrics: Arc<Metrics>,
}

impl App {
    fn worker(&self) -> &str {
        &self.host.spool.worker
    }

    pub(super) fn page_error(&self, status: u16, message: &str) -> Reply {
        Reply::new(
            status,
            HTML,
            pages::error(self.worker(), status, message).into_string(),
        )
    }

    fn journal(&self) -> Result<Arc<Journal>, Reply> {
        self.host
            .engine
            .store
            .journal()
            .map_err(|e| self.page_error(503, &e.to_string()))
    }

    /// `GET /api/jobs[?state=S][&limit=N]`: `status --json [--state S] [--limit N]`.
    pub fn api_jobs(&self, params: &[(String, String)]) -> Reply {
        let state = match param(params, "state").map(parse_state).transpose() {
            Ok(s) => s,
            Err(e) => return Reply::api_error(400, &e),
        };
        let limit = match param(params, "limit").map(str::parse::<usize>).transpose() {
            Ok(l) => l,
            Err(_) => return Reply::api_error(400, "limit is not a number"),
        };
        match control::handle(&self.host, CtlRequest::Status { state, limit }, |_| true) {
            CtlResponse::Status { rows, .. } => Reply::json(&rows),
            CtlResponse::Error { message } => Reply::api_error(500, &message),
            other => Reply::api_error(500, &format!("unexpected answer {other:?}")),
        }
    }

    /// `GET /api/hosts`: `hosts --json` (the farm's hosts as this daemon sees them).
    pub fn api_hosts(&self) -> Reply {
        Reply::json(&crate::operate::hosts::farm(&self.host))
    }

    /// `GET /api/jobs/ID`: `show ID --json`.
    pub fn api_job(&self, id: &str) -> Reply {
        let journal = match self.host.engine.store.journal() {
            Ok(j) => j,
            Err(e) => return Reply::api_error(503, &e.to_string()),
        };
        match ops::show(&journal, &self.host.cfg, id) {
            Ok(view) => Reply::json(&view),
            Err(e @ ops::OpsError::NotFound(_)) => Reply::api_error(404, &e.to_string()),
            Err(e) => Reply::api_error(500, &e.to_string()),
        }
    }

    /// `GET /[?state=S][&before=JOB][&limit=N]`: the status page.
    pub fn index(&self, params: &[(String, String)]) -> Reply {
        let filter = match param(params, "state")
            .filter(|s| !s.is_empty())
            .map(parse_state)
        {
            None => None,
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => return self.page_error(400, &e),
        };
        let before = match param(params, "before").map(str::parse::<u64>).transpose() {
            Ok(b) => b,
            Err(_) => return self.page_error(400, "before is not a job number"),
        };
        let limit = match param(params, "limit").map(str::parse::<usize>).transpose() {
            Ok(l) => l.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE),
            Err(_) => return self.page_error(400, "limit is not a number"),
        };
        let journal = match self.journal() {
            Ok(j) => j,
            Err(r) => return r,
        };
        let (jobs, older) = match newest(&journal, filter, before, limit) {
            Ok(x) => x,
            Err(e) => return self.page_error(500, &e.to_string()),
        };
        let w = &self.host.cfg.worker;
        let rows = jobs
            .iter()
            .map(|job| {
                let spec = crate::engine::store::spec_of(&journal, job).ok().flatten();
                let files_url = job.urls.files_url.clone().or_else(|| {
                    spec.as_ref()
                        .and_then(|s| crate::imaging::planned_urls(w, s).files_url)
                });
                pages::Row {
                    status: ops::status_row(job),
                    files_url,
                    has_log: spec.is_some(),
                }
            })
            .collect();
        let page = pages::Index {
            worker: self.worker().to_string(),
            rows,
            counts: self.metrics.job_counts(),
            filter,
            limit,
            older,
            paged: before.is_some(),
            failing: self.host.engine.store.failing(),
            hosts: crate::operate::hosts::farm(&self.host),
        };
        Reply::new(200, HTML, pages::index(&page).into_string())
    }

    /// How this worker's job logs are bounded (what their reader needs to know).
    pub(super) fn log_bound(&self) -> logread::Bound {
        logread::Bound::of(&self.host.cfg.worker)
    }

    /// The job `id` names, and its build log's path (for an accepted job).
    pub(super) fn job_and_log(&self, id: &str) -> Result<(Job, Option<PathBuf>), (u16, String)> {
        let journal = self
            .host
            .engine
            .store
            .journal()
            .map_err(|e| (503, e.to_string()))?;
        let n = ops::resolve(&journal, id).map_err(|e| match e {
            ops::OpsError::NotFound(_) => (404, e.to_string()),
            e => (500, e.to_string()),
        })?;
        let job = self
            .host
            .engine
            .store
            .job(n)
            .ok_or((404, format!("no job {n}")))?;
        let log = crate::engine::store::spec_of(&journal, &job)
            .map_err(|e| (500, e.to_string()))?
            .map(|spec| crate::imaging::log_path(&self.host.cfg.worker, &spec));
        Ok((job, log))
    }

    /// `GET /jobs/ID`: a job's page.
    pub fn job_page(&self, id: &str) -> Reply {
        let journal = match self.journal() {
            Ok(j) => j,
            Err(r) => return r,
        };
        let view = match ops::show(&journal, &self.host.cfg, id) {
            Ok(v) => v,
            Err(e @ ops::OpsError::NotFound(_)) => return self.page_error(404, &e.to_string()),
            Err(e) => return self.page_error(500, &e.to_string()),
        };
        let live = is_live(view.job.state);
        let log = view
            .log_path
            .as_ref()
            .map(|p| read_tail(std::path::Path::new(p), self.log_bound(), LOG_TAIL, live));
        let answer = answer_fields(view.workitem.as_ref(), &view.job);
        let urls = &view.job.urls;
        let planned = view.workitem.as_ref().and_then(|w| {
            let img = w.pointer("/fields/image").or_else(|| w.get("image"));
            img.and_then(|i| i.get("files_url"))
                .and_then(|u| u.as_str())
                .map(str::to_string)
        });
        let page = pages::JobPage {
            worker: self.worker().to_string(),
            row: ops::status_row(&view.job),
            files_url: urls.files_url.clone().or(planned),
            image_url: urls.image_url.clone(),
            workitem: view
                .workitem
                .as_ref()
                .and_then(|w| serde_json::to_string_pretty(w).ok()),
            events: view.events,
            answer,
            log,
            job: view.job,
        };
        Reply::new(200, HTML, pages::job(&page).into_string())
    }

    /// `GET /metrics`, in the format the scraper's `Accept` header asks for; `server`: the
    /// web server's own families, served after the daemon's.
    pub fn metrics(&self, accept: Option<&str>, server: Vec<Family>) -> Reply {
        let format = Format::negotiate(accept);
        let writable = self.host.engine.store.failing().is_none();
        match self.metrics.families(SystemTime::now(), writable) {
            Some(mut families) => {
                for (_, c) in self.host.engine.conditions.now() {
                    families.extend(c.gauges.into_iter().map(|g| Family {
                        name: g.name,
                        help: g.help,
                        data: Data::Gauge(vec![(vec![], Number::Int(g.value))]),
                    }));
                }
                let drained = self.host.engine.drained().is_some();
                families.push(Family {
                    name: "build_image_drained",
                    help: "1 while this host is drained (build-image drain): it claims nothing",
                    data: Data::Gauge(vec![(vec![], Number::Int(i64::from(drained)))]),
                });
                if let Some(f) = self.host.engine.warm_figures() {
                    families.extend(warm_families(&f));
                }
                families.extend(server);
                Reply::new(200, format.content_type(), encode(&families, format))
            }
            None => Reply::new(503, TEXT, "the jobs are still being counted\n"),
        }
    }

    /// `GET /healthz`: 200 "ok" while the log takes writes, else 503 and why; 200 with a
    /// `degraded:` line for each part that is not working (a broker away or refusing: the spool
    /// is still served); 503 `drained: REASON` while the host is drained (a load balancer or
    /// monitor then leaves it out; the daemon is up and its builds go on).
    pub fn healthz(&self) -> Reply {
        if let (None, Some(why)) = (self.host.engine.store.failing(), self.host.engine.drained()) {
            return Reply::new(503, TEXT, format!("drained: {why}\n"));
        }
        match self.host.engine.store.failing() {
            None => {
                let degraded: String = self
                    .host
                    .engine
                    .conditions
                    .now()
                    .into_iter()
                    .filter(|(_, c)| !c.ok)
                    .map(|(name, c)| format!("degraded: {name}: {}\n", c.detail))
                    .collect();
                if degraded.is_empty() {
                    Reply::new(200, TEXT, "ok\n")
                } else {
                    Reply::new(200, TEXT, degraded)
                }
            }
            Some(why) => Reply::new(503, TEXT, format!("failing: {why}\n")),
        }
    }
}

/// The newest jobs with ids below `before` (all: None) in state `state` (any: None), at most
/// `limit`, looking at `PAGE_SCAN` job ids at most; and the `before` of the next page, if
/// there may be older jobs. Each job is read by its number (dense from 1; in a log of an
/// earlier version, the seq of its first event), so a page costs the same at any log size.
pub fn newest(
    journal: &Journal,
    state: Option<State>,
    before: Option<u64>,
    limit: usize,
) -> Result<(Vec<Job>, Option<u64>), JournalError> {
    let top = journal
        .last_job()
        .min(before.map_or(u64::MAX, |b| b.saturating_sub(1)));
    let mut out = Vec::new();
    let mut next = top; // every id above `next` (up to top) has been looked at
    let mut looked = 0;
    while next > 0 && out.len() < limit && looked < PAGE_SCAN {
        if let Some(job) = journal.projection(next)?
            && state.is_none_or(|s| job.state == s)
        {
            out.push(job);
        }
        next -= 1;
        looked += 1;
    }
    Ok((out, (next > 0).then_some(next + 1)))
}

/// The answer's fields a person looks for, from the workitem as the outbox has it. The job's
/// error (the cause of a failure, shown with the job's facts) is not repeated: where a field
/// holds it, the field says so instead.
fn answer_fields(workitem: Option<&serde_json::Value>, job: &Job) -> Vec<(String, String)> {
    let once = |v: String| -> String {
        match job.error.as_deref().map(str::trim) {
            Some(e) if !e.is_empty() && v.trim() == e => CAUSE_ABOVE.to_string(),
            Some(e) if !e.is_empty() && v.contains(e) => v.replace(e, CAUSE_ABOVE),
            _ => v,
        }
    };
    let mut out = Vec::new();
    let Some(w) = workitem else {
        return out;
    };
    let fields = w.get("fields").unwrap_or(w);
    let image = fields.get("image");
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    if job.result.is_some()
        && let Some(r) = fields.get("result")
    {
        out.push(("result".into(), text(r)));
    }
    for key in [
        "files_url",
        "image_url",
        "image_sha256",
        "provenance_url",
        "logfile_url",
        "error",
    ] {
        if let Some(v) = image.and_then(|i| i.get(key)) {
            out.push((format!("image.{key}"), once(text(v))));
        }
    }
    if let Some(v) = fields.get("__error__") {
        out.push(("__error__".into(), once(text(v))));
    }
    if let Some(last) = fields
        .get("msg")
        .and_then(|m| m.as_array())
        .and_then(|m| m.last())
    {
        out.push(("msg (last)".into(), once(text(last))));
    }
    out
}

/// What the answer's fields say in place of the job's error, shown once with its facts.
const CAUSE_ABOVE: &str = "[the cause, shown with the job's facts]";

/// The warm pool's families: `build_image_warm_guests{state}` and
/// `build_image_warm_takes_total{result}`.
fn warm_families(f: &crate::imaging::kvm::warm::Figures) -> Vec<Family> {
    let int = |n: usize| Number::Int(i64::try_from(n).unwrap_or(i64::MAX));
    let c = &f.counts;
    vec![
        Family {
            name: "build_image_warm_guests",
            help: "Warm KVM guests (vm_warm) by state: booting, ready (waiting for a build), taken (a build runs in it); cold: guests builds booted themselves because none was ready",
            data: Data::Gauge(
                [
                    ("booting", c.booting),
                    ("ready", c.ready),
                    ("taken", c.taken),
                    ("cold", c.cold),
                ]
                .into_iter()
                .map(|(s, n)| (vec![("state", s.to_string())], int(n)))
                .collect(),
            ),
        },
        Family {
            name: "build_image_warm_takes",
            help: "KVM builds since the start by how they got their guest: warm (a ready warm guest) or cold (none was ready: booted their own)",
            data: Data::Counter(vec![
                (vec![("result", "warm".to_string())], f.warm_takes),
                (vec![("result", "cold".to_string())], f.cold_takes),
            ]),
        },
    ]
}
