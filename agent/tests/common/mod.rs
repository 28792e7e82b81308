//! Test helpers: an embedded MQTT broker and a server-side chunk responder.

#![allow(dead_code)]

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleet_protocol::chunk::{encode_chunk, ChunkHeader, ChunkStatus};
use fleet_protocol::{decode, ChunkRequest, Sha256Digest, TopicKind, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Starts rumqttd on a free loopback port, in its own threads, and returns the port.
pub fn start_broker() -> u16 {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
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
    // Wait until it accepts connections.
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return port;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the embedded broker did not start on port {port}");
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
