//! Drift quality on the sample models' data: streams fed through the real `DriftMonitor` with
//! the model's real outputs (tract), against the committed reference profiles. Shared by
//! `tests/drift_quality.rs` (bounds) and `benches/drift.rs` (exact figures).
//!
//! Streams are rows drawn with replacement from one of the `models/data/<dataset>/` files;
//! each row's model output is computed once with tract. Nothing here knows which feature a
//! shift touched: a trial is flagged by any drifted window the monitor returns.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edge_agent::drift::DriftMonitor;
use edge_agent::runtime::{inspect, Plan};
use fleet_protocol::codec::decode;
use fleet_protocol::{ModelName, ReferenceProfile, Tensor, TensorData, TensorSpec};

pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

/// A float32 2-D `.npy` file (the format `models/make.py` writes).
pub fn read_npy(path: &Path) -> (usize, usize, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(
        header.contains("'<f4'") && header.contains("False"),
        "{header}"
    );
    let shape = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let dims: Vec<usize> = shape
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let values: Vec<f32> = bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(values.len(), dims[0] * dims[1]);
    (dims[0], dims[1], values)
}

/// One data file seen through the model: inputs and probability outputs per row.
pub struct Rows {
    pub rows: usize,
    pub cols: usize,
    pub inputs: Vec<f32>,
    pub classes: usize,
    pub probs: Vec<f32>,
}

/// A sample model with its committed profile and data.
pub struct Sample {
    pub label: &'static str,
    pub model: ModelName,
    pub profile: Arc<ReferenceProfile>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub holdout: Rows,
    pub shift_mean: Rows,
    pub shift_noise: Rows,
    pub shift_prior: Rows,
}

impl Sample {
    /// `models/<model>/<version>.onnx` with its profile, on `models/data/<dataset>/`.
    pub fn load(label: &'static str, model: &str, version: &str, dataset: &str) -> Sample {
        let dir = models_dir();
        let onnx = std::fs::read(dir.join(model).join(format!("{version}.onnx"))).unwrap();
        let profile_path = dir.join(model).join(format!("{version}.profile.json"));
        let profile: ReferenceProfile = decode(&std::fs::read(&profile_path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", profile_path.display()));
        assert_eq!(
            profile.model_sha256,
            fleet_protocol::Sha256Digest::of(&onnx),
            "{} was built for another model; regenerate it (see ARCHITECTURE.md)",
            profile_path.display()
        );
        let signature = inspect(&onnx).unwrap();
        let plan = Plan::load(&onnx, &signature.inputs).unwrap();
        let data = dir.join("data").join(dataset);
        let rows = |file: &str| -> Rows {
            let (rows, cols, inputs) = read_npy(&data.join(file));
            let out = plan
                .run(&[Tensor {
                    name: signature.inputs[0].name.clone(),
                    shape: vec![rows as u64, cols as u64],
                    data: TensorData::F32(inputs.clone()),
                }])
                .unwrap();
            let probs = out.iter().find(|t| t.name == "probabilities").unwrap();
            let TensorData::F32(probs_data) = &probs.data else {
                panic!("probabilities are not FP32")
            };
            Rows {
                rows,
                cols,
                inputs,
                classes: probs.shape[1] as usize,
                probs: probs_data.clone(),
            }
        };
        Sample {
            label,
            model: ModelName::new(model).unwrap(),
            profile: Arc::new(profile),
            holdout: rows("holdout.X.npy"),
            shift_mean: rows("shift-mean.X.npy"),
            shift_noise: rows("shift-noise.X.npy"),
            shift_prior: rows("shift-prior.X.npy"),
            inputs: signature.inputs,
            outputs: signature.outputs,
        }
    }

    pub fn monitor(&self) -> DriftMonitor {
        DriftMonitor::new(
            self.model.clone(),
            1,
            self.profile.clone(),
            &self.inputs,
            &self.outputs,
        )
        .unwrap()
    }

    /// One request of the given rows, as the inference API would pass it to the monitor.
    pub fn request(&self, from: &Rows, rows: &[usize]) -> (Vec<Tensor>, Vec<Tensor>) {
        let mut x = Vec::with_capacity(rows.len() * from.cols);
        let mut p = Vec::with_capacity(rows.len() * from.classes);
        for &r in rows {
            x.extend_from_slice(&from.inputs[r * from.cols..(r + 1) * from.cols]);
            p.extend_from_slice(&from.probs[r * from.classes..(r + 1) * from.classes]);
        }
        let n = rows.len() as u64;
        (
            vec![Tensor {
                name: self.inputs[0].name.clone(),
                shape: vec![n, from.cols as u64],
                data: TensorData::F32(x),
            }],
            vec![Tensor {
                name: "probabilities".into(),
                shape: vec![n, from.classes as u64],
                data: TensorData::F32(p),
            }],
        )
    }
}

/// Per monitored window length: windows closed and windows flagged.
#[derive(Debug, Clone, Default)]
pub struct WindowTally {
    pub per_window: Vec<(u32, u64, u64)>,
}

impl WindowTally {
    fn new(profile: &ReferenceProfile) -> Self {
        WindowTally {
            per_window: profile.windows.iter().map(|&w| (w, 0, 0)).collect(),
        }
    }

    fn count(&mut self, windows: &[fleet_protocol::drift::DriftWindow]) {
        for w in windows {
            if let Some(t) = self.per_window.iter_mut().find(|t| t.0 == w.window) {
                t.1 += 1;
                t.2 += u64::from(w.drifted);
            }
        }
    }

    /// Flagged share of the windows of length `window`.
    pub fn rate(&self, window: u32) -> f64 {
        let t = self.per_window.iter().find(|t| t.0 == window).unwrap();
        t.2 as f64 / t.1.max(1) as f64
    }

    pub fn windows(&self, window: u32) -> u64 {
        self.per_window.iter().find(|t| t.0 == window).unwrap().1
    }
}

/// Streams `samples` rows resampled from `from` through one monitor, `batch` rows per request,
/// and counts closed and flagged windows per length.
pub fn stream(
    sample: &Sample,
    from: &Rows,
    samples: usize,
    batch: usize,
    seed: u64,
) -> WindowTally {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut monitor = sample.monitor();
    let mut tally = WindowTally::new(&sample.profile);
    let mut idx = Vec::with_capacity(batch);
    let mut fed = 0;
    while fed < samples {
        idx.clear();
        idx.extend((0..batch.min(samples - fed)).map(|_| rng.usize(..from.rows)));
        let (i, o) = sample.request(from, &idx);
        tally.count(&monitor.observe(&i, &o, 0));
        fed += idx.len();
    }
    tally
}

/// Unshifted rows, then (at an offset not aligned to any window) rows from `shifted`, one per
/// request; returns the samples from the switch to the first flag (window or CUSUM alarm),
/// counting the flagging sample, or `None` within `horizon`. Also whether anything was flagged
/// before the switch.
pub fn switch_trial(
    sample: &Sample,
    shifted: &Rows,
    horizon: usize,
    rng: &mut fastrand::Rng,
) -> (Option<usize>, bool) {
    let mut monitor = sample.monitor();
    // Past the first long window, so the CUSUM and the windows are in their steady state.
    let before = 2048 + rng.usize(..2048);
    let mut early = false;
    for _ in 0..before {
        let (i, o) = sample.request(&sample.holdout, &[rng.usize(..sample.holdout.rows)]);
        early |= monitor.observe(&i, &o, 0).iter().any(|w| w.drifted);
    }
    for n in 1..=horizon {
        let (i, o) = sample.request(shifted, &[rng.usize(..shifted.rows)]);
        if monitor.observe(&i, &o, 0).iter().any(|w| w.drifted) {
            return (Some(n), early);
        }
    }
    (None, early)
}

/// `p`-quantile (nearest rank) of detection delays, `None` (undetected) counting as infinite.
pub fn delay_quantile(delays: &[Option<usize>], p: f64) -> Option<usize> {
    let mut d: Vec<usize> = delays.iter().map(|d| d.unwrap_or(usize::MAX)).collect();
    d.sort_unstable();
    let rank = ((p * d.len() as f64).ceil() as usize).clamp(1, d.len());
    Some(d[rank - 1]).filter(|&x| x != usize::MAX)
}
