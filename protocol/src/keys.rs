//! Ed25519 keys: PKCS#8 / SPKI PEM text, key ids, and key rings of trusted public keys.
//!
//! Pure text in, text out: reading and writing key files (with the right permissions) is the
//! business of the binaries.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ed25519_dalek::pkcs8::{
    spki::der::pem::LineEnding, DecodePrivateKey, DecodePublicKey, EncodePrivateKey,
    EncodePublicKey,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use ed25519_dalek::{SigningKey, VerifyingKey};

/// Identifies a public key: hex of the first 8 bytes of SHA-256 over the 32 raw key bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId([u8; 8]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a key id (16 hex characters)")]
pub struct KeyIdParseError(String);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> KeyId {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }
}

impl FromStr for KeyId {
    type Err = KeyIdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut id = [0u8; 8];
        if s.len() != 16 || hex::decode_to_slice(s, &mut id).is_err() {
            return Err(KeyIdParseError(s.chars().take(40).collect()));
        }
        Ok(KeyId(id))
    }
}

impl TryFrom<String> for KeyId {
    type Error = KeyIdParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<KeyId> for String {
    fn from(id: KeyId) -> String {
        id.to_string()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// Why key text could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "not an Ed25519 private key in PKCS#8 PEM form (\"-----BEGIN PRIVATE KEY-----\"): {0}"
    )]
    BadPrivateKey(String),
    #[error("not an Ed25519 public key in SPKI PEM form (\"-----BEGIN PUBLIC KEY-----\"): {0}")]
    BadPublicKey(String),
    #[error("could not encode the key as PEM: {0}")]
    Encode(String),
}

/// A signing key from PKCS#8 PEM text.
pub fn signing_key_from_pem(pem: &str) -> Result<SigningKey, KeyError> {
    SigningKey::from_pkcs8_pem(pem).map_err(|e| KeyError::BadPrivateKey(e.to_string()))
}

/// PKCS#8 PEM text for a signing key. The text is secret: write it with mode 0600.
pub fn signing_key_to_pem(key: &SigningKey) -> Result<String, KeyError> {
    key.to_pkcs8_pem(LineEnding::LF)
        .map(|pem| pem.to_string())
        .map_err(|e| KeyError::Encode(e.to_string()))
}

/// A public key from SPKI PEM text.
pub fn verifying_key_from_pem(pem: &str) -> Result<VerifyingKey, KeyError> {
    VerifyingKey::from_public_key_pem(pem).map_err(|e| KeyError::BadPublicKey(e.to_string()))
}

/// SPKI PEM text for a public key.
pub fn verifying_key_to_pem(key: &VerifyingKey) -> Result<String, KeyError> {
    key.to_public_key_pem(LineEnding::LF)
        .map_err(|e| KeyError::Encode(e.to_string()))
}

/// A set of trusted public keys, looked up by key id. Rotation is: add the new key, re-sign,
/// then remove the old one.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    keys: BTreeMap<KeyId, VerifyingKey>,
}

impl KeyRing {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key and returns its id.
    pub fn insert(&mut self, key: VerifyingKey) -> KeyId {
        let id = KeyId::of(&key);
        self.keys.insert(id, key);
        id
    }

    pub fn remove(&mut self, id: &KeyId) -> Option<VerifyingKey> {
        self.keys.remove(id)
    }

    pub fn get(&self, id: &KeyId) -> Option<&VerifyingKey> {
        self.keys.get(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl FromIterator<VerifyingKey> for KeyRing {
    fn from_iter<I: IntoIterator<Item = VerifyingKey>>(iter: I) -> Self {
        let mut ring = KeyRing::new();
        for key in iter {
            ring.insert(key);
        }
        ring
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_keeps_key_and_id() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let pem = signing_key_to_pem(&key).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let back = signing_key_from_pem(&pem).unwrap();
        assert_eq!(back.to_bytes(), key.to_bytes());

        let public_pem = verifying_key_to_pem(&key.verifying_key()).unwrap();
        assert!(public_pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        let public = verifying_key_from_pem(&public_pem).unwrap();
        assert_eq!(KeyId::of(&public), KeyId::of(&key.verifying_key()));
        assert_eq!(KeyId::of(&public).to_string().len(), 16);
    }

    #[test]
    fn private_and_public_pem_are_not_interchangeable() {
        let key = SigningKey::from_bytes(&[9u8; 32]);
        let private = signing_key_to_pem(&key).unwrap();
        let public = verifying_key_to_pem(&key.verifying_key()).unwrap();
        assert!(verifying_key_from_pem(&private).is_err());
        assert!(signing_key_from_pem(&public).is_err());
        assert!(signing_key_from_pem("garbage").is_err());
    }
}
