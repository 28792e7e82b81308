//! The fleet's operations, shared by the REST API and the server's start-up: enroll and
//! revoke devices, assign models, and sign and publish the directives that follow.
//!
//! A directive is declarative: it lists every model assigned to the device. Each change of
//! assignment takes the device's next sequence number (persisted first), signs a new directive
//! with the fleet key, stores it, and publishes it retained on the device's `directive` topic.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use fleet_protocol::directive::{Directive, ModelDirective};
use fleet_protocol::{
    encode, DeviceId, Envelope, ModelName, ModelVersion, SigningKey, TopicKind, DIRECTIVE_TYPE, V1,
};
use serde::{Deserialize, Serialize};

use crate::broker::{ConnectGate, EmbeddedBroker};
use crate::bus::Bus;
use crate::ca::DeviceCa;
use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::{now_ms, Assignment, DeviceRecord, Store, StoreError};

/// Why an operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("broker: {0}")]
    Bus(String),
    /// Possible later, not now (no replica leads the fleet at the moment).
    #[error("{0}")]
    Unavailable(String),
    #[error("certificate authority: {0}")]
    Ca(String),
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
}

impl From<StoreError> for FleetError {
    fn from(e: StoreError) -> FleetError {
        match e {
            StoreError::Conflict(m) => FleetError::Conflict(m),
            e @ StoreError::NotLeader(_) => FleetError::Unavailable(e.to_string()),
            other => FleetError::Store(other),
        }
    }
}

/// The devices the embedded broker lets in: enrolled and not revoked, each with the serial of
/// its certificate, so an older certificate of the same id is refused too. Kept in memory
/// because the broker asks at every CONNECT.
#[derive(Debug, Default)]
pub struct AllowedDevices(RwLock<HashMap<String, String>>);

impl AllowedDevices {
    /// From (device id, certificate serial) pairs.
    pub fn new(devices: impl IntoIterator<Item = (String, String)>) -> AllowedDevices {
        AllowedDevices(RwLock::new(devices.into_iter().collect()))
    }
    fn insert(&self, id: &str, serial: &str) {
        if let Ok(mut map) = self.0.write() {
            map.insert(id.to_string(), serial.to_string());
        }
    }
    fn remove(&self, id: &str) {
        if let Ok(mut map) = self.0.write() {
            map.remove(id);
        }
    }
}

impl ConnectGate for AllowedDevices {
    fn allows(&self, device: &DeviceId) -> bool {
        self.0
            .read()
            .map(|map| map.contains_key(device.as_str()))
            .unwrap_or(false)
    }

    fn allows_cert(&self, device: &DeviceId, serial_hex: Option<&str>) -> bool {
        let Ok(map) = self.0.read() else {
            return false;
        };
        match (map.get(device.as_str()), serial_hex) {
            (Some(expected), Some(serial)) => {
                normalize_serial(expected) == normalize_serial(serial)
            }
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

/// Serials compare as numbers: lower case, no leading zeros.
fn normalize_serial(serial: &str) -> String {
    let trimmed = serial.trim_start_matches('0').to_ascii_lowercase();
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed
    }
}

/// One file of an enrollment bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BundleFile {
    pub name: String,
    pub contents: String,
    /// A private key: write it with mode 0600.
    pub secret: bool,
}

/// What `fleetctl device enroll` writes: `agent.toml` and what it names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Bundle {
    pub device: String,
    pub files: Vec<BundleFile>,
}

impl Bundle {
    /// Writes the bundle's files into `dir` (created if needed); private keys with mode 0600.
    /// Refuses to overwrite a file, and a file name that would leave `dir`.
    pub fn write_to(&self, dir: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir)?;
        for file in &self.files {
            if file.name.is_empty() || file.name.contains('/') || file.name.starts_with('.') {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("a bundle file named {:?}", file.name),
                ));
            }
            let path = dir.join(&file.name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(if file.secret { 0o600 } else { 0o644 })
                .open(&path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            f.write_all(file.contents.as_bytes())?;
        }
        Ok(())
    }
}

/// Everything the operations need.
pub struct Fleet {
    pub config: ServerConfig,
    pub store: Store,
    pub registry: Registry,
    pub bus: Bus,
    pub metrics: Arc<Metrics>,
    pub ca: DeviceCa,
    pub allowed: Arc<AllowedDevices>,
    pub broker: Option<Arc<EmbeddedBroker>>,
    /// What enrolled devices connect to.
    pub public_broker_url: String,
    /// The CA devices trust for the broker's certificate.
    pub broker_ca_pem: String,
    pub fleet_key: SigningKey,
    pub fleet_public_pem: String,
    pub release_public_pems: Vec<String>,
    /// Rollouts: one writer at a time, and the engine loop's wake-up.
    pub rollouts: crate::rollout_runner::RolloutControl,
    /// Whether this process may sign directives (always, unless it is one of several
    /// replicas: then only while it holds the leader lease).
    pub leadership: Arc<crate::cluster::Leadership>,
}

impl Fleet {
    /// Creates the device, issues its certificate, and returns its bundle.
    pub async fn enroll(
        &self,
        id: &str,
        labels: BTreeMap<String, String>,
        api_listen: Option<String>,
    ) -> Result<Bundle, FleetError> {
        let device = DeviceId::new(id).map_err(|e| FleetError::Invalid(e.to_string()))?;
        for (key, value) in &labels {
            check_label(key, value)?;
        }
        if let Some(listen) = &api_listen {
            listen
                .parse::<std::net::SocketAddr>()
                .map_err(|e| FleetError::Invalid(format!("api_listen {listen:?}: {e}")))?;
        }
        if self.store.device(id).await?.is_some() {
            return Err(FleetError::Conflict(format!(
                "device {id} is already enrolled (revoke it, or enroll under another id)"
            )));
        }
        let issued = self
            .ca
            .issue_device(&device, self.config.devices.cert_valid_days)
            .map_err(|e| FleetError::Ca(e.to_string()))?;
        let issued_serial = issued.serial_hex.clone();
        self.store
            .insert_device(&DeviceRecord {
                id: id.to_string(),
                labels: labels.clone(),
                cert_serial: issued_serial.clone(),
                cert_not_after_ms: issued.not_after_unix.saturating_mul(1000),
                enrolled_at_ms: now_ms(),
                revoked_at_ms: None,
                directive_seq: 0,
                presence: None,
                presence_at_ms: None,
                agent_version: None,
                state: None,
                state_at_ms: None,
                health: None,
                health_at_ms: None,
                acked_up_to: 0,
            })
            .await?;
        self.allowed.insert(id, &issued_serial);
        tracing::info!(device = id, ?labels, "device enrolled");

        let release_names: Vec<String> = (0..self.release_public_pems.len())
            .map(|i| format!("release-{i}.pub"))
            .collect();
        let mut agent_toml = format!(
            "# Driftgate agent for {id}: run with `edge-agent run --config agent.toml`.\n\
             # Paths are relative to this file. See the agent's config docs for every key.\n\
             device_id = \"{id}\"\n\
             data_dir = \"data\"\n\n\
             [broker]\n\
             url = \"{url}\"\n\
             topic_root = \"{root}\"\n\
             ca = \"ca.pem\"\n\
             cert = \"device.pem\"\n\
             key = \"device.key\"\n\n\
             [trust]\n\
             release_keys = [{releases}]\n\
             fleet_keys = [\"fleet.pub\"]\n",
            url = self.public_broker_url,
            root = self.config.topic_root,
            releases = release_names
                .iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", "),
        );
        if let Some(listen) = api_listen {
            agent_toml.push_str(&format!("\n[api]\nlisten = \"{listen}\"\n"));
        }
        let mut files = vec![
            BundleFile {
                name: "agent.toml".into(),
                contents: agent_toml,
                secret: false,
            },
            BundleFile {
                name: "ca.pem".into(),
                contents: self.broker_ca_pem.clone(),
                secret: false,
            },
            BundleFile {
                name: "device.pem".into(),
                contents: issued.cert_pem,
                secret: false,
            },
            BundleFile {
                name: "device.key".into(),
                contents: issued.key_pem,
                secret: true,
            },
            BundleFile {
                name: "fleet.pub".into(),
                contents: self.fleet_public_pem.clone(),
                secret: false,
            },
        ];
        for (name, pem) in release_names.into_iter().zip(&self.release_public_pems) {
            files.push(BundleFile {
                name,
                contents: pem.clone(),
                secret: false,
            });
        }
        Ok(Bundle {
            device: id.to_string(),
            files,
        })
    }

    /// Revokes the device: refused at its next connect, dropped now, its certificate listed in
    /// the CRL for external brokers.
    pub async fn revoke(&self, id: &str) -> Result<bool, FleetError> {
        let device = DeviceId::new(id).map_err(|e| FleetError::Invalid(e.to_string()))?;
        if self.store.device(id).await?.is_none() {
            return Err(FleetError::NotFound(format!("no device {id}")));
        }
        let newly = self.store.revoke_device(id, now_ms()).await?;
        self.allowed.remove(id);
        if let Some(broker) = &self.broker {
            broker.disconnect(&device).await;
        }
        self.write_crl().await?;
        tracing::info!(device = id, "device revoked");
        Ok(newly)
    }

    /// Writes `{data_dir}/ca/crl.pem` from the revoked certificates, for Mosquitto's `crlfile`
    /// (send it SIGHUP to reload).
    pub async fn write_crl(&self) -> Result<(), FleetError> {
        write_crl_file(&self.ca, &self.store, &self.crl_path()).await
    }

    pub fn crl_path(&self) -> std::path::PathBuf {
        self.config.data_dir.join("ca").join("crl.pem")
    }

    /// Assigns `model@version` to the device and publishes its new directive; returns its
    /// sequence number.
    pub async fn assign(&self, id: &str, model: &str, version: &str) -> Result<u64, FleetError> {
        ModelName::new(model).map_err(|e| FleetError::Invalid(e.to_string()))?;
        ModelVersion::new(version).map_err(|e| FleetError::Invalid(e.to_string()))?;
        let device = self.active_device(id).await?;
        if self.store.model(model, version).await?.is_none() {
            return Err(FleetError::NotFound(format!(
                "no model {model}@{version} in the registry"
            )));
        }
        self.assign_checked(&device, model, version).await
    }

    /// [`Fleet::assign`] for a caller that has checked the names, the device (active) and the
    /// version (in the registry) itself: the rollout runner, which reads every device once
    /// per tick and assigns one version to a whole stage.
    pub(crate) async fn assign_checked(
        &self,
        device: &DeviceRecord,
        model: &str,
        version: &str,
    ) -> Result<u64, FleetError> {
        self.store
            .assign(&Assignment {
                device: device.id.clone(),
                model: model.to_string(),
                version: version.to_string(),
                assigned_at_ms: now_ms(),
            })
            .await?;
        self.publish_directive(device).await
    }

    /// Removes the model from the device (the agent retires it) and publishes the directive.
    pub async fn unassign(&self, id: &str, model: &str) -> Result<u64, FleetError> {
        let device = self.active_device(id).await?;
        if !self.store.unassign(id, model).await? {
            return Err(FleetError::NotFound(format!(
                "{model} is not assigned to {id}"
            )));
        }
        self.publish_directive(&device).await
    }

    async fn active_device(&self, id: &str) -> Result<DeviceRecord, FleetError> {
        DeviceId::new(id).map_err(|e| FleetError::Invalid(e.to_string()))?;
        let device = self
            .store
            .device(id)
            .await?
            .ok_or_else(|| FleetError::NotFound(format!("no device {id}")))?;
        if device.revoked_at_ms.is_some() {
            return Err(FleetError::Conflict(format!("device {id} is revoked")));
        }
        Ok(device)
    }

    /// Signs and publishes the device's directive: every model assigned to it. A model whose
    /// assigned release is below the one the device reports active is marked an explicit
    /// rollback (the operator asked for exactly that version).
    ///
    /// Only the leader signs: a replica that does not lead asks it and waits for the
    /// directive (see `crate::cluster`).
    pub async fn publish_directive(&self, device: &DeviceRecord) -> Result<u64, FleetError> {
        let Some(authority) = self.leadership.authority() else {
            return self.directive_from_leader(device).await;
        };
        let id = DeviceId::new(&device.id).map_err(|e| FleetError::Invalid(e.to_string()))?;
        let active = active_releases(device);
        let mut models = Vec::new();
        for (a, record) in self.store.assignments_with_models(&device.id).await? {
            let record = record.ok_or_else(|| {
                FleetError::NotFound(format!("model {}@{} is gone", a.model, a.version))
            })?;
            let (envelope, manifest) = Registry::manifest_of(&record)?;
            let rollback = active
                .get(&a.model)
                .is_some_and(|&running| manifest.release < running);
            models.push(ModelDirective {
                manifest: envelope,
                rollback,
                rollout: None,
            });
        }
        let seq = self
            .store
            .next_directive_seq(&device.id, authority.fence())
            .await?;
        let issued_at_ms = now_ms();
        let expires_at_ms = issued_at_ms + (self.config.directives.expiry_secs as i64) * 1000;
        let directive = Directive {
            v: V1,
            device: id.clone(),
            seq,
            issued_at_ms,
            expires_at_ms,
            models,
        };
        let envelope = Envelope::sign(DIRECTIVE_TYPE, encode(&directive), &self.fleet_key);
        let bytes = encode(&envelope);
        self.store
            .save_directive(&device.id, seq, &bytes, issued_at_ms, expires_at_ms)
            .await?;
        // A term that ended while signing: the next leader issues this device's directive
        // again (it re-issues what was signed near the end of the previous term), and a
        // directive published now could reach the device after that one.
        if !self.leadership.still_holds(&authority) {
            return Err(FleetError::Unavailable(format!(
                "the leader lease lapsed before directive {seq} of {id} went out; the next leader issues it again"
            )));
        }
        self.bus
            .publish(&id, TopicKind::Directive, bytes)
            .await
            .map_err(|e| FleetError::Bus(e.to_string()))?;
        self.metrics
            .directives_published
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(device = %id, seq, "directive published");
        Ok(seq)
    }

    /// On a replica that does not lead: asks the leader for the device's directive and waits
    /// until it is stored.
    async fn directive_from_leader(&self, device: &DeviceRecord) -> Result<u64, FleetError> {
        let before = self.store.directive_seq(&device.id).await?.unwrap_or(0);
        self.store.request_directive(&device.id, now_ms()).await?;
        let wait = self.config_lease() * 2 + std::time::Duration::from_secs(5);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            if let Some(seq) = self.store.directive_seq(&device.id).await? {
                if seq > before {
                    return Ok(seq);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(FleetError::Unavailable(format!(
                    "no replica leads the fleet: the directive for {} is requested and goes out once one does ({} s waited)",
                    device.id,
                    wait.as_secs()
                )));
            }
        }
    }

    fn config_lease(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.config.cluster.lease_secs)
    }

    /// At the start of a leader's term: the previous leader may have signed directives it
    /// never got out (killed between the two). Those are issued again, with new sequence
    /// numbers, for every device whose directive was signed in the previous term's last
    /// lease period; a device that had it already sees the same models again and does
    /// nothing.
    pub async fn take_over(&self, term: &crate::cluster::Term) -> Result<(), FleetError> {
        let Some(expiry) = term.previous_expiry_ms else {
            return Ok(());
        };
        let since = expiry - self.config_lease().as_millis() as i64 - 5_000;
        let devices = self.store.directives_issued_since(since).await?;
        tracing::info!(
            epoch = term.fence.epoch,
            devices = devices.len(),
            "re-issuing the directives signed at the end of the previous term"
        );
        for id in devices {
            let Some(record) = self.store.device(&id).await? else {
                continue;
            };
            if record.revoked_at_ms.is_none() {
                self.publish_directive(&record).await?;
            }
        }
        Ok(())
    }

    /// The leader answers the other replicas' directive requests.
    pub async fn answer_directive_requests(&self) -> Result<(), FleetError> {
        for (id, requested_at_ms) in self.store.directive_requests().await? {
            match self.store.device(&id).await? {
                Some(record) if record.revoked_at_ms.is_none() => {
                    self.publish_directive(&record).await?;
                }
                _ => {}
            }
            self.store
                .close_directive_request(&id, requested_at_ms)
                .await?;
        }
        Ok(())
    }

    /// Publishes every device's last directive again (retained messages of the embedded
    /// broker live in memory and are gone after a restart). An expired one is re-issued.
    pub async fn republish_directives(&self) -> Result<(), FleetError> {
        let now = now_ms();
        for (device, _seq, envelope, expires_at_ms) in self.store.directives().await? {
            let Some(record) = self.store.device(&device).await? else {
                continue;
            };
            if record.revoked_at_ms.is_some() {
                continue;
            }
            if expires_at_ms <= now + 60_000 {
                self.publish_directive(&record).await?;
                continue;
            }
            let id = DeviceId::new(&device).map_err(|e| FleetError::Invalid(e.to_string()))?;
            self.bus
                .publish(&id, TopicKind::Directive, envelope)
                .await
                .map_err(|e| FleetError::Bus(e.to_string()))?;
        }
        Ok(())
    }
}

/// Writes the CRL of every revoked device certificate to `path` (atomically, durably).
pub async fn write_crl_file(
    ca: &DeviceCa,
    store: &Store,
    path: &std::path::Path,
) -> Result<(), FleetError> {
    // The store keeps milliseconds; a CRL's revocation dates are seconds.
    let revoked: Vec<(String, i64)> = store
        .revoked_certs()
        .await?
        .into_iter()
        .map(|(serial, at_ms)| (serial, at_ms / 1000))
        .collect();
    let crl = ca
        .crl_pem(&revoked, now_ms().max(1) as u64)
        .map_err(|e| FleetError::Ca(e.to_string()))?;
    edge_agent::fsutil::atomic_write(path, crl.as_bytes())
        .map_err(|e| FleetError::Ca(format!("{}: {e}", path.display())))
}

/// Release counters the device reports active, by model name.
fn active_releases(device: &DeviceRecord) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Some(state) = &device.state else {
        return out;
    };
    let Ok(state) = serde_json::from_value::<fleet_protocol::State>(state.clone()) else {
        return out;
    };
    for model in state.models {
        if let Some(active) = model.active {
            out.insert(model.name.as_str().to_string(), active.release);
        }
    }
    out
}

/// Label keys and values: 1 to 64 characters of `[A-Za-z0-9._-]` (values also `:` and `/`),
/// so that a selector such as `site=berlin` parses without quoting.
pub fn check_label(key: &str, value: &str) -> Result<(), FleetError> {
    let ok = |s: &str, extra: &[char]| {
        !s.is_empty()
            && s.len() <= 64
            && s.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || extra.contains(&c)
            })
    };
    if !ok(key, &[]) {
        return Err(FleetError::Invalid(format!(
            "label key {key:?}: 1 to 64 of letters, digits, '.', '_', '-'"
        )));
    }
    if !ok(value, &[':', '/']) {
        return Err(FleetError::Invalid(format!(
            "label value {value:?} of {key}: 1 to 64 of letters, digits, '.', '_', '-', ':', '/'"
        )));
    }
    Ok(())
}
