//! Drift window summaries as they travel: raw counts plus the scores the agent computed, so that
//! the server can merge windows exactly (counts add) and still show what the device decided.

use serde::{Deserialize, Serialize};

use crate::ids::ModelName;

/// One closed drift window of one model version on one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftWindow {
    pub model: ModelName,
    pub release: u64,
    /// The window length it was closed at (for example 256 or 2048 samples).
    pub window: u32,
    pub started_at_ms: i64,
    pub ended_at_ms: i64,
    /// Samples seen in the window.
    pub samples: u64,
    /// Per input feature.
    pub features: Vec<FeatureWindow>,
    /// On the model's outputs, when it has a class or score output.
    #[serde(default)]
    pub prediction: Option<PredictionWindow>,
    /// Dataset-level score: the share of drifted features (0..=1).
    pub drifted_share: f64,
    /// Dataset-level score: the largest per-feature score.
    pub max_score: f64,
}

/// One feature's counts and scores in a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureWindow {
    pub index: u32,
    /// Counts over the reference profile's bins (including the two out-of-range bins).
    pub counts: Vec<u64>,
    pub missing: u64,
    pub sum: f64,
    pub sum_sq: f64,
    pub psi: f64,
    /// Effect size, in reference standard deviations.
    pub effect: f64,
    pub drifted: bool,
}

/// Prediction drift: the class histogram and the max-probability histogram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionWindow {
    pub class_counts: Vec<u64>,
    pub max_prob_counts: Vec<u64>,
    pub psi: f64,
    pub drifted: bool,
}

impl DriftWindow {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.ended_at_ms < self.started_at_ms {
            return Err("drift window ends before it starts".into());
        }
        if !(0.0..=1.0).contains(&self.drifted_share) {
            return Err(format!(
                "drifted_share {} is outside 0..=1",
                self.drifted_share
            ));
        }
        Ok(())
    }
}
