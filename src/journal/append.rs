//! Appending events: their seqs, their stored form (the input moved out and stored beside the
//! event), the index entries and open marks they add, their blocks (small blocks in `tail`,
//! merged into one full block of `blocks` by `seal`), and group commit (`sync`).
//!
//! Invariant: `append` and `append_batch` return only after the events are flushed, so a caller
//! acts on a step only once its event is durable. `append_with` appends without flushing;
//! `sync` then makes everything appended so far durable with one flush shared by every thread
//! waiting at that moment (group commit); a flush covers every event appended before it (sled
//! has one log for all its trees). Each append writes its events as one block; once the small
//! blocks at the end of the log hold `SEAL_EVENTS` events they are merged into one (`seal`), so
//! a scan reads few, large values whichever way the events came. Index entries and open marks
//! are written before their events, and a merged block before the small blocks it replaces are
//! removed: a crash leaves something extra (skipped, or removed at the next start), never an
//! event missing from its indexes or from the log.

use super::indexes::{image_key, sha_key};
use super::{
    Event, EventKind, FARM, Job, Journal, JournalError, Result, SEAL_BYTES, SEAL_EVENTS, Small,
    Stored, block, decode_view, key_seq, last_entry, lock, now_ts,
};
use crate::domain::job as fold;

impl Journal {
    /// Appends one event and flushes it. `job = None` opens a new job: it gets the next job
    /// number (`next_job`); a farm-level event (`EventKind::is_farm`) is given job `FARM`.
    /// `is_open` says whether a job is still open after it (the store passes the lifecycle's).
    pub fn append(
        &self,
        job: Option<u64>,
        kind: EventKind,
        is_open: &dyn Fn(&Job) -> bool,
    ) -> Result<Event> {
        let mut out = self.append_batch(vec![(job, kind)], is_open)?;
        out.pop()
            .ok_or_else(|| JournalError::Sled(sled::Error::Unsupported("empty batch".into())))
    }

    /// Appends several events with one flush (group commit), storing each job's projection
    /// folded from its stored one, open or not as `is_open` says.
    pub fn append_batch(
        &self,
        items: Vec<(Option<u64>, EventKind)>,
        is_open: &dyn Fn(&Job) -> bool,
    ) -> Result<Vec<Event>> {
        let mut pending: std::collections::HashMap<u64, Job> = Default::default();
        let evs = self.append_with(items, |ev, view, opens| {
            let job = pending.entry(ev.job).or_insert_with(|| {
                if opens {
                    return Job::default();
                }
                self.projection(ev.job).ok().flatten().unwrap_or_default()
            });
            job.apply(view);
            is_open(job)
        })?;
        if let Some(last) = evs.last() {
            self.sync(last.seq + 1)?;
        }
        Ok(evs)
    }

    /// Appends events without flushing them (see `sync`). An item with job None opens a new
    /// job (the next job number); one with a job names a job already opened (else nothing is
    /// appended and the append is refused); a farm-level event names job `FARM` (and only it
    /// does). `project` is called for each event of a job (not a farm-level one), in order,
    /// under the append lock, with the event, its stored form and whether it opens its job,
    /// and says whether the job is open after it (its open mark is kept or written, else
    /// removed).
    pub fn append_with(
        &self,
        items: Vec<(Option<u64>, EventKind)>,
        project: impl FnMut(&Event, &fold::EventView<'_>, bool) -> bool,
    ) -> Result<Vec<Event>> {
        self.check_broken()?;
        let r = self.append_inner(items, project);
        if let Err(e) = &r {
            self.set_broken(e);
        }
        r
    }

    fn append_inner(
        &self,
        items: Vec<(Option<u64>, EventKind)>,
        mut project: impl FnMut(&Event, &fold::EventView<'_>, bool) -> bool,
    ) -> Result<Vec<Event>> {
        let mut out = Vec::with_capacity(items.len());
        let mut next = self.next_seq.lock().unwrap_or_else(|p| p.into_inner());
        let mut next_job = self.next_job();
        // A caller's mistake, refused before anything is written (not a write error): an
        // event for a job never opened, or a farm-level event given a job (or the reverse).
        for (job, kind) in &items {
            match (job, kind.is_farm()) {
                (Some(FARM), true) => {}
                (_, true) => {
                    return Err(JournalError::Refused(format!(
                        "a {} event belongs to no job: it is recorded under job {FARM}",
                        kind.name()
                    )));
                }
                (Some(job), false) if *job == FARM || *job >= next_job => {
                    return Err(JournalError::Refused(format!(
                        "an event for job {job}, which was never opened (the next job is {next_job})"
                    )));
                }
                _ => {}
            }
        }
        let mut stored: Vec<Stored> = Vec::with_capacity(items.len());
        let mut indexed: Vec<(&sled::Tree, Vec<u8>)> = Vec::new();
        let mut seqs: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
        let mut seq = *next;
        let mut projected: std::collections::HashMap<u64, bool> = Default::default();
        for (job, mut kind) in items {
            let input = take_input(&mut kind);
            let opens = job.is_none();
            let job = job.unwrap_or_else(|| {
                next_job += 1;
                next_job - 1
            });
            let ev = Event {
                seq,
                ts: now_ts(),
                job,
                kind,
            };
            let bytes = serde_json::to_vec(&ev).map_err(JournalError::Encode)?;
            if ev.job != FARM {
                // a farm-level event has no job to project, mark or index by name
                let view = decode_view(seq, &bytes)?;
                projected.insert(ev.job, project(&ev, &view, opens));
            }
            seqs.entry(ev.job).or_default().push(seq);
            indexed.extend(self.index_entry(ev.job, &ev.kind));
            stored.push(Stored {
                seq,
                job: ev.job,
                json: bytes,
                input,
            });
            out.push(ev);
            seq += 1;
        }
        // Indexes and the open marks of the jobs open after this append first, then the events,
        // then the marks of the jobs it settles removed: sled recovers a prefix of what was
        // written, so a crash leaves an index entry or a mark without its event (readers skip
        // it, a start removes the mark) or a settled job still marked (a start folds it and
        // removes the mark), never an event missing from its indexes or an open job unmarked.
        // Plain inserts, not sled batches: each `apply_batch` makes sled seal and write its
        // buffer (a pwrite and a sync_file_range), and the prefix is all the atomicity needed.
        for (job, new) in &seqs {
            self.add_seqs(*job, new)?;
        }
        for (tree, key) in indexed {
            tree.insert(key, &[])?;
        }
        for (id, is_open) in &projected {
            if *is_open {
                self.mark(*id)?;
            }
        }
        self.write_blocks(&stored)?;
        for (id, is_open) in &projected {
            if !*is_open {
                self.unmark(*id)?;
            }
        }
        *next = seq;
        self.next_job
            .store(next_job, std::sync::atomic::Ordering::SeqCst);
        Ok(out)
    }

    /// The name or content index entry an event adds, if any: (its tree, its key).
    pub(super) fn index_entry(&self, job: u64, kind: &EventKind) -> Option<(&sled::Tree, Vec<u8>)> {
        match kind {
            EventKind::Queued { image_id, .. }
            | EventKind::Invalid {
                image_id: Some(image_id),
                ..
            } => Some((&self.by_image, image_key(image_id, job))),
            EventKind::Claimed { sha256, .. } => Some((&self.by_sha, sha_key(sha256, job))),
            _ => None,
        }
    }

    /// Writes events (ascending seq, above every stored one; called under `next_seq`) with
    /// their inputs as blocks: a few as one small block in `tail`, many cut into full blocks of
    /// `SEAL_EVENTS` events (or `SEAL_BYTES`) in `blocks`. Once the small blocks hold
    /// `SEAL_EVENTS` events they are merged into one full block (`seal`): `blocks` gets one
    /// large value per few hundred events, and the many small writes go to a tree of a few
    /// small values (sled rewrites a tree's last node as it grows: a node of small values is
    /// cheap to rewrite, and the tail's removed values free whole segments).
    pub(super) fn write_blocks(&self, events: &[Stored]) -> Result<()> {
        let mut small = lock(&self.small);
        let mut builder = block::Builder::default();
        let mut first = 0;
        for ev in events {
            if builder.is_empty() {
                first = ev.seq;
            }
            builder.push(ev.seq, ev.job, &ev.json, false);
            if let Some(input) = &ev.input {
                builder.push(ev.seq, ev.job, input, true);
            }
            if builder.len() >= SEAL_EVENTS || builder.body_bytes() >= SEAL_BYTES {
                // every key of `blocks` stays below every key of `tail`
                self.seal(&mut small)?;
                let full = std::mem::take(&mut builder);
                self.blocks.insert(first.to_be_bytes(), full.finish())?;
            }
        }
        if !builder.is_empty() {
            let n = builder.len();
            self.tail.insert(first.to_be_bytes(), builder.finish())?;
            small.keys.push(first);
            small.events += n;
            if small.events >= SEAL_EVENTS {
                self.seal(&mut small)?;
            }
        }
        Ok(())
    }

    /// Merges the small blocks of `tail` into one block of `blocks` under the first one's key.
    /// The merged block is written before the small ones are removed, so a crash in between
    /// leaves events twice, never missing (readers skip the copies, `tidy_tail` removes them).
    fn seal(&self, small: &mut Small) -> Result<()> {
        let Some(&key) = small.keys.first() else {
            return Ok(());
        };
        let mut merged = block::Builder::default();
        for item in self.tail.iter() {
            let (k, v) = item?;
            let first = key_seq(&k);
            let body = block::body(first, &v)?;
            for e in block::entries(first, &body) {
                let e = e?;
                merged.push(e.seq, e.job, e.json, e.input);
            }
        }
        self.blocks.insert(key.to_be_bytes(), merged.finish())?;
        // counted before the small blocks go, so a scan that missed them sees it (`Scan`)
        self.seals.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        for k in &small.keys {
            self.tail.remove(k.to_be_bytes())?;
        }
        *small = Small::default();
        Ok(())
    }

    /// Makes every event below seq `end` durable. Group commit: when another thread is already
    /// flushing, waits for it and flushes only if that did not cover `end`; one flush covers
    /// everything appended before it started, for every thread waiting.
    pub fn sync(&self, end: u64) -> Result<()> {
        let mut c = self.commit.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if c.durable >= end {
                return Ok(());
            }
            if !c.flushing {
                break;
            }
            c = self.committed.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        self.check_broken()?;
        c.flushing = true;
        drop(c);
        let target = self.next_seq();
        let stall = flush_stall();
        if let Some((n, ms)) = stall {
            log::warn!("flush {n} under way (test hook BUILD_IMAGE_FLUSH_STALL_MS={ms})");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let flushed = self.db.flush().map_err(JournalError::from);
        if let Some((n, ms)) = stall {
            log::warn!("flush {n} written, its waiters not yet told (test hook)");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        if let Err(e) = &flushed {
            self.set_broken(e);
        }
        let mut c = self.commit.lock().unwrap_or_else(|p| p.into_inner());
        c.flushing = false;
        if flushed.is_ok() {
            c.durable = c.durable.max(target);
        }
        self.committed.notify_all();
        flushed?;
        Ok(())
    }

    /// The highest seq known durable (0: none).
    pub fn durable_seq(&self) -> u64 {
        lock(&self.commit).durable.saturating_sub(1)
    }

    /// Whether some appended event is not flushed yet.
    pub fn unsynced(&self) -> bool {
        let next = self.next_seq();
        self.commit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .durable
            < next
    }

    /// The seq the next event will get.
    pub fn next_seq(&self) -> u64 {
        *self.next_seq.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Flushes everything appended so far.
    pub fn flush(&self) -> Result<()> {
        self.sync(self.next_seq())
    }

    /// The seq of the last event in the log (0: empty).
    pub fn last_seq(&self) -> u64 {
        self.next_seq() - 1
    }

    /// Removes the small blocks a crash in the middle of a merge (`seal`) left in `tail` after
    /// the merged block was written (their events are in it), and takes the others as the
    /// small blocks to merge next.
    pub(super) fn tidy_tail(&self) -> Result<()> {
        let sealed = match self.blocks.last()? {
            Some((k, v)) => last_entry(key_seq(&k), &v)?,
            None => 0,
        };
        let mut small = Small::default();
        let mut stale = Vec::new();
        for item in self.tail.iter() {
            let (k, v) = item?;
            let first = key_seq(&k);
            if first <= sealed {
                stale.push(k);
                continue;
            }
            let body = block::body(first, &v)?;
            small.keys.push(first);
            small.events += block::entries(first, &body)
                .filter(|e| e.as_ref().is_ok_and(|e| !e.input))
                .count();
        }
        if !stale.is_empty() {
            log::warn!(
                "log {}: {} block(s) left by an interrupted merge removed (their events are in the merged block)",
                self.path.display(),
                stale.len()
            );
            for k in stale {
                self.tail.remove(k)?;
            }
            self.db.flush()?;
        }
        *lock(&self.small) = small;
        Ok(())
    }
}

/// A test hook for kills timed inside a shared flush (tests/torture.rs): with
/// `BUILD_IMAGE_FLUSH_STALL_MS=N` every group-commit flush is counted and announced on the log
/// (`flush K under way`, `flush K written, …`) and stalls N ms before sled's flush and N ms
/// after it, while its waiters wait. The flush's number and N; None without the variable.
fn flush_stall() -> Option<(u64, u64)> {
    static STALL: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    static FLUSHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let ms = (*STALL.get_or_init(|| {
        std::env::var("BUILD_IMAGE_FLUSH_STALL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
    }))?;
    Some((
        FLUSHES.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1,
        ms,
    ))
}

/// The input a `queued` or `invalid` event carries, moved out of it (it can be megabytes; it is
/// stored beside the event); None for an empty one, which so does not hide the job's earlier
/// input.
pub(super) fn take_input(kind: &mut EventKind) -> Option<Vec<u8>> {
    match kind {
        EventKind::Queued { input, .. } | EventKind::Invalid { input, .. } => {
            Some(std::mem::take(&mut input.0)).filter(|i| !i.is_empty())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{P, cancelled};
    use super::*;

    #[test]
    fn content_index_and_group_commit() {
        let dir = tempfile::tempdir().unwrap();
        let j = std::sync::Arc::new(Journal::open(dir.path()).unwrap());
        let claimed = |sha: &str| EventKind::Claimed {
            file: "f".into(),
            worker: "w".into(),
            bytes: 1,
            sha256: sha.into(),
            source: None,
        };
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let j = std::sync::Arc::clone(&j);
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let sha = if i % 2 == 0 { "aa" } else { "ab" };
                        let evs = j
                            .append_with(vec![(None, claimed(sha))], |_, v, _| {
                                let mut job = Job::default();
                                job.apply(v);
                                job.id == v.job
                            })
                            .unwrap();
                        j.sync(evs[0].seq + 1).unwrap();
                        assert!(evs[0].seq >= 1, "thread {t}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!j.unsynced());
        assert_eq!(j.jobs_for_sha("aa").unwrap().len(), 100);
        assert_eq!(j.jobs_for_sha("ab").unwrap().len(), 100);
        assert!(j.jobs_for_sha("a").unwrap().is_empty());
        assert_eq!(j.open_jobs().unwrap().len(), 200);
        j.append_with(vec![(None, claimed("cc"))], |_, v, _| {
            let mut job = Job::default();
            job.apply(v);
            job.id != v.job
        })
        .unwrap();
        assert!(j.unsynced());
        j.flush().unwrap();
        assert!(!j.unsynced());
        assert_eq!(j.open_jobs().unwrap().len(), 200);
    }

    #[test]
    fn small_blocks_are_sealed_and_a_crash_in_a_seal_leaves_no_copy() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            for _ in 0..300 {
                j.append(None, cancelled(), P).unwrap();
            }
            assert_eq!(j.blocks.len(), 1, "256 events sealed into one block");
            assert_eq!(j.tail.len(), 300 - SEAL_EVENTS, "the rest in small blocks");
            // a crash after a seal wrote its merged block, before it removed the small ones:
            // one of them is still there
            let (k, v) = j.blocks.first().unwrap().unwrap();
            let body = block::body(key_seq(&k), &v).unwrap();
            let e = block::entries(key_seq(&k), &body)
                .map(|e| e.unwrap())
                .nth(10)
                .unwrap();
            let mut b = block::Builder::default();
            b.push(e.seq, e.job, e.json, false);
            j.tail.insert(e.seq.to_be_bytes(), b.finish()).unwrap();
            // readers skip the copy
            let seqs: Vec<u64> = j.since(0).map(|e| e.unwrap().seq).collect();
            assert_eq!(seqs, (1..=300).collect::<Vec<_>>());
            assert_eq!(j.fold_all().unwrap().len(), 300);
            assert_eq!(j.get(e.seq).unwrap().unwrap().seq, e.seq);
            j.flush().unwrap();
        }
        // and the next open removes it
        let j = crate::journal::reopen_for_test(dir.path());
        assert_eq!(j.tail.len(), 300 - SEAL_EVENTS);
        assert_eq!(j.next_seq(), 301);
        assert_eq!(j.since(0).count(), 300);
        assert_eq!(j.job_events(11).unwrap().len(), 1);
        // sealing goes on from the small blocks found at the open
        for _ in 0..(2 * SEAL_EVENTS - 300) {
            j.append(None, cancelled(), P).unwrap();
        }
        assert_eq!(j.blocks.len(), 2);
        assert_eq!(j.tail.len(), 0);
        assert_eq!(j.since(0).count(), 2 * SEAL_EVENTS);
    }

    #[test]
    fn a_big_input_is_stored_with_its_event_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let big =
            serde_json::json!({ "image": { "image_id": "big", "kickstart": "x".repeat(3 << 20) } });
        let ev = j
            .append(
                None,
                EventKind::Invalid {
                    image_id: Some("big".into()),
                    error: "e".into(),
                    held_by: None,
                    input: big.clone().into(),
                },
                P,
            )
            .unwrap();
        j.append(Some(ev.job), cancelled(), P).unwrap();
        assert_eq!(j.input(ev.job).unwrap().unwrap(), big);
        assert_eq!(j.job_events(ev.job).unwrap().len(), 2);
        assert_eq!(j.jobs_for_image("big").unwrap(), vec![ev.job]);
        // past the block size: a block of its own, sealed at once, compressed
        assert_eq!(j.blocks.len(), 1);
        assert!(j.blocks.first().unwrap().unwrap().1.len() < 1 << 20);
    }
}
