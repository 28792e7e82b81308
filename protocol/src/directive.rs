//! The Directive: what the fleet key tells one device to run.
//!
//! A directive is declarative: it lists every model the device should serve, each as the
//! release-signed manifest envelope. The agent installs what it lacks and retires models the
//! directive no longer names.

use serde::{Deserialize, Serialize};

use crate::codec::{WireMessage, V1};
use crate::envelope::Envelope;
use crate::ids::DeviceId;
use crate::limits;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directive {
    pub v: V1,
    /// The one device this directive is for.
    pub device: DeviceId,
    /// Per-device sequence; the agent accepts only a strictly greater one than it last did.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub issued_at_ms: i64,
    /// Milliseconds since the Unix epoch; after this the directive is refused.
    pub expires_at_ms: i64,
    pub models: Vec<ModelDirective>,
}

/// One model the device should serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDirective {
    /// The manifest, as signed by a release key.
    pub manifest: Envelope,
    /// An explicit rollback: allows a lower release counter than the device runs.
    #[serde(default)]
    pub rollback: bool,
    /// The rollout this assignment belongs to, for reporting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
}

/// Most models one directive may name.
pub const MAX_MODELS_PER_DIRECTIVE: usize = 32;

impl WireMessage for Directive {
    const KIND: &'static str = "directive";
    const MAX_BYTES: usize = limits::MAX_CONTROL_MESSAGE_BYTES;

    fn validate(&self) -> Result<(), String> {
        if self.expires_at_ms <= self.issued_at_ms {
            return Err(format!(
                "expires_at_ms {} is not after issued_at_ms {}",
                self.expires_at_ms, self.issued_at_ms
            ));
        }
        if self.models.len() > MAX_MODELS_PER_DIRECTIVE {
            return Err(format!(
                "{} models named; at most {MAX_MODELS_PER_DIRECTIVE}",
                self.models.len()
            ));
        }
        Ok(())
    }
}
