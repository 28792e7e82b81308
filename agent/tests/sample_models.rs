//! Every sample model in `models/` loads with tract and reproduces its self-test case, whose
//! expected outputs were computed by onnxruntime when `models/make.py` made the model.

use std::path::{Path, PathBuf};

use edge_agent::runtime::{inspect, Plan};
use fleet_protocol::SelfTest;

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn onnx_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            onnx_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "onnx") {
            out.push(path);
        }
    }
}

#[test]
fn every_sample_model_matches_its_onnxruntime_self_test() {
    let mut models = Vec::new();
    onnx_files(&models_dir(), &mut models);
    // digits-mlp v1..v3, wine-forest, cancer-logreg, digits-cnn.
    assert!(
        models.len() >= 6,
        "expected at least 6 sample models under models/, found {models:?}"
    );
    for path in &models {
        let onnx = std::fs::read(path).unwrap();
        let case_path = path.with_extension("selftest.json");
        let case: SelfTest = serde_json::from_slice(
            &std::fs::read(&case_path).unwrap_or_else(|e| panic!("{}: {e}", case_path.display())),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", case_path.display()));

        let signature = inspect(&onnx).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        case.validate_against(&signature.inputs, &signature.outputs)
            .unwrap_or_else(|e| {
                panic!("{}: self-test does not fit the model: {e}", path.display())
            });

        let plan = Plan::load(&onnx, &signature.inputs)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        plan.self_test(&case)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!(
            "{}: {} inputs {:?}, outputs {:?}: matches onnxruntime",
            path.strip_prefix(models_dir()).unwrap().display(),
            signature.inputs.len(),
            signature
                .inputs
                .iter()
                .map(|s| s.shape_display())
                .collect::<Vec<_>>(),
            signature
                .outputs
                .iter()
                .map(|s| format!("{} {}", s.name, s.shape_display()))
                .collect::<Vec<_>>(),
        );
    }
}

#[test]
fn a_wrong_input_is_refused_with_the_expected_shape() {
    let onnx = std::fs::read(models_dir().join("cancer-logreg/v1.onnx")).unwrap();
    let signature = inspect(&onnx).unwrap();
    let plan = Plan::load(&onnx, &signature.inputs).unwrap();
    let bad = fleet_protocol::Tensor::new(
        "input",
        vec![1, 29],
        fleet_protocol::TensorData::F32(vec![0.0; 29]),
    )
    .unwrap();
    let err = plan.run(&[bad]).unwrap_err().to_string();
    assert!(err.contains("expected [N, 30]"), "{err}");
}

#[test]
fn garbage_is_refused_not_a_panic() {
    assert!(inspect(b"definitely not onnx").is_err());
    assert!(inspect(&[]).is_err());
}
