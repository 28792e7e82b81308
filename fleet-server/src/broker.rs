//! The MQTT broker the fleet server embeds (rmqtt), and the Mosquitto configuration for
//! running an external broker with the same rules instead.
//!
//! Two listeners, one rule set:
//! - the **device listener** speaks MQTT over TLS and requires a client certificate signed by
//!   the device CA. The certificate's CN is the device's identity: the MQTT user name a device
//!   sends is ignored, its client id must equal the CN, and [`ConnectGate`] decides at every
//!   CONNECT whether that device may connect at all (unknown or revoked devices may not). A
//!   device may subscribe only below `{root}/d/{its id}/`, publish only its own uplink topics
//!   (`state`, `status`, `up`, `fetch`), and name only such a topic as its last will.
//! - the **internal listener** is plain TCP on loopback for the server's own privileged client,
//!   which logs in with a user name and password and may do anything.
//!
//! rmqtt is configured through its public hooks (authenticate, subscribe ACL, publish ACL) and
//! an in-memory retained-message store (rmqtt's own default store only logs a warning and
//! keeps nothing; production rmqtt uses a plugin for it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fleet_protocol::{DeviceId, TopicKind, Topics};
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::retain::{DefaultRetainStorage, RetainStorage};
use rmqtt::server::MqttServer;
use rmqtt::types::{
    AuthResult, ClientId, ConnectInfo, Id, LastWill, PublishAclResult, QoS, Retain,
    SubscribeAclResult, TopicFilter, TopicName,
};

/// The smallest packet limit accepted: the agent's 4 MiB plus room for the topic and headers.
pub const MIN_PACKET_BYTES: usize = fleet_protocol::limits::MAX_MQTT_PACKET_BYTES + 64 * 1024;
/// How long an offline device's persistent session (subscriptions, queued QoS 1 messages) is
/// kept. MQTT 3.1.1 has no session expiry of its own; devices may be offline for days, and
/// their directive is retained anyway, so a week bounds memory without losing anything that
/// matters.
pub const SESSION_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);
/// QoS 1 messages queued per offline session (rmqtt's default), the oldest dropped beyond.
pub const MAX_QUEUED_PER_SESSION: usize = 1000;

/// Listener ids inside rmqtt: the hooks tell the two listeners apart by them.
const DEVICE_LISTENER: u16 = 1;
const INTERNAL_LISTENER: u16 = 2;

/// Why the embedded broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("max_packet_bytes {got} is below {MIN_PACKET_BYTES} (the agent's 4 MiB plus 64 KiB) or above 4 GiB")]
    PacketLimit { got: usize },
    #[error("the internal listener {addr} must be on a loopback address: it takes a password in clear text")]
    InternalNotLoopback { addr: SocketAddr },
    #[error("the server's MQTT user name and password must not be empty")]
    EmptyCredentials,
    #[error("cannot start the {listener} listener on {addr}: {cause}")]
    Listen {
        listener: &'static str,
        addr: SocketAddr,
        cause: String,
    },
}

/// TLS files of the device listener, all PEM.
#[derive(Debug, Clone)]
pub struct BrokerTls {
    /// The broker's certificate (chain).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The device CA: client certificates must chain to it.
    pub client_ca: PathBuf,
}

/// Configuration of the embedded broker.
#[derive(Debug, Clone)]
pub struct EmbeddedBrokerConfig {
    /// Devices: MQTT over TLS with mandatory client certificates. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// The server's own privileged client: plain TCP, loopback only, user name and password.
    pub internal_listen: SocketAddr,
    pub tls: BrokerTls,
    pub topics: Topics,
    /// Largest MQTT packet accepted, at least [`MIN_PACKET_BYTES`].
    pub max_packet_bytes: usize,
    pub server_username: String,
    pub server_password: String,
}

/// Asked at every device CONNECT, after TLS has authenticated the certificate: may this
/// device connect? Unknown or revoked → false.
///
/// The broker calls it on a blocking thread, so an implementation may query a database.
pub trait ConnectGate: Send + Sync + 'static {
    fn allows(&self, device: &DeviceId) -> bool;

    /// The same question with the certificate's serial (lower-case hex without leading zeros;
    /// for certificates from [`crate::ca::DeviceCa`] exactly [`crate::ca::IssuedCert::serial_hex`]).
    /// Override it to refuse a revoked certificate of a device that has since been given a
    /// new one; the default asks only about the device.
    fn allows_cert(&self, device: &DeviceId, serial_hex: Option<&str>) -> bool {
        let _ = serial_hex;
        self.allows(device)
    }
}

/// A running embedded broker. Several may run in one process (each has its own rmqtt
/// context); [`EmbeddedBroker::shutdown`] stops one.
pub struct EmbeddedBroker {
    scx: ServerContext,
    device_addr: SocketAddr,
    internal_addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("device_addr", &self.device_addr)
            .field("internal_addr", &self.internal_addr)
            .finish_non_exhaustive()
    }
}

impl EmbeddedBroker {
    /// Binds both listeners, installs the access rules and starts serving in a Tokio task.
    /// Must be called inside a Tokio runtime.
    pub async fn start(
        cfg: EmbeddedBrokerConfig,
        gate: Arc<dyn ConnectGate>,
    ) -> Result<EmbeddedBroker, BrokerError> {
        let max_packet = u32::try_from(cfg.max_packet_bytes)
            .ok()
            .filter(|_| cfg.max_packet_bytes >= MIN_PACKET_BYTES)
            .ok_or(BrokerError::PacketLimit {
                got: cfg.max_packet_bytes,
            })?;
        if !cfg.internal_listen.ip().is_loopback() {
            return Err(BrokerError::InternalNotLoopback {
                addr: cfg.internal_listen,
            });
        }
        if cfg.server_username.is_empty() || cfg.server_password.is_empty() {
            return Err(BrokerError::EmptyCredentials);
        }
        // rmqtt builds its TLS server config with an explicit aws-lc-rs provider; the default
        // provider matters for anything else in the process that builds a rustls config
        // without naming one (rumqttc clients): with both ring and aws-lc compiled in,
        // rustls cannot pick one by itself. ring, as everywhere else in Driftgate.
        let _ = rustls::crypto::ring::default_provider().install_default();

        // No busy check: rmqtt would refuse CONNECTs while the machine's load average is
        // high, which says nothing about the broker (and a build makes it high).
        let scx = ServerContext::new().busy_check_enable(false).build().await;
        *scx.extends.retain_mut().await = Box::new(MemoryRetain(DefaultRetainStorage::new()));

        let rules = Arc::new(Rules {
            topics: cfg.topics.clone(),
            gate,
            username: cfg.server_username.clone(),
            password: cfg.server_password.clone(),
        });
        let register = scx.extends.hook_mgr().register();
        for typ in [
            Type::ClientAuthenticate,
            Type::ClientSubscribeCheckAcl,
            Type::MessagePublishCheckAcl,
        ] {
            register.add(typ, Box::new(RulesHook(rules.clone()))).await;
        }
        register.start().await;

        let listen_err = |listener, addr| {
            move |cause: rmqtt::Error| BrokerError::Listen {
                listener,
                addr,
                cause: format!("{cause:#}"),
            }
        };
        let devices = common_listener(Builder::new(), max_packet)
            .name("devices/tls")
            .laddr(cfg.listen)
            .tls_cross_certificate(true)
            .tls_cert(Some(cfg.tls.cert.display().to_string()))
            .tls_key(Some(cfg.tls.key.display().to_string()))
            .tls_client_ca_certs(Some(cfg.tls.client_ca.display().to_string()))
            // The hooks read the identity from the certificate itself (collect_cert_info);
            // CN as user name only makes logs and session ids show the device.
            .cert_cn_as_username(true)
            .collect_cert_info(true)
            .bind()
            .and_then(|l| l.tls())
            .map_err(listen_err("device", cfg.listen))?;
        let internal = common_listener(Builder::new(), max_packet)
            .name("internal/tcp")
            .laddr(cfg.internal_listen)
            .bind()
            .and_then(|l| l.tcp())
            .map_err(listen_err("internal", cfg.internal_listen))?;
        let device_addr = devices
            .local_addr()
            .map_err(listen_err("device", cfg.listen))?;
        let internal_addr = internal
            .local_addr()
            .map_err(listen_err("internal", cfg.internal_listen))?;

        let server = MqttServer::new(scx.clone())
            .listener_by_id(devices, DEVICE_LISTENER)
            .listener_by_id(internal, INTERNAL_LISTENER)
            .build();
        let server = tokio::spawn(async move {
            if let Err(e) = server.run().await {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        });
        tracing::info!(%device_addr, %internal_addr, "embedded MQTT broker listening");
        Ok(EmbeddedBroker {
            scx,
            device_addr,
            internal_addr,
            server,
        })
    }

    /// The device listener's bound address (the real port when the config said 0).
    pub fn device_addr(&self) -> SocketAddr {
        self.device_addr
    }

    /// The internal listener's bound address.
    pub fn internal_addr(&self) -> SocketAddr {
        self.internal_addr
    }

    /// Drops a device's session now, connected or not: the connection is closed and its
    /// subscriptions and queued messages are discarded (used right after a revoke, so the
    /// device must pass [`ConnectGate`] again).
    pub async fn disconnect(&self, device: &DeviceId) {
        kick(&self.scx, ClientId::from(device.as_str())).await;
    }

    /// Stops accepting connections, closes every session and releases both ports.
    pub async fn shutdown(self) {
        self.server.abort();
        let _ = self.server.await;
        let clients: Vec<ClientId> = {
            let shared = self.scx.extends.shared().await;
            shared
                .iter()
                .map(|entry| entry.id().client_id.clone())
                .collect()
        };
        for client in clients {
            kick(&self.scx, client).await;
        }
        tracing::info!(device_addr = %self.device_addr, "embedded MQTT broker stopped");
    }
}

/// Settings both listeners share.
fn common_listener(builder: Builder, max_packet: u32) -> Builder {
    builder
        // Chunk requests are small and latency-bound: no Nagle.
        .nodelay(true)
        // A restarted server must get its port back while the old connections sit in
        // TIME_WAIT.
        .reuseaddr(Some(true))
        .max_packet_size(max_packet)
        // Every client authenticates: devices by certificate, the server by password.
        .allow_anonymous(false)
        // The wire contract is QoS 0/1; QoS 2 subscriptions are granted as QoS 1.
        .max_qos_allowed(QoS::AtLeastOnce)
        .session_expiry_interval(SESSION_EXPIRY)
        // Zero = never: a retained directive must outlive any offline period, and MQTT 3.1.1
        // has no message expiry (rmqtt's default drops messages after 5 minutes).
        .message_expiry_interval(Duration::ZERO)
        .max_mqueue_len(MAX_QUEUED_PER_SESSION)
        .handshake_timeout(Duration::from_secs(10))
}

/// Closes one session and discards it. A handshake of the same client id in progress holds
/// the session's lock; retry briefly rather than leave a revoked device connected.
async fn kick(scx: &ServerContext, client_id: ClientId) {
    let id = Id::new(
        scx.node.id(),
        DEVICE_LISTENER,
        None,
        None,
        client_id.clone(),
        None,
    );
    for _ in 0..50 {
        let entry = { scx.extends.shared().await.entry(id.clone()) };
        match entry.try_lock().await {
            Ok(mut entry) => {
                match entry.kick(true, true, true).await {
                    Ok(_) => tracing::info!(client = %client_id, "session dropped"),
                    Err(e) => {
                        tracing::warn!(client = %client_id, error = %e, "cannot drop session")
                    }
                }
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    tracing::warn!(client = %client_id, "session stayed locked by a handshake; not dropped");
}

/// The access rules, shared by the hooks.
struct Rules {
    topics: Topics,
    gate: Arc<dyn ConnectGate>,
    username: String,
    password: String,
}

/// What a device is allowed to do, by id: `{root}/d/{id}/`.
fn device_prefix(topics: &Topics, device: &str) -> String {
    format!("{}/d/{}/", topics.root(), device)
}

impl Rules {
    /// A subscription must stay inside the device's subtree: the prefix holds no wildcard, so
    /// whatever wildcards follow it match only this device's topics.
    fn may_subscribe(&self, device: &str, filter: &str) -> bool {
        filter.starts_with(&device_prefix(&self.topics, device))
    }

    /// A device publishes only its own uplink topics. That is tighter than its subtree: it
    /// cannot overwrite its retained directive, and cannot fill the retained store with
    /// topics of its own invention.
    fn may_publish(&self, device: &str, topic: &str) -> bool {
        matches!(
            self.topics.parse(topic),
            Ok((owner, kind)) if owner.as_str() == device && kind.is_uplink()
        )
    }

    async fn authenticate(&self, info: &ConnectInfo) -> AuthResult {
        let id = info.id();
        match id.lid {
            INTERNAL_LISTENER => {
                let user_ok = info.username().is_some_and(|u| {
                    crate::auth::constant_time_eq(u.as_bytes(), self.username.as_bytes())
                });
                let password_ok = info
                    .password()
                    .is_some_and(|p| crate::auth::constant_time_eq(p, self.password.as_bytes()));
                if user_ok && password_ok {
                    // Superuser: rmqtt skips the ACL hooks for this session.
                    AuthResult::Allow(true, None)
                } else {
                    tracing::warn!(remote = ?id.remote_addr, "internal MQTT login refused: bad user name or password");
                    AuthResult::BadUsernameOrPassword
                }
            }
            DEVICE_LISTENER => self.authenticate_device(info).await,
            other => {
                tracing::error!(listener = other, "CONNECT on an unknown listener refused");
                AuthResult::NotAuthorized
            }
        }
    }

    async fn authenticate_device(&self, info: &ConnectInfo) -> AuthResult {
        let id = info.id();
        let refuse = |why: &str| {
            tracing::warn!(remote = ?id.remote_addr, client = %id.client_id, why, "device CONNECT refused");
            AuthResult::NotAuthorized
        };
        // TLS already checked the chain to the device CA; without a certificate the
        // handshake fails before MQTT starts, so a missing one here is a bug, not a client.
        let Some(cert) = info.cert() else {
            return refuse("no client certificate");
        };
        let Some(cn) = cert.common_name.as_deref() else {
            return refuse("client certificate has no CN");
        };
        let device = match DeviceId::new(cn) {
            Ok(device) => device,
            Err(_) => return refuse("certificate CN is not a valid device id"),
        };
        // The client id names the session: another device's id would take over (and kick)
        // that device's session.
        if &*id.client_id != device.as_str() {
            return refuse("client id differs from the certificate CN");
        }
        if let Some(will) = info.last_will() {
            let topic = match will {
                LastWill::V3(w) => &w.topic,
                LastWill::V5(w) => &w.topic,
            };
            // rmqtt publishes a will without the publish ACL, so it is checked here.
            if !self.may_publish(device.as_str(), topic) {
                return refuse("last will outside the device's uplink topics");
            }
        }
        let gate = self.gate.clone();
        let serial = cert.serial.clone();
        let asked = device.clone();
        let allowed =
            tokio::task::spawn_blocking(move || gate.allows_cert(&asked, serial.as_deref()))
                .await
                .unwrap_or(false);
        if !allowed {
            return refuse("device unknown or revoked");
        }
        tracing::debug!(device = %device, "device connected");
        AuthResult::Allow(false, None)
    }
}

struct RulesHook(Arc<Rules>);

#[async_trait]
impl Handler for RulesHook {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        let rules = &self.0;
        match param {
            Parameter::ClientAuthenticate(info) => {
                let result = rules.authenticate(info).await;
                (false, Some(HookResult::AuthResult(result)))
            }
            // Superuser sessions never reach these two (rmqtt allows them first); every
            // session here is a device whose client id equals its certificate's CN.
            Parameter::ClientSubscribeCheckAcl(session, sub) => {
                let device: &str = &session.id.client_id;
                let allowed = session.id.lid == DEVICE_LISTENER
                    && rules.may_subscribe(device, &sub.topic_filter);
                let result = if allowed {
                    SubscribeAclResult::new_success(sub.opts.qos(), None)
                } else {
                    tracing::warn!(device, filter = %sub.topic_filter, "subscription refused");
                    SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized)
                };
                (false, Some(HookResult::SubscribeAclResult(result)))
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let device: &str = &session.id.client_id;
                let allowed =
                    session.id.lid == DEVICE_LISTENER && rules.may_publish(device, &publish.topic);
                let result = if allowed {
                    PublishAclResult::allow()
                } else {
                    // Dropped and acknowledged, not disconnected (as Mosquitto does): a
                    // device stuck publishing somewhere wrong keeps its session for the rest.
                    tracing::warn!(device, topic = %publish.topic, "publish refused");
                    PublishAclResult::rejected(false, None)
                };
                (false, Some(HookResult::PublishAclResult(result)))
            }
            _ => (true, acc),
        }
    }
}

/// Retained messages in memory, with rmqtt's own topic tree. Nothing expires: MQTT 3.1.1 has
/// no message expiry, and a directive stays retained until the server replaces it.
struct MemoryRetain(DefaultRetainStorage);

#[async_trait]
impl RetainStorage for MemoryRetain {
    fn enable(&self) -> bool {
        true
    }

    async fn set(
        &self,
        topic: &TopicName,
        retain: Retain,
        expiry_interval: Option<Duration>,
    ) -> rmqtt::Result<()> {
        // Zero means "never" everywhere else in rmqtt; the store would read it as "now".
        let expiry = expiry_interval.filter(|d| !d.is_zero());
        self.0.set_with_timeout(topic, retain, expiry).await
    }

    async fn get(&self, topic_filter: &TopicFilter) -> rmqtt::Result<Vec<(TopicName, Retain)>> {
        self.0.get_message(topic_filter).await
    }

    async fn count(&self) -> isize {
        self.0.count().await
    }

    async fn max(&self) -> isize {
        self.0.max().await
    }
}

/// Values for the Mosquitto configuration template (`mosquitto/driftgate.conf.template`).
#[derive(Debug, Clone)]
pub struct MosquittoVars {
    /// Address the device listener binds, e.g. `0.0.0.0`.
    pub bind_address: String,
    /// Device listener: MQTT over TLS with client certificates.
    pub port: u16,
    /// The server's listener: plain MQTT on 127.0.0.1, password login.
    pub internal_port: u16,
    /// The device CA certificate.
    pub cafile: PathBuf,
    /// The broker's certificate and key (from [`crate::ca::DeviceCa::issue_server`]).
    pub certfile: PathBuf,
    pub keyfile: PathBuf,
    /// The CRL (from [`crate::ca::DeviceCa::crl_pem`]); Mosquitto reads it at start and on
    /// SIGHUP.
    pub crlfile: PathBuf,
    /// The device ACL, from [`mosquitto_acl`].
    pub aclfile: PathBuf,
    /// The server's password file, lines from [`mosquitto_password_line`].
    pub server_password_file: PathBuf,
    pub topics: Topics,
    pub max_packet_bytes: usize,
    /// Where Mosquitto keeps sessions and retained messages across restarts; `None` keeps
    /// them in memory only.
    pub persistence_dir: Option<PathBuf>,
}

const MOSQUITTO_TEMPLATE: &str = include_str!("../mosquitto/driftgate.conf.template");

/// The Mosquitto configuration: the template with every `{{name}}` replaced.
pub fn render_mosquitto_config(vars: &MosquittoVars) -> String {
    let (persistence, persistence_location) = match &vars.persistence_dir {
        Some(dir) => ("true", format!("persistence_location {}/", dir.display())),
        None => ("false", "# persistence_location: none".to_string()),
    };
    let values: [(&str, String); 13] = [
        ("bind_address", vars.bind_address.clone()),
        ("port", vars.port.to_string()),
        ("internal_port", vars.internal_port.to_string()),
        ("cafile", vars.cafile.display().to_string()),
        ("certfile", vars.certfile.display().to_string()),
        ("keyfile", vars.keyfile.display().to_string()),
        ("crlfile", vars.crlfile.display().to_string()),
        ("aclfile", vars.aclfile.display().to_string()),
        (
            "server_password_file",
            vars.server_password_file.display().to_string(),
        ),
        ("topic_root", vars.topics.root().to_string()),
        ("max_packet_bytes", vars.max_packet_bytes.to_string()),
        ("persistence", persistence.to_string()),
        ("persistence_location", persistence_location),
    ];
    let mut out = MOSQUITTO_TEMPLATE.to_string();
    for (name, value) in values {
        out = out.replace(&format!("{{{{{name}}}}}"), &value);
    }
    out
}

/// The device listener's ACL file: with `use_identity_as_username`, `%u` is the certificate's
/// CN. The same rules as the embedded broker: read the own subtree, write the own uplink
/// topics.
pub fn mosquitto_acl(topics: &Topics) -> String {
    let root = topics.root();
    let mut acl = format!(
        "# Driftgate device ACL: %u is the device id (the client certificate's CN).\n\
         pattern read {root}/d/%u/#\n"
    );
    for kind in TopicKind::ALL.into_iter().filter(|k| k.is_uplink()) {
        acl.push_str(&format!("pattern write {root}/d/%u/{kind}\n"));
    }
    acl
}

/// One line of a Mosquitto password file, `user:$6$salt$hash` (salted SHA-512, a format
/// Mosquitto 1.5 to 2.x reads). Fails only without OS randomness.
pub fn mosquitto_password_line(username: &str, password: &str) -> Result<String, getrandom::Error> {
    use base64::Engine;
    use sha2::{Digest, Sha512};
    let mut salt = [0u8; 12];
    getrandom::fill(&mut salt)?;
    let hash = Sha512::new()
        .chain_update(password.as_bytes())
        .chain_update(salt)
        .finalize();
    let b64 = base64::engine::general_purpose::STANDARD;
    Ok(format!(
        "{username}:$6${}${}",
        b64.encode(salt),
        b64.encode(hash)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        struct Yes;
        impl ConnectGate for Yes {
            fn allows(&self, _: &DeviceId) -> bool {
                true
            }
        }
        Rules {
            topics: Topics::default(),
            gate: Arc::new(Yes),
            username: "server".into(),
            password: "pw".into(),
        }
    }

    #[test]
    fn devices_stay_in_their_subtree() {
        let r = rules();
        assert!(r.may_subscribe("a", "driftgate/d/a/directive"));
        assert!(r.may_subscribe("a", "driftgate/d/a/#"));
        assert!(r.may_subscribe("a", "driftgate/d/a/+"));
        for filter in [
            "#",
            "+/d/a/directive",
            "driftgate/d/+/directive",
            "driftgate/d/#",
            "driftgate/d/b/directive",
            "driftgate/d/ab/directive",
            "driftgate/d/a",
            "$SYS/#",
        ] {
            assert!(!r.may_subscribe("a", filter), "{filter}");
        }
        assert!(r.may_publish("a", "driftgate/d/a/up"));
        assert!(r.may_publish("a", "driftgate/d/a/status"));
        for topic in [
            "driftgate/d/a/directive",
            "driftgate/d/a/chunk",
            "driftgate/d/b/up",
            "driftgate/d/a/up/more",
            "driftgate/d/a/other",
            "other/d/a/up",
        ] {
            assert!(!r.may_publish("a", topic), "{topic}");
        }
    }

    #[test]
    fn the_template_has_no_placeholder_left() {
        let vars = MosquittoVars {
            bind_address: "0.0.0.0".into(),
            port: 8883,
            internal_port: 1883,
            cafile: "/etc/driftgate/ca.pem".into(),
            certfile: "/etc/driftgate/broker.pem".into(),
            keyfile: "/etc/driftgate/broker.key".into(),
            crlfile: "/etc/driftgate/crl.pem".into(),
            aclfile: "/etc/driftgate/acl".into(),
            server_password_file: "/etc/driftgate/passwd".into(),
            topics: Topics::default(),
            max_packet_bytes: MIN_PACKET_BYTES,
            persistence_dir: None,
        };
        let conf = render_mosquitto_config(&vars);
        assert!(!conf.contains("{{"), "{conf}");
        assert!(conf.contains("require_certificate true"));
        assert!(conf.contains("listener 1883 127.0.0.1"));
        assert!(mosquitto_acl(&vars.topics).contains("pattern write driftgate/d/%u/up\n"));
        let line = mosquitto_password_line("server", "pw").unwrap();
        assert!(line.starts_with("server:$6$"));
        assert!(crate::auth::constant_time_eq(b"abc", b"abc"));
        assert!(!crate::auth::constant_time_eq(b"abc", b"abd"));
        assert!(!crate::auth::constant_time_eq(b"abc", b"ab"));
    }
}
