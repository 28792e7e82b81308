//! Encoding and decoding of the JSON messages: size bounds, the `"v": 1` check, and one error
//! type for everything that can be wrong with bytes from the network.
//!
//! Decoding first reads only `v`, so that a message from a newer protocol is refused as
//! "unsupported version 2" rather than with whatever field error the new shape would cause.
//! Unknown fields are ignored, which lets a newer peer add optional fields.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The `"v": 1` field of every JSON message. It serialises as the number 1 and refuses to
/// deserialise from anything else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct V1;

impl Serialize for V1 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u32(PROTOCOL_VERSION)
    }
}

impl<'de> Deserialize<'de> for V1 {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(deserializer)?;
        if v == PROTOCOL_VERSION {
            Ok(V1)
        } else {
            Err(serde::de::Error::custom(format!(
                "unsupported protocol version {v}"
            )))
        }
    }
}

/// A JSON message of the wire contract.
pub trait WireMessage: Serialize + DeserializeOwned {
    /// A short name for logs and errors, for example `"directive"`.
    const KIND: &'static str;
    /// The largest encoded size accepted.
    const MAX_BYTES: usize;

    /// Checks the invariants serde cannot express. Called by [`decode`] after parsing.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Why bytes could not be decoded into a message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{kind} message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind} message is not a JSON object with a numeric \"v\" field: {detail}")]
    NoVersion { kind: &'static str, detail: String },
    #[error(
        "{kind} message has unsupported protocol version {v} (this side speaks {PROTOCOL_VERSION})"
    )]
    UnsupportedVersion { kind: &'static str, v: u64 },
    #[error("{kind} message is malformed: {detail}")]
    Malformed { kind: &'static str, detail: String },
}

impl DecodeError {
    /// A stable short label for counters, for example `too_large`.
    pub fn label(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::NoVersion { .. } => "no_version",
            DecodeError::UnsupportedVersion { .. } => "unsupported_version",
            DecodeError::Malformed { .. } => "malformed",
        }
    }
}

#[derive(Deserialize)]
struct VersionPeek {
    v: u64,
}

/// Decodes a message, enforcing its size bound, version and invariants.
pub fn decode<M: WireMessage>(bytes: &[u8]) -> Result<M, DecodeError> {
    if bytes.len() > M::MAX_BYTES {
        return Err(DecodeError::TooLarge {
            kind: M::KIND,
            len: bytes.len(),
            max: M::MAX_BYTES,
        });
    }
    let peek: VersionPeek = serde_json::from_slice(bytes).map_err(|e| DecodeError::NoVersion {
        kind: M::KIND,
        detail: e.to_string(),
    })?;
    if peek.v != u64::from(PROTOCOL_VERSION) {
        return Err(DecodeError::UnsupportedVersion {
            kind: M::KIND,
            v: peek.v,
        });
    }
    let message: M = serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed {
        kind: M::KIND,
        detail: e.to_string(),
    })?;
    message
        .validate()
        .map_err(|detail| DecodeError::Malformed {
            kind: M::KIND,
            detail,
        })?;
    Ok(message)
}

/// Encodes a message as compact JSON.
pub fn encode<M: WireMessage>(message: &M) -> Vec<u8> {
    // Serialising these plain data types cannot fail: no maps with non-string keys, no
    // non-finite floats reach serde_json (it writes them as null).
    serde_json::to_vec(message).expect("wire messages always serialise")
}

/// Encodes a message as indented JSON, for files people read (manifests on disk).
pub fn encode_pretty<M: WireMessage>(message: &M) -> Vec<u8> {
    serde_json::to_vec_pretty(message).expect("wire messages always serialise")
}
