//! Offline release tooling: signing a model's manifest with the release key, and verifying a
//! model file against its signed manifest.
//!
//! The manifest's input and output signature is read from the ONNX file with the agent's own
//! runtime, and the self-test expectations are computed (or checked) with it, so a manifest
//! that signs here is one the agent can install.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use edge_agent::runtime::{self, Plan, RuntimeError, SelfTestError};
use fleet_protocol::codec::{decode, encode_pretty, DecodeError};
use fleet_protocol::limits::MAX_ARTIFACT_BYTES;
use fleet_protocol::manifest::parse_semver;
use fleet_protocol::tensor::{compare_outputs, Mismatch};
use fleet_protocol::trust::{verify_artifact, verify_manifest, TrustError};
use fleet_protocol::{
    BlobRef, ElementType, Envelope, KeyRing, Manifest, ModelName, ModelVersion, SelfTest,
    Sha256Digest, SigningKey, Tensor, TensorData, TensorSpec, Tolerance, VerifyingKey,
    MANIFEST_TYPE, V1,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {detail}")]
    BadInput { path: PathBuf, detail: String },
    #[error("{0}")]
    BadArgument(String),
    #[error("{path}: {cause}")]
    Runtime { path: PathBuf, cause: RuntimeError },
    #[error("{path}: tract's outputs differ from the self-test case's expected outputs: {cause}")]
    CaseMismatch { path: PathBuf, cause: Mismatch },
    #[error("{path} already exists; pass --force to replace it")]
    Exists { path: PathBuf },
    #[error("{path}: not a signed manifest: {cause}")]
    NotEnvelope { path: PathBuf, cause: DecodeError },
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error("{path}: {cause}")]
    SelfTest { path: PathBuf, cause: SelfTestError },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReleaseError + '_ {
    move |cause| ReleaseError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// A self-test case file: inputs, and optionally the expected outputs (for example from
/// onnxruntime) and a tolerance. Without outputs, tract computes them.
#[derive(Debug, Clone, Deserialize)]
pub struct SelfTestCase {
    pub inputs: Vec<Tensor>,
    #[serde(default)]
    pub outputs: Vec<Tensor>,
    #[serde(default)]
    pub tolerance: Option<Tolerance>,
}

/// What to sign.
#[derive(Debug, Clone)]
pub struct SignRequest {
    pub model: PathBuf,
    pub name: ModelName,
    pub version: ModelVersion,
    /// The release counter; derived from `version` when it is `N` or `vN`.
    pub release: Option<u64>,
    pub self_test: Option<PathBuf>,
    /// A reference profile (`fleetctl profile build`) whose SHA-256 the manifest binds.
    pub profile: Option<PathBuf>,
    pub min_agent_version: Option<String>,
    pub created_at_ms: i64,
}

/// The outcome of signing.
#[derive(Debug)]
pub struct Signed {
    pub manifest: Manifest,
    pub envelope: Envelope,
    /// Whether the self-test inputs were synthesised (no case file was given).
    pub synthetic_self_test: bool,
}

/// Where `fleetctl model sign` writes the manifest of `model`: `X.onnx` → `X.manifest.json`.
pub fn default_manifest_path(model: &Path) -> PathBuf {
    model.with_extension("manifest.json")
}

/// The release counter implied by a version like `3` or `v3`.
pub fn release_from_version(version: &str) -> Option<u64> {
    version
        .strip_prefix(['v', 'V'])
        .unwrap_or(version)
        .parse()
        .ok()
}

/// Reads the model, derives its signature, prepares the self-test and signs the manifest.
pub fn sign_model(request: &SignRequest, key: &SigningKey) -> Result<Signed, ReleaseError> {
    let release = match request.release {
        Some(release) => release,
        None => release_from_version(request.version.as_str()).ok_or_else(|| {
            ReleaseError::BadArgument(format!(
                "cannot derive a release counter from version {:?}; pass --release N",
                request.version.as_str()
            ))
        })?,
    };
    if let Some(min) = &request.min_agent_version {
        if parse_semver(min).is_none() {
            return Err(ReleaseError::BadArgument(format!(
                "--min-agent-version {min:?} is not MAJOR.MINOR.PATCH"
            )));
        }
    }
    let path = &request.model;
    let onnx = fs::read(path).map_err(io(path))?;
    if onnx.len() as u64 > MAX_ARTIFACT_BYTES {
        return Err(ReleaseError::BadInput {
            path: path.clone(),
            detail: format!(
                "{} bytes is over the {MAX_ARTIFACT_BYTES}-byte limit",
                onnx.len()
            ),
        });
    }
    let runtime_error = |cause| ReleaseError::Runtime {
        path: path.clone(),
        cause,
    };
    let signature = runtime::inspect(&onnx).map_err(runtime_error)?;
    let plan = Plan::load(&onnx, &signature.inputs).map_err(runtime_error)?;

    let (case, synthetic) = match &request.self_test {
        Some(case_path) => (read_case(case_path)?, false),
        None => (synthetic_case(&signature.inputs, &onnx), true),
    };
    let case_path = request.self_test.clone().unwrap_or_else(|| path.clone());
    let computed = plan
        .run(&case.inputs)
        .map_err(|cause| ReleaseError::Runtime {
            path: case_path.clone(),
            cause,
        })?;
    let tolerance = case.tolerance.unwrap_or_default();
    let expected = if case.outputs.is_empty() {
        computed
    } else {
        compare_outputs(&case.outputs, &computed, tolerance).map_err(|cause| {
            ReleaseError::CaseMismatch {
                path: case_path.clone(),
                cause,
            }
        })?;
        case.outputs
    };
    let self_test = SelfTest {
        inputs: case.inputs,
        outputs: expected,
        tolerance,
    };
    self_test
        .validate_against(&signature.inputs, &signature.outputs)
        .map_err(|detail| ReleaseError::BadInput {
            path: case_path,
            detail,
        })?;

    let profile = match &request.profile {
        Some(profile_path) => Some(check_profile(
            profile_path,
            &request.name,
            release,
            &onnx,
            &signature,
        )?),
        None => None,
    };

    let manifest = Manifest {
        v: V1,
        name: request.name.clone(),
        release,
        version: request.version.clone(),
        sha256: Sha256Digest::of(&onnx),
        size: onnx.len() as u64,
        inputs: signature.inputs,
        outputs: signature.outputs,
        self_test,
        profile_sha256: profile.map(|p| p.sha256),
        profile_size: profile.map(|p| p.size),
        min_agent_version: request.min_agent_version.clone(),
        created_at_ms: request.created_at_ms,
    };
    let payload = fleet_protocol::encode(&manifest);
    // What is signed must also decode: catches any invariant the builder above missed.
    decode::<Manifest>(&payload).map_err(|cause| ReleaseError::BadInput {
        path: path.clone(),
        detail: cause.to_string(),
    })?;
    let envelope = Envelope::sign(MANIFEST_TYPE, payload, key);
    Ok(Signed {
        manifest,
        envelope,
        synthetic_self_test: synthetic,
    })
}

/// The digest of a profile file's exact bytes, once the profile has been checked against the
/// model: built from this very ONNX file, for the same inputs, watching an output it has. The
/// check is the agent's own (`DriftMonitor::new`), so a profile that signs here loads there.
fn check_profile(
    path: &Path,
    name: &ModelName,
    release: u64,
    onnx: &[u8],
    signature: &runtime::ModelSignature,
) -> Result<BlobRef, ReleaseError> {
    let (profile, bytes) =
        crate::profile::read_profile(path).map_err(|e| ReleaseError::BadInput {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    let model_digest = Sha256Digest::of(onnx);
    if profile.model_sha256 != model_digest {
        return Err(ReleaseError::BadInput {
            path: path.to_path_buf(),
            detail: format!(
                "the profile was built for the model with sha256 {}, this model's is {}",
                profile.model_sha256, model_digest
            ),
        });
    }
    edge_agent::drift::DriftMonitor::new(
        name.clone(),
        release,
        std::sync::Arc::new(profile),
        &signature.inputs,
        &signature.outputs,
    )
    .map_err(|e| ReleaseError::BadInput {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    Ok(BlobRef {
        sha256: Sha256Digest::of(&bytes),
        size: bytes.len() as u64,
    })
}

fn read_case(path: &Path) -> Result<SelfTestCase, ReleaseError> {
    let bytes = fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&bytes).map_err(|e| ReleaseError::BadInput {
        path: path.to_path_buf(),
        detail: format!("not a self-test case: {e}"),
    })
}

/// Deterministic inputs for a model with no self-test case: batch 1 (every symbolic dimension
/// set to 1), values from a generator seeded by the model's digest.
fn synthetic_case(inputs: &[TensorSpec], onnx: &[u8]) -> SelfTestCase {
    let digest = Sha256::digest(onnx);
    let mut state = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")) | 1;
    let mut next = move || {
        // xorshift64*: plenty for test vectors, and stable across platforms.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let tensors = inputs
        .iter()
        .map(|spec| {
            let shape: Vec<u64> = spec.shape.iter().map(|d| d.fixed().unwrap_or(1)).collect();
            let n = shape.iter().product::<u64>() as usize;
            let unit = |x: u64| (x >> 40) as f64 / (1u64 << 24) as f64;
            let data = match spec.datatype {
                ElementType::F32 => TensorData::F32((0..n).map(|_| unit(next()) as f32).collect()),
                ElementType::F64 => TensorData::F64((0..n).map(|_| unit(next())).collect()),
                ElementType::Bool => TensorData::Bool((0..n).map(|_| next() & 1 == 1).collect()),
                ElementType::U8 => TensorData::U8((0..n).map(|_| (next() % 10) as u8).collect()),
                ElementType::U16 => TensorData::U16((0..n).map(|_| (next() % 10) as u16).collect()),
                ElementType::U32 => TensorData::U32((0..n).map(|_| (next() % 10) as u32).collect()),
                ElementType::U64 => TensorData::U64((0..n).map(|_| next() % 10).collect()),
                ElementType::I8 => TensorData::I8((0..n).map(|_| (next() % 10) as i8).collect()),
                ElementType::I16 => TensorData::I16((0..n).map(|_| (next() % 10) as i16).collect()),
                ElementType::I32 => TensorData::I32((0..n).map(|_| (next() % 10) as i32).collect()),
                ElementType::I64 => TensorData::I64((0..n).map(|_| (next() % 10) as i64).collect()),
            };
            Tensor {
                name: spec.name.clone(),
                shape,
                data,
            }
        })
        .collect();
    SelfTestCase {
        inputs: tensors,
        outputs: Vec::new(),
        tolerance: None,
    }
}

/// Writes a signed manifest as indented JSON, atomically; refuses to replace an existing file
/// unless `force`.
pub fn write_envelope(path: &Path, envelope: &Envelope, force: bool) -> Result<(), ReleaseError> {
    if path.exists() && !force {
        return Err(ReleaseError::Exists {
            path: path.to_path_buf(),
        });
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path.file_name().ok_or_else(|| {
        ReleaseError::BadArgument(format!("{} is not a file path", path.display()))
    })?;
    let tmp = dir.join(format!(".{}.tmp", file_name.to_string_lossy()));
    let mut file = File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(&encode_pretty(envelope)).map_err(io(&tmp))?;
    file.write_all(b"\n").map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// What `verify_model` found.
#[derive(Debug)]
pub struct Verified {
    pub manifest: Manifest,
    pub envelope: Envelope,
}

/// Checks a model file against its signed manifest: the signature by one of `trusted`, then the
/// artifact's size and SHA-256 (streamed, so any size works), then optionally the self-test.
pub fn verify_model(
    model: &Path,
    manifest_path: &Path,
    trusted: &[VerifyingKey],
    run_self_test: bool,
) -> Result<Verified, ReleaseError> {
    let bytes = fs::read(manifest_path).map_err(io(manifest_path))?;
    let envelope: Envelope = decode(&bytes).map_err(|cause| ReleaseError::NotEnvelope {
        path: manifest_path.to_path_buf(),
        cause,
    })?;
    let ring: KeyRing = trusted.iter().copied().collect();
    let manifest = verify_manifest(&envelope, &ring)?;

    let (size, digest) = hash_file(model)?;
    verify_artifact(&manifest, size, &digest)?;

    if run_self_test {
        let onnx = fs::read(model).map_err(io(model))?;
        let self_test_error = |cause| ReleaseError::SelfTest {
            path: model.to_path_buf(),
            cause,
        };
        let plan = Plan::load(&onnx, &manifest.inputs)
            .map_err(|e| self_test_error(SelfTestError::Run(e)))?;
        plan.self_test(&manifest.self_test)
            .map_err(self_test_error)?;
    }
    Ok(Verified { manifest, envelope })
}

/// Size and SHA-256 of a file, streamed, so any size works.
pub fn hash_file(path: &Path) -> Result<(u64, Sha256Digest), ReleaseError> {
    edge_agent::fsutil::hash_file(path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_counter_from_version() {
        assert_eq!(release_from_version("v3"), Some(3));
        assert_eq!(release_from_version("12"), Some(12));
        assert_eq!(release_from_version("2024.06"), None);
        assert_eq!(
            default_manifest_path(Path::new("m/v1.onnx")),
            PathBuf::from("m/v1.manifest.json")
        );
    }
}
