//! The uplink: batches of outbox items on the `up` topic, and the server's acks.
//!
//! Every item has an id, unique and increasing per device, assigned by the agent's outbox when
//! it is stored. The server stores items idempotently by (device, id) and acks the highest id
//! it has committed; the agent deletes items only then.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec::{WireMessage, V1};
use crate::drift::DriftWindow;
use crate::envelope::base64_bytes;
use crate::histogram::LatencyHistogram;
use crate::ids::{DeviceId, ModelName, ModelVersion};
use crate::limits;

/// A batch of outbox items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub v: V1,
    pub device: DeviceId,
    /// The id the agent had sent up to before this batch (the previous batch's last id, or
    /// the last acknowledged id after a rewind). The server acks this batch only when it
    /// holds everything up to `after`, so a lost batch is resent rather than skipped over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    pub items: Vec<Item>,
}

impl WireMessage for Batch {
    const KIND: &'static str = "batch";
    const MAX_BYTES: usize = limits::MAX_BATCH_BYTES;

    fn validate(&self) -> Result<(), String> {
        if self.items.len() > limits::MAX_BATCH_ITEMS {
            return Err(format!(
                "{} items; at most {}",
                self.items.len(),
                limits::MAX_BATCH_ITEMS
            ));
        }
        if let (Some(after), Some(first)) = (self.after, self.items.first()) {
            if first.id <= after {
                return Err(format!("first item id {} is not after {after}", first.id));
            }
        }
        if self.items.windows(2).any(|w| w[0].id >= w[1].id) {
            return Err("item ids are not strictly increasing".into());
        }
        for item in &self.items {
            item.body
                .validate()
                .map_err(|e| format!("item {}: {e}", item.id))?;
        }
        Ok(())
    }
}

/// One stored observation or event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: u64,
    /// When the item was recorded, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub body: ItemBody,
}

/// What an item carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ItemBody {
    Telemetry(Telemetry),
    Health(Health),
    Drift(DriftWindow),
    Sample(Sample),
    Event(Event),
    Evictions(Evictions),
}

/// Which items the outbox gives up first when the disk quota is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Sampled inputs: evicted first.
    Sample = 0,
    /// Detailed telemetry and health.
    Telemetry = 1,
    /// Drift windows and eviction counters.
    Summary = 2,
    /// Install, activation and rollback events: never evicted.
    Event = 3,
}

impl ItemBody {
    pub fn priority(&self) -> Priority {
        match self {
            ItemBody::Sample(_) => Priority::Sample,
            ItemBody::Telemetry(_) | ItemBody::Health(_) => Priority::Telemetry,
            ItemBody::Drift(_) | ItemBody::Evictions(_) => Priority::Summary,
            ItemBody::Event(_) => Priority::Event,
        }
    }

    /// The wire name of the item's kind, for example `telemetry`.
    pub fn kind(&self) -> &'static str {
        match self {
            ItemBody::Telemetry(_) => "telemetry",
            ItemBody::Health(_) => "health",
            ItemBody::Drift(_) => "drift",
            ItemBody::Sample(_) => "sample",
            ItemBody::Event(_) => "event",
            ItemBody::Evictions(_) => "evictions",
        }
    }

    fn validate(&self) -> Result<(), String> {
        match self {
            ItemBody::Telemetry(t) => t.latency.validate(),
            ItemBody::Drift(d) => d.validate(),
            ItemBody::Health(h) => h.validate(),
            _ => Ok(()),
        }
    }
}

/// Inference figures for one model version over one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub model: ModelName,
    pub release: u64,
    pub version: ModelVersion,
    pub interval_ms: u64,
    pub inferences: u64,
    /// Errors by kind, for example `bad_shape`, `runtime`.
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    pub latency: LatencyHistogram,
}

/// The device's health at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub cpu_percent: f32,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    pub disk_free_bytes: u64,
    pub disk_total_bytes: u64,
    /// Sensor label → °C, when the device has sensors.
    #[serde(default)]
    pub temperatures_c: BTreeMap<String, f32>,
    pub agent_rss_bytes: u64,
    pub uptime_s: u64,
    #[serde(default)]
    pub link: LinkStats,
}

impl Health {
    /// JSON numbers beyond f32's range (say `1e39`) decode to infinity, which cannot be stored
    /// or sent back: refuse them.
    fn validate(&self) -> Result<(), String> {
        if !self.cpu_percent.is_finite() {
            return Err("cpu_percent is out of range".into());
        }
        if let Some((sensor, _)) = self.temperatures_c.iter().find(|(_, t)| !t.is_finite()) {
            return Err(format!("temperature of {sensor:?} is out of range"));
        }
        Ok(())
    }
}

/// Counters of the MQTT link since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStats {
    pub connects: u64,
    pub disconnects: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Messages dropped because they were malformed, by reason label.
    #[serde(default)]
    pub dropped: BTreeMap<String, u64>,
}

/// Inputs and outputs kept by the sampler, in a compact binary encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub model: ModelName,
    pub release: u64,
    /// Name of the binary encoding of `data`.
    pub format: String,
    #[serde(with = "base64_bytes")]
    pub data: Vec<u8>,
}

/// Something that happened to the device's models.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    #[serde(default)]
    pub model: Option<ModelName>,
    #[serde(default)]
    pub release: Option<u64>,
    /// What happened. (Not `kind`: that is the item's tag.)
    pub event: EventKind,
    /// Human-readable detail: the reason of a failure, the figures of a rollback.
    #[serde(default)]
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    DirectiveAccepted,
    DirectiveRefused,
    InstallStarted,
    InstallFailed,
    Activated,
    RolledBack,
    Retired,
    Recovered,
}

/// Items the outbox had to give up under its disk quota, by kind, since the last report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evictions {
    pub evicted: BTreeMap<String, u64>,
}

/// The server's acknowledgement: every item with an id up to `up_to` is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub v: V1,
    pub up_to: u64,
}

impl WireMessage for Ack {
    const KIND: &'static str = "ack";
    const MAX_BYTES: usize = 256;
}
