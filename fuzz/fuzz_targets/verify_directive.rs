//! The agent's trust checks on what arrives on its `directive` topic: `verify_directive` and
//! `verify_manifest` must never panic, whatever the bytes.
//!
//! Random bytes almost never carry a valid Ed25519 signature, so a plain target would stop at
//! the signature check. The input is therefore structured (see `driftgate_fuzz::verify_input`,
//! which the seed generator shares):
//!
//! ```text
//! byte 0      mode: bits 0-1 choose how the envelope is made
//!               0  the payload is an Envelope in JSON, decoded with codec::decode (the
//!                  network path; only seeds carry a valid signature)
//!               1  the payload is signed as a directive with the trusted key
//!               2  the payload is signed as a manifest with the trusted key
//!               3  the payload is signed as a directive with an untrusted key
//!             bit 2: last accepted sequence is Some(bytes 1..9) rather than None
//! bytes 1..9  last accepted sequence, big endian
//! bytes 9..17 now_ms, big endian (two's complement)
//! bytes 17..  payload
//! ```
//!
//! Modes 1 and 2 put the fuzzer behind a valid signature, straight onto the Directive and
//! Manifest decoders and the device / sequence / validity-window checks. Invariants checked:
//! an accepted directive names this device, has a sequence above the last accepted one and a
//! validity window containing `now_ms` (± the clock-skew tolerance); a directive-typed envelope
//! never passes as a manifest nor the reverse; an untrusted key is always refused; every
//! signed envelope survives an encode/decode round trip before it is verified.
#![no_main]

use driftgate_fuzz::verify_input::{self, Mode};
use fleet_protocol::codec::{decode, encode};
use fleet_protocol::limits::CLOCK_SKEW_TOLERANCE_MS;
use fleet_protocol::{
    check_release_order, verify_artifact_bytes, verify_directive, verify_manifest, Envelope,
    Manifest, TrustError, DIRECTIVE_TYPE, MANIFEST_TYPE,
};
use libfuzzer_sys::fuzz_target;

fn check_manifest(manifest: &Manifest, signed_rollback: bool) {
    let _ = check_release_order(manifest, None, signed_rollback);
    let _ = check_release_order(manifest, Some(manifest.release), signed_rollback);
    let _ = check_release_order(manifest, Some(u64::MAX), signed_rollback);
    let _ = verify_artifact_bytes(manifest, b"not the model");
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = verify_input::parse(data) else {
        return;
    };
    let keys = verify_input::keys();
    let device = verify_input::device();

    let envelope = match input.mode {
        Mode::Json => match decode::<Envelope>(input.payload) {
            Ok(envelope) => envelope,
            Err(_) => return,
        },
        Mode::SignedDirective | Mode::SignedManifest | Mode::UntrustedDirective => {
            let (payload_type, key) = match input.mode {
                Mode::SignedDirective => (DIRECTIVE_TYPE, &keys.trusted),
                Mode::SignedManifest => (MANIFEST_TYPE, &keys.trusted),
                _ => (DIRECTIVE_TYPE, &keys.untrusted),
            };
            let signed = Envelope::sign(payload_type, input.payload.to_vec(), key);
            let bytes = encode(&signed);
            match decode::<Envelope>(&bytes) {
                Ok(back) => {
                    assert_eq!(back, signed, "signed envelope changed in a round trip");
                    back
                }
                // Only a payload so large that its base64 exceeds the envelope bound.
                Err(e) => {
                    assert_eq!(e.label(), "too_large", "signed envelope refused: {e}");
                    return;
                }
            }
        }
    };

    let directive = verify_directive(
        &envelope,
        &keys.ring,
        &device,
        input.last_accepted_seq,
        input.now_ms,
    );
    let manifest = verify_manifest(&envelope, &keys.ring);

    match input.mode {
        Mode::SignedDirective => {
            assert!(
                matches!(manifest, Err(TrustError::WrongPayloadType { .. })),
                "a directive-typed envelope passed as a manifest: {manifest:?}"
            );
        }
        Mode::SignedManifest => {
            assert!(
                matches!(directive, Err(TrustError::WrongPayloadType { .. })),
                "a manifest-typed envelope passed as a directive: {directive:?}"
            );
        }
        Mode::UntrustedDirective => {
            assert!(matches!(directive, Err(TrustError::UnknownKey { .. })));
            assert!(matches!(manifest, Err(TrustError::UnknownKey { .. })));
        }
        Mode::Json => {}
    }
    if let Err(e) = &directive {
        let _ = (e.label(), e.to_string());
    }
    if let Err(e) = &manifest {
        let _ = (e.label(), e.to_string());
    }

    if let Ok(directive) = directive {
        assert_eq!(directive.device, device);
        if let Some(last) = input.last_accepted_seq {
            assert!(directive.seq > last);
        }
        assert!(directive.issued_at_ms <= input.now_ms.saturating_add(CLOCK_SKEW_TOLERANCE_MS));
        assert!(directive.expires_at_ms >= input.now_ms.saturating_sub(CLOCK_SKEW_TOLERANCE_MS));
        // The manifests inside: a seed carries one validly signed by the (release) key.
        for model in &directive.models {
            if let Ok(manifest) = verify_manifest(&model.manifest, &keys.ring) {
                check_manifest(&manifest, model.rollback);
            }
        }
    }
    if let Ok(manifest) = manifest {
        check_manifest(&manifest, false);
    }
});
