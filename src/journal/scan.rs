//! Reading the log: one event (`get`, through a small cache of decompressed sealed blocks), the
//! events in order from a seq (`since`, over a `Scan` of the stored blocks), one job's events
//! through `job_seqs`, and their folds into job states (`fold_job`, `fold_jobs` split over the
//! cores, `projections`, `newest_projections`).
//!
//! A job's number says nothing of where its events are: in a log of this version jobs are
//! numbered 1, 2, 3, ... as they open (in a log of an earlier version, by the seq of their first
//! event); what holds in both is that a job opened after another has a higher number, and its
//! first event comes after the other's.
//!
//! Invariant: a scan misses no event and yields each once, in seq order, even while seals move
//! blocks of `tail` into `blocks` under it: `Scan` goes over both again when a seal was counted
//! since it began, and the readers skip what it yields twice (and the copies a crash in a merge
//! can leave), since seqs only go up.

use super::{
    CACHED_BLOCKS, Cached, Event, FARM, Job, Jobs, Journal, JournalError, Result, block, decode,
    decode_view, key_seq, lock,
};
use crate::domain::job as fold;

/// A scan of the stored blocks (`Journal::raw_scan`): `blocks`, then `tail`. A seal writes its
/// merged block, counts itself, then removes the small blocks it merged; so before it yields a
/// block of `tail` (and when `tail` ends) the scan looks at the count, and when a seal was
/// counted since it began it goes over `blocks` again from the last block it yielded there (the
/// merged block is there by then) and `tail` again from the last block it yielded there. It
/// never yields a block after one that a seal took from under it: seqs only go up.
struct Scan<'a> {
    journal: &'a Journal,
    seals: u64,
    blocks_from: u64,
    tail_from: u64,
    /// (in `blocks`, the range under way); None: done.
    current: Option<(bool, sled::Iter)>,
}

impl Scan<'_> {
    /// Has a seal been counted since the last look? Then `blocks` again.
    fn sealed_meanwhile(&mut self) -> bool {
        let now = self.journal.seals.load(std::sync::atomic::Ordering::SeqCst);
        if now == self.seals {
            return false;
        }
        self.seals = now;
        let blocks = self.journal.blocks.range(self.blocks_from.to_be_bytes()..);
        self.current = Some((true, blocks));
        true
    }
}

impl Iterator for Scan<'_> {
    type Item = Result<(u64, sled::IVec)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (in_blocks, iter) = self.current.as_mut()?;
            let in_blocks = *in_blocks;
            match iter.next() {
                Some(Ok((k, v))) => {
                    let first = key_seq(&k);
                    if in_blocks {
                        self.blocks_from = first;
                    } else if self.sealed_meanwhile() {
                        continue;
                    } else {
                        self.tail_from = first;
                    }
                    return Some(Ok((first, v)));
                }
                Some(Err(e)) => {
                    self.current = None;
                    return Some(Err(e.into()));
                }
                None if in_blocks => {
                    let tail = self.journal.tail.range(self.tail_from.to_be_bytes()..);
                    self.current = Some((false, tail));
                }
                None => {
                    if !self.sealed_meanwhile() {
                        self.current = None;
                        return None;
                    }
                }
            }
        }
    }
}

impl Journal {
    /// The event with this seq.
    pub fn get(&self, seq: u64) -> Result<Option<Event>> {
        let Some((first, _, body)) = self.block_holding(seq)? else {
            return Ok(None);
        };
        for e in block::entries(first, &body) {
            let e = e?;
            if e.seq == seq && !e.input {
                return decode(seq, e.json).map(Some);
            }
        }
        Ok(None)
    }

    /// The block that holds seq `seq` if it is stored (its first seq and body): the last block
    /// keyed at or below it, in `tail` (the newest events) or else in `blocks` (those are
    /// never changed once written: kept decompressed in a small cache).
    fn block_holding(&self, seq: u64) -> Result<Option<Cached>> {
        {
            let mut cache = lock(&self.cache);
            if let Some(i) = cache
                .iter()
                .position(|(first, last, _)| (*first..=*last).contains(&seq))
            {
                let hit = cache.remove(i);
                let out = (hit.0, hit.1, std::sync::Arc::clone(&hit.2));
                cache.push(hit);
                return Ok(Some(out));
            }
        }
        for (tree, sealed) in [(&self.tail, false), (&self.blocks, true)] {
            if let Some(item) = tree.range(..=seq.to_be_bytes()).next_back() {
                let (k, v) = item?;
                let first = key_seq(&k);
                let body = std::sync::Arc::new(block::body(first, &v)?.into_owned());
                let last = block::entries(first, &body)
                    .filter_map(|e| e.ok().map(|e| e.seq))
                    .last()
                    .unwrap_or(first);
                if last >= seq {
                    if sealed {
                        let mut cache = lock(&self.cache);
                        if cache.len() >= CACHED_BLOCKS {
                            cache.remove(0);
                        }
                        cache.push((first, last, std::sync::Arc::clone(&body)));
                    }
                    return Ok(Some((first, last, body)));
                }
            }
        }
        Ok(None)
    }

    /// Events with seq >= `since`, in order.
    pub fn since(&self, since: u64) -> impl Iterator<Item = Result<Event>> + '_ {
        let mut last = 0;
        self.raw_scan(since)
            .flat_map(|b| match b {
                Ok((first, stored)) => match block::body(first, &stored) {
                    Ok(body) => block::entries(first, &body)
                        .filter(|e| e.as_ref().map_or(true, |e| !e.input))
                        .map(|e| {
                            let e = e?;
                            Ok((e.seq, decode(e.seq, e.json)?))
                        })
                        .collect::<Vec<_>>(),
                    Err(e) => vec![Err(e.into())],
                },
                Err(e) => vec![Err(e)],
            })
            .filter_map(move |r| match r {
                Ok((seq, ev)) if seq >= since && seq > last => {
                    last = seq;
                    Some(Ok(ev))
                }
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
    }

    /// The stored blocks that hold the events from seq `since` on, in order (`blocks`, then
    /// `tail`), as (first seq, stored value). A seal while the scan runs can move blocks of
    /// `tail` into `blocks` behind it: the scan then goes over both again from where it was
    /// (see `Scan`), so it misses nothing; what it yields twice the callers skip (seqs only go
    /// up).
    fn raw_scan(&self, since: u64) -> Scan<'_> {
        let from = |tree: &sled::Tree| match tree.range(..=since.to_be_bytes()).next_back() {
            Some(Ok((k, _))) => key_seq(&k),
            _ => since,
        };
        let (blocks_from, tail_from) = (from(&self.blocks), from(&self.tail));
        Scan {
            journal: self,
            seals: self.seals.load(std::sync::atomic::Ordering::SeqCst),
            blocks_from,
            tail_from,
            current: Some((true, self.blocks.range(blocks_from.to_be_bytes()..))),
        }
    }

    /// Calls `f` with each stored entry of job `job` (events and inputs), in order, not
    /// decoded (through `job_seqs`; each block read once, however many of the job's events it
    /// holds).
    pub(super) fn each_job_entry(
        &self,
        job: u64,
        mut f: impl FnMut(block::Entry<'_>) -> Result<()>,
    ) -> Result<()> {
        let seqs = self.seqs_of(job)?;
        let mut i = 0;
        while i < seqs.len() {
            let Some((first, last, body)) = self.block_holding(seqs[i])? else {
                i += 1; // an index entry whose event a crash took
                continue;
            };
            // the job's seqs this block holds, matched against its entries in one pass
            let mut j = i;
            while j < seqs.len() && seqs[j] <= last {
                j += 1;
            }
            let wanted = &seqs[i..j];
            let mut k = 0;
            for e in block::entries(first, &body) {
                let e = e?;
                while k < wanted.len() && wanted[k] < e.seq {
                    k += 1;
                }
                if k == wanted.len() {
                    break;
                }
                if wanted[k] == e.seq && e.job == job {
                    f(e)?;
                }
            }
            i = j.max(i + 1);
        }
        Ok(())
    }

    /// The events of one job, in order (through `job_seqs`).
    pub fn job_events(&self, job: u64) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        self.each_job_entry(job, |e| {
            if !e.input {
                out.push(decode(e.seq, e.json)?);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// A job folded from its own events (None: no event of it is stored, or `FARM`, which is
    /// no job).
    pub fn fold_job(&self, job: u64) -> Result<Option<Job>> {
        if job == FARM {
            return Ok(None);
        }
        let mut out: Option<Job> = None;
        self.each_job_entry(job, |e| {
            if !e.input {
                out.get_or_insert_with(Job::default)
                    .apply(&decode_view(e.seq, e.json)?);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The farm-level events (those of no job: `drained`, `undrained`), in order.
    pub fn farm_events(&self) -> Result<Vec<Event>> {
        self.job_events(FARM)
    }

    /// The input workitem of a job (stored with its `queued` or `invalid` event).
    pub fn input(&self, job: u64) -> Result<Option<serde_json::Value>> {
        match self.input_bytes(job)? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|source| JournalError::Corrupt { seq: job, source }),
            None => Ok(None),
        }
    }

    /// The bytes of a job's input workitem, as read (the one its latest `queued` or `invalid`
    /// event carried).
    pub fn input_bytes(&self, job: u64) -> Result<Option<Vec<u8>>> {
        let mut out = None;
        self.each_job_entry(job, |e| {
            if e.input {
                out = Some(e.json.to_vec());
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// One job's state: the fold of its own events (read through `job_seqs`).
    pub fn projection(&self, job: u64) -> Result<Option<Job>> {
        self.fold_job(job)
    }

    /// Every job's state: the fold of the whole log.
    pub fn projections(&self) -> Result<Jobs> {
        self.fold_all()
    }

    /// The state of the newest `n` jobs (and no others): the fold of the events from the first
    /// event of the `n`th newest job on, so it costs what those jobs' time in the log holds,
    /// not the log.
    pub fn newest_projections(&self, n: usize) -> Result<Jobs> {
        if n == 0 {
            return Ok(Jobs::new());
        }
        let mut first_job = None;
        let mut first_seq = u64::MAX;
        for item in self.job_seqs.range(1u64.to_be_bytes()..).rev().take(n) {
            let (k, v) = item?;
            let job = key_seq(&k);
            first_job = Some(job);
            let mut rest = &v[..];
            if let Some(seq) = block::take_varint(&mut rest) {
                first_seq = first_seq.min(seq);
            }
        }
        let Some(first_job) = first_job else {
            return Ok(Jobs::new());
        };
        let mut out = Jobs::new();
        self.each_entry(first_seq, u64::MAX, |e| {
            if e.job >= first_job {
                fold::apply(&mut out, &decode_view(e.seq, e.json)?);
            }
            Ok(())
        })?;
        while out.len() > n {
            out.pop_first();
        }
        Ok(out)
    }

    /// Folds the whole log from empty.
    pub fn fold_all(&self) -> Result<Jobs> {
        Ok(self.fold_jobs(None)?.0)
    }

    /// Folds the events below seq `until` (all: None) from empty; returns the jobs and how many
    /// events were read. Jobs are independent, so the work is split by job id over the cores:
    /// each thread reads the blocks and decodes only its own jobs' events (a block names the
    /// job of each event in front of it).
    pub fn fold_jobs(&self, until: Option<u64>) -> Result<(Jobs, u64)> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 4) as u64;
        let end = until.unwrap_or(u64::MAX);
        let part = |me: u64| -> Result<(Jobs, u64)> {
            let mut jobs = Jobs::new();
            let mut n = 0;
            self.each_entry(0, end, |e| {
                n += 1;
                if e.job % threads == me {
                    fold::apply(&mut jobs, &decode_view(e.seq, e.json)?);
                }
                Ok(())
            })?;
            Ok((jobs, n))
        };
        if threads == 1 {
            return part(0);
        }
        let parts: Vec<Result<(Jobs, u64)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|me| s.spawn(move || part(me))).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(JournalError::Refused(
                            "a thread of the fold panicked".into(),
                        ))
                    })
                })
                .collect()
        });
        let mut all = Jobs::new();
        let mut n = 0;
        for p in parts {
            let (mut jobs, count) = p?;
            all.append(&mut jobs);
            n = count;
        }
        Ok((all, n))
    }

    /// Calls `f` with each stored event with a seq in `since..until`, in order, not decoded
    /// (each once: the copies a crash in a merge can leave are skipped).
    fn each_entry(
        &self,
        since: u64,
        until: u64,
        mut f: impl FnMut(block::Entry<'_>) -> Result<()>,
    ) -> Result<()> {
        let mut last = 0;
        for item in self.raw_scan(since) {
            let (first, v) = item?;
            if first >= until {
                break;
            }
            let body = block::body(first, &v)?;
            for e in block::entries(first, &body) {
                let e = e?;
                if e.seq >= until {
                    return Ok(());
                }
                if e.input || e.seq < since || e.seq <= last {
                    continue;
                }
                last = e.seq;
                f(e)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::SEAL_EVENTS;
    use super::super::tests::{P, cancelled};
    use super::*;

    #[test]
    fn the_newest_jobs_fold_only_their_part_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut ids = Vec::new();
        for i in 0..40u64 {
            ids.push(j.append(None, cancelled(), P).unwrap().job);
            // an older job gets a later event: it is after the newest jobs' ids in the log
            if i % 3 == 0 {
                j.append(Some(ids[(i / 2) as usize]), cancelled(), P)
                    .unwrap();
            }
        }
        let all = j.fold_all().unwrap();
        for n in [0, 1, 5, 40, 100] {
            let newest = j.newest_projections(n).unwrap();
            let want: Jobs = all
                .iter()
                .rev()
                .take(n)
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            assert_eq!(newest, want, "n = {n}");
        }
    }

    #[test]
    fn a_scan_while_seals_run_misses_no_event() {
        let dir = tempfile::tempdir().unwrap();
        let j = std::sync::Arc::new(Journal::open(dir.path()).unwrap());
        let total = 8 * SEAL_EVENTS as u64;
        let writer = {
            let j = std::sync::Arc::clone(&j);
            std::thread::spawn(move || {
                for _ in 0..total {
                    j.append_with(vec![(None, cancelled())], |_, _, _| false)
                        .unwrap();
                }
            })
        };
        let mut scans = 0;
        loop {
            let before = j.last_seq();
            let seqs: Vec<u64> = j.since(1).map(|e| e.unwrap().seq).collect();
            // every event appended before the scan began, in order, none missing
            assert!(seqs.len() as u64 >= before, "{} < {before}", seqs.len());
            assert!(
                seqs.iter().copied().eq(1..=seqs.len() as u64),
                "a gap or a repeat after {scans} scans"
            );
            let mut n = 0;
            j.each_entry(1, u64::MAX, |_| {
                n += 1;
                Ok(())
            })
            .unwrap();
            assert!(n >= before);
            scans += 1;
            if before == total {
                break;
            }
        }
        writer.join().unwrap();
        assert!(j.blocks.len() >= 7, "seals ran during the scans");
    }
}
