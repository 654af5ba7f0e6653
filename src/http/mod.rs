//! The read-only HTTP server (`[http] listen`): the status page (`/`), a job's page
//! (`/jobs/ID`, its build log at `/jobs/ID/log`, streamed at `/jobs/ID/log/stream`), the API
//! (`/api/jobs`, `/api/jobs/ID`), `/metrics` and `/healthz`.
//!
//! Invariants:
//! - It changes nothing: only GET and HEAD are served (others: 405), and every answer is read
//!   from the store the daemon records into.
//! - The API answers with the functions the operator commands use (`control::handle` for
//!   `status`, `ops::show` for `show`), so `/api/jobs` is `status --json` and `/api/jobs/ID`
//!   is `show --json`.
//! - `/metrics` reads memory only ([`metrics::Metrics`], kept by the store's observer).
//! - Bounded: `max_connections` connections at once (more get 503 at once), one request per
//!   connection, request heads of at most `MAX_HEAD` bytes read within `HEAD_TIMEOUT`, every
//!   connection cut after `CONNECTION_LIFETIME`; ids are job numbers or image_ids of
//!   `[A-Za-z0-9._-]`, and no path is built from a request (the log's path comes from the job).
//!
//! It runs on one thread of its own (a single-threaded tokio runtime for hyper); the reads of
//! the log run on a few blocking threads beside it.

pub mod metrics;
pub mod pages;

use crate::control::{self, Request as CtlRequest, Response as CtlResponse};
use crate::journal::{Job, Journal, JournalError, State};
use crate::ops;
use crate::stage::Stage;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, StatusCode};
use metrics::Metrics;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The longest request head (request line and headers) read; longer ones get 431.
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection is served (a log stream ends before; the browser reconnects).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// The longest one log stream runs before it ends (the browser reconnects where it was).
pub const STREAM_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// How often a log stream looks for new output.
pub const STREAM_POLL: Duration = Duration::from_millis(300);
/// Jobs on one page of `/` unless `?limit=` says otherwise (at most `MAX_PAGE`).
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;
/// Job ids one page of `/` looks at, at most: with a rare state as filter, a page may end
/// early (its "older" link goes on from there), so a page costs the same at any log size.
pub const PAGE_SCAN: u64 = 100_000;
/// The end of a build log shown on a job's page.
pub const LOG_TAIL: u64 = 64 * 1024;

type Body = BoxBody<Bytes, Infallible>;
type HttpResponse = hyper::Response<Body>;

/// What a request asks for (a pure function of its path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Index,
    Job(String),
    JobLog(String),
    JobLogStream(String),
    ApiJobs,
    ApiJob(String),
    Metrics,
    Healthz,
    LiveJs,
    NotFound,
    /// A path with `.`/`..` segments, encoded slashes or an id of another syntax.
    BadPath(String),
}

/// Is `s` a job id as the project writes them: a job number, or an image_id made of
/// `[A-Za-z0-9._-]` (not starting with a dot), at most 200 bytes?
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The route of a (percent-encoded) path.
pub fn route(path: &str) -> Route {
    let mut segs = Vec::new();
    for raw in path.split('/').skip(1) {
        let Ok(seg) = percent_encoding::percent_decode_str(raw).decode_utf8() else {
            return Route::BadPath("a path segment is not UTF-8".into());
        };
        if seg == "." || seg == ".." || seg.contains(['/', '\\', '\0']) {
            return Route::BadPath(format!("{seg:?} is not allowed in a path"));
        }
        segs.push(seg.into_owned());
    }
    let id = |s: &String, r: fn(String) -> Route| {
        if s.is_empty() {
            Route::NotFound
        } else if valid_id(s) {
            r(s.clone())
        } else {
            Route::BadPath(format!(
                "{s:?} is not a job id (a job number, or an image_id of [A-Za-z0-9._-])"
            ))
        }
    };
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    match s.as_slice() {
        [""] => Route::Index,
        ["jobs", _] => id(&segs[1], Route::Job),
        ["jobs", _, "log"] => id(&segs[1], Route::JobLog),
        ["jobs", _, "log", "stream"] => id(&segs[1], Route::JobLogStream),
        ["api", "jobs"] => Route::ApiJobs,
        ["api", "jobs", _] => id(&segs[2], Route::ApiJob),
        ["metrics"] => Route::Metrics,
        ["healthz"] => Route::Healthz,
        ["live.js"] => Route::LiveJs,
        _ => Route::NotFound,
    }
}

/// The query string's parameters, decoded.
pub fn query_params(q: Option<&str>) -> Vec<(String, String)> {
    let dec = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (dec(k), dec(v)),
            None => (dec(p), String::new()),
        })
        .collect()
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

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
const TEXT: &str = "text/plain; charset=utf-8";

impl Reply {
    fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Reply {
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

    fn api_error(status: u16, message: &str) -> Reply {
        let body = serde_json::json!({ "error": message }).to_string() + "\n";
        Reply::new(status, JSON, body)
    }
}

/// What the handlers share: the daemon's stage and metrics.
pub struct App {
    pub stage: Arc<Stage>,
    pub metrics: Arc<Metrics>,
}

impl App {
    fn worker(&self) -> &str {
        &self.stage.spool.worker
    }

    fn page_error(&self, status: u16, message: &str) -> Reply {
        Reply::new(
            status,
            HTML,
            pages::error(self.worker(), status, message).into_string(),
        )
    }

    fn journal(&self) -> Result<Arc<Journal>, Reply> {
        self.stage
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
        match control::handle(&self.stage, CtlRequest::Status { state, limit }, |_| true) {
            CtlResponse::Status { rows, .. } => Reply::json(&rows),
            CtlResponse::Error { message } => Reply::api_error(500, &message),
            other => Reply::api_error(500, &format!("unexpected answer {other:?}")),
        }
    }

    /// `GET /api/jobs/ID`: `show ID --json`.
    pub fn api_job(&self, id: &str) -> Reply {
        let journal = match self.stage.store.journal() {
            Ok(j) => j,
            Err(e) => return Reply::api_error(503, &e.to_string()),
        };
        match ops::show(&journal, &self.stage.cfg, id) {
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
        let w = &self.stage.cfg.worker;
        let rows = jobs
            .iter()
            .map(|job| {
                let spec = crate::store::spec_of(&journal, job).ok().flatten();
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
            failing: self.stage.store.failing(),
        };
        Reply::new(200, HTML, pages::index(&page).into_string())
    }

    /// The job `id` names, and its build log's path (for an accepted job).
    fn job_and_log(&self, id: &str) -> Result<(Job, Option<PathBuf>), (u16, String)> {
        let journal = self
            .stage
            .store
            .journal()
            .map_err(|e| (503, e.to_string()))?;
        let n = ops::resolve(&journal, id).map_err(|e| match e {
            ops::OpsError::NotFound(_) => (404, e.to_string()),
            e => (500, e.to_string()),
        })?;
        let job = self
            .stage
            .store
            .job(n)
            .ok_or((404, format!("no job {n}")))?;
        let log = crate::store::spec_of(&journal, &job)
            .map_err(|e| (500, e.to_string()))?
            .map(|spec| crate::imaging::log_path(&self.stage.cfg.worker, &spec));
        Ok((job, log))
    }

    /// `GET /jobs/ID`: a job's page.
    pub fn job_page(&self, id: &str) -> Reply {
        let journal = match self.journal() {
            Ok(j) => j,
            Err(r) => return r,
        };
        let view = match ops::show(&journal, &self.stage.cfg, id) {
            Ok(v) => v,
            Err(e @ ops::OpsError::NotFound(_)) => return self.page_error(404, &e.to_string()),
            Err(e) => return self.page_error(500, &e.to_string()),
        };
        let live = is_live(view.job.state);
        let log = view
            .log_path
            .as_ref()
            .map(|p| read_tail(std::path::Path::new(p), LOG_TAIL, live));
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
            logfile_url: view.logfile_url.clone(),
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

    /// `GET /metrics`.
    pub fn metrics(&self) -> Reply {
        match self
            .metrics
            .render(SystemTime::now(), self.stage.store.failing().is_none())
        {
            Some(text) => Reply::new(200, metrics::CONTENT_TYPE, text),
            None => Reply::new(503, TEXT, "the jobs are still being counted\n"),
        }
    }

    /// `GET /healthz`: 200 "ok" while the log takes writes, else 503 and why.
    pub fn healthz(&self) -> Reply {
        match self.stage.store.failing() {
            None => Reply::new(200, TEXT, "ok\n"),
            Some(why) => Reply::new(503, TEXT, format!("failing: {why}\n")),
        }
    }
}

/// May the job's build log still grow (it is waiting for, or in, a build)?
pub fn is_live(s: State) -> bool {
    matches!(
        s,
        State::Claimed | State::Queued | State::Building | State::Interrupted
    )
}

fn parse_state(s: &str) -> Result<State, String> {
    State::parse(s).ok_or_else(|| {
        format!(
            "unknown state {s:?}: one of {}",
            State::ALL.map(|s| s.as_str()).join(", ")
        )
    })
}

/// The newest jobs with ids below `before` (all: None) in state `state` (any: None), at most
/// `limit`, looking at `PAGE_SCAN` job ids at most; and the `before` of the next page, if
/// there may be older jobs. Each job is read by its id (a job's id is the seq of its first
/// event), so a page costs the same at any log size.
pub fn newest(
    journal: &Journal,
    state: Option<State>,
    before: Option<u64>,
    limit: usize,
) -> Result<(Vec<Job>, Option<u64>), JournalError> {
    let top = journal
        .last_seq()
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

/// The answer's fields a person looks for, from the workitem as the outbox has it.
fn answer_fields(workitem: Option<&serde_json::Value>, job: &Job) -> Vec<(String, String)> {
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
    for key in ["files_url", "image_url", "logfile_url", "error"] {
        if let Some(v) = image.and_then(|i| i.get(key)) {
            out.push((format!("image.{key}"), text(v)));
        }
    }
    if let Some(v) = fields.get("__error__") {
        out.push(("__error__".into(), text(v)));
    }
    if let Some(last) = fields
        .get("msg")
        .and_then(|m| m.as_array())
        .and_then(|m| m.last())
    {
        out.push(("msg (last)".into(), text(last)));
    }
    out
}

/// The last `max` bytes of a log (from a line start when cut), as text.
pub fn read_tail(path: &std::path::Path, max: u64, live: bool) -> pages::LogTail {
    use std::io::{Read, Seek, SeekFrom};
    let missing = pages::LogTail {
        text: String::new(),
        skipped: 0,
        offset: 0,
        missing: true,
        live,
    };
    let Ok(mut f) = std::fs::File::open(path) else {
        return missing;
    };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return missing;
    };
    let start = len.saturating_sub(max);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.take(max).read_to_end(&mut buf).is_err() {
        return missing;
    }
    let mut skip = 0;
    if start > 0
        && let Some(nl) = buf.iter().position(|b| *b == b'\n')
    {
        skip = nl + 1;
    }
    pages::LogTail {
        text: String::from_utf8_lossy(&buf[skip..]).into_owned(),
        skipped: start + skip as u64,
        offset: start + buf.len() as u64,
        missing: false,
        live,
    }
}

/// The server: started by the daemon when `[http] listen` is set, stopped with it.
pub struct Server {
    /// Counting the log's jobs at a start (cancelled by a stop).
    _seeder: metrics::Seeder,
    addr: SocketAddr,
    addr_file: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` (done first at a start, so that a taken port stops the daemon before it
    /// has started anything).
    pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
        std::net::TcpListener::bind(addr)
    }

    /// Serves on `listener` on a thread of its own. The address bound (port 0 picks one) is
    /// written to `<state_dir>/http.addr`.
    pub fn start(
        app: App,
        seeder: metrics::Seeder,
        listener: std::net::TcpListener,
        max_connections: usize,
    ) -> std::io::Result<Server> {
        listener.set_nonblocking(true)?;
        let bound = listener.local_addr()?;
        let addr_file = app.stage.store.dir().join("http.addr");
        crate::durable::write_atomic(&addr_file, format!("{bound}\n").as_bytes(), 0o644)
            .map_err(std::io::Error::other)?;
        if !bound.ip().is_loopback() {
            log::warn!(
                "http: listening on {bound}, beyond this host: the pages and the API have no authentication"
            );
        } else {
            log::info!("http: listening on http://{bound}/");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(8)
            .thread_name("http")
            .build()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let app = Arc::new(app);
        let thread = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                runtime.block_on(accept(listener, app, max_connections, rx));
                // Open connections (a log stream) are dropped, not waited for.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(Server {
            _seeder: seeder,
            addr: bound,
            addr_file,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and cuts every connection.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.addr_file);
    }
}

async fn accept(
    listener: std::net::TcpListener,
    app: Arc<App>,
    max_connections: usize,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("http: cannot serve: {e}");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // e.g. out of file descriptors: do not spin
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                match Arc::clone(&slots).try_acquire_owned() {
                    Ok(slot) => {
                        tokio::spawn(serve(stream, Arc::clone(&app), slot));
                    }
                    Err(_) => {
                        tokio::spawn(busy(stream));
                    }
                }
            }
        }
    }
}

/// Over the connection limit: 503 at once, without reading the request.
async fn busy(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let answer = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\nContent-Length: 17\r\nConnection: close\r\n\r\ntoo many clients\n";
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer)).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
}

async fn serve(
    stream: tokio::net::TcpStream,
    app: Arc<App>,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let io = hyper_util::rt::TokioIo::new(stream);
    let service = hyper::service::service_fn(move |req| {
        let app = Arc::clone(&app);
        async move { Ok::<_, Infallible>(respond(app, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .serve_connection(io, service);
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

fn to_response(r: Reply) -> HttpResponse {
    let mut resp = hyper::Response::new(full(r.body));
    *resp.status_mut() =
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(r.content_type),
    );
    secure(h);
    resp
}

/// Headers every answer carries: nothing is framed, sniffed or loaded from elsewhere.
fn secure(h: &mut hyper::HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// Runs a handler that reads the log on a blocking thread.
async fn blocking(app: Arc<App>, f: impl FnOnce(&App) -> Reply + Send + 'static) -> HttpResponse {
    match tokio::task::spawn_blocking(move || f(&app)).await {
        Ok(r) => to_response(r),
        Err(e) => to_response(Reply::new(500, TEXT, format!("internal error: {e}\n"))),
    }
}

async fn respond(app: Arc<App>, req: hyper::Request<Incoming>) -> HttpResponse {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = to_response(Reply::new(
            405,
            TEXT,
            "read-only: only GET and HEAD are served\n",
        ));
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let params = query_params(req.uri().query());
    match route(req.uri().path()) {
        Route::Index => blocking(app, move |a| a.index(&params)).await,
        Route::Job(id) => blocking(app, move |a| a.job_page(&id)).await,
        Route::ApiJobs => blocking(app, move |a| a.api_jobs(&params)).await,
        Route::ApiJob(id) => blocking(app, move |a| a.api_job(&id)).await,
        Route::Metrics => to_response(app.metrics()),
        Route::Healthz => to_response(app.healthz()),
        Route::LiveJs => {
            let mut r = to_response(Reply::new(
                200,
                "text/javascript; charset=utf-8",
                pages::LIVE_JS,
            ));
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("max-age=300"),
            );
            r
        }
        Route::JobLog(id) => log_file(app, id).await,
        Route::JobLogStream(id) => {
            let from = req
                .headers()
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .or(param(&params, "from"))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            log_stream(app, id, from).await
        }
        Route::NotFound => {
            let path = req.uri().path().to_string();
            blocking(app, move |a| {
                if path.starts_with("/api/") {
                    Reply::api_error(404, "no such resource")
                } else {
                    a.page_error(404, "There is no such page.")
                }
            })
            .await
        }
        Route::BadPath(why) => to_response(Reply::new(400, TEXT, format!("bad request: {why}\n"))),
    }
}

/// The job's log path, or an error reply.
async fn log_of(app: &Arc<App>, id: String) -> Result<(Job, PathBuf), HttpResponse> {
    let a = Arc::clone(app);
    let found = tokio::task::spawn_blocking(move || a.job_and_log(&id))
        .await
        .unwrap_or_else(|e| Err((500, e.to_string())));
    match found {
        Ok((job, Some(path))) => Ok((job, path)),
        Ok((job, None)) => Err(to_response(Reply::new(
            404,
            TEXT,
            format!(
                "job {} has no build log (it was never accepted for building)\n",
                job.id
            ),
        ))),
        Err((status, message)) => Err(to_response(Reply::new(status, TEXT, message + "\n"))),
    }
}

/// `GET /jobs/ID/log`: the whole build log, streamed from the file.
async fn log_file(app: Arc<App>, id: String) -> HttpResponse {
    let (_, path) = match log_of(&app, id).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            return to_response(Reply::new(
                404,
                TEXT,
                format!("cannot open {}: {e}\n", path.display()),
            ));
        }
    };
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match file.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send_data(Bytes::copy_from_slice(&buf[..n]))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    let mut resp = hyper::Response::new(body.boxed());
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT));
    secure(resp.headers_mut());
    resp
}

/// One server-sent event carrying log text: a `data:` line per line of text, its `id` the
/// offset in the log after it.
pub fn sse_chunk(text: &str, offset: u64) -> String {
    let mut out = format!("id: {offset}\n");
    for line in text.split('\n') {
        out.push_str("data: ");
        out.push_str(line.trim_end_matches('\r'));
        out.push('\n');
    }
    out.push('\n');
    out
}

/// `GET /jobs/ID/log/stream`: the build log's output from byte `from` on, as server-sent
/// events, until the job is no longer building (`event: end`) or `STREAM_LIFETIME` is over.
async fn log_stream(app: Arc<App>, id: String, from: u64) -> HttpResponse {
    let (job, path) = match log_of(&app, id).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
    let job_id = job.id;
    tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let mut offset = from;
        let mut tick = tokio::time::interval(STREAM_POLL);
        // Tell the browser how soon to come back when the stream ends by time.
        if tx
            .send_data(Bytes::from_static(b"retry: 1000\n\n"))
            .await
            .is_err()
        {
            return;
        }
        loop {
            tick.tick().await;
            // The state first: output written before the job left `building` is sent below.
            let live = app
                .stage
                .store
                .job(job_id)
                .is_some_and(|j| is_live(j.state));
            let p = path.clone();
            let read = tokio::task::spawn_blocking(move || read_from(&p, offset)).await;
            let (chunk, new_offset, reset) = match read {
                Ok(Ok(x)) => x,
                _ => (String::new(), offset, false),
            };
            if reset
                && tx
                    .send_data(Bytes::from_static(b"event: reset\nid: 0\ndata: \n\n"))
                    .await
                    .is_err()
            {
                return;
            }
            if new_offset != offset || reset {
                offset = new_offset;
                if !chunk.is_empty()
                    && tx
                        .send_data(Bytes::from(sse_chunk(&chunk, offset)))
                        .await
                        .is_err()
                {
                    return;
                }
                continue; // more may be waiting: read again before looking at the state
            }
            if !live {
                let _ = tx
                    .send_data(Bytes::from(format!(
                        "event: end\nid: {offset}\ndata: over\n\n"
                    )))
                    .await;
                return;
            }
            if started.elapsed() > STREAM_LIFETIME {
                return;
            }
        }
    });
    let mut resp = hyper::Response::new(body.boxed());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    secure(h);
    resp
}

/// New log text from `offset`: at most 64 KiB, cut after its last whole line (unless no line
/// ends in it). Returns the text, the new offset, and whether the log was cut back below
/// `offset` (the job log's bound rewrites it): then the text is its tail from the start.
fn read_from(path: &std::path::Path, offset: u64) -> std::io::Result<(String, u64, bool)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), 0, false)),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let (start, reset) = if len < offset {
        (len.saturating_sub(LOG_TAIL), true)
    } else {
        (offset, false)
    };
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(64 * 1024).read_to_end(&mut buf)?;
    if let Some(nl) = buf.iter().rposition(|b| *b == b'\n') {
        buf.truncate(nl + 1);
    } else if buf.len() < 64 * 1024 {
        buf.clear(); // half a line: wait for its end
    }
    let end = start + buf.len() as u64;
    if buf.last() == Some(&b'\n') {
        buf.pop();
    }
    Ok((String::from_utf8_lossy(&buf).into_owned(), end, reset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/"), Route::Index);
        assert_eq!(route("/jobs/17"), Route::Job("17".into()));
        assert_eq!(
            route("/jobs/nightly-4.2_x"),
            Route::Job("nightly-4.2_x".into())
        );
        assert_eq!(route("/jobs/17/log"), Route::JobLog("17".into()));
        assert_eq!(
            route("/jobs/17/log/stream"),
            Route::JobLogStream("17".into())
        );
        assert_eq!(route("/api/jobs"), Route::ApiJobs);
        assert_eq!(route("/api/jobs/a-1"), Route::ApiJob("a-1".into()));
        assert_eq!(route("/metrics"), Route::Metrics);
        assert_eq!(route("/healthz"), Route::Healthz);
        assert_eq!(route("/jobs/"), Route::NotFound);
        assert_eq!(route("/nope"), Route::NotFound);
        assert_eq!(route("/api/jobs/"), Route::NotFound);
        for bad in [
            "/jobs/..",
            "/jobs/%2e%2e",
            "/jobs/..%2Fetc%2Fpasswd",
            "/jobs/a%2Fb",
            "/jobs/.hidden",
            "/jobs/a%00b",
            "/jobs/a%5cb",
            "/api/jobs/%3Cscript%3E",
            "/jobs/../../etc/passwd",
            "/api/jobs/%ff",
        ] {
            assert!(
                matches!(route(bad), Route::BadPath(_)),
                "{bad}: {:?}",
                route(bad)
            );
        }
        assert!(valid_id(&"a".repeat(200)) && !valid_id(&"a".repeat(201)));
    }

    #[test]
    fn query_strings() {
        let p = query_params(Some("state=done&limit=5&x&name=a+b%21"));
        assert_eq!(param(&p, "state"), Some("done"));
        assert_eq!(param(&p, "limit"), Some("5"));
        assert_eq!(param(&p, "x"), Some(""));
        assert_eq!(param(&p, "name"), Some("a b!"));
        assert_eq!(param(&p, "y"), None);
        assert!(query_params(None).is_empty());
    }

    #[test]
    fn sse_chunks_split_lines() {
        assert_eq!(sse_chunk("a\r\nb", 9), "id: 9\ndata: a\ndata: b\n\n");
        assert_eq!(sse_chunk("", 1), "id: 1\ndata: \n\n");
    }

    #[test]
    fn reading_a_growing_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log");
        assert_eq!(read_from(&p, 0).unwrap(), (String::new(), 0, false));
        std::fs::write(&p, "one\ntwo\nthr").unwrap();
        assert_eq!(read_from(&p, 0).unwrap(), ("one\ntwo".into(), 8, false));
        assert_eq!(
            read_from(&p, 8).unwrap(),
            (String::new(), 8, false),
            "half a line waits"
        );
        std::fs::write(&p, "x\n").unwrap();
        assert_eq!(
            read_from(&p, 8).unwrap(),
            ("x".into(), 2, true),
            "cut back: from the start"
        );
        let t = read_tail(&p, 64, true);
        assert_eq!(
            (t.text.as_str(), t.offset, t.skipped, t.missing),
            ("x\n", 2, 0, false)
        );
        std::fs::write(&p, "aaaa\nbbbb\ncccc\n").unwrap();
        let t = read_tail(&p, 7, false);
        assert_eq!((t.text.as_str(), t.skipped, t.offset), ("cccc\n", 10, 15));
        assert!(read_tail(&dir.path().join("none"), 7, true).missing);
    }
}
