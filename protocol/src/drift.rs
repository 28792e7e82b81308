//! Drift: window summaries as they travel, and the statistics that produce and judge them.
//!
//! Summaries carry raw counts plus the scores the agent computed, so that the server can merge
//! windows exactly (counts add) and recompute the same scores with [`score`]. The statistics
//! live here, in one place, because the agent (online, `edge_agent::drift`) and the profile
//! builder (calibration, `fleet_server::profile`) must never disagree on them:
//!
//! - [`bin_index`] puts a value into a reference profile's bins (see [`crate::profile`]);
//! - [`WindowAccumulator`] collects one window: per feature the bin counts, missing count, sum
//!   and sum of squares; per prediction the class and max-probability (or value) counts;
//! - [`psi`] and [`effect`] compare a window with the reference, [`score`] decides what drifted;
//! - [`CusumBank`] runs the per-feature two-sided CUSUM that catches a mean shift within tens
//!   of samples instead of waiting for a window to fill.
//!
//! A window's mean and variance come from its sum and sum of squares in f64 rather than from a
//! Welford update: the sums add across windows (Welford's M2 does not), so device and server
//! compute the same moments, and for f32 inputs over windows of thousands of samples the
//! cancellation error is far below anything that matters here (relative 1e-16 · mean²/var).

use serde::{Deserialize, Serialize};

use crate::ids::ModelName;
use crate::profile::{PredictionProfile, ReferenceProfile};

/// One closed drift window of one model version on one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftWindow {
    pub model: ModelName,
    pub release: u64,
    /// The window length it was closed at (for example 256 or 2048 samples).
    pub window: u32,
    pub started_at_ms: i64,
    pub ended_at_ms: i64,
    /// Samples seen in the window (fewer than `window` when it was closed early by the time
    /// limit or an alarm; for the longer windows, which are made of whole shorter ones, up to
    /// one short window more).
    pub samples: u64,
    /// Per input feature.
    pub features: Vec<FeatureWindow>,
    /// On the model's outputs, when it has a class or score output.
    #[serde(default)]
    pub prediction: Option<PredictionWindow>,
    /// Dataset-level score: the share of drifted features (0..=1).
    pub drifted_share: f64,
    /// Dataset-level score: the largest per-feature score, `psi / threshold` (above 1: past
    /// its threshold); 0 when the window is too short to be judged.
    pub max_score: f64,
    /// The window's verdict: a feature drifted, the prediction drifted, or a CUSUM alarmed.
    #[serde(default)]
    pub drifted: bool,
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
    /// Effect size, in reference standard deviations (see [`effect`]).
    pub effect: f64,
    pub drifted: bool,
    /// CUSUM alarms raised on this feature during the window.
    #[serde(default)]
    pub cusum_alarms: u64,
}

/// Prediction drift: the class histogram and the max-probability histogram (classifiers), or
/// the output-value histogram (regressors).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionWindow {
    pub class_counts: Vec<u64>,
    pub max_prob_counts: Vec<u64>,
    /// PSI of the class histogram (classifiers) or of the value histogram (regressors).
    pub psi: f64,
    pub drifted: bool,
    /// PSI of the max-probability histogram (classifiers).
    #[serde(default)]
    pub max_prob_psi: f64,
    /// Counts over the output-value bins (regressors).
    #[serde(default)]
    pub value_counts: Vec<u64>,
}

impl DriftWindow {
    /// Adds another window of the same model release and profile into this one: counts,
    /// sums and alarms add, so merging is exact and in any order. Scores are left as they
    /// were; call [`score`] on the result. Refused when the shapes differ.
    pub fn merge(&mut self, other: &DriftWindow) -> Result<(), ScoreError> {
        fn add<T: Copy + std::ops::AddAssign>(
            what: &str,
            into: &mut [T],
            from: &[T],
        ) -> Result<(), ScoreError> {
            if into.len() != from.len() {
                return Err(ScoreError(format!(
                    "{what}: {} values against {}",
                    into.len(),
                    from.len()
                )));
            }
            for (a, &b) in into.iter_mut().zip(from) {
                *a += b;
            }
            Ok(())
        }
        if self.model != other.model || self.release != other.release {
            return Err(ScoreError(format!(
                "{}@{} cannot merge with {}@{}",
                self.model, self.release, other.model, other.release
            )));
        }
        if self.features.len() != other.features.len() {
            return Err(ScoreError(format!(
                "{} features against {}",
                self.features.len(),
                other.features.len()
            )));
        }
        // Check every shape before changing anything, so a refused merge leaves self as it was.
        for (a, b) in self.features.iter().zip(&other.features) {
            if a.counts.len() != b.counts.len() {
                return Err(ScoreError(format!("feature {}: bins differ", a.index)));
            }
        }
        match (&self.prediction, &other.prediction) {
            (Some(a), Some(b))
                if a.class_counts.len() != b.class_counts.len()
                    || a.max_prob_counts.len() != b.max_prob_counts.len()
                    || a.value_counts.len() != b.value_counts.len() =>
            {
                return Err(ScoreError("prediction bins differ".into()));
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(ScoreError(
                    "one window has a prediction, the other not".into(),
                ));
            }
            _ => {}
        }
        for (a, b) in self.features.iter_mut().zip(&other.features) {
            add("feature counts", &mut a.counts, &b.counts)?;
            a.missing += b.missing;
            a.sum += b.sum;
            a.sum_sq += b.sum_sq;
            a.cusum_alarms += b.cusum_alarms;
        }
        if let (Some(a), Some(b)) = (&mut self.prediction, &other.prediction) {
            add("class counts", &mut a.class_counts, &b.class_counts)?;
            add(
                "max-probability counts",
                &mut a.max_prob_counts,
                &b.max_prob_counts,
            )?;
            add("value counts", &mut a.value_counts, &b.value_counts)?;
        }
        self.samples += other.samples;
        self.started_at_ms = self.started_at_ms.min(other.started_at_ms);
        self.ended_at_ms = self.ended_at_ms.max(other.ended_at_ms);
        self.drifted |= other.drifted;
        Ok(())
    }

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

/// Pseudo-count added to every bin of a window before PSI takes logarithms.
///
/// Half a count (Jeffreys' prior) keeps an empty window bin finite without visibly moving a
/// full one; the reference side is smoothed the same way when the profile is built.
pub const PSI_PSEUDO_COUNT: f64 = 0.5;

/// Number of bins for `edges`: the interior bins plus the two out-of-range bins.
pub fn bin_count(edges: &[f64]) -> usize {
    edges.len().saturating_sub(1).max(1) + 2
}

/// The bin of `x` (not NaN: callers count NaN as missing) under `edges`, as documented in
/// [`crate::profile`].
#[inline]
pub fn bin_index(edges: &[f64], x: f64) -> usize {
    let (Some(&first), Some(&last)) = (edges.first(), edges.last()) else {
        return 0;
    };
    let inner = edges.len().saturating_sub(1).max(1);
    if x < first {
        0
    } else if x > last {
        inner + 1
    } else {
        // At least 1 because `x >= edges[0]`; the maximum itself belongs to the top bin.
        edges.partition_point(|&e| e <= x).min(inner)
    }
}

/// Smoothed proportions of `counts`: `(c + 0.5) / (n + 0.5 · bins)`.
pub fn smoothed_proportions(counts: &[u64]) -> Vec<f64> {
    let n: u64 = counts.iter().sum();
    let denominator = n as f64 + PSI_PSEUDO_COUNT * counts.len() as f64;
    counts
        .iter()
        .map(|&c| (c as f64 + PSI_PSEUDO_COUNT) / denominator)
        .collect()
}

/// Population stability index of window `counts` against `reference` proportions:
/// `Σ (a - e) · ln(a / e)` with `a` the window's smoothed proportions (see
/// [`PSI_PSEUDO_COUNT`]). 0 for an empty window or mismatched lengths' common prefix only
/// (callers check lengths; [`score`] does).
pub fn psi(counts: &[u64], reference: &[f64]) -> f64 {
    let n: u64 = counts.iter().sum();
    if n == 0 {
        return 0.0;
    }
    let denominator = n as f64 + PSI_PSEUDO_COUNT * counts.len() as f64;
    counts
        .iter()
        .zip(reference)
        .map(|(&c, &e)| {
            let a = (c as f64 + PSI_PSEUDO_COUNT) / denominator;
            (a - e) * (a / e).ln()
        })
        .sum()
}

/// The scale z-scores and effect sizes are measured in: the reference standard deviation, or
/// 1 (the feature's own unit) for a feature that was constant in training.
#[inline]
pub fn sigma_scale(std: f64) -> f64 {
    if std > 0.0 {
        std
    } else {
        1.0
    }
}

/// Mean and population standard deviation from a count, sum and sum of squares.
pub fn moments(count: u64, sum: f64, sum_sq: f64) -> Option<(f64, f64)> {
    if count == 0 {
        return None;
    }
    let n = count as f64;
    let mean = sum / n;
    let var = (sum_sq / n - mean * mean).max(0.0);
    Some((mean, var.sqrt()))
}

/// Effect size of a window against the reference, in reference σ: the 2-Wasserstein distance
/// between Gaussians with the window's and the reference's mean and standard deviation,
/// `sqrt((μw - μr)² + (σw - σr)²) / σr`. A pure mean shift of d σ scores d; a change of spread
/// scores the change of σ. It needs only the mergeable sums, so the server gets the same value
/// from merged windows. 0 for a window without values.
pub fn effect(count: u64, sum: f64, sum_sq: f64, ref_mean: f64, ref_std: f64) -> f64 {
    let Some((mean, std)) = moments(count, sum, sum_sq) else {
        return 0.0;
    };
    let scale = sigma_scale(ref_std);
    let dm = (mean - ref_mean) / scale;
    let ds = (std - ref_std) / scale;
    (dm * dm + ds * ds).sqrt()
}

/// A model's prediction for one row, as the drift monitor sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Prediction {
    Class { class: usize, max_prob: f64 },
    Value(f64),
}

/// Raw counts of one window, laid out flat so that the per-sample update touches a few
/// contiguous cache lines. Build it from a profile, feed it values, turn it into a
/// [`DriftWindow`] with [`WindowAccumulator::window`].
#[derive(Debug, Clone)]
pub struct WindowAccumulator {
    /// All features' edges, back to back; `edge_offsets[f]..edge_offsets[f + 1]`.
    edges: Vec<f64>,
    edge_offsets: Vec<usize>,
    /// All features' bin counts, back to back; `count_offsets[f]..count_offsets[f + 1]`.
    counts: Vec<u64>,
    count_offsets: Vec<usize>,
    missing: Vec<u64>,
    sums: Vec<f64>,
    sum_sqs: Vec<f64>,
    cusum_alarms: Vec<u64>,
    class_counts: Vec<u64>,
    /// Max-probability edges (classifiers) or value edges (regressors).
    prediction_edges: Vec<f64>,
    max_prob_counts: Vec<u64>,
    value_counts: Vec<u64>,
    samples: u64,
    started_at_ms: Option<i64>,
}

impl WindowAccumulator {
    pub fn new(profile: &ReferenceProfile) -> Self {
        let mut edges = Vec::new();
        let mut edge_offsets = vec![0];
        let mut count_offsets = vec![0];
        for f in &profile.features {
            edges.extend_from_slice(&f.edges);
            edge_offsets.push(edges.len());
            count_offsets.push(count_offsets[count_offsets.len() - 1] + bin_count(&f.edges));
        }
        let features = profile.features.len();
        let (class_counts, prediction_edges, max_prob_counts, value_counts) =
            match &profile.prediction {
                None => (vec![], vec![], vec![], vec![]),
                Some(PredictionProfile::Classifier {
                    class_proportions,
                    max_prob_edges,
                    ..
                }) => (
                    vec![0; class_proportions.len()],
                    max_prob_edges.clone(),
                    vec![0; bin_count(max_prob_edges)],
                    vec![],
                ),
                Some(PredictionProfile::Regressor { edges, .. }) => {
                    (vec![], edges.clone(), vec![], vec![0; bin_count(edges)])
                }
            };
        WindowAccumulator {
            edges,
            edge_offsets,
            counts: vec![0; count_offsets[features]],
            count_offsets,
            missing: vec![0; features],
            sums: vec![0.0; features],
            sum_sqs: vec![0.0; features],
            cusum_alarms: vec![0; features],
            class_counts,
            prediction_edges,
            max_prob_counts,
            value_counts,
            samples: 0,
            started_at_ms: None,
        }
    }

    /// Samples counted so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// When the first sample of the window arrived.
    pub fn started_at_ms(&self) -> Option<i64> {
        self.started_at_ms
    }

    /// Counts `n` samples (rows) as seen at `now_ms`; the values are added separately.
    #[inline]
    pub fn add_samples(&mut self, n: u64, now_ms: i64) {
        if n > 0 && self.started_at_ms.is_none() {
            self.started_at_ms = Some(now_ms);
        }
        self.samples += n;
    }

    /// Adds one value of `feature` (its index in the profile). NaN counts as missing.
    #[inline]
    pub fn add(&mut self, feature: usize, x: f64) {
        if x.is_nan() {
            self.missing[feature] += 1;
            return;
        }
        let edges = &self.edges[self.edge_offsets[feature]..self.edge_offsets[feature + 1]];
        let bin = bin_index(edges, x);
        self.counts[self.count_offsets[feature] + bin] += 1;
        self.sums[feature] += x;
        self.sum_sqs[feature] += x * x;
    }

    /// Adds `weight` copies of one value at once: the counts are those of `weight` calls to
    /// [`Self::add`], the sums equal up to rounding. For bootstrap calibration, where a window
    /// drawn with replacement from a few hundred rows repeats most of them.
    pub fn add_weighted(&mut self, feature: usize, x: f64, weight: u64) {
        if x.is_nan() {
            self.missing[feature] += weight;
            return;
        }
        let edges = &self.edges[self.edge_offsets[feature]..self.edge_offsets[feature + 1]];
        let bin = bin_index(edges, x);
        let w = weight as f64;
        self.counts[self.count_offsets[feature] + bin] += weight;
        self.sums[feature] += w * x;
        self.sum_sqs[feature] += w * x * x;
    }

    /// Adds one prediction (`weight` times). A class beyond the profile's classes, or a
    /// prediction of the wrong kind, is ignored.
    #[inline]
    pub fn add_prediction(&mut self, prediction: Prediction, weight: u64) {
        match prediction {
            Prediction::Class { class, max_prob } => {
                if let Some(c) = self.class_counts.get_mut(class) {
                    *c += weight;
                    if !max_prob.is_nan() && !self.max_prob_counts.is_empty() {
                        self.max_prob_counts[bin_index(&self.prediction_edges, max_prob)] += weight;
                    }
                }
            }
            Prediction::Value(x) => {
                if !x.is_nan() && !self.value_counts.is_empty() {
                    self.value_counts[bin_index(&self.prediction_edges, x)] += weight;
                }
            }
        }
    }

    /// Records a CUSUM alarm on `feature` in this window.
    pub fn add_cusum_alarm(&mut self, feature: usize) {
        self.cusum_alarms[feature] += 1;
    }

    /// Adds another window's counts (of the same profile) to this one.
    pub fn merge(&mut self, other: &WindowAccumulator) {
        fn add<T: Copy + std::ops::AddAssign>(into: &mut [T], from: &[T]) {
            for (a, &b) in into.iter_mut().zip(from) {
                *a += b;
            }
        }
        add(&mut self.counts, &other.counts);
        add(&mut self.missing, &other.missing);
        add(&mut self.sums, &other.sums);
        add(&mut self.sum_sqs, &other.sum_sqs);
        add(&mut self.cusum_alarms, &other.cusum_alarms);
        add(&mut self.class_counts, &other.class_counts);
        add(&mut self.max_prob_counts, &other.max_prob_counts);
        add(&mut self.value_counts, &other.value_counts);
        self.samples += other.samples;
        self.started_at_ms = match (self.started_at_ms, other.started_at_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// Empties the window for reuse (no allocation).
    pub fn clear(&mut self) {
        self.counts.fill(0);
        self.missing.fill(0);
        self.sums.fill(0.0);
        self.sum_sqs.fill(0.0);
        self.cusum_alarms.fill(0);
        self.class_counts.fill(0);
        self.max_prob_counts.fill(0);
        self.value_counts.fill(0);
        self.samples = 0;
        self.started_at_ms = None;
    }

    /// The window as it travels, scored against `profile` with [`score`].
    pub fn window(
        &self,
        profile: &ReferenceProfile,
        model: &ModelName,
        release: u64,
        window: u32,
        ended_at_ms: i64,
    ) -> DriftWindow {
        let features = (0..self.missing.len())
            .map(|f| FeatureWindow {
                index: f as u32,
                counts: self.counts[self.count_offsets[f]..self.count_offsets[f + 1]].to_vec(),
                missing: self.missing[f],
                sum: self.sums[f],
                sum_sq: self.sum_sqs[f],
                psi: 0.0,
                effect: 0.0,
                drifted: false,
                cusum_alarms: self.cusum_alarms[f],
            })
            .collect();
        let prediction = profile.prediction.as_ref().map(|_| PredictionWindow {
            class_counts: self.class_counts.clone(),
            max_prob_counts: self.max_prob_counts.clone(),
            psi: 0.0,
            drifted: false,
            max_prob_psi: 0.0,
            value_counts: self.value_counts.clone(),
        });
        let started_at_ms = self.started_at_ms.unwrap_or(ended_at_ms).min(ended_at_ms);
        let mut out = DriftWindow {
            model: model.clone(),
            release,
            window,
            started_at_ms,
            ended_at_ms,
            samples: self.samples,
            features,
            prediction,
            drifted_share: 0.0,
            max_score: 0.0,
            drifted: false,
        };
        // The accumulator was built from this profile, so the shapes always match.
        let _ = score(profile, &mut out);
        out
    }
}

/// Why a window could not be scored against a profile: it was not built from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("drift window does not fit the reference profile: {0}")]
pub struct ScoreError(pub String);

/// Computes a window's scores and verdicts from its raw counts, in place: per feature PSI,
/// effect and `drifted`; the prediction's PSIs and `drifted`; the dataset-level
/// `drifted_share`, `max_score` and `drifted`.
///
/// The thresholds are those of the longest calibrated window length not above the window's
/// sample count ([`ReferenceProfile::thresholds_for`]): a longer window has less sampling noise,
/// so judging it by a shorter length's thresholds is conservative. A window shorter than every
/// calibrated length gets its PSIs and effects but is flagged only by CUSUM alarms.
///
/// A feature drifts when its PSI is above its threshold and its effect above the floor; the
/// prediction drifts when either of its PSIs is above its threshold; the window drifts when a
/// feature or the prediction drifted or a CUSUM alarmed.
pub fn score(profile: &ReferenceProfile, window: &mut DriftWindow) -> Result<(), ScoreError> {
    if window.features.len() != profile.features.len() {
        return Err(ScoreError(format!(
            "{} features, the profile has {}",
            window.features.len(),
            profile.features.len()
        )));
    }
    let thresholds = profile.thresholds_for(window.samples);
    let mut drifted = 0usize;
    let mut max_score = 0.0f64;
    let mut alarms = false;
    for (f, (fw, fp)) in window
        .features
        .iter_mut()
        .zip(&profile.features)
        .enumerate()
    {
        if fw.counts.len() != fp.proportions.len() || fw.index as usize != f {
            return Err(ScoreError(format!(
                "feature {f}: counts do not fit its bins"
            )));
        }
        let n: u64 = fw.counts.iter().sum();
        fw.psi = psi(&fw.counts, &fp.proportions);
        fw.effect = effect(n, fw.sum, fw.sum_sq, fp.mean, fp.std);
        if !fw.effect.is_finite() {
            fw.effect = 0.0;
        }
        fw.drifted = false;
        if let Some(t) = thresholds {
            let threshold = t.psi[f];
            fw.drifted = fw.psi > threshold && fw.effect > t.effect_floor;
            let ratio = if threshold > 0.0 {
                fw.psi / threshold
            } else {
                0.0
            };
            max_score = max_score.max(ratio);
        }
        drifted += usize::from(fw.drifted);
        alarms |= fw.cusum_alarms > 0;
    }
    let mut prediction_drifted = false;
    match (&profile.prediction, &mut window.prediction) {
        (None, None) => {}
        (
            Some(PredictionProfile::Classifier {
                class_proportions,
                max_prob_proportions,
                ..
            }),
            Some(pw),
        ) => {
            if pw.class_counts.len() != class_proportions.len()
                || pw.max_prob_counts.len() != max_prob_proportions.len()
            {
                return Err(ScoreError(
                    "prediction counts do not fit the profile".into(),
                ));
            }
            pw.psi = psi(&pw.class_counts, class_proportions);
            pw.max_prob_psi = psi(&pw.max_prob_counts, max_prob_proportions);
            pw.drifted = thresholds
                .is_some_and(|t| pw.psi > t.prediction_psi || pw.max_prob_psi > t.max_prob_psi);
            prediction_drifted = pw.drifted;
        }
        (Some(PredictionProfile::Regressor { proportions, .. }), Some(pw)) => {
            if pw.value_counts.len() != proportions.len() {
                return Err(ScoreError(
                    "prediction counts do not fit the profile".into(),
                ));
            }
            pw.psi = psi(&pw.value_counts, proportions);
            pw.max_prob_psi = 0.0;
            pw.drifted = thresholds.is_some_and(|t| pw.psi > t.prediction_psi);
            prediction_drifted = pw.drifted;
        }
        _ => return Err(ScoreError("prediction present on one side only".into())),
    }
    window.drifted_share = drifted as f64 / profile.features.len() as f64;
    window.max_score = max_score;
    window.drifted = drifted > 0 || prediction_drifted || alarms;
    Ok(())
}

/// Per-feature two-sided CUSUM state (see [`crate::profile::CusumParams`]).
#[derive(Debug, Clone)]
pub struct CusumBank {
    k: f64,
    h: f64,
    clip: f64,
    centers: Vec<f64>,
    inv_scales: Vec<f64>,
    pos: Vec<f64>,
    neg: Vec<f64>,
}

impl CusumBank {
    pub fn new(profile: &ReferenceProfile) -> Self {
        let features = profile.features.len();
        CusumBank {
            k: profile.cusum.k,
            h: profile.cusum.h,
            clip: profile.cusum.clip,
            centers: profile.features.iter().map(|f| f.mean).collect(),
            inv_scales: profile
                .features
                .iter()
                .map(|f| 1.0 / sigma_scale(f.std))
                .collect(),
            pos: vec![0.0; features],
            neg: vec![0.0; features],
        }
    }

    /// Folds one value of `feature` in and returns the larger of the two sums (NaN is
    /// skipped). Does not alarm or reset: calibration uses this to see the statistic itself.
    #[inline]
    pub fn update_statistic(&mut self, feature: usize, x: f64) -> f64 {
        if x.is_nan() {
            return self.pos[feature].max(self.neg[feature]);
        }
        let z =
            ((x - self.centers[feature]) * self.inv_scales[feature]).clamp(-self.clip, self.clip);
        let pos = (self.pos[feature] + z - self.k).max(0.0);
        let neg = (self.neg[feature] - z - self.k).max(0.0);
        self.pos[feature] = pos;
        self.neg[feature] = neg;
        pos.max(neg)
    }

    /// Folds one value of `feature` in; true when it raised an alarm (both sums then restart).
    #[inline]
    pub fn update(&mut self, feature: usize, x: f64) -> bool {
        if self.update_statistic(feature, x) > self.h {
            self.pos[feature] = 0.0;
            self.neg[feature] = 0.0;
            true
        } else {
            false
        }
    }

    /// Both sums of `feature`, `(S⁺, S⁻)`.
    pub fn sums(&self, feature: usize) -> (f64, f64) {
        (self.pos[feature], self.neg[feature])
    }

    pub fn reset(&mut self) {
        self.pos.fill(0.0);
        self.neg.fill(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode, V1};
    use crate::digest::Sha256Digest;
    use crate::profile::{
        Calibration, CusumParams, FeatureProfile, FeatureSource, WindowThresholds,
    };
    use crate::tensor::{Dim, ElementType, TensorSpec};

    /// Two features: one uniform on 0..10 with edges 0..=10, one constant 5.
    fn profile() -> ReferenceProfile {
        let edges: Vec<f64> = (0..=10).map(f64::from).collect();
        let mut counts = vec![100u64; bin_count(&edges)];
        counts[0] = 0;
        counts[11] = 0;
        let constant = vec![5.0];
        let feature = |element, edges: Vec<f64>, counts: &[u64], mean, std| FeatureProfile {
            name: None,
            source: FeatureSource::Element { input: 0, element },
            proportions: smoothed_proportions(counts),
            edges,
            mean,
            std,
            min: 0.0,
            max: 10.0,
            missing_rate: 0.0,
        };
        ReferenceProfile {
            v: V1,
            model_sha256: Sha256Digest::of(b"model"),
            inputs: vec![TensorSpec {
                name: "input".into(),
                datatype: ElementType::F32,
                shape: vec![Dim::Symbolic("N".into()), Dim::Fixed(2)],
            }],
            rows: 1000,
            features: vec![
                feature(0, edges, &counts, 5.0, 2.887),
                feature(1, constant, &[0, 1000, 0], 5.0, 0.0),
            ],
            prediction: Some(PredictionProfile::Classifier {
                output: "probabilities".into(),
                class_proportions: smoothed_proportions(&[500, 500]),
                max_prob_edges: vec![0.5, 0.9, 1.0],
                max_prob_proportions: smoothed_proportions(&[0, 500, 500, 0]),
            }),
            windows: vec![256],
            max_window_ms: 3_600_000,
            thresholds: vec![
                WindowThresholds {
                    window: 64,
                    psi: vec![0.5, 0.5],
                    effect_floor: 0.1,
                    prediction_psi: 0.5,
                    max_prob_psi: 0.5,
                },
                WindowThresholds {
                    window: 256,
                    psi: vec![0.2, 0.2],
                    effect_floor: 0.1,
                    prediction_psi: 0.2,
                    max_prob_psi: 0.2,
                },
            ],
            cusum: CusumParams {
                k: 0.5,
                h: 8.0,
                clip: 4.0,
            },
            calibration: Calibration {
                holdout_rows: 100,
                bootstrap: 10,
                seed: 1,
                window_alarm_rate: 0.003,
                cusum_alarm_rate: 0.003,
            },
        }
    }

    #[test]
    fn bins_follow_the_documented_layout() {
        let edges = [0.0, 1.0, 2.0];
        assert_eq!(bin_count(&edges), 4);
        assert_eq!(bin_index(&edges, -0.1), 0);
        assert_eq!(bin_index(&edges, f64::NEG_INFINITY), 0);
        assert_eq!(bin_index(&edges, 0.0), 1);
        assert_eq!(bin_index(&edges, 0.99), 1);
        assert_eq!(bin_index(&edges, 1.0), 2);
        assert_eq!(bin_index(&edges, 2.0), 2, "the maximum is in range");
        assert_eq!(bin_index(&edges, 2.01), 3);
        assert_eq!(bin_index(&edges, f64::INFINITY), 3);
        // A constant feature: below, the value itself, above.
        assert_eq!(bin_count(&[5.0]), 3);
        assert_eq!([4.0, 5.0, 6.0].map(|x| bin_index(&[5.0], x)), [0, 1, 2]);
    }

    #[test]
    fn psi_is_small_for_the_reference_and_large_for_a_shift() {
        let reference = smoothed_proportions(&[0, 1000, 1000, 1000, 1000, 0]);
        assert!(psi(&[0, 100, 100, 100, 100, 0], &reference) < 0.01);
        assert!(psi(&[0, 0, 0, 100, 300, 0], &reference) > 1.0);
        assert!(psi(&[400, 0, 0, 0, 0, 0], &reference) > 3.0);
        assert_eq!(psi(&[0; 6], &reference), 0.0);
    }

    #[test]
    fn effect_is_the_mean_shift_in_sigma_for_a_pure_shift() {
        // Values 1 and 3: mean 2, std 1. Against N(1, 1): a shift of one σ.
        let e = effect(2, 4.0, 10.0, 1.0, 1.0);
        assert!((e - 1.0).abs() < 1e-12);
        // Same mean, double the spread: one σ of spread.
        let e = effect(2, 0.0, 8.0, 0.0, 1.0);
        assert!((e - 1.0).abs() < 1e-12);
        assert_eq!(effect(0, 0.0, 0.0, 0.0, 1.0), 0.0);
    }

    fn fill(acc: &mut WindowAccumulator, rows: impl Iterator<Item = (f64, f64)>) {
        for (a, b) in rows {
            acc.add_samples(1, 0);
            acc.add(0, a);
            acc.add(1, b);
            acc.add_prediction(
                Prediction::Class {
                    class: usize::from(a >= 5.0),
                    max_prob: if a.fract() < 0.5 { 0.7 } else { 0.95 },
                },
                1,
            );
        }
    }

    #[test]
    fn a_window_like_the_reference_does_not_drift_and_a_shifted_one_does() {
        let p = profile();
        let model = ModelName::new("m").unwrap();
        let mut acc = WindowAccumulator::new(&p);
        fill(&mut acc, (0..256).map(|i| ((i % 100) as f64 / 10.0, 5.0)));
        let w = acc.window(&p, &model, 1, 256, 10);
        assert!(!w.drifted, "{w:?}");
        assert_eq!(w.features[0].counts.iter().sum::<u64>(), 256);

        acc.clear();
        fill(
            &mut acc,
            (0..256).map(|i| ((i % 100) as f64 / 10.0 + 3.0, 5.0)),
        );
        let w = acc.window(&p, &model, 1, 256, 10);
        assert!(w.features[0].drifted && !w.features[1].drifted, "{w:?}");
        assert_eq!(w.drifted_share, 0.5);
        assert!(w.max_score > 1.0 && w.drifted);
        // The constant feature changing is out of range at once.
        acc.clear();
        fill(&mut acc, (0..256).map(|i| ((i % 100) as f64 / 10.0, 5.5)));
        let w = acc.window(&p, &model, 1, 256, 10);
        assert!(w.features[1].drifted, "{w:?}");
    }

    #[test]
    fn too_short_windows_are_not_judged_and_long_ones_use_the_longest_thresholds() {
        let p = profile();
        assert!(p.thresholds_for(63).is_none());
        assert_eq!(p.thresholds_for(64).unwrap().window, 64);
        assert_eq!(p.thresholds_for(5000).unwrap().window, 256);
        let model = ModelName::new("m").unwrap();
        let mut acc = WindowAccumulator::new(&p);
        fill(&mut acc, (0..10).map(|_| (9.5, 5.0)));
        let w = acc.window(&p, &model, 1, 256, 10);
        assert!(w.features[0].psi > 1.0 && !w.drifted);
    }

    #[test]
    fn merged_windows_score_like_one_window() {
        let p = profile();
        let model = ModelName::new("m").unwrap();
        let rows: Vec<(f64, f64)> = (0..512)
            .map(|i| {
                (
                    (i * 7 % 100) as f64 / 10.0,
                    if i % 50 == 0 { f64::NAN } else { 5.0 },
                )
            })
            .collect();
        let mut whole = WindowAccumulator::new(&p);
        fill(&mut whole, rows.iter().copied());
        let mut a = WindowAccumulator::new(&p);
        let mut b = WindowAccumulator::new(&p);
        fill(&mut a, rows[..200].iter().copied());
        fill(&mut b, rows[200..].iter().copied());
        a.merge(&b);
        let (w1, w2) = (
            whole.window(&p, &model, 1, 512, 0),
            a.window(&p, &model, 1, 512, 0),
        );
        assert_eq!(w1.features[0].counts, w2.features[0].counts);
        assert_eq!(w1.features[1].missing, 11);
        assert!((w1.features[0].psi - w2.features[0].psi).abs() < 1e-12);
        // And the server, re-scoring the merged wire form, agrees with the device.
        let mut rescored: DriftWindow = w2.clone();
        score(&p, &mut rescored).unwrap();
        assert_eq!(rescored, w2);
    }

    #[test]
    fn merged_wire_windows_equal_one_window_over_all_rows() {
        let p = profile();
        let model = ModelName::new("m").unwrap();
        let rows: Vec<(f64, f64)> = (0..600)
            .map(|i| ((i * 13 % 100) as f64 / 10.0, 5.0))
            .collect();
        let mut whole = WindowAccumulator::new(&p);
        fill(&mut whole, rows.iter().copied());
        let mut a = WindowAccumulator::new(&p);
        let mut b = WindowAccumulator::new(&p);
        fill(&mut a, rows[..256].iter().copied());
        fill(&mut b, rows[256..].iter().copied());
        let mut merged = a.window(&p, &model, 1, 256, 10);
        merged.merge(&b.window(&p, &model, 1, 256, 20)).unwrap();
        score(&p, &mut merged).unwrap();
        let expected = whole.window(&p, &model, 1, 256, 20);
        assert_eq!(merged.samples, 600);
        assert_eq!(merged.features[0].counts, expected.features[0].counts);
        assert_eq!(merged.prediction, expected.prediction);
        assert!((merged.features[0].psi - expected.features[0].psi).abs() < 1e-12);
        assert!((merged.features[0].sum - expected.features[0].sum).abs() < 1e-9);

        // Another release, or another shape, is refused and changes nothing.
        let before = merged.clone();
        let other = b.window(&p, &model, 2, 256, 20);
        assert!(merged.merge(&other).is_err());
        let mut cut = b.window(&p, &model, 1, 256, 20);
        cut.features[0].counts.pop();
        assert!(merged.merge(&cut).is_err());
        assert_eq!(merged, before);
    }

    #[test]
    fn weighted_adds_count_like_repeated_adds() {
        let p = profile();
        let mut a = WindowAccumulator::new(&p);
        let mut b = WindowAccumulator::new(&p);
        for _ in 0..7 {
            a.add(0, 3.5);
        }
        b.add_weighted(0, 3.5, 7);
        let model = ModelName::new("m").unwrap();
        assert_eq!(
            a.window(&p, &model, 1, 1, 0).features,
            b.window(&p, &model, 1, 1, 0).features
        );
    }

    #[test]
    fn cusum_catches_a_one_sigma_shift_quickly_and_ignores_one_outlier() {
        let p = profile();
        let mut bank = CusumBank::new(&p);
        assert!(!bank.update(0, 1e9), "a single outlier is clipped");
        bank.reset();
        let delay = (1..1000).find(|_| bank.update(0, 5.0 + 2.887)).unwrap();
        // (h + k) / (1 - k) ≈ 17 samples for a 1σ shift.
        assert!(delay < 25, "{delay}");
        assert_eq!(bank.sums(0), (0.0, 0.0), "an alarm restarts the sums");
        assert!(!bank.update(0, f64::NAN));
    }

    #[test]
    fn profiles_round_trip_and_bad_ones_are_refused() {
        let p = profile();
        let bytes = encode(&p);
        assert_eq!(decode::<ReferenceProfile>(&bytes).unwrap(), p);
        let mut bad = p.clone();
        bad.features[0].edges.swap(1, 2);
        assert!(decode::<ReferenceProfile>(&encode(&bad)).is_err());
        let mut bad = p.clone();
        bad.features[0].proportions[0] = 0.5;
        assert!(decode::<ReferenceProfile>(&encode(&bad)).is_err());
        let mut bad = p.clone();
        bad.windows = vec![256, 2048];
        assert!(decode::<ReferenceProfile>(&encode(&bad)).is_err());
        let mut bad = p.clone();
        bad.thresholds[1].psi.pop();
        assert!(decode::<ReferenceProfile>(&encode(&bad)).is_err());
        let mut bad = p;
        bad.cusum.h = 0.0;
        assert!(decode::<ReferenceProfile>(&encode(&bad)).is_err());
    }

    #[test]
    fn windows_that_do_not_fit_the_profile_are_refused_by_score() {
        let p = profile();
        let model = ModelName::new("m").unwrap();
        let mut w = WindowAccumulator::new(&p).window(&p, &model, 1, 256, 0);
        w.features[0].counts.pop();
        assert!(score(&p, &mut w).is_err());
    }
}
