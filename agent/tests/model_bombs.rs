//! Models whose loading would need absurd memory, at the runtime's level. The bombs that only
//! a child process can survive (a folded constant of 16 TiB aborts whatever process allocates
//! it) are tested end to end in `tests/tests/attacks_fleet.rs`, against the agent's isolated
//! model check.

use edge_agent::runtime::{inspect, Plan};
use fleet_protocol::tensor::Dim;
use fleet_protocol::{ElementType, TensorSpec};

/// An initializer that claims 16 TiB and carries 16 bytes is refused with an error, before
/// anything is allocated for it (tract checks the length first; this test keeps it so).
#[test]
fn an_initializer_larger_than_its_data_is_refused_without_allocating() {
    let onnx = driftgate_tests::onnx::lying_initializer(1 << 40);
    let error = inspect(&onnx).expect_err("a lying initializer is refused");
    assert!(error.to_string().contains("does not match"), "{error}");
    let spec = TensorSpec {
        name: "x".into(),
        datatype: ElementType::F32,
        shape: vec![Dim::Symbolic("N".into()), Dim::Fixed(4)],
    };
    let error = Plan::load(&onnx, &[spec]).expect_err("a lying initializer is refused");
    assert!(error.to_string().contains("does not match"), "{error}");
}
