//! The signed envelope: exact payload bytes, the payload's type, the signer's key id and an
//! Ed25519 signature.
//!
//! The signature covers the bytes that travel, never a re-serialisation, and it is taken over
//! a pre-authentication encoding of type and payload (as in DSSE):
//! `"DGSIGv1" SP len(type) SP type SP len(payload) SP payload`. Binding the type means a
//! signature made over a manifest can never be presented as a directive, even by a key that
//! is trusted for both.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer};
use serde::{Deserialize, Serialize};

use crate::codec::{WireMessage, V1};
use crate::keys::{KeyId, KeyRing, SigningKey};
use crate::limits;
use crate::trust::TrustError;

/// Payload type of a signed [`crate::Manifest`].
pub const MANIFEST_TYPE: &str = "application/vnd.driftgate.manifest+json";
/// Payload type of a signed [`crate::Directive`].
pub const DIRECTIVE_TYPE: &str = "application/vnd.driftgate.directive+json";

/// A signed payload as it travels and as it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: V1,
    pub payload_type: String,
    #[serde(with = "base64_bytes")]
    pub payload: Vec<u8>,
    pub key_id: KeyId,
    #[serde(with = "base64_signature")]
    pub sig: [u8; 64],
}

impl WireMessage for Envelope {
    const KIND: &'static str = "envelope";
    const MAX_BYTES: usize = limits::MAX_CONTROL_MESSAGE_BYTES;
}

/// The bytes the signature covers.
fn signed_bytes(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DGSIGv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

impl Envelope {
    /// Signs `payload` as `payload_type` with `key`.
    pub fn sign(payload_type: &str, payload: Vec<u8>, key: &SigningKey) -> Envelope {
        let signature = key.sign(&signed_bytes(payload_type, &payload));
        Envelope {
            v: V1,
            payload_type: payload_type.to_string(),
            payload,
            key_id: KeyId::of(&key.verifying_key()),
            sig: signature.to_bytes(),
        }
    }

    /// Checks the signature against `trusted` and the payload type, and returns the payload.
    ///
    /// Uses `verify_strict`, which refuses weak keys and non-canonical signatures, so one
    /// payload has exactly one valid signature per key.
    pub fn open(&self, trusted: &KeyRing, expected_type: &str) -> Result<&[u8], TrustError> {
        let key = trusted.get(&self.key_id).ok_or(TrustError::UnknownKey {
            key_id: self.key_id,
        })?;
        let signature = Signature::from_bytes(&self.sig);
        key.verify_strict(&signed_bytes(&self.payload_type, &self.payload), &signature)
            .map_err(|_| TrustError::BadSignature {
                key_id: self.key_id,
            })?;
        if self.payload_type != expected_type {
            return Err(TrustError::WrongPayloadType {
                expected: expected_type.to_string(),
                found: self.payload_type.clone(),
            });
        }
        Ok(&self.payload)
    }
}

pub(crate) mod base64_bytes {
    use super::*;

    pub fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64.encode(bytes))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        BASE64
            .decode(text.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
    }
}

mod base64_signature {
    use super::*;

    pub fn serialize<S: serde::Serializer>(sig: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64.encode(sig))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let bytes = base64_bytes::deserialize(d)?;
        bytes.try_into().map_err(|b: Vec<u8>| {
            serde::de::Error::custom(format!("signature is {} bytes, expected 64", b.len()))
        })
    }
}
