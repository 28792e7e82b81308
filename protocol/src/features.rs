//! Features from tensors: which values of a model's inputs and outputs the drift monitor
//! watches, and how they are read out of a batch. Used by the agent on every request and by
//! the profile builder on the training data, so both see the same numbers.
//!
//! Inputs `[N]` and `[N, F]` give one feature per element of a row; inputs of rank ≥ 3
//! (`[N, C, ...]`) give a mean and a standard deviation per channel (see
//! [`crate::profile::FeatureSource`]). Outputs: the first float output shaped `[N, C]` with
//! `C ≥ 2` is taken as class probabilities; failing that, the first float output shaped `[N]`
//! or `[N, 1]` as a regression value.

use crate::drift::Prediction;
use crate::profile::{FeatureSource, PredictionProfile};
use crate::tensor::{Dim, ElementType, Tensor, TensorData, TensorSpec};

/// Why a batch could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    #[error("tensor {0:?} is missing")]
    Missing(String),
    #[error("tensor {name:?} has shape {shape:?}, expected {expected}")]
    Shape {
        name: String,
        shape: Vec<u64>,
        expected: String,
    },
    #[error("the batch sizes of the tensors differ")]
    BatchMismatch,
}

/// The features the drift monitor watches on inputs with these specs, with a name each
/// (`input[3]`, `image:mean[0]`, …). Symbolic dimensions other than the batch are refused:
/// the profile needs a fixed number of features.
pub fn feature_sources(inputs: &[TensorSpec]) -> Result<Vec<(FeatureSource, String)>, String> {
    let mut out = Vec::new();
    for (i, spec) in inputs.iter().enumerate() {
        let input = i as u32;
        let fixed = fixed_row_shape(spec)?;
        match fixed.len() {
            0 => out.push((
                FeatureSource::Element { input, element: 0 },
                spec.name.clone(),
            )),
            1 => {
                for e in 0..fixed[0] {
                    let element = u32::try_from(e).map_err(|_| too_many(spec))?;
                    out.push((
                        FeatureSource::Element { input, element },
                        format!("{}[{e}]", spec.name),
                    ));
                }
            }
            _ => {
                for c in 0..fixed[0] {
                    let channel = u32::try_from(c).map_err(|_| too_many(spec))?;
                    out.push((
                        FeatureSource::ChannelMean { input, channel },
                        format!("{}:mean[{c}]", spec.name),
                    ));
                    out.push((
                        FeatureSource::ChannelStd { input, channel },
                        format!("{}:std[{c}]", spec.name),
                    ));
                }
            }
        }
        if out.len() > crate::limits::MAX_PROFILE_FEATURES {
            return Err(too_many(spec));
        }
    }
    Ok(out)
}

fn too_many(spec: &TensorSpec) -> String {
    format!(
        "input {:?} has more than {} features",
        spec.name,
        crate::limits::MAX_PROFILE_FEATURES
    )
}

/// The fixed dimensions after the batch dimension.
fn fixed_row_shape(spec: &TensorSpec) -> Result<Vec<u64>, String> {
    if spec.shape.is_empty() {
        return Err(format!(
            "input {:?} has no batch dimension; drift monitoring needs [N, ...]",
            spec.name
        ));
    }
    spec.shape[1..]
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => Ok(*n),
            Dim::Symbolic(s) => Err(format!(
                "input {:?} has a symbolic dimension {s:?} besides the batch; drift monitoring \
                 needs fixed row shapes",
                spec.name
            )),
        })
        .collect()
}

#[derive(Debug, Clone)]
struct InputPlan {
    name: String,
    /// Elements per row.
    row_len: usize,
    /// Elements per channel (rank ≥ 3), else 1.
    per_channel: usize,
}

#[derive(Debug, Clone, Copy)]
enum Source {
    Element(usize),
    Mean(usize),
    Std(usize),
}

/// Reads the monitored feature values out of a batch of input tensors, row by row.
#[derive(Debug, Clone)]
pub struct FeatureExtractor {
    inputs: Vec<InputPlan>,
    /// Per feature: which input, and what of its row.
    sources: Vec<(usize, Source)>,
    /// Scratch: the current row of each input, widened to f64.
    rows: Vec<Vec<f64>>,
    values: Vec<f64>,
    /// Scratch: which of the given tensors is each input.
    bound: Vec<usize>,
}

impl FeatureExtractor {
    pub fn new(inputs: &[TensorSpec], sources: &[FeatureSource]) -> Result<Self, String> {
        let mut plans = Vec::new();
        for spec in inputs {
            let fixed = fixed_row_shape(spec)?;
            let row_len = fixed.iter().product::<u64>();
            let per_channel = if fixed.len() >= 2 {
                fixed[1..].iter().product::<u64>()
            } else {
                1
            };
            let row_len = usize::try_from(row_len)
                .ok()
                .filter(|&n| n <= (1 << 28))
                .ok_or_else(|| format!("input {:?} rows are too large", spec.name))?;
            plans.push(InputPlan {
                name: spec.name.clone(),
                row_len,
                per_channel: per_channel as usize,
            });
        }
        let resolved = sources
            .iter()
            .map(|s| {
                let input = s.input() as usize;
                let plan = plans
                    .get(input)
                    .ok_or_else(|| format!("feature refers to input {input}, which is missing"))?;
                let (source, last) = match *s {
                    FeatureSource::Element { element, .. } => {
                        (Source::Element(element as usize), element as usize)
                    }
                    FeatureSource::ChannelMean { channel, .. } => (
                        Source::Mean(channel as usize),
                        (channel as usize + 1) * plan.per_channel - 1,
                    ),
                    FeatureSource::ChannelStd { channel, .. } => (
                        Source::Std(channel as usize),
                        (channel as usize + 1) * plan.per_channel - 1,
                    ),
                };
                if last >= plan.row_len {
                    return Err(format!(
                        "feature {s:?} is outside input {:?}'s rows of {} elements",
                        plan.name, plan.row_len
                    ));
                }
                Ok((input, source))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(FeatureExtractor {
            rows: plans.iter().map(|p| vec![0.0; p.row_len]).collect(),
            inputs: plans,
            values: vec![0.0; resolved.len()],
            sources: resolved,
            bound: Vec::new(),
        })
    }

    pub fn features(&self) -> usize {
        self.sources.len()
    }

    /// Checks that the batch fits (every input present with the expected row size, one batch
    /// size) and returns its number of rows.
    pub fn rows(&mut self, tensors: &[Tensor]) -> Result<usize, ExtractError> {
        self.bound.clear();
        let mut batch = None;
        for plan in &self.inputs {
            let index = tensors
                .iter()
                .position(|t| t.name == plan.name)
                .ok_or_else(|| ExtractError::Missing(plan.name.clone()))?;
            let tensor = &tensors[index];
            let rows = tensor.shape.first().copied().unwrap_or(0) as usize;
            let per_row: u64 = tensor.shape.iter().skip(1).product();
            if tensor.shape.is_empty()
                || per_row as usize != plan.row_len
                || tensor.data.len() != rows * plan.row_len
            {
                return Err(ExtractError::Shape {
                    name: plan.name.clone(),
                    shape: tensor.shape.clone(),
                    expected: format!("[N, ...] with {} elements per row", plan.row_len),
                });
            }
            if *batch.get_or_insert(rows) != rows {
                return Err(ExtractError::BatchMismatch);
            }
            self.bound.push(index);
        }
        Ok(batch.unwrap_or(0))
    }

    /// Calls `visit` with the feature values of each row of the batch, in order, and returns
    /// the number of rows. Nothing is visited when the batch does not fit.
    pub fn for_each_row(
        &mut self,
        tensors: &[Tensor],
        mut visit: impl FnMut(&[f64]),
    ) -> Result<usize, ExtractError> {
        let rows = self.rows(tensors)?;
        for r in 0..rows {
            for ((&t, plan), row) in self.bound.iter().zip(&self.inputs).zip(&mut self.rows) {
                copy_row(&tensors[t].data, r * plan.row_len, row);
            }
            for (value, &(input, source)) in self.values.iter_mut().zip(&self.sources) {
                let row = &self.rows[input];
                *value = match source {
                    Source::Element(e) => row[e],
                    Source::Mean(c) | Source::Std(c) => {
                        let per = self.inputs[input].per_channel;
                        let channel = &row[c * per..(c + 1) * per];
                        let mean = channel.iter().sum::<f64>() / per as f64;
                        if let Source::Std(_) = source {
                            let var = channel.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>()
                                / per as f64;
                            var.sqrt()
                        } else {
                            mean
                        }
                    }
                };
            }
            visit(&self.values);
        }
        Ok(rows)
    }
}

/// Copies `out.len()` elements starting at `start`, widened to f64 (bool as 0/1).
fn copy_row(data: &TensorData, start: usize, out: &mut [f64]) {
    fn widen<T: Copy>(src: &[T], start: usize, out: &mut [f64], f: impl Fn(T) -> f64) {
        let len = out.len();
        for (o, &x) in out.iter_mut().zip(&src[start..start + len]) {
            *o = f(x);
        }
    }
    match data {
        TensorData::F32(v) => widen(v, start, out, f64::from),
        TensorData::F64(v) => widen(v, start, out, |x| x),
        TensorData::Bool(v) => widen(v, start, out, |b| f64::from(u8::from(b))),
        TensorData::U8(v) => widen(v, start, out, f64::from),
        TensorData::U16(v) => widen(v, start, out, f64::from),
        TensorData::U32(v) => widen(v, start, out, f64::from),
        TensorData::U64(v) => widen(v, start, out, |x| x as f64),
        TensorData::I8(v) => widen(v, start, out, f64::from),
        TensorData::I16(v) => widen(v, start, out, f64::from),
        TensorData::I32(v) => widen(v, start, out, f64::from),
        TensorData::I64(v) => widen(v, start, out, |x| x as f64),
    }
}

fn value_at(data: &TensorData, i: usize) -> f64 {
    let mut one = [0.0];
    copy_row(data, i, &mut one);
    one[0]
}

/// What the prediction monitor reads from a model's outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PredictionSource {
    /// Class probabilities `[N, classes]`.
    Probabilities { output: String, classes: usize },
    /// One value per row, `[N]` or `[N, 1]`.
    Value { output: String },
}

/// Picks the output the prediction monitor watches (see the module documentation), if any.
pub fn prediction_source(outputs: &[TensorSpec]) -> Option<PredictionSource> {
    let float = |s: &&TensorSpec| matches!(s.datatype, ElementType::F32 | ElementType::F64);
    let probabilities = outputs
        .iter()
        .filter(float)
        .find_map(|s| match s.shape.as_slice() {
            [_, Dim::Fixed(c)] if *c >= 2 => Some(PredictionSource::Probabilities {
                output: s.name.clone(),
                classes: *c as usize,
            }),
            _ => None,
        });
    probabilities.or_else(|| {
        outputs
            .iter()
            .filter(float)
            .find_map(|s| match s.shape.as_slice() {
                [_] | [_, Dim::Fixed(1)] => Some(PredictionSource::Value {
                    output: s.name.clone(),
                }),
                _ => None,
            })
    })
}

impl PredictionSource {
    /// The source a prediction profile was built from.
    pub fn of_profile(profile: &PredictionProfile) -> PredictionSource {
        match profile {
            PredictionProfile::Classifier {
                output,
                class_proportions,
                ..
            } => PredictionSource::Probabilities {
                output: output.clone(),
                classes: class_proportions.len(),
            },
            PredictionProfile::Regressor { output, .. } => PredictionSource::Value {
                output: output.clone(),
            },
        }
    }

    pub fn output(&self) -> &str {
        match self {
            PredictionSource::Probabilities { output, .. } | PredictionSource::Value { output } => {
                output
            }
        }
    }

    /// Calls `visit` with each row's prediction and returns the number of rows.
    pub fn for_each_row(
        &self,
        outputs: &[Tensor],
        mut visit: impl FnMut(Prediction),
    ) -> Result<usize, ExtractError> {
        let name = self.output();
        let tensor = outputs
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| ExtractError::Missing(name.to_string()))?;
        let rows = tensor.shape.first().copied().unwrap_or(0) as usize;
        let width = match self {
            PredictionSource::Probabilities { classes, .. } => *classes,
            PredictionSource::Value { .. } => 1,
        };
        let per_row: u64 = tensor.shape.iter().skip(1).product();
        if tensor.shape.is_empty() || per_row as usize != width || tensor.data.len() != rows * width
        {
            return Err(ExtractError::Shape {
                name: name.to_string(),
                shape: tensor.shape.clone(),
                expected: format!("[N, {width}]"),
            });
        }
        for r in 0..rows {
            visit(match self {
                PredictionSource::Probabilities { .. } => {
                    // Lowest index on ties; NaN never wins.
                    let (mut class, mut max_prob) = (0, f64::NAN);
                    for c in 0..width {
                        let p = value_at(&tensor.data, r * width + c);
                        if p > max_prob || (max_prob.is_nan() && !p.is_nan()) {
                            (class, max_prob) = (c, p);
                        }
                    }
                    Prediction::Class { class, max_prob }
                }
                PredictionSource::Value { .. } => Prediction::Value(value_at(&tensor.data, r)),
            });
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, shape: Vec<Dim>) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype: ElementType::F32,
            shape,
        }
    }

    #[test]
    fn images_give_per_channel_mean_and_std_and_tables_give_elements() {
        let n = || Dim::Symbolic("N".into());
        let inputs = [
            spec("table", vec![n(), Dim::Fixed(2)]),
            spec(
                "image",
                vec![n(), Dim::Fixed(2), Dim::Fixed(1), Dim::Fixed(2)],
            ),
        ];
        let sources = feature_sources(&inputs).unwrap();
        let names: Vec<&str> = sources.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "table[0]",
                "table[1]",
                "image:mean[0]",
                "image:std[0]",
                "image:mean[1]",
                "image:std[1]"
            ]
        );
        let only: Vec<FeatureSource> = sources.iter().map(|(s, _)| *s).collect();
        let mut extractor = FeatureExtractor::new(&inputs, &only).unwrap();
        let tensors = [
            Tensor {
                name: "image".into(),
                shape: vec![2, 2, 1, 2],
                data: TensorData::F32(vec![1.0, 3.0, 5.0, 5.0, 0.0, 0.0, 2.0, 6.0]),
            },
            Tensor {
                name: "table".into(),
                shape: vec![2, 2],
                data: TensorData::F32(vec![7.0, 8.0, 9.0, 10.0]),
            },
        ];
        let mut rows = Vec::new();
        let count = extractor
            .for_each_row(&tensors, |r| rows.push(r.to_vec()))
            .unwrap();
        assert_eq!(count, 2);
        assert_eq!(rows[0], [7.0, 8.0, 2.0, 1.0, 5.0, 0.0]);
        assert_eq!(rows[1], [9.0, 10.0, 0.0, 0.0, 4.0, 2.0]);

        let mut bad = tensors.clone();
        bad[1].shape = vec![1, 4];
        assert!(extractor
            .for_each_row(&bad, |_| panic!("nothing is visited"))
            .is_err());
        assert!(feature_sources(&[spec("x", vec![n(), Dim::Symbolic("M".into())])]).is_err());
    }

    #[test]
    fn predictions_are_the_argmax_and_its_probability() {
        let outputs = [
            spec("label", vec![Dim::Symbolic("N".into())]),
            spec(
                "probabilities",
                vec![Dim::Symbolic("N".into()), Dim::Fixed(3)],
            ),
        ];
        let source = prediction_source(&outputs).unwrap();
        assert_eq!(
            source,
            PredictionSource::Probabilities {
                output: "probabilities".into(),
                classes: 3
            }
        );
        let probs = Tensor {
            name: "probabilities".into(),
            shape: vec![2, 3],
            data: TensorData::F32(vec![0.2, 0.5, 0.3, 0.4, 0.4, 0.2]),
        };
        let mut seen = Vec::new();
        source.for_each_row(&[probs], |p| seen.push(p)).unwrap();
        assert_eq!(
            seen,
            [
                Prediction::Class {
                    class: 1,
                    max_prob: 0.5f32 as f64
                },
                Prediction::Class {
                    class: 0,
                    max_prob: 0.4f32 as f64
                },
            ]
        );
        let regressor = [spec("y", vec![Dim::Symbolic("N".into()), Dim::Fixed(1)])];
        assert_eq!(
            prediction_source(&regressor),
            Some(PredictionSource::Value { output: "y".into() })
        );
    }
}
