//! Worker identity: ed25519 keys. A worker signs each update record; the run spec lists the
//! public keys it admits, so the coordinator can tell an admitted worker from anyone else who can
//! write to the store.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    #[error("bad public key `{0}`: expected 64 hex digits")]
    Public(String),
}

/// A worker's secret key, stored as 64 hex digits in a file only the worker reads.
#[derive(Clone)]
pub struct WorkerKey {
    key: SigningKey,
}

impl WorkerKey {
    pub fn generate() -> WorkerKey {
        WorkerKey { key: SigningKey::from_bytes(&rand::random::<[u8; 32]>()) }
    }

    pub fn load(path: &std::path::Path) -> Result<WorkerKey, KeyError> {
        let file = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| KeyError::File { file: file.clone(), reason: e.to_string() })?;
        WorkerKey::from_hex(&text, &file)
    }

    /// A key from its 64 hex digits; `source` names where they came from in errors.
    pub fn from_hex(text: &str, source: &str) -> Result<WorkerKey, KeyError> {
        let bytes: [u8; 32] = hex::decode(text.trim()).ok().and_then(|b| b.try_into().ok()).ok_or_else(|| {
            KeyError::File { file: source.into(), reason: "expected 64 hex digits (an ed25519 secret key)".into() }
        })?;
        Ok(WorkerKey { key: SigningKey::from_bytes(&bytes) })
    }

    /// Writes the secret key (mode 0600), refusing to overwrite an existing file.
    pub fn save(&self, path: &std::path::Path) -> Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let file = path.display().to_string();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| KeyError::File { file: file.clone(), reason: e.to_string() })?;
        f.write_all(hex::encode(self.key.to_bytes()).as_bytes())
            .map_err(|e| KeyError::File { file, reason: e.to_string() })
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    pub fn sign(&self, message: &[u8]) -> String {
        hex::encode(self.key.sign(message).to_bytes())
    }
}

/// Whether `signature` (hex) is `public` (hex)'s signature of `message`.
pub fn verify(public: &str, message: &[u8], signature: &str) -> Result<bool, KeyError> {
    let pk: [u8; 32] =
        hex::decode(public).ok().and_then(|b| b.try_into().ok()).ok_or_else(|| KeyError::Public(public.into()))?;
    let pk = VerifyingKey::from_bytes(&pk).map_err(|_| KeyError::Public(public.into()))?;
    let Some(sig) = hex::decode(signature).ok().and_then(|b| <[u8; 64]>::try_from(b).ok()) else { return Ok(false) };
    Ok(pk.verify(message, &Signature::from_bytes(&sig)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_reject_tampering() {
        let k = WorkerKey::generate();
        let sig = k.sign(b"round 3");
        assert!(verify(&k.public_hex(), b"round 3", &sig).unwrap());
        assert!(!verify(&k.public_hex(), b"round 4", &sig).unwrap());
        assert!(!verify(&WorkerKey::generate().public_hex(), b"round 3", &sig).unwrap());
        assert!(!verify(&k.public_hex(), b"round 3", "00").unwrap());
        assert!(verify("zz", b"x", &sig).is_err());
    }
}
