//! `models/make.py` reproduces the committed sample models and data byte for byte.

use std::process::Command;

use driftgate_tests::{python, require_env, workspace_root};
use fleet_protocol::Sha256Digest;

#[test]
fn make_py_reproduces_every_committed_file() {
    if !require_env(
        "make_py_reproduces_every_committed_file",
        "DRIFTGATE_TEST_PYTHON",
        "the packages of models/requirements.txt",
    ) {
        return;
    }
    let root = workspace_root();
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(python())
        .arg(root.join("models/make.py"))
        .arg("--out")
        .arg(out.path())
        .status()
        .expect("python runs");
    assert!(status.success(), "make.py failed: {status}");

    let committed = std::fs::read_to_string(root.join("models/SHA256SUMS")).unwrap();
    let regenerated = std::fs::read_to_string(out.path().join("SHA256SUMS")).unwrap();
    assert_eq!(regenerated, committed, "SHA256SUMS differ");

    // SHA256SUMS itself could be stale: check each listed file against the committed bytes.
    let mut files = 0;
    for line in committed.lines() {
        let (digest, path) = line.split_once("  ").expect("`digest  path` lines");
        let bytes = std::fs::read(root.join("models").join(path))
            .unwrap_or_else(|e| panic!("models/{path}: {e}"));
        assert_eq!(Sha256Digest::of(&bytes).to_hex(), digest, "models/{path}");
        files += 1;
    }
    assert!(files >= 20, "only {files} files listed in SHA256SUMS");
}
