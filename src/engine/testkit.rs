//! For the engine's unit tests: an engine over a temporary folder, with a real log, the real
//! native builder running the mic stand-in (tests/fixtures/mic), inputs held in a plain folder
//! and answers written to another: enough of an edge to drive each step, and nothing the edges
//! themselves are (their own tests cover them).

use super::ports::{Answer, AnswerError, Answerer, Held, InputRead, Inputs, PortError, PortResult};
use super::store::Store;
use super::{Engine, Parts};
use crate::config::Config;
use crate::domain::origin::{Body, Submission};
use crate::domain::{Job, Origin, Receipt, ReplyTo};
use crate::process::Registry;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Inputs held as files of one folder; bodies kept as `.kept-N.json`.
pub struct DirInputs {
    dir: PathBuf,
    rejected: PathBuf,
    n: AtomicU64,
}

impl Inputs for DirInputs {
    fn read(&self, name: &str, max_bytes: u64) -> InputRead {
        let path = self.dir.join(name);
        let unreadable = |why: &str| InputRead {
            name: name.to_string(),
            unreadable: Some(why.to_string()),
            ..InputRead::default()
        };
        match std::fs::symlink_metadata(&path) {
            Ok(m) if !m.is_file() => return unreadable("not a regular file"),
            Ok(m) if m.len() > max_bytes => return unreadable("too big"),
            Err(e) => return unreadable(&e.to_string()),
            Ok(_) => {}
        }
        match std::fs::read(&path) {
            Ok(bytes) => InputRead {
                name: name.to_string(),
                sha256: crate::digest::sha256_hex(&bytes),
                bytes,
                unreadable: None,
            },
            Err(e) => unreadable(&e.to_string()),
        }
    }

    fn keep(&self, _origin: &Origin, bodies: &[&[u8]]) -> PortResult<Vec<String>> {
        let mut names = Vec::new();
        for b in bodies {
            let name = format!(".kept-{}.json", self.n.fetch_add(1, Ordering::Relaxed));
            std::fs::write(self.dir.join(&name), b)
                .map_err(|e| PortError::from_io(format!("cannot keep {name}: {e}"), &e))?;
            names.push(name);
        }
        Ok(names)
    }

    fn name_for(&self, _origin: &Origin) -> String {
        format!(".kept-{}.json", self.n.fetch_add(1, Ordering::Relaxed))
    }

    fn keep_named(&self, name: &str, body: &[u8]) -> PortResult<()> {
        std::fs::write(self.dir.join(name), body)
            .map_err(|e| PortError::from_io(format!("cannot keep {name}: {e}"), &e))
    }

    fn release(&self, name: &str) -> PortResult<()> {
        match std::fs::remove_file(self.dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(PortError::new(format!("cannot remove {name}: {e}")))
            }
            _ => Ok(()),
        }
    }

    fn reject(&self, name: &str, reason: &str) -> PortResult<String> {
        std::fs::write(self.rejected.join(format!("{name}.reason")), reason)
            .and_then(|()| std::fs::rename(self.dir.join(name), self.rejected.join(name)))
            .map_err(|e| PortError::new(format!("cannot reject {name}: {e}")))?;
        Ok(name.to_string())
    }

    fn holds(&self, name: &str) -> bool {
        self.dir.join(name).symlink_metadata().is_ok()
    }

    fn held(&self) -> PortResult<Vec<Held>> {
        let rd = std::fs::read_dir(&self.dir).map_err(|e| PortError::new(e.to_string()))?;
        Ok(rd
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .map(|name| Held {
                kept: name.starts_with(".kept-"),
                origin: Origin::Spool,
                name,
            })
            .collect())
    }
}

/// Answers written as `<input name>` into a folder.
pub struct DirAnswerer(PathBuf);

impl Answerer for DirAnswerer {
    fn send(&self, job: &Job, copy: Option<&str>, answer: &Answer) -> Result<Receipt, AnswerError> {
        let name = copy
            .map(str::to_string)
            .or_else(|| job.file.clone())
            .unwrap_or_else(|| format!("job-{}.json", job.id));
        let bytes = answer.to_bytes();
        crate::durable::write_atomic(&self.0.join(&name), &bytes, 0o644)
            .map_err(|e| AnswerError::Later(e.to_string()))?;
        Ok(Receipt::Outbox {
            name,
            sha256: Some(crate::digest::sha256_hex(&bytes)),
        })
    }
}

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub engine: Engine,
}

impl Rig {
    pub fn new() -> Rig {
        Rig::with(|_| {})
    }

    /// A rig whose config `f` changes first.
    pub fn with(f: impl FnOnce(&mut Config)) -> Rig {
        let dir = tempfile::tempdir().expect("a temp dir");
        let root = dir.path();
        for d in ["held", "outbox", "rejected", "base", "state", "tmp"] {
            std::fs::create_dir_all(root.join(d)).expect("a folder");
        }
        let mut cfg = Config::default();
        cfg.worker.base_dir = root.join("base");
        cfg.worker.base_url = "http://images.example/base".into();
        cfg.worker.img_tmp = root.join("tmp");
        cfg.worker.mic_path =
            Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mic"));
        cfg.worker.sudo = false;
        cfg.spool.min_age_ms = 60_000;
        cfg.spool.poll_interval_ms = 10;
        f(&mut cfg);
        let cfg = Arc::new(cfg);
        let store = Store::open(
            &root.join("state"),
            8 << 20,
            cfg.policy(),
            Duration::from_secs(5),
        )
        .expect("a log");
        let inputs = Arc::new(DirInputs {
            dir: root.join("held"),
            rejected: root.join("rejected"),
            n: AtomicU64::new(0),
        });
        let engine = Engine::new(Parts {
            builder: crate::imaging::builder(&cfg.worker),
            cfg,
            worker: "w1".into(),
            store: Arc::new(store),
            registry: Registry::none(),
            inputs,
            push: None,
            pushes: false,
        })
        .expect("an engine");
        let rig = Rig { dir, engine };
        rig.connect_outbox();
        rig
    }

    pub fn connect_outbox(&self) {
        self.engine.set_answerer(
            ReplyTo::Outbox,
            Some(Arc::new(DirAnswerer(self.outbox_dir()))),
        );
    }

    pub fn held_dir(&self) -> PathBuf {
        self.dir.path().join("held")
    }

    pub fn outbox_dir(&self) -> PathBuf {
        self.dir.path().join("outbox")
    }

    /// A valid workitem (old API, flat fields) with this image_id.
    pub fn workitem(&self, id: &str) -> Value {
        json!({
            "image": {
                "image_id": id,
                "kickstart": "# a kickstart\n",
                "image_type": "fs",
                "name": format!("img-{id}"),
                "arch": "i586",
            }
        })
    }

    /// Puts a workitem where inputs wait (as if a source had claimed it).
    pub fn put(&self, name: &str, w: &Value) {
        std::fs::write(
            self.held_dir().join(name),
            serde_json::to_vec(w).expect("json"),
        )
        .expect("an input");
    }

    /// Hands held inputs to the intake as claimed files.
    pub fn take(&self, names: &[&str]) {
        let subs = names
            .iter()
            .map(|n| Submission {
                origin: Origin::Spool,
                body: Body::Claimed(n.to_string()),
            })
            .collect();
        self.engine.submit(subs).expect("an intake");
    }

    /// `put` then `take` one input; returns its job.
    pub fn drop_and_take(&self, name: &str, w: &Value) -> u64 {
        self.put(name, w);
        self.take(&[name]);
        self.job_by_file(name).map(|j| j.id).expect("a job")
    }

    /// The newest job whose input had this name.
    pub fn job_by_file(&self, name: &str) -> Option<Job> {
        let jobs = self.engine.store.journal().ok()?.projections().ok()?;
        jobs.into_values()
            .rev()
            .find(|j| j.file.as_deref() == Some(name))
    }
}
