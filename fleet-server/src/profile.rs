//! `fleetctl profile build`: a model's reference profile from its training data, with drift
//! thresholds calibrated on held-out data.
//!
//! The model runs with the agent's own runtime (tract) over both data sets; features and
//! predictions are read out of the tensors with `fleet_protocol::features`, and every window
//! the calibration scores goes through `fleet_protocol::drift` — the accumulator and the
//! scoring function the agent runs online — so the thresholds mean on the device exactly what
//! they meant here.
//!
//! # Calibration
//!
//! For each window length of a ladder (32, 64, …, up to the longest monitored window, plus the
//! monitored lengths), `bootstrap` windows are drawn with replacement from the held-out rows
//! and scored against the training reference. The thresholds are set by a max-statistic rule
//! rather than per-feature Bonferroni, so correlated features do not make them needlessly
//! loose: each score `s_j` (a feature's PSI, the class-histogram PSI, the max-probability PSI)
//! is standardised by its bootstrap median and spread (90th percentile − median), the
//! `1 − window_alarm_rate` quantile `c` of the largest standardised score per window is taken,
//! and `threshold_j = median_j + c · spread_j`. So at most that share of the bootstrap windows
//! has any score past its threshold.
//!
//! The CUSUM threshold `h` is the `1 − cusum_alarm_rate` quantile of the largest CUSUM
//! statistic (over features) within blocks of the longest window, on one long resampled stream.
//!
//! The held-out rows are few (wine: 45), and a window of 2048 resampled from them has almost no
//! sampling noise of its own while the held-out set differs from the training set by its own
//! sampling error — which is what fresh data from the same source does too. Scoring the
//! bootstrap windows against the training reference (not against the held-out data) puts that
//! difference into the thresholds, so unshifted data is not flagged for being a different sample.
//! The effect-size floor then keeps a long window from flagging a difference too small to
//! matter. The price: the thresholds are fitted to this held-out set; a larger one gives
//! thresholds that transfer better.

use std::fs;
use std::path::{Path, PathBuf};

use edge_agent::runtime::{self, Plan, RuntimeError};
use fleet_protocol::codec::{decode, encode_pretty};
use fleet_protocol::drift::{
    bin_count, bin_index, smoothed_proportions, CusumBank, Prediction, WindowAccumulator,
};
use fleet_protocol::features::{feature_sources, FeatureExtractor, PredictionSource};
use fleet_protocol::profile::{
    Calibration, CusumParams, FeatureProfile, PredictionProfile, WindowThresholds, MAX_EDGES,
};
use fleet_protocol::{
    ElementType, ModelName, ReferenceProfile, Sha256Digest, Tensor, TensorData, TensorSpec, V1,
};

/// What can go wrong building a profile.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {detail}")]
    BadData { path: PathBuf, detail: String },
    #[error("{path}: {cause}")]
    Runtime { path: PathBuf, cause: RuntimeError },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    BadArgument(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProfileError + '_ {
    move |cause| ProfileError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

fn bad(path: &Path, detail: impl Into<String>) -> ProfileError {
    ProfileError::BadData {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// A table of numbers: rows × columns, row-major; NaN where a value is missing.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
    /// Column names, from a CSV header.
    pub names: Option<Vec<String>>,
}

/// Reads `.npy` (float32 or float64, little-endian, C order, 1-D or 2-D) or `.csv` (a header
/// row, then numeric rows; an empty field or `nan` is a missing value).
pub fn read_matrix(path: &Path) -> Result<Matrix, ProfileError> {
    let bytes = fs::read(path).map_err(io(path))?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => parse_npy(&bytes).map_err(|d| bad(path, d)),
        Some("csv") => parse_csv(&bytes).map_err(|d| bad(path, d)),
        _ => Err(bad(path, "expected a .npy or .csv file")),
    }
}

/// Parses NumPy's `.npy` format (versions 1 to 3) for float32/float64 arrays.
pub fn parse_npy(bytes: &[u8]) -> Result<Matrix, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (no \\x93NUMPY magic)".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    let header = bytes
        .get(start..start + header_len)
        .ok_or("the .npy header is truncated")?;
    let header = std::str::from_utf8(header).map_err(|_| "the .npy header is not text")?;
    let field = |key: &str| -> Result<&str, String> {
        let at = header
            .find(&format!("'{key}'"))
            .ok_or_else(|| format!("the .npy header has no {key:?}"))?;
        let rest = &header[at + key.len() + 2..];
        let colon = rest.find(':').ok_or("malformed .npy header")?;
        Ok(rest[colon + 1..].trim_start())
    };
    let descr = field("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or("malformed descr in the .npy header")?;
    let width = match descr {
        "<f4" => 4,
        "<f8" => 8,
        other => {
            return Err(format!(
                "element type {other:?} is not supported: save float32 or float64 \
                 (little-endian), e.g. `np.save(path, x.astype(np.float32))`"
            ))
        }
    };
    if field("fortran_order")?.starts_with("True") {
        return Err(
            "Fortran-ordered arrays are not supported: save np.ascontiguousarray(x)".into(),
        );
    }
    let shape = field("shape")?;
    let shape = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("malformed shape in the .npy header")?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad dimension {s:?}"))
        })
        .collect::<Result<_, _>>()?;
    let (rows, cols) = match dims.as_slice() {
        [rows] => (*rows, 1),
        [rows, cols] => (*rows, *cols),
        _ => return Err(format!("expected a 1-D or 2-D array, found shape {dims:?}")),
    };
    let count = rows.checked_mul(cols).ok_or("the array is too large")?;
    let body = &bytes[start + header_len..];
    if body.len() != count * width {
        return Err(format!(
            "the header promises {count} values of {width} bytes, the file has {} data bytes",
            body.len()
        ));
    }
    let data = if width == 4 {
        body.chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect()
    } else {
        body.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("chunks of 8")))
            .collect()
    };
    Ok(Matrix {
        rows,
        cols,
        data,
        names: None,
    })
}

/// Parses CSV with a header row; fields are numbers, empty or `nan` (missing).
pub fn parse_csv(bytes: &[u8]) -> Result<Matrix, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the file is not UTF-8 text")?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines
        .next()
        .ok_or("the file is empty (a header row is expected)")?;
    let names: Vec<String> = header.split(',').map(|s| s.trim().to_string()).collect();
    let cols = names.len();
    let mut data = Vec::new();
    let mut rows = 0;
    for (n, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != cols {
            return Err(format!(
                "line {}: {} fields, the header has {cols}",
                n + 1,
                fields.len()
            ));
        }
        for field in fields {
            let value = if field.is_empty() || field.eq_ignore_ascii_case("nan") {
                f64::NAN
            } else {
                field
                    .parse::<f64>()
                    .map_err(|_| format!("line {}: {field:?} is not a number", n + 1))?
            };
            data.push(value);
        }
        rows += 1;
    }
    Ok(Matrix {
        rows,
        cols,
        data,
        names: Some(names),
    })
}

/// What `fleetctl profile build` was asked.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub model: PathBuf,
    pub train: PathBuf,
    pub holdout: PathBuf,
    /// Multiplies every data value before it reaches the model (digits-cnn takes pixels / 16).
    pub scale: f64,
    pub seed: u64,
    /// Bootstrap windows per window length, and CUSUM blocks.
    pub bootstrap: u32,
    /// The window lengths the device runs.
    pub windows: Vec<u32>,
    pub window_alarm_rate: f64,
    pub cusum_alarm_rate: f64,
    pub effect_floor: f64,
    pub cusum_k: f64,
    pub cusum_clip: f64,
}

impl BuildRequest {
    /// The documented defaults for everything but the files.
    pub fn new(model: PathBuf, train: PathBuf, holdout: PathBuf) -> Self {
        BuildRequest {
            model,
            train,
            holdout,
            scale: 1.0,
            seed: DEFAULT_SEED,
            bootstrap: DEFAULT_BOOTSTRAP,
            windows: vec![256, 2048],
            window_alarm_rate: 0.003,
            cusum_alarm_rate: 0.003,
            effect_floor: 0.1,
            cusum_k: 0.5,
            cusum_clip: 4.0,
        }
    }
}

pub const DEFAULT_SEED: u64 = 20_240_601;
pub const DEFAULT_BOOTSTRAP: u32 = 2000;

/// The smallest standardising spread of a score: a score that never varies in the bootstrap
/// (a constant feature) would otherwise get a threshold equal to its only value.
const MIN_SPREAD: f64 = 1e-3;

/// Rows per model run.
const BATCH: usize = 256;

/// A data set seen through the model: feature values (rows × features) and predictions.
#[derive(Debug, Clone)]
pub struct Observed {
    pub rows: usize,
    pub features: usize,
    pub values: Vec<f64>,
    pub predictions: Vec<Prediction>,
}

/// A model loaded for profiling.
pub struct ProfiledModel {
    pub onnx_sha256: Sha256Digest,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    plan: Plan,
    row_shape: Vec<u64>,
    sources: Vec<(fleet_protocol::profile::FeatureSource, String)>,
    prediction: Option<PredictionSource>,
}

impl ProfiledModel {
    pub fn load(path: &Path) -> Result<ProfiledModel, ProfileError> {
        let onnx = fs::read(path).map_err(io(path))?;
        let runtime_error = |cause| ProfileError::Runtime {
            path: path.to_path_buf(),
            cause,
        };
        let signature = runtime::inspect(&onnx).map_err(runtime_error)?;
        let plan = Plan::load(&onnx, &signature.inputs).map_err(runtime_error)?;
        let [input] = signature.inputs.as_slice() else {
            return Err(ProfileError::Unsupported(format!(
                "{}: the model has {} inputs; profiles are built from one data table, so only \
                 single-input models are supported",
                path.display(),
                signature.inputs.len()
            )));
        };
        if !matches!(input.datatype, ElementType::F32 | ElementType::F64) {
            return Err(ProfileError::Unsupported(format!(
                "{}: input {:?} is {}; only FP32 and FP64 inputs can be fed from data files",
                path.display(),
                input.name,
                input.datatype
            )));
        }
        let sources = feature_sources(&signature.inputs).map_err(ProfileError::Unsupported)?;
        let row_shape = input.shape[1..]
            .iter()
            .map(|d| d.fixed().unwrap_or(1))
            .collect();
        let prediction = runtime_prediction(&signature.outputs);
        Ok(ProfiledModel {
            onnx_sha256: Sha256Digest::of(&onnx),
            inputs: signature.inputs,
            outputs: signature.outputs,
            plan,
            row_shape,
            sources,
            prediction,
        })
    }

    /// Elements per row of the input.
    pub fn row_len(&self) -> usize {
        self.row_shape.iter().product::<u64>() as usize
    }

    pub fn prediction_source(&self) -> Option<&PredictionSource> {
        self.prediction.as_ref()
    }

    /// The model's inputs as tensors for rows `rows` of `data` (already scaled).
    pub fn input_tensors(
        &self,
        data: &Matrix,
        rows: std::ops::Range<usize>,
        scale: f64,
    ) -> Vec<Tensor> {
        let spec = &self.inputs[0];
        let n = rows.len();
        let values = &data.data[rows.start * data.cols..rows.end * data.cols];
        let mut shape = vec![n as u64];
        shape.extend_from_slice(&self.row_shape);
        let data = match spec.datatype {
            ElementType::F64 => TensorData::F64(values.iter().map(|x| x * scale).collect()),
            _ => TensorData::F32(values.iter().map(|x| (x * scale) as f32).collect()),
        };
        vec![Tensor {
            name: spec.name.clone(),
            shape,
            data,
        }]
    }

    /// Runs the model over every row of `data` and reads features and predictions.
    pub fn observe(
        &self,
        path: &Path,
        data: &Matrix,
        scale: f64,
        progress: &mut dyn FnMut(String),
    ) -> Result<Observed, ProfileError> {
        if data.cols != self.row_len() {
            return Err(bad(
                path,
                format!(
                    "{} columns, but the model's input {:?} {} takes {} values per row",
                    data.cols,
                    self.inputs[0].name,
                    self.inputs[0].shape_display(),
                    self.row_len()
                ),
            ));
        }
        if data.rows == 0 {
            return Err(bad(path, "no rows"));
        }
        let sources: Vec<_> = self.sources.iter().map(|(s, _)| *s).collect();
        let mut extractor =
            FeatureExtractor::new(&self.inputs, &sources).map_err(ProfileError::Unsupported)?;
        let mut values = Vec::with_capacity(data.rows * sources.len());
        let mut predictions = Vec::with_capacity(data.rows);
        let mut start = 0;
        while start < data.rows {
            let end = (start + BATCH).min(data.rows);
            let inputs = self.input_tensors(data, start..end, scale);
            let outputs = self
                .plan
                .run(&inputs)
                .map_err(|cause| ProfileError::Runtime {
                    path: path.to_path_buf(),
                    cause,
                })?;
            extractor
                .for_each_row(&inputs, |row| values.extend_from_slice(row))
                .map_err(|e| bad(path, e.to_string()))?;
            if let Some(source) = &self.prediction {
                source
                    .for_each_row(&outputs, |p| predictions.push(p))
                    .map_err(|e| bad(path, format!("model output: {e}")))?;
            }
            start = end;
            if data.rows > 4 * BATCH {
                progress(format!("{}: {end}/{} rows", path.display(), data.rows));
            }
        }
        Ok(Observed {
            rows: data.rows,
            features: sources.len(),
            values,
            predictions,
        })
    }
}

/// The prediction source for outputs as tract reports them: a probability output's class
/// count may be symbolic in the signature only when tract could not infer it, which the
/// sample models never hit; such outputs are not monitored.
fn runtime_prediction(outputs: &[TensorSpec]) -> Option<PredictionSource> {
    fleet_protocol::features::prediction_source(outputs)
}

/// Linear-interpolated quantile of sorted values (NumPy's default method).
fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Minimum, deciles and maximum with duplicates removed; then the smoothed proportions.
fn bins_of(sorted: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut edges: Vec<f64> = (0..MAX_EDGES)
        .map(|i| quantile_sorted(sorted, i as f64 / (MAX_EDGES - 1) as f64))
        .collect();
    edges.dedup();
    let mut counts = vec![0u64; bin_count(&edges)];
    for &x in sorted {
        counts[bin_index(&edges, x)] += 1;
    }
    (edges, smoothed_proportions(&counts))
}

fn moments(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

fn sorted_finite(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Builds the profile (without thresholds) from the training data as the model sees it.
pub fn reference(
    model: &ProfiledModel,
    train: &Observed,
    names: Option<&[String]>,
) -> Result<ReferenceProfile, ProfileError> {
    let mut features = Vec::with_capacity(train.features);
    for (f, (source, default_name)) in model.sources.iter().enumerate() {
        let column = (0..train.rows).map(|r| train.values[r * train.features + f]);
        let sorted = sorted_finite(column.clone());
        if sorted.is_empty() {
            return Err(ProfileError::BadArgument(format!(
                "feature {f} ({default_name}) has no finite value in the training data"
            )));
        }
        let (edges, proportions) = bins_of(&sorted);
        let (mean, std) = moments(&sorted);
        let name = match (names, source) {
            (Some(names), fleet_protocol::profile::FeatureSource::Element { element, .. }) => names
                .get(*element as usize)
                .cloned()
                .unwrap_or_else(|| default_name.clone()),
            _ => default_name.clone(),
        };
        features.push(FeatureProfile {
            name: Some(name),
            source: *source,
            edges,
            proportions,
            mean,
            std,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            missing_rate: (train.rows - sorted.len()) as f64 / train.rows as f64,
        });
    }
    let prediction = match &model.prediction {
        None => None,
        Some(PredictionSource::Probabilities { output, classes }) => {
            let mut counts = vec![0u64; *classes];
            let mut max_probs = Vec::with_capacity(train.rows);
            for p in &train.predictions {
                if let Prediction::Class { class, max_prob } = *p {
                    counts[class] += 1;
                    max_probs.push(max_prob);
                }
            }
            let sorted = sorted_finite(max_probs.into_iter());
            if sorted.is_empty() {
                return Err(ProfileError::BadArgument(
                    "the model's probabilities are never finite on the training data".into(),
                ));
            }
            let (max_prob_edges, max_prob_proportions) = bins_of(&sorted);
            Some(PredictionProfile::Classifier {
                output: output.clone(),
                class_proportions: smoothed_proportions(&counts),
                max_prob_edges,
                max_prob_proportions,
            })
        }
        Some(PredictionSource::Value { output }) => {
            let sorted = sorted_finite(train.predictions.iter().filter_map(|p| match p {
                Prediction::Value(x) => Some(*x),
                Prediction::Class { .. } => None,
            }));
            if sorted.is_empty() {
                return Err(ProfileError::BadArgument(
                    "the model's output is never finite on the training data".into(),
                ));
            }
            let (edges, proportions) = bins_of(&sorted);
            let (mean, std) = moments(&sorted);
            Some(PredictionProfile::Regressor {
                output: output.clone(),
                edges,
                proportions,
                mean,
                std,
            })
        }
    };
    Ok(ReferenceProfile {
        v: V1,
        model_sha256: model.onnx_sha256,
        inputs: model.inputs.clone(),
        rows: train.rows as u64,
        features,
        prediction,
        windows: Vec::new(),
        max_window_ms: 3_600_000,
        thresholds: Vec::new(),
        cusum: CusumParams {
            k: 0.5,
            h: f64::INFINITY,
            clip: 4.0,
        },
        calibration: Calibration {
            holdout_rows: 0,
            bootstrap: 0,
            seed: 0,
            window_alarm_rate: 0.0,
            cusum_alarm_rate: 0.0,
        },
    })
}

/// The calibrated window lengths: powers of two from 32 up to the longest monitored window,
/// and the monitored lengths themselves.
pub fn ladder(windows: &[u32]) -> Vec<u32> {
    let longest = windows.iter().copied().max().unwrap_or(0);
    let mut out: Vec<u32> = (5..32)
        .map(|p| 1u32 << p)
        .take_while(|&n| n <= longest)
        .chain(windows.iter().copied())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The order statistic that leaves at most `rate` of `values` strictly above it.
fn upper_quantile(values: &mut [f64], rate: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let allowed = (rate * n as f64).floor() as usize;
    values[n - 1 - allowed.min(n - 1)]
}

/// Calibrates `profile`'s thresholds and CUSUM on held-out data (see the module
/// documentation), deterministically from `request.seed`.
pub fn calibrate(
    profile: &mut ReferenceProfile,
    holdout: &Observed,
    request: &BuildRequest,
    progress: &mut dyn FnMut(String),
) -> Result<(), ProfileError> {
    if request.bootstrap < 100 {
        return Err(ProfileError::BadArgument(
            "--bootstrap must be at least 100".into(),
        ));
    }
    let mut windows = request.windows.clone();
    windows.sort_unstable();
    windows.dedup();
    if windows.first().is_none_or(|&w| w == 0) {
        return Err(ProfileError::BadArgument(
            "window lengths must be positive".into(),
        ));
    }
    let rates_ok = |r: f64| r > 0.0 && r < 0.5;
    if !rates_ok(request.window_alarm_rate) || !rates_ok(request.cusum_alarm_rate) {
        return Err(ProfileError::BadArgument(
            "alarm rates must be between 0 and 0.5".into(),
        ));
    }
    profile.windows = windows.clone();
    profile.thresholds = Vec::new();
    profile.cusum = CusumParams {
        k: request.cusum_k,
        h: f64::INFINITY,
        clip: request.cusum_clip,
    };
    let model = ModelName::new("calibration").expect("a valid name");
    let mut rng = fastrand::Rng::with_seed(request.seed);
    let features = profile.features.len();
    let has_prediction = profile.prediction.is_some();
    let classifier = matches!(
        profile.prediction,
        Some(PredictionProfile::Classifier { .. })
    );
    let columns = features + usize::from(has_prediction) + usize::from(classifier);
    let b = request.bootstrap as usize;
    let mut acc = WindowAccumulator::new(profile);
    let mut weights = vec![0u64; holdout.rows];
    let mut touched = Vec::new();
    let mut thresholds = Vec::new();
    for &len in &ladder(&windows) {
        // scores[w * columns + j]
        let mut scores = vec![0.0; b * columns];
        for w in 0..b {
            touched.clear();
            for _ in 0..len {
                let r = rng.usize(..holdout.rows);
                if weights[r] == 0 {
                    touched.push(r);
                }
                weights[r] += 1;
            }
            acc.clear();
            acc.add_samples(u64::from(len), 0);
            for &r in &touched {
                let weight = std::mem::take(&mut weights[r]);
                let row = &holdout.values[r * features..(r + 1) * features];
                for (f, &x) in row.iter().enumerate() {
                    acc.add_weighted(f, x, weight);
                }
                if has_prediction {
                    acc.add_prediction(holdout.predictions[r], weight);
                }
            }
            let window = acc.window(profile, &model, 0, len, 0);
            let out = &mut scores[w * columns..(w + 1) * columns];
            for (o, fw) in out.iter_mut().zip(&window.features) {
                *o = fw.psi;
            }
            if let Some(p) = &window.prediction {
                out[features] = p.psi;
                if classifier {
                    out[features + 1] = p.max_prob_psi;
                }
            }
        }
        let mut centre = vec![0.0; columns];
        let mut spread = vec![0.0; columns];
        let mut column = vec![0.0; b];
        for j in 0..columns {
            for (w, c) in column.iter_mut().enumerate() {
                *c = scores[w * columns + j];
            }
            column.sort_by(f64::total_cmp);
            centre[j] = quantile_sorted(&column, 0.5);
            spread[j] = (quantile_sorted(&column, 0.9) - centre[j]).max(MIN_SPREAD);
        }
        let mut largest: Vec<f64> = (0..b)
            .map(|w| {
                (0..columns)
                    .map(|j| (scores[w * columns + j] - centre[j]) / spread[j])
                    .fold(f64::NEG_INFINITY, f64::max)
            })
            .collect();
        let c = upper_quantile(&mut largest, request.window_alarm_rate).max(0.0);
        let threshold = |j: usize| centre[j] + c * spread[j];
        thresholds.push(WindowThresholds {
            window: len,
            psi: (0..features).map(threshold).collect(),
            effect_floor: request.effect_floor,
            prediction_psi: if has_prediction {
                threshold(features)
            } else {
                0.0
            },
            max_prob_psi: if classifier {
                threshold(features + 1)
            } else {
                0.0
            },
        });
        progress(format!(
            "calibrated windows of {len}: {b} bootstrap windows"
        ));
    }
    profile.thresholds = thresholds;

    // The CUSUM: one long resampled stream, cut into blocks of the longest window; the first
    // block lets the sums settle from zero and is not counted.
    let block = *windows.last().expect("not empty") as usize;
    let mut bank = CusumBank::new(profile);
    let mut block_max = Vec::with_capacity(b);
    for blk in 0..=b {
        let mut largest = 0.0f64;
        for _ in 0..block {
            let r = rng.usize(..holdout.rows);
            let row = &holdout.values[r * features..(r + 1) * features];
            for (f, &x) in row.iter().enumerate() {
                largest = largest.max(bank.update_statistic(f, x));
            }
        }
        if blk > 0 {
            block_max.push(largest);
        }
    }
    let h = upper_quantile(&mut block_max, request.cusum_alarm_rate);
    // A little above the largest allowed block maximum, since the alarm is `statistic > h`
    // and h must be positive even for data that never moves.
    profile.cusum.h = (h * 1.0001).max(request.cusum_clip);
    progress(format!(
        "calibrated the CUSUM: h = {:.3} over {b} blocks of {block}",
        profile.cusum.h
    ));
    profile.calibration = Calibration {
        holdout_rows: holdout.rows as u64,
        bootstrap: request.bootstrap,
        seed: request.seed,
        window_alarm_rate: request.window_alarm_rate,
        cusum_alarm_rate: request.cusum_alarm_rate,
    };
    Ok(())
}

/// Everything `fleetctl profile build` does: load, run, summarise, calibrate. The result has
/// passed the protocol's own validation.
pub fn build_profile(
    request: &BuildRequest,
    progress: &mut dyn FnMut(String),
) -> Result<ReferenceProfile, ProfileError> {
    if !(request.scale.is_finite() && request.scale != 0.0) {
        return Err(ProfileError::BadArgument(
            "--scale must be finite and not 0".into(),
        ));
    }
    let model = ProfiledModel::load(&request.model)?;
    let train_data = read_matrix(&request.train)?;
    let holdout_data = read_matrix(&request.holdout)?;
    progress(format!(
        "{}: {} rows; {}: {} rows; {} features",
        request.train.display(),
        train_data.rows,
        request.holdout.display(),
        holdout_data.rows,
        model.sources.len()
    ));
    let train = model.observe(&request.train, &train_data, request.scale, progress)?;
    let holdout = model.observe(&request.holdout, &holdout_data, request.scale, progress)?;
    let mut profile = reference(&model, &train, train_data.names.as_deref())?;
    calibrate(&mut profile, &holdout, request, progress)?;
    // Whatever is written must also load on the device.
    let bytes = profile_bytes(&profile);
    decode::<ReferenceProfile>(&bytes)
        .map_err(|e| ProfileError::BadArgument(format!("the built profile is invalid: {e}")))?;
    Ok(profile)
}

/// The profile file's exact bytes: indented JSON with a final newline. Deterministic: fields in
/// declaration order, floats in their shortest round-trip form.
pub fn profile_bytes(profile: &ReferenceProfile) -> Vec<u8> {
    let mut bytes = encode_pretty(profile);
    bytes.push(b'\n');
    bytes
}

/// Reads and validates a profile file; returns it with its exact bytes.
pub fn read_profile(path: &Path) -> Result<(ReferenceProfile, Vec<u8>), ProfileError> {
    let bytes = fs::read(path).map_err(io(path))?;
    let profile = decode::<ReferenceProfile>(&bytes)
        .map_err(|e| bad(path, format!("not a reference profile: {e}")))?;
    Ok((profile, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_versions_types_and_refusals() {
        fn npy(descr: &str, shape: &str, body: &[u8]) -> Vec<u8> {
            let mut header =
                format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
            while (10 + header.len() + 1) % 64 != 0 {
                header.push(' ');
            }
            header.push('\n');
            let mut out = b"\x93NUMPY\x01\x00".to_vec();
            out.extend_from_slice(&(header.len() as u16).to_le_bytes());
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(body);
            out
        }
        let body: Vec<u8> = [1.5f32, -2.0, 3.25, 4.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let m = parse_npy(&npy("<f4", "(2, 2)", &body)).unwrap();
        assert_eq!((m.rows, m.cols), (2, 2));
        assert_eq!(m.data, [1.5, -2.0, 3.25, 4.0]);
        let body: Vec<u8> = [1.0f64, 2.0, 3.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let m = parse_npy(&npy("<f8", "(3,)", &body)).unwrap();
        assert_eq!((m.rows, m.cols), (3, 1));
        let e = parse_npy(&npy("<i8", "(3,)", &body)).unwrap_err();
        assert!(e.contains("float32"), "{e}");
        let e = parse_npy(&npy("<f8", "(4,)", &body)).unwrap_err();
        assert!(e.contains("data bytes"), "{e}");
        assert!(parse_npy(b"PK\x03\x04").is_err());
    }

    #[test]
    fn csv_with_missing_values() {
        let m = parse_csv(b"a,b\n1,2\n,nan\n3.5, 4\n").unwrap();
        assert_eq!((m.rows, m.cols), (3, 2));
        assert!(m.data[2].is_nan() && m.data[3].is_nan());
        assert_eq!(m.data[4..], [3.5, 4.0]);
        assert_eq!(m.names.unwrap(), ["a", "b"]);
        assert!(parse_csv(b"a,b\n1\n").unwrap_err().contains("line 2"));
        assert!(parse_csv(b"a\nx\n").unwrap_err().contains("not a number"));
    }

    #[test]
    fn ladder_and_quantiles() {
        assert_eq!(ladder(&[256, 2048]), [32, 64, 128, 256, 512, 1024, 2048]);
        assert_eq!(ladder(&[100]), [32, 64, 100]);
        let mut v: Vec<f64> = (0..1000).map(f64::from).collect();
        // At most 0.3 % (3 values) strictly above.
        assert_eq!(upper_quantile(&mut v, 0.003), 996.0);
        assert_eq!(quantile_sorted(&[0.0, 10.0], 0.25), 2.5);
    }
}
