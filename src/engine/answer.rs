//! Answering: the one place a job's answer is built (for its reply destination and for the
//! status push), and the one place it is sent and recorded as `delivered`.
//!
//! Invariants: an answer is built from the log alone (the input stored with the job's
//! `queued`/`invalid` event, the OUT fields from its fold), so it is the same however often it
//! is built; `delivered` is recorded only after the answerer of the job's reply destination
//! returned a receipt (a file written and fsynced, a message confirmed), and only then is the
//! input released. Sending again after a crash sends the same answer (a file is found in
//! place; a message goes out at least once).

use super::ports::{Answer, AnswerError, Answerer};
use super::store::Store;
use super::store::lock;
use super::{Engine, EngineError, Result};
use crate::config::WorkerConfig;
use crate::domain::event::Delivery;
use crate::domain::workitem;
use crate::domain::{EventKind, Job, Receipt, ReplyTo, Status};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The answerer of each reply destination, set by the daemon as the edges start.
#[derive(Default)]
pub struct Answerers(Mutex<HashMap<ReplyTo, Arc<dyn Answerer>>>);

impl Answerers {
    fn get(&self, to: ReplyTo) -> Option<Arc<dyn Answerer>> {
        lock(&self.0).get(&to).cloned()
    }
}

/// A job's answer: its input workitem with the OUT fields of the job as it stands. For the
/// BUILDING push (`building`), the URLs known before the build and no result.
pub fn answer(store: &Store, w: &WorkerConfig, job: &Job, building: bool) -> Result<Answer> {
    let input = store.input_value(job)?;
    let value = if building {
        let urls = match store.spec(job) {
            Ok(Some(spec)) => crate::imaging::planned_urls(w, &spec),
            _ => Default::default(),
        };
        workitem::reply_owned(input, None, None, &urls)
    } else {
        let mut v = workitem::reply_owned(input, job.result, job.error.as_deref(), &job.urls);
        if let (Some(false), Some(f)) = (job.result, job.failure) {
            workitem::set_failure(&mut v, f.as_str());
        }
        v
    };
    Ok(Answer::new(value))
}

/// The answer as the push utility gets it for `status`.
pub fn push_bytes(store: &Store, w: &WorkerConfig, job: &Job, status: Status) -> Result<Vec<u8>> {
    Ok(answer(store, w, job, status == Status::Building)?.into_push_bytes())
}

impl Engine {
    /// Connects (Some) or disconnects (None) the answerer of a reply destination. A job whose
    /// destination has no answerer waits (its delivery is tried again later).
    pub fn set_answerer(&self, to: ReplyTo, answerer: Option<Arc<dyn Answerer>>) {
        let mut map = lock(&self.answerers.0);
        match answerer {
            Some(a) => map.insert(to, a),
            None => map.remove(&to),
        };
    }

    /// Sends a job's answer (with `copy`: the answer for that re-drop of the job) through the
    /// answerer of the reply destination, records `delivered` with its receipt, and releases
    /// the input it answers.
    pub(crate) fn deliver(&self, job: &Job, copy: Option<&str>) -> Result<Receipt> {
        let to = match copy {
            None => job.reply_to(),
            Some(file) => job
                .copies
                .iter()
                .find(|c| c.file == file)
                .map_or(job.reply_to(), |c| c.origin.reply_to()),
        };
        let answerer = self.answerers.get(to).ok_or_else(|| {
            EngineError::Deferred(format!("no answerer for the {to} is connected"))
        })?;
        let answer = answer(&self.store, &self.cfg.worker, job, false)?;
        let receipt = answerer.send(job, copy, &answer).map_err(|e| match e {
            AnswerError::Later(why) => EngineError::Deferred(why),
            AnswerError::Failed(why) => EngineError::Port(super::ports::PortError::new(why)),
        })?;
        drop(answer);
        self.store.record(
            Some(job.id),
            EventKind::Delivered(Delivery {
                receipt: receipt.clone(),
                copy: copy.map(str::to_string),
            }),
        )?;
        // The input answered leaves (an answer sent again for a job answered before has none).
        let input = match copy {
            Some(file) => Some(file),
            None if !job.state.is_answered() => job.file.as_deref(),
            None => None,
        };
        if let Some(name) = input {
            self.inputs.release(name)?;
        }
        Ok(receipt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testkit::Rig;
    use serde_json::json;

    #[test]
    fn the_answer_is_the_input_with_the_out_fields() {
        let rig = Rig::new();
        let id = rig.drop_and_take("a.json", &rig.workitem("a-1"));
        let job = rig.engine.store.job(id).unwrap();
        let building = answer(&rig.engine.store, &rig.engine.cfg.worker, &job, true).unwrap();
        let v = building.value();
        assert_eq!(v["image"]["image_id"], json!("a-1"));
        assert!(v["image"]["files_url"].as_str().unwrap().ends_with("/a-1"));
        assert!(v.get("result").is_none() || v["result"].is_null());
        let bytes = building.to_bytes();
        assert_eq!(bytes.last(), Some(&b'\n'));
        let back: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(&back, v);
        let push = push_bytes(
            &rig.engine.store,
            &rig.engine.cfg.worker,
            &job,
            Status::Building,
        );
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&push.unwrap()).unwrap(),
            back
        );
    }

    #[test]
    fn a_destination_without_an_answerer_waits() {
        let rig = Rig::new();
        rig.engine.set_answerer(ReplyTo::Outbox, None);
        let id = rig.drop_and_take("b.json", &json!({"not": "a workitem"}));
        let job = rig.engine.store.job(id).unwrap();
        assert_eq!(job.state, crate::domain::State::Finished, "{job:?}");
        let e = rig.engine.deliver(&job, None).unwrap_err();
        assert!(matches!(e, EngineError::Deferred(_)), "{e}");
        assert!(rig.engine.inputs.holds("b.json"), "the input stays held");
        rig.connect_outbox();
        let r = rig.engine.deliver(&job, None).unwrap();
        assert_eq!(r.outbox_name(), Some("b.json"));
        assert!(!rig.engine.inputs.holds("b.json"), "released once answered");
        let job = rig.engine.store.job(id).unwrap();
        assert_eq!(job.receipt, Some(r));
        assert_eq!(job.state, crate::domain::State::Error);
    }
}
