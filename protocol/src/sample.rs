//! The compact binary form of a sampled inference (format `dgt1`): the input and output
//! tensors exactly as the model saw and produced them, without JSON's decimal blow-up (an FP32
//! takes 4 bytes instead of about 12).
//!
//! ```text
//! "DGT1"                          magic, 4 bytes
//! u8 inputs, u8 outputs           tensor counts
//! per tensor, inputs first:
//!   u16 name length, name (UTF-8)
//!   u8 element type (index in ElementType::ALL), u8 rank
//!   rank × u64 dimensions
//!   the elements, row-major, little endian (BOOL as one byte, 0 or 1)
//! ```
//! All integers are little endian. Decoding checks every length against what is left, so a
//! truncated or hostile sample is an error, never a panic or a huge allocation.

use crate::limits::{MAX_RANK, MAX_TENSORS};
use crate::tensor::{ElementType, Tensor, TensorData};

/// The `format` name of [`crate::outbox::Sample`]s in this encoding.
pub const FORMAT: &str = "dgt1";
const MAGIC: &[u8; 4] = b"DGT1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SampleError {
    #[error("sample does not start with the magic \"DGT1\"")]
    BadMagic,
    #[error("sample is truncated: {0}")]
    Truncated(&'static str),
    #[error("sample has {0} tensors on one side; at most {MAX_TENSORS}")]
    TooManyTensors(usize),
    #[error("tensor {0:?}: {1}")]
    BadTensor(String, String),
    #[error("sample has {0} bytes after its last tensor")]
    TrailingBytes(usize),
}

fn type_code(t: ElementType) -> u8 {
    ElementType::ALL
        .iter()
        .position(|x| *x == t)
        .map_or(u8::MAX, |i| i as u8)
}

/// Encodes inputs and outputs. Names longer than 65,535 bytes are cut (they are never that
/// long: they come from the model's signature).
pub fn encode(inputs: &[Tensor], outputs: &[Tensor]) -> Vec<u8> {
    let payload: usize = inputs
        .iter()
        .chain(outputs)
        .map(|t| t.name.len() + 4 + 8 * t.shape.len() + t.data.len() * 8)
        .sum();
    let mut out = Vec::with_capacity(6 + payload);
    out.extend_from_slice(MAGIC);
    out.push(inputs.len().min(255) as u8);
    out.push(outputs.len().min(255) as u8);
    for tensor in inputs.iter().take(255).chain(outputs.iter().take(255)) {
        let name = &tensor.name.as_bytes()[..tensor.name.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name);
        out.push(type_code(tensor.element_type()));
        out.push(tensor.shape.len().min(255) as u8);
        for dim in tensor.shape.iter().take(255) {
            out.extend_from_slice(&dim.to_le_bytes());
        }
        match &tensor.data {
            TensorData::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
            TensorData::U8(v) => out.extend_from_slice(v),
            TensorData::U16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::U32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::U64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::I8(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::I16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::I32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::I64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::F32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::F64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
    }
    out
}

/// A cursor that refuses to read past the end.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SampleError> {
        if self.bytes.len() < n {
            return Err(SampleError::Truncated(what));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, SampleError> {
        Ok(self.take(1, what)?[0])
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], SampleError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }
}

fn decode_tensor(r: &mut Reader<'_>) -> Result<Tensor, SampleError> {
    let name_len = u16::from_le_bytes(r.array("name length")?) as usize;
    let name = String::from_utf8_lossy(r.take(name_len, "name")?).into_owned();
    let bad = |why: String| SampleError::BadTensor(name.clone(), why);
    let code = r.u8("element type")?;
    let element = *ElementType::ALL
        .get(usize::from(code))
        .ok_or_else(|| bad(format!("unknown element type {code}")))?;
    let rank = usize::from(r.u8("rank")?);
    if rank > MAX_RANK {
        return Err(bad(format!("rank {rank} is above {MAX_RANK}")));
    }
    let mut shape = Vec::with_capacity(rank);
    for _ in 0..rank {
        shape.push(u64::from_le_bytes(r.array("dimension")?));
    }
    let elements = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    let width = match element {
        ElementType::Bool | ElementType::U8 | ElementType::I8 => 1,
        ElementType::U16 | ElementType::I16 => 2,
        ElementType::U32 | ElementType::I32 | ElementType::F32 => 4,
        ElementType::U64 | ElementType::I64 | ElementType::F64 => 8,
    };
    // Checked before anything is allocated: the bytes must already be there.
    let len = elements
        .checked_mul(width)
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    let raw = r.take(len, "tensor data")?;
    fn le<const N: usize, T>(raw: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
        raw.chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect()
    }
    let data = match element {
        ElementType::Bool => TensorData::Bool(raw.iter().map(|&b| b != 0).collect()),
        ElementType::U8 => TensorData::U8(raw.to_vec()),
        ElementType::U16 => TensorData::U16(le(raw, u16::from_le_bytes)),
        ElementType::U32 => TensorData::U32(le(raw, u32::from_le_bytes)),
        ElementType::U64 => TensorData::U64(le(raw, u64::from_le_bytes)),
        ElementType::I8 => TensorData::I8(le(raw, i8::from_le_bytes)),
        ElementType::I16 => TensorData::I16(le(raw, i16::from_le_bytes)),
        ElementType::I32 => TensorData::I32(le(raw, i32::from_le_bytes)),
        ElementType::I64 => TensorData::I64(le(raw, i64::from_le_bytes)),
        ElementType::F32 => TensorData::F32(le(raw, f32::from_le_bytes)),
        ElementType::F64 => TensorData::F64(le(raw, f64::from_le_bytes)),
    };
    Ok(Tensor { name, shape, data })
}

/// Decodes a sample into (inputs, outputs).
pub fn decode(bytes: &[u8]) -> Result<(Vec<Tensor>, Vec<Tensor>), SampleError> {
    let mut r = Reader { bytes };
    if r.take(4, "magic")? != MAGIC {
        return Err(SampleError::BadMagic);
    }
    let inputs = usize::from(r.u8("input count")?);
    let outputs = usize::from(r.u8("output count")?);
    for n in [inputs, outputs] {
        if n > MAX_TENSORS {
            return Err(SampleError::TooManyTensors(n));
        }
    }
    let decoded_inputs = (0..inputs)
        .map(|_| decode_tensor(&mut r))
        .collect::<Result<Vec<_>, _>>()?;
    let decoded_outputs = (0..outputs)
        .map(|_| decode_tensor(&mut r))
        .collect::<Result<Vec<_>, _>>()?;
    if !r.bytes.is_empty() {
        return Err(SampleError::TrailingBytes(r.bytes.len()));
    }
    Ok((decoded_inputs, decoded_outputs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> (Vec<Tensor>, Vec<Tensor>) {
        let input = Tensor::new(
            "input",
            vec![2, 3],
            TensorData::F32(vec![0.5, -1.0, 3.25, 0.0, 1e-7, 16.0]),
        )
        .unwrap();
        let label = Tensor::new("label", vec![2], TensorData::I64(vec![3, -1])).unwrap();
        let mask = Tensor::new("mask", vec![2], TensorData::Bool(vec![true, false])).unwrap();
        (vec![input], vec![label, mask])
    }

    #[test]
    fn round_trips_exactly_and_compactly() {
        let (inputs, outputs) = tensors();
        let bytes = encode(&inputs, &outputs);
        assert_eq!(decode(&bytes).unwrap(), (inputs, outputs));
        // 6 header + (2+5+2+16+24) + (2+5+2+8+16) + (2+4+2+8+2)
        assert_eq!(bytes.len(), 6 + 49 + 33 + 18);
        // NaN survives bit for bit (JSON could not carry it).
        let nan = Tensor {
            name: "x".into(),
            shape: vec![1],
            data: TensorData::F32(vec![f32::NAN]),
        };
        let (back, _) = decode(&encode(&[nan], &[])).unwrap();
        let TensorData::F32(v) = &back[0].data else {
            panic!("type kept")
        };
        assert!(v[0].is_nan());
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error() {
        let (inputs, outputs) = tensors();
        let bytes = encode(&inputs, &outputs);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(decode(&extra), Err(SampleError::TrailingBytes(1)));
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert_eq!(decode(&magic), Err(SampleError::BadMagic));
        // A dimension claiming 2^60 elements is refused before anything is allocated.
        let mut huge = bytes.clone();
        let dim_at = 6 + 2 + 5 + 2;
        huge[dim_at..dim_at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode(&huge).is_err());
    }
}
