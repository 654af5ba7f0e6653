//! `retry`, `cancel`, `requeue`, `drain`, `undrain`: operator actions, each recorded as an event.

use super::access::{call, expect};
use crate::config::Config;
use crate::domain::text::escape;
use crate::operate::control::{Request, Response};

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
    let r = expect(call(cfg, Request::Cancel { id: id.to_string() }, |_| true)?)?;
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
