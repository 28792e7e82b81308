//! Each trust check, exercised as the attack it exists to stop. The device is `dev-17`; the
//! fleet key (online, in the server) signs directives; the release key (offline) signs
//! manifests. Every refusal must name its reason.

use fleet_protocol::limits::CLOCK_SKEW_TOLERANCE_MS;
use fleet_protocol::tensor::Dim;
use fleet_protocol::*;

const NOW: i64 = 1_790_000_000_000;
const HOUR: i64 = 3_600_000;

struct Fleet {
    fleet_key: SigningKey,
    release_key: SigningKey,
    fleet_ring: KeyRing,
    release_ring: KeyRing,
    device: DeviceId,
}

fn fleet() -> Fleet {
    let fleet_key = SigningKey::from_bytes(&[1; 32]);
    let release_key = SigningKey::from_bytes(&[2; 32]);
    Fleet {
        fleet_ring: [fleet_key.verifying_key()].into_iter().collect(),
        release_ring: [release_key.verifying_key()].into_iter().collect(),
        fleet_key,
        release_key,
        device: DeviceId::new("dev-17").unwrap(),
    }
}

fn attacker_key() -> SigningKey {
    SigningKey::from_bytes(&[66; 32])
}

const ARTIFACT: &[u8] = b"pretend these are the bytes of digits-mlp v3.onnx";

fn manifest(release: u64, artifact: &[u8]) -> Manifest {
    let input = Tensor::new("input", vec![1, 2], TensorData::F32(vec![0.5, 1.5])).unwrap();
    let output = Tensor::new("label", vec![1], TensorData::I64(vec![3])).unwrap();
    Manifest {
        v: V1,
        name: ModelName::new("digits-mlp").unwrap(),
        release,
        version: ModelVersion::new(format!("v{release}")).unwrap(),
        sha256: Sha256Digest::of(artifact),
        size: artifact.len() as u64,
        inputs: vec![TensorSpec {
            name: "input".into(),
            datatype: ElementType::F32,
            shape: vec![Dim::Symbolic("N".into()), Dim::Fixed(2)],
        }],
        outputs: vec![TensorSpec {
            name: "label".into(),
            datatype: ElementType::I64,
            shape: vec![Dim::Symbolic("N".into())],
        }],
        self_test: SelfTest {
            inputs: vec![input],
            outputs: vec![output],
            tolerance: Tolerance::default(),
        },
        profile_sha256: None,
        profile_size: None,
        min_agent_version: None,
        created_at_ms: NOW - 24 * HOUR,
    }
}

fn sign_manifest(manifest: &Manifest, key: &SigningKey) -> Envelope {
    Envelope::sign(MANIFEST_TYPE, encode(manifest), key)
}

fn directive(device: &str, seq: u64, issued_at_ms: i64, models: Vec<ModelDirective>) -> Directive {
    Directive {
        v: V1,
        device: DeviceId::new(device).unwrap(),
        seq,
        issued_at_ms,
        expires_at_ms: issued_at_ms + 24 * HOUR,
        models,
    }
}

fn assign(manifest: Envelope, rollback: bool) -> ModelDirective {
    ModelDirective {
        manifest,
        rollback,
        rollout: Some("r-42".into()),
    }
}

fn sign_directive(directive: &Directive, key: &SigningKey) -> Envelope {
    Envelope::sign(DIRECTIVE_TYPE, encode(directive), key)
}

/// The legitimate path, end to end: what every attack below is a deviation from.
#[test]
fn a_directive_and_manifest_both_signed_are_accepted() {
    let f = fleet();
    let m = sign_manifest(&manifest(3, ARTIFACT), &f.release_key);
    let d = sign_directive(
        &directive("dev-17", 5, NOW, vec![assign(m, false)]),
        &f.fleet_key,
    );
    let accepted = trust::verify_directive(&d, &f.fleet_ring, &f.device, Some(4), NOW).unwrap();
    let manifest = verify_manifest(&accepted.models[0].manifest, &f.release_ring).unwrap();
    check_release_order(&manifest, Some(2), false).unwrap();
    verify_artifact_bytes(&manifest, ARTIFACT).unwrap();
}

#[test]
fn directive_forged_by_a_compromised_broker_is_refused_as_unknown_key() {
    let f = fleet();
    let m = sign_manifest(&manifest(3, ARTIFACT), &f.release_key);
    let forged = sign_directive(
        &directive("dev-17", 99, NOW, vec![assign(m, false)]),
        &attacker_key(),
    );
    let err = trust::verify_directive(&forged, &f.fleet_ring, &f.device, Some(4), NOW).unwrap_err();
    assert!(
        matches!(err, TrustError::UnknownKey { key_id } if key_id == KeyId::of(&attacker_key().verifying_key()))
    );
    assert!(err.to_string().contains("unknown key"), "{err}");
}

#[test]
fn a_leaked_release_key_alone_cannot_target_a_device() {
    // The attacker holds the release key and signs both a manifest and a directive with it.
    let f = fleet();
    let m = sign_manifest(&manifest(9, b"evil"), &f.release_key);
    let d = sign_directive(
        &directive("dev-17", 99, NOW, vec![assign(m, false)]),
        &f.release_key,
    );
    let err = trust::verify_directive(&d, &f.fleet_ring, &f.device, Some(4), NOW).unwrap_err();
    assert_eq!(err.label(), "unknown_key");
}

#[test]
fn a_stolen_server_cannot_install_an_arbitrary_model() {
    // The fleet key is stolen with the server: the directive verifies, the manifest inside,
    // signed by the attacker, does not.
    let f = fleet();
    let evil = sign_manifest(&manifest(9, b"evil"), &attacker_key());
    let d = sign_directive(
        &directive("dev-17", 5, NOW, vec![assign(evil, false)]),
        &f.fleet_key,
    );
    let accepted = trust::verify_directive(&d, &f.fleet_ring, &f.device, Some(4), NOW).unwrap();
    let err = verify_manifest(&accepted.models[0].manifest, &f.release_ring).unwrap_err();
    assert_eq!(err.label(), "unknown_key");
}

#[test]
fn a_tampered_directive_is_refused_as_bad_signature() {
    // A man in the middle keeps the fleet's signature and key id but retargets the payload.
    let f = fleet();
    let m = sign_manifest(&manifest(3, ARTIFACT), &f.release_key);
    let genuine = sign_directive(
        &directive("dev-18", 5, NOW, vec![assign(m, false)]),
        &f.fleet_key,
    );
    let mut tampered = genuine.clone();
    tampered.payload = encode(&Directive {
        device: f.device.clone(),
        ..decode::<Directive>(&genuine.payload).unwrap()
    });
    let err =
        trust::verify_directive(&tampered, &f.fleet_ring, &f.device, Some(4), NOW).unwrap_err();
    assert!(matches!(err, TrustError::BadSignature { .. }), "{err}");
}

#[test]
fn a_manifest_presented_as_a_directive_is_refused_as_wrong_type() {
    // A key trusted for both roles (a misconfiguration) still cannot turn a manifest signature
    // into a directive: the payload type is covered by the signature.
    let f = fleet();
    let mut both = f.fleet_ring.clone();
    both.insert(f.release_key.verifying_key());
    let m = sign_manifest(&manifest(3, ARTIFACT), &f.release_key);
    let err = trust::verify_directive(&m, &both, &f.device, None, NOW).unwrap_err();
    assert!(matches!(err, TrustError::WrongPayloadType { .. }), "{err}");
}

#[test]
fn a_directive_for_another_device_is_refused() {
    let f = fleet();
    let m = sign_manifest(&manifest(3, ARTIFACT), &f.release_key);
    let for_18 = sign_directive(
        &directive("dev-18", 5, NOW, vec![assign(m, false)]),
        &f.fleet_key,
    );
    let err = trust::verify_directive(&for_18, &f.fleet_ring, &f.device, Some(4), NOW).unwrap_err();
    assert!(
        matches!(&err, TrustError::WrongDevice { expected, found } if expected.as_str() == "dev-17" && found.as_str() == "dev-18")
    );
    assert!(err.to_string().contains("dev-18"), "{err}");
}

#[test]
fn a_replayed_old_directive_is_refused() {
    // The device has accepted seq 7; an attacker re-publishes the retained seq 6 (pointing at an
    // old, vulnerable version) and the same seq 7 again.
    let f = fleet();
    let m = sign_manifest(&manifest(1, ARTIFACT), &f.release_key);
    for seq in [6, 7] {
        let old = sign_directive(
            &directive("dev-17", seq, NOW - HOUR, vec![assign(m.clone(), false)]),
            &f.fleet_key,
        );
        let err =
            trust::verify_directive(&old, &f.fleet_ring, &f.device, Some(7), NOW).unwrap_err();
        assert!(
            matches!(err, TrustError::ReplayedSequence { seq: s, last_accepted: 7 } if s == seq)
        );
    }
}

#[test]
fn an_expired_directive_is_refused_beyond_the_clock_tolerance() {
    let f = fleet();
    let d = directive("dev-17", 5, NOW - 48 * HOUR, vec![]);
    let envelope = sign_directive(&d, &f.fleet_key);
    let err =
        trust::verify_directive(&envelope, &f.fleet_ring, &f.device, Some(4), NOW).unwrap_err();
    assert!(matches!(err, TrustError::Expired { .. }), "{err}");

    // A device whose clock runs 10 minutes fast still accepts a directive that just expired
    // by the server's clock: the tolerance is documented as 15 minutes.
    let just_expired_at = d.expires_at_ms + 10 * 60 * 1000;
    trust::verify_directive(
        &envelope,
        &f.fleet_ring,
        &f.device,
        Some(4),
        just_expired_at,
    )
    .unwrap();
    let too_late = d.expires_at_ms + CLOCK_SKEW_TOLERANCE_MS + 1;
    assert!(
        trust::verify_directive(&envelope, &f.fleet_ring, &f.device, Some(4), too_late).is_err()
    );
}

#[test]
fn a_directive_from_the_future_is_refused_as_not_yet_valid() {
    // Pre-signed directives (for example by a server whose clock was moved forward) must not be
    // usable before their time; 10 minutes of device skew is tolerated.
    let f = fleet();
    let future = sign_directive(
        &directive("dev-17", 5, NOW + 2 * HOUR, vec![]),
        &f.fleet_key,
    );
    let err = trust::verify_directive(&future, &f.fleet_ring, &f.device, Some(4), NOW).unwrap_err();
    assert!(matches!(err, TrustError::NotYetValid { .. }), "{err}");

    let slightly_ahead = sign_directive(
        &directive("dev-17", 5, NOW + 10 * 60 * 1000, vec![]),
        &f.fleet_key,
    );
    trust::verify_directive(&slightly_ahead, &f.fleet_ring, &f.device, Some(4), NOW).unwrap();
}

#[test]
fn a_downgrade_without_a_signed_rollback_is_refused() {
    // The device runs release 3; a directive offers release 2 without the rollback flag (an
    // attacker replaying an old but validly signed manifest inside a fresh directive).
    let f = fleet();
    let old = manifest(2, ARTIFACT);
    let err = check_release_order(&old, Some(3), false).unwrap_err();
    assert!(
        matches!(
            err,
            TrustError::Downgrade {
                running: 3,
                offered: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("not a signed rollback"), "{err}");

    // The same manifest inside a directive the fleet key marked as a rollback is accepted.
    let d = sign_directive(
        &directive(
            "dev-17",
            5,
            NOW,
            vec![assign(sign_manifest(&old, &f.release_key), true)],
        ),
        &f.fleet_key,
    );
    let accepted = trust::verify_directive(&d, &f.fleet_ring, &f.device, Some(4), NOW).unwrap();
    let m = verify_manifest(&accepted.models[0].manifest, &f.release_ring).unwrap();
    check_release_order(&m, Some(3), accepted.models[0].rollback).unwrap();
}

#[test]
fn an_artifact_swapped_on_the_server_is_refused_as_hash_mismatch() {
    let m = manifest(3, ARTIFACT);
    let mut swapped = ARTIFACT.to_vec();
    swapped[10] ^= 0x01;
    let err = verify_artifact_bytes(&m, &swapped).unwrap_err();
    assert!(matches!(err, TrustError::HashMismatch { .. }), "{err}");
    assert!(err.to_string().contains("hash mismatch"), "{err}");
}

#[test]
fn an_artifact_longer_than_its_manifest_is_refused_as_size_mismatch() {
    let m = manifest(3, ARTIFACT);
    let mut endless = ARTIFACT.to_vec();
    endless.extend_from_slice(&[0; 4096]);
    let err = verify_artifact_bytes(&m, &endless).unwrap_err();
    assert!(
        matches!(err, TrustError::SizeMismatch { expected, actual } if expected == ARTIFACT.len() as u64 && actual == endless.len() as u64)
    );
}

#[test]
fn a_malformed_payload_under_a_valid_signature_is_refused_as_malformed() {
    // A server bug (or a future protocol) signs something this agent cannot read: refused with
    // the decoder's reason, never acted on.
    let f = fleet();
    for payload in [
        br#"{"v":1,"device":"dev-17"}"#.to_vec(),
        br#"{"v":2,"device":"dev-17","seq":5}"#.to_vec(),
        b"\xff\xfe not json".to_vec(),
    ] {
        let envelope = Envelope::sign(DIRECTIVE_TYPE, payload, &f.fleet_key);
        let err =
            trust::verify_directive(&envelope, &f.fleet_ring, &f.device, None, NOW).unwrap_err();
        assert!(matches!(err, TrustError::Malformed(_)), "{err}");
    }
}
