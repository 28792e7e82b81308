//! ONNX models written by the tests themselves, for cases the committed sample models are too
//! small for (a multi-megabyte artifact to interrupt mid-download).

#[allow(unused_imports)] // not every test binary writes a model
pub use driftgate_tests::onnx::dense_mlp;
use fleet_protocol::{
    Manifest, ModelName, ModelVersion, SelfTest, Sha256Digest, Tensor, TensorData, V1,
};

/// A manifest for `onnx` as `name`/`version`, whose self-test case is one row of inputs with
/// the outputs tract computes for it.
pub fn manifest_for(onnx: &[u8], name: &str, version: &str, release: u64) -> Manifest {
    let signature = edge_agent::runtime::inspect(onnx).expect("a readable model");
    let plan = edge_agent::runtime::Plan::load(onnx, &signature.inputs).expect("a runnable model");
    let inputs: Vec<Tensor> = signature
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<u64> = spec.shape.iter().map(|d| d.fixed().unwrap_or(1)).collect();
            let count = shape.iter().product::<u64>() as usize;
            let data = (0..count).map(|i| (i % 17) as f32 / 17.0).collect();
            Tensor::new(spec.name.clone(), shape, TensorData::F32(data)).unwrap()
        })
        .collect();
    let outputs = plan.run(&inputs).expect("the self-test case runs");
    Manifest {
        v: V1,
        name: ModelName::new(name).unwrap(),
        release,
        version: ModelVersion::new(version).unwrap(),
        sha256: Sha256Digest::of(onnx),
        size: onnx.len() as u64,
        inputs: signature.inputs,
        outputs: signature.outputs,
        self_test: SelfTest {
            inputs,
            outputs,
            tolerance: Default::default(),
        },
        profile_sha256: None,
        profile_size: None,
        min_agent_version: None,
        created_at_ms: 0,
    }
}
