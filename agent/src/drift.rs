//! The on-device drift monitor: one [`DriftMonitor`] per served model version, fed with every
//! successful inference, producing closed [`DriftWindow`]s for the outbox.
//!
//! # Using it
//!
//! ```text
//! // When a version is activated (its manifest verified, the profile file's digest checked):
//! let monitor = DriftMonitor::from_manifest(&manifest, &profile_bytes)?;   // or ::new(...)
//! let monitor = Mutex::new(monitor);                      // one lock per model version
//!
//! // After each successful inference (a batch of N rows counts N samples):
//! for window in monitor.lock().observe(&request_inputs, &outputs, now_ms) {
//!     outbox.push(now_ms, &ItemBody::Drift(window));       // priority Summary
//! }
//! // Every few seconds, so that quiet models still report (windows close after an hour):
//! for window in monitor.lock().poll(now_ms) { ... }
//! // When the version stops serving (switch, shutdown): what is open, if anything.
//! for window in monitor.lock().flush(now_ms) { ... }
//! ```
//!
//! `observe` costs a few nanoseconds per feature per row and allocates nothing once warm
//! (`cargo bench -p edge-agent --bench drift`); it never fails the request: a batch that does
//! not fit the profile is skipped and counted ([`DriftMonitor::skipped_batches`]).
//!
//! # Windows
//!
//! The profile names the window lengths (256 and 2048 for profiles `fleetctl profile build`
//! writes). The shortest is filled row by row; each longer one is made of whole shorter windows
//! (counts add) and closes at the first short-window close that brings it to its length, so it
//! may hold up to one short window more. Every window also closes when its first sample is
//! older than the profile's `max_window_ms` (an hour). Windows are judged by
//! [`fleet_protocol::drift::score`], the same function the server and the calibration use.
//!
//! Per feature a two-sided CUSUM runs across windows. Its alarm is counted in the open windows
//! and, when it starts an alarm episode for that feature, closes the short window at once so
//! that the alarm reaches the outbox within the row that raised it rather than when the window
//! fills. An episode ends at the first short window without an alarm on the feature, so a
//! lasting shift closes one window early, not every window; and whatever the alarms, at most
//! one window per short-window length closes early, so the windows of any input stream stay
//! at most twice as many as its rows divided by that length.

use std::sync::Arc;

use fleet_protocol::codec::{decode, DecodeError};
use fleet_protocol::drift::{CusumBank, DriftWindow, Prediction, WindowAccumulator};
use fleet_protocol::features::{ExtractError, FeatureExtractor, PredictionSource};
use fleet_protocol::outbox::ItemBody;
use fleet_protocol::{Manifest, ModelName, ReferenceProfile, Sha256Digest, Tensor, TensorSpec};

use crate::outbox::OutboxHandle;
use crate::serve::{InferenceObserver, ServingModel};

/// Why a monitor could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    #[error("the manifest names no reference profile")]
    NoProfile,
    #[error("the reference profile's digest {actual} is not the manifest's {expected}")]
    ProfileDigest {
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
    #[error("the reference profile is malformed: {0}")]
    Malformed(#[from] DecodeError),
    #[error("the reference profile does not fit the model: {0}")]
    Mismatch(String),
}

/// One window length's open window.
#[derive(Debug)]
struct Tier {
    len: u32,
    acc: WindowAccumulator,
}

/// The mutable part, apart from the feature extractor's scratch, so that the per-row closure
/// can borrow both.
#[derive(Debug)]
struct State {
    /// `tiers[0]` is filled row by row, the others from closed `tiers[0]` windows.
    tiers: Vec<Tier>,
    cusum: CusumBank,
    /// Per feature: in an alarm episode (see the module documentation).
    in_episode: Vec<bool>,
    /// Rows since a CUSUM alarm last closed a short window early.
    rows_since_early_close: u64,
    /// Scratch: this batch's predictions, row by row.
    predictions: Vec<Prediction>,
    closed: Vec<DriftWindow>,
    alarms: u64,
}

/// The drift monitor of one model version. Not internally synchronised: wrap it in a `Mutex`.
#[derive(Debug)]
pub struct DriftMonitor {
    model: ModelName,
    release: u64,
    profile: Arc<ReferenceProfile>,
    features: FeatureExtractor,
    prediction: Option<PredictionSource>,
    state: State,
    skipped_batches: u64,
}

impl DriftMonitor {
    /// A monitor for a model version whose inputs and outputs are `inputs` and `outputs` (as
    /// its manifest declares them). The profile must have been built for exactly these inputs,
    /// and its prediction output, if any, must be one of the outputs.
    pub fn new(
        model: ModelName,
        release: u64,
        profile: Arc<ReferenceProfile>,
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
    ) -> Result<DriftMonitor, DriftError> {
        if profile.inputs.as_slice() != inputs {
            return Err(DriftError::Mismatch(format!(
                "it was built for inputs {}, the model has {}",
                describe(&profile.inputs),
                describe(inputs)
            )));
        }
        let sources: Vec<_> = profile.features.iter().map(|f| f.source).collect();
        let features = FeatureExtractor::new(inputs, &sources).map_err(DriftError::Mismatch)?;
        let prediction = match &profile.prediction {
            None => None,
            Some(p) => {
                let source = PredictionSource::of_profile(p);
                let declared = outputs.iter().find(|s| s.name == source.output());
                let fits = match (&source, declared) {
                    (_, None) => false,
                    (PredictionSource::Probabilities { classes, .. }, Some(spec)) => {
                        spec.shape.len() == 2
                            && spec.shape[1].fixed().is_none_or(|c| c == *classes as u64)
                    }
                    (PredictionSource::Value { .. }, Some(spec)) => {
                        spec.shape.len() == 1
                            || (spec.shape.len() == 2 && spec.shape[1].fixed() == Some(1))
                    }
                };
                if !fits {
                    return Err(DriftError::Mismatch(format!(
                        "its prediction profile watches output {:?}, which the model does not \
                         have in that shape",
                        source.output()
                    )));
                }
                Some(source)
            }
        };
        let tiers = profile
            .windows
            .iter()
            .map(|&len| Tier {
                len,
                acc: WindowAccumulator::new(&profile),
            })
            .collect();
        let state = State {
            tiers,
            cusum: CusumBank::new(&profile),
            in_episode: vec![false; profile.features.len()],
            rows_since_early_close: u64::MAX,
            predictions: Vec::new(),
            closed: Vec::new(),
            alarms: 0,
        };
        Ok(DriftMonitor {
            model,
            release,
            profile,
            features,
            prediction,
            state,
            skipped_batches: 0,
        })
    }

    /// A monitor from a verified manifest and the bytes of the profile file it names: the
    /// digest is checked against `profile_sha256`, then the profile is decoded and validated.
    pub fn from_manifest(manifest: &Manifest, profile: &[u8]) -> Result<DriftMonitor, DriftError> {
        let expected = manifest.profile_sha256.ok_or(DriftError::NoProfile)?;
        let actual = Sha256Digest::of(profile);
        if actual != expected {
            return Err(DriftError::ProfileDigest { expected, actual });
        }
        let profile: ReferenceProfile = decode(profile)?;
        if profile.model_sha256 != manifest.sha256 {
            return Err(DriftError::Mismatch(format!(
                "it was built for the model with sha256 {}, the manifest's is {}",
                profile.model_sha256, manifest.sha256
            )));
        }
        DriftMonitor::new(
            manifest.name.clone(),
            manifest.release,
            Arc::new(profile),
            &manifest.inputs,
            &manifest.outputs,
        )
    }

    pub fn profile(&self) -> &Arc<ReferenceProfile> {
        &self.profile
    }

    /// Batches skipped because their tensors did not fit the profile.
    pub fn skipped_batches(&self) -> u64 {
        self.skipped_batches
    }

    /// CUSUM alarms since the monitor started.
    pub fn alarms(&self) -> u64 {
        self.state.alarms
    }

    /// Samples in the open shortest window.
    pub fn open_samples(&self) -> u64 {
        self.state.tiers[0].acc.samples()
    }

    /// Folds one successful inference in (inputs as requested, outputs as returned) and
    /// returns the windows it closed, oldest first.
    pub fn observe(
        &mut self,
        inputs: &[Tensor],
        outputs: &[Tensor],
        now_ms: i64,
    ) -> Vec<DriftWindow> {
        self.close_expired(now_ms);
        self.state.predictions.clear();
        if let Some(source) = &self.prediction {
            let predictions = &mut self.state.predictions;
            if source
                .for_each_row(outputs, |p| predictions.push(p))
                .is_err()
            {
                self.skipped_batches += 1;
                return std::mem::take(&mut self.state.closed);
            }
        }
        let result = self.observe_rows(inputs, now_ms);
        if result.is_err() {
            self.skipped_batches += 1;
        }
        std::mem::take(&mut self.state.closed)
    }

    fn observe_rows(&mut self, inputs: &[Tensor], now_ms: i64) -> Result<(), ExtractError> {
        let state = &mut self.state;
        let profile = &*self.profile;
        let (model, release) = (&self.model, self.release);
        let with_predictions = self.prediction.is_some();
        // Rows are checked against the predictions before anything is counted, so a batch
        // whose outputs have another batch size leaves no trace.
        let rows = self.features.rows(inputs)?;
        if with_predictions && rows != state.predictions.len() {
            return Err(ExtractError::BatchMismatch);
        }
        let mut row = 0;
        self.features.for_each_row(inputs, |values| {
            let short_len = u64::from(state.tiers[0].len);
            let short = &mut state.tiers[0].acc;
            short.add_samples(1, now_ms);
            let mut early = false;
            for (f, &x) in values.iter().enumerate() {
                short.add(f, x);
                if state.cusum.update(f, x) {
                    short.add_cusum_alarm(f);
                    state.alarms += 1;
                    early |= !std::mem::replace(&mut state.in_episode[f], true);
                }
            }
            if with_predictions {
                short.add_prediction(state.predictions[row], 1);
            }
            row += 1;
            // At most one early close per short-window length: inputs that keep alarming
            // (a stuck sensor, a lasting shift over many features) would otherwise close a
            // window every few rows and flood the outbox with near-empty windows.
            state.rows_since_early_close = state.rows_since_early_close.saturating_add(1);
            let early = early && state.rows_since_early_close >= short_len;
            if early {
                state.rows_since_early_close = 0;
            }
            if early || short.samples() >= short_len {
                state.close_short(profile, model, release, now_ms, false);
            }
        })?;
        Ok(())
    }

    /// Closes the windows whose first sample is older than the profile's time limit and
    /// returns them.
    pub fn poll(&mut self, now_ms: i64) -> Vec<DriftWindow> {
        self.close_expired(now_ms);
        std::mem::take(&mut self.state.closed)
    }

    /// Closes every open window that has samples (the shorter ones into the longer ones
    /// first) and returns them: for a clean stop or a version switch.
    pub fn flush(&mut self, now_ms: i64) -> Vec<DriftWindow> {
        let (profile, model, release) = (&*self.profile, &self.model, self.release);
        self.state
            .close_short(profile, model, release, now_ms, true);
        std::mem::take(&mut self.state.closed)
    }

    fn close_expired(&mut self, now_ms: i64) {
        let (profile, model, release) = (&*self.profile, &self.model, self.release);
        let limit = i64::try_from(profile.max_window_ms).unwrap_or(i64::MAX);
        let expired = |acc: &WindowAccumulator| {
            acc.started_at_ms()
                .is_some_and(|start| now_ms.saturating_sub(start) >= limit)
        };
        if expired(&self.state.tiers[0].acc) {
            self.state
                .close_short(profile, model, release, now_ms, false);
        }
        for i in 1..self.state.tiers.len() {
            if expired(&self.state.tiers[i].acc) {
                self.state.close_tier(i, profile, model, release, now_ms);
            }
        }
    }
}

impl State {
    /// Closes the short window (if it has samples) into the longer ones, closing those that
    /// are full, or all of them when `all`.
    fn close_short(
        &mut self,
        profile: &ReferenceProfile,
        model: &ModelName,
        release: u64,
        now_ms: i64,
        all: bool,
    ) {
        let (short, longer) = self.tiers.split_at_mut(1);
        let short = &mut short[0];
        if short.acc.samples() > 0 {
            let window = short.acc.window(profile, model, release, short.len, now_ms);
            // An episode ends with the first window in which the feature did not alarm.
            for (episode, fw) in self.in_episode.iter_mut().zip(&window.features) {
                *episode &= fw.cusum_alarms > 0;
            }
            self.closed.push(window);
            for tier in longer.iter_mut() {
                tier.acc.merge(&short.acc);
            }
            short.acc.clear();
        }
        for i in 1..self.tiers.len() {
            let tier = &self.tiers[i];
            if all || tier.acc.samples() >= u64::from(tier.len) {
                self.close_tier(i, profile, model, release, now_ms);
            }
        }
    }

    fn close_tier(
        &mut self,
        i: usize,
        profile: &ReferenceProfile,
        model: &ModelName,
        release: u64,
        now_ms: i64,
    ) {
        let tier = &mut self.tiers[i];
        if tier.acc.samples() > 0 {
            self.closed
                .push(tier.acc.window(profile, model, release, tier.len, now_ms));
            tier.acc.clear();
        }
    }
}

fn describe(specs: &[TensorSpec]) -> String {
    let parts: Vec<String> = specs
        .iter()
        .map(|s| format!("{:?} {} {}", s.name, s.datatype, s.shape_display()))
        .collect();
    parts.join(", ")
}

/// Puts closed drift windows into the outbox (priority Summary: evicted only after every
/// sample and telemetry item).
pub fn report_windows(outbox: &OutboxHandle, windows: Vec<DriftWindow>) {
    for window in windows {
        let at_ms = window.ended_at_ms;
        if !outbox.push(at_ms, &ItemBody::Drift(window)) {
            tracing::warn!("the outbox is closed; a drift window is lost");
        }
    }
}

/// Feeds every successful inference of a version with a monitor into it, and its closed
/// windows into the outbox.
pub struct DriftReporter {
    outbox: OutboxHandle,
}

impl DriftReporter {
    pub fn new(outbox: OutboxHandle) -> Self {
        DriftReporter { outbox }
    }
}

impl InferenceObserver for DriftReporter {
    fn observe(&self, model: &ServingModel, inputs: &[Tensor], outputs: &[Tensor]) {
        let Some(monitor) = &model.drift else {
            return;
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let closed = monitor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .observe(inputs, outputs, now_ms);
        // Pushed outside the lock: encoding a window takes microseconds.
        if !closed.is_empty() {
            report_windows(&self.outbox, closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_protocol::drift::{bin_count, smoothed_proportions};
    use fleet_protocol::profile::{
        Calibration, CusumParams, FeatureProfile, FeatureSource, PredictionProfile,
        WindowThresholds,
    };
    use fleet_protocol::tensor::{Dim, ElementType, TensorData};
    use fleet_protocol::V1;

    fn specs() -> (Vec<TensorSpec>, Vec<TensorSpec>) {
        let n = || Dim::Symbolic("N".into());
        (
            vec![TensorSpec {
                name: "input".into(),
                datatype: ElementType::F32,
                shape: vec![n(), Dim::Fixed(2)],
            }],
            vec![TensorSpec {
                name: "probabilities".into(),
                datatype: ElementType::F32,
                shape: vec![n(), Dim::Fixed(2)],
            }],
        )
    }

    /// Two features uniform on 0..10, a two-class classifier; windows 8 and 32.
    fn profile() -> Arc<ReferenceProfile> {
        let edges: Vec<f64> = (0..=10).map(f64::from).collect();
        let mut counts = vec![100u64; bin_count(&edges)];
        counts[0] = 0;
        counts[11] = 0;
        let feature = |element| FeatureProfile {
            name: None,
            source: FeatureSource::Element { input: 0, element },
            edges: edges.clone(),
            proportions: smoothed_proportions(&counts),
            mean: 5.0,
            std: 2.887,
            min: 0.0,
            max: 10.0,
            missing_rate: 0.0,
        };
        let thresholds = |window| WindowThresholds {
            window,
            psi: vec![1.0, 1.0],
            effect_floor: 0.1,
            prediction_psi: 1.0,
            max_prob_psi: 1.0,
        };
        Arc::new(ReferenceProfile {
            v: V1,
            model_sha256: Sha256Digest::of(b"model"),
            inputs: specs().0,
            rows: 1000,
            features: vec![feature(0), feature(1)],
            prediction: Some(PredictionProfile::Classifier {
                output: "probabilities".into(),
                class_proportions: smoothed_proportions(&[500, 500]),
                max_prob_edges: vec![0.5, 1.0],
                max_prob_proportions: smoothed_proportions(&[0, 1000, 0]),
            }),
            windows: vec![8, 32],
            max_window_ms: 3_600_000,
            thresholds: vec![thresholds(8), thresholds(32)],
            cusum: CusumParams {
                k: 0.5,
                h: 6.0,
                clip: 4.0,
            },
            calibration: Calibration {
                holdout_rows: 100,
                bootstrap: 10,
                seed: 1,
                window_alarm_rate: 0.003,
                cusum_alarm_rate: 0.003,
            },
        })
    }

    fn monitor() -> DriftMonitor {
        let (inputs, outputs) = specs();
        DriftMonitor::new(
            ModelName::new("m").unwrap(),
            1,
            profile(),
            &inputs,
            &outputs,
        )
        .unwrap()
    }

    fn batch(rows: &[[f32; 2]]) -> (Vec<Tensor>, Vec<Tensor>) {
        let n = rows.len() as u64;
        let x: Vec<f32> = rows.iter().flatten().copied().collect();
        let p: Vec<f32> = rows
            .iter()
            .flat_map(|r| if r[0] < 5.0 { [0.8, 0.2] } else { [0.3, 0.7] })
            .collect();
        (
            vec![Tensor {
                name: "input".into(),
                shape: vec![n, 2],
                data: TensorData::F32(x),
            }],
            vec![Tensor {
                name: "probabilities".into(),
                shape: vec![n, 2],
                data: TensorData::F32(p),
            }],
        )
    }

    fn unshifted(i: usize) -> [f32; 2] {
        [
            ((i * 37) % 100) as f32 / 10.0,
            ((i * 53) % 100) as f32 / 10.0,
        ]
    }

    #[test]
    fn batches_count_every_row_and_long_windows_are_made_of_short_ones() {
        let mut m = monitor();
        let rows: Vec<[f32; 2]> = (0..40).map(unshifted).collect();
        let (i, o) = batch(&rows);
        let closed = m.observe(&i, &o, 1000);
        // Five short windows of 8, one long one of 32.
        let lens: Vec<(u32, u64)> = closed.iter().map(|w| (w.window, w.samples)).collect();
        assert_eq!(lens, [(8, 8), (8, 8), (8, 8), (8, 8), (32, 32), (8, 8)]);
        assert!(closed.iter().all(|w| !w.drifted), "{closed:#?}");
        let long = &closed[4];
        assert_eq!(
            long.prediction
                .as_ref()
                .unwrap()
                .class_counts
                .iter()
                .sum::<u64>(),
            32
        );
        assert_eq!(m.skipped_batches(), 0);
    }

    #[test]
    fn a_cusum_alarm_closes_the_short_window_at_once_but_once_per_episode() {
        let mut m = monitor();
        let (i, o) = batch(&(0..2).map(unshifted).collect::<Vec<_>>());
        assert!(m.observe(&i, &o, 0).is_empty());
        // Feature 0 jumps by 3σ: the CUSUM (h = 6, k = 0.5) alarms on the third row, before
        // the window fills.
        let mut closed = Vec::new();
        let mut rows_fed = 0;
        while closed.is_empty() {
            let (i, o) = batch(&[[5.0 + 3.0 * 2.887, 5.0]]);
            closed = m.observe(&i, &o, 0);
            rows_fed += 1;
        }
        assert_eq!(rows_fed, 3);
        assert_eq!(closed.len(), 1);
        assert!(closed[0].samples < 8 && closed[0].drifted);
        assert!(closed[0].features[0].cusum_alarms > 0);
        // The shift goes on: later windows are full, and still flagged.
        let shifted = vec![[5.0 + 3.0 * 2.887, 5.0]; 24];
        let (i, o) = batch(&shifted);
        let closed = m.observe(&i, &o, 0);
        assert!(closed
            .iter()
            .filter(|w| w.window == 8)
            .all(|w| w.samples == 8 && w.drifted));
    }

    #[test]
    fn windows_close_after_the_time_limit_and_on_flush() {
        let mut m = monitor();
        let (i, o) = batch(&(0..3).map(unshifted).collect::<Vec<_>>());
        assert!(m.observe(&i, &o, 1_000).is_empty());
        assert!(m.poll(1_000 + 3_599_999).is_empty());
        // Both windows started with the first sample an hour ago.
        let closed = m.poll(1_000 + 3_600_000);
        let seen: Vec<(u32, u64, i64)> = closed
            .iter()
            .map(|w| (w.window, w.samples, w.started_at_ms))
            .collect();
        assert_eq!(seen, [(8, 3, 1_000), (32, 3, 1_000)]);
        assert!(m.flush(5_000_000).is_empty());
        let (i, o) = batch(&(0..3).map(unshifted).collect::<Vec<_>>());
        assert!(m.observe(&i, &o, 6_000_000).is_empty());
        let closed = m.flush(6_000_001);
        assert_eq!(
            closed.len(),
            2,
            "flush closes the short window into the long one"
        );
    }

    #[test]
    fn batches_that_do_not_fit_are_skipped_and_counted() {
        let mut m = monitor();
        let (mut i, o) = batch(&[[1.0, 2.0], [3.0, 4.0]]);
        i[0].shape = vec![1, 4];
        assert!(m.observe(&i, &o, 0).is_empty());
        let (i, mut o) = batch(&[[1.0, 2.0], [3.0, 4.0]]);
        o[0].name = "other".into();
        assert!(m.observe(&i, &o, 0).is_empty());
        assert_eq!((m.skipped_batches(), m.open_samples()), (2, 0));
    }

    #[test]
    fn profiles_for_other_inputs_or_digests_are_refused() {
        let (mut inputs, outputs) = specs();
        inputs[0].shape[1] = Dim::Fixed(3);
        let err = DriftMonitor::new(
            ModelName::new("m").unwrap(),
            1,
            profile(),
            &inputs,
            &outputs,
        )
        .unwrap_err();
        assert!(err.to_string().contains("built for inputs"), "{err}");
        let (inputs, mut outputs) = specs();
        outputs[0].name = "scores".into();
        assert!(DriftMonitor::new(
            ModelName::new("m").unwrap(),
            1,
            profile(),
            &inputs,
            &outputs
        )
        .is_err());
    }
}
