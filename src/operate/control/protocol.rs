//! The operator protocol: one JSON request line in ([`Request`]); JSON lines out, `{"event":
//! ...}` for streamed events, then one `{"done": <Response>}` ([`Response`]). The request and
//! the reply are types built in one place and read in one place ([`Client`] on the command's
//! side, `server` on the daemon's).

use crate::domain::{Event, State};
use crate::operate::ops::{EventFilter, JobView, ReplayReport, StatusRow};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

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
    /// `pin ID` (`pin: true`) or `unpin ID`.
    Pin {
        id: String,
        pin: bool,
    },
    /// `gc [--dry-run]`.
    Gc {
        dry_run: bool,
    },
    /// `drain [--reason TEXT]`: the host claims nothing more.
    Drain {
        reason: String,
    },
    /// `undrain`: the host takes work again.
    Undrain,
    /// `hosts`: the farm's hosts as the daemon sees them (with the records heard over AMQP).
    Hosts,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", content = "data", rename_all = "snake_case")]
pub enum Response {
    Status {
        rows: Vec<StatusRow>,
        /// Why the daemon cannot record anything now (its log or state disk), if so.
        failing: Option<String>,
        /// Answered jobs whose final status is still to be pushed, if any (why they wait).
        #[serde(default)]
        unpushed: Option<String>,
        /// Why builds wait for room under base_dir (`[artifacts] min_free_mb`), if they do.
        #[serde(default)]
        waiting: Option<String>,
        /// Parts of the daemon that are not working (`amqp: not connected to …: why`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        degraded: Vec<String>,
        /// The host is drained (`drain`): since when and why.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drained: Option<crate::domain::farm::Drain>,
    },
    Show(Box<JobView>),
    /// The end of an event stream (the events came before it).
    Events,
    Replay(ReplayReport),
    Retried {
        job: u64,
        building_now: bool,
        /// The job came over AMQP: its new answer is published to the reply queue again.
        #[serde(default)]
        over_amqp: bool,
    },
    Cancelled {
        job: u64,
        answered: bool,
    },
    Requeued {
        moved: Vec<String>,
    },
    /// None: no such job.
    Log(Option<Box<crate::operate::joblog::LogChunk>>),
    BackedUp(crate::operate::archive::BackupReport),
    Compacted(crate::operate::archive::CompactReport),
    Repushed(Vec<crate::operate::archive::Repushed>),
    Redelivered(crate::operate::archive::Redelivered),
    /// `pin`/`unpin`: the job, and whether it changed (false: it already was).
    Pinned {
        job: u64,
        pinned: bool,
        changed: bool,
    },
    /// `gc`: the images expired (or, with `dry_run`, that would be), in order.
    Gc {
        dry_run: bool,
        expired: Vec<crate::engine::retention::Planned>,
    },
    /// `drain`/`undrain`: the drain in force now (None: takes work), and whether the request
    /// changed it (false: it already was so).
    Drained {
        drained: Option<crate::domain::farm::Drain>,
        changed: bool,
    },
    /// `hosts`: the newest record of each host, as shown now.
    Hosts {
        hosts: Vec<crate::hosts::Shown>,
    },
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
pub(super) enum Line {
    Event(Event),
    Done(Response),
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

pub(super) fn write_line<T: Serialize>(out: &mut impl Write, v: &T) -> std::io::Result<()> {
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
