//! The REST API and ingest of a running server (embedded broker, SQLite; and PostgreSQL when
//! `DRIFTGATE_TEST_POSTGRES` is set): tokens and roles, the registry's refusals, bad names,
//! and the same outbox batch delivered twice by a real device connection.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_protocol::outbox::{Ack, Batch, Item, ItemBody};
use fleet_protocol::{decode, encode, DeviceId, Envelope, TopicKind, Topics, MANIFEST_TYPE, V1};
use fleet_server::auth::{create_token, Role};
use fleet_server::client::{ApiClient, ClientError};
use fleet_server::config::ServerConfig;
use fleet_server::server::{self, RunningServer};
use fleet_server::{keyfile, release};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::json;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A server on free ports trusting `release_pub`.
async fn start(dir: &Path, release_pub: &Path, database: Option<String>) -> RunningServer {
    let mut config = ServerConfig {
        data_dir: dir.join("server"),
        database,
        ..Default::default()
    };
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.broker.listen = "127.0.0.1:0".parse().unwrap();
    config.trust.release_keys = vec![release_pub.to_path_buf()];
    server::start(config).await.expect("the server starts")
}

/// Signs cancer-logreg v1 with the key in `keys`; returns (model copy, manifest path).
fn sign(dir: &Path, keys: &Path, version: &str) -> (PathBuf, PathBuf) {
    let model = dir.join(format!("cancer-logreg-{version}.onnx"));
    std::fs::copy(root().join("models/cancer-logreg/v1.onnx"), &model).unwrap();
    let signed = release::sign_model(
        &release::SignRequest {
            model: model.clone(),
            name: "cancer-logreg".parse().unwrap(),
            version: version.parse().unwrap(),
            release: None,
            self_test: Some(root().join("models/cancer-logreg/v1.selftest.json")),
            profile: None,
            min_agent_version: None,
            created_at_ms: 1,
        },
        &keyfile::read_signing_key(&keys.join("release.pem")).unwrap(),
    )
    .unwrap();
    let manifest = dir.join(format!("cancer-logreg-{version}.manifest.json"));
    release::write_envelope(&manifest, &signed.envelope, true).unwrap();
    (model, manifest)
}

fn api_error(result: Result<serde_json::Value, ClientError>) -> (u16, String) {
    match result {
        Err(ClientError::Api { status, code, .. }) => (status, code),
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

async fn rest_rules(database: Option<String>, label: &'static str) {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    keyfile::generate(&keys, "release").unwrap();
    let stranger = dir.path().join("stranger");
    keyfile::generate(&stranger, "release").unwrap();
    let running = start(dir.path(), &keys.join("release.pub"), database).await;
    let url = format!("http://{}", running.api_addr);
    let store = running.fleet.store.clone();
    let admin = create_token(&store, Role::Admin, "test")
        .await
        .unwrap()
        .token;
    let viewer = create_token(&store, Role::Viewer, "test")
        .await
        .unwrap()
        .token;
    let operator = create_token(&store, Role::Operator, "test")
        .await
        .unwrap()
        .token;
    let (model, manifest) = sign(dir.path(), &keys, "v1");
    let (model2, manifest_untrusted) = sign(dir.path(), &stranger, "v2");
    let dir_path = dir.path().to_path_buf();
    // A manifest signed by the trusted key that names its model `../evil`.
    let evil = {
        let envelope: Envelope = decode(&std::fs::read(&manifest).unwrap()).unwrap();
        let mut payload: serde_json::Value = serde_json::from_slice(&envelope.payload).unwrap();
        payload["name"] = json!("../evil");
        let key = keyfile::read_signing_key(&keys.join("release.pem")).unwrap();
        let forged = Envelope::sign(MANIFEST_TYPE, serde_json::to_vec(&payload).unwrap(), &key);
        let path = dir.path().join("evil.manifest.json");
        std::fs::write(&path, encode(&forged)).unwrap();
        path
    };

    blocking(move || {
        let anonymous = ApiClient::new(&url, None);
        let bogus = ApiClient::new(
            &url,
            Some(format!("dgt_{}_{}", "0".repeat(12), "0".repeat(64))),
        );
        let viewer = ApiClient::new(&url, Some(viewer));
        let operator = ApiClient::new(&url, Some(operator));
        let admin = ApiClient::new(&url, Some(admin));

        // No token, a wrong one: 401. The OpenAPI document and health need none.
        assert_eq!(
            api_error(anonymous.get("/api/v1/devices")),
            (401, "unauthorized".into()),
            "{label}"
        );
        assert_eq!(
            api_error(bogus.get("/api/v1/models")),
            (401, "unauthorized".into()),
            "{label}"
        );
        assert!(anonymous.get("/api/v1/openapi.json").unwrap()["paths"].is_object());
        assert_eq!(anonymous.get("/api/v1/health").unwrap()["status"], "ok");

        // A viewer reads but cannot push (403), enroll or revoke.
        assert!(viewer.get("/api/v1/models").unwrap()["models"].is_array());
        let refused = viewer.push_model(&manifest, &model, None, &mut |_, _| {});
        assert_eq!(api_error(refused), (403, "forbidden".into()), "{label}");
        assert_eq!(
            api_error(viewer.post_json("/api/v1/devices", &json!({"id": "dev-v"}))),
            (403, "forbidden".into())
        );

        // A manifest no trusted key signed is refused at push.
        let untrusted = operator.push_model(&manifest_untrusted, &model2, None, &mut |_, _| {});
        assert_eq!(
            api_error(untrusted),
            (422, "untrusted_manifest".into()),
            "{label}"
        );

        // A trusted one is stored; the same again is fine; other bytes under its name are not.
        let pushed = operator
            .push_model(&manifest, &model, None, &mut |_, _| {})
            .unwrap();
        assert_eq!(pushed["stored"], true);
        let again = operator
            .push_model(&manifest, &model, None, &mut |_, _| {})
            .unwrap();
        assert_eq!(again["stored"], false);
        let other_bytes = dir_path.join("other.onnx");
        let mut bytes = std::fs::read(&model).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&other_bytes, bytes).unwrap();
        assert_eq!(
            api_error(operator.push_model(&manifest, &other_bytes, None, &mut |_, _| {})),
            (422, "artifact_mismatch".into()),
            "{label}"
        );

        // Names with a path separator or `..` are refused, in paths and in bodies.
        for path in [
            "/api/v1/models/..%2F..%2Fetc/v1",
            "/api/v1/models/%2E%2E/v1",
            "/api/v1/models/cancer-logreg/..",
        ] {
            let (status, _) = api_error(viewer.get(path));
            assert!(status == 400 || status == 404, "{path}: {status}");
        }
        assert_eq!(
            api_error(viewer.get("/api/v1/models/a%2Fb/v1")),
            (400, "invalid_request".into())
        );
        assert_eq!(
            api_error(operator.push_model(&evil, &model, None, &mut |_, _| {})),
            (400, "invalid_manifest".into()),
            "{label}"
        );
        assert_eq!(
            api_error(operator.post_json("/api/v1/devices", &json!({"id": "../dev"}))),
            (400, "invalid_request".into())
        );
        assert_eq!(
            api_error(operator.post_json(
                "/api/v1/devices/dev-1/assign",
                &json!({"model": "a/b", "version": "v1"})
            )),
            (400, "invalid_request".into())
        );

        // Enroll, assign; then the model cannot be deleted; revoking needs admin.
        let bundle = operator
            .post_json(
                "/api/v1/devices",
                &json!({"id": "dev-1", "labels": {"site": "berlin"}}),
            )
            .unwrap();
        let names: Vec<&str> = bundle["bundle"]["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        for needed in [
            "agent.toml",
            "ca.pem",
            "device.pem",
            "device.key",
            "fleet.pub",
            "release-0.pub",
        ] {
            assert!(names.contains(&needed), "{needed} missing from {names:?}");
        }
        assert_eq!(
            api_error(operator.post_json("/api/v1/devices", &json!({"id": "dev-1"}))),
            (409, "conflict".into())
        );
        operator
            .post_json(
                "/api/v1/devices/dev-1/assign",
                &json!({"model": "cancer-logreg", "version": "v1"}),
            )
            .unwrap();
        assert_eq!(
            api_error(operator.delete("/api/v1/models/cancer-logreg/v1")),
            (409, "conflict".into())
        );
        assert_eq!(
            api_error(operator.post_json("/api/v1/devices/dev-1/revoke", &json!({}))),
            (403, "forbidden".into())
        );
        assert_eq!(
            api_error(admin.get("/api/v1/models/cancer-logreg/v9")),
            (404, "not_found".into())
        );
        let metrics = anonymous.get("/metrics").unwrap();
        assert!(metrics
            .as_str()
            .unwrap()
            .contains("driftgate_server_api_responses_total{method=\"GET\",status=\"401\"}"));
    })
    .await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_roles_and_the_registry_refusals_on_sqlite() {
    rest_rules(None, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_roles_and_the_registry_refusals_on_postgres() {
    if !common::require_env(
        "tokens_roles_and_the_registry_refusals_on_postgres",
        "DRIFTGATE_TEST_POSTGRES",
        "a PostgreSQL server",
    ) {
        return;
    }
    rest_rules(Some(common::fresh_postgres().await), "postgres").await;
}

/// A device connection made from an enrollment bundle.
fn device_options(bundle: &serde_json::Value, id: &str, port: u16) -> MqttOptions {
    let file = |name: &str| -> Vec<u8> {
        bundle["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap()["contents"]
            .as_str()
            .unwrap()
            .as_bytes()
            .to_vec()
    };
    let mut options = MqttOptions::new(id, "localhost", port);
    options.set_max_packet_size(8 << 20, 8 << 20);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca: file("ca.pem"),
        alpn: None,
        client_auth: Some((file("device.pem"), file("device.key"))),
    }));
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_batch_delivered_twice_is_stored_once_and_acked_both_times() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    keyfile::generate(&keys, "release").unwrap();
    let running = start(dir.path(), &keys.join("release.pub"), None).await;
    let bundle = running
        .fleet
        .enroll("dev-dup", Default::default(), None)
        .await
        .unwrap();
    let bundle = serde_json::to_value(&bundle).unwrap();
    let port = running.device_addr.unwrap().port();
    let (client, mut eventloop) = AsyncClient::new(device_options(&bundle, "dev-dup", port), 16);
    let topics = Topics::default();
    let device = DeviceId::new("dev-dup").unwrap();
    client
        .subscribe(topics.topic(&device, TopicKind::Ack), QoS::AtLeastOnce)
        .await
        .unwrap();
    let batch = Batch {
        v: V1,
        device: device.clone(),
        after: Some(0),
        items: (1..=3)
            .map(|id| Item {
                id,
                at_ms: 1000 + id as i64,
                body: ItemBody::Evictions(Default::default()),
            })
            .collect(),
    };
    let mut acks = Vec::new();
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while acks.len() < 2 {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("two acks within 20 s")
            .expect("the device connection works");
        match event {
            Event::Incoming(Packet::SubAck(_)) => {
                // Subscribed: deliver the batch twice.
                for _ in 0..2 {
                    client
                        .publish(
                            topics.topic(&device, TopicKind::Up),
                            QoS::AtLeastOnce,
                            false,
                            encode(&batch),
                        )
                        .await
                        .unwrap();
                    sent += 1;
                }
            }
            Event::Incoming(Packet::Publish(p)) => acks.push(decode::<Ack>(&p.payload).unwrap()),
            _ => {}
        }
    }
    assert_eq!(sent, 2);
    assert_eq!(acks, vec![Ack { v: V1, up_to: 3 }, Ack { v: V1, up_to: 3 }]);
    let items = running
        .fleet
        .store
        .items("dev-dup", None, 0, 100)
        .await
        .unwrap();
    assert_eq!(items.len(), 3);
    let metrics = running.fleet.metrics.render();
    assert!(
        metrics.contains("driftgate_server_items_stored_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("driftgate_server_items_duplicate_total 3"),
        "{metrics}"
    );

    // A batch naming another device is dropped and counted, never acked or stored.
    let mut forged = batch.clone();
    forged.device = DeviceId::new("dev-other").unwrap();
    forged.after = Some(3);
    forged.items = vec![Item {
        id: 9,
        at_ms: 1,
        body: ItemBody::Evictions(Default::default()),
    }];
    client
        .publish(
            topics.topic(&device, TopicKind::Up),
            QoS::AtLeastOnce,
            false,
            encode(&forged),
        )
        .await
        .unwrap();
    let junk_deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(event) = tokio::time::timeout_at(junk_deadline, eventloop.poll()).await {
        if let Ok(Event::Incoming(Packet::Publish(p))) = event {
            panic!("unexpected ack {:?}", decode::<Ack>(&p.payload));
        }
    }
    assert_eq!(
        running.fleet.metrics.dropped_count("up", "device_mismatch"),
        1
    );

    // Revoked: the live connection is dropped at once, and the certificate refused after.
    assert!(running.fleet.revoke("dev-dup").await.unwrap());
    let dropped = tokio::time::timeout(Duration::from_secs(10), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    assert!(
        dropped.is_ok(),
        "the revoked device's connection was not dropped"
    );
    let (_client, mut again) = AsyncClient::new(device_options(&bundle, "dev-dup", port), 16);
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match again.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => break Ok(ack),
                Ok(_) => {}
                Err(e) => break Err(e.to_string()),
            }
        }
    })
    .await
    .expect("an answer to the revoked device's connect");
    assert!(refused.is_err(), "a revoked device connected: {refused:?}");
    let crl = std::fs::read_to_string(running.fleet.crl_path()).unwrap();
    assert!(crl.contains("BEGIN X509 CRL"), "{crl}");
    running.shutdown().await;
}
