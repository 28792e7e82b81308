//! Tensors as they travel in JSON, and the declared signature of a model's inputs and outputs.
//!
//! The JSON form is the Open Inference Protocol's (KServe v2): `name`, `datatype` (`"FP32"`,
//! `"INT64"`, …), `shape` and a flat row-major `data` array. Self-test vectors in manifests use
//! it, and so does the agent's local inference API.

use std::fmt;

use serde::de::Error as _;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize};

use crate::limits;

/// Element types, named as the Open Inference Protocol names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ElementType {
    #[serde(rename = "BOOL")]
    Bool,
    #[serde(rename = "UINT8")]
    U8,
    #[serde(rename = "UINT16")]
    U16,
    #[serde(rename = "UINT32")]
    U32,
    #[serde(rename = "UINT64")]
    U64,
    #[serde(rename = "INT8")]
    I8,
    #[serde(rename = "INT16")]
    I16,
    #[serde(rename = "INT32")]
    I32,
    #[serde(rename = "INT64")]
    I64,
    #[serde(rename = "FP32")]
    F32,
    #[serde(rename = "FP64")]
    F64,
}

impl ElementType {
    pub const ALL: [ElementType; 11] = [
        ElementType::Bool,
        ElementType::U8,
        ElementType::U16,
        ElementType::U32,
        ElementType::U64,
        ElementType::I8,
        ElementType::I16,
        ElementType::I32,
        ElementType::I64,
        ElementType::F32,
        ElementType::F64,
    ];

    /// The Open Inference Protocol name, for example `FP32`.
    pub fn as_str(self) -> &'static str {
        match self {
            ElementType::Bool => "BOOL",
            ElementType::U8 => "UINT8",
            ElementType::U16 => "UINT16",
            ElementType::U32 => "UINT32",
            ElementType::U64 => "UINT64",
            ElementType::I8 => "INT8",
            ElementType::I16 => "INT16",
            ElementType::I32 => "INT32",
            ElementType::I64 => "INT64",
            ElementType::F32 => "FP32",
            ElementType::F64 => "FP64",
        }
    }

    pub fn parse(name: &str) -> Option<ElementType> {
        ElementType::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

impl fmt::Display for ElementType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One dimension of a declared shape: a fixed size, or a symbol such as the batch size `N`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(u64),
    Symbolic(String),
}

impl Dim {
    pub fn fixed(&self) -> Option<u64> {
        match self {
            Dim::Fixed(n) => Some(*n),
            Dim::Symbolic(_) => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(s) => f.write_str(s),
        }
    }
}

/// A declared input or output of a model.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: ElementType,
    pub shape: Vec<Dim>,
}

impl TensorSpec {
    /// Whether a concrete shape fits this declaration (fixed dimensions equal, symbolic ones
    /// anything).
    pub fn accepts_shape(&self, shape: &[u64]) -> bool {
        self.shape.len() == shape.len()
            && self
                .shape
                .iter()
                .zip(shape)
                .all(|(dim, &n)| dim.fixed().is_none_or(|f| f == n))
    }

    /// The shape written as `[N, 64]`, for error messages.
    pub fn shape_display(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(Dim::to_string).collect();
        format!("[{}]", dims.join(", "))
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > 256 {
            return Err(format!(
                "tensor name {:?} must be 1 to 256 bytes",
                self.name
            ));
        }
        if self.shape.len() > limits::MAX_RANK {
            return Err(format!(
                "tensor {:?} has rank {}; at most {} is supported",
                self.name,
                self.shape.len(),
                limits::MAX_RANK
            ));
        }
        for dim in &self.shape {
            if let Dim::Symbolic(s) = dim {
                if s.is_empty() || s.len() > 64 {
                    return Err(format!(
                        "tensor {:?} has a symbolic dimension {s:?} that is empty or too long",
                        self.name
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The elements of a tensor, flat and row-major, one variant per element type.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Bool(Vec<bool>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl TensorData {
    pub fn element_type(&self) -> ElementType {
        match self {
            TensorData::Bool(_) => ElementType::Bool,
            TensorData::U8(_) => ElementType::U8,
            TensorData::U16(_) => ElementType::U16,
            TensorData::U32(_) => ElementType::U32,
            TensorData::U64(_) => ElementType::U64,
            TensorData::I8(_) => ElementType::I8,
            TensorData::I16(_) => ElementType::I16,
            TensorData::I32(_) => ElementType::I32,
            TensorData::I64(_) => ElementType::I64,
            TensorData::F32(_) => ElementType::F32,
            TensorData::F64(_) => ElementType::F64,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TensorData::Bool(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::U16(v) => v.len(),
            TensorData::U32(v) => v.len(),
            TensorData::U64(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::I16(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every element widened to f64 (exact for all types but 64-bit integers beyond 2^53,
    /// which only matters for tolerance comparisons of absurdly large integers).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            TensorData::Bool(v) => v.iter().map(|&b| f64::from(u8::from(b))).collect(),
            TensorData::U8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::U16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::U32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::U64(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::I8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::I16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::I32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::F64(v) => v.clone(),
        }
    }

    fn is_float(&self) -> bool {
        matches!(self, TensorData::F32(_) | TensorData::F64(_))
    }

    /// Builds data of type `datatype` from JSON values, naming the first element that does
    /// not fit.
    fn from_json(datatype: ElementType, values: &[serde_json::Value]) -> Result<Self, String> {
        fn collect<T>(
            values: &[serde_json::Value],
            datatype: ElementType,
            convert: impl Fn(&serde_json::Value) -> Option<T>,
        ) -> Result<Vec<T>, String> {
            values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    convert(v)
                        .ok_or_else(|| format!("element {i} ({v}) is not a valid {datatype} value"))
                })
                .collect()
        }
        fn int<T: TryFrom<i64> + TryFrom<u64>>(v: &serde_json::Value) -> Option<T> {
            if let Some(i) = v.as_i64() {
                T::try_from(i).ok()
            } else {
                v.as_u64().and_then(|u| T::try_from(u).ok())
            }
        }
        Ok(match datatype {
            ElementType::Bool => TensorData::Bool(collect(values, datatype, |v| v.as_bool())?),
            ElementType::U8 => TensorData::U8(collect(values, datatype, int)?),
            ElementType::U16 => TensorData::U16(collect(values, datatype, int)?),
            ElementType::U32 => TensorData::U32(collect(values, datatype, int)?),
            ElementType::U64 => TensorData::U64(collect(values, datatype, int)?),
            ElementType::I8 => TensorData::I8(collect(values, datatype, int)?),
            ElementType::I16 => TensorData::I16(collect(values, datatype, int)?),
            ElementType::I32 => TensorData::I32(collect(values, datatype, int)?),
            ElementType::I64 => TensorData::I64(collect(values, datatype, int)?),
            // The f64 → f32 narrowing is exact for any decimal written from an f32.
            ElementType::F32 => {
                TensorData::F32(collect(values, datatype, |v| v.as_f64().map(|f| f as f32))?)
            }
            ElementType::F64 => TensorData::F64(collect(values, datatype, |v| v.as_f64())?),
        })
    }
}

/// A named tensor with a concrete shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<u64>,
    pub data: TensorData,
}

/// Why a tensor is not well formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error("tensor {name:?} has shape {shape:?} ({expected} elements) but {found} data elements")]
    ShapeMismatch {
        name: String,
        shape: Vec<u64>,
        expected: u128,
        found: usize,
    },
    #[error("tensor {name:?} has {elements} elements; at most {max} are accepted in JSON")]
    TooLarge {
        name: String,
        elements: u128,
        max: usize,
    },
    #[error("tensor {name:?} has a non-finite value at element {index}; JSON cannot carry it")]
    NotFinite { name: String, index: usize },
}

impl Tensor {
    /// Builds a tensor and checks that `shape` and `data` agree.
    pub fn new(
        name: impl Into<String>,
        shape: Vec<u64>,
        data: TensorData,
    ) -> Result<Self, TensorError> {
        let tensor = Tensor {
            name: name.into(),
            shape,
            data,
        };
        tensor.check()?;
        Ok(tensor)
    }

    pub fn element_type(&self) -> ElementType {
        self.data.element_type()
    }

    /// The number of elements the shape calls for, saturating: a hostile shape such as four
    /// dimensions of 2^32 must read as "too many", never wrap around to a small number.
    pub fn shape_elements(&self) -> u128 {
        self.shape
            .iter()
            .try_fold(1u128, |n, &d| n.checked_mul(u128::from(d)))
            .unwrap_or(u128::MAX)
    }

    /// Shape and data agree, the size is within the JSON bound and floats are finite.
    pub fn check(&self) -> Result<(), TensorError> {
        let expected = self.shape_elements();
        if expected > limits::MAX_JSON_TENSOR_ELEMENTS as u128 {
            return Err(TensorError::TooLarge {
                name: self.name.clone(),
                elements: expected,
                max: limits::MAX_JSON_TENSOR_ELEMENTS,
            });
        }
        if expected != self.data.len() as u128 {
            return Err(TensorError::ShapeMismatch {
                name: self.name.clone(),
                shape: self.shape.clone(),
                expected,
                found: self.data.len(),
            });
        }
        let first_non_finite = match &self.data {
            TensorData::F32(v) => v.iter().position(|x| !x.is_finite()),
            TensorData::F64(v) => v.iter().position(|x| !x.is_finite()),
            _ => None,
        };
        if let Some(index) = first_non_finite {
            return Err(TensorError::NotFinite {
                name: self.name.clone(),
                index,
            });
        }
        Ok(())
    }
}

impl Serialize for Tensor {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Tensor", 4)?;
        s.serialize_field("name", &self.name)?;
        s.serialize_field("datatype", &self.element_type())?;
        s.serialize_field("shape", &self.shape)?;
        match &self.data {
            TensorData::Bool(v) => s.serialize_field("data", v)?,
            TensorData::U8(v) => s.serialize_field("data", v)?,
            TensorData::U16(v) => s.serialize_field("data", v)?,
            TensorData::U32(v) => s.serialize_field("data", v)?,
            TensorData::U64(v) => s.serialize_field("data", v)?,
            TensorData::I8(v) => s.serialize_field("data", v)?,
            TensorData::I16(v) => s.serialize_field("data", v)?,
            TensorData::I32(v) => s.serialize_field("data", v)?,
            TensorData::I64(v) => s.serialize_field("data", v)?,
            TensorData::F32(v) => s.serialize_field("data", v)?,
            TensorData::F64(v) => s.serialize_field("data", v)?,
        }
        s.end()
    }
}

impl<'de> Deserialize<'de> for Tensor {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct RawTensor {
            name: String,
            datatype: String,
            shape: Vec<u64>,
            data: Vec<serde_json::Value>,
        }
        let raw = RawTensor::deserialize(deserializer)?;
        let datatype = ElementType::parse(&raw.datatype).ok_or_else(|| {
            D::Error::custom(format!(
                "tensor {:?} has unknown datatype {:?}; expected one of {}",
                raw.name,
                raw.datatype,
                ElementType::ALL.map(ElementType::as_str).join(", ")
            ))
        })?;
        let data = TensorData::from_json(datatype, &raw.data)
            .map_err(|e| D::Error::custom(format!("tensor {:?}: {e}", raw.name)))?;
        Tensor::new(raw.name, raw.shape, data).map_err(D::Error::custom)
    }
}

/// How close an actual output must be to the expected one: `|a − e| ≤ abs + rel·|e|` for
/// floating-point elements (as numpy's `allclose`); integer and boolean elements must be equal.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    pub abs: f64,
    pub rel: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance {
            abs: 1e-4,
            rel: 1e-3,
        }
    }
}

/// The first difference found between an expected and an actual tensor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Mismatch {
    #[error("output {name:?} is missing")]
    Missing { name: String },
    #[error("output {name:?} has type {found}, expected {expected}")]
    Type {
        name: String,
        expected: ElementType,
        found: ElementType,
    },
    #[error("output {name:?} has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("output {name:?} element {index} is {found}, expected {expected} (tolerance abs {abs}, rel {rel})")]
    Value {
        name: String,
        index: usize,
        expected: f64,
        found: f64,
        abs: f64,
        rel: f64,
    },
}

/// Compares `actual` outputs with `expected` ones, matched by name.
pub fn compare_outputs(
    expected: &[Tensor],
    actual: &[Tensor],
    tolerance: Tolerance,
) -> Result<(), Mismatch> {
    for want in expected {
        let got = actual
            .iter()
            .find(|t| t.name == want.name)
            .ok_or_else(|| Mismatch::Missing {
                name: want.name.clone(),
            })?;
        if got.element_type() != want.element_type() {
            return Err(Mismatch::Type {
                name: want.name.clone(),
                expected: want.element_type(),
                found: got.element_type(),
            });
        }
        if got.shape != want.shape {
            return Err(Mismatch::Shape {
                name: want.name.clone(),
                expected: want.shape.clone(),
                found: got.shape.clone(),
            });
        }
        let float = want.data.is_float();
        let pairs = want
            .data
            .to_f64_vec()
            .into_iter()
            .zip(got.data.to_f64_vec());
        for (index, (e, a)) in pairs.enumerate() {
            let ok = if float {
                (a - e).abs() <= tolerance.abs + tolerance.rel * e.abs()
            } else {
                a == e
            };
            if !ok {
                return Err(Mismatch::Value {
                    name: want.name.clone(),
                    index,
                    expected: e,
                    found: a,
                    abs: tolerance.abs,
                    rel: tolerance.rel,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_form_is_the_open_inference_protocol_one() {
        let t = Tensor::new("input", vec![1, 2], TensorData::F32(vec![0.5, -1.25])).unwrap();
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(
            json,
            r#"{"name":"input","datatype":"FP32","shape":[1,2],"data":[0.5,-1.25]}"#
        );
        assert_eq!(serde_json::from_str::<Tensor>(&json).unwrap(), t);
    }

    #[test]
    fn decoding_names_what_is_wrong() {
        let err = |json: &str| {
            serde_json::from_str::<Tensor>(json)
                .unwrap_err()
                .to_string()
        };
        assert!(
            err(r#"{"name":"x","datatype":"FP16","shape":[1],"data":[1]}"#)
                .contains("unknown datatype \"FP16\"")
        );
        assert!(
            err(r#"{"name":"x","datatype":"INT8","shape":[1],"data":[300]}"#)
                .contains("element 0 (300) is not a valid INT8")
        );
        assert!(
            err(r#"{"name":"x","datatype":"FP32","shape":[2,2],"data":[1,2,3]}"#)
                .contains("4 elements) but 3 data elements")
        );
        assert!(
            err(r#"{"name":"x","datatype":"FP32","shape":[4294967296,4294967296],"data":[]}"#)
                .contains("at most")
        );
        // Found reviewing the decoders for the fuzz targets: the element count overflowed u128
        // (a panic in debug builds, a wrap to 0 in release).
        let four = r#"{"name":"x","datatype":"FP32","shape":[4294967296,4294967296,4294967296,4294967296],"data":[]}"#;
        assert!(err(four).contains("at most"));
    }

    #[test]
    fn spec_accepts_symbolic_batch() {
        let spec = TensorSpec {
            name: "input".into(),
            datatype: ElementType::F32,
            shape: vec![Dim::Symbolic("N".into()), Dim::Fixed(64)],
        };
        assert!(spec.accepts_shape(&[8, 64]));
        assert!(!spec.accepts_shape(&[8, 63]));
        assert!(!spec.accepts_shape(&[64]));
        assert_eq!(spec.shape_display(), "[N, 64]");
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(
            json,
            r#"{"name":"input","datatype":"FP32","shape":["N",64]}"#
        );
    }

    #[test]
    fn compare_uses_tolerance_for_floats_only() {
        let e = Tensor::new("p", vec![2], TensorData::F32(vec![1.0, 0.0])).unwrap();
        let close = Tensor::new("p", vec![2], TensorData::F32(vec![1.0005, 0.00005])).unwrap();
        let far = Tensor::new("p", vec![2], TensorData::F32(vec![1.01, 0.0])).unwrap();
        let tol = Tolerance::default();
        assert!(compare_outputs(std::slice::from_ref(&e), &[close], tol).is_ok());
        assert!(matches!(
            compare_outputs(std::slice::from_ref(&e), &[far], tol),
            Err(Mismatch::Value { index: 0, .. })
        ));
        let labels = Tensor::new("l", vec![1], TensorData::I64(vec![3])).unwrap();
        let other = Tensor::new("l", vec![1], TensorData::I64(vec![4])).unwrap();
        assert!(compare_outputs(std::slice::from_ref(&labels), &[other], tol).is_err());
        assert!(matches!(
            compare_outputs(&[labels], &[e], tol),
            Err(Mismatch::Missing { .. })
        ));
    }
}
