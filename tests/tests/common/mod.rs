//! The fleet as processes, for the fault and attack suites: a real `fleet-server` (its embedded
//! broker and SQLite) that a test can kill and start again on the same ports, `fleetctl` for
//! what an operator does, and real `edge-agent`s started from the bundles enrollment wrote,
//! each of which can be routed through a [`Proxy`] and killed at will.

#![allow(dead_code)] // each test binary uses its own part of the kit

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use driftgate_tests::{binary, free_port, run_ok, wait_for, workspace_root, Process};
use fleet_server::client::ApiClient;
use serde_json::{json, Value};

/// The server, its release key, and an admin token.
pub struct Fleet {
    pub work: PathBuf,
    pub data_dir: PathBuf,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub token: String,
    /// The embedded broker's device port (TLS).
    pub mqtt_port: u16,
    /// The release signing key and its public half.
    pub release_key: PathBuf,
    pub release_pub: PathBuf,
    args: Vec<String>,
    server: Option<Process>,
    starts: u32,
}

impl Fleet {
    /// A fresh fleet in `work`: release keys, the server on free ports (kept across restarts,
    /// so devices find it again), and an admin token.
    pub fn start(work: &Path) -> Fleet {
        let keys = work.join("keys");
        run_ok(Command::new(binary("fleetctl")).args([
            "keys",
            "gen",
            "--out",
            keys.to_str().expect("a UTF-8 path"),
        ]));
        let data_dir = work.join("server");
        let (api_port, mqtt_port) = (free_port(), free_port());
        let args = vec![
            "run".to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--api-listen".into(),
            format!("127.0.0.1:{api_port}"),
            "--mqtt-listen".into(),
            format!("127.0.0.1:{mqtt_port}"),
            "--release-key".into(),
            keys.join("release.pub").display().to_string(),
        ];
        let mut fleet = Fleet {
            work: work.to_path_buf(),
            data_dir,
            url: format!("http://127.0.0.1:{api_port}"),
            token: String::new(),
            mqtt_port,
            release_key: keys.join("release.pem"),
            release_pub: keys.join("release.pub"),
            args,
            server: None,
            starts: 0,
        };
        fleet.start_server();
        let out = run_ok(
            Command::new(binary("fleet-server"))
                .args(["token", "create", "--role", "admin", "--data-dir"])
                .arg(&fleet.data_dir),
        );
        fleet.token = out.trim().to_string();
        fleet
    }

    /// Starts the server (again) and waits until it says it listens.
    pub fn start_server(&mut self) {
        assert!(self.server.is_none(), "the server runs already");
        self.starts += 1;
        let log = self.work.join(format!("server-{}.log", self.starts));
        let mut server = Process::start(
            "fleet-server",
            Command::new(binary("fleet-server")).args(&self.args),
            log,
        );
        let endpoints = self.data_dir.join("endpoints.json");
        wait_for(
            "the server's endpoints.json",
            Duration::from_secs(60),
            || {
                server.assert_running();
                let bytes = std::fs::read(&endpoints).ok()?;
                let v: Value = serde_json::from_slice(&bytes).ok()?;
                (v["pid"].as_u64() == Some(u64::from(server.child.id()))).then_some(())
            },
        );
        self.server = Some(server);
    }

    /// SIGKILL: no shutdown of any kind, as a power cut or the OOM killer would do it.
    pub fn kill_server(&mut self) {
        self.server.take().expect("the server runs").sigkill();
    }

    /// Panics with the log's tail if the server has exited.
    pub fn assert_server_running(&mut self) {
        self.server
            .as_mut()
            .expect("the server runs")
            .assert_running();
    }

    pub fn api(&self) -> ApiClient {
        ApiClient::new(&self.url, Some(self.token.clone()))
    }

    /// `fleetctl --server … --token … ARGS`: stdout, or a panic with stderr.
    pub fn fleetctl(&self, args: &[&str]) -> String {
        run_ok(
            Command::new(binary("fleetctl"))
                .args(["--server", &self.url, "--token", &self.token])
                .args(args),
        )
    }

    /// Signs `model` as `name`@`version` with the fleet's release key; the self-test case is
    /// the given one or, without it, synthetic inputs run through tract. Returns the manifest.
    pub fn sign(
        &self,
        model: &Path,
        name: &str,
        version: &str,
        self_test: Option<&Path>,
    ) -> PathBuf {
        let manifest = self.work.join(format!("{name}-{version}.manifest.json"));
        let mut command = Command::new(binary("fleetctl"));
        command
            .args(["model", "sign"])
            .arg(model)
            .args(["--name", name, "--version", version, "--key"])
            .arg(&self.release_key)
            .arg("--out")
            .arg(&manifest);
        if let Some(case) = self_test {
            command.arg("--self-test").arg(case);
        }
        run_ok(&mut command);
        manifest
    }

    /// Signs and pushes a committed sample model (`models/{name}/{version}.onnx` with its
    /// self-test case).
    pub fn push_sample(&self, name: &str, version: &str) {
        let dir = workspace_root().join("models").join(name);
        let model = dir.join(format!("{version}.onnx"));
        let manifest = self.sign(
            &model,
            name,
            version,
            Some(&dir.join(format!("{version}.selftest.json"))),
        );
        self.push(&model, &manifest);
    }

    pub fn push(&self, model: &Path, manifest: &Path) {
        let out = self.fleetctl(&[
            "model",
            "push",
            model.to_str().expect("a UTF-8 path"),
            "--manifest",
            manifest.to_str().expect("a UTF-8 path"),
        ]);
        assert!(out.contains("pushed"), "{out}");
    }

    /// Enrolls `id` with `labels` (`key=value`) and prepares its agent (not started): the
    /// bundle, a local API port, telemetry every second.
    pub fn enroll(&self, id: &str, labels: &[&str]) -> Device {
        let bundle = self.work.join(id);
        let api_port = free_port();
        let mut args = vec![
            "device".to_string(),
            "enroll".into(),
            id.into(),
            "--out".into(),
            bundle.display().to_string(),
            "--api-listen".into(),
            format!("127.0.0.1:{api_port}"),
        ];
        for label in labels {
            args.push("--label".into());
            args.push(label.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.fleetctl(&args);
        let config = bundle.join("agent.toml");
        let mut text = std::fs::read_to_string(&config).expect("the bundle's agent.toml");
        // Figures every second, so gates and assertions need not wait for the default 10 s.
        text.push_str("\n[telemetry]\ninterval_secs = 1\n");
        std::fs::write(&config, text).expect("agent.toml written");
        Device {
            id: id.to_string(),
            bundle,
            api_port,
            broker_port: self.mqtt_port,
            process: None,
            starts: 0,
        }
    }

    /// The device as the server sees it (`GET /api/v1/devices/{id}`).
    pub fn device(&self, id: &str) -> Value {
        self.api()
            .get(&format!("/api/v1/devices/{id}"))
            .unwrap_or_else(|e| panic!("GET device {id}: {e}"))
    }

    /// The version of `model` the device last reported active, if any.
    pub fn reported_active(&self, id: &str, model: &str) -> Option<String> {
        let device = self.api().get(&format!("/api/v1/devices/{id}")).ok()?;
        model_state(&device["device"]["state"], model)?["active"]["version"]
            .as_str()
            .map(str::to_string)
    }

    pub fn rollout(&self, id: &str) -> Value {
        self.api()
            .get(&format!("/api/v1/rollouts/{id}"))
            .unwrap_or_else(|e| panic!("GET rollout {id}: {e}"))
    }

    /// The whole audit log, oldest first.
    pub fn audit(&self) -> Vec<Value> {
        let audit = self
            .api()
            .get("/api/v1/audit?limit=10000")
            .expect("the audit log");
        audit["entries"].as_array().cloned().unwrap_or_default()
    }
}

/// The named model's entry in a reported state.
pub fn model_state<'a>(state: &'a Value, model: &str) -> Option<&'a Value> {
    state["models"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == model)
}

/// One enrolled device and its agent process.
pub struct Device {
    pub id: String,
    pub bundle: PathBuf,
    pub api_port: u16,
    /// Where its agent.toml points: the broker, or a proxy in front of it.
    pub broker_port: u16,
    process: Option<Process>,
    starts: u32,
}

impl Device {
    /// Points the agent at `port` (a [`driftgate_tests::proxy::Proxy`] in front of the
    /// broker) instead of the broker itself. The host name stays, so TLS is unchanged.
    pub fn route_through(&mut self, port: u16) {
        let config = self.bundle.join("agent.toml");
        let text = std::fs::read_to_string(&config).expect("agent.toml");
        let from = format!(":{}\"", self.broker_port);
        assert!(text.contains(&from), "no broker port in {text}");
        std::fs::write(&config, text.replace(&from, &format!(":{port}\""))).expect("agent.toml");
        self.broker_port = port;
    }

    /// Appends TOML to the agent's config (a section the bundle does not have).
    pub fn configure(&self, toml: &str) {
        let config = self.bundle.join("agent.toml");
        let mut text = std::fs::read_to_string(&config).expect("agent.toml");
        text.push('\n');
        text.push_str(toml);
        std::fs::write(&config, text).expect("agent.toml");
    }

    pub fn data_dir(&self) -> PathBuf {
        self.bundle.join("data")
    }

    pub fn start(&mut self) {
        assert!(self.process.is_none(), "{} runs already", self.id);
        self.starts += 1;
        let log = self
            .bundle
            .parent()
            .expect("bundles live in the work dir")
            .join(format!("{}-{}.log", self.id, self.starts));
        self.process = Some(Process::start(
            &self.id,
            Command::new(binary("edge-agent"))
                .args(["run", "--config"])
                .arg(self.bundle.join("agent.toml"))
                .env("RUST_LOG", "info"),
            log,
        ));
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.process.take().expect("the agent runs").sigkill();
    }

    pub fn assert_running(&mut self) {
        self.process
            .as_mut()
            .unwrap_or_else(|| panic!("{} is not started", self.id))
            .assert_running();
    }

    /// The last lines of the running agent's log.
    pub fn log(&self) -> String {
        self.process
            .as_ref()
            .map(|p| p.tail(200))
            .unwrap_or_default()
    }

    /// The agent's local inference API.
    pub fn local(&self) -> ApiClient {
        ApiClient::new(&format!("http://127.0.0.1:{}", self.api_port), None)
    }

    /// The version of `model` the agent's API serves now, if any.
    pub fn serving(&self, model: &str) -> Option<String> {
        let meta = self.local().get(&format!("/v2/models/{model}")).ok()?;
        meta["versions"][0].as_str().map(str::to_string)
    }
}

/// A steady application load on a device: one request of the model's self-test inputs every
/// `every`, counting answers and failures, until dropped.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(device: &Device, model: &str, request: Value, every: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let client = device.local();
        let path = format!("/v2/models/{model}/infer");
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match client.post_json(&path, &request) {
                    Ok(_) => o.fetch_add(1, Ordering::Relaxed),
                    Err(_) => f.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(every);
            }
        });
        Load {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The inputs of a committed sample model's self-test case, as an inference request.
pub fn sample_request(name: &str, version: &str) -> Value {
    let path = workspace_root()
        .join("models")
        .join(name)
        .join(format!("{version}.selftest.json"));
    let case: Value = serde_json::from_slice(&std::fs::read(&path).expect("a self-test case"))
        .expect("self-test JSON");
    json!({ "inputs": case["inputs"] })
}
