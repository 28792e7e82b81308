//! Chunked artifact delivery: a JSON request on `fetch`, a binary reply on `chunk`.
//!
//! The reply is a fixed 56-byte header followed by the data, so that a 256 KiB chunk is not
//! inflated by base64 and the header can be checked before the data is looked at:
//!
//! ```text
//! offset  size  field
//!      0     4  magic "DGCK"
//!      4     1  version (1)
//!      5     1  status (0 ok, 1 not found, 2 out of range, 3 busy, 4 denied)
//!      6     2  reserved, zero
//!      8    32  artifact sha256
//!     40     8  offset, big endian
//!     48     4  data length, big endian
//!     52     4  reserved, zero
//!     56     …  data
//! ```
//! Reserved bytes must be zero, so a later version can give them a meaning.

use serde::{Deserialize, Serialize};

use crate::codec::{WireMessage, V1};
use crate::digest::Sha256Digest;
use crate::limits;

/// A request for `len` bytes of an artifact from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    pub v: V1,
    pub sha256: Sha256Digest,
    pub offset: u64,
    pub len: u32,
}

impl WireMessage for ChunkRequest {
    const KIND: &'static str = "chunk request";
    const MAX_BYTES: usize = 512;

    fn validate(&self) -> Result<(), String> {
        if self.len == 0 || self.len as usize > limits::MAX_CHUNK_DATA_BYTES {
            return Err(format!(
                "len {} is outside 1..={}",
                self.len,
                limits::MAX_CHUNK_DATA_BYTES
            ));
        }
        if self.offset.checked_add(u64::from(self.len)).is_none() {
            return Err("offset + len overflows".into());
        }
        Ok(())
    }
}

const MAGIC: &[u8; 4] = b"DGCK";
const VERSION: u8 = 1;

/// Length of the binary chunk header.
pub const CHUNK_HEADER_LEN: usize = 56;

/// The outcome a chunk reply reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkStatus {
    Ok = 0,
    /// The server has no artifact with that digest.
    NotFound = 1,
    /// The offset lies beyond the artifact's end.
    OutOfRange = 2,
    /// The server is at its concurrency or rate limit: retry later.
    Busy = 3,
    /// The device is not allowed this artifact.
    Denied = 4,
}

impl ChunkStatus {
    fn from_byte(b: u8) -> Option<ChunkStatus> {
        Some(match b {
            0 => ChunkStatus::Ok,
            1 => ChunkStatus::NotFound,
            2 => ChunkStatus::OutOfRange,
            3 => ChunkStatus::Busy,
            4 => ChunkStatus::Denied,
            _ => return None,
        })
    }
}

/// The header of a chunk reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub status: ChunkStatus,
    pub sha256: Sha256Digest,
    pub offset: u64,
}

/// Why a chunk reply could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk reply of {0} bytes is shorter than its {CHUNK_HEADER_LEN}-byte header")]
    Short(usize),
    #[error("chunk reply does not start with the magic \"DGCK\"")]
    BadMagic,
    #[error("chunk reply has unsupported version {0}")]
    UnsupportedVersion(u8),
    #[error("chunk reply has unknown status {0}")]
    UnknownStatus(u8),
    #[error("chunk reply has non-zero reserved bytes")]
    Reserved,
    #[error("chunk header says {declared} data bytes, {actual} follow")]
    LengthMismatch { declared: u32, actual: usize },
    #[error("chunk carries {0} data bytes; at most {max} are allowed", max = limits::MAX_CHUNK_DATA_BYTES)]
    TooLarge(usize),
    #[error("chunk with status {0:?} carries data")]
    DataWithError(ChunkStatus),
}

/// Encodes a chunk reply: header then data.
///
/// Panics if `data` is longer than [`limits::MAX_CHUNK_DATA_BYTES`], which the caller controls.
pub fn encode_chunk(header: &ChunkHeader, data: &[u8]) -> Vec<u8> {
    assert!(
        data.len() <= limits::MAX_CHUNK_DATA_BYTES,
        "chunk data over the limit"
    );
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + data.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(header.status as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&header.sha256.0);
    out.extend_from_slice(&header.offset.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(data);
    out
}

/// Decodes a chunk reply into its header and data, checking every field.
pub fn decode_chunk(bytes: &[u8]) -> Result<(ChunkHeader, &[u8]), ChunkError> {
    if bytes.len() < CHUNK_HEADER_LEN {
        return Err(ChunkError::Short(bytes.len()));
    }
    let (head, data) = bytes.split_at(CHUNK_HEADER_LEN);
    if &head[0..4] != MAGIC {
        return Err(ChunkError::BadMagic);
    }
    if head[4] != VERSION {
        return Err(ChunkError::UnsupportedVersion(head[4]));
    }
    let status = ChunkStatus::from_byte(head[5]).ok_or(ChunkError::UnknownStatus(head[5]))?;
    if head[6..8] != [0, 0] || head[52..56] != [0, 0, 0, 0] {
        return Err(ChunkError::Reserved);
    }
    let mut sha = [0u8; 32];
    sha.copy_from_slice(&head[8..40]);
    let offset = u64::from_be_bytes(head[40..48].try_into().expect("8 bytes"));
    let declared = u32::from_be_bytes(head[48..52].try_into().expect("4 bytes"));
    if data.len() > limits::MAX_CHUNK_DATA_BYTES {
        return Err(ChunkError::TooLarge(data.len()));
    }
    if declared as usize != data.len() {
        return Err(ChunkError::LengthMismatch {
            declared,
            actual: data.len(),
        });
    }
    if status != ChunkStatus::Ok && !data.is_empty() {
        return Err(ChunkError::DataWithError(status));
    }
    Ok((
        ChunkHeader {
            status,
            sha256: Sha256Digest(sha),
            offset,
        },
        data,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let header = ChunkHeader {
            status: ChunkStatus::Ok,
            sha256: Sha256Digest::of(b"model"),
            offset: 1 << 33,
        };
        let bytes = encode_chunk(&header, b"hello");
        assert_eq!(bytes.len(), CHUNK_HEADER_LEN + 5);
        let (h, data) = decode_chunk(&bytes).unwrap();
        assert_eq!((h, data), (header, &b"hello"[..]));

        let mut truncated = bytes.clone();
        truncated.pop();
        assert!(matches!(
            decode_chunk(&truncated),
            Err(ChunkError::LengthMismatch {
                declared: 5,
                actual: 4
            })
        ));
        let mut bad_magic = bytes.clone();
        bad_magic[0] = b'X';
        assert_eq!(decode_chunk(&bad_magic), Err(ChunkError::BadMagic));
        assert_eq!(decode_chunk(&bytes[..10]), Err(ChunkError::Short(10)));
    }
}
