//! Signed model delivery end to end: a real `edge-agent` process, a real broker, and a
//! test-side server (directives signed with the test fleet key, chunks from the responder).

mod common;

use common::agent::{active_version, model, write_config, Agent};
use common::{sample_manifest, sign_manifest, Control, Responder};
use fleet_protocol::InstallPhase;

/// Runs the self-test case of the sample `models/{name}/{version}` through the agent's API.
fn infer_matches_self_test(api_port: u16, name: &str, version: &str) {
    let (_, manifest) = sample_manifest(name, version, 0);
    common::agent::infer_matches_self_test(api_port, &manifest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_switches_and_refuses_bad_versions_and_replays() {
    for broker in common::brokers("installs_switches_and_refuses_bad_versions_and_replays") {
        eprintln!("broker: {}", broker.name);
        let device = "dev-delivery";
        let dir = tempfile::tempdir().unwrap();
        let api_port = common::free_port();
        write_config(
            dir.path(),
            device,
            broker.port,
            api_port,
            "[fetch]\nchunk_bytes = 16384\nrequest_timeout_ms = 1000",
        );
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
