//! `fleet-sim` against a real server (embedded broker, mutual TLS): it enrolls its devices
//! through the API and keeps their bundles, connects each with its own certificate, applies
//! the directives the server signs (verified as an agent verifies them) and uploads telemetry
//! the server stores; a second run reuses the bundles instead of enrolling again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fleet_server::auth::{create_token, Role};
use fleet_server::config::ServerConfig;
use fleet_server::fleet::Fleet;
use fleet_server::server;
use fleet_server::sim::{sign_versions, SignedVersion};

const DEVICES: usize = 12;

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

async fn push(fleet: &Fleet, signed: &SignedVersion) {
    let (_, manifest) = fleet
        .registry
        .verify_envelope(&signed.manifest_bytes)
        .unwrap();
    let mut staged = fleet.registry.blobs().stage().await.unwrap();
    staged.limit(manifest.size);
    staged
        .write(&tokio::fs::read(&signed.model).await.unwrap())
        .await
        .unwrap();
    fleet
        .registry
        .push(&signed.manifest_bytes, &manifest, staged, None)
        .await
        .unwrap();
}

async fn wait_until<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !probe().await {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}: not within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_devices_enroll_connect_apply_directives_and_upload() {
    let dir = tempfile::tempdir().unwrap();
    let signed = sign_versions(&models_dir(), "digits-mlp", dir.path(), 2).unwrap();
    let mut config = ServerConfig {
        data_dir: dir.path().join("server"),
        ..Default::default()
    };
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.broker.listen = "127.0.0.1:0".parse().unwrap();
    config.trust.release_keys = vec![dir.path().join("keys/release.pub")];
    let running = server::start(config).await.unwrap();
    let fleet = running.fleet.clone();
    for s in &signed {
        push(&fleet, s).await;
    }
    let token = create_token(&fleet.store, Role::Operator, "fleet-sim")
        .await
        .unwrap()
        .token;
    let bundles = dir.path().join("bundles");
    let sim = |run_for: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fleet-sim"));
        command
            .args(["--server", &format!("http://{}", running.api_addr)])
            .args(["--token", &token])
            .args(["--devices", &DEVICES.to_string(), "--label", "fleet=sim"])
            .arg("--bundles")
            .arg(&bundles)
            .args([
                "--telemetry-secs",
                "1",
                "--batch-items",
                "3",
                "--for",
                run_for,
            ])
            // A quarter of them run digits-mlp v1 for real, 5 times an interval.
            .arg("--infer-model")
            .arg(models_dir().join("digits-mlp/v1.onnx"))
            .arg("--infer-case")
            .arg(models_dir().join("digits-mlp/v1.selftest.json"))
            .args(["--infer-share", "0.25", "--infer-runs", "5"]);
        command
    };

    let first = std::thread::spawn({
        let mut command = sim("20");
        move || command.output().unwrap()
    });
    let store = &fleet.store;
    wait_until("every simulated device online", || async {
        let devices = store.devices().await.unwrap();
        devices.len() == DEVICES
            && devices
                .iter()
                .all(|d| d.presence.as_deref() == Some("online"))
    })
    .await;
    for i in 0..DEVICES {
        fleet
            .assign(&format!("sim-{i:05}"), "digits-mlp", "v1")
            .await
            .unwrap();
    }
    // Each device verified its directive, reports v1 active and uploads telemetry for it.
    wait_until(
        "v1 reported and telemetry stored by every device",
        || async {
            for d in store.devices().await.unwrap() {
                let active = d.state.as_ref().and_then(|s| {
                    s["models"][0]["active"]["version"]
                        .as_str()
                        .map(str::to_string)
                });
                let telemetry = store.items(&d.id, Some("telemetry"), 0, 10).await.unwrap();
                if active.as_deref() != Some("v1") || telemetry.is_empty() {
                    return false;
                }
            }
            true
        },
    )
    .await;
    // The inferring devices report what tract measured: 5 runs an interval, none failed.
    let mut measured = 0;
    for d in store.devices().await.unwrap() {
        for item in store.items(&d.id, Some("telemetry"), 0, 100).await.unwrap() {
            if item.body["inferences"] == 5 {
                let errors = item.body["errors"].as_object();
                assert!(errors.is_none_or(|e| e.is_empty()), "{}", item.body);
                measured += 1;
            }
        }
    }
    assert!(measured > 0, "no telemetry from a device running the model");
    let out = first.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("all {DEVICES} devices connected")),
        "{stdout}"
    );

    // Again: the kept bundles, no second enrollment (which the server would refuse).
    let out = sim("3").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(store.devices().await.unwrap().len(), DEVICES);
    running.shutdown().await;
}
