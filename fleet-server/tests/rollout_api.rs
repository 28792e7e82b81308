//! Rollouts through a running server's REST API (embedded broker, SQLite): creation and its
//! refusals, the engine reaching devices with signed directives, operator commands, the
//! rollback restoring every assignment, and the audit log behind each step. The devices here
//! never connect, so installs time out; real agents installing are the demo's and the
//! end-to-end tests' part.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_server::auth::{create_token, Role};
use fleet_server::client::{ApiClient, ClientError};
use fleet_server::config::ServerConfig;
use fleet_server::server::{self, RunningServer};
use fleet_server::{keyfile, release};
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

async fn start(dir: &Path, release_pub: &Path) -> RunningServer {
    let mut config = ServerConfig {
        data_dir: dir.join("server"),
        ..Default::default()
    };
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.broker.listen = "127.0.0.1:0".parse().unwrap();
    config.trust.release_keys = vec![release_pub.to_path_buf()];
    config.rollouts.tick_ms = 50;
    server::start(config).await.expect("the server starts")
}

fn sign(dir: &Path, keys: &Path, version: &str) -> (PathBuf, PathBuf) {
    let model = dir.join(format!("digits-mlp-{version}.onnx"));
    std::fs::copy(
        root().join(format!("models/digits-mlp/{version}.onnx")),
        &model,
    )
    .unwrap();
    let signed = release::sign_model(
        &release::SignRequest {
            model: model.clone(),
            name: "digits-mlp".parse().unwrap(),
            version: version.parse().unwrap(),
            release: None,
            self_test: Some(root().join(format!("models/digits-mlp/{version}.selftest.json"))),
            profile: None,
            min_agent_version: None,
            created_at_ms: 1,
        },
        &keyfile::read_signing_key(&keys.join("release.pem")).unwrap(),
    )
    .unwrap();
    let manifest = dir.join(format!("digits-mlp-{version}.manifest.json"));
    release::write_envelope(&manifest, &signed.envelope, true).unwrap();
    (model, manifest)
}

fn api_error(result: Result<Value, ClientError>) -> (u16, String, String) {
    match result {
        Err(ClientError::Api {
            status,
            code,
            message,
            ..
        }) => (status, code, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Polls `probe` on a blocking thread until it returns Some (10 s at most).
async fn eventually<T: Send + 'static>(
    what: &str,
    probe: impl Fn() -> Option<T> + Send + Sync + 'static,
) -> T {
    let probe = std::sync::Arc::new(probe);
    for _ in 0..200 {
        let p = probe.clone();
        if let Some(v) = tokio::task::spawn_blocking(move || p()).await.unwrap() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_are_created_refused_commanded_rolled_back_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    keyfile::generate(&keys, "release").unwrap();
    let running = start(dir.path(), &keys.join("release.pub")).await;
    let url = format!("http://{}", running.api_addr);
    let operator = create_token(&running.fleet.store, Role::Operator, "alice")
        .await
        .unwrap()
        .token;
    let viewer = create_token(&running.fleet.store, Role::Viewer, "bob")
        .await
        .unwrap()
        .token;
    let signed: Vec<(PathBuf, PathBuf)> = ["v1", "v2"]
        .iter()
        .map(|v| sign(dir.path(), &keys, v))
        .collect();

    let (u, t) = (url.clone(), operator.clone());
    tokio::task::spawn_blocking(move || {
        let api = ApiClient::new(&u, Some(t));
        for (model, manifest) in &signed {
            api.push_model(manifest, model, None, &mut |_, _| {})
                .unwrap();
        }
        for i in 0..10 {
            let site = if i < 5 { "berlin" } else { "paris" };
            api.post_json(
                "/api/v1/devices",
                &json!({"id": format!("dev-{i}"), "labels": {"site": site}}),
            )
            .unwrap();
            // Every device runs v1 before the rollout (as assigned).
            api.post_json(
                &format!("/api/v1/devices/dev-{i}/assign"),
                &json!({"model": "digits-mlp", "version": "v1"}),
            )
            .unwrap();
        }
    })
    .await
    .unwrap();

    let (u, t, v) = (url.clone(), operator.clone(), viewer.clone());
    let id = tokio::task::spawn_blocking(move || {
        let api = ApiClient::new(&u, Some(t));
        let viewer = ApiClient::new(&u, Some(v));
        let request = json!({
            "model": "digits-mlp", "version": "v2",
            "selector": {"site": "berlin"},
            "stages": [{"size": {"count": 2}, "soak_secs": 0}, {"size": {"percent": 100.0}}],
            "on_failure": "pause",
            "install_timeout_secs": 1,
            "max_failed_devices": 5
        });
        // A viewer may look but not start one.
        assert_eq!(
            api_error(viewer.post_json("/api/v1/rollouts", &request)).1,
            "forbidden"
        );
        // Bad specs are refused with the reason.
        let mut bad = request.clone();
        bad["stages"] = json!([{"size": {"percent": 50.0}}]);
        let (status, _, message) = api_error(api.post_json("/api/v1/rollouts", &bad));
        assert_eq!(status, 400);
        assert!(message.contains("last stage must be 100"), "{message}");
        let mut unknown = request.clone();
        unknown["version"] = json!("v9");
        assert_eq!(
            api_error(api.post_json("/api/v1/rollouts", &unknown)).0,
            404
        );
        let mut nobody = request.clone();
        nobody["selector"] = json!({"site": "oslo"});
        let (_, _, message) = api_error(api.post_json("/api/v1/rollouts", &nobody));
        assert!(message.contains("matches no enrolled device"), "{message}");

        let created = api.post_json("/api/v1/rollouts", &request).unwrap();
        let id = created["rollout"]["id"].as_str().unwrap().to_string();
        assert_eq!(created["spec"]["stages"].as_array().unwrap().len(), 2);
        // A second rollout of the model over the same devices is refused, naming the first.
        let (status, code, message) = api_error(api.post_json("/api/v1/rollouts", &request));
        assert_eq!((status, code.as_str()), (409, "conflict"));
        assert!(
            message.contains(&id) && message.contains("dev-"),
            "{message}"
        );
        // Another site is free.
        let mut paris = request.clone();
        paris["selector"] = json!({"site": "paris"});
        let other = api.post_json("/api/v1/rollouts", &paris).unwrap();
        api.post_json(
            &format!(
                "/api/v1/rollouts/{}/abort",
                other["rollout"]["id"].as_str().unwrap()
            ),
            &json!({}),
        )
        .unwrap();
        id
    })
    .await
    .unwrap();

    // The engine reaches the first stage's two devices with signed directives for v2.
    let (u, t, rid) = (url.clone(), operator.clone(), id.clone());
    let shown = eventually("the canaries' directives", move || {
        let api = ApiClient::new(&u, Some(t.clone()));
        let shown = api.get(&format!("/api/v1/rollouts/{rid}")).ok()?;
        let devices = shown["devices"].as_object()?;
        (devices.len() == 2 && devices.values().all(|d| d["directive_seq"].is_u64()))
            .then_some(shown)
    })
    .await;
    for (device, d) in shown["devices"].as_object().unwrap() {
        assert_eq!(d["previous"], "v1", "{device}");
        let record = running.fleet.store.assignments(device).await.unwrap();
        assert_eq!(record[0].version, "v2");
    }
    // Nobody installs (no agent runs): within the timeout both canaries count as failed;
    // the install gate fails and, under the pause policy, the rollout waits for an operator.
    let (u, t, rid) = (url.clone(), operator.clone(), id.clone());
    let paused = eventually("the gate to pause the rollout", move || {
        let api = ApiClient::new(&u, Some(t.clone()));
        let shown = api.get(&format!("/api/v1/rollouts/{rid}")).ok()?;
        (shown["rollout"]["phase"] == "paused").then_some(shown)
    })
    .await;
    assert!(
        paused["rollout"]["reason"]
            .as_str()
            .unwrap()
            .contains("install_success_pct"),
        "{paused}"
    );
    let evaluation = &paused["evaluations"][0];
    assert_eq!(evaluation["passed"], false);
    assert_eq!(evaluation["installs"]["failed"], 2);

    let (u, t, v, rid) = (url.clone(), operator.clone(), viewer.clone(), id.clone());
    tokio::task::spawn_blocking(move || {
        let api = ApiClient::new(&u, Some(t));
        let viewer = ApiClient::new(&u, Some(v));
        assert_eq!(
            api_error(viewer.post_json(&format!("/api/v1/rollouts/{rid}/rollback"), &json!({}))).1,
            "forbidden"
        );
        let (status, _, message) =
            api_error(api.post_json(&format!("/api/v1/rollouts/{rid}/pause"), &json!({})));
        assert_eq!(status, 409);
        assert!(
            message.contains("cannot pause a rollout that is paused"),
            "{message}"
        );
        assert_eq!(
            api_error(api.post_json(&format!("/api/v1/rollouts/{rid}/explode"), &json!({}))).0,
            404
        );
        let back = api
            .post_json(
                &format!("/api/v1/rollouts/{rid}/rollback"),
                &json!({"reason": "canaries never installed"}),
            )
            .unwrap();
        assert!(
            ["rolling_back", "rolled_back"].contains(&back["rollout"]["phase"].as_str().unwrap())
        );
    })
    .await
    .unwrap();
    let (u, t, rid) = (url.clone(), operator.clone(), id.clone());
    eventually("the rollback to finish", move || {
        let api = ApiClient::new(&u, Some(t.clone()));
        let shown = api.get(&format!("/api/v1/rollouts/{rid}")).ok()?;
        (shown["rollout"]["phase"] == "rolled_back").then_some(())
    })
    .await;
    // Every device it touched is assigned v1 again.
    for (device, _) in shown["devices"].as_object().unwrap() {
        let record = running.fleet.store.assignments(device).await.unwrap();
        assert_eq!(record[0].version, "v1", "{device}");
    }

    // The audit log tells the story, with the figures and the operator's name and reason.
    let (u, v, rid) = (url.clone(), viewer.clone(), id.clone());
    let audit = tokio::task::spawn_blocking(move || {
        ApiClient::new(&u, Some(v))
            .get(&format!("/api/v1/audit?rollout={rid}"))
            .unwrap()
    })
    .await
    .unwrap();
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for expected in [
        "rollout_created",
        "devices_reached",
        "device_timed_out",
        "stage_settled",
        "gates_failed",
        "paused",
        "rollout_rollback",
        "rolling_back",
        "rolled_back",
    ] {
        assert!(
            actions.contains(&expected),
            "{expected} missing from {actions:?}"
        );
    }
    let entries = audit["entries"].as_array().unwrap();
    let failed = entries
        .iter()
        .find(|e| e["action"] == "gates_failed")
        .unwrap();
    assert_eq!(failed["details"]["installs"]["installed"], 0);
    let rollback = entries
        .iter()
        .find(|e| e["action"] == "rollout_rollback")
        .unwrap();
    assert!(rollback["actor"].as_str().unwrap().contains("alice"));
    assert!(rollback["actor"]
        .as_str()
        .unwrap()
        .contains("canaries never installed"));
    // Operators' other actions are there too.
    let all = running.fleet.store.audit(None, 0, 10_000).await.unwrap();
    assert!(all.iter().any(|e| e.action == "model_pushed"));
    assert_eq!(
        all.iter().filter(|e| e.action == "device_enrolled").count(),
        10
    );
    // `newest` gives the last entries (what `fleetctl audit --limit N` shows), oldest first.
    let (u, v, rid) = (url.clone(), viewer.clone(), id.clone());
    let newest = tokio::task::spawn_blocking(move || {
        ApiClient::new(&u, Some(v))
            .get(&format!("/api/v1/audit?rollout={rid}&limit=2&newest=true"))
            .unwrap()
    })
    .await
    .unwrap();
    let ids = |v: &Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_i64().unwrap())
            .collect()
    };
    let every = ids(&audit["entries"]);
    assert_eq!(ids(&newest["entries"]), every[every.len() - 2..]);
    assert_eq!(newest["entries"][1]["action"], "rolled_back");
    running.shutdown().await;
}
