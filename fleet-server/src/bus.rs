//! The server's own MQTT session: a privileged client of the embedded broker (over its
//! loopback listener) or of an external one (Mosquitto, EMQX), the same code either way.
//!
//! It subscribes to every device's uplink topics and hands each message to the handler for
//! its kind; it publishes directives, acks and chunk replies. The event loop never waits on
//! the database: handlers run in their own tasks, fed through bounded queues.

use std::sync::Arc;
use std::time::Duration;

use fleet_protocol::{DeviceId, TopicKind, Topics};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// Where and how the server connects.
#[derive(Debug, Clone)]
pub struct BusConfig {
    pub host: String,
    pub port: u16,
    /// TLS to the broker: (CA PEM, optional client certificate and key PEM).
    pub tls: Option<BusTls>,
    pub username: String,
    pub password: String,
    pub client_id: String,
    pub max_packet_bytes: usize,
    pub topics: Topics,
    /// Replicas of a scale-out share their subscriptions (`$share/{group}/…`): the broker
    /// hands each device message to one of them.
    pub shared_group: Option<String>,
}

#[derive(Debug, Clone)]
pub struct BusTls {
    pub ca_pem: Vec<u8>,
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

/// A message from a device, routed by kind.
#[derive(Debug)]
pub struct DeviceMessage {
    pub device: DeviceId,
    pub kind: TopicKind,
    pub payload: Vec<u8>,
}

/// Publishes on device topics. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    client: AsyncClient,
    topics: Topics,
    shared_group: Option<String>,
}

impl Bus {
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Publishes `payload` on the device's `kind` topic, QoS 1, retained when the wire
    /// contract says so (directives).
    pub async fn publish(
        &self,
        device: &DeviceId,
        kind: TopicKind,
        payload: Vec<u8>,
    ) -> Result<(), rumqttc::ClientError> {
        self.client
            .publish(
                self.topics.topic(device, kind),
                QoS::AtLeastOnce,
                kind.is_retained(),
                payload,
            )
            .await
    }
}

impl Bus {
    /// Like [`Bus::publish`], but never waits: when the client's request queue is full the
    /// message is handed to a task that waits for room. For the workers the session's event
    /// loop feeds: the loop waits for room in their queues, so a worker waiting for room in
    /// the loop's queue would close a circle (seen with 10,000 simulated devices uploading at
    /// once: acks stopped and ingest with them).
    pub fn publish_detached(&self, device: &DeviceId, kind: TopicKind, payload: Vec<u8>) {
        let topic = self.topics.topic(device, kind);
        match self
            .client
            .try_publish(&topic, QoS::AtLeastOnce, kind.is_retained(), payload)
        {
            Ok(()) => {}
            Err(rumqttc::ClientError::TryRequest(request)) => {
                let client = self.client.clone();
                tokio::spawn(async move {
                    if let rumqttc::Request::Publish(publish) = request {
                        let _ = client
                            .publish(publish.topic, publish.qos, publish.retain, publish.payload)
                            .await;
                    }
                });
            }
            Err(e) => tracing::warn!(%topic, error = %e, "could not queue a message"),
        }
    }
}

/// Where incoming messages go: one queue per kind of work.
pub struct Routes {
    /// `up`, `state` and `status`: stored by the ingest workers.
    pub ingest: Vec<mpsc::Sender<DeviceMessage>>,
    /// `fetch`: answered by the artifact server.
    pub fetch: mpsc::Sender<DeviceMessage>,
}

impl Routes {
    /// A device's messages always go to the same ingest worker, so they are stored in the
    /// order they came.
    fn ingest_for(&self, device: &DeviceId) -> &mpsc::Sender<DeviceMessage> {
        let hash = device.as_str().bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
        });
        &self.ingest[(hash % self.ingest.len() as u64) as usize]
    }
}

/// Connects (lazily: the event loop does the work) and returns the publishing half.
pub fn connect(config: &BusConfig) -> Result<(Bus, EventLoop), String> {
    let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
    options.set_keep_alive(Duration::from_secs(20));
    options.set_max_packet_size(config.max_packet_bytes, config.max_packet_bytes);
    // A single server keeps a persistent session: subscriptions and the QoS 1 messages
    // queued while it restarts survive. A replica's session is clean: a broker queues a
    // shared subscription's share for a member whose persistent session is offline (Mosquitto
    // does), so while one replica was stopped or dead, every device whose next message fell
    // to it waited for its ack timeout, and ingest all but stopped (the scale bench measured
    // 127 items/s on the remaining replica). With clean sessions the broker shares among the
    // replicas that are connected. What a dying replica had received but not stored: an
    // outbox batch is resent until acked; a state report is lost until the device's next one
    // (docs/scale-out.md, "Limits to know").
    options.set_clean_session(config.shared_group.is_some());
    options.set_credentials(&config.username, &config.password);
    options.set_inflight(256);
    if let Some(tls) = &config.tls {
        let _ = rustls::crypto::ring::default_provider().install_default();
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: tls.ca_pem.clone(),
            alpn: None,
            client_auth: tls.client.clone(),
        }));
    }
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    // Acks and chunk replies are small and latency-bound: no Nagle.
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    Ok((
        Bus {
            client,
            topics: config.topics.clone(),
            shared_group: config.shared_group.clone(),
        },
        eventloop,
    ))
}

/// Drives the session until `shutdown` fires: subscribes on every ConnAck (a persistent
/// session keeps them, but a broker restart may not), routes messages, reconnects with a
/// capped backoff.
pub async fn run(
    bus: Bus,
    mut eventloop: EventLoop,
    routes: Routes,
    metrics: Arc<Metrics>,
    connected: tokio::sync::watch::Sender<bool>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let topics = bus.topics.clone();
    let shared_group = bus.shared_group.clone();
    let mut backoff = Duration::from_millis(200);
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            _ = shutdown.changed() => {
                let _ = bus.client.disconnect().await;
                return;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(200);
                tracing::info!("connected to the broker");
                let client = bus.client.clone();
                let topics = topics.clone();
                let shared_group = shared_group.clone();
                // Subscribing from inside the loop would deadlock on a full request queue.
                tokio::spawn(async move {
                    let filters = [
                        TopicKind::Up,
                        TopicKind::State,
                        TopicKind::Status,
                        TopicKind::Fetch,
                    ]
                    .map(|kind| {
                        let filter = topics.all_devices(kind);
                        let filter = match &shared_group {
                            Some(group) => format!("$share/{group}/{filter}"),
                            None => filter,
                        };
                        rumqttc::SubscribeFilter::new(filter, QoS::AtLeastOnce)
                    });
                    if let Err(e) = client.subscribe_many(filters).await {
                        tracing::error!(error = %e, "subscribe failed");
                    }
                });
            }
            // Ready once subscribed: what devices publish from now on reaches the server.
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                let _ = connected.send(true);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let (device, kind) = match topics.parse(&publish.topic) {
                    Ok(parsed) => parsed,
                    Err(_) => {
                        metrics.dropped("unknown", "bad_topic");
                        continue;
                    }
                };
                let message = DeviceMessage {
                    device,
                    kind,
                    payload: publish.payload.to_vec(),
                };
                let queue = match kind {
                    TopicKind::Fetch => &routes.fetch,
                    TopicKind::Up | TopicKind::State | TopicKind::Status => {
                        routes.ingest_for(&message.device)
                    }
                    // Our own downlink topics echoed back, or a device publishing on them (the
                    // broker's ACL should have stopped that).
                    _ => {
                        metrics.dropped(kind.as_str(), "wrong_direction");
                        continue;
                    }
                };
                // Waiting here applies back-pressure to the broker connection rather than
                // buffering without bound.
                if queue.send(message).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let _ = connected.send(false);
                tracing::warn!(error = %e, "broker connection lost; retrying in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}
