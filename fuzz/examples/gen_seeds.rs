//! Writes the seed corpora under `fuzz/seeds/<target>/`: one small, valid input per message
//! shape, built with fleet-protocol itself so they always match the wire contract.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds` (rewrites the files; run it
//! after a change of the wire format and commit the result).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use driftgate_fuzz::verify_input::{self, Mode, SEED_NOW_MS};
use fleet_protocol::chunk::{encode_chunk, ChunkHeader, ChunkStatus};
use fleet_protocol::codec::{encode, WireMessage};
use fleet_protocol::drift::{DriftWindow, FeatureWindow, PredictionWindow};
use fleet_protocol::histogram::LatencyHistogram;
use fleet_protocol::outbox::{Event, EventKind, Evictions, Health, LinkStats, Sample, Telemetry};
use fleet_protocol::state::{Condition, ModelRef, Presence, Refusal};
use fleet_protocol::tensor::Dim;
use fleet_protocol::*;

const HOUR_MS: i64 = 3_600_000;

fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds")
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = seeds_dir().join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

/// Encodes, and checks the encoding decodes (a seed the decoder refuses is useless).
fn wire<M: WireMessage>(message: &M) -> Vec<u8> {
    let bytes = encode(message);
    if let Err(e) = decode::<M>(&bytes) {
        panic!("seed {} does not decode: {e}", M::KIND);
    }
    bytes
}

fn manifest() -> Manifest {
    let spec = |name: &str, n: u64| TensorSpec {
        name: name.into(),
        datatype: ElementType::F32,
        shape: vec![Dim::Symbolic("N".into()), Dim::Fixed(n)],
    };
    Manifest {
        v: V1,
        name: ModelName::new("digits").unwrap(),
        release: 3,
        version: ModelVersion::new("v3").unwrap(),
        sha256: Sha256Digest::of(b"model"),
        size: 1234,
        inputs: vec![spec("input", 2)],
        outputs: vec![spec("probs", 3)],
        self_test: SelfTest {
            inputs: vec![
                Tensor::new("input", vec![1, 2], TensorData::F32(vec![0.5, -1.0])).unwrap(),
            ],
            outputs: vec![
                Tensor::new("probs", vec![1, 3], TensorData::F32(vec![0.25, 0.5, 0.25])).unwrap(),
            ],
            tolerance: Tolerance::default(),
        },
        profile_sha256: None,
        profile_size: None,
        min_agent_version: Some("0.1.0".into()),
        created_at_ms: SEED_NOW_MS - 48 * HOUR_MS,
    }
}

fn directive(manifest_envelope: Envelope) -> Directive {
    Directive {
        v: V1,
        device: verify_input::device(),
        seq: 7,
        issued_at_ms: SEED_NOW_MS - HOUR_MS,
        expires_at_ms: SEED_NOW_MS + 24 * HOUR_MS,
        models: vec![ModelDirective {
            manifest: manifest_envelope,
            rollback: false,
            rollout: Some("r1".into()),
        }],
    }
}

fn model_ref() -> ModelRef {
    ModelRef {
        release: 3,
        version: ModelVersion::new("v3").unwrap(),
        sha256: Sha256Digest::of(b"model"),
    }
}

fn state() -> State {
    State {
        v: V1,
        device: verify_input::device(),
        agent_version: "0.1.0".into(),
        at_ms: SEED_NOW_MS,
        directive_seq: Some(7),
        models: vec![ModelState {
            name: ModelName::new("digits").unwrap(),
            active: Some(model_ref()),
            previous: None,
            target: Some(model_ref()),
            installed: vec![model_ref()],
            phase: InstallPhase::Downloading {
                received: 10,
                total: 1234,
            },
        }],
        refused: Some(Refusal {
            seq: Some(6),
            code: "replayed_sequence".into(),
            reason: "seq 6".into(),
            at_ms: SEED_NOW_MS,
        }),
        conditions: vec![Condition {
            code: Condition::DISK_FULL.into(),
            detail: "data dir: 0 bytes free".into(),
            since_ms: SEED_NOW_MS,
        }],
    }
}

fn batch() -> Batch {
    let mut latency = LatencyHistogram::default();
    for us in [150.0, 900.0, 900.0, 12_000.0] {
        latency.record_us(us);
    }
    let model = || ModelName::new("digits").unwrap();
    let bodies = vec![
        ItemBody::Telemetry(Telemetry {
            model: model(),
            release: 3,
            version: ModelVersion::new("v3").unwrap(),
            interval_ms: 60_000,
            inferences: 4,
            errors: BTreeMap::from([("bad_shape".into(), 1)]),
            latency,
        }),
        ItemBody::Health(Health {
            cpu_percent: 12.5,
            mem_used_bytes: 1 << 20,
            mem_total_bytes: 1 << 30,
            disk_free_bytes: 1 << 31,
            disk_total_bytes: 1 << 32,
            temperatures_c: BTreeMap::from([("cpu".into(), 48.5)]),
            agent_rss_bytes: 1 << 22,
            uptime_s: 3600,
            link: LinkStats {
                connects: 1,
                disconnects: 0,
                bytes_in: 100,
                bytes_out: 200,
                dropped: BTreeMap::from([("malformed".into(), 2)]),
            },
        }),
        ItemBody::Drift(DriftWindow {
            model: model(),
            release: 3,
            window: 256,
            started_at_ms: SEED_NOW_MS - HOUR_MS,
            ended_at_ms: SEED_NOW_MS,
            samples: 256,
            features: vec![FeatureWindow {
                index: 0,
                counts: vec![1, 100, 150, 5],
                missing: 0,
                sum: 12.25,
                sum_sq: 40.5,
                psi: 0.02,
                effect: -0.1,
                drifted: false,
                cusum_alarms: 0,
            }],
            prediction: Some(PredictionWindow {
                class_counts: vec![100, 156],
                max_prob_counts: vec![6, 250],
                psi: 0.3,
                drifted: true,
                max_prob_psi: 0.01,
                value_counts: vec![],
            }),
            drifted_share: 0.0,
            max_score: 0.02,
            drifted: true,
        }),
        ItemBody::Sample(Sample {
            model: model(),
            release: 3,
            format: "f32le".into(),
            data: vec![0, 0, 0, 63, 0, 0, 128, 191],
        }),
        ItemBody::Event(Event {
            model: Some(model()),
            release: Some(3),
            event: EventKind::RolledBack,
            detail: "self-test failed".into(),
        }),
        ItemBody::Evictions(Evictions {
            evicted: BTreeMap::from([("sample".into(), 12)]),
        }),
    ];
    Batch {
        v: V1,
        device: verify_input::device(),
        after: Some(99),
        items: bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| Item {
                id: 100 + i as u64,
                at_ms: SEED_NOW_MS,
                body,
            })
            .collect(),
    }
}

fn main() {
    let keys = verify_input::keys();
    let manifest = manifest();
    let manifest_bytes = wire(&manifest);
    let manifest_envelope = Envelope::sign(MANIFEST_TYPE, manifest_bytes.clone(), &keys.trusted);
    let directive = directive(manifest_envelope.clone());
    let directive_bytes = wire(&directive);
    let directive_envelope = Envelope::sign(DIRECTIVE_TYPE, directive_bytes.clone(), &keys.trusted);

    // decode_messages: one valid encoding per message type.
    let messages: Vec<(&str, Vec<u8>)> = vec![
        ("directive.json", directive_bytes.clone()),
        ("manifest.json", manifest_bytes.clone()),
        ("envelope.json", wire(&directive_envelope)),
        ("state.json", wire(&state())),
        (
            "status.json",
            wire(&Status {
                v: V1,
                state: Presence::Online,
                at_ms: SEED_NOW_MS,
                agent_version: "0.1.0".into(),
            }),
        ),
        ("batch.json", wire(&batch())),
        ("ack.json", wire(&Ack { v: V1, up_to: 105 })),
        (
            "chunk_request.json",
            wire(&ChunkRequest {
                v: V1,
                sha256: Sha256Digest::of(b"model"),
                offset: 262_144,
                len: 262_144,
            }),
        ),
    ];
    for (name, bytes) in &messages {
        write("decode_messages", name, bytes);
    }
    // Reference profiles as `fleetctl profile build` writes them: the two smallest committed
    // ones (a rank-4 image input with derived features, and a tabular classifier).
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    for (name, file) in [
        ("profile-digits-cnn.json", "digits-cnn/v1.profile.json"),
        ("profile-wine.json", "wine-forest/v1.profile.json"),
    ] {
        let bytes = fs::read(models.join(file)).unwrap();
        if let Err(e) = decode::<ReferenceProfile>(&bytes) {
            panic!("seed {file} does not decode: {e}");
        }
        write("decode_messages", name, &bytes);
    }

    // sample_binary: a classifier's inputs and outputs, and a boolean tensor.
    let input = Tensor::new(
        "input",
        vec![1, 4],
        TensorData::F32(vec![0.5, -1.0, 3.25, 16.0]),
    )
    .unwrap();
    let label = Tensor::new("label", vec![1], TensorData::I64(vec![3])).unwrap();
    let probabilities = Tensor::new(
        "probabilities",
        vec![1, 2],
        TensorData::F32(vec![0.25, 0.75]),
    )
    .unwrap();
    write(
        "sample_binary",
        "classifier.bin",
        &sample::encode(&[input], &[label, probabilities]),
    );
    let mask = Tensor::new("mask", vec![3], TensorData::Bool(vec![true, false, true])).unwrap();
    write("sample_binary", "bool.bin", &sample::encode(&[mask], &[]));

    // chunk_reply
    let header = |status| ChunkHeader {
        status,
        sha256: Sha256Digest::of(b"model"),
        offset: 262_144,
    };
    write(
        "chunk_reply",
        "ok.bin",
        &encode_chunk(&header(ChunkStatus::Ok), b"ONNX data"),
    );
    write(
        "chunk_reply",
        "busy.bin",
        &encode_chunk(&header(ChunkStatus::Busy), b""),
    );

    // topic_parse: topics under the default root, a root, and "root\ntopic".
    let topics = Topics::default();
    let dev = verify_input::device();
    write(
        "topic_parse",
        "directive",
        topics.topic(&dev, TopicKind::Directive).as_bytes(),
    );
    write(
        "topic_parse",
        "up",
        topics.topic(&dev, TopicKind::Up).as_bytes(),
    );
    write("topic_parse", "root", b"acme/fleet");
    write(
        "topic_parse",
        "root_and_topic",
        b"acme/fleet\nacme/fleet/d/pi.4/chunk",
    );

    // tensor_json: the example of the Open Inference Protocol form, plus other types.
    let tensors = [
        (
            "fp32.json",
            Tensor::new("input", vec![1, 2], TensorData::F32(vec![0.5, -1.25])),
        ),
        (
            "int64.json",
            Tensor::new("labels", vec![3], TensorData::I64(vec![-1, 0, i64::MAX])),
        ),
        (
            "bool.json",
            Tensor::new("mask", vec![2, 1], TensorData::Bool(vec![true, false])),
        ),
        (
            "uint8_scalar.json",
            Tensor::new("s", vec![], TensorData::U8(vec![255])),
        ),
    ];
    for (name, tensor) in tensors {
        write(
            "tensor_json",
            name,
            &serde_json::to_vec(&tensor.unwrap()).unwrap(),
        );
    }

    // verify_directive: header + payload (see fuzz_targets/verify_directive.rs).
    let v = |mode, seq, payload: &[u8]| verify_input::build(mode, seq, SEED_NOW_MS, payload);
    write(
        "verify_directive",
        "signed_directive",
        &v(Mode::SignedDirective, Some(6), &directive_bytes),
    );
    write(
        "verify_directive",
        "signed_manifest",
        &v(Mode::SignedManifest, None, &manifest_bytes),
    );
    write(
        "verify_directive",
        "envelope_json",
        &v(Mode::Json, None, &wire(&directive_envelope)),
    );
    write(
        "verify_directive",
        "manifest_envelope_json",
        &v(Mode::Json, None, &wire(&manifest_envelope)),
    );
    write(
        "verify_directive",
        "untrusted",
        &v(Mode::UntrustedDirective, None, &directive_bytes),
    );
}
