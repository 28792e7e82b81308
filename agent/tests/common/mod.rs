//! Test helpers: an embedded MQTT broker and a server-side chunk responder.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_protocol::chunk::{encode_chunk, ChunkHeader, ChunkStatus};
use fleet_protocol::{
    decode, encode, ChunkRequest, DeviceId, Directive, Envelope, Manifest, ModelDirective,
    ModelName, ModelVersion, SelfTest, Sha256Digest, SigningKey, State, TopicKind, Topics,
    DIRECTIVE_TYPE, MANIFEST_TYPE, V1,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

pub mod agent;
pub mod onnx;
// Not every test binary uses the proxy.
#[allow(unused_imports)]
pub use driftgate_tests::proxy;
pub mod receiver;
pub mod tls;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

pub fn wait_for_port(port: u16, what: &str) {
    for _ in 0..250 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not start on port {port}");
}

/// A running broker; a Mosquitto process is killed when this is dropped.
pub struct TestBroker {
    pub name: &'static str,
    pub port: u16,
    process: Option<std::process::Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(child) = &mut self.process {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The brokers to run a test against: always the embedded one, and Mosquitto when
/// `DRIFTGATE_TEST_MOSQUITTO=1` says it is installed (`.ci/run` installs it).
pub fn brokers(test: &str) -> Vec<TestBroker> {
    // Under an emulator (cross/test-arm.sh) the agent's code is what is on trial, not the
    // broker, and the in-process rumqttd would run emulated too: one broker is enough there,
    // Mosquitto (native, so fast) when it is installed.
    if std::env::var_os("DRIFTGATE_TEST_ONE_BROKER").is_some() {
        let mosquitto = std::env::var_os("DRIFTGATE_TEST_MOSQUITTO").is_some();
        eprintln!(
            "{test}: one broker ({}), as DRIFTGATE_TEST_ONE_BROKER asks",
            if mosquitto { "Mosquitto" } else { "embedded" }
        );
        return vec![if mosquitto {
            start_mosquitto()
        } else {
            embedded_broker()
        }];
    }
    let mut brokers = vec![embedded_broker()];
    if driftgate_tests::require_env(
        test,
        "DRIFTGATE_TEST_MOSQUITTO",
        "the mosquitto broker (apt-get install mosquitto) for its Mosquitto half",
    ) {
        brokers.push(start_mosquitto());
    }
    brokers
}

impl TestBroker {
    /// A broker process the test started, killed when this is dropped.
    pub fn from_process(
        name: &'static str,
        port: u16,
        process: std::process::Child,
        dir: tempfile::TempDir,
    ) -> TestBroker {
        TestBroker {
            name,
            port,
            process: Some(process),
            _dir: Some(dir),
        }
    }
}

/// The embedded broker (rumqttd in this process).
pub fn embedded_broker() -> TestBroker {
    TestBroker {
        name: "embedded rumqttd",
        port: start_broker(),
        process: None,
        _dir: None,
    }
}

/// Starts a Mosquitto process on a free loopback port with a throwaway config.
pub fn start_mosquitto() -> TestBroker {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_packet_size 8388608\nset_tcp_nodelay true\nlog_dest stderr\nlog_type error\n"),
    )
    .unwrap();
    let binary = std::env::var("MOSQUITTO").unwrap_or_else(|_| "mosquitto".into());
    let child = std::process::Command::new(&binary)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
    wait_for_port(port, "mosquitto");
    TestBroker {
        name: "mosquitto",
        port,
        process: Some(child),
        _dir: Some(dir),
    }
}

/// Starts rumqttd on a free loopback port, in its own threads, and returns the port.
pub fn start_broker() -> u16 {
    let port = free_port();
    let config = format!(
        r#"
id = 0
[router]
max_connections = 1000
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 5242880
max_inflight_count = 100
dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&config).expect("broker config");
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(config);
        if let Err(e) = broker.start() {
            eprintln!("embedded broker stopped: {e}");
        }
    });
    wait_for_port(port, "the embedded broker");
    port
}

/// How the responder misbehaves, for fault tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Ignore every n-th request (0: never).
    pub drop_every: u64,
    /// Append this many bytes past the artifact's end to the last chunk.
    pub overlong_by: usize,
    /// Wait this long before each reply: a slow link, so a download can be interrupted.
    pub reply_delay: Duration,
}

/// Plays the server's part of chunk delivery: answers requests on `{root}/d/+/fetch` with slices
/// of the artifacts it holds, using the protocol crate's codec.
#[derive(Clone)]
pub struct Responder {
    artifacts: Arc<Mutex<HashMap<Sha256Digest, Arc<Vec<u8>>>>>,
    /// Data bytes served so far.
    pub served: Arc<AtomicU64>,
}

impl Responder {
    /// Serves `bytes` under `digest`, whatever they hash to: an artifact swapped on the server.
    pub fn insert(&self, digest: Sha256Digest, bytes: Vec<u8>) {
        self.artifacts
            .lock()
            .unwrap()
            .insert(digest, Arc::new(bytes));
    }

    /// Makes an artifact available and returns its digest.
    pub fn add(&self, artifact: Vec<u8>) -> Sha256Digest {
        let digest = Sha256Digest::of(&artifact);
        self.artifacts
            .lock()
            .unwrap()
            .insert(digest, Arc::new(artifact));
        digest
    }

    pub async fn start(port: u16, faults: Faults) -> Responder {
        let responder = Responder {
            artifacts: Arc::new(Mutex::new(HashMap::new())),
            served: Arc::new(AtomicU64::new(0)),
        };
        // A client id of its own: a second responder on the same broker must not take over
        // the first one's session.
        static RESPONDERS: AtomicU64 = AtomicU64::new(0);
        let id = RESPONDERS.fetch_add(1, Ordering::Relaxed);
        let mut options = MqttOptions::new(
            format!("test-server-{port}-{}-{id}", std::process::id()),
            "127.0.0.1",
            port,
        );
        options.set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 256);
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let topics = Topics::default();
        client
            .subscribe(topics.all_devices(TopicKind::Fetch), QoS::AtLeastOnce)
            .await
            .unwrap();
        let this = responder.clone();
        tokio::spawn(async move {
            let mut seen = 0u64;
            loop {
                let event = match eventloop.poll().await {
                    Ok(event) => event,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Event::Incoming(Packet::Publish(p)) = event else {
                    continue;
                };
                let Ok((device, _)) = topics.parse(&p.topic) else {
                    continue;
                };
                let Ok(request) = decode::<ChunkRequest>(&p.payload) else {
                    continue;
                };
                seen += 1;
                if !faults.reply_delay.is_zero() {
                    tokio::time::sleep(faults.reply_delay).await;
                }
                if faults.drop_every > 0 && seen.is_multiple_of(faults.drop_every) {
                    continue;
                }
                let artifact = this.artifacts.lock().unwrap().get(&request.sha256).cloned();
                let header = |status| ChunkHeader {
                    status,
                    sha256: request.sha256,
                    offset: request.offset,
                };
                let reply = match artifact {
                    None => encode_chunk(&header(ChunkStatus::NotFound), &[]),
                    Some(a) if request.offset >= a.len() as u64 => {
                        encode_chunk(&header(ChunkStatus::OutOfRange), &[])
                    }
                    Some(a) => {
                        let start = request.offset as usize;
                        let end = (start + request.len as usize).min(a.len());
                        let mut data = a[start..end].to_vec();
                        if end == a.len() {
                            data.extend(std::iter::repeat_n(0xAA, faults.overlong_by));
                        }
                        this.served.fetch_add(data.len() as u64, Ordering::Relaxed);
                        encode_chunk(&header(ChunkStatus::Ok), &data)
                    }
                };
                let topic = topics.topic(&device, TopicKind::Chunk);
                let _ = client.publish(topic, QoS::AtLeastOnce, false, reply).await;
            }
        });
        responder
    }
}

/// A responder holding one artifact; returns its served-bytes counter.
pub async fn start_responder(port: u16, artifact: Arc<Vec<u8>>, faults: Faults) -> Arc<AtomicU64> {
    let responder = Responder::start(port, faults).await;
    responder.add(artifact.to_vec());
    responder.served
}

/// A manifest for an opaque artifact: the downloader only reads its size and digest.
pub fn blob_manifest(artifact: &[u8]) -> Manifest {
    use fleet_protocol::tensor::Dim;
    use fleet_protocol::{ElementType, Tensor, TensorData, TensorSpec, Tolerance};
    let spec = TensorSpec {
        name: "x".into(),
        datatype: ElementType::F32,
        shape: vec![Dim::Fixed(1)],
    };
    let x = Tensor::new("x", vec![1], TensorData::F32(vec![0.0])).unwrap();
    Manifest {
        v: V1,
        name: ModelName::new("blob").unwrap(),
        release: 1,
        version: ModelVersion::new("v1").unwrap(),
        sha256: Sha256Digest::of(artifact),
        size: artifact.len() as u64,
        inputs: vec![spec.clone()],
        outputs: vec![spec],
        self_test: SelfTest {
            inputs: vec![x.clone()],
            outputs: vec![x],
            tolerance: Tolerance::default(),
        },
        profile_sha256: None,
        profile_size: None,
        min_agent_version: None,
        created_at_ms: 0,
    }
}

/// `len` bytes from a fixed xorshift stream: an artifact that compresses like a real one
/// would not, and is the same in every run.
pub fn pseudo_random_bytes(len: usize) -> Arc<Vec<u8>> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    Arc::new(
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect(),
    )
}

/// The test fleet's keys: fixed seeds, so failures reproduce.
pub fn release_key() -> SigningKey {
    SigningKey::from_bytes(&[2; 32])
}

pub fn fleet_key() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}

/// Writes `release.pub` and `fleet.pub` into `dir`.
pub fn write_public_keys(dir: &std::path::Path) {
    for (name, key) in [("release.pub", release_key()), ("fleet.pub", fleet_key())] {
        let pem = fleet_protocol::keys::verifying_key_to_pem(&key.verifying_key()).unwrap();
        std::fs::write(dir.join(name), pem).unwrap();
    }
}

pub fn models_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

/// A sample model's bytes and the manifest a release engineer would sign for it: signature read
/// with tract, self-test from the committed onnxruntime case.
pub fn sample_manifest(model: &str, version: &str, release: u64) -> (Vec<u8>, Manifest) {
    let path = models_dir().join(model).join(format!("{version}.onnx"));
    let onnx = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let case: SelfTest =
        serde_json::from_slice(&std::fs::read(path.with_extension("selftest.json")).unwrap())
            .unwrap();
    let signature = edge_agent::runtime::inspect(&onnx).unwrap();
    let manifest = Manifest {
        v: V1,
        name: ModelName::new(model).unwrap(),
        release,
        version: ModelVersion::new(version).unwrap(),
        sha256: Sha256Digest::of(&onnx),
        size: onnx.len() as u64,
        inputs: signature.inputs,
        outputs: signature.outputs,
        self_test: case,
        profile_sha256: None,
        profile_size: None,
        min_agent_version: None,
        created_at_ms: 0,
    };
    (onnx, manifest)
}

pub fn sign_manifest(manifest: &Manifest) -> Envelope {
    Envelope::sign(MANIFEST_TYPE, encode(manifest), &release_key())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A directive for `device` naming `models`, signed by the fleet key.
pub fn directive(device: &str, seq: u64, models: Vec<(Envelope, bool)>) -> Vec<u8> {
    let directive = Directive {
        v: V1,
        device: DeviceId::new(device).unwrap(),
        seq,
        issued_at_ms: now_ms(),
        expires_at_ms: now_ms() + 3_600_000,
        models: models
            .into_iter()
            .map(|(manifest, rollback)| ModelDirective {
                manifest,
                rollback,
                rollout: None,
            })
            .collect(),
    };
    encode(&Envelope::sign(
        DIRECTIVE_TYPE,
        encode(&directive),
        &fleet_key(),
    ))
}

/// The server's side of the control topics: publishes directives (retained) and follows the
/// reported state.
pub struct Control {
    client: AsyncClient,
    pub states: tokio::sync::watch::Receiver<Option<State>>,
}

impl Control {
    pub async fn start(port: u16, device: &str) -> Control {
        let mut options = MqttOptions::new(format!("test-control-{device}"), "127.0.0.1", port);
        options.set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let topics = Topics::default();
        let device = DeviceId::new(device).unwrap();
        client
            .subscribe(topics.topic(&device, TopicKind::State), QoS::AtLeastOnce)
            .await
            .unwrap();
        let (tx, states) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(state) = decode::<State>(&p.payload) {
                            tx.send_replace(Some(state));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Control { client, states }
    }

    pub async fn publish_directive(&self, device: &str, payload: Vec<u8>) {
        let topic = Topics::default().topic(&DeviceId::new(device).unwrap(), TopicKind::Directive);
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await
            .unwrap();
    }

    /// Publishes a directive naming only `manifest` (a signed rollback when `rollback`) and
    /// waits until the device reports that version active.
    pub async fn install(
        &mut self,
        device: &str,
        seq: u64,
        manifest: &Manifest,
        rollback: bool,
    ) -> State {
        self.publish_directive(
            device,
            directive(device, seq, vec![(sign_manifest(manifest), rollback)]),
        )
        .await;
        let (name, version) = (manifest.name.as_str(), manifest.version.as_str());
        self.wait_for(&format!("{name} {version} active"), |s| {
            s.models.iter().any(|m| {
                m.name.as_str() == name
                    && m.active
                        .as_ref()
                        .is_some_and(|a| a.version.as_str() == version)
            })
        })
        .await
    }

    /// Waits until the reported state satisfies `check`, or panics with the last state seen.
    pub async fn wait_for(&mut self, what: &str, check: impl Fn(&State) -> bool) -> State {
        let found = tokio::time::timeout(
            Duration::from_secs(60),
            self.states.wait_for(|s| s.as_ref().is_some_and(&check)),
        )
        .await
        .ok()
        .and_then(|r| r.ok().map(|state| state.clone()));
        match found {
            Some(Some(state)) => state,
            _ => panic!(
                "timed out waiting for {what}; last state: {:#?}",
                *self.states.borrow()
            ),
        }
    }
}

/// A minimal HTTP/1.1 client for the agent's local API: returns (status, body).
pub fn http(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    driftgate_tests::http_request(
        port,
        method,
        path,
        &[("Content-Type", "application/json")],
        body,
    )
}
