//! What the agent reports about itself: its retained State and its online/offline Status.

use serde::{Deserialize, Serialize};

use crate::codec::{WireMessage, V1};
use crate::digest::Sha256Digest;
use crate::ids::{DeviceId, ModelName, ModelVersion};
use crate::limits;

/// The device's reported state, published retained at every install transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub v: V1,
    pub device: DeviceId,
    /// The agent's own version (semver).
    pub agent_version: String,
    pub at_ms: i64,
    /// Sequence of the last directive accepted, if any.
    #[serde(default)]
    pub directive_seq: Option<u64>,
    #[serde(default)]
    pub models: Vec<ModelState>,
    /// The last directive refused, with the reason, so the server sees refusals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refusal>,
    /// What is wrong with the device now, for example its data disk being full; empty when
    /// nothing is. A condition stays listed until it has passed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A lasting problem of the device that the operator should see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    /// Stable label, for example [`Condition::DISK_FULL`].
    pub code: String,
    /// What the agent saw, for a person.
    pub detail: String,
    /// When the condition began.
    pub since_ms: i64,
}

impl Condition {
    /// The data disk has (almost) no space left: the outbox cannot store what the agent
    /// learns, and a download cannot be staged. The agent goes on serving.
    pub const DISK_FULL: &'static str = "disk_full";
}

/// A model version on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub release: u64,
    pub version: ModelVersion,
    pub sha256: Sha256Digest,
}

/// One model's situation on the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelState {
    pub name: ModelName,
    /// The version serving now.
    #[serde(default)]
    pub active: Option<ModelRef>,
    /// The version that served before the active one (the local rollback target).
    #[serde(default)]
    pub previous: Option<ModelRef>,
    /// The version the last directive asked for.
    #[serde(default)]
    pub target: Option<ModelRef>,
    /// Every version kept on disk.
    #[serde(default)]
    pub installed: Vec<ModelRef>,
    pub phase: InstallPhase,
}

/// Where the install of a model's target version stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum InstallPhase {
    /// Nothing to do: the target is active, or there is no target.
    Idle,
    Downloading {
        received: u64,
        total: u64,
    },
    Verifying,
    Staging,
    SelfTest,
    /// The target became active and is on probation or past it.
    Active,
    Failed {
        reason: String,
    },
    /// The target became active and was rolled back on the device.
    RolledBack {
        reason: String,
    },
}

/// A directive the agent refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The refused directive's sequence, when it could be read.
    #[serde(default)]
    pub seq: Option<u64>,
    /// Stable label, for example `replayed_sequence` (see `TrustError::label`).
    pub code: String,
    pub reason: String,
    pub at_ms: i64,
}

impl WireMessage for State {
    const KIND: &'static str = "state";
    const MAX_BYTES: usize = limits::MAX_CONTROL_MESSAGE_BYTES;
}

/// Online or offline: published retained on connect, and as the last will.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub v: V1,
    pub state: Presence,
    /// When the agent connected (the last will is fixed at connect time).
    pub at_ms: i64,
    pub agent_version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    Online,
    Offline,
}

impl WireMessage for Status {
    const KIND: &'static str = "status";
    const MAX_BYTES: usize = 4096;
}
