//! `retry`, `cancel`, `requeue`: operator actions, each recorded as an event.

use super::access::act;
use crate::config::Config;
use crate::control::Request;
use crate::ops;
use serde_json::{Value, json};

pub fn retry(cfg: &Config, id: &str) -> anyhow::Result<i32> {
    let req = Request::Retry { id: id.to_string() };
    let out: Value = act(cfg, &req, |stage| {
        let job = ops::resolve(&stage.journal, id)?;
        let now = stage.retry(job)?;
        Ok(json!({"job": job, "queued": true, "building_now": now}))
    })?;
    let job = out["job"].as_u64().unwrap_or_default();
    if out["building_now"] == json!(true) {
        println!("job {job} ({id}) queued again");
    } else {
        println!("job {job} ({id}) queued again; it is built when the daemon starts");
    }
    Ok(0)
}

pub fn cancel(cfg: &Config, id: &str) -> anyhow::Result<i32> {
    let req = Request::Cancel { id: id.to_string() };
    let out: Value = act(cfg, &req, |stage| {
        let job = ops::resolve(&stage.journal, id)?;
        let answered = stage.cancel(job)?;
        Ok(json!({"job": job, "answered": answered}))
    })?;
    let job = out["job"].as_u64().unwrap_or_default();
    if out["answered"] == json!(true) {
        println!("job {job} ({id}) cancelled and answered");
    } else {
        println!("job {job} ({id}) is being cancelled: its build is killed and it is answered");
    }
    Ok(0)
}

pub fn requeue(cfg: &Config, worker: &str) -> anyhow::Result<i32> {
    let req = Request::Requeue {
        worker: worker.to_string(),
    };
    let moved: Vec<String> = act(cfg, &req, |stage| Ok(stage.requeue_worker(worker)?))?;
    for m in &moved {
        println!("incoming/{m}");
    }
    println!(
        "{} file(s) of worker {worker} moved back to incoming/",
        moved.len()
    );
    Ok(0)
}
