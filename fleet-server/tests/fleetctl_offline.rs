//! `fleetctl`'s offline commands as an operator runs them: the real binary, real files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

/// Runs a command that must fail, and returns its error text.
fn fails(args: &[&str]) -> String {
    let out = fleetctl(args);
    assert!(
        !out.status.success(),
        "fleetctl {args:?} should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

/// (model name, version, path) of every sample model: `models/{name}/{version}.onnx`.
fn sample_models() -> Vec<(String, String, PathBuf)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(models_dir()).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&dir).unwrap() {
            let path = file.unwrap().path();
            if path.extension().is_some_and(|e| e == "onnx") {
                let name = dir.file_name().unwrap().to_string_lossy().into_owned();
                let version = path.file_stem().unwrap().to_string_lossy().into_owned();
                found.push((name, version, path));
            }
        }
    }
    found.sort();
    assert!(
        found.len() >= 6,
        "expected the sample models, found {found:?}"
    );
    found
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn keys_gen_writes_a_private_key_only_its_owner_can_read_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let out = ok(&["keys", "gen", "--out", s(&keys), "--name", "fleet"]);
    assert!(out.contains("key id"), "{out}");
    let private = keys.join("fleet.pem");
    let mode = std::fs::metadata(&private).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let before = std::fs::read(&private).unwrap();

    let err = fails(&["keys", "gen", "--out", s(&keys), "--name", "fleet"]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&private).unwrap(), before);

    // The id printed by `keys id` is the same for both halves.
    let id_private = ok(&["keys", "id", s(&private)]);
    let id_public = ok(&["keys", "id", s(&keys.join("fleet.pub"))]);
    assert_eq!(id_private, id_public);
    assert!(out.contains(id_public.trim()));
}

#[test]
fn every_sample_model_signs_and_verifies_and_tampering_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    ok(&["keys", "gen", "--out", s(&keys)]);
    let other = dir.path().join("other");
    ok(&["keys", "gen", "--out", s(&other)]);
    let key = keys.join("release.pem");
    let public = keys.join("release.pub");

    for (name, version, path) in sample_models() {
        // Work on a copy: signing writes the manifest beside the model.
        let model = dir.path().join(format!("{name}-{version}.onnx"));
        std::fs::copy(&path, &model).unwrap();
        let case = path.with_extension("selftest.json");
        let out = ok(&[
            "model",
            "sign",
            s(&model),
            "--name",
            &name,
            "--version",
            &version,
            "--key",
            s(&key),
            "--self-test",
            s(&case),
        ]);
        assert!(out.contains(&format!("model    {name} {version}")), "{out}");
        let manifest = dir.path().join(format!("{name}-{version}.manifest.json"));
        assert!(manifest.exists());

        // Signing again does not silently replace the manifest.
        let err = fails(&[
            "model",
            "sign",
            s(&model),
            "--name",
            &name,
            "--version",
            &version,
            "--key",
            s(&key),
        ]);
        assert!(err.contains("--force"), "{err}");

        let out = ok(&[
            "model",
            "verify",
            s(&model),
            "--pubkey",
            s(&public),
            "--self-test",
        ]);
        assert!(
            out.contains("ok: signature, size and sha256 verified, self-test passed"),
            "{out}"
        );
        let json = ok(&[
            "model",
            "verify",
            s(&model),
            "--pubkey",
            s(&public),
            "--json",
        ]);
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed["name"], name.as_str());

        let err = fails(&[
            "model",
            "verify",
            s(&model),
            "--pubkey",
            s(&other.join("release.pub")),
        ]);
        assert!(err.contains("unknown key"), "{name} {version}: {err}");

        let mut bytes = std::fs::read(&model).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        std::fs::write(&model, &bytes).unwrap();
        let err = fails(&["model", "verify", s(&model), "--pubkey", s(&public)]);
        assert!(err.contains("hash mismatch"), "{name} {version}: {err}");
    }
}

#[test]
fn signing_without_a_case_synthesises_one_that_the_agent_runtime_passes() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    ok(&["keys", "gen", "--out", s(&keys)]);
    let model = dir.path().join("cnn.onnx");
    std::fs::copy(models_dir().join("digits-cnn/v1.onnx"), &model).unwrap();
    let out = fleetctl(&[
        "model",
        "sign",
        s(&model),
        "--name",
        "digits-cnn",
        "--version",
        "2024.1",
        "--release",
        "7",
        "--key",
        s(&keys.join("release.pem")),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("synthetic inputs"));
    let out = ok(&[
        "model",
        "verify",
        s(&model),
        "--pubkey",
        s(&keys.join("release.pub")),
        "--self-test",
    ]);
    assert!(out.contains("(release 7)"), "{out}");
}

#[test]
fn bad_inputs_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    ok(&["keys", "gen", "--out", s(&keys)]);
    let key = keys.join("release.pem");
    let model = dir.path().join("m.onnx");
    std::fs::copy(models_dir().join("cancer-logreg/v1.onnx"), &model).unwrap();

    // A version with no number in it needs an explicit release counter.
    let err = fails(&[
        "model",
        "sign",
        s(&model),
        "--name",
        "m",
        "--version",
        "beta",
        "--key",
        s(&key),
    ]);
    assert!(err.contains("--release"), "{err}");
    // Names that could walk out of a directory are refused before anything is read.
    let err = fails(&[
        "model",
        "sign",
        s(&model),
        "--name",
        "../etc",
        "--version",
        "v1",
        "--key",
        s(&key),
    ]);
    assert!(err.contains("model name"), "{err}");
    // A public key is not a signing key.
    let err = fails(&[
        "model",
        "sign",
        s(&model),
        "--name",
        "m",
        "--version",
        "v1",
        "--key",
        s(&keys.join("release.pub")),
    ]);
    assert!(err.contains("PRIVATE KEY"), "{err}");
    // Not an ONNX file.
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"not a model").unwrap();
    let err = fails(&[
        "model",
        "sign",
        s(&junk),
        "--name",
        "m",
        "--version",
        "v1",
        "--key",
        s(&key),
    ]);
    assert!(err.contains("could not be loaded"), "{err}");
    // A self-test case whose expectations tract does not reproduce is refused, not signed.
    let case = dir.path().join("case.json");
    let mut wrong: serde_json::Value = serde_json::from_slice(
        &std::fs::read(models_dir().join("cancer-logreg/v1.selftest.json")).unwrap(),
    )
    .unwrap();
    let outputs = wrong["outputs"].as_array_mut().unwrap();
    let label = outputs
        .iter_mut()
        .find(|o| o["datatype"] == "INT64")
        .unwrap();
    let first = label["data"][0].as_i64().unwrap();
    label["data"][0] = serde_json::json!(1 - first);
    std::fs::write(&case, serde_json::to_vec(&wrong).unwrap()).unwrap();
    let err = fails(&[
        "model",
        "sign",
        s(&model),
        "--name",
        "m",
        "--version",
        "v1",
        "--key",
        s(&key),
        "--self-test",
        s(&case),
    ]);
    assert!(err.contains("differ"), "{err}");
    assert!(!dir.path().join("m.manifest.json").exists());
    // Verifying with no manifest says which file is missing.
    let err = fails(&[
        "model",
        "verify",
        s(&model),
        "--pubkey",
        s(&keys.join("release.pub")),
    ]);
    assert!(err.contains("m.manifest.json"), "{err}");
}
