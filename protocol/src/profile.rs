//! Reference profiles: what a model's inputs and outputs looked like on its training data, and
//! the calibrated thresholds the drift monitor compares live windows against.
//!
//! `fleetctl profile build` writes one per model version; its SHA-256 is bound into the signed
//! manifest (`profile_sha256`), and it ships beside the model. The statistics that use it are in
//! [`crate::drift`], shared by the agent (online) and the profile builder (calibration).
//!
//! # Bins
//!
//! A numeric distribution is summarised by `edges`: the training minimum, the nine deciles and
//! the maximum, with duplicates removed (discrete features such as pixel intensities have many
//! equal deciles), so `edges` is strictly increasing and has 1 to 11 entries. With `m` edges there
//! are `max(m - 1, 1) + 2` bins:
//!
//! | bin | values |
//! |---|---|
//! | `0` | `x < edges[0]`: below the training minimum (out of range) |
//! | `i` for `1 ≤ i < m - 1` | `edges[i-1] ≤ x < edges[i]` |
//! | `m - 1` (or `1` when `m = 1`) | `edges[m-2] ≤ x ≤ edges[m-1]`: the top bin includes the maximum |
//! | last | `x > edges[m-1]`: above the training maximum (out of range) |
//!
//! NaN is never binned: it counts as missing. `-inf`/`+inf` land in the out-of-range bins.
//! See [`crate::drift::bin_index`].
//!
//! # Proportions
//!
//! Reference proportions are smoothed with half a pseudo-count per bin,
//! `(count + 0.5) / (rows + 0.5 · bins)`, so no bin has probability zero: the out-of-range bins
//! are empty on the training data by construction, yet fresh data from the same distribution
//! falls outside the training range with probability about `2 / (rows + 1)`.

use serde::{Deserialize, Serialize};

use crate::codec::{WireMessage, V1};
use crate::digest::Sha256Digest;
use crate::drift::bin_count;
use crate::limits;
use crate::tensor::TensorSpec;

/// A model version's reference profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceProfile {
    pub v: V1,
    /// SHA-256 of the ONNX artifact the profile was built with.
    pub model_sha256: Sha256Digest,
    /// The model's inputs as the profile builder read them; `fleetctl model sign` refuses a
    /// profile whose inputs differ from the model's.
    pub inputs: Vec<TensorSpec>,
    /// Training rows the reference was computed from.
    pub rows: u64,
    /// Monitored features, in the order `FeatureWindow::index` refers to.
    pub features: Vec<FeatureProfile>,
    /// The model's outputs on the training rows, when it has a class or value output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<PredictionProfile>,
    /// The window lengths the device runs, ascending (for example 256 and 2048); each has an
    /// entry in `thresholds`.
    pub windows: Vec<u32>,
    /// A window is closed after at most this long even if it is not full.
    pub max_window_ms: u64,
    /// Calibrated thresholds per window length, ascending. Besides the monitored lengths they
    /// cover shorter ones, so that a window closed early (by the time limit or an alarm) is
    /// judged by the thresholds of the longest calibrated length it reached.
    pub thresholds: Vec<WindowThresholds>,
    /// The per-feature CUSUM on reference z-scores.
    pub cusum: CusumParams,
    /// How the thresholds were calibrated, for people and for reproduction.
    pub calibration: Calibration,
}

/// Where a feature's value comes from in a model's inputs.
///
/// Inputs of rank ≤ 2 (`[N]`, `[N, F]`) contribute one feature per element of a row. Inputs of
/// rank ≥ 3 (`[N, C, ...]`, channels on axis 1 as ONNX lays images out) contribute, per channel,
/// the mean and the standard deviation of that channel's values in the row: raw pixels are too
/// many and too position-dependent to monitor one by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FeatureSource {
    /// Element `element` of a row (row-major over the non-batch dimensions).
    Element { input: u32, element: u32 },
    /// The mean of channel `channel` in a row.
    ChannelMean { input: u32, channel: u32 },
    /// The (population) standard deviation of channel `channel` in a row.
    ChannelStd { input: u32, channel: u32 },
}

impl FeatureSource {
    pub fn input(&self) -> u32 {
        match *self {
            FeatureSource::Element { input, .. }
            | FeatureSource::ChannelMean { input, .. }
            | FeatureSource::ChannelStd { input, .. } => input,
        }
    }
}

/// One monitored feature on the training data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureProfile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub source: FeatureSource,
    /// Bin edges (see the module documentation).
    pub edges: Vec<f64>,
    /// Smoothed reference proportion of each bin; sums to 1.
    pub proportions: Vec<f64>,
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    pub min: f64,
    pub max: f64,
    /// Share of training rows where the value was NaN.
    pub missing_rate: f64,
}

/// The model's outputs on the training rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PredictionProfile {
    /// A classifier with a probability output `[N, C]`: the predicted class is its argmax
    /// (lowest index on ties), the confidence its maximum.
    Classifier {
        /// The probability output's name.
        output: String,
        /// Smoothed share of each predicted class; `C` entries.
        class_proportions: Vec<f64>,
        /// Bins of the maximum probability (deciles, as for features).
        max_prob_edges: Vec<f64>,
        max_prob_proportions: Vec<f64>,
    },
    /// A single float output (`[N]` or `[N, 1]`): its deciles.
    Regressor {
        output: String,
        edges: Vec<f64>,
        proportions: Vec<f64>,
        mean: f64,
        std: f64,
    },
}

impl PredictionProfile {
    pub fn output(&self) -> &str {
        match self {
            PredictionProfile::Classifier { output, .. }
            | PredictionProfile::Regressor { output, .. } => output,
        }
    }
}

/// Thresholds calibrated for one window length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowThresholds {
    pub window: u32,
    /// Per feature: the PSI above which the feature may be flagged.
    pub psi: Vec<f64>,
    /// A feature is flagged only if its effect size (see [`crate::drift::effect`]) is also
    /// above this floor: with long windows, differences too small to matter become
    /// statistically clear, and the reference itself is only an estimate.
    pub effect_floor: f64,
    /// PSI threshold of the predicted-class histogram (classifiers) or of the output values
    /// (regressors).
    #[serde(default)]
    pub prediction_psi: f64,
    /// PSI threshold of the max-probability histogram (classifiers).
    #[serde(default)]
    pub max_prob_psi: f64,
}

/// Two-sided CUSUM on clipped reference z-scores `z = clamp((x - mean) / σ, -clip, clip)`:
/// `S⁺ = max(0, S⁺ + z - k)`, `S⁻ = max(0, S⁻ - z - k)`, alarm when either passes `h`, then both
/// restart from 0. `σ` is the feature's reference standard deviation (1 for a constant feature).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CusumParams {
    /// Allowance in σ: half the smallest mean shift the CUSUM is tuned to catch.
    pub k: f64,
    /// Decision threshold, calibrated.
    pub h: f64,
    /// z-scores are clipped to ±clip so that one outlier cannot raise an alarm on its own.
    pub clip: f64,
}

/// How the thresholds were obtained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Rows of the held-out data the windows were resampled from.
    pub holdout_rows: u64,
    /// Bootstrap windows per window length.
    pub bootstrap: u32,
    pub seed: u64,
    /// Share of windows without a shift the window test (features and prediction) was allowed
    /// to flag at calibration.
    pub window_alarm_rate: f64,
    /// Share of blocks of the longest monitored window length in which the CUSUM was allowed to
    /// alarm at calibration.
    pub cusum_alarm_rate: f64,
}

impl ReferenceProfile {
    /// The thresholds of the longest calibrated window length not above `samples`, if any.
    pub fn thresholds_for(&self, samples: u64) -> Option<&WindowThresholds> {
        self.thresholds
            .iter()
            .rev()
            .find(|t| u64::from(t.window) <= samples)
    }
}

fn check_bins(what: &str, edges: &[f64], proportions: &[f64]) -> Result<(), String> {
    if edges.is_empty() || edges.len() > MAX_EDGES {
        return Err(format!(
            "{what}: {} edges, expected 1 to {MAX_EDGES}",
            edges.len()
        ));
    }
    if edges.iter().any(|e| !e.is_finite()) {
        return Err(format!("{what}: edges must be finite"));
    }
    if edges.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("{what}: edges must be strictly increasing"));
    }
    if proportions.len() != bin_count(edges) {
        return Err(format!(
            "{what}: {} proportions for {} bins",
            proportions.len(),
            bin_count(edges)
        ));
    }
    check_proportions(what, proportions)
}

fn check_proportions(what: &str, proportions: &[f64]) -> Result<(), String> {
    // Written so that NaN fails too: PSI takes the logarithm of each.
    if !proportions.iter().all(|&p| p > 0.0 && p <= 1.0) {
        return Err(format!("{what}: proportions must be in (0, 1]"));
    }
    let sum: f64 = proportions.iter().sum();
    if (sum - 1.0).abs() > 1e-6 {
        return Err(format!("{what}: proportions sum to {sum}, not 1"));
    }
    Ok(())
}

fn finite_non_negative(x: f64) -> bool {
    x.is_finite() && x >= 0.0
}

/// Most edges per distribution: minimum, nine deciles, maximum.
pub const MAX_EDGES: usize = 11;

impl WireMessage for ReferenceProfile {
    const KIND: &'static str = "profile";
    const MAX_BYTES: usize = limits::MAX_PROFILE_BYTES;

    fn validate(&self) -> Result<(), String> {
        if self.inputs.is_empty() || self.inputs.len() > limits::MAX_TENSORS {
            return Err(format!(
                "{} inputs declared, expected 1 to {}",
                self.inputs.len(),
                limits::MAX_TENSORS
            ));
        }
        for spec in &self.inputs {
            spec.validate()?;
        }
        if self.features.is_empty() || self.features.len() > limits::MAX_PROFILE_FEATURES {
            return Err(format!(
                "{} features, expected 1 to {}",
                self.features.len(),
                limits::MAX_PROFILE_FEATURES
            ));
        }
        for (i, f) in self.features.iter().enumerate() {
            let what = format!("feature {i}");
            if f.source.input() as usize >= self.inputs.len() {
                return Err(format!("{what}: refers to input {}", f.source.input()));
            }
            check_bins(&what, &f.edges, &f.proportions)?;
            if ![f.mean, f.min, f.max].iter().all(|x| x.is_finite())
                || !finite_non_negative(f.std)
                || f.min > f.max
            {
                return Err(format!("{what}: mean, std, min or max out of range"));
            }
            if !(0.0..=1.0).contains(&f.missing_rate) {
                return Err(format!("{what}: missing_rate outside 0..=1"));
            }
        }
        match &self.prediction {
            None => {}
            Some(PredictionProfile::Classifier {
                class_proportions,
                max_prob_edges,
                max_prob_proportions,
                ..
            }) => {
                if class_proportions.len() < 2 || class_proportions.len() > MAX_CLASSES {
                    return Err(format!(
                        "prediction: {} classes, expected 2 to {MAX_CLASSES}",
                        class_proportions.len()
                    ));
                }
                check_proportions("prediction classes", class_proportions)?;
                check_bins(
                    "prediction max-probability",
                    max_prob_edges,
                    max_prob_proportions,
                )?;
            }
            Some(PredictionProfile::Regressor {
                edges,
                proportions,
                mean,
                std,
                ..
            }) => {
                check_bins("prediction values", edges, proportions)?;
                if !mean.is_finite() || !finite_non_negative(*std) {
                    return Err("prediction: mean or std out of range".into());
                }
            }
        }
        if self.thresholds.is_empty()
            || self
                .thresholds
                .windows(2)
                .any(|w| w[0].window >= w[1].window)
            || self.thresholds[0].window == 0
        {
            return Err(
                "thresholds must be given for ascending, distinct, non-zero window lengths".into(),
            );
        }
        for t in &self.thresholds {
            if t.psi.len() != self.features.len() {
                return Err(format!(
                    "window {}: {} PSI thresholds for {} features",
                    t.window,
                    t.psi.len(),
                    self.features.len()
                ));
            }
            if !t.psi.iter().all(|&x| finite_non_negative(x))
                || ![t.effect_floor, t.prediction_psi, t.max_prob_psi]
                    .iter()
                    .all(|&x| finite_non_negative(x))
            {
                return Err(format!(
                    "window {}: thresholds must be finite and not negative",
                    t.window
                ));
            }
        }
        if self.windows.is_empty() || self.windows.windows(2).any(|w| w[0] >= w[1]) {
            return Err("windows must be ascending and distinct".into());
        }
        if let Some(w) = self
            .windows
            .iter()
            .find(|&&w| !self.thresholds.iter().any(|t| t.window == w))
        {
            return Err(format!("window {w} has no calibrated thresholds"));
        }
        if self.max_window_ms == 0 {
            return Err("max_window_ms must be positive".into());
        }
        let CusumParams { k, h, clip } = self.cusum;
        if !(finite_non_negative(k) && h.is_finite() && h > 0.0 && clip.is_finite() && clip > 0.0) {
            return Err("cusum: k must be ≥ 0, h and clip finite and positive".into());
        }
        let c = &self.calibration;
        if !(0.0..=1.0).contains(&c.window_alarm_rate) || !(0.0..=1.0).contains(&c.cusum_alarm_rate)
        {
            return Err("calibration: alarm rates outside 0..=1".into());
        }
        Ok(())
    }
}

/// Most classes a classifier's prediction profile may have.
pub const MAX_CLASSES: usize = 65_536;
