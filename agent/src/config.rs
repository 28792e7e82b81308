//! The agent's configuration: a TOML file with documented defaults.
//!
//! Relative paths are resolved against the directory of the config file, so an enrollment
//! bundle (`agent.toml` beside its certificates and keys) works wherever it is unpacked.
//! Every error names the file and the field.
//!
//! ```toml
//! device_id = "dev-17"                 # required: [A-Za-z0-9._-]{1,128}, the certificate's CN
//! data_dir = "/var/lib/driftgate"      # required: models, staging, outbox, state
//!
//! [broker]
//! url = "mqtts://fleet.example:8883"   # required: mqtt:// or mqtts://
//! topic_root = "driftgate"             # default "driftgate"
//! ca = "ca.pem"                        # CA that signed the broker's certificate (mqtts)
//! cert = "device.pem"                  # this device's client certificate (mqtts)
//! key = "device.key"                   # its private key (mqtts)
//! keep_alive_secs = 30                 # default 30
//! max_packet_bytes = 4194304           # default 4 MiB, both directions
//! reconnect_min_ms = 500               # default 500: first retry delay
//! reconnect_max_ms = 30000             # default 30 s: backoff ceiling (full jitter)
//!
//! [trust]
//! release_keys = ["release.pub"]       # required: who may sign manifests
//! fleet_keys = ["fleet.pub"]           # required: who may sign directives
//!
//! [api]
//! listen = "127.0.0.1:8080"            # default loopback only
//! max_concurrent_inferences = 4        # default: 2 × cores
//! max_body_bytes = 8388608             # default 8 MiB
//!
//! [fetch]
//! chunk_bytes = 262144                 # default 256 KiB
//! window = 8                           # default 8 requests in flight, at most
//! max_queue_ms = 2000                  # default 2 s: fewer in flight when the link is slower
//!                                      # than window × chunk_bytes per 2 s (replies asked for
//!                                      # queue ahead of acks and keep-alives)
//! request_timeout_ms = 5000            # default 5 s without any reply: the link has stalled
//! max_retries = 10                     # default 10 retries of one chunk before the install fails
//!
//! [store]
//! keep_versions = 3                    # default 3 per model (never the active or previous one)
//!
//! [check]                              # where a new version first loads and self-tests
//! isolate = true                       # default true: in a child process bounded by the
//!                                      # two settings below, so that a model bomb fails the
//!                                      # install, not the agent; false: in the agent's process
//! max_memory_mib = 1024                # default 1 GiB: address space that load may take
//! timeout_secs = 120                   # default 120 s for loading and the self-test
//!
//! [probation]
//! inferences = 100                     # default: probation ends after 100 inferences…
//! seconds = 60                         # …or 60 s, whichever comes last
//! max_error_rate = 0.05                # default: above this share of failed inferences, roll back
//!
//! [outbox]
//! quota_bytes = 67108864               # default 64 MiB: the outbox database and its log on disk
//! batch_items = 512                    # default 512 items per uplink batch at most
//! batch_bytes = 262144                 # default 256 KiB of item bodies per batch
//! in_flight = 4                        # default 4 batches awaiting the server's ack
//! ack_timeout_ms = 15000               # default 15 s: then resend from the last ack
//!
//! [telemetry]
//! interval_secs = 10                   # default 10 s: inference figures per model version
//!
//! [sampler]                            # keeps some inputs and outputs for the server
//! enabled = true                       # default true; false keeps nothing from any model
//! mode = "rate"                        # default "rate": keep each inference with `rate`…
//! rate = 0.01                          # default 0.01 (1 %)
//! # mode = "reservoir"                 # …or keep `per_window` uniformly chosen per window
//! per_window = 16                      # default 16
//! window_secs = 300                    # default 300 s
//! max_bytes = 65536                    # default 64 KiB: a larger sample is skipped (counted)
//!
//! [sampler.models.digits-mlp]          # per model: any key above except `models`
//! enabled = false                      # for example, never keep this model's inputs (privacy)
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fleet_protocol::limits::{MAX_CHUNK_DATA_BYTES, MAX_MQTT_PACKET_BYTES};
use fleet_protocol::{DeviceId, Topics};
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

/// The whole configuration, with defaults filled in and paths made absolute.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub device_id: DeviceId,
    pub data_dir: PathBuf,
    pub broker: BrokerConfig,
    pub trust: TrustConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub fetch: FetchConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub check: CheckConfig,
    #[serde(default)]
    pub probation: ProbationConfig,
    #[serde(default)]
    pub outbox: OutboxConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub sampler: SamplerConfig,
}

/// How the sampler picks inferences to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleMode {
    /// Each inference independently, with probability `rate`.
    #[default]
    Rate,
    /// `per_window` inferences per window, uniformly among those served (reservoir sampling),
    /// sent when the window closes.
    Reservoir,
}

/// The sampler's settings for every model, with per-model overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default)]
    pub mode: SampleMode,
    #[serde(default = "default_sample_rate")]
    pub rate: f64,
    #[serde(default = "default_per_window")]
    pub per_window: usize,
    #[serde(default = "default_sample_window")]
    pub window_secs: u64,
    #[serde(default = "default_sample_bytes")]
    pub max_bytes: usize,
    /// Overrides by model name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub models: std::collections::BTreeMap<String, SamplerOverride>,
}

/// Per-model sampler settings; an absent key takes the `[sampler]` value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerOverride {
    pub enabled: Option<bool>,
    pub mode: Option<SampleMode>,
    pub rate: Option<f64>,
    pub per_window: Option<usize>,
    pub window_secs: Option<u64>,
    pub max_bytes: Option<usize>,
}

/// The sampler settings of one model, overrides applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplePolicy {
    pub enabled: bool,
    pub mode: SampleMode,
    pub rate: f64,
    pub per_window: usize,
    pub window_secs: u64,
    pub max_bytes: usize,
}

impl SamplerConfig {
    /// The settings that apply to `model`.
    pub fn policy(&self, model: &str) -> SamplePolicy {
        let o = self.models.get(model).cloned().unwrap_or_default();
        SamplePolicy {
            enabled: self.enabled && o.enabled.unwrap_or(true),
            mode: o.mode.unwrap_or(self.mode),
            rate: o.rate.unwrap_or(self.rate),
            per_window: o.per_window.unwrap_or(self.per_window),
            window_secs: o.window_secs.unwrap_or(self.window_secs),
            max_bytes: o.max_bytes.unwrap_or(self.max_bytes),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    #[serde(default = "default_quota")]
    pub quota_bytes: u64,
    #[serde(default = "default_batch_items")]
    pub batch_items: usize,
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
    #[serde(default = "default_in_flight")]
    pub in_flight: usize,
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    #[serde(default = "default_telemetry_interval")]
    pub interval_secs: u64,
}

fn default_quota() -> u64 {
    64 * 1024 * 1024
}
fn default_batch_items() -> usize {
    512
}
fn default_batch_bytes() -> usize {
    256 * 1024
}
fn default_in_flight() -> usize {
    4
}
fn default_ack_timeout() -> u64 {
    15_000
}
fn default_true() -> bool {
    true
}
fn default_sample_rate() -> f64 {
    0.01
}
fn default_per_window() -> usize {
    16
}
fn default_sample_window() -> u64 {
    300
}
fn default_sample_bytes() -> usize {
    64 * 1024
}
fn default_telemetry_interval() -> u64 {
    10
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            quota_bytes: default_quota(),
            batch_items: default_batch_items(),
            batch_bytes: default_batch_bytes(),
            in_flight: default_in_flight(),
            ack_timeout_ms: default_ack_timeout(),
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            interval_secs: default_telemetry_interval(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    pub url: String,
    #[serde(default = "default_topic_root")]
    pub topic_root: String,
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    pub release_keys: Vec<PathBuf>,
    pub fleet_keys: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_concurrency")]
    pub max_concurrent_inferences: usize,
    #[serde(default = "default_body")]
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchConfig {
    #[serde(default = "default_chunk")]
    pub chunk_bytes: u32,
    #[serde(default = "default_window")]
    pub window: usize,
    /// How long the chunks asked for may take to arrive, at the link's measured pace.
    #[serde(default = "default_max_queue")]
    pub max_queue_ms: u64,
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    #[serde(default = "default_retries")]
    pub max_retries: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default = "default_keep")]
    pub keep_versions: usize,
}

/// The first load of a new version, in a child process (see `check`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    /// Load and self-test a new version in a child process first (`edge-agent check-model`).
    #[serde(default = "default_true")]
    pub isolate: bool,
    #[serde(default = "default_check_memory")]
    pub max_memory_mib: u64,
    #[serde(default = "default_check_timeout")]
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbationConfig {
    #[serde(default = "default_probation_inferences")]
    pub inferences: u64,
    #[serde(default = "default_probation_seconds")]
    pub seconds: u64,
    #[serde(default = "default_max_error_rate")]
    pub max_error_rate: f64,
}

fn default_topic_root() -> String {
    fleet_protocol::topics::DEFAULT_ROOT.to_string()
}
fn default_keep_alive() -> u64 {
    30
}
fn default_max_packet() -> usize {
    MAX_MQTT_PACKET_BYTES
}
fn default_reconnect_min() -> u64 {
    500
}
fn default_reconnect_max() -> u64 {
    30_000
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_concurrency() -> usize {
    2 * std::thread::available_parallelism().map_or(1, |n| n.get())
}
fn default_body() -> usize {
    8 * 1024 * 1024
}
fn default_chunk() -> u32 {
    256 * 1024
}
fn default_window() -> usize {
    8
}
fn default_request_timeout() -> u64 {
    5_000
}
fn default_retries() -> u32 {
    10
}
fn default_max_queue() -> u64 {
    2000
}
fn default_keep() -> usize {
    3
}
fn default_check_memory() -> u64 {
    1024
}
fn default_check_timeout() -> u64 {
    120
}
fn default_probation_inferences() -> u64 {
    100
}
fn default_probation_seconds() -> u64 {
    60
}
fn default_max_error_rate() -> f64 {
    0.05
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: default_listen(),
            max_concurrent_inferences: default_concurrency(),
            max_body_bytes: default_body(),
        }
    }
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            enabled: true,
            mode: SampleMode::default(),
            rate: default_sample_rate(),
            per_window: default_per_window(),
            window_secs: default_sample_window(),
            max_bytes: default_sample_bytes(),
            models: Default::default(),
        }
    }
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            chunk_bytes: default_chunk(),
            window: default_window(),
            max_queue_ms: default_max_queue(),
            request_timeout_ms: default_request_timeout(),
            max_retries: default_retries(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            keep_versions: default_keep(),
        }
    }
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            isolate: true,
            max_memory_mib: default_check_memory(),
            timeout_secs: default_check_timeout(),
        }
    }
}

impl Default for ProbationConfig {
    fn default() -> Self {
        ProbationConfig {
            inferences: default_probation_inferences(),
            seconds: default_probation_seconds(),
            max_error_rate: default_max_error_rate(),
        }
    }
}

/// The broker URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl fmt::Display for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// Parses `mqtt://host[:port]` (default 1883) or `mqtts://host[:port]` (default 8883).
pub fn parse_broker_url(url: &str) -> Result<BrokerAddress, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(format!("{url:?} must start with mqtt:// or mqtts://"));
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') || rest.contains('@') {
        return Err(format!(
            "{url:?} must be scheme://host[:port] with no path or user"
        ));
    }
    // `[::1]:1883` for IPv6, `host:1883` otherwise.
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') => {
            let port = port
                .parse::<u16>()
                .map_err(|_| format!("{url:?} has an invalid port {port:?}"))?;
            (host, port)
        }
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok(BrokerAddress {
        host: host.to_string(),
        port,
        tls,
    })
}

impl AgentConfig {
    /// Reads, checks and completes a configuration file.
    pub fn load(file: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|cause| ConfigError::Read {
            file: file.to_path_buf(),
            cause,
        })?;
        let base = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Self::parse(&text, file, base)
    }

    /// Parses configuration text; `file` is for messages, `base` resolves relative paths.
    pub fn parse(text: &str, file: &Path, base: &Path) -> Result<AgentConfig, ConfigError> {
        let mut config: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_path_buf(),
            cause: e.to_string().trim_end().to_string(),
        })?;
        config.resolve_paths(base);
        config.validate(file)?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.data_dir);
        for p in [
            &mut self.broker.ca,
            &mut self.broker.cert,
            &mut self.broker.key,
        ]
        .into_iter()
        .flatten()
        {
            resolve(p);
        }
        self.trust.release_keys.iter_mut().for_each(resolve);
        self.trust.fleet_keys.iter_mut().for_each(resolve);
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            field,
            reason,
        };
        let address = parse_broker_url(&self.broker.url).map_err(|r| invalid("broker.url", r))?;
        Topics::new(self.broker.topic_root.clone())
            .map_err(|e| invalid("broker.topic_root", e.to_string()))?;
        if address.tls {
            for (field, value) in [
                ("broker.ca", &self.broker.ca),
                ("broker.cert", &self.broker.cert),
                ("broker.key", &self.broker.key),
            ] {
                if value.is_none() {
                    return Err(invalid(field, "is required for mqtts://".into()));
                }
            }
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.broker.max_packet_bytes) {
            return Err(invalid(
                "broker.max_packet_bytes",
                "must be between 1 KiB and 64 MiB".into(),
            ));
        }
        let needed =
            self.fetch.chunk_bytes as usize + fleet_protocol::chunk::CHUNK_HEADER_LEN + 512;
        if self.broker.max_packet_bytes < needed {
            return Err(invalid(
                "broker.max_packet_bytes",
                format!("must hold one chunk reply: at least {needed} for fetch.chunk_bytes"),
            ));
        }
        if self.broker.keep_alive_secs < 5 {
            return Err(invalid(
                "broker.keep_alive_secs",
                "must be at least 5".into(),
            ));
        }
        if self.broker.reconnect_min_ms == 0
            || self.broker.reconnect_max_ms < self.broker.reconnect_min_ms
        {
            return Err(invalid(
                "broker.reconnect_max_ms",
                "must be at least reconnect_min_ms, which must be above 0".into(),
            ));
        }
        if self.trust.release_keys.is_empty() {
            return Err(invalid(
                "trust.release_keys",
                "needs at least one key".into(),
            ));
        }
        if self.trust.fleet_keys.is_empty() {
            return Err(invalid("trust.fleet_keys", "needs at least one key".into()));
        }
        if self.api.max_concurrent_inferences == 0 {
            return Err(invalid(
                "api.max_concurrent_inferences",
                "must be at least 1".into(),
            ));
        }
        if self.fetch.chunk_bytes == 0 || self.fetch.chunk_bytes as usize > MAX_CHUNK_DATA_BYTES {
            return Err(invalid(
                "fetch.chunk_bytes",
                format!("must be between 1 and {MAX_CHUNK_DATA_BYTES}"),
            ));
        }
        if !(1..=64).contains(&self.fetch.window) {
            return Err(invalid("fetch.window", "must be between 1 and 64".into()));
        }
        if self.fetch.max_queue_ms < 10 {
            return Err(invalid("fetch.max_queue_ms", "must be at least 10".into()));
        }
        if self.fetch.request_timeout_ms < 100 {
            return Err(invalid(
                "fetch.request_timeout_ms",
                "must be at least 100".into(),
            ));
        }
        if self.store.keep_versions < 2 {
            return Err(invalid(
                "store.keep_versions",
                "must be at least 2 (the active and the previous version)".into(),
            ));
        }
        if self.check.max_memory_mib < 16 {
            return Err(invalid(
                "check.max_memory_mib",
                "must be at least 16 (MiB)".into(),
            ));
        }
        if self.check.timeout_secs == 0 {
            return Err(invalid("check.timeout_secs", "must be at least 1".into()));
        }
        if !(0.0..=1.0).contains(&self.probation.max_error_rate) {
            return Err(invalid(
                "probation.max_error_rate",
                "must be between 0 and 1".into(),
            ));
        }
        if self.outbox.quota_bytes < 256 * 1024 {
            return Err(invalid(
                "outbox.quota_bytes",
                "must be at least 262144 (256 KiB)".into(),
            ));
        }
        let max_batch_bytes = fleet_protocol::limits::MAX_BATCH_BYTES / 2;
        if self.outbox.batch_bytes == 0 || self.outbox.batch_bytes > max_batch_bytes {
            return Err(invalid(
                "outbox.batch_bytes",
                format!("must be between 1 and {max_batch_bytes}"),
            ));
        }
        let max_batch_items = fleet_protocol::limits::MAX_BATCH_ITEMS;
        if self.outbox.batch_items == 0 || self.outbox.batch_items > max_batch_items {
            return Err(invalid(
                "outbox.batch_items",
                format!("must be between 1 and {max_batch_items}"),
            ));
        }
        if self.outbox.in_flight == 0 {
            return Err(invalid("outbox.in_flight", "must be at least 1".into()));
        }
        if self.outbox.ack_timeout_ms < 100 {
            return Err(invalid(
                "outbox.ack_timeout_ms",
                "must be at least 100".into(),
            ));
        }
        if self.telemetry.interval_secs == 0 {
            return Err(invalid(
                "telemetry.interval_secs",
                "must be at least 1".into(),
            ));
        }
        // A sampled item must fit in one uplink batch with room for its base64 and JSON.
        let max_sample = fleet_protocol::limits::MAX_BATCH_BYTES / 2;
        let mut policies = vec![("sampler".to_string(), self.sampler.policy(""))];
        for name in self.sampler.models.keys() {
            if fleet_protocol::ModelName::new(name).is_err() {
                return Err(invalid(
                    "sampler.models",
                    format!("{name:?} is not a model name ([A-Za-z0-9._-]{{1,128}})"),
                ));
            }
            policies.push((format!("sampler.models.{name}"), self.sampler.policy(name)));
        }
        for (at, policy) in policies {
            // The field names the key; the reason names the table it was set in.
            if !(0.0..=1.0).contains(&policy.rate) {
                return Err(invalid(
                    "sampler.rate",
                    format!("in [{at}] must be between 0 and 1"),
                ));
            }
            if policy.per_window == 0 || policy.per_window > 10_000 {
                return Err(invalid(
                    "sampler.per_window",
                    format!("in [{at}] must be between 1 and 10000"),
                ));
            }
            if policy.window_secs == 0 {
                return Err(invalid(
                    "sampler.window_secs",
                    format!("in [{at}] must be at least 1"),
                ));
            }
            if policy.max_bytes < 64 || policy.max_bytes > max_sample {
                return Err(invalid(
                    "sampler.max_bytes",
                    format!("in [{at}] must be between 64 and {max_sample}"),
                ));
            }
        }
        Ok(())
    }

    pub fn broker_address(&self) -> BrokerAddress {
        parse_broker_url(&self.broker.url).expect("validated at load")
    }

    pub fn topics(&self) -> Topics {
        Topics::new(self.broker.topic_root.clone()).expect("validated at load")
    }

    /// The effective configuration as TOML, for `edge-agent check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
device_id = "dev-17"
data_dir = "data"
[broker]
url = "mqtt://127.0.0.1:1883"
[trust]
release_keys = ["release.pub"]
fleet_keys = ["/etc/driftgate/fleet.pub"]
"#;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(text, Path::new("/b/agent.toml"), Path::new("/b"))
    }

    #[test]
    fn defaults_fill_in_and_paths_resolve_against_the_file() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/b/data"));
        assert_eq!(c.trust.release_keys, vec![PathBuf::from("/b/release.pub")]);
        assert_eq!(
            c.trust.fleet_keys,
            vec![PathBuf::from("/etc/driftgate/fleet.pub")]
        );
        assert_eq!(c.api.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.fetch.chunk_bytes, 256 * 1024);
        assert_eq!(c.fetch.window, 8);
        assert_eq!(c.store.keep_versions, 3);
        assert_eq!(c.outbox.quota_bytes, 64 * 1024 * 1024);
        assert_eq!(c.outbox.in_flight, 4);
        assert_eq!(c.telemetry.interval_secs, 10);
        let policy = c.sampler.policy("any");
        assert!(policy.enabled && policy.mode == SampleMode::Rate && policy.rate == 0.01);
        assert_eq!(
            (policy.per_window, policy.window_secs, policy.max_bytes),
            (16, 300, 65536)
        );
        assert_eq!(c.broker.topic_root, "driftgate");
        // The rendered effective config parses back to the same thing.
        let again = parse(&c.to_toml()).unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
    }

    #[test]
    fn sampler_overrides_apply_per_model() {
        let c = parse(&format!(
            "{MINIMAL}\n[sampler]\nrate = 0.5\n[sampler.models.private]\nenabled = false\n\
             [sampler.models.rare]\nmode = \"reservoir\"\nper_window = 3\n"
        ))
        .unwrap();
        assert_eq!(c.sampler.policy("other").rate, 0.5);
        assert!(!c.sampler.policy("private").enabled);
        let rare = c.sampler.policy("rare");
        assert_eq!(
            (rare.mode, rare.per_window, rare.rate),
            (SampleMode::Reservoir, 3, 0.5)
        );
        let again = parse(&c.to_toml()).unwrap();
        assert_eq!(again.sampler, c.sampler);
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let err = parse(&MINIMAL.replace("mqtt://127.0.0.1:1883", "http://x")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("/b/agent.toml") && text.contains("broker.url"),
            "{text}"
        );

        let err = parse(&MINIMAL.replace("dev-17", "dev/17"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("device id") && err.contains("agent.toml"),
            "{err}"
        );

        let err = parse(&MINIMAL.replace("mqtt://", "mqtts://"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker.ca"), "{err}");

        let err = parse(&format!("{MINIMAL}\n[fetch]\nwindow = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("fetch.window"), "{err}");

        for (section, field) in [
            ("[outbox]\nquota_bytes = 1000", "outbox.quota_bytes"),
            ("[outbox]\nbatch_bytes = 900000", "outbox.batch_bytes"),
            ("[outbox]\nbatch_items = 0", "outbox.batch_items"),
            ("[telemetry]\ninterval_secs = 0", "telemetry.interval_secs"),
            ("[sampler]\nrate = 1.5", "sampler.rate"),
            ("[sampler.models.m]\nrate = -1", "sampler.rate"),
            ("[sampler]\nmax_bytes = 2000000", "sampler.max_bytes"),
            ("[sampler.models.m]\nper_window = 0", "sampler.per_window"),
            (
                "[sampler.models.\"no/slash\"]\nenabled = false",
                "sampler.models",
            ),
        ] {
            let err = parse(&format!("{MINIMAL}\n{section}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{err}");
        }

        let err = parse(&format!("{MINIMAL}\n[store]\nkeep = 2\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("keep"), "unknown fields are refused: {err}");
    }

    #[test]
    fn broker_urls() {
        let a = parse_broker_url("mqtts://fleet.example").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.tls),
            ("fleet.example", 8883, true)
        );
        let a = parse_broker_url("mqtt://[::1]:1884").unwrap();
        assert_eq!((a.host.as_str(), a.port, a.tls), ("::1", 1884, false));
        assert!(parse_broker_url("mqtt://host:99999").is_err());
        assert!(parse_broker_url("mqtt://").is_err());
        assert!(parse_broker_url("mqtt://u@host").is_err());
    }
}
