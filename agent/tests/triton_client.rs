//! A stock client of the Open Inference Protocol (NVIDIA's `tritonclient[http]` from PyPI)
//! against a real agent that installed its models over a real broker.
//!
//! Needs the Python package: `.ci/run` installs `agent/tests/python/requirements.txt` and sets
//! `DRIFTGATE_TEST_TRITONCLIENT=1`; without it the test says it was skipped.

mod common;

use std::process::Command;

use common::agent::{active_version, write_config, Agent};
use common::{directive, sample_manifest, sign_manifest, Control, Faults, Responder};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_reads_metadata_and_infers() {
    if !driftgate_tests::require_env(
        "tritonclient_reads_metadata_and_infers",
        "DRIFTGATE_TEST_TRITONCLIENT",
        "Python's tritonclient[http] (pip install -r agent/tests/python/requirements.txt)",
    ) {
        return;
    }
    let broker = common::embedded_broker();
    let device = "dev-triton";
    let dir = tempfile::tempdir().unwrap();
    let api_port = common::free_port();
    write_config(dir.path(), device, broker.port, api_port, "");
    // A tabular model (FP32 in, INT64 and FP32 out) and an image model (rank-4 input).
    let models = [
        sample_manifest("cancer-logreg", "v1", 1),
        sample_manifest("digits-cnn", "v1", 1),
    ];
    let responder = Responder::start(broker.port, Faults::default()).await;
    for (bytes, _) in &models {
        responder.add(bytes.clone());
    }
    let mut control = Control::start(broker.port, device).await;
    let _agent = Agent::start(dir.path());
    control.wait_for("the agent's first state", |_| true).await;
    control
        .publish_directive(
            device,
            directive(
                device,
                1,
                models
                    .iter()
                    .map(|(_, m)| (sign_manifest(m), false))
                    .collect(),
            ),
        )
        .await;
    control
        .wait_for("both models active", |s| {
            active_version(s, "cancer-logreg").is_some()
                && active_version(s, "digits-cnn").is_some()
        })
        .await;

    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/triton_client.py");
    for (_, manifest) in &models {
        let case = common::models_dir()
            .join(manifest.name.as_str())
            .join(format!("{}.selftest.json", manifest.version));
        let output = Command::new(driftgate_tests::python())
            .arg(&script)
            .args(["--url", &format!("127.0.0.1:{api_port}")])
            .args(["--model", manifest.name.as_str()])
            .args(["--version", manifest.version.as_str()])
            .arg("--case")
            .arg(&case)
            .output()
            .expect("python runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        eprintln!("{} {}:\n{stdout}", manifest.name, manifest.version);
        assert!(
            output.status.success(),
            "tritonclient against {}: {stdout}\n{}",
            manifest.name,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
