//! The release smoke test, which `cross/test-arm.sh` runs natively and then under qemu-user
//! for each ARM target: a real agent process installs every sample model over a real broker,
//! answers each one's self-test inputs through its inference API, and the outputs must equal
//! the self-test's (computed by onnxruntime on x86) within the model's tolerance.
//!
//! - `DRIFTGATE_SMOKE_OUTPUTS=FILE` writes the outputs served, per model version (the x86
//!   run's record);
//! - `DRIFTGATE_SMOKE_REFERENCE=FILE` also compares them with such a record, within the same
//!   tolerance, so an ARM build is checked against the x86 build's own answers.
//!
//! It prints the agent's resident memory after idling with one small model active.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::agent::{infer_matches_self_test, rss_kib, write_config, Agent};
use common::{sample_manifest, sign_manifest, Control, Responder};
use fleet_protocol::tensor::compare_outputs;
use fleet_protocol::{Manifest, Tensor};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sample_model_serves_its_self_test_through_the_api() {
    let broker = common::embedded_broker();
    let device = "dev-smoke";
    let dir = tempfile::tempdir().unwrap();
    let api_port = common::free_port();
    write_config(dir.path(), device, broker.port, api_port, "");
    let responder = Responder::start(broker.port, common::Faults::default()).await;
    let mut control = Control::start(broker.port, device).await;
    let agent = Agent::start(dir.path());
    control.wait_for("the agent's first state", |_| true).await;

    // One small model, then idle: the footprint a device pays for Driftgate.
    let (bytes, cancer) = sample_manifest("cancer-logreg", "v1", 1);
    responder.add(bytes);
    control.install(device, 1, &cancer, false).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let emulated = std::env::var("DRIFTGATE_TARGET_RUNNER").is_ok_and(|r| !r.trim().is_empty());
    match rss_kib(agent.pid()) {
        Some(kib) => eprintln!(
            "idle RSS with cancer-logreg v1 active: {:.1} MiB{}",
            kib as f64 / 1024.0,
            if emulated {
                " (the qemu-user process, emulator included)"
            } else {
                ""
            }
        ),
        None => eprintln!("idle RSS: /proc/{}/status unreadable", agent.pid()),
    }

    // Then every sample model, digits-mlp through its three versions.
    let mut served: BTreeMap<String, Vec<Tensor>> = BTreeMap::new();
    let mut checked: Vec<Manifest> = Vec::new();
    let others: Vec<Manifest> = [("digits-cnn", "v1"), ("wine-forest", "v1")]
        .into_iter()
        .map(|(name, version)| {
            let (bytes, manifest) = sample_manifest(name, version, 1);
            responder.add(bytes);
            manifest
        })
        .collect();
    for (seq, version) in [(2, "v1"), (3, "v2"), (4, "v3")] {
        let (bytes, mlp) = sample_manifest("digits-mlp", version, seq);
        responder.add(bytes);
        let mut models = vec![&cancer, &mlp];
        models.extend(&others);
        let envelopes = models.iter().map(|m| (sign_manifest(m), false)).collect();
        control
            .publish_directive(device, common::directive(device, seq, envelopes))
            .await;
        control
            .wait_for(&format!("every model active, digits-mlp {version}"), |s| {
                models.iter().all(|m| {
                    common::agent::active_version(s, m.name.as_str()).as_deref()
                        == Some(m.version.as_str())
                })
            })
            .await;
        for manifest in models {
            let key = format!("{}/{}", manifest.name, manifest.version);
            if served.contains_key(&key) {
                continue;
            }
            let outputs = infer_matches_self_test(api_port, manifest);
            eprintln!("{key}: matches its self-test (onnxruntime)");
            served.insert(key, outputs);
            checked.push(manifest.clone());
        }
    }
    assert_eq!(served.len(), 6, "{:?}", served.keys());

    if let Ok(path) = std::env::var("DRIFTGATE_SMOKE_OUTPUTS") {
        std::fs::write(&path, serde_json::to_vec_pretty(&served).unwrap())
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        eprintln!("outputs written to {path}");
    }
    if let Ok(path) = std::env::var("DRIFTGATE_SMOKE_REFERENCE") {
        let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let reference: BTreeMap<String, Vec<Tensor>> =
            serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
        for manifest in &checked {
            let key = format!("{}/{}", manifest.name, manifest.version);
            let expected = reference
                .get(&key)
                .unwrap_or_else(|| panic!("{path} has no outputs for {key}"));
            compare_outputs(expected, &served[&key], manifest.self_test.tolerance)
                .unwrap_or_else(|e| panic!("{key} differs from {path}: {e}"));
            eprintln!("{key}: equals the reference run's outputs within the self-test tolerance");
        }
    }
}
