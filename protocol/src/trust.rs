//! Trust checks as pure functions: everything the agent decides before it acts on a directive,
//! a manifest or a downloaded artifact. No clock is read here; `now_ms` comes from the caller.
//!
//! The chain, after TUF and Uptane: the fleet key (online) signs per-device directives, the
//! release key (offline) signs manifests, and a device installs only what both signed.

use crate::codec::{decode, DecodeError};
use crate::digest::Sha256Digest;
use crate::directive::Directive;
use crate::envelope::{Envelope, DIRECTIVE_TYPE, MANIFEST_TYPE};
use crate::ids::{DeviceId, ModelName};
use crate::keys::{KeyId, KeyRing};
use crate::limits::CLOCK_SKEW_TOLERANCE_MS;
use crate::manifest::{BlobRef, Manifest};

/// Why something was not trusted. One variant per reason, so that what the agent reports
/// upstream says exactly what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("signed by unknown key {key_id}")]
    UnknownKey { key_id: KeyId },
    #[error("bad signature for key {key_id}")]
    BadSignature { key_id: KeyId },
    #[error("signed payload is of type {found:?}, expected {expected:?}")]
    WrongPayloadType { expected: String, found: String },
    #[error("directive is for device {found}, this is {expected}")]
    WrongDevice { expected: DeviceId, found: DeviceId },
    #[error(
        "directive sequence {seq} is not above the last accepted {last_accepted} (replayed or old)"
    )]
    ReplayedSequence { seq: u64, last_accepted: u64 },
    #[error("directive expired at {expires_at_ms} ms; now is {now_ms} ms")]
    Expired { expires_at_ms: i64, now_ms: i64 },
    #[error("directive is not valid before {issued_at_ms} ms; now is {now_ms} ms")]
    NotYetValid { issued_at_ms: i64, now_ms: i64 },
    #[error("{model} release {offered} is older than the running release {running} and the directive is not a signed rollback")]
    Downgrade {
        model: ModelName,
        running: u64,
        offered: u64,
    },
    #[error("artifact size mismatch: the file is {actual} bytes, the manifest says {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("artifact hash mismatch: sha256 is {actual}, the manifest says {expected}")]
    HashMismatch {
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
    #[error(transparent)]
    Malformed(#[from] DecodeError),
}

impl TrustError {
    /// A stable short label, for counters and reported reasons.
    pub fn label(&self) -> &'static str {
        match self {
            TrustError::UnknownKey { .. } => "unknown_key",
            TrustError::BadSignature { .. } => "bad_signature",
            TrustError::WrongPayloadType { .. } => "wrong_payload_type",
            TrustError::WrongDevice { .. } => "wrong_device",
            TrustError::ReplayedSequence { .. } => "replayed_sequence",
            TrustError::Expired { .. } => "expired",
            TrustError::NotYetValid { .. } => "not_yet_valid",
            TrustError::Downgrade { .. } => "downgrade",
            TrustError::SizeMismatch { .. } => "size_mismatch",
            TrustError::HashMismatch { .. } => "hash_mismatch",
            TrustError::Malformed(_) => "malformed",
        }
    }
}

/// Checks a directive envelope for this device and returns the directive.
///
/// In order: a trusted fleet key signed it, the signature is valid, it is a directive, it
/// decodes, it names this device, its sequence is above `last_accepted_seq`, and `now_ms` lies
/// in its validity window widened by [`CLOCK_SKEW_TOLERANCE_MS`] on both sides (device clocks
/// drift; a directive's validity is hours, the tolerance minutes).
///
/// The manifests inside are not checked here: see [`verify_manifest`].
pub fn verify_directive(
    envelope: &Envelope,
    trusted_fleet_keys: &KeyRing,
    my_device_id: &DeviceId,
    last_accepted_seq: Option<u64>,
    now_ms: i64,
) -> Result<Directive, TrustError> {
    let payload = envelope.open(trusted_fleet_keys, DIRECTIVE_TYPE)?;
    let directive: Directive = decode(payload)?;
    if &directive.device != my_device_id {
        return Err(TrustError::WrongDevice {
            expected: my_device_id.clone(),
            found: directive.device,
        });
    }
    if let Some(last_accepted) = last_accepted_seq {
        if directive.seq <= last_accepted {
            return Err(TrustError::ReplayedSequence {
                seq: directive.seq,
                last_accepted,
            });
        }
    }
    if now_ms.saturating_add(CLOCK_SKEW_TOLERANCE_MS) < directive.issued_at_ms {
        return Err(TrustError::NotYetValid {
            issued_at_ms: directive.issued_at_ms,
            now_ms,
        });
    }
    if now_ms.saturating_sub(CLOCK_SKEW_TOLERANCE_MS) > directive.expires_at_ms {
        return Err(TrustError::Expired {
            expires_at_ms: directive.expires_at_ms,
            now_ms,
        });
    }
    Ok(directive)
}

/// Checks a manifest envelope against the trusted release keys and returns the manifest.
pub fn verify_manifest(
    envelope: &Envelope,
    trusted_release_keys: &KeyRing,
) -> Result<Manifest, TrustError> {
    let payload = envelope.open(trusted_release_keys, MANIFEST_TYPE)?;
    Ok(decode(payload)?)
}

/// Refuses a manifest whose release counter is below the one running, unless the directive
/// marked it as an explicit rollback (which the fleet key signed).
pub fn check_release_order(
    manifest: &Manifest,
    running_release: Option<u64>,
    signed_rollback: bool,
) -> Result<(), TrustError> {
    match running_release {
        Some(running) if manifest.release < running && !signed_rollback => {
            Err(TrustError::Downgrade {
                model: manifest.name.clone(),
                running,
                offered: manifest.release,
            })
        }
        _ => Ok(()),
    }
}

/// Checks a downloaded artifact's size and digest against its manifest. The agent hashes while
/// it downloads and calls this with the figures; [`verify_artifact_bytes`] is the same for
/// bytes in memory.
pub fn verify_artifact(
    manifest: &Manifest,
    actual_size: u64,
    actual_sha256: &Sha256Digest,
) -> Result<(), TrustError> {
    verify_blob(&manifest.artifact(), actual_size, actual_sha256)
}

/// Checks downloaded or stored bytes (artifact or profile) against what the manifest names.
pub fn verify_blob(
    expected: &BlobRef,
    actual_size: u64,
    actual_sha256: &Sha256Digest,
) -> Result<(), TrustError> {
    if actual_size != expected.size {
        return Err(TrustError::SizeMismatch {
            expected: expected.size,
            actual: actual_size,
        });
    }
    if actual_sha256 != &expected.sha256 {
        return Err(TrustError::HashMismatch {
            expected: expected.sha256,
            actual: *actual_sha256,
        });
    }
    Ok(())
}

/// [`verify_artifact`] over bytes in memory.
pub fn verify_artifact_bytes(manifest: &Manifest, artifact: &[u8]) -> Result<(), TrustError> {
    verify_artifact(manifest, artifact.len() as u64, &Sha256Digest::of(artifact))
}
