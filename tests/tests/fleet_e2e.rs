//! The whole fleet as real processes: `fleet-server`, two `edge-agent`s started from the
//! bundles `fleetctl device enroll` wrote, a signed sample model pushed and assigned with
//! `fleetctl`; both agents serve it, and their telemetry and drift windows come back through
//! the REST API and `fleetctl`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use driftgate_tests::{binary, free_port, run_ok, wait_for, workspace_root, Process};
use fleet_server::client::ApiClient;
use serde_json::{json, Value};

/// Runs fleetctl with the server's URL and token; returns stdout, panics with stderr.
fn fleetctl(server: &str, token: &str, args: &[&str]) -> String {
    run_ok(
        Command::new(binary("fleetctl"))
            .args(["--server", server, "--token", token])
            .args(args),
    )
}

fn offline_fleetctl(args: &[&str]) {
    run_ok(Command::new(binary("fleetctl")).args(args));
}

/// The self-test input of digits-mlp v2 (8 rows of 64 pixels), as a KServe v2 request body.
fn digits_request(root: &Path) -> Value {
    let selftest: Value = serde_json::from_slice(
        &std::fs::read(root.join("models/digits-mlp/v2.selftest.json")).unwrap(),
    )
    .unwrap();
    json!({"inputs": selftest["inputs"]})
}

/// How the server reaches its broker and database.
pub struct Backend {
    /// Extra `fleet-server run` flags (external broker, database).
    pub server_flags: Vec<String>,
    /// Kept alive for the test (an external broker process, for instance).
    pub _guards: Vec<Box<dyn std::any::Any>>,
}

/// Signs digits-mlp v2 with a fresh release key; returns (model copy, manifest, profile).
fn sign_model(work: &Path, root: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let keys = work.join("keys");
    offline_fleetctl(&["keys", "gen", "--out", keys.to_str().unwrap()]);
    let model = work.join("digits-mlp-v2.onnx");
    std::fs::copy(root.join("models/digits-mlp/v2.onnx"), &model).unwrap();
    let profile = root.join("models/digits-mlp/v2.profile.json");
    let manifest = work.join("digits-mlp-v2.manifest.json");
    offline_fleetctl(&[
        "model",
        "sign",
        model.to_str().unwrap(),
        "--name",
        "digits-mlp",
        "--version",
        "v2",
        "--key",
        keys.join("release.pem").to_str().unwrap(),
        "--self-test",
        root.join("models/digits-mlp/v2.selftest.json")
            .to_str()
            .unwrap(),
        "--profile",
        profile.to_str().unwrap(),
        "--out",
        manifest.to_str().unwrap(),
    ]);
    (model, manifest, profile, keys.join("release.pub"))
}

/// The whole scenario against one backend.
pub fn run_fleet(work: &Path, backend: Backend) {
    let root = workspace_root();
    let (model, manifest, profile, release_pub) = sign_model(work, &root);

    // The server, on free ports; it says where it listens in endpoints.json.
    let data_dir = work.join("server");
    let mut args: Vec<String> = vec![
        "run".into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--api-listen".into(),
        "127.0.0.1:0".into(),
        "--mqtt-listen".into(),
        "127.0.0.1:0".into(),
        "--release-key".into(),
        release_pub.display().to_string(),
    ];
    args.extend(backend.server_flags.iter().cloned());
    let mut server = Process::start(
        "fleet-server",
        Command::new(binary("fleet-server")).args(&args),
        work.join("server.log"),
    );
    let endpoints: Value = wait_for(
        "the server's endpoints.json",
        Duration::from_secs(60),
        || {
            server.assert_running();
            let bytes = std::fs::read(data_dir.join("endpoints.json")).ok()?;
            let v: Value = serde_json::from_slice(&bytes).ok()?;
            (v["pid"].as_u64() == Some(u64::from(server.child.id()))).then_some(v)
        },
    );
    let url = endpoints["api"].as_str().unwrap().to_string();

    // The first admin token, straight from the database.
    let out = Command::new(binary("fleet-server"))
        .args(["token", "create", "--role", "admin", "--data-dir"])
        .arg(&data_dir)
        .args(database_flag(&backend.server_flags))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let api = ApiClient::new(&url, Some(token.clone()));

    // Two devices, each with its bundle and its own local API port.
    let mut agents = Vec::new();
    let mut ports = Vec::new();
    for (id, site) in [("dev-a", "berlin"), ("dev-b", "paris")] {
        let port = free_port();
        let bundle = work.join(id);
        fleetctl(
            &url,
            &token,
            &[
                "device",
                "enroll",
                id,
                "--label",
                &format!("site={site}"),
                "--out",
                bundle.to_str().unwrap(),
                "--api-listen",
                &format!("127.0.0.1:{port}"),
            ],
        );
        agents.push(Process::start(
            id,
            Command::new(binary("edge-agent"))
                .args(["run", "--config"])
                .arg(bundle.join("agent.toml")),
            work.join(format!("{id}.log")),
        ));
        ports.push(port);
    }
    // Both connect and report online.
    wait_for("both devices online", Duration::from_secs(30), || {
        for a in &mut agents {
            a.assert_running();
        }
        let devices = api.get("/api/v1/devices").ok()?;
        let online = devices["devices"]
            .as_array()?
            .iter()
            .filter(|d| d["presence"] == "online")
            .count();
        (online == 2).then_some(())
    });

    // Push and assign.
    let pushed = fleetctl(
        &url,
        &token,
        &[
            "model",
            "push",
            model.to_str().unwrap(),
            "--manifest",
            manifest.to_str().unwrap(),
            "--profile",
            profile.to_str().unwrap(),
        ],
    );
    assert!(pushed.contains("pushed digits-mlp@v2"), "{pushed}");
    let listed = fleetctl(&url, &token, &["model", "list"]);
    assert!(
        listed.contains("digits-mlp") && listed.contains("v2"),
        "{listed}"
    );
    for id in ["dev-a", "dev-b"] {
        let out = fleetctl(&url, &token, &["device", "assign", id, "digits-mlp@v2"]);
        assert!(out.contains("assigned digits-mlp@v2"), "{out}");
    }

    // Both serve it: 40 requests of 8 rows each (320 rows: one closed 256-window).
    let request = digits_request(&root);
    let expected: Value = serde_json::from_slice(
        &std::fs::read(root.join("models/digits-mlp/v2.selftest.json")).unwrap(),
    )
    .unwrap();
    for (agent, port) in agents.iter_mut().zip(&ports) {
        let local = ApiClient::new(&format!("http://127.0.0.1:{port}"), None);
        wait_for("the model to serve", Duration::from_secs(60), || {
            agent.assert_running();
            local.get("/v2/models/digits-mlp/ready").ok()
        });
        for _ in 0..40 {
            let response = local
                .post_json("/v2/models/digits-mlp/infer", &request)
                .expect("inference");
            assert_eq!(response["model_version"], "v2");
            let got = response["outputs"][0]["data"].as_array().unwrap();
            let want = expected["outputs"][0]["data"].as_array().unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-4,
                    "{g} vs {w}"
                );
            }
        }
    }

    // Telemetry reaches the server: 40 requests per device, each counted as one inference.
    let telemetry = wait_for(
        "telemetry of 80 inferences",
        Duration::from_secs(60),
        || {
            let t = api.get("/api/v1/models/digits-mlp/v2/telemetry").ok()?;
            (t["totals"]["inferences"].as_u64()? >= 80 && t["totals"]["devices"] == 2).then_some(t)
        },
    );
    assert_eq!(telemetry["totals"]["inferences"], 80, "{telemetry}");
    assert!(telemetry["totals"]["p50_us"].as_f64().unwrap() > 0.0);

    // Drift windows too: per device, and merged by the site cohort.
    let drift = wait_for(
        "drift windows from both devices",
        Duration::from_secs(60),
        || {
            let d = api
                .get("/api/v1/models/digits-mlp/v2/drift?label=site")
                .ok()?;
            let devices = d["devices"]
                .as_array()?
                .iter()
                .filter(|w| w["window_len"] == 256 && w["windows"].as_u64() >= Some(1))
                .count();
            (devices == 2).then_some(d)
        },
    );
    let cohorts = drift["cohorts"].as_array().unwrap();
    assert!(
        cohorts.iter().any(|c| c["value"] == "berlin")
            && cohorts.iter().any(|c| c["value"] == "paris"),
        "{drift}"
    );
    for w in drift["devices"].as_array().unwrap() {
        if w["window_len"] == 256 {
            // The same 8 rows over and over alarm the CUSUM, which closes windows early: a
            // window holds at most its length, and all of them at most the rows served.
            let samples = w["samples"].as_u64().unwrap();
            assert!(samples > 0 && samples <= 320, "{w}");
            assert_eq!(w["rescored"], true, "{w}");
        }
    }

    // And through fleetctl's tables.
    let table = fleetctl(&url, &token, &["telemetry", "digits-mlp@v2"]);
    assert!(table.contains("80 inferences on 2 devices"), "{table}");
    assert!(
        table.contains("dev-a") && table.contains("dev-b"),
        "{table}"
    );
    let table = fleetctl(&url, &token, &["drift", "digits-mlp@v2", "--label", "site"]);
    assert!(
        table.contains("dev-a") && table.contains("site=paris"),
        "{table}"
    );
    let table = fleetctl(&url, &token, &["device", "list"]);
    assert!(table.contains("digits-mlp@v2 (active)"), "{table}");
    // A model in use cannot be deleted.
    let refused = Command::new(binary("fleetctl"))
        .args([
            "--server",
            &url,
            "--token",
            &token,
            "model",
            "delete",
            "digits-mlp@v2",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("409 conflict") && why.contains("dev-a"),
        "{why}"
    );
    let shown = fleetctl(&url, &token, &["device", "show", "dev-a"]);
    assert!(
        shown.contains("health") && shown.contains("assigned digits-mlp@v2"),
        "{shown}"
    );

    // Every outbox item the agents sent is acknowledged and stored once.
    for id in ["dev-a", "dev-b"] {
        let device = api.get(&format!("/api/v1/devices/{id}")).unwrap();
        assert!(
            device["device"]["acked_up_to"].as_i64().unwrap() > 0,
            "{device}"
        );
        assert!(
            device["items"]["telemetry"].as_i64().unwrap() >= 1,
            "{device}"
        );
    }
    server.assert_running();
}

/// `--database …` flags to repeat for `token create`.
fn database_flag(flags: &[String]) -> Vec<String> {
    flags
        .iter()
        .position(|f| f == "--database")
        .map(|i| flags[i..i + 2].to_vec())
        .unwrap_or_default()
}

#[test]
fn embedded_broker_and_sqlite_two_agents_serve_and_report() {
    let work = tempfile::tempdir().unwrap();
    run_fleet(
        work.path(),
        Backend {
            server_flags: Vec::new(),
            _guards: Vec::new(),
        },
    );
}

#[test]
fn mosquitto_and_postgres_two_agents_serve_and_report() {
    if !driftgate_tests::require_env(
        "mosquitto_and_postgres_two_agents_serve_and_report",
        "DRIFTGATE_TEST_MOSQUITTO",
        "Mosquitto",
    ) || !driftgate_tests::require_env(
        "mosquitto_and_postgres_two_agents_serve_and_report",
        "DRIFTGATE_TEST_POSTGRES",
        "a PostgreSQL server",
    ) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let data_dir = work.path().join("server");
    let database = common::fresh_postgres();
    // The server's keys, CA, broker certificate and CRL first: Mosquitto needs them.
    run_ok(
        Command::new(binary("fleet-server"))
            .args(["init", "--data-dir"])
            .arg(&data_dir)
            .args(["--database", &database]),
    );
    let mosquitto = common::Mosquitto::start_for(work.path(), &data_dir);
    let mut server_flags = mosquitto.server_flags.clone();
    server_flags.extend(["--database".to_string(), database]);
    run_fleet(
        work.path(),
        Backend {
            server_flags,
            _guards: vec![Box::new(mosquitto)],
        },
    );
}
