//! The intake: every source hands the engine its workitems here, as [`Submission`]s. Each
//! becomes a claim (`claimed`, or `duplicate` for a byte-identical re-drop of a job) and, once
//! read, a decision: not a workitem (`rejected`), `invalid`, a conflict over an image_id or a
//! job folder another job holds (`invalid` with `held_by`), or `queued` for a build.
//!
//! Invariants: the claims and decisions of a batch are made durable by one flush before
//! anything acts on them (group commit); intakes run one at a time, so the conflict checks of
//! one see every job accepted before it, whichever source it came from; an input that does not
//! parse and may still be being written (it did not arrive whole) is read again until its
//! content has stood still for `min_age_ms` before it is judged.

use super::ports::InputRead;
use super::store::lock;
use super::{Engine, EngineError, Result};
use crate::domain::lifecycle;
use crate::domain::origin::{Body, Submission};
use crate::domain::workitem::{self, Spec, WorkitemError};
use crate::domain::{EventKind, Input, Job, Origin};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The intake's own state.
#[derive(Default)]
pub struct Intake {
    /// One intake at a time (every source's): its conflict checks see every job accepted
    /// before.
    one: Mutex<()>,
    /// Claimed inputs that did not parse: the content seen and since when.
    settling: Mutex<HashMap<u64, (String, Instant)>>,
    /// Jobs a byte-identical re-drop was added to (for `run --once`).
    touched: Mutex<BTreeSet<u64>>,
    /// A source's word on whether a workitem was cancelled before it came (see
    /// [`Engine::set_cancelled_before`]).
    cancelled_before: Mutex<Option<CancelledBefore>>,
}

/// Says whether a workitem was cancelled before it came (Some: why): such a workitem is
/// queued and cancelled in one step, never built.
pub type CancelledBefore =
    std::sync::Arc<dyn Fn(&Origin, &serde_json::Value) -> Option<String> + Send + Sync>;

/// What a claimed input's content makes of its job.
enum Decision {
    Events(Vec<EventKind>),
    /// Not yet: the input may still be being written.
    Defer(String),
}

/// Jobs accepted earlier in the same batch (not yet visible through the indexes).
#[derive(Default)]
struct Batch {
    image_ids: HashMap<String, u64>,
    folders: HashMap<String, u64>,
}

/// One claimed input of a batch, with where it came from.
struct Claim {
    origin: Origin,
    read: InputRead,
    /// A body over `max_bytes` (its head read): its whole size, and why it is not built.
    too_big: Option<(u64, String)>,
}

impl Engine {
    /// Sets (None: removes) the source's word on workitems cancelled before they came: a
    /// workitem it names is recorded `queued`, `cancelled` and `finished` (result false,
    /// `cancelled`) in the intake's one flush, so no build slot ever starts it.
    pub fn set_cancelled_before(&self, check: Option<CancelledBefore>) {
        *lock(&self.intake.cancelled_before) = check;
    }

    /// Takes submissions: keeps the bodies handed over whole, records every claim and what
    /// each input is, with one flush for all, then moves the jobs forward. An error means the
    /// claims are not recorded (a source keeps its names and tries again; a body's source gets
    /// it back).
    pub fn submit(&self, submissions: Vec<Submission>) -> Result<()> {
        let one = lock(&self.intake.one);
        let mut round: Vec<Claim> = Vec::with_capacity(submissions.len());
        for s in submissions {
            let mut too_big = None;
            let read = match s.body {
                Body::TooBig {
                    head,
                    bytes,
                    sha256,
                } => {
                    let why = format!(
                        "the workitem is {bytes} bytes, over [spool] max_bytes = {} (its first {} bytes are kept in rejected/)",
                        self.cfg.spool.max_bytes,
                        head.len()
                    );
                    // Answered (a fei): the head is the job's input, and a copy of it goes to
                    // rejected/ now; else the job is rejected and its input goes there.
                    let answered = workitem::fei_in_head(&head).is_some();
                    let copies: Vec<&[u8]> = if answered {
                        vec![&head, &head]
                    } else {
                        vec![&head]
                    };
                    let mut names = self.inputs.keep(&s.origin, &copies)?.into_iter();
                    let name = names.next().unwrap_or_default();
                    if let Some(copy) = names.next()
                        && let Err(e) = self.inputs.reject(&copy, &why)
                    {
                        log::warn!("cannot keep the head of a body too big in rejected/: {e}");
                    }
                    too_big = Some((bytes, why));
                    InputRead {
                        sha256,
                        name,
                        bytes: head,
                        unreadable: None,
                    }
                }
                Body::Claimed(name) => self.read_held(&name),
                Body::Bytes(bytes) => {
                    // Kept in the log only: the input of its `queued` or `invalid` event,
                    // made durable with its claim by the flush below, before the source acks
                    // it (issue 21: no file, no fsyncs of its own). A body that is rejected
                    // is kept as a file too: it goes to rejected/ with its reason.
                    let name = if rejected_whole(&bytes) {
                        let names = self.inputs.keep(&s.origin, &[&bytes])?;
                        names.into_iter().next().unwrap_or_default()
                    } else {
                        self.inputs.name_for(&s.origin)
                    };
                    InputRead {
                        sha256: crate::digest::sha256_hex(&bytes),
                        name,
                        bytes,
                        unreadable: None,
                    }
                }
            };
            round.push(Claim {
                origin: s.origin,
                read,
                too_big,
            });
        }
        let mut batch = Batch::default();
        let mut to_advance: Vec<u64> = Vec::new();
        let mut deferred: Vec<(u64, EngineError)> = Vec::new();
        let mut logged = Vec::new();
        while !round.is_empty() {
            // An input byte-identical to an earlier one of this batch waits for the next round,
            // when the earlier one's job can be found by its content.
            let mut seen = HashSet::new();
            let (now, later): (Vec<Claim>, Vec<Claim>) = round
                .into_iter()
                .partition(|c| c.read.sha256.is_empty() || seen.insert(c.read.sha256.clone()));
            round = later;
            let mut claims = Vec::new();
            let mut fresh = Vec::new();
            for c in now {
                let r = &c.read;
                match self.copy_of(&r.sha256) {
                    Some(of) => {
                        claims.push((
                            Some(of),
                            EventKind::Duplicate {
                                file: r.name.clone(),
                                worker: self.worker.clone(),
                                bytes: c.too_big.as_ref().map_or(r.bytes.len() as u64, |t| t.0),
                                sha256: r.sha256.clone(),
                                source: c.origin.source().map(str::to_string),
                            },
                        ));
                        fresh.push(None);
                    }
                    None => {
                        claims.push((
                            None,
                            EventKind::Claimed {
                                file: r.name.clone(),
                                worker: self.worker.clone(),
                                bytes: c.too_big.as_ref().map_or(r.bytes.len() as u64, |t| t.0),
                                sha256: r.sha256.clone(),
                                source: c.origin.source().map(str::to_string),
                            },
                        ));
                        fresh.push(Some(c));
                    }
                }
            }
            let evs = self.store.append(claims)?;
            let mut outcomes = Vec::new();
            for (ev, c) in evs.iter().zip(fresh) {
                to_advance.push(ev.job);
                let Some(c) = c else {
                    lock(&self.intake.touched).insert(ev.job);
                    continue;
                };
                let decided = match c.too_big {
                    Some((_, why)) => Ok(Decision::Events(vec![too_big(c.read, why)])),
                    None => self.decide(ev.job, &c.origin, c.read, &mut batch),
                };
                match decided {
                    Ok(Decision::Events(kinds)) => {
                        outcomes.extend(kinds.into_iter().map(|k| (Some(ev.job), k)))
                    }
                    Ok(Decision::Defer(why)) => deferred.push((ev.job, EngineError::Deferred(why))),
                    Err(e) => deferred.push((ev.job, e)),
                }
            }
            logged.extend(evs);
            logged.extend(self.store.append(outcomes)?);
        }
        self.store.sync()?;
        for ev in &logged {
            super::store::log_event(ev);
        }
        let stalled: HashSet<u64> = deferred.iter().map(|(id, _)| *id).collect();
        for (id, why) in &deferred {
            self.stall(*id, why);
        }
        drop(one);
        // Claims that did not queue a build (invalid, rejected) held a slot until now.
        self.slot_may_be_free();
        let mut seen = HashSet::new();
        to_advance.retain(|id| seen.insert(*id) && !stalled.contains(id));
        for id in to_advance {
            self.advance_or_stall(id);
        }
        Ok(())
    }

    /// `submit` of claimed inputs whose earlier intake failed: those recorded meanwhile (by a
    /// flush that covered them after all) are left out.
    pub fn submit_again(&self, origin: &Origin, names: &[String]) -> Result<()> {
        let held = self.held_names();
        let again = names
            .iter()
            .filter(|n| !held.contains(n.as_str()))
            .map(|n| Submission {
                origin: origin.clone(),
                body: Body::Claimed(n.clone()),
            })
            .collect();
        self.submit(again)
    }

    /// The inputs that live jobs hold (their own, unanswered; unanswered re-drops).
    pub(crate) fn held_names(&self) -> HashSet<String> {
        self.store.with_open(|jobs| {
            let mut held = HashSet::new();
            for job in jobs.values() {
                if lifecycle::is_live(job)
                    && !job.state.is_answered()
                    && let Some(f) = &job.file
                {
                    held.insert(f.clone());
                }
                for c in job.copies.iter().filter(|c| c.unanswered()) {
                    held.insert(c.file.clone());
                }
            }
            held
        })
    }

    /// Jobs a byte-identical re-drop was added to since the start.
    pub fn touched(&self) -> BTreeSet<u64> {
        lock(&self.intake.touched).clone()
    }

    /// Reads a held input, as the intake judges it (unreadable with the reason, never an error).
    pub(crate) fn read_held(&self, name: &str) -> InputRead {
        self.inputs.read(name, self.cfg.spool.max_bytes)
    }

    /// Reads a claimed job's input again (recovery, or after it was deferred) and records what
    /// that decides.
    pub(crate) fn read_input(&self, job: &Job) -> Result<()> {
        let file = job.file.as_deref().unwrap_or_default();
        if job.origin.arrives_whole() && !self.inputs.holds(file) {
            // A body kept in the log only, whose decision (appended after its claim, flushed
            // with it) a crash lost while another thread's flush had covered the claim: the
            // source never had it acknowledged and sends it again.
            self.store.record(
                Some(job.id),
                EventKind::Rejected {
                    file: file.to_string(),
                    reason: NEVER_ACKED.to_string(),
                },
            )?;
            return Ok(());
        }
        let read = self.read_held(file);
        match self.decide(job.id, &job.origin, read, &mut Batch::default())? {
            Decision::Events(kinds) => {
                self.store
                    .record_batch(kinds.into_iter().map(|k| (Some(job.id), k)).collect())?;
                Ok(())
            }
            Decision::Defer(why) => Err(EngineError::Deferred(why)),
        }
    }

    /// The job an input with this content would be a byte-identical re-drop of: the oldest job
    /// of this worker with that content whose input was read (valid or invalid).
    fn copy_of(&self, sha: &str) -> Option<u64> {
        if sha.is_empty() {
            return None;
        }
        let journal = self.store.journal().ok()?;
        let ids = journal.jobs_for_sha(sha).unwrap_or_else(|e| {
            log::error!("content index: {e}");
            Vec::new()
        });
        ids.into_iter().find(|id| {
            self.store.job(*id).is_some_and(|j| {
                j.input_seq.is_some()
                    && j.sha256.as_deref() == Some(sha)
                    && j.worker.as_deref() == Some(self.worker.as_str())
            })
        })
    }

    /// The job holding this image_id or this job folder, other than `me`: the oldest job
    /// accepted for building with it.
    fn holder(&self, me: u64, spec: &Spec, batch: &Batch) -> Option<(u64, &'static str)> {
        if let Some(j) = batch.image_ids.get(&spec.image_id) {
            return Some((*j, "image_id"));
        }
        let folder = crate::journal::folder_key(spec);
        if let Some(j) = batch.folders.get(&folder) {
            return Some((*j, "job folder"));
        }
        let journal = self.store.journal().ok()?;
        let accepted = |ids: std::result::Result<Vec<u64>, crate::journal::JournalError>| {
            ids.unwrap_or_else(|e| {
                log::error!("image index: {e}");
                Vec::new()
            })
            .into_iter()
            .find(|id| *id != me && self.store.job(*id).is_some_and(|j| j.accepted))
        };
        if let Some(j) = accepted(journal.jobs_for_image(&spec.image_id)) {
            return Some((j, "image_id"));
        }
        accepted(journal.jobs_for_folder(spec)).map(|j| (j, "job folder"))
    }

    /// Has this content of a claimed input changed within the last min_age (so it may still be
    /// being written)?
    fn still_settling(&self, id: u64, sha: &str) -> bool {
        let mut settling = lock(&self.intake.settling);
        let min_age = Duration::from_millis(self.cfg.spool.min_age_ms);
        match settling.get(&id) {
            Some((seen, since)) if seen == sha => {
                if since.elapsed() >= min_age {
                    settling.remove(&id);
                    false
                } else {
                    true
                }
            }
            _ => {
                settling.insert(id, (sha.to_string(), Instant::now()));
                true
            }
        }
    }

    /// What the content of a claimed input makes of job `id`: rejected (not a workitem),
    /// invalid, a conflict (another job holds its image_id or folder), or queued; or, while
    /// the input may still be being written, nothing yet. Records nothing.
    fn decide(
        &self,
        id: u64,
        origin: &Origin,
        read: InputRead,
        batch: &mut Batch,
    ) -> Result<Decision> {
        let file = read.name.as_str();
        let sha256 = read.sha256.clone();
        let reject = |reason: String| {
            Ok(Decision::Events(vec![EventKind::Rejected {
                file: file.to_string(),
                reason,
            }]))
        };
        if let Some(why) = &read.unreadable {
            return reject(format!("not a workitem: {why}"));
        }
        let value = match workitem::parse_object(&read.bytes) {
            Ok(v) => v,
            Err(e) => {
                // A writer that does not rename may still be writing (over NFS or FUSE the
                // size and mtime the claim relied on can be stale). A prefix of a JSON object
                // never parses, so read it again until its content has stood still for
                // min_age; only then is it not a workitem. An input that arrived whole is
                // judged at once.
                if !origin.arrives_whole() && self.still_settling(id, &read.sha256) {
                    return Ok(Decision::Defer(format!(
                        "{file} does not parse yet ({e}): reading it again in case it is still being written"
                    )));
                }
                return reject(e.to_string());
            }
        };
        lock(&self.intake.settling).remove(&id);
        let mut events = Vec::new();
        let job_sha = self.store.job(id).and_then(|j| j.sha256);
        if job_sha.as_deref() != Some(read.sha256.as_str()) {
            // It grew after the claim: record what is actually read.
            events.push(EventKind::Claimed {
                file: file.to_string(),
                worker: self.worker.clone(),
                bytes: read.bytes.len() as u64,
                sha256: read.sha256.clone(),
                source: origin.source().map(str::to_string),
            });
        }
        let normalised = workitem::normalise(&value);
        let raw_id = workitem::raw_image_id(&value);
        let check = lock(&self.intake.cancelled_before).clone();
        let cancelled = check.and_then(|c| c(origin, &value));
        drop(value);
        let file = file.to_string();
        let input = Input(read.bytes);
        match normalised {
            Ok(mut spec) => match self.holder(id, &spec, batch) {
                Some((holder, what)) => {
                    let desc = self
                        .store
                        .job(holder)
                        .map(|h| {
                            format!(
                                "job {holder} (file {}, {})",
                                h.file.as_deref().unwrap_or("?"),
                                h.state
                            )
                        })
                        .unwrap_or_else(|| format!("job {holder}"));
                    events.push(EventKind::Invalid {
                        image_id: Some(spec.image_id.clone()),
                        error: format!(
                            "conflict: the {what} of image_id {:?} ({}/{}) is held by {desc}; rebuilding an image is `build-image retry {holder}`",
                            spec.image_id, spec.prefix, spec.dir_id
                        ),
                        held_by: Some(holder),
                        input,
                    });
                }
                None => {
                    if cancelled.is_none() {
                        // Hosts sharing base_dir: the folder is claimed farm-wide.
                        let me = crate::imaging::jobdir::Owner {
                            worker: self.worker.clone(),
                            job: id,
                            sha256,
                        };
                        match crate::imaging::jobdir::claim_folder(&self.cfg.worker, &spec, &me) {
                            Ok(crate::imaging::jobdir::FolderClaim::Ours) => {}
                            Ok(crate::imaging::jobdir::FolderClaim::Held(o))
                                if o.sha256 == me.sha256
                                    && matches!(origin, Origin::Broker { .. }) =>
                            {
                                // The same message taken by two hosts (the farm queue's moving
                                // window): the holder's answer is this one's too (same fei).
                                // Its body, kept in the log only so far, goes to rejected/.
                                if !self.inputs.holds(&file) {
                                    self.inputs.keep_named(&file, &input.0)?;
                                }
                                events.push(EventKind::Rejected {
                                    file: file.clone(),
                                    reason: format!(
                                        "a byte-identical copy of the workitem of job {} on worker {}, which builds and answers it (the same fei): neither built nor answered here",
                                        o.job, o.worker
                                    ),
                                });
                                return Ok(Decision::Events(events));
                            }
                            Ok(crate::imaging::jobdir::FolderClaim::Held(o)) => {
                                events.push(EventKind::Invalid {
                                    image_id: Some(spec.image_id.clone()),
                                    error: format!(
                                        "conflict: the job folder of image_id {:?} ({}/{}) is held by worker {} (its job {}); rebuilding an image is `build-image retry {}` on {}",
                                        spec.image_id, spec.prefix, spec.dir_id, o.worker, o.job, o.job, o.worker
                                    ),
                                    held_by: None,
                                    input,
                                });
                                return Ok(Decision::Events(events));
                            }
                            Err(e) => log::warn!(
                                "job {id}: {e}; the build will say whether its folder can be made"
                            ),
                        }
                        batch.image_ids.insert(spec.image_id.clone(), id);
                        batch.folders.insert(crate::journal::folder_key(&spec), id);
                    }
                    // The kickstart is read from the stored input when a build needs it.
                    spec.kickstart = String::new();
                    let urls = crate::imaging::planned_urls(&self.cfg.worker, &spec);
                    events.push(EventKind::Queued {
                        image_id: spec.image_id.clone(),
                        spec: Box::new(spec),
                        input,
                    });
                    if let Some(reason) = cancelled {
                        events.push(EventKind::Cancelled { reason });
                        events.push(EventKind::Finished {
                            result: false,
                            error: Some("cancelled".into()),
                            urls,
                            failure: Some(crate::domain::Failure::Cancelled),
                            boot_seconds: None,
                        });
                    }
                }
            },
            Err(WorkitemError::NotAWorkitem(e)) => {
                return Ok(Decision::Events(vec![EventKind::Rejected {
                    file,
                    reason: e,
                }]));
            }
            Err(WorkitemError::Invalid(error)) => events.push(EventKind::Invalid {
                image_id: raw_id,
                error: format!("invalid workitem: {error}"),
                held_by: None,
                input,
            }),
        }
        Ok(Decision::Events(events))
    }
}

/// Why a claim of a body kept in the log only is rejected when its decision was lost.
pub(crate) const NEVER_ACKED: &str = "its message was never acknowledged (a crash lost the decision recorded with its claim): the source delivers it again";

/// Is this body, handed over whole, one that `decide` rejects (not a JSON object, or not a
/// workitem at all)? Such a body is kept as a file, for rejected/.
fn rejected_whole(bytes: &[u8]) -> bool {
    match workitem::parse_object(bytes) {
        Err(_) => true,
        Ok(v) => matches!(workitem::normalise(&v), Err(WorkitemError::NotAWorkitem(_))),
    }
}

/// What a body too big to be read whole makes of its job: an answer `result: false` saying
/// why, to the `fei` read from its head (invalid; the answer is that envelope with the OUT
/// fields), or, with no `fei` to answer, rejected.
fn too_big(read: InputRead, why: String) -> EventKind {
    match workitem::fei_in_head(&read.bytes) {
        Some(fei) => EventKind::Invalid {
            image_id: None,
            error: why,
            held_by: None,
            input: Input(
                serde_json::to_vec(&serde_json::json!({"fei": fei, "fields": {}}))
                    .unwrap_or_default(),
            ),
        },
        None => EventKind::Rejected {
            file: read.name,
            reason: format!("not a workitem that can be answered: {why}, and no fei in its head"),
        },
    }
}

#[cfg(test)]
mod tests {
    use crate::domain::State;
    use crate::engine::testkit::Rig;
    use serde_json::json;

    #[test]
    fn a_batch_is_claimed_decided_and_flushed_together() {
        let rig = Rig::new();
        rig.put("ok.json", &rig.workitem("i-1"));
        rig.put("bad.json", &json!({"image": {"name": "x"}}));
        std::fs::write(rig.held_dir().join("junk.json"), b"not json at all").unwrap();
        rig.take(&["ok.json", "bad.json", "junk.json"]);
        let state = |f: &str| rig.job_by_file(f).map(|j| j.state);
        assert_eq!(state("ok.json"), Some(State::Queued));
        // invalid: answered at once (no build)
        assert_eq!(state("bad.json"), Some(State::Error));
        // an input that arrived whole is judged at once; a dropped file is read again first
        assert_eq!(state("junk.json"), Some(State::Claimed));
        // every claim and decision is durable (only the answer's `delivered` may ride on a
        // later flush)
        let journal = rig.engine.store.journal().unwrap();
        let durable = journal.durable_seq();
        for ev in journal.since(0) {
            let ev = ev.unwrap();
            if !matches!(ev.kind, crate::domain::EventKind::Delivered(_)) {
                assert!(ev.seq <= durable, "{ev:?} above {durable}");
            }
        }
    }

    #[test]
    fn same_image_id_twice_in_one_batch_is_a_conflict_with_the_first() {
        let rig = Rig::new();
        rig.put("a.json", &rig.workitem("same"));
        let mut other = rig.workitem("same");
        other["image"]["name"] = json!("other-name");
        rig.put("b.json", &other);
        rig.take(&["a.json", "b.json"]);
        let a = rig.job_by_file("a.json").unwrap();
        let b = rig.job_by_file("b.json").unwrap();
        assert_eq!(a.state, State::Queued);
        assert_eq!(b.held_by, Some(a.id));
        assert!(b.error.unwrap().contains("conflict"));
    }

    #[test]
    fn a_byte_identical_redrop_is_a_duplicate_of_the_job() {
        let rig = Rig::new();
        let w = rig.workitem("dup");
        rig.put("a.json", &w);
        rig.put("a-again.json", &w);
        rig.take(&["a.json", "a-again.json"]);
        let a = rig.job_by_file("a.json").unwrap();
        assert_eq!(a.copies.len(), 1, "{a:?}");
        assert_eq!(a.copies[0].file, "a-again.json");
        assert!(rig.engine.touched().contains(&a.id));
        assert!(
            rig.job_by_file("a-again.json").is_none(),
            "no job of its own"
        );
    }

    #[test]
    fn a_body_handed_over_whole_is_kept_and_claimed_with_its_origin() {
        let rig = Rig::new();
        let origin = crate::domain::Origin::Broker {
            source: Some("a queue".into()),
        };
        rig.engine
            .submit(vec![crate::domain::origin::Submission {
                origin: origin.clone(),
                body: crate::domain::origin::Body::Bytes(b"{ not json".to_vec()),
            }])
            .unwrap();
        let jobs = rig.engine.store.journal().unwrap().projections().unwrap();
        let job = jobs.values().next().unwrap();
        assert_eq!(job.origin, origin);
        // whole: rejected at once, not read again
        assert_eq!(job.state, State::Rejected, "{job:?}");
    }

    #[test]
    fn a_workitem_handed_over_whole_lives_in_the_log_only() {
        let rig = Rig::new();
        let origin = crate::domain::Origin::Broker {
            source: Some("q".into()),
        };
        let w = rig.workitem("b-1");
        let body = serde_json::to_vec(&w).unwrap();
        rig.engine
            .submit(vec![crate::domain::origin::Submission {
                origin,
                body: crate::domain::origin::Body::Bytes(body),
            }])
            .unwrap();
        let journal = rig.engine.store.journal().unwrap();
        let job = journal.projections().unwrap().into_values().next().unwrap();
        assert!(
            matches!(job.state, State::Queued | State::Building | State::Done),
            "{job:?}"
        );
        // no file of its own: its input is the log's, durable with the claim
        let files: Vec<_> = std::fs::read_dir(rig.held_dir()).unwrap().collect();
        assert!(files.is_empty(), "{files:?}");
        assert!(journal.durable_seq() >= job.input_seq.unwrap());
        assert_eq!(journal.input(job.id).unwrap(), Some(w));
    }

    #[test]
    fn a_whole_bodys_claim_whose_decision_was_lost_is_rejected_as_never_acked() {
        let rig = Rig::new();
        let origin = crate::domain::Origin::Broker {
            source: Some("q".into()),
        };
        // the claim alone reached the log (another thread's flush), its decision did not
        let evs = rig
            .engine
            .store
            .record_batch(vec![(
                None,
                crate::domain::EventKind::Claimed {
                    file: ".broker-1-0.json".into(),
                    worker: "w1".into(),
                    bytes: 2,
                    sha256: crate::digest::sha256_hex(b"{}"),
                    source: origin.source().map(str::to_string),
                },
            )])
            .unwrap();
        let id = evs[0].job;
        let job = rig.engine.store.job(id).unwrap();
        assert_eq!(job.state, State::Claimed, "{job:?}");
        rig.engine.advance(id).unwrap();
        let job = rig.engine.store.job(id).unwrap();
        assert_eq!(job.state, State::Rejected, "{job:?}");
        assert_eq!(job.reason.as_deref(), Some(super::NEVER_ACKED));
    }
}
