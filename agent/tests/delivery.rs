//! Signed model delivery end to end: a real `edge-agent` process, a real broker, and a
//! test-side server (directives signed with the test fleet key, chunks from the responder).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{http, sample_manifest, sign_manifest, Control, Responder};
use fleet_protocol::tensor::compare_outputs;
use fleet_protocol::{InstallPhase, ModelState, State, Tensor};

/// An agent process, killed (SIGKILL) when dropped.
struct Agent {
    child: Child,
}

impl Agent {
    fn start(dir: &Path) -> Agent {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .args(["run", "--config"])
            .arg(dir.join("agent.toml"))
            .env("DRIFTGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("edge-agent starts");
        Agent { child }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(dir: &Path, device: &str, broker_port: u16, api_port: u16) {
    common::write_public_keys(dir);
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            r#"
device_id = "{device}"
data_dir = "data"
[broker]
url = "mqtt://127.0.0.1:{broker_port}"
reconnect_min_ms = 50
reconnect_max_ms = 1000
[trust]
release_keys = ["release.pub"]
fleet_keys = ["fleet.pub"]
[api]
listen = "127.0.0.1:{api_port}"
[fetch]
chunk_bytes = 16384
request_timeout_ms = 1000
"#
        ),
    )
    .unwrap();
}

fn model<'a>(state: &'a State, name: &str) -> Option<&'a ModelState> {
    state.models.iter().find(|m| m.name.as_str() == name)
}

fn active_version(state: &State, name: &str) -> Option<String> {
    model(state, name)
        .and_then(|m| m.active.as_ref())
        .map(|a| a.version.to_string())
}

/// Runs the self-test case of `models/{name}/{version}` through the agent's HTTP API.
fn infer_matches_self_test(api_port: u16, name: &str, version: &str) {
    let (_, manifest) = sample_manifest(name, version, 0);
    let body = serde_json::json!({ "inputs": manifest.self_test.inputs });
    let (status, text) = http(
        api_port,
        "POST",
        &format!("/v2/models/{name}/infer"),
        body.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{text}");
    let response: serde_json::Value = serde_json::from_str(&text).unwrap();
    let outputs: Vec<Tensor> = serde_json::from_value(response["outputs"].clone()).unwrap();
    compare_outputs(
        &manifest.self_test.outputs,
        &outputs,
        manifest.self_test.tolerance,
    )
    .unwrap_or_else(|e| panic!("{name} {version} through the API: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_switches_and_refuses_bad_versions_and_replays() {
    for broker in common::brokers("installs_switches_and_refuses_bad_versions_and_replays") {
        eprintln!("broker: {}", broker.name);
        let device = "dev-delivery";
        let dir = tempfile::tempdir().unwrap();
        let api_port = free_port();
        write_config(dir.path(), device, broker.port, api_port);
        let responder = Responder::start(broker.port, common::Faults::default()).await;
        let mut control = Control::start(broker.port, device).await;

        let (v1_bytes, v1) = sample_manifest("digits-mlp", "v1", 1);
        let (v2_bytes, v2) = sample_manifest("digits-mlp", "v2", 2);
        let (v3_bytes, v3) = sample_manifest("digits-mlp", "v3", 3);
        responder.add(v1_bytes);
        responder.add(v2_bytes);

        let agent = Agent::start(dir.path());
        control.wait_for("the agent's first state", |_| true).await;

        // v1 arrives, installs, and serves exactly its self-test outputs.
        let d1 = common::directive(device, 1, vec![(sign_manifest(&v1), false)]);
        control.publish_directive(device, d1.clone()).await;
        control
            .wait_for("v1 active", |s| {
                active_version(s, "digits-mlp").as_deref() == Some("v1")
            })
            .await;
        infer_matches_self_test(api_port, "digits-mlp", "v1");

        // A new directive switches to v2.
        control
            .publish_directive(
                device,
                common::directive(device, 2, vec![(sign_manifest(&v2), false)]),
            )
            .await;
        control
            .wait_for("v2 active", |s| {
                active_version(s, "digits-mlp").as_deref() == Some("v2")
            })
            .await;
        infer_matches_self_test(api_port, "digits-mlp", "v2");

        // The server's copy of v3 was swapped: the digest check refuses it, v2 keeps serving.
        let mut swapped = v3_bytes.clone();
        let middle = swapped.len() / 2;
        swapped[middle] ^= 1;
        responder.insert(v3.sha256, swapped);
        control
            .publish_directive(
                device,
                common::directive(device, 3, vec![(sign_manifest(&v3), false)]),
            )
            .await;
        let state = control
            .wait_for("the swapped artifact refused", |s| {
                matches!(
                    &model(s, "digits-mlp").unwrap().phase,
                    InstallPhase::Failed { .. }
                )
            })
            .await;
        let reason = format!("{:?}", model(&state, "digits-mlp").unwrap().phase);
        assert!(reason.contains("hash mismatch"), "{reason}");
        assert_eq!(active_version(&state, "digits-mlp").as_deref(), Some("v2"));
        infer_matches_self_test(api_port, "digits-mlp", "v2");

        // A genuine artifact whose self-test expectations it does not meet is not activated.
        responder.add(v3_bytes);
        let mut wrong = v3.clone();
        wrong.release = 4;
        let label = wrong
            .self_test
            .outputs
            .iter_mut()
            .find(|t| t.name == "label")
            .unwrap();
        if let fleet_protocol::TensorData::I64(labels) = &mut label.data {
            labels[0] = (labels[0] + 1) % 10;
        }
        control
            .publish_directive(
                device,
                common::directive(device, 4, vec![(sign_manifest(&wrong), false)]),
            )
            .await;
        let state = control
            .wait_for("the failing self-test refused", |s| {
                s.directive_seq == Some(4)
                    && matches!(&model(s, "digits-mlp").unwrap().phase, InstallPhase::Failed { reason } if reason.contains("self-test"))
            })
            .await;
        assert_eq!(active_version(&state, "digits-mlp").as_deref(), Some("v2"));
        infer_matches_self_test(api_port, "digits-mlp", "v2");

        // After a restart, the old directive published again is refused and reported, and the
        // agent still serves v2 (recovered from disk before any broker traffic).
        agent.kill();
        let _agent = Agent::start(dir.path());
        control.publish_directive(device, d1).await;
        let state = control
            .wait_for("the replay refused", |s| {
                s.refused
                    .as_ref()
                    .is_some_and(|r| r.code == "replayed_sequence")
            })
            .await;
        assert_eq!(state.directive_seq, Some(4));
        assert_eq!(active_version(&state, "digits-mlp").as_deref(), Some("v2"));
        infer_matches_self_test(api_port, "digits-mlp", "v2");
    }
}
