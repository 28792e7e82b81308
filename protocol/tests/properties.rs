//! Property tests of the wire contract: signatures break on any change, every message type
//! round-trips through JSON losslessly, topics round-trip for every legal device id and refuse
//! every illegal one, and no decoder of network bytes panics on any input.

use std::collections::BTreeMap;

use fleet_protocol::chunk::{decode_chunk, encode_chunk, ChunkHeader, ChunkStatus};
use fleet_protocol::drift::{DriftWindow, FeatureWindow, PredictionWindow};
use fleet_protocol::histogram::{LatencyHistogram, BUCKETS};
use fleet_protocol::outbox::{Event, EventKind, Evictions, Health, LinkStats, Sample, Telemetry};
use fleet_protocol::state::{Condition, ModelRef, Presence, Refusal};
use fleet_protocol::tensor::Dim;
use fleet_protocol::*;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Strategies

fn ident() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,128}".prop_filter("not . or ..", |s| s != "." && s != "..")
}

fn device_id() -> impl Strategy<Value = DeviceId> {
    ident().prop_map(|s| DeviceId::new(s).unwrap())
}

fn model_name() -> impl Strategy<Value = ModelName> {
    ident().prop_map(|s| ModelName::new(s).unwrap())
}

fn model_version() -> impl Strategy<Value = ModelVersion> {
    ident().prop_map(|s| ModelVersion::new(s).unwrap())
}

fn digest() -> impl Strategy<Value = Sha256Digest> {
    any::<[u8; 32]>().prop_map(Sha256Digest)
}

fn finite_f32() -> impl Strategy<Value = f32> {
    any::<f32>().prop_filter("finite", |x| x.is_finite())
}

fn finite_f64() -> impl Strategy<Value = f64> {
    any::<f64>().prop_filter("finite", |x| x.is_finite())
}

fn text() -> impl Strategy<Value = String> {
    // Any Unicode, including quotes, backslashes and control characters JSON must escape.
    any::<String>().prop_map(|s| s.chars().take(40).collect())
}

fn element_type() -> impl Strategy<Value = ElementType> {
    proptest::sample::select(ElementType::ALL.to_vec())
}

fn tensor_data(datatype: ElementType, n: usize) -> BoxedStrategy<TensorData> {
    match datatype {
        ElementType::Bool => vec(any::<bool>(), n).prop_map(TensorData::Bool).boxed(),
        ElementType::U8 => vec(any::<u8>(), n).prop_map(TensorData::U8).boxed(),
        ElementType::U16 => vec(any::<u16>(), n).prop_map(TensorData::U16).boxed(),
        ElementType::U32 => vec(any::<u32>(), n).prop_map(TensorData::U32).boxed(),
        ElementType::U64 => vec(any::<u64>(), n).prop_map(TensorData::U64).boxed(),
        ElementType::I8 => vec(any::<i8>(), n).prop_map(TensorData::I8).boxed(),
        ElementType::I16 => vec(any::<i16>(), n).prop_map(TensorData::I16).boxed(),
        ElementType::I32 => vec(any::<i32>(), n).prop_map(TensorData::I32).boxed(),
        ElementType::I64 => vec(any::<i64>(), n).prop_map(TensorData::I64).boxed(),
        ElementType::F32 => vec(finite_f32(), n).prop_map(TensorData::F32).boxed(),
        ElementType::F64 => vec(finite_f64(), n).prop_map(TensorData::F64).boxed(),
    }
}

fn tensor_named(name: String) -> impl Strategy<Value = Tensor> {
    (element_type(), vec(0u64..4, 0..4)).prop_flat_map(move |(datatype, shape)| {
        let n = shape.iter().product::<u64>() as usize;
        let name = name.clone();
        tensor_data(datatype, n)
            .prop_map(move |data| Tensor::new(name.clone(), shape.clone(), data).unwrap())
    })
}

fn tensor() -> impl Strategy<Value = Tensor> {
    "[a-z_]{1,12}".prop_flat_map(tensor_named)
}

/// The spec a tensor satisfies, with the first dimension made symbolic half of the time.
fn spec_for(tensor: &Tensor, symbolic_batch: bool) -> TensorSpec {
    TensorSpec {
        name: tensor.name.clone(),
        datatype: tensor.element_type(),
        shape: tensor
            .shape
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                if i == 0 && symbolic_batch {
                    Dim::Symbolic("N".into())
                } else {
                    Dim::Fixed(d)
                }
            })
            .collect(),
    }
}

/// Distinctly named tensors: `t0`, `t1`, …
fn named_tensors(max: usize) -> impl Strategy<Value = Vec<Tensor>> {
    (1..=max).prop_flat_map(|n| {
        (0..n)
            .map(|i| tensor_named(format!("t{i}")))
            .collect::<Vec<_>>()
    })
}

fn manifest() -> impl Strategy<Value = Manifest> {
    (
        (model_name(), any::<u64>(), model_version(), digest()),
        (1u64..=limits::MAX_ARTIFACT_BYTES, any::<i64>()),
        (named_tensors(3), named_tensors(3), any::<bool>()),
        (0.0f64..1.0, 0.0f64..1.0),
        (
            proptest::option::of(digest()),
            proptest::option::of((0u64..100, 0u64..100, 0u64..100)),
        ),
    )
        .prop_map(
            |(
                (name, release, version, sha256),
                (size, created_at_ms),
                (ins, outs, sym),
                (abs, rel),
                (profile, min),
            )| {
                Manifest {
                    v: V1,
                    name,
                    release,
                    version,
                    sha256,
                    size,
                    inputs: ins.iter().map(|t| spec_for(t, sym)).collect(),
                    outputs: outs.iter().map(|t| spec_for(t, sym)).collect(),
                    self_test: SelfTest {
                        inputs: ins,
                        outputs: outs,
                        tolerance: Tolerance { abs, rel },
                    },
                    profile_size: profile.map(|_| 1 + size % 4096),
                    profile_sha256: profile,
                    min_agent_version: min.map(|(a, b, c)| format!("{a}.{b}.{c}")),
                    created_at_ms,
                }
            },
        )
}

fn signing_key() -> impl Strategy<Value = SigningKey> {
    any::<[u8; 32]>().prop_map(|seed| SigningKey::from_bytes(&seed))
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (text(), vec(any::<u8>(), 0..200), signing_key())
        .prop_map(|(kind, payload, key)| Envelope::sign(&kind, payload, &key))
}

fn directive() -> impl Strategy<Value = Directive> {
    (
        device_id(),
        any::<u64>(),
        any::<i64>(),
        1i64..1_000_000_000,
        vec(
            (envelope(), any::<bool>(), proptest::option::of(text())),
            0..3,
        ),
    )
        .prop_map(|(device, seq, issued, validity, models)| Directive {
            v: V1,
            device,
            seq,
            issued_at_ms: issued / 2,
            expires_at_ms: issued / 2 + validity,
            models: models
                .into_iter()
                .map(|(manifest, rollback, rollout)| ModelDirective {
                    manifest,
                    rollback,
                    rollout,
                })
                .collect(),
        })
}

fn model_ref() -> impl Strategy<Value = ModelRef> {
    (any::<u64>(), model_version(), digest()).prop_map(|(release, version, sha256)| ModelRef {
        release,
        version,
        sha256,
    })
}

fn install_phase() -> impl Strategy<Value = InstallPhase> {
    prop_oneof![
        Just(InstallPhase::Idle),
        (any::<u64>(), any::<u64>())
            .prop_map(|(received, total)| InstallPhase::Downloading { received, total }),
        Just(InstallPhase::Verifying),
        Just(InstallPhase::Staging),
        Just(InstallPhase::SelfTest),
        Just(InstallPhase::Active),
        text().prop_map(|reason| InstallPhase::Failed { reason }),
        text().prop_map(|reason| InstallPhase::RolledBack { reason }),
    ]
}

fn state() -> impl Strategy<Value = State> {
    let model_state = (
        model_name(),
        proptest::option::of(model_ref()),
        proptest::option::of(model_ref()),
        proptest::option::of(model_ref()),
        vec(model_ref(), 0..3),
        install_phase(),
    )
        .prop_map(
            |(name, active, previous, target, installed, phase)| ModelState {
                name,
                active,
                previous,
                target,
                installed,
                phase,
            },
        );
    let refusal = (
        proptest::option::of(any::<u64>()),
        text(),
        text(),
        any::<i64>(),
    )
        .prop_map(|(seq, code, reason, at_ms)| Refusal {
            seq,
            code,
            reason,
            at_ms,
        });
    let condition = (text(), text(), any::<i64>()).prop_map(|(code, detail, since_ms)| Condition {
        code,
        detail,
        since_ms,
    });
    (
        device_id(),
        text(),
        any::<i64>(),
        proptest::option::of(any::<u64>()),
        vec(model_state, 0..3),
        proptest::option::of(refusal),
        vec(condition, 0..2),
    )
        .prop_map(
            |(device, agent_version, at_ms, directive_seq, models, refused, conditions)| State {
                v: V1,
                device,
                agent_version,
                at_ms,
                directive_seq,
                models,
                refused,
                conditions,
            },
        )
}

fn histogram() -> impl Strategy<Value = LatencyHistogram> {
    (
        btree_map(0u16..BUCKETS as u16, 0u64..1_000_000, 0..10),
        finite_f64(),
        finite_f64(),
    )
        .prop_map(|(buckets, sum_us, max_us)| LatencyHistogram {
            count: buckets.values().sum(),
            buckets,
            sum_us,
            max_us,
        })
}

fn counters() -> impl Strategy<Value = BTreeMap<String, u64>> {
    btree_map(text(), any::<u64>(), 0..4)
}

fn item_body() -> impl Strategy<Value = ItemBody> {
    let telemetry = (
        model_name(),
        any::<u64>(),
        model_version(),
        any::<u64>(),
        any::<u64>(),
        counters(),
        histogram(),
    )
        .prop_map(
            |(model, release, version, interval_ms, inferences, errors, latency)| {
                ItemBody::Telemetry(Telemetry {
                    model,
                    release,
                    version,
                    interval_ms,
                    inferences,
                    errors,
                    latency,
                })
            },
        );
    let health = (
        finite_f32(),
        any::<[u64; 6]>(),
        btree_map(text(), finite_f32(), 0..3),
        (any::<[u64; 4]>(), counters()),
    )
        .prop_map(|(cpu_percent, n, temperatures_c, (l, dropped))| {
            ItemBody::Health(Health {
                cpu_percent,
                mem_used_bytes: n[0],
                mem_total_bytes: n[1],
                disk_free_bytes: n[2],
                disk_total_bytes: n[3],
                temperatures_c,
                agent_rss_bytes: n[4],
                uptime_s: n[5],
                link: LinkStats {
                    connects: l[0],
                    disconnects: l[1],
                    bytes_in: l[2],
                    bytes_out: l[3],
                    dropped,
                },
            })
        });
    let feature = (
        any::<u32>(),
        vec(any::<u64>(), 0..12),
        any::<u64>(),
        [finite_f64(), finite_f64(), finite_f64(), finite_f64()],
        any::<bool>(),
    )
        .prop_map(|(index, counts, missing, f, drifted)| FeatureWindow {
            index,
            counts,
            missing,
            sum: f[0],
            sum_sq: f[1],
            psi: f[2],
            effect: f[3],
            drifted,
            cusum_alarms: missing / 2,
        });
    let prediction = (
        vec(any::<u64>(), 0..10),
        vec(any::<u64>(), 0..10),
        finite_f64(),
        any::<bool>(),
    )
        .prop_map(
            |(class_counts, max_prob_counts, psi, drifted)| PredictionWindow {
                class_counts,
                max_prob_counts,
                psi,
                drifted,
                max_prob_psi: psi / 2.0,
                value_counts: vec![],
            },
        );
    let drift = (
        (model_name(), any::<u64>(), any::<u32>()),
        (any::<i32>(), 0i64..1_000_000, any::<u64>()),
        vec(feature, 0..4),
        proptest::option::of(prediction),
        (0.0f64..=1.0, finite_f64()),
    )
        .prop_map(
            |(
                (model, release, window),
                (start, len, samples),
                features,
                prediction,
                (share, max),
            )| {
                ItemBody::Drift(DriftWindow {
                    model,
                    release,
                    window,
                    started_at_ms: i64::from(start),
                    ended_at_ms: i64::from(start) + len,
                    samples,
                    features,
                    prediction,
                    drifted_share: share,
                    max_score: max,
                    drifted: share > 0.0,
                })
            },
        );
    let sample = (model_name(), any::<u64>(), text(), vec(any::<u8>(), 0..64)).prop_map(
        |(model, release, format, data)| {
            ItemBody::Sample(Sample {
                model,
                release,
                format,
                data,
            })
        },
    );
    let event_kind = proptest::sample::select(vec![
        EventKind::DirectiveAccepted,
        EventKind::DirectiveRefused,
        EventKind::InstallStarted,
        EventKind::InstallFailed,
        EventKind::Activated,
        EventKind::RolledBack,
        EventKind::Retired,
        EventKind::Recovered,
    ]);
    let event = (
        proptest::option::of(model_name()),
        proptest::option::of(any::<u64>()),
        event_kind,
        text(),
    )
        .prop_map(|(model, release, event, detail)| {
            ItemBody::Event(Event {
                model,
                release,
                event,
                detail,
            })
        });
    let evictions = counters().prop_map(|evicted| ItemBody::Evictions(Evictions { evicted }));
    prop_oneof![telemetry, health, drift, sample, event, evictions]
}

fn batch() -> impl Strategy<Value = Batch> {
    (
        device_id(),
        proptest::collection::btree_set(any::<u64>(), 0..6),
        vec((any::<i64>(), item_body()), 6),
    )
        .prop_map(|(device, ids, bodies)| Batch {
            v: V1,
            device,
            // Before the first id, when there is one: what the agent sends.
            after: ids.iter().next().and_then(|first| first.checked_sub(1)),
            items: ids
                .into_iter()
                .zip(bodies)
                .map(|(id, (at_ms, body))| Item { id, at_ms, body })
                .collect(),
        })
}

fn status() -> impl Strategy<Value = Status> {
    (any::<bool>(), any::<i64>(), "[0-9a-z.+-]{1,20}").prop_map(|(online, at_ms, agent_version)| {
        Status {
            v: V1,
            state: if online {
                Presence::Online
            } else {
                Presence::Offline
            },
            at_ms,
            agent_version,
        }
    })
}

fn chunk_request() -> impl Strategy<Value = ChunkRequest> {
    (
        digest(),
        0u64..u64::MAX / 2,
        1u32..=limits::MAX_CHUNK_DATA_BYTES as u32,
    )
        .prop_map(|(sha256, offset, len)| ChunkRequest {
            v: V1,
            sha256,
            offset,
            len,
        })
}

// ---------------------------------------------------------------------------------------------
// Round trips

fn assert_round_trip<M: WireMessage + PartialEq + std::fmt::Debug>(message: &M) {
    let bytes = encode(message);
    let back: M =
        decode(&bytes).unwrap_or_else(|e| panic!("{e}\n{}", String::from_utf8_lossy(&bytes)));
    assert_eq!(&back, message);
    // Encoding is deterministic, so what is signed can be re-derived byte for byte.
    assert_eq!(encode(&back), bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn manifest_round_trips(m in manifest()) { assert_round_trip(&m); }

    #[test]
    fn directive_round_trips(d in directive()) { assert_round_trip(&d); }

    #[test]
    fn envelope_round_trips(e in envelope()) { assert_round_trip(&e); }

    #[test]
    fn state_round_trips(s in state()) { assert_round_trip(&s); }

    #[test]
    fn status_round_trips(s in status()) { assert_round_trip(&s); }

    #[test]
    fn batch_round_trips(b in batch()) { assert_round_trip(&b); }

    #[test]
    fn ack_round_trips(up_to in any::<u64>()) { assert_round_trip(&Ack { v: V1, up_to }); }

    #[test]
    fn chunk_request_round_trips(r in chunk_request()) { assert_round_trip(&r); }

    #[test]
    fn tensor_round_trips(t in tensor()) {
        let json = serde_json::to_vec(&t).unwrap();
        prop_assert_eq!(serde_json::from_slice::<Tensor>(&json).unwrap(), t);
    }

    #[test]
    fn chunk_reply_round_trips(
        sha in digest(),
        offset in any::<u64>(),
        data in vec(any::<u8>(), 0..2048),
    ) {
        let header = ChunkHeader { status: ChunkStatus::Ok, sha256: sha, offset };
        let bytes = encode_chunk(&header, &data);
        let (h, d) = decode_chunk(&bytes).unwrap();
        prop_assert_eq!(h, header);
        prop_assert_eq!(d, &data[..]);
    }
}

// ---------------------------------------------------------------------------------------------
// Signatures

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_changed_payload_byte_is_rejected(
        key in signing_key(),
        payload in vec(any::<u8>(), 1..512),
        index in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let ring: KeyRing = [key.verifying_key()].into_iter().collect();
        let mut envelope = Envelope::sign(MANIFEST_TYPE, payload, &key);
        prop_assert!(envelope.open(&ring, MANIFEST_TYPE).is_ok());
        let i = index.index(envelope.payload.len());
        envelope.payload[i] ^= flip;
        let rejected = matches!(
            envelope.open(&ring, MANIFEST_TYPE),
            Err(TrustError::BadSignature { .. })
        );
        prop_assert!(rejected);
    }

    #[test]
    fn any_changed_signature_byte_is_rejected(
        key in signing_key(),
        payload in vec(any::<u8>(), 0..512),
        index in 0usize..64,
        flip in 1u8..=255,
    ) {
        let ring: KeyRing = [key.verifying_key()].into_iter().collect();
        let mut envelope = Envelope::sign(DIRECTIVE_TYPE, payload, &key);
        envelope.sig[index] ^= flip;
        let rejected = matches!(
            envelope.open(&ring, DIRECTIVE_TYPE),
            Err(TrustError::BadSignature { .. })
        );
        prop_assert!(rejected);
    }

    #[test]
    fn changed_bytes_in_the_encoded_envelope_never_verify(
        key in signing_key(),
        payload in vec(any::<u8>(), 1..256),
        index in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        // Tampering with the JSON text itself (base64, key id, type) either breaks decoding
        // or the signature; it never yields a different verified payload.
        let ring: KeyRing = [key.verifying_key()].into_iter().collect();
        let envelope = Envelope::sign(MANIFEST_TYPE, payload.clone(), &key);
        let mut bytes = encode(&envelope);
        let i = index.index(bytes.len());
        bytes[i] ^= flip;
        if let Ok(tampered) = decode::<Envelope>(&bytes) {
            if let Ok(opened) = tampered.open(&ring, MANIFEST_TYPE) {
                prop_assert_eq!(opened, &payload[..]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Topics

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn topics_round_trip_for_every_legal_id(
        id in device_id(),
        root in "[a-z]{1,8}(/[a-z0-9_-]{1,8}){0,2}",
    ) {
        let topics = Topics::new(root).unwrap();
        for kind in TopicKind::ALL {
            let topic = topics.topic(&id, kind);
            prop_assert_eq!(topics.parse(&topic).unwrap(), (id.clone(), kind));
        }
    }

    #[test]
    fn ids_with_forbidden_characters_are_refused(
        id in ident(),
        bad in proptest::sample::select(vec!['/', '+', '#', '\0', ' ', 'é', '\n']),
        at in any::<prop::sample::Index>(),
    ) {
        let mut chars: Vec<char> = id.chars().collect();
        let i = at.index(chars.len() + 1);
        chars.insert(i, bad);
        let s: String = chars.into_iter().collect();
        prop_assert!(DeviceId::new(s.clone()).is_err());
        // The same string as a topic segment is refused too, never parsed as someone else's.
        let parsed = Topics::default().parse(&format!("driftgate/d/{s}/state"));
        prop_assert!(parsed.is_err());
    }

    #[test]
    fn ids_longer_than_128_bytes_are_refused(id in "[A-Za-z0-9._-]{129,300}") {
        prop_assert!(DeviceId::new(id.clone()).is_err());
        let topic = format!("driftgate/d/{id}/up");
        prop_assert!(Topics::default().parse(&topic).is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// No decoder of network bytes panics

fn decode_everything(bytes: &[u8]) {
    let _ = decode::<Directive>(bytes);
    let _ = decode::<Manifest>(bytes);
    let _ = decode::<Envelope>(bytes);
    let _ = decode::<State>(bytes);
    let _ = decode::<Status>(bytes);
    let _ = decode::<Batch>(bytes);
    let _ = decode::<Ack>(bytes);
    let _ = decode::<ChunkRequest>(bytes);
    let _ = decode_chunk(bytes);
    let _ = serde_json::from_slice::<Tensor>(bytes);
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = Topics::default().parse(text);
        let _ = Topics::new(text);
    }
    if let Ok(envelope) = decode::<Envelope>(bytes) {
        let ring: KeyRing = [SigningKey::from_bytes(&[7; 32]).verifying_key()]
            .into_iter()
            .collect();
        let device = DeviceId::new("dev-1").unwrap();
        let _ = trust::verify_directive(&envelope, &ring, &device, Some(3), 0);
        let _ = trust::verify_manifest(&envelope, &ring);
    }
}

/// A valid encoding of some message, to mutate: random bytes rarely get past the first `{`.
fn valid_encoding() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        manifest().prop_map(|m| encode(&m)),
        directive().prop_map(|d| encode(&d)),
        state().prop_map(|s| encode(&s)),
        batch().prop_map(|b| encode(&b)),
        chunk_request().prop_map(|r| encode(&r)),
        (digest(), any::<u64>(), vec(any::<u8>(), 0..64)).prop_map(|(sha256, offset, data)| {
            encode_chunk(
                &ChunkHeader {
                    status: ChunkStatus::Ok,
                    sha256,
                    offset,
                },
                &data,
            )
        }),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index),
    Truncate(prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<prop::sample::Index>().prop_map(Mutation::Delete),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn no_decoder_panics_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..4096)) {
        decode_everything(&bytes);
    }

    #[test]
    fn no_decoder_panics_on_mutated_messages(
        mut bytes in valid_encoding(),
        mutations in vec(mutation(), 1..6),
    ) {
        for m in mutations {
            if bytes.is_empty() {
                break;
            }
            match m {
                Mutation::Flip(i, b) => { let i = i.index(bytes.len()); bytes[i] ^= b; }
                Mutation::Insert(i, b) => { let i = i.index(bytes.len() + 1); bytes.insert(i, b); }
                Mutation::Delete(i) => { let i = i.index(bytes.len()); bytes.remove(i); }
                Mutation::Truncate(i) => { let i = i.index(bytes.len()); bytes.truncate(i); }
            }
        }
        decode_everything(&bytes);
    }
}

#[test]
fn oversized_and_future_messages_are_refused_with_their_reason() {
    let huge = vec![b' '; limits::MAX_CONTROL_MESSAGE_BYTES + 1];
    assert!(matches!(
        decode::<Directive>(&huge),
        Err(DecodeError::TooLarge { .. })
    ));
    assert!(matches!(
        decode::<Ack>(br#"{"v":2,"up_to":5,"new_field":true}"#),
        Err(DecodeError::UnsupportedVersion { v: 2, .. })
    ));
    assert!(matches!(
        decode::<Ack>(br#"{"up_to":5}"#),
        Err(DecodeError::NoVersion { .. })
    ));
    // Unknown fields are ignored: a newer peer may add optional ones.
    let ack: Ack = decode(br#"{"v":1,"up_to":5,"new_field":[1,2]}"#).unwrap();
    assert_eq!(ack.up_to, 5);
}

/// Crashing inputs kept under fuzz/regressions/, replayed so they stay fixed.
#[test]
fn fuzz_regressions_are_refused_without_panicking() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let Ok(targets) = std::fs::read_dir(&dir) else {
        return;
    };
    for target in targets {
        for file in std::fs::read_dir(target.unwrap().path()).unwrap() {
            let bytes = std::fs::read(file.unwrap().path()).unwrap();
            decode_everything(&bytes);
        }
    }
    let overflow = br#"{"v":1,"device":"d","items":[{"id":1,"at_ms":0,"body":{"kind":"health","cpu_percent":1e39,"mem_used_bytes":0,"mem_total_bytes":0,"disk_free_bytes":0,"disk_total_bytes":0,"agent_rss_bytes":0,"uptime_s":0}}]}"#;
    let err = decode::<Batch>(overflow).unwrap_err().to_string();
    assert!(err.contains("cpu_percent"), "{err}");
}
