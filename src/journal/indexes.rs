//! The trees derived from the events, and the lookups through them: `job_seqs` (job -> the seqs
//! of its events), `by_image` (image_id made safe ++ 0 ++ job: by image_id and by job folder),
//! `by_sha` (sha256 of the claimed file ++ 0 ++ job) and `open` (the marks of the jobs not
//! settled, rewritten whole from a fold of the log by `rewrite_marks`).
//!
//! Invariant: all of them can be rebuilt by folding the events (`build-image replay` checks
//! them). An entry can outlive its event after a crash (readers skip it; the lookups by name
//! check the job's own events; a start removes the mark), but an event is never missing from
//! its indexes and an open job is never unmarked.

use super::{
    Event, EventKind, JOB_SEQS, Job, Jobs, Journal, JournalError, PROJECTED_UPTO,
    PROJECTION_FORMAT, PROJECTION_VERSION, Result, block, decode, key_seq,
};

impl Journal {
    /// Adds seqs (ascending, above the job's stored ones) to a job's entry in `job_seqs`.
    pub(super) fn add_seqs(&self, job: u64, new: &[u64]) -> Result<()> {
        let key = job.to_be_bytes();
        let mut value = self
            .job_seqs
            .get(key)?
            .map(|v| v.to_vec())
            .unwrap_or_default();
        for seq in new {
            block::put_varint(&mut value, *seq);
        }
        self.job_seqs.insert(key, value)?;
        Ok(())
    }

    /// The seqs of a job's events, ascending.
    pub(super) fn seqs_of(&self, job: u64) -> Result<Vec<u64>> {
        let Some(v) = self.job_seqs.get(job.to_be_bytes())? else {
            return Ok(Vec::new());
        };
        let mut rest = &v[..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            match block::take_varint(&mut rest) {
                Some(seq) => out.push(seq),
                None => {
                    return Err(JournalError::StoreCorrupt {
                        path: self.path.join(JOB_SEQS),
                        detail: format!("the index entry of job {job} is cut short"),
                    });
                }
            }
        }
        Ok(out)
    }

    /// The jobs that carry this image_id, oldest first (through the by_image index).
    pub fn jobs_for_image(&self, image_id: &str) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        for job in self.name_candidates(&crate::domain::workitem::sanitise_id(image_id))? {
            if self
                .fold_job(job)?
                .is_some_and(|j| j.image_id.as_deref() == Some(image_id))
            {
                out.push(job);
            }
        }
        Ok(out)
    }

    /// The jobs whose job folder is `prefix/dir_id` of `spec`, oldest first (through the
    /// by_image index: a job folder's last part is its image_id made safe, `dir_id`).
    pub fn jobs_for_folder(&self, spec: &crate::domain::workitem::Spec) -> Result<Vec<u64>> {
        let want = folder_key(spec);
        let mut out = Vec::new();
        for job in self.name_candidates(&spec.dir_id)? {
            let mut folder = None;
            self.each_job_entry(job, |e| {
                if !e.input
                    && let Ok(Event {
                        kind: EventKind::Queued { spec, .. },
                        ..
                    }) = decode(e.seq, e.json)
                {
                    folder = Some(folder_key(&spec));
                }
                Ok(())
            })?;
            if folder.as_deref() == Some(want.as_str()) {
                out.push(job);
            }
        }
        Ok(out)
    }

    /// The jobs indexed under an image_id made safe (`sanitise_id`): those with that image_id,
    /// and any other image_id that makes the same.
    fn name_candidates(&self, dir: &str) -> Result<Vec<u64>> {
        let mut prefix = dir.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.by_image.scan_prefix(&prefix) {
            let (k, _) = item?;
            out.push(key_seq(&k[prefix.len()..]));
        }
        Ok(out)
    }

    /// The jobs that carry this file content (the sha256 of a claimed file), oldest first.
    pub fn jobs_for_sha(&self, sha256: &str) -> Result<Vec<u64>> {
        let prefix = sha_prefix(sha256);
        let mut out = Vec::new();
        for item in self.by_sha.scan_prefix(&prefix) {
            let (k, _) = item?;
            out.push(key_seq(&k[prefix.len()..]));
        }
        Ok(out)
    }

    /// Marks a job open.
    pub(super) fn mark(&self, job: u64) -> Result<()> {
        let key = job.to_be_bytes();
        if !self.open.contains_key(key)? {
            self.open.insert(key, &[])?;
        }
        Ok(())
    }

    /// Removes a job's open mark (settled, or its events were lost with a crash).
    pub fn unmark(&self, job: u64) -> Result<()> {
        let key = job.to_be_bytes();
        if self.open.contains_key(key)? {
            self.open.remove(key)?;
        }
        Ok(())
    }

    /// The jobs marked open (not settled) when their last event was appended.
    pub fn open_jobs(&self) -> Result<Vec<u64>> {
        self.open.iter().keys().map(|k| Ok(key_seq(&k?))).collect()
    }

    /// The format of what is derived and kept (0: older than the format mark).
    pub fn projection_format(&self) -> Result<u64> {
        Ok(self.db.get(PROJECTION_FORMAT)?.map_or(0, |v| key_seq(&v)))
    }

    /// Replaces the open marks by those of `jobs`, the fold of the whole log, and flushes.
    pub fn rewrite_marks(&self, jobs: &Jobs, is_open: &dyn Fn(&Job) -> bool) -> Result<()> {
        self.open.clear()?;
        for job in jobs.values() {
            if is_open(job) {
                self.mark(job.id)?;
            }
        }
        self.db.remove(PROJECTED_UPTO)?;
        self.db
            .insert(PROJECTION_FORMAT, &PROJECTION_VERSION.to_be_bytes())?;
        self.flush()
    }
}

/// The key of a job folder: `prefix/dir_id`.
pub fn folder_key(spec: &crate::domain::workitem::Spec) -> String {
    format!("{}/{}", spec.prefix, spec.dir_id)
}

/// The by_image key of a job: its image_id made safe (as its job folder's name is), so that
/// one index answers both by image_id and by job folder.
pub(super) fn image_key(image_id: &str, job: u64) -> Vec<u8> {
    let mut k = crate::domain::workitem::sanitise_id(image_id).into_bytes();
    k.push(0);
    k.extend_from_slice(&job.to_be_bytes());
    k
}

/// The key prefix of a content: a sha256 in hex as its 32 bytes (half the size: the index has
/// an entry per job), anything else as text ending in a 0 byte.
fn sha_prefix(sha256: &str) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let raw: Option<Vec<u8>> = (sha256.len() == 64)
        .then(|| {
            sha256
                .as_bytes()
                .chunks(2)
                .map(|p| Some(hex(p[0])? << 4 | hex(p[1])?))
                .collect()
        })
        .flatten();
    raw.unwrap_or_else(|| {
        let mut k = sha256.as_bytes().to_vec();
        k.push(0);
        k
    })
}

pub(super) fn sha_key(sha256: &str, job: u64) -> Vec<u8> {
    let mut k = sha_prefix(sha256);
    k.extend_from_slice(&job.to_be_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::super::tests::P;
    use super::*;

    #[test]
    fn image_index() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let inv = |id: &str| EventKind::Invalid {
            image_id: Some(id.into()),
            error: "e".into(),
            held_by: None,
            input: serde_json::json!({}).into(),
        };
        j.append(None, inv("a"), P).unwrap();
        j.append(None, inv("ab"), P).unwrap();
        j.append(None, inv("a"), P).unwrap();
        assert_eq!(j.jobs_for_image("a").unwrap(), vec![1, 3]);
        assert_eq!(
            j.open_jobs().unwrap(),
            vec![1, 2, 3],
            "answered, not delivered yet"
        );
        assert_eq!(j.jobs_for_image("ab").unwrap(), vec![2]);
        assert!(j.jobs_for_image("b").unwrap().is_empty());
    }
}
