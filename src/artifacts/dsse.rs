//! The DSSE envelope of a build's statement (`provenance.intoto.jsonl`, one JSON line): the
//! payload is the exact bytes of `provenance.json`, signed over DSSE's pre-authentication
//! encoding with `[artifacts] sign_key`; base64 is standard with padding (`base64ct`).
//!
//! Invariant: what is signed is PAE(payloadType, payload) of the bytes written to the
//! statement's file, never a re-serialisation of it.

use super::key::{SignKey, VerifyKey};
use base64ct::{Base64, Encoding};
use serde::{Deserialize, Serialize};

/// The envelope's file in a job folder.
pub const ENVELOPE_FILE: &str = "provenance.intoto.jsonl";
/// The payload type of an in-toto statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// base64 of the statement's bytes.
    pub payload: String,
    pub payload_type: String,
    pub signatures: Vec<Signature>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    /// The key's OpenSSH SHA256 fingerprint.
    #[serde(default)]
    pub keyid: String,
    /// base64 of the ed25519 signature.
    pub sig: String,
}

/// DSSE v1's pre-authentication encoding:
/// `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, lengths in ASCII decimal.
pub fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The envelope of `statement` (the bytes of `provenance.json`) signed with `key`.
pub fn sign(statement: &[u8], key: &SignKey) -> Envelope {
    let sig = key.sign(&pae(PAYLOAD_TYPE, statement));
    Envelope {
        payload: Base64::encode_string(statement),
        payload_type: PAYLOAD_TYPE.into(),
        signatures: vec![Signature {
            keyid: key.fingerprint.clone(),
            sig: Base64::encode_string(&sig),
        }],
    }
}

/// The envelope as the one line of `provenance.intoto.jsonl` (ending in a newline).
pub fn render(e: &Envelope) -> Vec<u8> {
    // plain strings: serialising cannot fail
    let mut out = serde_json::to_vec(e).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Why an envelope does not vouch for its payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("the envelope is not DSSE JSON: {0}")]
    Malformed(String),
    #[error("the envelope's payload type is {0:?}, not {PAYLOAD_TYPE}")]
    PayloadType(String),
    #[error("signed by another key (fingerprint {found}; the key given is {expected})")]
    OtherKey { found: String, expected: String },
    #[error("signature does not match (the statement or its signature was changed)")]
    BadSignature,
}

/// Reads an envelope line and checks it with `key`: the payload's bytes when a signature by
/// `key` matches them.
pub fn open(line: &[u8], key: &VerifyKey) -> Result<Vec<u8>, Rejected> {
    let e: Envelope =
        serde_json::from_slice(line).map_err(|err| Rejected::Malformed(err.to_string()))?;
    if e.payload_type != PAYLOAD_TYPE {
        return Err(Rejected::PayloadType(e.payload_type));
    }
    let payload = Base64::decode_vec(&e.payload)
        .map_err(|err| Rejected::Malformed(format!("payload: {err}")))?;
    let message = pae(&e.payload_type, &payload);
    let mut others = Vec::new();
    for s in &e.signatures {
        let Ok(sig) = Base64::decode_vec(&s.sig) else {
            continue;
        };
        if key.verifies(&message, &sig) {
            return Ok(payload);
        }
        if s.keyid != key.fingerprint {
            others.push(s.keyid.clone());
        }
    }
    if !others.is_empty() && others.len() == e.signatures.len() {
        return Err(Rejected::OtherKey {
            found: others.join(", "),
            expected: key.fingerprint.clone(),
        });
    }
    Err(Rejected::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_is_dsse_v1() {
        // the DSSE specification's own example
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ".to_vec());
    }
}
