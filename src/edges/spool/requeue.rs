//! `requeue --worker W`: the files a dead worker had claimed (its `active/W/`) handed back to
//! `incoming/` for the farm's other workers, each move recorded first, and W's claim of each
//! one's job folder (a shared `base_dir`) let go.
//!
//! Invariants: refused for this daemon's own worker id (its files are recovered at its start)
//! and, unless forced, for a worker whose liveness mark says it is alive; a file never replaces
//! one in `incoming/` (a free `requeued-N-` name is taken, and the rename does not replace).

use super::{Liveness, STALE_AFTER, Spool, list_names};
use crate::domain::EventKind;
use crate::engine::{Engine, EngineError, Result};

/// Moves the files of `worker`'s `active/` back to `incoming/`. Returns the names they got.
pub fn requeue_worker(
    engine: &Engine,
    spool: &Spool,
    worker: &str,
    force: bool,
) -> Result<Vec<String>> {
    if worker == spool.worker {
        return Err(EngineError::Refused(format!(
            "{worker} is this daemon's own worker id: its files are recovered on start"
        )));
    }
    if worker.is_empty() || worker.starts_with('.') || worker.contains('/') {
        return Err(EngineError::Refused(format!(
            "{worker:?} is not a worker id"
        )));
    }
    match spool.liveness(worker, STALE_AFTER) {
        Liveness::Alive(how) if !force => {
            return Err(EngineError::Refused(format!(
                "worker {worker} looks alive ({how}): requeue is for a host that is down for good; --force if you are sure"
            )));
        }
        _ => {}
    }
    let dir = spool.root.join("active").join(worker);
    let refused = |e: &dyn std::fmt::Display| EngineError::Refused(e.to_string());
    let names = list_names(&dir).map_err(|e| refused(&e))?;
    let mut moved = Vec::new();
    for name in names {
        let mut target = name.clone();
        let mut n = 1;
        while spool.incoming.join(&target).symlink_metadata().is_ok() {
            target = format!("requeued-{n}-{name}");
            n += 1;
        }
        // The dead worker's claim of the job folder (a shared base_dir) is let go, so that
        // the host that takes the file builds it rather than finding it held.
        if let Ok(bytes) = std::fs::read(dir.join(&name))
            && let Ok(v) = crate::domain::workitem::parse_object(&bytes)
            && let Ok(spec) = crate::domain::workitem::normalise(&v)
            && let Err(e) =
                crate::imaging::jobdir::release_folder(&engine.cfg.worker, &spec, worker)
        {
            log::warn!("requeue: cannot let go of {worker}'s claim of the folder of {name}: {e}");
        }
        engine.store.record(
            None,
            EventKind::Requeued {
                reason: format!("moved active/{worker}/{name} back to incoming/{target}"),
                file: Some(name.clone()),
                from_worker: Some(worker.to_string()),
            },
        )?;
        if !crate::durable::rename_noreplace(&dir.join(&name), &spool.incoming.join(&target))
            .map_err(|e| refused(&e))?
        {
            return Err(EngineError::Refused(format!(
                "incoming/{target} appeared meanwhile; run requeue again"
            )));
        }
        moved.push(target);
    }
    Ok(moved)
}
