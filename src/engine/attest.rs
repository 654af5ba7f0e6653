//! A successful build's provenance: `provenance.json` (and with `[artifacts] sign_key` its DSSE
//! envelope, `provenance.intoto.jsonl`) written in the job folder after the builder sealed the
//! build's files and before `finished` is recorded; `provenance_url` in the build's URLs.
//!
//! Invariant: the statement is made of what the build already knows (the sealed files' hashes,
//! the kickstart's hash and repos taken when it was written, the builder's cached host facts):
//! no image is read again. A statement that cannot be written (or signed) fails the build as
//! the infrastructure's fault: an image without its provenance is not answered as a success.

use super::Engine;
use crate::artifacts::dsse;
use crate::artifacts::key::SignKey;
use crate::artifacts::provenance::{self, Facts, PROVENANCE_FILE};
use crate::domain::Failure;
use crate::domain::workitem::Spec;
use crate::imaging::{BuildEnd, Prepared, url_for};
use std::sync::OnceLock;
use std::time::SystemTime;

/// `[artifacts] sign_key`, loaded at the first signature (the daemon's start checked it).
#[derive(Default)]
pub struct Attest {
    key: OnceLock<Result<Option<SignKey>, String>>,
}

impl Engine {
    fn sign_key(&self) -> Result<Option<SignKey>, String> {
        self.attest
            .key
            .get_or_init(|| {
                crate::artifacts::key::sign_key(&self.cfg.artifacts).map_err(|e| e.to_string())
            })
            .clone()
    }

    /// `end` with the provenance written: a success gets its `provenance_url`; a success whose
    /// statement cannot be written becomes an infrastructure failure; anything else is kept.
    pub(super) fn attest(
        &self,
        id: u64,
        spec: &Spec,
        prepared: &Prepared,
        started: SystemTime,
        end: BuildEnd,
    ) -> BuildEnd {
        let BuildEnd::Finished {
            result: true,
            error: None,
            mut urls,
            failure: None,
        } = end
        else {
            return end;
        };
        match self.write_provenance(id, spec, prepared, started) {
            Ok(url) => {
                urls.provenance_url = url;
                BuildEnd::Finished {
                    result: true,
                    error: None,
                    urls,
                    failure: None,
                }
            }
            Err(e) => {
                let _ = prepared.log().line(&format!("error: {e}"));
                BuildEnd::Finished {
                    result: false,
                    error: Some(e),
                    urls,
                    failure: Some(Failure::Infrastructure),
                }
            }
        }
    }

    fn write_provenance(
        &self,
        id: u64,
        spec: &Spec,
        prepared: &Prepared,
        started: SystemTime,
    ) -> Result<Option<String>, String> {
        let Some(sealed) = prepared.sealed() else {
            return Err("the build's files were not hashed: no provenance".into());
        };
        let host = self.builder.host_facts(prepared);
        let packages = prepared.packages(&spec.name)?;
        let facts = Facts {
            spec,
            kickstart: prepared.kickstart_sha256(),
            repos: prepared.repos(),
            files: &sealed.files,
            packages,
            host: &host,
            worker: &self.worker,
            job: id,
            started,
            finished: SystemTime::now(),
        };
        let bytes = provenance::render(&provenance::statement(&facts));
        let key = self
            .sign_key()
            .map_err(|e| format!("cannot sign the provenance: {e}"))?;
        // the envelope first (or an earlier attempt's removed, when no key signs now): a
        // statement never stands beside a signature that is not of it
        match &key {
            Some(key) => {
                let line = dsse::render(&dsse::sign(&bytes, key));
                prepared.write_file(dsse::ENVELOPE_FILE, &line)?;
            }
            None => prepared.remove_file(dsse::ENVELOPE_FILE)?,
        }
        let path = prepared.write_file(PROVENANCE_FILE, &bytes)?;
        let _ = prepared.log().line(&format!(
            "provenance: {}{}",
            path.display(),
            key.map(|k| format!(", signed by {} ({})", k.path.display(), k.fingerprint))
                .unwrap_or_default()
        ));
        Ok(url_for(&self.cfg.worker, &path))
    }
}
