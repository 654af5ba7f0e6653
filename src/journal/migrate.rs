//! Moving a log written in stored form 1 (one JSON value per event in `events`, one key per
//! event in `by_job`, inputs in `inputs`, projections in `jobs`) into stored form 2 (blocks with
//! the inputs beside their events, `job_seqs`) when it is opened.
//!
//! Invariant: the move is idempotent. Until the form-2 mark (`STORE_FORMAT`) is written, a crash
//! leaves the old trees as they were and the next open starts over; after it, only the old
//! trees are left to drop. A log marked with a newer stored form is refused, never changed.

use super::indexes::{image_key, sha_key};
use super::{
    Journal, JournalError, LEGACY_BY_FOLDER, LEGACY_BY_JOB, LEGACY_EVENTS, LEGACY_INPUTS,
    LEGACY_JOBS, Result, SEAL_EVENTS, STORE_FORMAT, STORE_VERSION, Small, Stored, Tag, archive,
    block, decode_view, key_seq, lock,
};

impl Journal {
    /// Moves a log written in stored form 1 (one JSON value per event in `events`, one key per
    /// event in `by_job`, inputs in `inputs`, projections in `jobs`) into form 2: the events
    /// with their inputs into blocks, the job index into `job_seqs`; the other indexes did not
    /// change, and the open marks are folded again at the next `Store::open` (the projection
    /// format changed). Idempotent: until the new form's mark is written, a crash leaves the
    /// old trees as they were and the next open starts over; after it, only they are left to
    /// drop.
    pub(super) fn migrate(&mut self) -> Result<()> {
        let names: Vec<sled::IVec> = self.db.tree_names();
        let has = |name: &str| names.iter().any(|n| n.as_ref() == name.as_bytes());
        let legacy = [
            LEGACY_EVENTS,
            LEGACY_BY_JOB,
            LEGACY_JOBS,
            LEGACY_INPUTS,
            LEGACY_BY_FOLDER,
        ];
        let drop_legacy = |db: &sled::Db| -> Result<()> {
            for name in legacy {
                if has(name) {
                    db.drop_tree(name)?;
                }
            }
            db.flush()?;
            Ok(())
        };
        let marked = self.db.get(STORE_FORMAT)?.map(|v| key_seq(&v));
        if marked == Some(STORE_VERSION) {
            if legacy.iter().any(|n| has(n)) {
                drop_legacy(&self.db)?;
            }
            return Ok(());
        }
        if let Some(other) = marked {
            return Err(JournalError::Refused(format!(
                "the event log in {} is in stored form {other}, newer than this build-image knows ({STORE_VERSION}): run the version that wrote it, or move the log with `events --json` and `import`",
                self.path.display()
            )));
        }
        if has(LEGACY_EVENTS) {
            let events = self.db.open_tree(LEGACY_EVENTS)?;
            if !events.is_empty() {
                let started = std::time::Instant::now();
                let inputs = self.db.open_tree(LEGACY_INPUTS)?;
                // (the content and name indexes too: form 1 keyed them by the sha256 in hex
                // and by the image_id as given)
                for tree in [
                    &self.blocks,
                    &self.tail,
                    &self.job_seqs,
                    &self.by_sha,
                    &self.by_image,
                ] {
                    tree.clear()?;
                }
                *lock(&self.small) = Small::default();
                let mut n = 0u64;
                let mut batch = Vec::with_capacity(SEAL_EVENTS);
                for item in events.iter() {
                    let (k, v) = item?;
                    let seq = key_seq(&k);
                    let view = decode_view(seq, &v)?;
                    if view.kind == Tag::Claimed
                        && let Some(sha) = &view.sha256
                    {
                        self.by_sha.insert(sha_key(sha, view.job), &[])?;
                    }
                    if matches!(view.kind, Tag::Queued | Tag::Invalid)
                        && let Some(image_id) = &view.image_id
                    {
                        self.by_image.insert(image_key(image_id, view.job), &[])?;
                    }
                    // the job's input, beside each event that carried it
                    let input = match view.kind {
                        Tag::Queued | Tag::Invalid => {
                            inputs.get(view.job.to_be_bytes())?.map(|i| i.to_vec())
                        }
                        _ => None,
                    };
                    batch.push(Stored {
                        seq,
                        job: view.job,
                        json: v.to_vec(),
                        input,
                    });
                    if batch.len() >= SEAL_EVENTS {
                        self.write_blocks(&batch)?;
                        n += batch.len() as u64;
                        batch.clear();
                    }
                }
                n += batch.len() as u64;
                self.write_blocks(&batch)?;
                // the job index: form 1 kept a key per event, in (job, seq) order
                let by_job = self.db.open_tree(LEGACY_BY_JOB)?;
                let mut current: Option<(u64, Vec<u8>)> = None;
                for item in by_job.iter() {
                    let (k, _) = item?;
                    if k.len() != 16 {
                        continue;
                    }
                    let (job, seq) = (key_seq(&k[..8]), key_seq(&k[8..]));
                    if current.as_ref().is_some_and(|(j, _)| *j != job)
                        && let Some((j, seqs)) = current.take()
                    {
                        self.job_seqs.insert(j.to_be_bytes(), seqs)?;
                    }
                    block::put_varint(&mut current.get_or_insert_with(|| (job, Vec::new())).1, seq);
                }
                if let Some((j, seqs)) = current {
                    self.job_seqs.insert(j.to_be_bytes(), seqs)?;
                }
                self.db.flush()?;
                archive::crash_point("migrate-written");
                log::info!(
                    "log {}: {n} event(s) moved into blocks with their inputs (stored form {STORE_VERSION}) in {:?}",
                    self.path.display(),
                    started.elapsed()
                );
            }
        }
        self.db.insert(STORE_FORMAT, &STORE_VERSION.to_be_bytes())?;
        self.db.flush()?;
        drop_legacy(&self.db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_of_a_newer_stored_form_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            j.db.insert(STORE_FORMAT, &(STORE_VERSION + 1).to_be_bytes())
                .unwrap();
            j.db.flush().unwrap();
        }
        // sled lets go of its lock a moment after the handle is dropped (its flusher thread)
        let mut err = None;
        let opened = crate::wait::wait_for(std::time::Duration::from_secs(10), || {
            match Journal::open(dir.path()) {
                Err(JournalError::Locked(_)) => false,
                other => {
                    err = other.err();
                    true
                }
            }
        });
        assert!(opened, "the log stayed locked");
        let err = err.unwrap().to_string();
        assert!(err.contains("newer than this build-image knows"), "{err}");
    }
}
