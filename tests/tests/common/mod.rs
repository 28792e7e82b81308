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
    /// The broker's device port (TLS): the embedded broker's, or Mosquitto's.
    pub mqtt_port: u16,
    /// The release signing key and its public half.
    pub release_key: PathBuf,
    pub release_pub: PathBuf,
    args: Vec<String>,
    server: Option<Process>,
    starts: u32,
    mosquitto: Option<Mosquitto>,
    /// `--data-dir` and, on PostgreSQL, `--database`: what `fleet-server token create` needs.
    store_flags: Vec<String>,
    /// The file the (first) server writes its endpoints to.
    endpoints: PathBuf,
    /// Further replicas of a scale-out, by name.
    replicas: std::collections::BTreeMap<String, Replica>,
}

/// A further `fleet-server` replica of a scale-out.
pub struct Replica {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    process: Process,
}

impl Fleet {
    /// A fresh fleet in `work`: release keys, the server with its embedded broker on free
    /// ports (kept across restarts, so devices find it again), and an admin token.
    pub fn start(work: &Path) -> Fleet {
        let mqtt_port = free_port();
        Fleet::launch(
            work,
            mqtt_port,
            vec!["--mqtt-listen".into(), format!("127.0.0.1:{mqtt_port}")],
            None,
        )
    }

    /// The same fleet with Mosquitto as its broker (`DRIFTGATE_TEST_MOSQUITTO`), a process of
    /// its own that a test can stop and start again.
    pub fn start_with_mosquitto(work: &Path) -> Fleet {
        let data_dir = work.join("server");
        // The server's CA, broker certificate and CRL first: Mosquitto needs them.
        run_ok(
            Command::new(binary("fleet-server"))
                .args(["init", "--data-dir"])
                .arg(&data_dir),
        );
        let mosquitto = Mosquitto::start_for(work, &data_dir);
        let (port, flags) = (mosquitto.port, mosquitto.server_flags.clone());
        Fleet::launch(work, port, flags, Some(mosquitto))
    }

    /// A scale-out (issue 10): `fleet-server` replica `first` with Mosquitto
    /// (`DRIFTGATE_TEST_MOSQUITTO`) and a fresh PostgreSQL database (`DRIFTGATE_TEST_POSTGRES`),
    /// the leader lease `lease_secs` long. [`Fleet::start_replica`] adds more; they share the
    /// data dir (keys, CA, blobs), as replicas on one machine would.
    pub fn start_replicated(work: &Path, first: &str, lease_secs: u64) -> Fleet {
        let data_dir = work.join("server");
        let database = fresh_postgres();
        run_ok(
            Command::new(binary("fleet-server"))
                .args(["init", "--data-dir"])
                .arg(&data_dir)
                .args(["--database", &database]),
        );
        let mosquitto = Mosquitto::start_for(work, &data_dir);
        let (port, mut flags) = (mosquitto.port, mosquitto.server_flags.clone());
        flags.extend([
            "--database".to_string(),
            database,
            "--replica".into(),
            first.into(),
            "--lease-secs".into(),
            lease_secs.to_string(),
        ]);
        Fleet::launch(work, port, flags, Some(mosquitto))
    }

    /// Starts another replica of this scale-out, its API on a port of its own; returns its URL.
    pub fn start_replica(&mut self, name: &str) -> String {
        let api_port = free_port();
        let mut args = self.args.clone();
        let mut set = |flag: &str, value: String| {
            let at = args
                .iter()
                .position(|a| a == flag)
                .unwrap_or_else(|| panic!("{flag} is not among the server's flags"));
            args[at + 1] = value;
        };
        set("--api-listen", format!("127.0.0.1:{api_port}"));
        set("--replica", name.to_string());
        let log = self.work.join(format!("server-{name}.log"));
        let mut process = Process::start(
            "fleet-server",
            Command::new(binary("fleet-server")).args(&args),
            log,
        );
        let endpoints = self.data_dir.join(format!("endpoints-{name}.json"));
        wait_for_endpoints(&mut process, &endpoints);
        let url = format!("http://127.0.0.1:{api_port}");
        self.replicas.insert(
            name.to_string(),
            Replica {
                url: url.clone(),
                process,
            },
        );
        url
    }

    /// SIGKILLs a replica started with [`Fleet::start_replica`].
    pub fn kill_replica(&mut self, name: &str) {
        self.replicas
            .remove(name)
            .unwrap_or_else(|| panic!("no replica {name}"))
            .process
            .sigkill();
    }

    /// `GET /api/v1/cluster` of the server at `url`.
    pub fn cluster(&self, url: &str) -> Option<Value> {
        ApiClient::new(url, Some(self.token.clone()))
            .get("/api/v1/cluster")
            .ok()
    }

    fn launch(
        work: &Path,
        mqtt_port: u16,
        broker_flags: Vec<String>,
        mosquitto: Option<Mosquitto>,
    ) -> Fleet {
        let keys = work.join("keys");
        run_ok(Command::new(binary("fleetctl")).args([
            "keys",
            "gen",
            "--out",
            keys.to_str().expect("a UTF-8 path"),
        ]));
        let data_dir = work.join("server");
        let api_port = free_port();
        let mut args = vec![
            "run".to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--api-listen".into(),
            format!("127.0.0.1:{api_port}"),
            "--release-key".into(),
            keys.join("release.pub").display().to_string(),
        ];
        args.extend(broker_flags);
        let mut store_flags = vec!["--data-dir".to_string(), data_dir.display().to_string()];
        let flag_value = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|at| args.get(at + 1))
                .cloned()
        };
        if let Some(database) = flag_value("--database") {
            store_flags.extend(["--database".to_string(), database]);
        }
        let endpoints = match flag_value("--replica") {
            Some(replica) => data_dir.join(format!("endpoints-{replica}.json")),
            None => data_dir.join("endpoints.json"),
        };
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
            mosquitto,
            store_flags,
            endpoints,
            replicas: Default::default(),
        };
        fleet.start_server();
        let out = run_ok(
            Command::new(binary("fleet-server"))
                .args(["token", "create", "--role", "admin"])
                .args(&fleet.store_flags),
        );
        fleet.token = out.trim().to_string();
        fleet
    }

    /// The fleet's Mosquitto; panics for a fleet on the embedded broker.
    pub fn mosquitto(&mut self) -> &mut Mosquitto {
        self.mosquitto
            .as_mut()
            .expect("this fleet runs on its embedded broker (Fleet::start_with_mosquitto)")
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
        wait_for_endpoints(&mut server, &self.endpoints);
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

    /// Asserts that the server stores every item of `id`'s outbox up to the last one it acked,
    /// without a gap (ids count from 1 on each device), and returns that ack.
    pub fn assert_acked_items_stored(&self, id: &str) -> i64 {
        let acked = self.device(id)["device"]["acked_up_to"]
            .as_i64()
            .unwrap_or_else(|| panic!("{id} has no acked_up_to"));
        let items = self
            .api()
            .get(&format!("/api/v1/devices/{id}/items?limit=100000"))
            .unwrap_or_else(|e| panic!("GET items of {id}: {e}"));
        let ids: Vec<i64> = items["items"]
            .as_array()
            .expect("an items array")
            .iter()
            .filter_map(|item| item["id"].as_i64())
            .filter(|stored| *stored <= acked)
            .collect();
        assert_eq!(
            ids,
            (1..=acked).collect::<Vec<_>>(),
            "{id}: stored ids up to the ack"
        );
        acked
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
        let mut command = Command::new(binary("edge-agent"));
        command
            .args(["run", "--config"])
            .arg(self.bundle.join("agent.toml"));
        self.spawn(command);
    }

    /// Starts the agent with its wall clock `offset` away from the machine's (`+10m`, `-20m`:
    /// libfaketime's syntax), with Debian's libfaketime preloaded. Only the wall clock moves:
    /// timers and timeouts run on the monotonic clock, as on a device whose clock was set wrong.
    ///
    /// The library is preloaded directly rather than through the `faketime` wrapper, which
    /// forks: killing the wrapper would leave the agent running after the test.
    pub fn start_with_clock(&mut self, offset: &str) {
        let library = libfaketime().unwrap_or_else(|why| panic!("{why}"));
        let mut command = Command::new(binary("edge-agent"));
        command
            .args(["run", "--config"])
            .arg(self.bundle.join("agent.toml"))
            .env("LD_PRELOAD", library)
            .env("FAKETIME", offset)
            .env("DONT_FAKE_MONOTONIC", "1");
        self.spawn(command);
    }

    fn spawn(&mut self, mut command: Command) {
        assert!(self.process.is_none(), "{} runs already", self.id);
        self.starts += 1;
        let log = self
            .bundle
            .parent()
            .expect("bundles live in the work dir")
            .join(format!("{}-{}.log", self.id, self.starts));
        self.process = Some(Process::start(
            &self.id,
            command.env("RUST_LOG", "info"),
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

/// Mosquitto as the fleet's broker, configured by the server's own template
/// (`fleet_server::broker::render_mosquitto_config`) on fixed ports, so that it can be stopped
/// and started again where the server and the devices find it.
pub struct Mosquitto {
    /// The devices' listener (mutual TLS).
    pub port: u16,
    /// The server's listener (loopback, password).
    pub internal_port: u16,
    /// `fleet-server run` flags that point the server at this broker.
    pub server_flags: Vec<String>,
    conf: PathBuf,
    dir: PathBuf,
    process: Option<Process>,
    starts: u32,
}

impl Mosquitto {
    /// Configures Mosquitto for the server whose data dir `fleet-server init` prepared, and
    /// starts it.
    pub fn start_for(work: &Path, data_dir: &Path) -> Mosquitto {
        use fleet_server::broker::{
            mosquitto_acl, mosquitto_password_line, render_mosquitto_config, MosquittoVars,
            MIN_PACKET_BYTES,
        };
        use std::os::unix::fs::PermissionsExt;

        // Mosquitto drops root for its own user before reading certificates: give it a copy
        // of the broker's key it can read (the data dir keeps the 0600 original).
        let dir = work.join("mosquitto");
        std::fs::create_dir_all(&dir).expect("mosquitto dir");
        for path in [work, data_dir, &data_dir.join("ca"), &dir] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
                .expect("permissions");
        }
        for file in ["server.pem", "server.key"] {
            std::fs::copy(data_dir.join("broker").join(file), dir.join(file)).expect("copy");
        }
        std::fs::set_permissions(
            dir.join("server.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("permissions");
        let topics = fleet_protocol::Topics::default();
        std::fs::write(dir.join("acl"), mosquitto_acl(&topics)).expect("acl");
        let password = format!("pw-{}", free_port());
        std::fs::write(
            dir.join("passwd"),
            mosquitto_password_line("driftgate-server", &password).expect("a password line") + "\n",
        )
        .expect("passwd");
        let password_file = work.join("server-broker.pass");
        std::fs::write(&password_file, &password).expect("password file");
        // Sessions and retained messages survive a restart, as in any real deployment.
        let persistence = dir.join("persistence");
        std::fs::create_dir_all(&persistence).expect("persistence dir");
        std::fs::set_permissions(&persistence, std::fs::Permissions::from_mode(0o777))
            .expect("permissions");
        let (port, internal_port) = (free_port(), free_port());
        let vars = MosquittoVars {
            bind_address: "127.0.0.1".into(),
            port,
            internal_port,
            cafile: data_dir.join("ca/ca.pem"),
            certfile: dir.join("server.pem"),
            keyfile: dir.join("server.key"),
            crlfile: data_dir.join("ca/crl.pem"),
            aclfile: dir.join("acl"),
            server_password_file: dir.join("passwd"),
            topics,
            max_packet_bytes: MIN_PACKET_BYTES,
            persistence_dir: Some(persistence),
        };
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, render_mosquitto_config(&vars)).expect("mosquitto.conf");
        let mut mosquitto = Mosquitto {
            port,
            internal_port,
            server_flags: vec![
                "--broker".into(),
                format!("mqtt://127.0.0.1:{internal_port}"),
                "--broker-password-file".into(),
                password_file.display().to_string(),
                "--public-broker-url".into(),
                format!("mqtts://localhost:{port}"),
            ],
            conf,
            dir,
            process: None,
            starts: 0,
        };
        mosquitto.start();
        mosquitto
    }

    /// Starts it (again) and waits for both listeners.
    pub fn start(&mut self) {
        assert!(self.process.is_none(), "Mosquitto runs already");
        self.starts += 1;
        let mut process = Process::start(
            "mosquitto",
            Command::new(std::env::var("MOSQUITTO").unwrap_or_else(|_| "mosquitto".into()))
                .arg("-c")
                .arg(&self.conf),
            self.dir.join(format!("mosquitto-{}.log", self.starts)),
        );
        let ports = [self.port, self.internal_port];
        wait_for("Mosquitto's listeners", Duration::from_secs(10), || {
            process.assert_running();
            ports
                .iter()
                .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
                .then_some(())
        });
        self.process = Some(process);
    }

    /// SIGTERM, as a service manager stops it: it writes its persistence file first.
    pub fn stop(&mut self) {
        self.process
            .take()
            .expect("Mosquitto runs")
            .stop(Duration::from_secs(10));
    }

    pub fn assert_running(&mut self) {
        self.process
            .as_mut()
            .expect("Mosquitto runs")
            .assert_running();
    }
}

/// Debian's libfaketime (package `faketime`): `$DRIFTGATE_LIBFAKETIME`, or the multiarch path.
fn libfaketime() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("DRIFTGATE_LIBFAKETIME") {
        return Ok(PathBuf::from(path));
    }
    let found = std::fs::read_dir("/usr/lib")
        .map_err(|e| format!("/usr/lib: {e}"))?
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("faketime/libfaketime.so.1"))
        .find(|path| path.is_file());
    found.ok_or_else(|| {
        "libfaketime.so.1 is not under /usr/lib/*/faketime/ (apt-get install faketime), \
         or set DRIFTGATE_LIBFAKETIME"
            .to_string()
    })
}

/// Waits until `server` wrote its pid to `endpoints` (it listens then).
fn wait_for_endpoints(server: &mut Process, endpoints: &Path) {
    wait_for(
        &format!("the server's {}", endpoints.display()),
        Duration::from_secs(60),
        || {
            server.assert_running();
            let bytes = std::fs::read(endpoints).ok()?;
            let v: Value = serde_json::from_slice(&bytes).ok()?;
            (v["pid"].as_u64() == Some(u64::from(server.child.id()))).then_some(())
        },
    );
}

/// A fresh PostgreSQL database on the server `DRIFTGATE_TEST_POSTGRES_URL` names (a role that
/// may create databases; default the one `.ci/run` creates). Returns its URL.
pub fn fresh_postgres() -> String {
    let admin = std::env::var("DRIFTGATE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://driftgate:driftgate@127.0.0.1:5432/postgres".into());
    let name = format!("driftgate_e2e_{}_{}", std::process::id(), free_port());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("connecting to {admin}: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("creating {name}: {e}"));
        pool.close().await;
    });
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{name}")
}
