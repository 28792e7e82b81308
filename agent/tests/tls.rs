//! The agent over `mqtts://` with mutual TLS (rustls with the ring provider) against a real
//! Mosquitto that requires client certificates: it installs and serves a model, and neither a
//! device certificate from another CA nor a broker certificate it cannot verify gets through.

mod common;

use std::path::Path;
use std::time::Duration;

use common::agent::{infer_matches_self_test, Agent};
use common::tls::{start_mosquitto_tls, TestPki};
use common::{sample_manifest, Control, Faults, Responder};

/// An agent config for `mqtts://127.0.0.1:{port}` in `dir`, with the named PEM files.
fn write_tls_config(dir: &Path, device: &str, port: u16, api_port: u16, files: [&Path; 3]) {
    common::write_public_keys(dir);
    let [ca, cert, key] = files.map(|p| p.display().to_string());
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            r#"
device_id = "{device}"
data_dir = "data"
[broker]
url = "mqtts://127.0.0.1:{port}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
reconnect_min_ms = 100
reconnect_max_ms = 1000
[trust]
release_keys = ["release.pub"]
fleet_keys = ["fleet.pub"]
[api]
listen = "127.0.0.1:{api_port}"
"#
        ),
    )
    .unwrap();
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_over_mutual_tls_and_refuses_foreign_certificates() {
    if !driftgate_tests::require_env(
        "installs_over_mutual_tls_and_refuses_foreign_certificates",
        "DRIFTGATE_TEST_MOSQUITTO",
        "the mosquitto broker (apt-get install mosquitto) as the TLS broker",
    ) {
        return;
    }
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(pki_dir.path(), "ca");
    let rogue = TestPki::new(pki_dir.path(), "rogue-ca");
    let mosquitto = start_mosquitto_tls(&pki, "ca");
    let ca = pki_dir.path().join("ca.pem");
    let rogue_ca = pki_dir.path().join("rogue-ca.pem");

    let device = "dev-tls";
    let (cert, key) = pki.issue("device", device, false);
    let dir = tempfile::tempdir().unwrap();
    let api_port = common::free_port();
    write_tls_config(
        dir.path(),
        device,
        mosquitto.tls_port,
        api_port,
        [&ca, &cert, &key],
    );

    let (onnx, manifest) = sample_manifest("cancer-logreg", "v1", 1);
    // The test's server side uses the plain listener.
    let responder = Responder::start(mosquitto.broker.port, Faults::default()).await;
    responder.add(onnx);
    let mut control = Control::start(mosquitto.broker.port, device).await;
    let _agent = Agent::start(dir.path());
    control
        .wait_for("the agent's first state over TLS", |_| true)
        .await;
    control.install(device, 1, &manifest, false).await;
    infer_matches_self_test(api_port, &manifest);

    // A device certificate from another CA: the broker refuses the handshake.
    let (rogue_cert, rogue_key) = rogue.issue("rogue-device", "dev-rogue", false);
    let rogue_dir = tempfile::tempdir().unwrap();
    write_tls_config(
        rogue_dir.path(),
        "dev-rogue",
        mosquitto.tls_port,
        common::free_port(),
        [&ca, &rogue_cert, &rogue_key],
    );
    // A genuine device that is told to trust another CA: it refuses the broker.
    let wary_dir = tempfile::tempdir().unwrap();
    let (wary_cert, wary_key) = pki.issue("wary-device", "dev-wary", false);
    write_tls_config(
        wary_dir.path(),
        "dev-wary",
        mosquitto.tls_port,
        common::free_port(),
        [&rogue_ca, &wary_cert, &wary_key],
    );
    let _rogue = Agent::start(rogue_dir.path());
    let _wary = Agent::start(wary_dir.path());
    let mut rogue_control = Control::start(mosquitto.broker.port, "dev-rogue").await;
    let mut wary_control = Control::start(mosquitto.broker.port, "dev-wary").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (name, dir, control) in [
        ("rogue", rogue_dir.path(), &mut rogue_control),
        ("wary", wary_dir.path(), &mut wary_control),
    ] {
        let log = log(dir);
        assert!(
            !log.contains("connected to the broker"),
            "the {name} agent connected:\n{log}"
        );
        assert!(
            log.contains("broker connection failed"),
            "the {name} agent says why it cannot connect:\n{log}"
        );
        assert!(
            control.states.borrow().is_none(),
            "the {name} agent published a state"
        );
        eprintln!(
            "{name}: {}",
            log.lines()
                .find(|l| l.contains("broker connection failed"))
                .unwrap_or_default()
        );
    }
}
