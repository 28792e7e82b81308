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
