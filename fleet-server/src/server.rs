//! Wires the server together: data dir and keys, store, broker (embedded or external), the
//! server's MQTT session with its ingest and artifact workers, and the REST API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fleet_protocol::keys::verifying_key_to_pem;
use fleet_protocol::Topics;
use tokio::sync::{mpsc, watch};

use crate::broker::{BrokerTls, EmbeddedBroker, EmbeddedBrokerConfig};
use crate::bus::{self, BusConfig, BusTls, Routes};
use crate::ca::DeviceCa;
use crate::config::ServerConfig;
use crate::fleet::{AllowedDevices, Fleet};
use crate::metrics::Metrics;
use crate::registry::{BlobStore, Registry};
use crate::store::Store;
use crate::{api, artifacts, ingest, keyfile};

/// Ingest workers on PostgreSQL: each owns a share of the devices, so one device's messages
/// stay in order. SQLite takes one writer at a time, and writers waiting on its lock back off
/// by sleeping: one worker there is faster than several.
const INGEST_WORKERS_POSTGRES: usize = 4;

/// How long a stop waits for the server's tasks.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A running server.
pub struct RunningServer {
    pub fleet: Arc<Fleet>,
    pub api_addr: SocketAddr,
    /// Where devices connect, when the broker is embedded.
    pub device_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    broker: Option<Arc<EmbeddedBroker>>,
}

impl RunningServer {
    /// Stops the API, the session and the broker. The tasks stop together, within
    /// `SHUTDOWN_GRACE` in all: the lease is given up at once, and the ingest workers store
    /// what is already queued for them meanwhile (the session takes no more). An outbox batch
    /// still queued after that was not acked, so its device sends it again; a state report
    /// still queued waits for the device's next one.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let stopped = futures_util::future::join_all(self.tasks);
        if tokio::time::timeout(SHUTDOWN_GRACE, stopped).await.is_err() {
            tracing::warn!(
                "some tasks were still busy {} s after the stop; leaving them",
                SHUTDOWN_GRACE.as_secs()
            );
        }
        drop(self.fleet);
        if let Some(broker) = self.broker {
            if let Ok(broker) = Arc::try_unwrap(broker) {
                broker.shutdown().await;
            }
        }
    }
}

/// Creates `dir` (mode 0700) if it does not exist.
fn ensure_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// Loads the fleet key, generating it on first start.
fn fleet_key(keys_dir: &Path) -> Result<(fleet_protocol::SigningKey, bool)> {
    let private = keys_dir.join("fleet.pem");
    let created = if private.exists() {
        false
    } else {
        keyfile::generate(keys_dir, "fleet").context("generating the fleet key")?;
        true
    };
    Ok((keyfile::read_signing_key(&private)?, created))
}

/// Opens the database the configuration names (migrating it).
pub async fn open_store(config: &ServerConfig) -> Result<Store> {
    ensure_dir(&config.data_dir)?;
    let url = config.database_url();
    Store::open(&url)
        .await
        .with_context(|| format!("opening the database {}", redact(&url)))
}

/// The data dir's keys and certificates, made on first start.
pub struct Prepared {
    pub fleet_key: fleet_protocol::SigningKey,
    pub ca: DeviceCa,
    /// The broker's certificate and key (issued by the device CA for `broker.server_names`):
    /// the embedded broker's, or for an external broker to use.
    pub broker_cert: PathBuf,
    pub broker_key: PathBuf,
    /// What this call created, for the start-up message.
    pub created: Vec<(&'static str, PathBuf)>,
}

/// Creates what a first start needs (data dir, fleet key, device CA, broker certificate), or
/// loads it. `fleet-server init` runs only this, so an external broker can be configured
/// with the CA and certificate before the server first runs.
pub fn prepare(config: &ServerConfig) -> Result<Prepared> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let data_dir = &config.data_dir;
    ensure_dir(data_dir)?;
    let mut created = Vec::new();
    let keys_dir = data_dir.join("keys");
    let (fleet_key, created_key) = fleet_key(&keys_dir)?;
    if created_key {
        created.push(("fleet key (signs directives)", keys_dir.join("fleet.pem")));
    }
    let ca_dir = data_dir.join("ca");
    ensure_dir(&ca_dir)?;
    let (ca, created_ca) = DeviceCa::load_or_create(&ca_dir).context("the device CA")?;
    if created_ca {
        created.push(("device CA", ca.cert_path()));
    }
    let broker_dir = data_dir.join("broker");
    ensure_dir(&broker_dir)?;
    let (broker_cert, broker_key) = (broker_dir.join("server.pem"), broker_dir.join("server.key"));
    if !broker_cert.exists() || !broker_key.exists() {
        let issued = ca
            .issue_server(&config.broker.server_names, 825)
            .context("issuing the broker's certificate")?;
        std::fs::write(&broker_cert, issued.cert_pem)?;
        write_secret(&broker_key, issued.key_pem.as_bytes())?;
        created.push(("broker certificate", broker_cert.clone()));
    }
    Ok(Prepared {
        fleet_key,
        ca,
        broker_cert,
        broker_key,
        created,
    })
}

/// Starts everything; returns once the API listens and the broker session is up.
pub async fn start(config: ServerConfig) -> Result<RunningServer> {
    let Prepared {
        fleet_key,
        ca,
        broker_cert,
        broker_key,
        created,
    } = prepare(&config)?;
    for (what, path) in created {
        tracing::info!(path = %path.display(), "created the {what}");
    }
    let data_dir = config.data_dir.clone();
    let store = open_store(&config).await?;
    let mut release_public_pems = Vec::new();
    let release_keys = crate::registry::load_release_keys(&config.trust.release_keys)
        .context("[trust] release_keys")?;
    for path in &config.trust.release_keys {
        release_public_pems
            .push(std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?);
    }
    if release_keys.is_empty() {
        tracing::warn!(
            "no release key is trusted ([trust] release_keys): every push will be refused"
        );
    }
    let topics = Topics::new(config.topic_root.clone()).map_err(anyhow::Error::msg)?;
    let metrics = Arc::new(Metrics::default());
    let allowed = Arc::new(AllowedDevices::new(store.active_devices().await?));

    // The broker, and how the server itself reaches it.
    let mut password = [0u8; 24];
    getrandom::fill(&mut password).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    let (broker, bus_config, public_url, broker_ca_pem) =
        match &config.broker.external {
            None => {
                let (cert, key) = (broker_cert, broker_key);
                let username = config.broker.username.clone();
                let password = hex::encode(password);
                let broker = EmbeddedBroker::start(
                    EmbeddedBrokerConfig {
                        listen: config.broker.listen,
                        internal_listen: config.broker.internal_listen,
                        tls: BrokerTls {
                            cert,
                            key,
                            client_ca: ca.cert_path(),
                        },
                        topics: topics.clone(),
                        max_packet_bytes: config.broker.max_packet_bytes,
                        server_username: username.clone(),
                        server_password: password.clone(),
                    },
                    allowed.clone(),
                )
                .await
                .context("starting the embedded broker")?;
                let internal = broker.internal_addr();
                let public_url = config.broker.public_url.clone().unwrap_or_else(|| {
                    format!("mqtts://localhost:{}", broker.device_addr().port())
                });
                let bus_config = BusConfig {
                    host: internal.ip().to_string(),
                    port: internal.port(),
                    tls: None,
                    username,
                    password,
                    client_id: "driftgate-server".into(),
                    max_packet_bytes: config.broker.max_packet_bytes,
                    topics: topics.clone(),
                    shared_group: None,
                };
                (
                    Some(Arc::new(broker)),
                    bus_config,
                    public_url,
                    ca.cert_pem().to_string(),
                )
            }
            Some(url) => {
                let (tls, host, port) = parse_mqtt_url(url)?;
                let password = match &config.broker.password_file {
                    Some(path) => std::fs::read_to_string(path)
                        .with_context(|| format!("broker.password_file {}", path.display()))?
                        .trim()
                        .to_string(),
                    None => String::new(),
                };
                let ca_pem = match &config.broker.ca {
                    Some(path) => std::fs::read(path)
                        .with_context(|| format!("broker.ca {}", path.display()))?,
                    None => ca.cert_pem().as_bytes().to_vec(),
                };
                let client = match (&config.broker.cert, &config.broker.key) {
                    (Some(cert), Some(key)) => Some((
                        std::fs::read(cert).with_context(|| format!("{}", cert.display()))?,
                        std::fs::read(key).with_context(|| format!("{}", key.display()))?,
                    )),
                    _ => None,
                };
                let public_url = match &config.broker.public_url {
                    Some(u) => u.clone(),
                    None if tls => url.clone(),
                    None => bail!(
                    "broker.external {url} is plain MQTT; devices need mqtts: set broker.public_url"
                ),
                };
                let bus_config = BusConfig {
                    host,
                    port,
                    tls: tls.then(|| BusTls {
                        ca_pem: ca_pem.clone(),
                        client,
                    }),
                    username: config.broker.username.clone(),
                    password,
                    // Each replica its own session (one id would make the broker drop the
                    // other), subscriptions shared among them.
                    client_id: match &config.cluster.replica {
                        Some(replica) => format!("driftgate-server-{replica}"),
                        None => "driftgate-server".into(),
                    },
                    max_packet_bytes: config.broker.max_packet_bytes,
                    topics: topics.clone(),
                    shared_group: config
                        .cluster
                        .replica
                        .as_ref()
                        .map(|_| "driftgate-server".to_string()),
                };
                (
                    None,
                    bus_config,
                    public_url,
                    String::from_utf8_lossy(&ca_pem).into_owned(),
                )
            }
        };

    let (bus, eventloop) = bus::connect(&bus_config).map_err(anyhow::Error::msg)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (connected_tx, mut connected_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut ingest_queues = Vec::new();
    let workers = match store.dialect() {
        crate::store::Dialect::Sqlite => 1,
        crate::store::Dialect::Postgres => INGEST_WORKERS_POSTGRES,
    };
    for _ in 0..workers {
        let (tx, rx) = mpsc::channel(256);
        ingest_queues.push(tx);
        tasks.push(tokio::spawn(ingest::run(
            store.clone(),
            bus.clone(),
            metrics.clone(),
            rx,
        )));
    }
    let (fetch_tx, fetch_rx) = mpsc::channel(1024);
    let blobs = BlobStore::new(data_dir.join("blobs"));
    tasks.push(tokio::spawn(artifacts::run(
        store.clone(),
        blobs.clone(),
        bus.clone(),
        metrics.clone(),
        artifacts::ArtifactLimits {
            max_concurrent: config.artifacts.max_concurrent,
            device_chunks_per_sec: config.artifacts.device_chunks_per_sec,
        },
        fetch_rx,
    )));
    tasks.push(tokio::spawn(bus::run(
        bus.clone(),
        eventloop,
        Routes {
            ingest: ingest_queues,
            fetch: fetch_tx,
        },
        metrics.clone(),
        connected_tx,
        shutdown_rx.clone(),
    )));
    tokio::time::timeout(Duration::from_secs(20), connected_rx.wait_for(|c| *c))
        .await
        .context("the broker did not accept the server's session within 20 s")?
        .context("the broker session ended")?;

    let fleet = Arc::new(Fleet {
        registry: Registry::new(store.clone(), blobs, release_keys),
        store,
        bus,
        metrics,
        ca,
        allowed,
        broker: broker.clone(),
        public_broker_url: public_url,
        broker_ca_pem,
        fleet_public_pem: verifying_key_to_pem(&fleet_key.verifying_key())
            .map_err(|e| anyhow::anyhow!("fleet key: {e}"))?,
        fleet_key,
        release_public_pems,
        config: config.clone(),
        rollouts: Default::default(),
        leadership: match &config.cluster.replica {
            Some(replica) => crate::cluster::Leadership::replica(
                replica,
                Duration::from_secs(config.cluster.lease_secs),
            ),
            None => crate::cluster::Leadership::single(),
        },
    });
    fleet.write_crl().await?;
    if config.cluster.replica.is_none() {
        // The embedded broker keeps retained messages in memory only. An external broker
        // of a scale-out keeps them, and a new leader re-issues what may not have gone out
        // (`Fleet::take_over`): republishing there would hand devices the same sequence twice.
        fleet.republish_directives().await?;
    }
    tasks.push(tokio::spawn(crate::cluster::keep_lease(
        fleet.store.clone(),
        fleet.leadership.clone(),
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(crate::cluster::lead(
        fleet.clone(),
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(crate::rollout_runner::run(
        fleet.clone(),
        Duration::from_millis(config.rollouts.tick_ms),
        shutdown_rx.clone(),
    )));

    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .with_context(|| format!("binding the API to {}", config.api.listen))?;
    let api_addr = listener.local_addr()?;
    let app = api::router(fleet.clone());
    let mut api_shutdown = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = api_shutdown.changed().await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "the API stopped");
        }
    }));
    let device_addr = broker.as_ref().map(|b| b.device_addr());
    // Replicas may share a data dir (keys, CA, blobs): each writes its own endpoints file.
    let endpoints = match &config.cluster.replica {
        Some(replica) => data_dir.join(format!("endpoints-{replica}.json")),
        None => data_dir.join("endpoints.json"),
    };
    write_endpoints(&endpoints, api_addr, device_addr, &fleet.public_broker_url)?;
    Ok(RunningServer {
        fleet,
        api_addr,
        device_addr,
        shutdown: shutdown_tx,
        tasks,
        broker,
    })
}

/// `{data_dir}/endpoints.json`: where this run listens (ports may have been chosen by the
/// OS), for scripts and tests.
fn write_endpoints(
    path: &Path,
    api: SocketAddr,
    devices: Option<SocketAddr>,
    public_url: &str,
) -> Result<()> {
    let body = serde_json::json!({
        "api": format!("http://{api}"),
        "mqtt": devices.map(|a| a.to_string()),
        "public_broker_url": public_url,
        "pid": std::process::id(),
    });
    edge_agent::fsutil::atomic_write(path, &serde_json::to_vec_pretty(&body)?)?;
    Ok(())
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(bytes)?;
    Ok(())
}

/// (tls, host, port) of an `mqtt://` or `mqtts://` URL.
fn parse_mqtt_url(url: &str) -> Result<(bool, String, u16)> {
    let (tls, rest, default_port) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest, 8883)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest, 1883)
    } else {
        bail!("{url:?} is neither mqtt:// nor mqtts://");
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (
            host.to_string(),
            port.parse().with_context(|| format!("port of {url:?}"))?,
        ),
        None => (rest.to_string(), default_port),
    };
    if host.is_empty() {
        bail!("{url:?} has no host");
    }
    Ok((tls, host, port))
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Paths a first start creates, for the start-up message.
pub fn layout(data_dir: &Path) -> Vec<(&'static str, PathBuf)> {
    vec![
        (
            "fleet key (signs directives)",
            data_dir.join("keys/fleet.pem"),
        ),
        ("fleet public key", data_dir.join("keys/fleet.pub")),
        ("device CA", data_dir.join("ca/ca.pem")),
        ("CRL (for external brokers)", data_dir.join("ca/crl.pem")),
        ("model blobs", data_dir.join("blobs")),
        ("endpoints of this run", data_dir.join("endpoints.json")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_passwords_are_hidden() {
        assert_eq!(
            parse_mqtt_url("mqtts://broker.example:9883").unwrap(),
            (true, "broker.example".into(), 9883)
        );
        assert_eq!(
            parse_mqtt_url("mqtt://127.0.0.1").unwrap(),
            (false, "127.0.0.1".into(), 1883)
        );
        assert!(parse_mqtt_url("http://x").is_err());
        assert_eq!(
            redact("postgres://fleet:s3cret@db:5432/fleet"),
            "postgres://fleet:***@db:5432/fleet"
        );
        assert_eq!(redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }
}
