//! ONNX models written by the tests themselves, for cases the committed sample models are too
//! small for (a multi-megabyte artifact to interrupt mid-download, or to push through a slow
//! link).

use prost::Message;
use tract_onnx::pb;

const FLOAT: i32 = pb::tensor_proto::DataType::Float as i32;

fn dense_weights(rows: usize, cols: usize, seed: u64) -> pb::TensorProto {
    // A fixed xorshift stream, so one seed always gives the same bytes (and digest).
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut raw = Vec::with_capacity(rows * cols * 4);
    for _ in 0..rows * cols {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let unit = (state >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        raw.extend_from_slice(&((unit - 0.5) * 0.1).to_le_bytes());
    }
    pb::TensorProto {
        dims: vec![rows as i64, cols as i64],
        data_type: FLOAT,
        raw_data: raw,
        ..Default::default()
    }
}

fn float_input(name: &str, dims: &[Option<i64>]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: FLOAT,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(match d {
                                Some(n) => Value::DimValue(*n),
                                None => Value::DimParam("N".into()),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
    pb::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: output.into(),
        op_type: op.into(),
        ..Default::default()
    }
}

/// A two-layer perceptron `x [N, inputs] → MatMul → Relu → MatMul → y [N, 4]` whose first
/// weight matrix makes the file about `inputs × hidden × 4` bytes. `seed` picks the weights.
pub fn dense_mlp(inputs: usize, hidden: usize, seed: u64) -> Vec<u8> {
    let mut w1 = dense_weights(inputs, hidden, seed);
    w1.name = "w1".into();
    let mut w2 = dense_weights(hidden, 4, seed + 1);
    w2.name = "w2".into();
    let graph = pb::GraphProto {
        name: "dense_mlp".into(),
        node: vec![
            node("MatMul", &["x", "w1"], "h"),
            node("Relu", &["h"], "r"),
            node("MatMul", &["r", "w2"], "y"),
        ],
        initializer: vec![w1, w2],
        input: vec![float_input("x", &[None, Some(inputs as i64)])],
        output: vec![float_input("y", &[None, Some(4)])],
        ..Default::default()
    };
    model(graph)
}

/// A model bomb: a few hundred bytes on the wire, `x [N, 4]` →
/// `y = x + ReduceMax(CumSum(Expand(ReduceSum(x, 0), [rows, 4]), 0), 0)`. Running it
/// materialises the `[rows, 4]` running sums (tract reduces a plain broadcast without
/// materialising it; a running sum it must compute): 16 GiB of floats for `rows = 1 << 30`,
/// 2 GiB for `rows = 1 << 27`, which a workstation grants and a device should not. With one
/// row of ones as input, every output is `1 + min(rows, 2^24)` (a running sum of ones in
/// `f32` stops growing at 2^24). (Beyond `rows = 2^31` tract 0.23.9 does not allocate: the
/// expanded axis comes out empty, and so does the sum.)
pub fn expand_bomb(rows: i64) -> Vec<u8> {
    let int64 = pb::tensor_proto::DataType::Int64 as i32;
    let shape = pb::TensorProto {
        name: "bomb_shape".into(),
        dims: vec![2],
        data_type: int64,
        int64_data: vec![rows, 4],
        ..Default::default()
    };
    let axes = pb::TensorProto {
        name: "axes".into(),
        dims: vec![1],
        data_type: int64,
        int64_data: vec![0],
        ..Default::default()
    };
    let axis = pb::TensorProto {
        name: "axis".into(),
        data_type: int64,
        int64_data: vec![0],
        ..Default::default()
    };
    let graph = pb::GraphProto {
        name: "expand_bomb".into(),
        node: vec![
            node("ReduceSum", &["x", "axes"], "row"),
            node("Expand", &["row", "bomb_shape"], "expanded"),
            node("CumSum", &["expanded", "axis"], "running"),
            node("ReduceMax", &["running"], "summed"),
            node("Add", &["x", "summed"], "y"),
        ],
        initializer: vec![shape, axes, axis],
        input: vec![float_input("x", &[None, Some(4)])],
        output: vec![float_input("y", &[None, Some(4)])],
        ..Default::default()
    };
    model(graph)
}

fn model(graph: pb::GraphProto) -> Vec<u8> {
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        producer_name: "driftgate-tests".into(),
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// An initializer that claims `[rows, 4]` floats and carries 16 bytes: `y = x + w` with
/// `x [N, 4]`. A loader that allocates by the claimed shape before it checks the data would
/// ask for `rows × 16` bytes.
pub fn lying_initializer(rows: i64) -> Vec<u8> {
    let weights = pb::TensorProto {
        name: "w".into(),
        dims: vec![rows, 4],
        data_type: FLOAT,
        raw_data: vec![0; 16],
        ..Default::default()
    };
    let graph = pb::GraphProto {
        name: "lying_initializer".into(),
        node: vec![node("Add", &["x", "w"], "y")],
        initializer: vec![weights],
        input: vec![float_input("x", &[None, Some(4)])],
        output: vec![float_input("y", &[None, Some(4)])],
        ..Default::default()
    };
    model(graph)
}
