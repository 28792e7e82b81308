//! Test helpers: an embedded MQTT broker and a server-side chunk responder.

#![allow(dead_code)]

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleet_protocol::chunk::{encode_chunk, ChunkHeader, ChunkStatus};
use fleet_protocol::{decode, ChunkRequest, Sha256Digest, TopicKind, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn wait_for_port(port: u16, what: &str) {
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
    let mut brokers = vec![TestBroker {
        name: "embedded rumqttd",
        port: start_broker(),
        process: None,
        _dir: None,
    }];
    if driftgate_tests::require_env(
        test,
        "DRIFTGATE_TEST_MOSQUITTO",
        "the mosquitto broker (apt-get install mosquitto) for its Mosquitto half",
    ) {
        brokers.push(start_mosquitto());
    }
    brokers
}

/// Starts a Mosquitto process on a free loopback port with a throwaway config.
pub fn start_mosquitto() -> TestBroker {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_packet_size 8388608\nlog_dest stderr\nlog_type error\n"),
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
}

/// Plays the server's part of chunk delivery: answers requests on `{root}/d/+/fetch` with slices
/// of `artifact`, using the protocol crate's codec. Returns a counter of data bytes served.
pub async fn start_responder(port: u16, artifact: Arc<Vec<u8>>, faults: Faults) -> Arc<AtomicU64> {
    let served = Arc::new(AtomicU64::new(0));
    let mut options = MqttOptions::new("test-server", "127.0.0.1", port);
    options.set_max_packet_size(8 << 20, 8 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    let topics = Topics::default();
    client
        .subscribe(topics.all_devices(TopicKind::Fetch), QoS::AtLeastOnce)
        .await
        .unwrap();
    let digest = Sha256Digest::of(&artifact);
    let counter = served.clone();
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
            if faults.drop_every > 0 && seen.is_multiple_of(faults.drop_every) {
                continue;
            }
            let reply = if request.sha256 != digest {
                encode_chunk(
                    &ChunkHeader {
                        status: ChunkStatus::NotFound,
                        sha256: request.sha256,
                        offset: request.offset,
                    },
                    &[],
                )
            } else if request.offset >= artifact.len() as u64 {
                encode_chunk(
                    &ChunkHeader {
                        status: ChunkStatus::OutOfRange,
                        sha256: digest,
                        offset: request.offset,
                    },
                    &[],
                )
            } else {
                let start = request.offset as usize;
                let end = (start + request.len as usize).min(artifact.len());
                let mut data = artifact[start..end].to_vec();
                if end == artifact.len() {
                    data.extend(std::iter::repeat_n(0xAA, faults.overlong_by));
                }
                counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                encode_chunk(
                    &ChunkHeader {
                        status: ChunkStatus::Ok,
                        sha256: digest,
                        offset: request.offset,
                    },
                    &data,
                )
            };
            let topic = topics.topic(&device, TopicKind::Chunk);
            let _ = client.publish(topic, QoS::AtLeastOnce, false, reply).await;
        }
    });
    served
}
