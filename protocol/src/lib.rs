//! `fleet-protocol`: the contract between Driftgate's edge agent and its fleet server.
//!
//! Pure data and pure functions: no sockets, no files, and no clock is read inside (callers
//! pass `now_ms`). Both sides build topics, encode and decode messages, sign and verify here,
//! so the two can never disagree on the wire.

pub mod chunk; // chunk requests (JSON) and chunk replies (binary header + data)
pub mod codec; // encode/decode with size bounds and the `"v": 1` check; DecodeError
pub mod digest; // SHA-256 digests as hex
pub mod directive; // Directive: what the fleet key tells one device to run
pub mod drift; // drift windows (mergeable counts + scores) and the statistics: bins, PSI, effect, CUSUM
pub mod envelope; // signed envelope: exact payload bytes, type, key id, Ed25519 signature
pub mod features; // which input/output values the drift monitor watches, read out of a batch
pub mod histogram; // fixed log-bucket latency histogram shared by agent and server
pub mod ids; // validated device ids, model names and versions
pub mod keys; // Ed25519 keys as PEM, key ids, key rings
pub mod limits; // size bounds and the clock-skew tolerance
pub mod manifest; // Manifest: what the release key vouches for about a model version
pub mod outbox; // uplink batches, their item kinds, priorities, and acks
pub mod profile; // ReferenceProfile: training-data bins and moments, calibrated thresholds
pub mod sample; // sampled inputs and outputs in a compact binary form (`dgt1`)
pub mod state; // reported State and online/offline Status
pub mod tensor; // tensors in Open Inference Protocol JSON, tensor specs, tolerance compare
pub mod topics; // `{root}/d/{device}/{kind}`: the one place that knows the topic layout
pub mod trust; // verify_directive, verify_manifest, release order, artifact checks

pub use chunk::{decode_chunk, encode_chunk, ChunkHeader, ChunkRequest, ChunkStatus};
pub use codec::{decode, encode, encode_pretty, DecodeError, WireMessage, V1};
pub use digest::Sha256Digest;
pub use directive::{Directive, ModelDirective};
pub use envelope::{Envelope, DIRECTIVE_TYPE, MANIFEST_TYPE};
pub use ids::{DeviceId, IdentError, ModelName, ModelVersion};
pub use keys::{KeyId, KeyRing, SigningKey, VerifyingKey};
pub use manifest::{BlobRef, Manifest, SelfTest};
pub use outbox::{Ack, Batch, Item, ItemBody};
pub use profile::ReferenceProfile;
pub use state::{InstallPhase, ModelState, State, Status};
pub use tensor::{ElementType, Tensor, TensorData, TensorSpec, Tolerance};
pub use topics::{TopicKind, Topics};
pub use trust::{
    check_release_order, verify_artifact, verify_artifact_bytes, verify_blob, verify_directive,
    verify_manifest, TrustError,
};
