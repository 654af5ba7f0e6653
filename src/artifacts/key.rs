//! The keys of `[artifacts]`: `sign_key` (an OpenSSH ed25519 private key file, unencrypted)
//! signs a build's provenance; `verify_key` (an OpenSSH public key file), or the sign key's
//! public half, checks it.
//!
//! Invariant: a key is read with the `ssh-key` crate and used with `ed25519-dalek`; a key that
//! is not ed25519, or is encrypted (never decrypted: the daemon has no one to ask for a
//! passphrase), is an error that names the key file. The key id is the key's OpenSSH SHA256
//! fingerprint (`SHA256:…`, as `ssh-keygen -l` prints it).

use ed25519_dalek::{SigningKey, VerifyingKey};
use ssh_key::{HashAlg, PrivateKey, PublicKey};
use std::path::{Path, PathBuf};

/// Why a key of `[artifacts]` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what} {}: cannot read it as an OpenSSH {kind} key: {message}", path.display())]
    Read {
        what: &'static str,
        kind: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error(
        "{what} {}: the key is encrypted; the daemon signs unattended and never asks for a \
         passphrase: give it an unencrypted ed25519 key (ssh-keygen -t ed25519 -N '')",
        path.display()
    )]
    Encrypted { what: &'static str, path: PathBuf },
    #[error(
        "{what} {}: the key is {algorithm}, not ed25519 (ssh-keygen -t ed25519 -N '' makes one)",
        path.display()
    )]
    NotEd25519 {
        what: &'static str,
        path: PathBuf,
        algorithm: String,
    },
}

/// The config key a sign key comes from, as errors name it.
pub const SIGN_KEY: &str = "[artifacts] sign_key";
/// The config key a verify key comes from, as errors name it.
pub const VERIFY_KEY: &str = "[artifacts] verify_key";

/// The private key that signs provenance.
#[derive(Clone)]
pub struct SignKey {
    pub path: PathBuf,
    signing: SigningKey,
    /// `SHA256:…` of the public key.
    pub fingerprint: String,
}

impl std::fmt::Debug for SignKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignKey")
            .field("path", &self.path)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl SignKey {
    /// Reads an OpenSSH private key file: ed25519 and unencrypted, else an error naming it.
    /// `what` says where the path came from (e.g. [`SIGN_KEY`]).
    pub fn load(what: &'static str, path: &Path) -> Result<SignKey, KeyError> {
        let key = PrivateKey::read_openssh_file(path).map_err(|e| KeyError::Read {
            what,
            kind: "private",
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if key.is_encrypted() {
            return Err(KeyError::Encrypted {
                what,
                path: path.to_path_buf(),
            });
        }
        let Some(pair) = key.key_data().ed25519() else {
            return Err(KeyError::NotEd25519 {
                what,
                path: path.to_path_buf(),
                algorithm: key.algorithm().to_string(),
            });
        };
        Ok(SignKey {
            path: path.to_path_buf(),
            signing: SigningKey::from(&pair.private),
            fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
        })
    }

    /// The signature of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer;
        self.signing.sign(message).to_bytes()
    }

    /// The public half.
    pub fn verify_key(&self) -> VerifyKey {
        VerifyKey {
            path: self.path.clone(),
            key: self.signing.verifying_key(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

/// A public key that checks provenance signatures.
#[derive(Debug, Clone)]
pub struct VerifyKey {
    /// The file it was read from (for a sign key's public half, the private key's file).
    pub path: PathBuf,
    key: VerifyingKey,
    /// `SHA256:…`.
    pub fingerprint: String,
}

impl VerifyKey {
    /// Reads an OpenSSH public key file (`ssh-ed25519 AAAA… comment`): ed25519, else an error
    /// naming it.
    pub fn load(what: &'static str, path: &Path) -> Result<VerifyKey, KeyError> {
        let key = PublicKey::read_openssh_file(path).map_err(|e| KeyError::Read {
            what,
            kind: "public",
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let not_ed25519 = || KeyError::NotEd25519 {
            what,
            path: path.to_path_buf(),
            algorithm: key.algorithm().to_string(),
        };
        let ed = key.key_data().ed25519().ok_or_else(not_ed25519)?;
        let vk = VerifyingKey::try_from(ed).map_err(|_| not_ed25519())?;
        Ok(VerifyKey {
            path: path.to_path_buf(),
            key: vk,
            fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
        })
    }

    /// Whether `sig` is this key's signature of `message` (strict ed25519 verification).
    pub fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        let Ok(sig) = ed25519_dalek::Signature::from_slice(sig) else {
            return false;
        };
        self.key.verify_strict(message, &sig).is_ok()
    }
}

/// The sign key `[artifacts] sign_key` names, loaded; None when it names none.
pub fn sign_key(cfg: &crate::config::ArtifactsConfig) -> Result<Option<SignKey>, KeyError> {
    cfg.sign_key
        .as_deref()
        .map(|p| SignKey::load(SIGN_KEY, p))
        .transpose()
}

/// The key that checks signatures: `--key FILE.pub` when given, else `[artifacts] verify_key`,
/// else the public half of `[artifacts] sign_key`; None when there is none of them.
pub fn verify_key(
    cfg: &crate::config::ArtifactsConfig,
    given: Option<&Path>,
) -> Result<Option<VerifyKey>, KeyError> {
    if let Some(p) = given {
        return VerifyKey::load("--key", p).map(Some);
    }
    if let Some(p) = &cfg.verify_key {
        return VerifyKey::load(VERIFY_KEY, p).map(Some);
    }
    Ok(sign_key(cfg)?.map(|k| k.verify_key()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn keygen(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
        let path = dir.join(name);
        let out = Command::new("ssh-keygen")
            .args(args)
            .args(["-q", "-C", "test", "-f"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        path
    }

    #[test]
    fn an_ed25519_key_signs_and_its_public_file_verifies() {
        let d = tempfile::tempdir().unwrap();
        let p = keygen(d.path(), "k", &["-t", "ed25519", "-N", ""]);
        let k = SignKey::load(SIGN_KEY, &p).unwrap();
        let fp = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(&p)
            .output()
            .unwrap();
        let fp = String::from_utf8(fp.stdout).unwrap();
        assert!(fp.contains(&k.fingerprint), "{fp} vs {}", k.fingerprint);
        assert!(k.fingerprint.starts_with("SHA256:"));
        let sig = k.sign(b"hello");
        let public = VerifyKey::load(VERIFY_KEY, &p.with_extension("pub")).unwrap();
        assert_eq!(public.fingerprint, k.fingerprint);
        assert!(public.verifies(b"hello", &sig));
        assert!(!public.verifies(b"hellp", &sig));
        assert!(k.verify_key().verifies(b"hello", &sig));
        let other = keygen(d.path(), "o", &["-t", "ed25519", "-N", ""]);
        let other = VerifyKey::load(VERIFY_KEY, &other.with_extension("pub")).unwrap();
        assert!(!other.verifies(b"hello", &sig));
    }

    #[test]
    fn rsa_encrypted_and_unreadable_keys_are_refused_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let rsa = keygen(d.path(), "rsa", &["-t", "rsa", "-b", "2048", "-N", ""]);
        let e = SignKey::load(SIGN_KEY, &rsa).unwrap_err().to_string();
        assert!(e.contains(&rsa.display().to_string()), "{e}");
        assert!(e.contains("not ed25519"), "{e}");
        let e = VerifyKey::load(VERIFY_KEY, &rsa.with_extension("pub"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not ed25519"), "{e}");
        let enc = keygen(d.path(), "enc", &["-t", "ed25519", "-N", "secret"]);
        let e = SignKey::load(SIGN_KEY, &enc).unwrap_err().to_string();
        assert!(e.contains(&enc.display().to_string()), "{e}");
        assert!(e.contains("encrypted"), "{e}");
        let missing = d.path().join("none");
        let e = SignKey::load(SIGN_KEY, &missing).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{SIGN_KEY} {}", missing.display())),
            "{e}"
        );
    }
}
