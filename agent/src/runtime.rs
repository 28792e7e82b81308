//! The inference runtime: ONNX models loaded and run with tract.
//!
//! A [`Plan`] is one optimised tract plan per model version, built from the input shapes the
//! manifest declares (a symbolic batch dimension such as `N` stays symbolic and is bound per
//! call). It is cheap to clone and shareable across threads, so a hot swap is just replacing
//! an `Arc`. [`inspect`] reads a model's declared signature; `fleetctl model sign` uses it so
//! that what the manifest declares is what this runtime will enforce.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fleet_protocol::tensor::{compare_outputs, Dim, Mismatch};
use fleet_protocol::{ElementType, SelfTest, Tensor, TensorData, TensorSpec};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

/// Name given to a batch dimension the ONNX file leaves unnamed (skl2onnx does).
pub const DEFAULT_BATCH_SYMBOL: &str = "N";

/// What went wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the ONNX model could not be loaded: {0}")]
    Load(String),
    #[error("the model is not supported: {0}")]
    Unsupported(String),
    #[error("the manifest does not match the model: {0}")]
    SpecMismatch(String),
    #[error("{0}")]
    BadInput(String),
    #[error("inference failed: {0}")]
    Inference(String),
}

/// A model's inputs and outputs, as declared by the ONNX file and inferred by tract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSignature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// Why a self-test did not pass.
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    #[error("self-test could not run: {0}")]
    Run(RuntimeError),
    #[error("self-test output differs: {0}")]
    Mismatch(Mismatch),
}

fn load_error(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Load(format!("{e:#}"))
}

fn element_type(dt: DatumType) -> Result<ElementType, RuntimeError> {
    Ok(match dt {
        DatumType::Bool => ElementType::Bool,
        DatumType::U8 => ElementType::U8,
        DatumType::U16 => ElementType::U16,
        DatumType::U32 => ElementType::U32,
        DatumType::U64 => ElementType::U64,
        DatumType::I8 => ElementType::I8,
        DatumType::I16 => ElementType::I16,
        DatumType::I32 => ElementType::I32,
        DatumType::I64 => ElementType::I64,
        DatumType::F32 => ElementType::F32,
        DatumType::F64 => ElementType::F64,
        // tract types some integer tensors (class labels after a Cast, shapes) as symbolic
        // dimensions; their values are plain integers.
        DatumType::TDim => ElementType::I64,
        other => {
            return Err(RuntimeError::Unsupported(format!(
                "element type {other:?} cannot be carried by the inference API"
            )))
        }
    })
}

fn datum_type(et: ElementType) -> DatumType {
    match et {
        ElementType::Bool => DatumType::Bool,
        ElementType::U8 => DatumType::U8,
        ElementType::U16 => DatumType::U16,
        ElementType::U32 => DatumType::U32,
        ElementType::U64 => DatumType::U64,
        ElementType::I8 => DatumType::I8,
        ElementType::I16 => DatumType::I16,
        ElementType::I32 => DatumType::I32,
        ElementType::I64 => DatumType::I64,
        ElementType::F32 => DatumType::F32,
        ElementType::F64 => DatumType::F64,
    }
}

fn read_model(onnx: &[u8]) -> Result<InferenceModel, RuntimeError> {
    // Output shapes in ONNX files are often stale or unnamed; tract infers better ones.
    tract_onnx::onnx()
        .with_ignore_output_shapes(true)
        .model_for_read(&mut &onnx[..])
        .map_err(load_error)
}

fn input_name(model: &InferenceModel, index: usize) -> Result<String, RuntimeError> {
    let outlet = model.input_outlets().map_err(load_error)?[index];
    Ok(model.node(outlet.node).name.clone())
}

fn output_name(model: &TypedModel, index: usize) -> Result<String, RuntimeError> {
    let outlet = model.output_outlets().map_err(load_error)?[index];
    Ok(model
        .outlet_label(outlet)
        .map(str::to_string)
        .unwrap_or_else(|| model.node(outlet.node).name.clone()))
}

/// The input signature the ONNX file declares; an unknown first dimension becomes the batch
/// symbol `N`, any other unknown dimension is refused.
fn declared_inputs(model: &InferenceModel) -> Result<Vec<TensorSpec>, RuntimeError> {
    let count = model.input_outlets().map_err(load_error)?.len();
    (0..count)
        .map(|i| {
            let name = input_name(model, i)?;
            let fact = model.input_fact(i).map_err(load_error)?;
            let dt = fact.datum_type.concretize().ok_or_else(|| {
                RuntimeError::Unsupported(format!("input {name:?} has no declared element type"))
            })?;
            if fact.shape.is_open() {
                return Err(RuntimeError::Unsupported(format!(
                    "input {name:?} has no declared rank"
                )));
            }
            let shape = fact
                .shape
                .dims()
                .enumerate()
                .map(|(axis, dim)| match dim.concretize() {
                    Some(d) => Ok(match d.as_i64() {
                        Some(n) if n >= 0 => Dim::Fixed(n as u64),
                        _ => Dim::Symbolic(d.to_string()),
                    }),
                    None if axis == 0 => Ok(Dim::Symbolic(DEFAULT_BATCH_SYMBOL.to_string())),
                    None => Err(RuntimeError::Unsupported(format!(
                        "input {name:?} has an unknown dimension at axis {axis}; only the batch \
                         axis may be left open"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(TensorSpec {
                name,
                datatype: element_type(dt)?,
                shape,
            })
        })
        .collect()
}

/// Fixes the model's inputs to `specs` (matched by name) and converts it to a typed model.
fn typed_with_inputs(
    mut model: InferenceModel,
    specs: &[TensorSpec],
) -> Result<TypedModel, RuntimeError> {
    let count = model.input_outlets().map_err(load_error)?.len();
    if count != specs.len() {
        return Err(RuntimeError::SpecMismatch(format!(
            "the model has {count} inputs, the manifest declares {}",
            specs.len()
        )));
    }
    for i in 0..count {
        let name = input_name(&model, i)?;
        let spec = specs.iter().find(|s| s.name == name).ok_or_else(|| {
            RuntimeError::SpecMismatch(format!(
                "the model's input {name:?} is not declared by the manifest"
            ))
        })?;
        let dims: TVec<TDim> = spec
            .shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => TDim::Val(*n as i64),
                Dim::Symbolic(s) => model.sym(s).into(),
            })
            .collect();
        let fact = InferenceFact::dt_shape(datum_type(spec.datatype), dims);
        model.set_input_fact(i, fact).map_err(load_error)?;
    }
    model.into_typed().map_err(load_error)
}

fn output_specs(model: &TypedModel) -> Result<Vec<TensorSpec>, RuntimeError> {
    let count = model.output_outlets().map_err(load_error)?.len();
    (0..count)
        .map(|i| {
            let fact = model.output_fact(i).map_err(load_error)?;
            let shape = fact
                .shape
                .iter()
                .map(|d| match d.as_i64() {
                    Some(n) if n >= 0 => Dim::Fixed(n as u64),
                    _ => Dim::Symbolic(d.to_string()),
                })
                .collect();
            Ok(TensorSpec {
                name: output_name(model, i)?,
                datatype: element_type(fact.datum_type)?,
                shape,
            })
        })
        .collect()
}

/// Reads a model's signature: inputs as declared (batch symbolic), outputs as tract infers them.
pub fn inspect(onnx: &[u8]) -> Result<ModelSignature, RuntimeError> {
    let model = read_model(onnx)?;
    let inputs = declared_inputs(&model)?;
    let typed = typed_with_inputs(model, &inputs)?;
    let outputs = output_specs(&typed)?;
    Ok(ModelSignature { inputs, outputs })
}

/// An optimised, runnable model. Clones share the plan (and its run-time estimate).
#[derive(Clone)]
pub struct Plan {
    signature: Arc<ModelSignature>,
    plan: Arc<TypedRunnableModel>,
    /// A running average of recent run times in nanoseconds (0 until the first run): lets the
    /// API run tiny models in place instead of paying for a hop to the blocking pool.
    typical_run_ns: Arc<AtomicU64>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("signature", &self.signature)
            .finish_non_exhaustive()
    }
}

impl Plan {
    /// Loads `onnx` with the input signature a manifest declares and optimises it.
    pub fn load(onnx: &[u8], inputs: &[TensorSpec]) -> Result<Plan, RuntimeError> {
        let typed = typed_with_inputs(read_model(onnx)?, inputs)?;
        let outputs = output_specs(&typed)?;
        let optimized = typed.into_optimized().map_err(load_error)?;
        let plan = optimized.into_runnable().map_err(load_error)?;
        Ok(Plan {
            signature: Arc::new(ModelSignature {
                inputs: inputs.to_vec(),
                outputs,
            }),
            plan,
            typical_run_ns: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The typical duration of one run, from the recent ones (the self-test's first). `None`
    /// before the plan ever ran.
    pub fn typical_run(&self) -> Option<std::time::Duration> {
        match self.typical_run_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(std::time::Duration::from_nanos(ns)),
        }
    }

    /// Folds one run's duration into the running average (weight 1/8, so one slow call
    /// does not flip the estimate).
    fn record_run(&self, ns: u64) {
        let ns = ns.max(1);
        let old = self.typical_run_ns.load(Ordering::Relaxed);
        let new = if old == 0 { ns } else { (old * 7 + ns) / 8 };
        // Lost updates under contention only make the estimate a little staler.
        self.typical_run_ns.store(new, Ordering::Relaxed);
    }

    pub fn signature(&self) -> &ModelSignature {
        &self.signature
    }

    /// Runs one inference. Inputs are matched to the model's by name and must have the
    /// declared type and a fitting shape; the error names what was expected.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        let mut values: TVec<TValue> = TVec::new();
        for spec in &self.signature.inputs {
            let given: Vec<&Tensor> = inputs.iter().filter(|t| t.name == spec.name).collect();
            let tensor = match given.as_slice() {
                [tensor] => *tensor,
                [] => {
                    return Err(RuntimeError::BadInput(format!(
                        "input {:?} ({} {}) is missing",
                        spec.name,
                        spec.datatype,
                        spec.shape_display()
                    )))
                }
                _ => {
                    return Err(RuntimeError::BadInput(format!(
                        "input {:?} is given more than once",
                        spec.name
                    )))
                }
            };
            if tensor.element_type() != spec.datatype {
                return Err(RuntimeError::BadInput(format!(
                    "input {:?} has datatype {}, expected {}",
                    spec.name,
                    tensor.element_type(),
                    spec.datatype
                )));
            }
            if !spec.accepts_shape(&tensor.shape) {
                return Err(RuntimeError::BadInput(format!(
                    "input {:?} has shape {:?}, expected {}",
                    spec.name,
                    tensor.shape,
                    spec.shape_display()
                )));
            }
            values.push(to_tract(tensor)?.into_tvalue());
        }
        if let Some(extra) = inputs
            .iter()
            .find(|t| !self.signature.inputs.iter().any(|s| s.name == t.name))
        {
            return Err(RuntimeError::BadInput(format!(
                "input {:?} is not an input of this model (expected {})",
                extra.name,
                self.signature
                    .inputs
                    .iter()
                    .map(|s| format!("{:?}", s.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let started = Instant::now();
        let outputs = self
            .plan
            .run(values)
            .map_err(|e| RuntimeError::Inference(format!("{e:#}")))?;
        self.record_run(started.elapsed().as_nanos() as u64);
        outputs
            .iter()
            .zip(&self.signature.outputs)
            .map(|(value, spec)| from_tract(&spec.name, value))
            .collect()
    }

    /// Runs a self-test case and compares the outputs within its tolerance.
    pub fn self_test(&self, case: &SelfTest) -> Result<(), SelfTestError> {
        let outputs = self.run(&case.inputs).map_err(SelfTestError::Run)?;
        compare_outputs(&case.outputs, &outputs, case.tolerance)
            .map_err(SelfTestError::Mismatch)?;
        Ok(())
    }
}

fn to_tract(tensor: &Tensor) -> Result<tract_onnx::prelude::Tensor, RuntimeError> {
    let shape: Vec<usize> = tensor
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| RuntimeError::BadInput(format!("input {:?} is too large", tensor.name)))?;
    let built = match &tensor.data {
        TensorData::Bool(v) => tract_onnx::prelude::Tensor::from_shape(&shape, v),
        TensorData::U8(v) => tract_onnx::prelude::Tensor::from_shape(&shape, v),
        TensorData::U16(v) => tract_onnx::prelude::Tensor::from_shape(&shape, v),
        TensorData::U32(v) => tract_onnx::prelude::Tensor::from_shape(&shape, v),
        TensorData::U64(v) => tract_onnx::prelude::Tensor::from_shape(&shape, v),
        TensorData::I8(v) => tract_onnx::prelude::Tensor::from_shape(&shape, v),
        TensorData::I16(v) => tract_onnx::prelude::Tensor::from_shape(&shape, v),
        TensorData::I32(v) => tract_onnx::prelude::Tensor::from_shape(&shape, v),
        TensorData::I64(v) => tract_onnx::prelude::Tensor::from_shape(&shape, v),
        TensorData::F32(v) => tract_onnx::prelude::Tensor::from_shape(&shape, v),
        TensorData::F64(v) => tract_onnx::prelude::Tensor::from_shape(&shape, v),
    };
    built.map_err(|e| RuntimeError::BadInput(format!("input {:?}: {e:#}", tensor.name)))
}

fn from_tract(name: &str, value: &TValue) -> Result<Tensor, RuntimeError> {
    fn flat<T: Datum + Copy>(value: &TValue) -> Result<Vec<T>, RuntimeError> {
        Ok(value
            .to_plain_array_view::<T>()
            .map_err(|e| RuntimeError::Inference(format!("{e:#}")))?
            .iter()
            .copied()
            .collect())
    }
    if value.datum_type() == DatumType::TDim {
        let as_i64 = value
            .cast_to::<i64>()
            .map_err(|e| RuntimeError::Inference(format!("output {name:?}: {e:#}")))?;
        return from_tract(name, &as_i64.into_owned().into_tvalue());
    }
    let data = match value.datum_type() {
        DatumType::Bool => TensorData::Bool(flat(value)?),
        DatumType::U8 => TensorData::U8(flat(value)?),
        DatumType::U16 => TensorData::U16(flat(value)?),
        DatumType::U32 => TensorData::U32(flat(value)?),
        DatumType::U64 => TensorData::U64(flat(value)?),
        DatumType::I8 => TensorData::I8(flat(value)?),
        DatumType::I16 => TensorData::I16(flat(value)?),
        DatumType::I32 => TensorData::I32(flat(value)?),
        DatumType::I64 => TensorData::I64(flat(value)?),
        DatumType::F32 => TensorData::F32(flat(value)?),
        DatumType::F64 => TensorData::F64(flat(value)?),
        other => {
            return Err(RuntimeError::Unsupported(format!(
                "output {name:?} has element type {other:?}"
            )))
        }
    };
    let shape = value.shape().iter().map(|&d| d as u64).collect();
    // Outputs are not checked for finiteness here: a model may legitimately emit NaN, and
    // the caller decides whether that is an error.
    Ok(Tensor {
        name: name.to_string(),
        shape,
        data,
    })
}
