//! The control socket and the operator protocol. A running daemon holds sled's lock, so
//! operator commands talk to it over a Unix socket in its state dir (`control.sock`, mode
//! 0600): one JSON request line in; JSON lines out: `{"event": ...}` lines for event streams,
//! then one `{"done": <Response>}` line.
//!
//! Invariants: a request is answered by `handle`, the one function that the daemon runs for a
//! socket request and a command runs on a stage opened over the log when no daemon runs, so
//! the answer is the same either way; the socket is bounded (request size, idle time, number of
//! connections) and a stop never waits for a client.

use crate::journal::{Event, State, Tag};
use crate::ops::{self, EventFilter, JobView, ReplayReport, StatusRow};
use crate::stage::Stage;
use crate::store::lock;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The longest request line taken.
pub const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client may take to send its request.
pub const IDLE: Duration = Duration::from_secs(10);
/// Events read from the log at a time for an event stream (an export of a long log is never
/// held whole).
const EVENTS_PAGE: usize = 4096;
/// Connections served at once; more are answered "busy".
pub const MAX_CONNECTIONS: usize = 32;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status {
        state: Option<State>,
        limit: Option<usize>,
    },
    Show {
        id: String,
    },
    Events {
        filter: EventFilter,
        follow: bool,
    },
    Replay,
    Retry {
        id: String,
    },
    Cancel {
        id: String,
    },
    Requeue {
        worker: String,
        #[serde(default)]
        force: bool,
    },
    /// A job's build log from a stream position (`log ID [--follow]`), at most
    /// `imaging::logread::MAX_CHUNK` bytes per answer; `job` (once known) pins the job.
    Log {
        id: String,
        #[serde(default)]
        job: Option<u64>,
        #[serde(default)]
        from: u64,
    },
    /// `backup DIR` (an absolute path, written by the daemon).
    Backup {
        dir: PathBuf,
    },
    /// `compact`: `before` in RFC 3339, `archive` an absolute path.
    Compact {
        before: String,
        archive: PathBuf,
    },
    /// `repush`: the window in RFC 3339.
    Repush {
        since: String,
        until: String,
    },
    Redeliver {
        id: String,
    },
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", content = "data", rename_all = "snake_case")]
pub enum Response {
    Status {
        rows: Vec<StatusRow>,
        /// Why the daemon cannot record anything now (its log or state disk), if so.
        failing: Option<String>,
    },
    Show(Box<JobView>),
    /// The end of an event stream (the events came before it).
    Events,
    Replay(ReplayReport),
    Retried {
        job: u64,
        building_now: bool,
    },
    Cancelled {
        job: u64,
        answered: bool,
    },
    Requeued {
        moved: Vec<String>,
    },
    /// None: no such job.
    Log(Option<Box<crate::joblog::LogChunk>>),
    BackedUp(crate::archive::BackupReport),
    Compacted(crate::archive::CompactReport),
    Repushed(Vec<crate::archive::Repushed>),
    Redelivered(crate::archive::Redelivered),
    /// The request was refused or failed; the command exits 1 with this message.
    Error {
        message: String,
    },
    /// The daemon has too many connections; try again.
    Busy,
}

/// One line the daemon writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Event(Event),
    Done(Response),
}

/// The open connections: a handle to cut each off, and its thread.
type Conns = Arc<Mutex<Vec<(UnixStream, JoinHandle<()>)>>>;

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// Answers a request on `stage` (the daemon's, or one opened over the log). Streamed events go
/// to `on_event`, which returns false to stop the stream.
pub fn handle(stage: &Stage, req: Request, mut on_event: impl FnMut(&Event) -> bool) -> Response {
    let err = |e: &dyn std::fmt::Display| Response::Error {
        message: e.to_string(),
    };
    let journal = match stage.store.journal() {
        Ok(j) => j,
        Err(e) => {
            // The log is closed while it is reopened after a write error (and stays so while
            // the disk is full): `status` still answers, from the open jobs kept in memory,
            // with why nothing is claimed.
            if let Request::Status { state, limit } = &req
                && let Some(why) = stage.store.failing()
            {
                return Response::Status {
                    rows: ops::status(&stage.store.open_jobs(), *state, *limit),
                    failing: Some(why),
                };
            }
            return err(&e);
        }
    };
    match req {
        Request::Status { state, limit } => {
            let jobs = match (state, limit) {
                // the newest N of every state: only their part of the log is folded
                (None, Some(n)) => journal.newest_projections(n),
                _ => journal.projections(),
            };
            match jobs {
                Ok(jobs) => Response::Status {
                    rows: ops::status(&jobs, state, limit),
                    failing: stage.store.failing(),
                },
                Err(e) => err(&e),
            }
        }
        Request::Show { id } => match ops::show(&journal, &stage.cfg, &id) {
            Ok(v) => Response::Show(Box::new(v)),
            Err(e) => err(&e),
        },
        Request::Events { filter, follow } => {
            drop(journal);
            let mut next = filter.since;
            let mut full;
            loop {
                let journal = match stage.store.journal() {
                    Ok(j) => j,
                    Err(e) => return err(&e),
                };
                // Every event below the horizon is in the tree (seqs are published after insert).
                let horizon = journal.next_seq();
                let f = EventFilter {
                    since: next,
                    ..filter.clone()
                };
                match ops::events_page(&journal, &f, EVENTS_PAGE) {
                    Ok(evs) => {
                        // A page cut short by its inputs' size is followed by the next one.
                        full = !evs.is_empty();
                        for ev in &evs {
                            next = ev.seq + 1;
                            if !on_event(ev) {
                                return Response::Events;
                            }
                        }
                    }
                    Err(e) => return err(&e),
                }
                drop(journal);
                if next < horizon && full {
                    continue; // a long log: the next page
                }
                next = next.max(horizon);
                if !follow || stage.stopping() {
                    return Response::Events;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Request::Replay => match ops::replay(&journal, &stage.spool, stage.store.policy()) {
            Ok(r) => Response::Replay(r),
            Err(e) => err(&e),
        },
        Request::Retry { id } => {
            let result = ops::resolve(&journal, &id)
                .map_err(|e| e.to_string())
                .and_then(|job| {
                    drop(journal);
                    stage
                        .retry(job)
                        .map(|building_now| Response::Retried { job, building_now })
                        .map_err(|e| e.to_string())
                });
            result.unwrap_or_else(|message| Response::Error { message })
        }
        Request::Cancel { id } => {
            let result = ops::resolve(&journal, &id)
                .map_err(|e| e.to_string())
                .and_then(|job| {
                    drop(journal);
                    stage
                        .cancel(job)
                        .map(|answered| Response::Cancelled { job, answered })
                        .map_err(|e| e.to_string())
                });
            result.unwrap_or_else(|message| Response::Error { message })
        }
        Request::Log { id, job, from } => {
            match crate::joblog::read(&journal, &stage.cfg, &id, job, from) {
                Ok(c) => Response::Log(c.map(Box::new)),
                Err(e) => err(&e),
            }
        }
        Request::Requeue { worker, force } => {
            drop(journal);
            match stage.requeue_worker(&worker, force) {
                Ok(moved) => Response::Requeued { moved },
                Err(e) => err(&e),
            }
        }
        Request::Backup { dir } => {
            match crate::archive::backup(&journal, &dir, &|| stage.stopping()) {
                Ok(r) => Response::BackedUp(r),
                Err(e) => err(&e),
            }
        }
        Request::Compact { before, archive } => {
            drop(journal);
            let r = humantime::parse_rfc3339_weak(&before)
                .map_err(|e| crate::archive::ArchiveError::Refused(format!("{before}: {e}")))
                .and_then(|t| crate::archive::compact(stage, t, &archive));
            match r {
                Ok(r) => Response::Compacted(r),
                Err(e) => err(&e),
            }
        }
        Request::Repush { since, until } => {
            drop(journal);
            let t = |s: &str| {
                humantime::parse_rfc3339_weak(s)
                    .map_err(|e| crate::archive::ArchiveError::Refused(format!("{s}: {e}")))
            };
            let r = t(&since)
                .and_then(|a| Ok((a, t(&until)?)))
                .and_then(|(a, b)| crate::archive::repush(stage, a, b));
            match r {
                Ok(r) => Response::Repushed(r),
                Err(e) => err(&e),
            }
        }
        Request::Redeliver { id } => {
            drop(journal);
            match crate::archive::redeliver(stage, &id) {
                Ok(r) => Response::Redelivered(r),
                Err(e) => err(&e),
            }
        }
    }
}

/// The event kinds and states a request may name, for error messages.
pub fn kinds() -> String {
    Tag::ALL.map(|t| t.as_str()).join(", ")
}

/// The daemon's side.
pub struct Server {
    path: PathBuf,
    /// The listening socket, kept to shut it down: that ends a blocked accept() even when the
    /// socket file is gone and nobody can connect to wake it.
    listener: UnixListener,
    accept: Option<JoinHandle<()>>,
    conns: Conns,
    closing: Arc<std::sync::atomic::AtomicBool>,
}

impl Server {
    pub fn start(stage: Arc<Stage>) -> std::io::Result<Server> {
        let path = socket_path(stage.store.dir());
        // A socket file left by a dead daemon: we hold the log's lock, so it is not in use.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let accepting = listener.try_clone()?;
        let conns: Conns = Arc::default();
        let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let accept = {
            let conns = Arc::clone(&conns);
            let closing = Arc::clone(&closing);
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || {
                    for conn in accepting.incoming() {
                        if closing.load(std::sync::atomic::Ordering::SeqCst) {
                            break;
                        }
                        let Ok(conn) = conn else {
                            // e.g. out of file descriptors: do not spin
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        };
                        let mut all = lock(&conns);
                        all.retain(|(_, h)| !h.is_finished());
                        if all.len() >= MAX_CONNECTIONS {
                            drop(all);
                            let mut c = conn;
                            let _ = c.set_write_timeout(Some(Duration::from_secs(1)));
                            let _ = write_line(&mut c, &Line::Done(Response::Busy));
                            continue;
                        }
                        let Ok(handle) = conn.try_clone() else {
                            continue;
                        };
                        let stage = Arc::clone(&stage);
                        let h = std::thread::spawn(move || serve(&stage, conn));
                        all.push((handle, h));
                    }
                })?
        };
        Ok(Server {
            path,
            listener,
            accept: Some(accept),
            conns,
            closing,
        })
    }

    /// Stops accepting and ends every connection (an idle or slow client is cut off; event
    /// followers see the end of the stream).
    pub fn stop(mut self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.listener),
            nix::sys::socket::Shutdown::Both,
        );
        let _ = UnixStream::connect(&self.path);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let conns: Vec<_> = lock(&self.conns).drain(..).collect();
        for (stream, _) in &conns {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        for (_, h) in conns {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stage: &Stage, conn: UnixStream) {
    let _ = conn.set_read_timeout(Some(IDLE));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(30)));
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half.take(MAX_REQUEST + 1));
    let mut line = String::new();
    let mut out = conn;
    let response = match reader.read_line(&mut line) {
        Ok(n) if n as u64 > MAX_REQUEST => Response::Error {
            message: format!("request longer than {MAX_REQUEST} bytes"),
        },
        Ok(_) if line.trim().is_empty() => return,
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(stage, req, |ev| {
                write_line(&mut out, &Line::Event(ev.clone())).is_ok()
            }),
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        },
        Err(_) => return, // idle past IDLE, or cut off by a stop
    };
    let _ = write_line(&mut out, &Line::Done(response));
}

fn write_line<T: Serialize>(out: &mut impl Write, v: &T) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    out.write_all(&bytes)
}

/// The command's side: a connection to a running daemon.
pub struct Client {
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the daemon of `state_dir`; None when none is listening.
    pub fn connect(state_dir: &Path) -> Option<Client> {
        let stream = UnixStream::connect(socket_path(state_dir)).ok()?;
        Some(Client {
            reader: BufReader::new(stream),
        })
    }

    /// Sends a request; `on_event` gets each streamed event (false stops); returns the final
    /// response.
    pub fn call(
        mut self,
        req: &Request,
        mut on_event: impl FnMut(&Event) -> bool,
    ) -> anyhow::Result<Response> {
        write_line(self.reader.get_mut(), req)?;
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                anyhow::bail!("the daemon closed the connection without an answer");
            }
            match serde_json::from_str::<Line>(&line)? {
                Line::Event(ev) => {
                    if !on_event(&ev) {
                        anyhow::bail!("stopped");
                    }
                }
                Line::Done(r) => return Ok(r),
            }
        }
    }
}
