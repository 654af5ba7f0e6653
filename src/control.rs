//! The control socket: a running daemon holds sled's lock, so operator commands talk to it over
//! a Unix socket in its state dir (`control.sock`, mode 0600). One JSON request line in; JSON
//! lines out: `{"event": ...}` lines for event streams, then one `{"ok": true, "data": ...}` or
//! `{"ok": false, "error": "..."}` line.
//!
//! Invariant: the daemon answers with the same `ops` functions a command uses when it opens the
//! log itself, so the output is the same either way.

use crate::ops::{self, EventFilter};
use crate::stage::Stage;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status {
        state: Option<String>,
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
    },
}

/// The last line of an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// The daemon's side.
pub struct Server {
    path: PathBuf,
    /// The listening socket, kept to shut it down: that ends a blocked accept() even when the
    /// socket file is gone and nobody can connect to wake it.
    listener: UnixListener,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    stage: Arc<Stage>,
}

impl Server {
    pub fn start(stage: Arc<Stage>) -> std::io::Result<Server> {
        let path = socket_path(&stage.state_dir);
        // A socket file left by a dead daemon: we hold the log's lock, so it is not in use.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let accepting = listener.try_clone()?;
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let stage = Arc::clone(&stage);
            let conns = Arc::clone(&conns);
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || {
                    for conn in accepting.incoming() {
                        if stage.stopping() {
                            break;
                        }
                        let Ok(conn) = conn else {
                            // e.g. out of file descriptors: do not spin
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        };
                        let stage = Arc::clone(&stage);
                        let h = std::thread::spawn(move || serve(&stage, conn));
                        let mut all = conns.lock().unwrap_or_else(|p| p.into_inner());
                        all.retain(|h| !h.is_finished());
                        all.push(h);
                    }
                })?
        };
        Ok(Server {
            path,
            listener,
            accept: Some(accept),
            conns,
            stage,
        })
    }

    /// Stops accepting and waits for the connections (event followers end within 100 ms of
    /// the daemon stopping). Call after `Stage::set_stopping`.
    pub fn stop(mut self) {
        // Wake the accept loop so it sees the stop.
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.listener),
            nix::sys::socket::Shutdown::Both,
        );
        let _ = UnixStream::connect(&self.path);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let conns: Vec<_> = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for h in conns {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
        let _ = &self.stage;
    }
}

fn serve(stage: &Stage, conn: UnixStream) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut out = conn;
    let _ = out.set_write_timeout(Some(Duration::from_secs(30)));
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
        return;
    }
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => handle(stage, req, &mut out),
        Err(e) => Err(format!("bad request: {e}")),
    };
    let reply = match reply {
        Ok(data) => Reply {
            ok: true,
            data,
            error: None,
        },
        Err(error) => Reply {
            ok: false,
            data: None,
            error: Some(error),
        },
    };
    let _ = write_line(&mut out, &reply);
}

fn write_line<T: Serialize>(out: &mut impl Write, v: &T) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    out.write_all(&bytes)
}

fn to_value<T: Serialize>(v: T) -> Result<Option<Value>, String> {
    serde_json::to_value(v).map(Some).map_err(|e| e.to_string())
}

fn handle(stage: &Stage, req: Request, out: &mut UnixStream) -> Result<Option<Value>, String> {
    let s = |e: &dyn std::fmt::Display| e.to_string();
    match req {
        Request::Status { state, limit } => {
            let jobs = stage.all_jobs().map_err(|e| s(&e))?;
            to_value(ops::status(&jobs, state.as_deref(), limit))
        }
        Request::Show { id } => {
            to_value(ops::show(&stage.journal, &stage.cfg, &id).map_err(|e| s(&e))?)
        }
        Request::Events { filter, follow } => {
            let mut next = filter.since;
            loop {
                // Every event below the horizon is in the tree (seqs are published after insert).
                let horizon = stage.journal.next_seq();
                let f = EventFilter {
                    since: next,
                    ..filter.clone()
                };
                for ev in ops::events(&stage.journal, &f).map_err(|e| s(&e))? {
                    next = ev.seq + 1;
                    write_line(out, &serde_json::json!({ "event": ev })).map_err(|e| s(&e))?;
                }
                next = next.max(horizon);
                if !follow || stage.stopping() {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Request::Replay => to_value(ops::replay(&stage.journal, &stage.spool).map_err(|e| s(&e))?),
        Request::Retry { id } => {
            let job = ops::resolve(&stage.journal, &id).map_err(|e| s(&e))?;
            let building = stage.retry(job).map_err(|e| s(&e))?;
            to_value(serde_json::json!({"job": job, "queued": true, "building_now": building}))
        }
        Request::Cancel { id } => {
            let job = ops::resolve(&stage.journal, &id).map_err(|e| s(&e))?;
            let answered = stage.cancel(job).map_err(|e| s(&e))?;
            to_value(serde_json::json!({"job": job, "answered": answered}))
        }
        Request::Requeue { worker } => to_value(stage.requeue_worker(&worker).map_err(|e| s(&e))?),
    }
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

    /// Sends a request; `on_event` gets each streamed event; returns the final reply.
    pub fn call(
        mut self,
        req: &Request,
        mut on_event: impl FnMut(crate::journal::Event) -> bool,
    ) -> anyhow::Result<Reply> {
        write_line(self.reader.get_mut(), req)?;
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                anyhow::bail!("the daemon closed the connection without an answer");
            }
            let v: Value = serde_json::from_str(&line)?;
            if let Some(ev) = v.get("event") {
                let ev: crate::journal::Event = serde_json::from_value(ev.clone())?;
                if !on_event(ev) {
                    anyhow::bail!("stopped");
                }
                continue;
            }
            return Ok(serde_json::from_value(v)?);
        }
    }
}
