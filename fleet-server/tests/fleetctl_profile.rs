//! `fleetctl profile build` and `fleetctl model sign --profile` as an operator runs them: the
//! real binary on the sample models and their data.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fleet_protocol::codec::decode;
use fleet_protocol::{Envelope, Manifest, Sha256Digest};

fn fleetctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .args(args)
        .output()
        .expect("fleetctl runs")
}

fn ok(args: &[&str]) -> String {
    let out = fleetctl(args);
    assert!(
        out.status.success(),
        "fleetctl {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(args: &[&str]) -> String {
    let out = fleetctl(args);
    assert!(
        !out.status.success(),
        "fleetctl {args:?} should have failed"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The committed wine profile is exactly what the documented command writes today: the build
/// is deterministic and the file is current.
#[test]
fn the_committed_profile_is_reproduced_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("v1.profile.json");
    let m = models();
    ok(&[
        "profile",
        "build",
        "--model",
        s(&m.join("wine-forest/v1.onnx")),
        "--data",
        s(&m.join("data/wine/train.csv")),
        "--holdout",
        s(&m.join("data/wine/holdout.X.npy")),
        "--out",
        s(&out),
    ]);
    let built = std::fs::read(&out).unwrap();
    let committed = std::fs::read(m.join("wine-forest/v1.profile.json")).unwrap();
    assert!(
        built == committed,
        "models/wine-forest/v1.profile.json differs from a fresh build; regenerate the profiles \
         (see ARCHITECTURE.md)"
    );
    let err = fails(&[
        "profile",
        "build",
        "--model",
        s(&m.join("wine-forest/v1.onnx")),
        "--data",
        s(&m.join("data/digits/train.X.npy")),
        "--holdout",
        s(&m.join("data/wine/holdout.X.npy")),
        "--out",
        s(&dir.path().join("x.json")),
    ]);
    assert!(
        err.contains("64 columns") && err.contains("13 values per row"),
        "{err}"
    );
    let err = fails(&[
        "profile",
        "build",
        "--model",
        s(&m.join("wine-forest/v1.onnx")),
        "--data",
        s(&m.join("data/wine/train.csv")),
        "--holdout",
        s(&m.join("data/wine/holdout.X.npy")),
        "--out",
        s(&out),
    ]);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn sign_binds_the_profile_digest_and_refuses_a_profile_of_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    ok(&["keys", "gen", "--out", s(&keys)]);
    let key = keys.join("release.pem");
    let m = models();
    let profile = m.join("wine-forest/v1.profile.json");
    let manifest = dir.path().join("wine.manifest.json");
    let out = ok(&[
        "model",
        "sign",
        s(&m.join("wine-forest/v1.onnx")),
        "--name",
        "wine-forest",
        "--version",
        "v1",
        "--key",
        s(&key),
        "--self-test",
        s(&m.join("wine-forest/v1.selftest.json")),
        "--profile",
        s(&profile),
        "--out",
        s(&manifest),
    ]);
    let digest = Sha256Digest::of(&std::fs::read(&profile).unwrap());
    assert!(out.contains(&format!("profile  sha256 {digest}")), "{out}");
    let envelope: Envelope = decode(&std::fs::read(&manifest).unwrap()).unwrap();
    let signed: Manifest = decode(&envelope.payload).unwrap();
    assert_eq!(signed.profile_sha256, Some(digest));

    // The agent builds its monitor from exactly this pair.
    let monitor =
        edge_agent::drift::DriftMonitor::from_manifest(&signed, &std::fs::read(&profile).unwrap());
    assert!(monitor.is_ok(), "{monitor:?}");

    let err = fails(&[
        "model",
        "sign",
        s(&m.join("cancer-logreg/v1.onnx")),
        "--name",
        "cancer-logreg",
        "--version",
        "v1",
        "--key",
        s(&key),
        "--profile",
        s(&profile),
        "--out",
        s(&dir.path().join("cancer.manifest.json")),
    ]);
    assert!(err.contains("built for the model with sha256"), "{err}");
}
