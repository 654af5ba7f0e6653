//! The server: binding, starting and stopping it on a thread of its own (a single-threaded
//! tokio runtime for hyper), the connections and their budgets ([`Budgets`]), and turning a
//! request into a response (the handlers' [`Reply`], the whole log as a file body, the live log
//! as server-sent events).
//!
//! Invariants:
//! - It changes nothing: only GET and HEAD are served (others: 405).
//! - Bounded, each kind of request by its own budget ([`super::budget`]): `/healthz` and
//!   `/metrics` are answered whatever the pages and streams hold; one request per connection;
//!   request heads of at most `MAX_HEAD` bytes read within `HEAD_TIMEOUT`, and at most
//!   `Budgets::waiting_cap` connections waiting for theirs (the one waiting longest makes room
//!   for a new one); a probe's connection cut after `PROBE_LIFETIME`, every other after
//!   `CONNECTION_LIFETIME`, a log stream ended after `STREAM_LIFETIME`.
//! - A log stream sends what the log holds as fast as its client reads it, and waits
//!   `STREAM_POLL` only when it has sent everything there was.
//! - Every answer carries the same security headers ([`secure`]), and the handlers and the log
//!   reads run on blocking threads, never on the one thread that serves the connections (the
//!   probes read memory only and are answered on it).

use super::app::{App, Reply, TEXT};
use super::budget::{Budgets, Kind};
use super::logview::{Step, is_live, shown, stream_step};
use super::pages;
use super::routes::{Route, param, query_params, route};
use crate::domain::Job;
use crate::engine::store::lock;
use crate::imaging::logread::{self, Bound, Chunk};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, StatusCode};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The longest request head (request line and headers) read; longer ones get 431.
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection is served (a log stream ends before; the browser reconnects).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// The longest a probe's connection is served (its answer is a few KiB).
pub const PROBE_LIFETIME: Duration = Duration::from_secs(10);
/// The longest one log stream runs before it ends (the browser reconnects where it was).
pub const STREAM_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// How long a log stream that sent everything the log held waits before it looks again.
pub const STREAM_POLL: Duration = Duration::from_millis(300);
/// A stream with nothing to send sends a comment this often (a client gone is noticed).
pub const STREAM_HEARTBEAT: Duration = Duration::from_secs(15);

type Body = BoxBody<Bytes, Infallible>;
type HttpResponse = hyper::Response<Body>;

/// The server: started by the daemon when `[http] listen` is set, stopped with it.
pub struct Server {
    /// Counting the log's jobs at a start (cancelled by a stop).
    _seeder: super::metrics::Seeder,
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

    /// Serves on `listener` on a thread of its own, within `budgets`. The address bound (port
    /// 0 picks one) is written to `<state_dir>/http.addr`.
    pub fn start(
        app: App,
        seeder: super::metrics::Seeder,
        listener: std::net::TcpListener,
        budgets: Budgets,
    ) -> std::io::Result<Server> {
        listener.set_nonblocking(true)?;
        let bound = listener.local_addr()?;
        let addr_file = app.host.engine.store.dir().join("http.addr");
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
            .max_blocking_threads(16)
            .thread_name("http")
            .build()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let app = Arc::new(app);
        let budgets = Arc::new(budgets);
        let thread = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                runtime.block_on(accept(listener, app, budgets, rx));
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
    budgets: Arc<Budgets>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("http: cannot serve: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // e.g. out of file descriptors: do not spin
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                tokio::spawn(serve(stream, Arc::clone(&app), Arc::clone(&budgets)));
            }
        }
    }
}

/// A budget is full: 503 at once, saying which.
fn refused(kind: Kind, budgets: &Budgets) -> HttpResponse {
    let what = match kind {
        Kind::Probe => "probes",
        Kind::Page => "pages",
        Kind::Stream => "live log streams",
    };
    let mut r = to_response(Reply::new(
        503,
        TEXT,
        format!(
            "too many clients: {} {what} are being served; try again in a moment\n",
            budgets.limit(kind)
        ),
    ));
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// One connection: waits for its request head (or its turn to make room for a newer one),
/// takes room in its request's budget and answers, within its lifetime.
async fn serve(stream: tokio::net::TcpStream, app: Arc<App>, budgets: Arc<Budgets>) {
    let (id, mut must_go) = budgets.arrive();
    // The room the request holds, until the connection ends.
    let held: Arc<Mutex<Option<tokio::sync::OwnedSemaphorePermit>>> = Arc::default();
    let (lifetime, mut deadline) =
        tokio::sync::watch::channel(Instant::now() + CONNECTION_LIFETIME);
    let lifetime = Arc::new(lifetime);
    let service = {
        let (budgets, held) = (Arc::clone(&budgets), Arc::clone(&held));
        hyper::service::service_fn(move |req| {
            let (app, budgets, held) = (Arc::clone(&app), Arc::clone(&budgets), Arc::clone(&held));
            let lifetime = Arc::clone(&lifetime);
            async move {
                budgets.headed(id);
                let kind = Kind::of(&route(req.uri().path()));
                let Some(room) = budgets.take(kind) else {
                    return Ok::<_, Infallible>(refused(kind, &budgets));
                };
                *lock(&held) = Some(room);
                if kind == Kind::Probe {
                    let _ = lifetime.send(Instant::now() + PROBE_LIFETIME);
                }
                Ok(respond(app, req, &budgets).await)
            }
        })
    };
    let io = hyper_util::rt::TokioIo::new(stream);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let (mut waiting, mut watching) = (true, true);
    loop {
        let until = *deadline.borrow_and_update();
        tokio::select! {
            _ = &mut conn => break,
            _ = tokio::time::sleep_until(until) => break,
            told = &mut must_go, if waiting => match told {
                // Closed (unanswered) to make room for a newer connection.
                Ok(()) => break,
                // It sent its head: it waits no more.
                Err(_) => waiting = false,
            },
            changed = deadline.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                }
            }
        }
    }
    budgets.headed(id);
    drop(held);
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

async fn respond(app: Arc<App>, req: hyper::Request<Incoming>, budgets: &Budgets) -> HttpResponse {
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
        Route::ApiHosts => blocking(app, move |a| a.api_hosts()).await,
        Route::Metrics => {
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            to_response(app.metrics(accept, budgets.families()))
        }
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

/// A chunk of the job log from stream position `from`, read on a blocking thread.
async fn read_chunk(path: PathBuf, bound: Bound, from: u64) -> std::io::Result<Option<Chunk>> {
    tokio::task::spawn_blocking(move || logread::read(&path, bound, from, logread::MAX_CHUNK))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// `GET /jobs/ID/log`: the whole build log, read from its start chunk after chunk (what the
/// bound cut out is the omitted line, where the file has it), until the reads reach its end.
async fn log_file(app: Arc<App>, id: String) -> HttpResponse {
    let (_, path) = match log_of(&app, id).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let bound = app.log_bound();
    let mut chunk = match read_chunk(path.clone(), bound, 0).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return to_response(Reply::new(
                404,
                TEXT,
                format!("cannot open {}: it does not exist\n", path.display()),
            ));
        }
        Err(e) => {
            return to_response(Reply::new(
                404,
                TEXT,
                format!("cannot read {}: {e}\n", path.display()),
            ));
        }
    };
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
    tokio::spawn(async move {
        let mut at_line_start = true;
        loop {
            let out = shown(&chunk, at_line_start);
            if let Some(last) = out.last() {
                at_line_start = *last == b'\n';
                if tx.send_data(Bytes::from(out)).await.is_err() {
                    return;
                }
            }
            let next = chunk.next();
            if next >= chunk.end || (chunk.data.is_empty() && chunk.skipped == 0) {
                return;
            }
            chunk = match read_chunk(path.clone(), bound, next).await {
                // a log replaced meanwhile ends the answer
                Ok(Some(c)) if !c.restarted => c,
                _ => return,
            };
        }
    });
    let mut resp = hyper::Response::new(body.boxed());
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT));
    secure(resp.headers_mut());
    resp
}

/// `GET /jobs/ID/log/stream`: the build log's output from stream position `from` on, as
/// server-sent events ([`stream_step`]), until the job is no longer building (`event: end`)
/// or `STREAM_LIFETIME` is over.
async fn log_stream(app: Arc<App>, id: String, from: u64) -> HttpResponse {
    let (job, path) = match log_of(&app, id).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let bound = app.log_bound();
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
    let job_id = job.id;
    tokio::spawn(async move {
        let started = Instant::now();
        let mut position = from;
        let mut idle = Duration::ZERO;
        // Tell the browser how soon to come back when the stream ends by time.
        if tx
            .send_data(Bytes::from_static(b"retry: 1000\n\n"))
            .await
            .is_err()
        {
            return;
        }
        loop {
            if started.elapsed() > STREAM_LIFETIME {
                return;
            }
            let (a, p) = (Arc::clone(&app), path.clone());
            let read = tokio::task::spawn_blocking(move || {
                // The state first: output written before the job left `building` is read
                // below, and sent before the end.
                let live = a
                    .host
                    .engine
                    .store
                    .job(job_id)
                    .is_some_and(|j| is_live(j.state));
                stream_step(&p, bound, position, live).map(|s| (s, live))
            })
            .await;
            // A read that failed sends nothing: the next look tries again.
            let (step, live) = match read {
                Ok(Ok(x)) => x,
                _ => (
                    Step {
                        events: String::new(),
                        next: position,
                        progressed: false,
                    },
                    true,
                ),
            };
            // As fast as the client reads: the channel holds a few events, no more.
            if !step.events.is_empty() && tx.send_data(Bytes::from(step.events)).await.is_err() {
                return;
            }
            if step.progressed {
                position = step.next;
                idle = Duration::ZERO;
                continue; // more may be there: read again at once
            }
            if !live {
                let _ = tx.send_data(Bytes::from(end_event(position))).await;
                return;
            }
            // Everything there was is sent: look again in a moment.
            tokio::time::sleep(STREAM_POLL).await;
            idle += STREAM_POLL;
            if idle >= STREAM_HEARTBEAT {
                idle = Duration::ZERO;
                if tx
                    .send_data(Bytes::from_static(b": idle\n\n"))
                    .await
                    .is_err()
                {
                    return;
                }
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

/// The event that says the build is over (the page reloads), at stream position `position`.
fn end_event(position: u64) -> String {
    format!("event: end\nid: {position}\ndata: over\n\n")
}
