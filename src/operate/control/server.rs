//! The control socket: `state/<worker>/control.sock` (mode 0600), served by one thread per
//! connection, each request answered by [`super::handle`].
//!
//! Invariants: bounded (a request line of at most `MAX_REQUEST` bytes, sent within `IDLE`; at
//! most `MAX_CONNECTIONS` connections, more are answered `Busy`), and a stop never waits for a
//! client: every connection is cut off.

use super::handle;
use super::protocol::{Line, Request, Response, socket_path, write_line};
use crate::engine::store::lock;
use crate::operate::Host;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The longest request line taken.
pub const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client may take to send its request.
pub const IDLE: Duration = Duration::from_secs(10);
/// Connections served at once; more are answered "busy".
pub const MAX_CONNECTIONS: usize = 32;

/// The open connections: a handle to cut each off, and its thread.
type Conns = Arc<Mutex<Vec<(UnixStream, JoinHandle<()>)>>>;

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
    pub fn start(host: Arc<Host>) -> std::io::Result<Server> {
        let path = socket_path(host.engine.store.dir());
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
                        let host = Arc::clone(&host);
                        let h = std::thread::spawn(move || serve(&host, conn));
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

fn serve(host: &Host, conn: UnixStream) {
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
            Ok(req) => handle(host, req, |ev| {
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
