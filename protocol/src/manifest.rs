//! The Manifest: what the release key vouches for about one model version.

use serde::{Deserialize, Serialize};

use crate::codec::{WireMessage, V1};
use crate::digest::Sha256Digest;
use crate::ids::{ModelName, ModelVersion};
use crate::limits;
use crate::tensor::{Tensor, TensorSpec, Tolerance};

/// A model version as released: identity, artifact digest and size, signature of inputs and
/// outputs, and the self-test the agent runs before activating it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub v: V1,
    pub name: ModelName,
    /// Strictly increasing per model; decides what is an upgrade and what a downgrade.
    pub release: u64,
    /// For people: `v2`, `2024.06.1`, …
    pub version: ModelVersion,
    /// SHA-256 of the ONNX artifact.
    pub sha256: Sha256Digest,
    /// Size of the ONNX artifact in bytes; downloads never accept more.
    pub size: u64,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub self_test: SelfTest,
    /// SHA-256 of the reference profile the drift monitor compares against, if one ships.
    /// The profile travels like the artifact (chunk requests by digest) and is stored beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_sha256: Option<Sha256Digest>,
    /// Size of that profile in bytes: given exactly when `profile_sha256` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_size: Option<u64>,
    /// The oldest agent version (semver `MAJOR.MINOR.PATCH`) that may install this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_agent_version: Option<String>,
    /// When the manifest was signed, in milliseconds since the Unix epoch.
    pub created_at_ms: i64,
}

/// A blob a device downloads by digest: the artifact, or the reference profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobRef {
    pub sha256: Sha256Digest,
    pub size: u64,
}

impl Manifest {
    /// The ONNX artifact.
    pub fn artifact(&self) -> BlobRef {
        BlobRef {
            sha256: self.sha256,
            size: self.size,
        }
    }

    /// The reference profile, when one ships with the model.
    pub fn profile(&self) -> Option<BlobRef> {
        Some(BlobRef {
            sha256: self.profile_sha256?,
            size: self.profile_size?,
        })
    }
}

/// Inputs with the outputs they must produce, within a tolerance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelfTest {
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<Tensor>,
    #[serde(default)]
    pub tolerance: Tolerance,
}

impl WireMessage for Manifest {
    const KIND: &'static str = "manifest";
    const MAX_BYTES: usize = limits::MAX_CONTROL_MESSAGE_BYTES;

    fn validate(&self) -> Result<(), String> {
        if self.size == 0 || self.size > limits::MAX_ARTIFACT_BYTES {
            return Err(format!(
                "artifact size {} is outside 1..={}",
                self.size,
                limits::MAX_ARTIFACT_BYTES
            ));
        }
        for (what, specs) in [("inputs", &self.inputs), ("outputs", &self.outputs)] {
            if specs.is_empty() || specs.len() > limits::MAX_TENSORS {
                return Err(format!(
                    "{what}: {} declared, expected 1 to {}",
                    specs.len(),
                    limits::MAX_TENSORS
                ));
            }
            for spec in specs {
                spec.validate()?;
            }
        }
        self.self_test
            .validate_against(&self.inputs, &self.outputs)?;
        match (self.profile_sha256, self.profile_size) {
            (None, None) => {}
            (Some(_), Some(size)) if size > 0 && size <= limits::MAX_PROFILE_BYTES as u64 => {}
            (Some(_), Some(size)) => {
                return Err(format!(
                    "profile size {size} is outside 1..={}",
                    limits::MAX_PROFILE_BYTES
                ))
            }
            _ => return Err("profile_sha256 and profile_size go together".into()),
        }
        if let Some(version) = &self.min_agent_version {
            parse_semver(version)
                .ok_or_else(|| format!("min_agent_version {version:?} is not MAJOR.MINOR.PATCH"))?;
        }
        Ok(())
    }
}

impl SelfTest {
    /// Every declared input is given once with a fitting type and shape, and every expected
    /// output is a declared output of the right type.
    pub fn validate_against(
        &self,
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
    ) -> Result<(), String> {
        let Tolerance { abs, rel } = self.tolerance;
        // Written so that NaN fails too.
        let valid = |x: f64| x.is_finite() && x >= 0.0;
        if !(valid(abs) && valid(rel)) {
            return Err("self-test tolerance must be finite and not negative".into());
        }
        for spec in inputs {
            let given: Vec<&Tensor> = self.inputs.iter().filter(|t| t.name == spec.name).collect();
            let [tensor] = given.as_slice() else {
                return Err(format!(
                    "self-test gives input {:?} {} times, expected once",
                    spec.name,
                    given.len()
                ));
            };
            check_fits("self-test input", tensor, spec)?;
        }
        if self.inputs.len() != inputs.len() {
            return Err("self-test gives inputs the model does not declare".into());
        }
        if self.outputs.is_empty() {
            return Err("self-test expects no outputs".into());
        }
        for tensor in &self.outputs {
            let spec = outputs
                .iter()
                .find(|s| s.name == tensor.name)
                .ok_or_else(|| {
                    format!(
                        "self-test expects output {:?}, which the model does not declare",
                        tensor.name
                    )
                })?;
            check_fits("self-test output", tensor, spec)?;
        }
        Ok(())
    }
}

fn check_fits(what: &str, tensor: &Tensor, spec: &TensorSpec) -> Result<(), String> {
    tensor.check().map_err(|e| e.to_string())?;
    if tensor.element_type() != spec.datatype {
        return Err(format!(
            "{what} {:?} is {}, the model declares {}",
            spec.name,
            tensor.element_type(),
            spec.datatype
        ));
    }
    if !spec.accepts_shape(&tensor.shape) {
        return Err(format!(
            "{what} {:?} has shape {:?}, the model declares {}",
            spec.name,
            tensor.shape,
            spec.shape_display()
        ));
    }
    Ok(())
}

/// Parses `MAJOR.MINOR.PATCH` (a pre-release or build suffix after `-`/`+` is ignored).
pub fn parse_semver(version: &str) -> Option<(u64, u64, u64)> {
    let core = version.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let triple = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(triple)
}
