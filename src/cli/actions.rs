//! `retry`, `cancel`, `requeue`, `drain`, `undrain`: operator actions, each recorded as an event. A
//! `cancel ID` of a job no job of this host holds reaches its holder through a control drop in a
//! shared spool.

use super::access::{call, expect};
use crate::config::Config;
use crate::domain::text::escape;
use crate::edges::spool::Spool;
use crate::edges::spool::hosts::{answer_path, read_answer};
use crate::operate::control::{Request, Response};
use std::time::{Duration, Instant};

fn unexpected(r: &Response) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer from the daemon: {r:?}")
}

/// `drain [--reason TEXT]` (`reason` Some) or `undrain` (None).
pub fn drain(cfg: &Config, reason: Option<&str>) -> anyhow::Result<i32> {
    let req = match reason {
        Some(r) => Request::Drain {
            reason: r.to_string(),
        },
        None => Request::Undrain,
    };
    let r = expect(call(cfg, req, |_| true)?)?;
    let Response::Drained { drained, changed } = r else {
        return Err(unexpected(&r));
    };
    match (drained, changed) {
        (Some(d), true) => println!(
            "drained: {}; this host claims nothing more, its running builds finish",
            escape(&d.reason)
        ),
        (Some(d), false) => println!(
            "already drained since {}: {}",
            escape(&d.since),
            escape(&d.reason)
        ),
        (None, true) => println!("undrained: this host takes work again"),
        (None, false) => println!("not drained: this host takes work"),
    }
    Ok(0)
}

pub fn retry(cfg: &Config, id: &str) -> anyhow::Result<i32> {
    let r = expect(call(cfg, Request::Retry { id: id.to_string() }, |_| true)?)?;
    let Response::Retried {
        job,
        building_now,
        over_amqp,
    } = r
    else {
        return Err(unexpected(&r));
    };
    if over_amqp {
        eprintln!(
            "build-image: note: job {job} came over AMQP: its new answer is published to the reply queue again with the same fei; Ruote ignores a second reply for an expression already replied to (docs/amqp.md)"
        );
    }
    if building_now {
        println!("job {job} ({}) queued again", escape(id));
    } else {
        println!(
            "job {job} ({}) queued again; it is built when the daemon starts",
            escape(id)
        );
    }
    Ok(0)
}

pub fn cancel(cfg: &Config, id: &str) -> anyhow::Result<i32> {
    let r = match call(cfg, Request::Cancel { id: id.to_string() }, |_| true).and_then(expect) {
        Ok(r) => r,
        // Not this host's: on a shared spool the holder is asked through a control drop.
        Err(e) if e.to_string() == crate::operate::ops::not_found(id) && !id.starts_with('#') => {
            return cancel_elsewhere(cfg, id, e);
        }
        Err(e) => return Err(e),
    };
    let Response::Cancelled { job, answered } = r else {
        return Err(unexpected(&r));
    };
    if answered {
        println!("job {job} ({}) cancelled and answered", escape(id));
    } else {
        println!(
            "job {job} ({}) is being cancelled: its build is killed and it is answered",
            escape(id)
        );
    }
    Ok(0)
}

/// How long `cancel ID` waits for the host holding ID to take its control drop.
pub const DROP_WAIT: Duration = Duration::from_secs(8);

/// `cancel ID` for an image_id no job of this host holds: a control drop in the spool is taken
/// by the daemon that holds it (a shared spool), which cancels the job; without a taker the
/// command says so, naming the host that holds the job folder (`.owner` on a shared base_dir)
/// or lists it in its record, if any.
fn cancel_elsewhere(cfg: &Config, id: &str, not_here: anyhow::Error) -> anyhow::Result<i32> {
    let spool = Spool::new(&cfg.spool.dir, &cfg.worker_id());
    let holder = holder_hint(cfg, id);
    // Only a live daemon of another worker sharing this spool can take a drop.
    let me = cfg.worker_id();
    let now = std::time::SystemTime::now();
    let others = spool
        .host_records()
        .unwrap_or_default()
        .into_iter()
        .any(|r| r.worker != me && r.state != crate::hosts::HostState::Stopped && !r.is_gone(now));
    if others && spool.control.is_dir() {
        let drop = spool.drop_cancel(id)?;
        let deadline = Instant::now() + DROP_WAIT;
        let answer = loop {
            if let Some(a) = read_answer(&drop) {
                break Some(a);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = std::fs::remove_file(answer_path(&drop));
        match answer {
            Some(a) => {
                let id = escape(id);
                let worker = escape(&a.worker);
                if let Some(why) = a.refused {
                    anyhow::bail!("job {} ({id}) on worker {worker}: {}", a.job, escape(&why));
                }
                if a.answered {
                    println!(
                        "job {} ({id}) on worker {worker} cancelled and answered",
                        a.job
                    );
                } else {
                    println!(
                        "job {} ({id}) on worker {worker} is being cancelled: its build is killed and it is answered",
                        a.job
                    );
                }
                return Ok(0);
            }
            None => {
                // Taken meanwhile? (its answer comes at once after the take)
                if drop.exists() {
                    let _ = std::fs::remove_file(&drop);
                }
            }
        }
    }
    let hint = match holder {
        Some(h) => format!(
            "; it is held by {h}: run `build-image cancel {}` there (build-image hosts)",
            escape(id)
        ),
        None if others => format!(
            "; no host of the spool took the cancel within {} s: nobody holds it",
            DROP_WAIT.as_secs()
        ),
        None => {
            "; no other live host shares this spool (build-image hosts): nobody holds it".into()
        }
    };
    Err(anyhow::anyhow!("{not_here}{hint}"))
}

/// Which other host holds image_id `id`, by the `.owner` of its job folder under base_dir
/// (hosts sharing base_dir) or by the host records; None when neither says.
fn holder_hint(cfg: &Config, id: &str) -> Option<String> {
    let me = cfg.worker_id();
    let safe = !id.is_empty() && !id.starts_with('.') && !id.contains('/');
    if safe && let Ok(rd) = std::fs::read_dir(&cfg.worker.base_dir) {
        for e in rd.flatten() {
            let owner = e.path().join(id).join(crate::imaging::jobdir::OWNER_FILE);
            if let Ok(bytes) = std::fs::read(&owner)
                && let Ok(o) = serde_json::from_slice::<crate::imaging::jobdir::Owner>(&bytes)
                && o.worker != me
            {
                return Some(format!(
                    "worker {} (its job {}, by {})",
                    escape(&o.worker),
                    o.job,
                    owner.display()
                ));
            }
        }
    }
    let hosts = super::hosts::list(cfg).ok()?;
    hosts.iter().find_map(|h| {
        h.record
            .running
            .iter()
            .find(|j| j.image_id == id)
            .filter(|_| h.record.worker != me)
            .map(|j| {
                format!(
                    "worker {} (its job {}, by its host record: {})",
                    escape(&h.record.worker),
                    j.job,
                    h.shown
                )
            })
    })
}

pub fn requeue(cfg: &Config, worker: &str, force: bool) -> anyhow::Result<i32> {
    let req = Request::Requeue {
        worker: worker.to_string(),
        force,
    };
    let r = expect(call(cfg, req, |_| true)?)?;
    let Response::Requeued { moved } = r else {
        return Err(unexpected(&r));
    };
    for m in &moved {
        println!("incoming/{}", escape(m));
    }
    println!(
        "{} file(s) of worker {} moved back to incoming/",
        moved.len(),
        escape(worker)
    );
    Ok(0)
}
