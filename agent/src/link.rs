//! The MQTT link: one session with the broker, kept alive for the agent's whole life.
//!
//! rumqttc's event loop reconnects as soon as it is polled again after an error, so the driver
//! here sleeps between attempts with full-jitter exponential backoff (so that a fleet coming
//! back after a broker restart does not reconnect in lock step). The session is persistent
//! (`clean_session = false`) and the agent still resubscribes on every ConnAck, because a
//! broker may have lost the session. The last will marks the device offline, retained.
//!
//! Inbound messages are routed by topic, without decoding (the consumers own their decoders):
//! - the directive and the ack go into `watch` channels, since only the latest one matters and
//!   a slow consumer must never block the event loop;
//! - a directive is acknowledged to the broker (manual PUBACK) only once the controller has
//!   made its decision durable: a kill between receipt and persistence leaves it unacknowledged,
//!   so the broker delivers it again to the resumed session. Everything else is acknowledged
//!   on receipt (a lost chunk is requested again; a lost ack is re-sent by the server);
//! - chunk replies go into a bounded queue; when it is full a chunk is dropped and counted, and
//!   the downloader asks for it again after its timeout.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleet_protocol::outbox::Ack;
use fleet_protocol::state::{Presence, Status};
use fleet_protocol::{decode, decode_chunk, encode, DeviceId, TopicKind, Topics, V1};
use rumqttc::mqttbytes::Error as MqttBytesError;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS,
    StateError, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};

use crate::config::AgentConfig;

/// The agent's own version, reported in its status and state.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Chunk replies queued between the event loop and the downloader.
const CHUNK_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot read {what} {path}: {cause}")]
    ReadFile {
        what: &'static str,
        path: String,
        cause: std::io::Error,
    },
    #[error("the MQTT client is closed")]
    Closed,
}

/// Counters of the link, for health reports and `/metrics`.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Inbound messages dropped, by (topic kind, reason). Every consumer of inbound messages
    /// (the link itself, the uplink, the directive controller, the downloader) counts here, so
    /// one place answers "what bad input did this device see".
    dropped: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl LinkStats {
    /// Counts one inbound message dropped on `topic` (a topic kind such as `ack`, or
    /// `foreign`) for `reason` (a stable label such as `too_large`).
    pub fn record_dropped(&self, topic: &'static str, reason: &'static str) {
        let mut dropped = self.dropped.lock().unwrap_or_else(PoisonError::into_inner);
        *dropped.entry((topic, reason)).or_default() += 1;
    }

    /// Dropped messages so far, by (topic kind, reason).
    pub fn dropped(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        self.dropped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The counters as they travel in a health report; drops are keyed `topic/reason`.
    pub fn snapshot(&self) -> fleet_protocol::outbox::LinkStats {
        fleet_protocol::outbox::LinkStats {
            connects: self.connects.load(Ordering::Relaxed),
            disconnects: self.disconnects.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            dropped: self
                .dropped()
                .into_iter()
                .map(|((topic, reason), n)| (format!("{topic}/{reason}"), n))
                .collect(),
        }
    }
}

/// A directive as delivered by the broker, to be acknowledged once acted upon.
#[derive(Clone, Debug)]
pub struct Delivery {
    publish: Publish,
    acked: Arc<AtomicBool>,
}

impl Delivery {
    fn new(publish: Publish) -> Self {
        Delivery {
            publish,
            acked: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn payload(&self) -> &[u8] {
        &self.publish.payload
    }

    /// Sends the PUBACK, once: a second call (or one after the driver acknowledged a superseded
    /// delivery) does nothing, so a packet id is never acknowledged twice.
    fn ack_with(&self, client: &AsyncClient) {
        if self.acked.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = client.try_ack(&self.publish) {
            // The broker will deliver it again; the controller recognises it by its digest.
            tracing::warn!(error = %e, "cannot queue a PUBACK");
        }
    }
}

/// What the link delivers to the rest of the agent.
pub struct Inbound {
    /// The latest directive (retained on the broker, so it also arrives at connect).
    pub directive: watch::Receiver<Option<Delivery>>,
    /// The latest ack payload.
    pub ack: watch::Receiver<Option<Vec<u8>>>,
    /// Chunk reply payloads, in arrival order.
    pub chunks: mpsc::Receiver<Vec<u8>>,
    /// Whether the session is up.
    pub connected: watch::Receiver<bool>,
}

/// Publishes on this device's topics. Cheap to clone.
#[derive(Clone)]
pub struct LinkHandle {
    client: AsyncClient,
    topics: Topics,
    device: DeviceId,
    pub stats: Arc<LinkStats>,
}

impl LinkHandle {
    /// Publishes `payload` on this device's `kind` topic with QoS 1, retained where the wire
    /// contract says so. Waits only for the client's request queue, not for the broker.
    pub async fn publish(&self, kind: TopicKind, payload: Vec<u8>) -> Result<(), LinkError> {
        let len = payload.len() as u64;
        self.client
            .publish(
                self.topics.topic(&self.device, kind),
                QoS::AtLeastOnce,
                kind.is_retained(),
                payload,
            )
            .await
            .map_err(|_| LinkError::Closed)?;
        self.stats.bytes_out.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// Acknowledges a delivered directive to the broker.
    pub fn ack(&self, delivery: &Delivery) {
        delivery.ack_with(&self.client);
    }

    /// Disconnects cleanly (the broker then does not publish the last will; the caller
    /// publishes `offline` first if it wants it retained).
    pub async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn status(state: Presence, at_ms: i64) -> Vec<u8> {
    encode(&Status {
        v: V1,
        state,
        at_ms,
        agent_version: AGENT_VERSION.to_string(),
    })
}

fn read(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, LinkError> {
    std::fs::read(path).map_err(|cause| LinkError::ReadFile {
        what,
        path: path.display().to_string(),
        cause,
    })
}

/// The MQTT options for this agent: identity, limits, last will, TLS.
pub fn mqtt_options(config: &AgentConfig) -> Result<MqttOptions, LinkError> {
    let address = config.broker_address();
    let topics = config.topics();
    let mut options = MqttOptions::new(config.device_id.as_str(), address.host, address.port);
    options
        .set_keep_alive(Duration::from_secs(config.broker.keep_alive_secs))
        .set_clean_session(false)
        .set_max_packet_size(
            config.broker.max_packet_bytes,
            config.broker.max_packet_bytes,
        )
        .set_inflight(32)
        .set_manual_acks(true)
        .set_last_will(LastWill::new(
            topics.topic(&config.device_id, TopicKind::Status),
            status(Presence::Offline, now_ms()),
            QoS::AtLeastOnce,
            true,
        ));
    if address.tls {
        let (Some(ca), Some(cert), Some(key)) =
            (&config.broker.ca, &config.broker.cert, &config.broker.key)
        else {
            unreachable!("validated at load: mqtts needs ca, cert and key");
        };
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: read("CA certificate", ca)?,
            alpn: None,
            client_auth: Some((read("client certificate", cert)?, read("client key", key)?)),
        }));
    }
    Ok(options)
}

/// Installs rustls' `ring` provider as the process default (TLS needs one; `ring` because it
/// cross-compiles cleanly). Harmless when one is already installed.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Starts the link: returns the publishing handle, the inbound channels, and the driver future
/// that must be spawned (it runs until the client is dropped or disconnected).
pub fn start(
    config: &AgentConfig,
) -> Result<(LinkHandle, Inbound, impl std::future::Future<Output = ()>), LinkError> {
    install_crypto_provider();
    let options = mqtt_options(config)?;
    // Room for a full fetch window of requests plus the PUBACKs of the replies in flight.
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    // Chunk requests are small and latency-bound: Nagle's algorithm would hold them back
    // behind the ACK of the previous segment.
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let stats = Arc::new(LinkStats::default());
    let (directive_tx, directive) = watch::channel(None);
    let (ack_tx, ack) = watch::channel(None);
    let (chunk_tx, chunks) = mpsc::channel(CHUNK_QUEUE);
    let (connected_tx, connected) = watch::channel(false);
    let handle = LinkHandle {
        client: client.clone(),
        topics: config.topics(),
        device: config.device_id.clone(),
        stats: stats.clone(),
    };
    let driver = Driver {
        client,
        eventloop,
        topics: config.topics(),
        device: config.device_id.clone(),
        stats,
        directive_tx,
        ack_tx,
        chunk_tx,
        connected_tx,
        backoff: Backoff::new(
            Duration::from_millis(config.broker.reconnect_min_ms),
            Duration::from_millis(config.broker.reconnect_max_ms),
        ),
        poisoned: false,
    };
    let inbound = Inbound {
        directive,
        ack,
        chunks,
        connected,
    };
    Ok((handle, inbound, driver.run()))
}

/// Full-jitter exponential backoff: the n-th retry waits a uniform time in `[0, min(max, base·2ⁿ)]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(fastrand::f64())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

struct Driver {
    client: AsyncClient,
    eventloop: EventLoop,
    topics: Topics,
    device: DeviceId,
    stats: Arc<LinkStats>,
    directive_tx: watch::Sender<Option<Delivery>>,
    ack_tx: watch::Sender<Option<Vec<u8>>>,
    chunk_tx: mpsc::Sender<Vec<u8>>,
    connected_tx: watch::Sender<bool>,
    backoff: Backoff,
    /// The last connection broke on a packet this client could not read.
    poisoned: bool,
}

impl Driver {
    async fn run(mut self) {
        loop {
            match self.eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    tracing::info!(
                        session_present = ack.session_present,
                        "connected to the broker"
                    );
                    self.stats.connects.fetch_add(1, Ordering::Relaxed);
                    if self.eventloop.mqtt_options.clean_session() {
                        // The clean start after a poisoned session is done; from now on the
                        // session is persistent again.
                        self.eventloop.mqtt_options.set_clean_session(false);
                    }
                    // After a poisoned session the backoff keeps growing: should the broker
                    // hand over the unreadable packet again (say it is retained), reconnects
                    // slow down instead of spinning.
                    if !std::mem::take(&mut self.poisoned) {
                        self.backoff.reset();
                    }
                    self.on_connect();
                    self.connected_tx.send_replace(true);
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    self.stats
                        .bytes_in
                        .fetch_add(publish.payload.len() as u64, Ordering::Relaxed);
                    self.route(publish);
                }
                Ok(_) => {}
                Err(ConnectionError::RequestsDone) => {
                    tracing::info!("link closed");
                    self.connected_tx.send_replace(false);
                    return;
                }
                Err(e) => {
                    if self.connected_tx.send_replace(false) {
                        self.stats.disconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    // rumqttc reports socket errors and oversized outgoing packets through
                    // the same variant as packets it cannot read; only the last are bad input.
                    let unreadable = match &e {
                        ConnectionError::MqttState(StateError::Deserialization(cause)) => {
                            match cause {
                                MqttBytesError::Io(_)
                                | MqttBytesError::OutgoingPacketTooLarge { .. } => None,
                                MqttBytesError::PayloadSizeLimitExceeded(_) => {
                                    Some("packet_too_large")
                                }
                                _ => Some("undecodable_packet"),
                            }
                        }
                        _ => None,
                    };
                    if let Some(reason) = unreadable {
                        // The broker sent a packet this client cannot read (above
                        // `max_packet_bytes`, or not MQTT); the client has to drop the whole
                        // connection. Count it like any other bad message.
                        self.stats.record_dropped("link", reason);
                        // The broker keeps an undelivered message in the persistent session
                        // and hands it over again at every reconnect (rumqttd even at QoS 0),
                        // so resuming the session would fail forever. Start clean once: the
                        // broker drops what it queued; the retained directive comes again
                        // with the subscription, the uplink resends, the downloader asks again.
                        self.eventloop.mqtt_options.set_clean_session(true);
                        self.poisoned = true;
                    }
                    let delay = self.backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "broker connection failed");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Subscribes and announces presence. `try_` variants: the request queue is drained by the
    /// very loop that calls this, so awaiting here could deadlock.
    fn on_connect(&self) {
        for kind in [TopicKind::Directive, TopicKind::Ack, TopicKind::Chunk] {
            let topic = self.topics.topic(&self.device, kind);
            if let Err(e) = self.client.try_subscribe(&topic, QoS::AtLeastOnce) {
                tracing::error!(%topic, error = %e, "cannot queue subscription");
            }
        }
        let topic = self.topics.topic(&self.device, TopicKind::Status);
        if let Err(e) = self.client.try_publish(
            topic,
            QoS::AtLeastOnce,
            true,
            status(Presence::Online, now_ms()),
        ) {
            tracing::error!(error = %e, "cannot queue the online status");
        }
    }

    fn route(&self, publish: Publish) {
        let topic = publish.topic.clone();
        let kind = match self.topics.parse(&topic) {
            Ok((device, kind)) if device == self.device => Some(kind),
            _ => None,
        };
        if kind == Some(TopicKind::Directive) {
            // A directive not yet taken by the controller is superseded by this one (the latest
            // wins), so it is acknowledged now.
            if let Some(superseded) = self.directive_tx.send_replace(Some(Delivery::new(publish))) {
                superseded.ack_with(&self.client);
            }
            return;
        }
        if let Err(e) = self.client.try_ack(&publish) {
            tracing::warn!(%topic, error = %e, "cannot queue a PUBACK");
        }
        let payload = publish.payload.to_vec();
        match kind {
            Some(TopicKind::Ack) => {
                // Checked here so that a malformed ack never displaces a good one in the
                // latest-wins channel; the uplink still judges whether its id is believable.
                if let Err(e) = decode::<Ack>(&payload) {
                    self.stats.record_dropped("ack", e.label());
                    tracing::warn!(error = %e, "dropped a malformed ack");
                    return;
                }
                self.ack_tx.send_replace(Some(payload));
            }
            Some(TopicKind::Chunk) => {
                if let Err(e) = decode_chunk(&payload) {
                    self.stats.record_dropped("chunk", "malformed");
                    tracing::warn!(error = %e, "dropped a malformed chunk reply");
                    return;
                }
                if self.chunk_tx.try_send(payload).is_err() {
                    // The downloader is behind (or not running): it asks again after its
                    // timeout if it still wants this chunk.
                    self.stats.record_dropped("chunk", "queue_full");
                }
            }
            Some(other) => {
                // Only this device's inbound topics are subscribed; a broker that delivers
                // anything else is misconfigured.
                self.stats.record_dropped(other.as_str(), "not_inbound");
                tracing::warn!(%topic, "dropped a message on one of this device's outbound topics");
            }
            None => {
                self.stats.record_dropped("foreign", "not_this_device");
                tracing::warn!(%topic, "dropped a message on a topic that is not this device's");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_ceiling_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let ceiling = Duration::from_millis(100 * (1 << i.min(20))).min(Duration::from_secs(2));
            assert!(*d <= ceiling, "attempt {i}: {d:?} > {ceiling:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
