//! server.toml: the fleet server's configuration, with documented defaults. Every key is
//! optional; `fleet-server run` with no file at all runs the single-machine default (embedded
//! broker, SQLite, everything under `./driftgate-server`). Relative paths are resolved
//! against the directory of the file. Command-line flags override the file.
//!
//! ```toml
//! data_dir = "/var/lib/driftgate-server" # default "driftgate-server": database, blobs, keys, CA
//! topic_root = "driftgate"               # default "driftgate"
//! database = "postgres://fleet@db/fleet" # default: sqlite://{data_dir}/fleet.db
//!
//! [api]
//! listen = "127.0.0.1:8480"              # default: loopback only
//! max_upload_bytes = 1073741824          # default 1 GiB per pushed model
//!
//! [broker]
//! external = "mqtts://broker:8883"       # default: none, run the embedded broker
//! listen = "0.0.0.0:8883"                # embedded: where devices connect (mTLS), default 0.0.0.0:8883
//! internal_listen = "127.0.0.1:0"        # embedded: the server's own client, loopback, any port
//! public_url = "mqtts://fleet.example:8883" # what enrolled devices are told; default mqtts://localhost:{port}
//! server_names = ["fleet.example"]       # embedded: names in the broker's certificate; default localhost, 127.0.0.1
//! max_packet_bytes = 4259840             # default 4 MiB + 64 KiB, both directions
//! username = "driftgate-server"          # external: the server's own login
//! password_file = "broker.pass"          # external: its password, one line
//! ca = "broker-ca.pem"                   # external mqtts: the broker's CA
//! cert = "server.pem"                    # external mqtts: the server's client certificate…
//! key = "server.key"                     # …and key, when the broker wants one
//!
//! [trust]
//! release_keys = ["release.pub"]         # public keys whose manifests the registry accepts
//!
//! [directives]
//! expiry_secs = 604800                   # default 7 days: a directive not applied by then is refused
//!
//! [artifacts]
//! max_concurrent = 16                    # default 16 chunk reads at once, fleet-wide
//! device_chunks_per_sec = 64             # default 64 chunk requests per second per device (burst 2×)
//!
//! [devices]
//! cert_valid_days = 825                  # default 825: device certificates' lifetime
//!
//! [rollouts]
//! tick_ms = 1000                         # default 1 s: how often the engine looks at every active rollout
//!
//! [cluster]                              # several replicas (docs/scale-out.md); needs PostgreSQL and an external broker
//! replica = "fleet-a"                    # default: none, a single server. This replica's name, unique in the fleet
//! lease_secs = 6                         # default 6: the leader's lease; a new leader takes over within about this long
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {cause}")]
    Read {
        file: PathBuf,
        cause: std::io::Error,
    },
    #[error("{file}: {cause}")]
    Parse { file: PathBuf, cause: String },
    #[error("{file}: `{field}` {reason}")]
    Invalid {
        file: PathBuf,
        field: &'static str,
        reason: String,
    },
}

/// The whole configuration, defaults filled in.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default = "default_topic_root")]
    pub topic_root: String,
    #[serde(default)]
    pub database: Option<String>,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub broker: BrokerConfig,
    #[serde(default)]
    pub trust: TrustConfig,
    #[serde(default)]
    pub directives: DirectiveConfig,
    #[serde(default)]
    pub artifacts: ArtifactConfig,
    #[serde(default)]
    pub devices: DeviceConfig,
    #[serde(default)]
    pub rollouts: RolloutConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
}

/// Several replicas of the server against one PostgreSQL and one external broker: each
/// serves the API, ingest and artifacts; the one holding the leader lease runs rollouts and
/// signs directives.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This replica's name; none runs a single server that always leads.
    #[serde(default)]
    pub replica: Option<String>,
    /// How long a leader's lease lasts after its last renewal (renewed every third of it).
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            replica: None,
            lease_secs: default_lease_secs(),
        }
    }
}

fn default_lease_secs() -> u64 {
    6
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    #[serde(default = "default_api_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_max_upload")]
    pub max_upload_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    #[serde(default)]
    pub external: Option<String>,
    #[serde(default = "default_mqtt_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_internal_listen")]
    pub internal_listen: SocketAddr,
    #[serde(default)]
    pub public_url: Option<String>,
    #[serde(default = "default_server_names")]
    pub server_names: Vec<String>,
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    #[serde(default = "default_username")]
    pub username: String,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    #[serde(default)]
    pub release_keys: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectiveConfig {
    #[serde(default = "default_expiry")]
    pub expiry_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactConfig {
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    #[serde(default = "default_device_rate")]
    pub device_chunks_per_sec: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    #[serde(default = "default_cert_days")]
    pub cert_valid_days: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            tick_ms: default_tick_ms(),
        }
    }
}

fn default_tick_ms() -> u64 {
    1000
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("driftgate-server")
}
fn default_topic_root() -> String {
    "driftgate".into()
}
fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8480))
}
fn default_max_upload() -> u64 {
    1 << 30
}
fn default_mqtt_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8883))
}
fn default_internal_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
fn default_server_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}
fn default_max_packet() -> usize {
    fleet_protocol::limits::MAX_MQTT_PACKET_BYTES + 64 * 1024
}
fn default_username() -> String {
    "driftgate-server".into()
}
fn default_expiry() -> u64 {
    7 * 24 * 3600
}
fn default_max_concurrent() -> usize {
    16
}
fn default_device_rate() -> u32 {
    64
}
fn default_cert_days() -> u32 {
    825
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: default_api_listen(),
            max_upload_bytes: default_max_upload(),
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            external: None,
            listen: default_mqtt_listen(),
            internal_listen: default_internal_listen(),
            public_url: None,
            server_names: default_server_names(),
            max_packet_bytes: default_max_packet(),
            username: default_username(),
            password_file: None,
            ca: None,
            cert: None,
            key: None,
        }
    }
}

impl Default for DirectiveConfig {
    fn default() -> Self {
        DirectiveConfig {
            expiry_secs: default_expiry(),
        }
    }
}

impl Default for ArtifactConfig {
    fn default() -> Self {
        ArtifactConfig {
            max_concurrent: default_max_concurrent(),
            device_chunks_per_sec: default_device_rate(),
        }
    }
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            cert_valid_days: default_cert_days(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: default_data_dir(),
            topic_root: default_topic_root(),
            database: None,
            api: ApiConfig::default(),
            broker: BrokerConfig::default(),
            trust: TrustConfig::default(),
            directives: DirectiveConfig::default(),
            artifacts: ArtifactConfig::default(),
            devices: DeviceConfig::default(),
            rollouts: RolloutConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

impl ServerConfig {
    /// Reads and validates `path`; relative paths in it become relative to its directory.
    pub fn load(path: &Path) -> Result<ServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            file: path.to_path_buf(),
            cause,
        })?;
        let mut config: ServerConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            file: path.to_path_buf(),
            cause: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate(path)?;
        Ok(config)
    }

    /// Makes every relative path relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        for key in &mut self.trust.release_keys {
            fix(key);
        }
        for p in [
            &mut self.broker.password_file,
            &mut self.broker.ca,
            &mut self.broker.cert,
            &mut self.broker.key,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
    }

    /// Checks what serde cannot; `file` names the source in errors.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            field,
            reason,
        };
        fleet_protocol::Topics::new(self.topic_root.clone())
            .map_err(|e| invalid("topic_root", e.to_string()))?;
        if let Some(db) = &self.database {
            if !(db.starts_with("sqlite:")
                || db.starts_with("postgres:")
                || db.starts_with("postgresql:"))
            {
                return Err(invalid(
                    "database",
                    format!("{db:?} is neither sqlite:… nor postgres://…"),
                ));
            }
        }
        if let Some(url) = &self.broker.external {
            if !(url.starts_with("mqtt://") || url.starts_with("mqtts://")) {
                return Err(invalid(
                    "broker.external",
                    format!("{url:?} is neither mqtt://… nor mqtts://…"),
                ));
            }
        }
        if let Some(url) = &self.broker.public_url {
            if !url.starts_with("mqtts://") {
                return Err(invalid(
                    "broker.public_url",
                    format!("{url:?}: devices connect with TLS only (mqtts://…)"),
                ));
            }
        }
        if self.broker.max_packet_bytes < fleet_protocol::limits::MAX_MQTT_PACKET_BYTES {
            return Err(invalid(
                "broker.max_packet_bytes",
                format!(
                    "must be at least {} (the agents' packets)",
                    fleet_protocol::limits::MAX_MQTT_PACKET_BYTES
                ),
            ));
        }
        if self.directives.expiry_secs < 60 {
            return Err(invalid(
                "directives.expiry_secs",
                "must be at least 60".into(),
            ));
        }
        if self.artifacts.max_concurrent == 0 {
            return Err(invalid(
                "artifacts.max_concurrent",
                "must be at least 1".into(),
            ));
        }
        if self.artifacts.device_chunks_per_sec == 0 {
            return Err(invalid(
                "artifacts.device_chunks_per_sec",
                "must be at least 1".into(),
            ));
        }
        if !(10..=60_000).contains(&self.rollouts.tick_ms) {
            return Err(invalid(
                "rollouts.tick_ms",
                format!("{} is outside 10..=60000", self.rollouts.tick_ms),
            ));
        }
        if let Some(replica) = &self.cluster.replica {
            let named = !replica.is_empty()
                && replica.len() <= 64
                && replica
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !named {
                return Err(invalid(
                    "cluster.replica",
                    format!("{replica:?}: 1 to 64 of letters, digits, '.', '_', '-'"),
                ));
            }
            let postgres = self
                .database
                .as_deref()
                .is_some_and(|db| db.starts_with("postgres:") || db.starts_with("postgresql:"));
            if !postgres {
                return Err(invalid(
                    "cluster.replica",
                    "replicas share one PostgreSQL database: set `database = \"postgres://…\"`"
                        .into(),
                ));
            }
            if self.broker.external.is_none() {
                return Err(invalid(
                    "cluster.replica",
                    "replicas share one external broker: set `broker.external` (the embedded \
                     broker lives inside one process)"
                        .into(),
                ));
            }
        }
        if !(2..=300).contains(&self.cluster.lease_secs) {
            return Err(invalid(
                "cluster.lease_secs",
                format!("{} is outside 2..=300", self.cluster.lease_secs),
            ));
        }
        if self.devices.cert_valid_days == 0 {
            return Err(invalid(
                "devices.cert_valid_days",
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The database URL: the configured one, or SQLite in the data dir.
    pub fn database_url(&self) -> String {
        self.database
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("fleet.db").display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, "").unwrap();
        let c = ServerConfig::load(&path).unwrap();
        assert_eq!(c.data_dir, dir.path().join("driftgate-server"));
        assert_eq!(c.api.listen, "127.0.0.1:8480".parse().unwrap());
        assert_eq!(c.broker.listen, "0.0.0.0:8883".parse().unwrap());
        assert!(c.broker.external.is_none());
        assert_eq!(c.directives.expiry_secs, 604800);
        assert!(c.database_url().starts_with("sqlite://"));
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, "[broker]\nexternal = \"http://x\"\n").unwrap();
        let e = ServerConfig::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("server.toml") && e.contains("broker.external"),
            "{e}"
        );
        std::fs::write(&path, "[api]\nlisten = 5\n").unwrap();
        let e = ServerConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("server.toml") && e.contains("listen"), "{e}");
        std::fs::write(&path, "[cluster]\nreplica = \"a\"\n").unwrap();
        let e = ServerConfig::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("cluster.replica") && e.contains("PostgreSQL"),
            "{e}"
        );
        std::fs::write(
            &path,
            "database = \"postgres://db/fleet\"\n[cluster]\nreplica = \"a\"\n",
        )
        .unwrap();
        let e = ServerConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("broker.external"), "{e}");
        std::fs::write(&path, "colour = \"blue\"\n").unwrap();
        let e = ServerConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
    }
}
