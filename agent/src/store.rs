//! The on-disk model store: owns `{data_dir}/models/` and `{data_dir}/staging/`.
//!
//! ```text
//! models/{name}/{version}/model.onnx      the artifact
//! models/{name}/{version}/manifest.json   the signed manifest envelope, as received
//! models/{name}/{version}/profile.json    the reference profile, when the manifest names one
//! models/{name}/ACTIVE.json               {"active": "v2", "previous": "v1"}
//! staging/{sha256}.part                   downloads in progress (kept across restarts)
//! ```
//! A version directory appears by one rename of a complete `.{version}.installing` directory,
//! and activation is one atomic rewrite of `ACTIVE.json`: a kill at any instant leaves either
//! the old pointer or the new one, each naming a complete version. Everything read back is
//! re-verified (signature, size, digest), so a file damaged on disk is caught, not served.

use std::fs;
use std::path::{Path, PathBuf};

use fleet_protocol::trust::{verify_artifact, verify_blob, verify_manifest};
use fleet_protocol::{decode, Envelope, KeyRing, Manifest, ModelName, ModelVersion, Sha256Digest};
use serde::{Deserialize, Serialize};

use crate::fsutil::{atomic_write, fsync_dir, hash_file, read_bounded, sync_rename};

const ACTIVE: &str = "ACTIVE.json";
const MODEL: &str = "model.onnx";
const PROFILE: &str = "profile.json";
const MANIFEST: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{name} {version} is not installed")]
    NotInstalled {
        name: ModelName,
        version: ModelVersion,
    },
    #[error("{name} {version} is already installed with other bytes (sha256 {installed})")]
    Conflict {
        name: ModelName,
        version: ModelVersion,
        installed: Sha256Digest,
    },
    #[error("{name} has no previous version to go back to")]
    NoPrevious { name: ModelName },
    #[error("{what} {value:?} cannot be stored: it would collide with the store's own files")]
    ReservedName { what: &'static str, value: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |cause| StoreError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// Which version of a model serves, and which served before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivePointer {
    pub active: ModelVersion,
    #[serde(default)]
    pub previous: Option<ModelVersion>,
}

/// A stored version, verified.
#[derive(Debug, Clone)]
pub struct StoredModel {
    pub envelope: Envelope,
    pub manifest: Manifest,
    pub onnx: Vec<u8>,
    /// The reference profile's bytes, verified against the manifest, when one ships.
    pub profile: Option<Vec<u8>>,
}

/// What start-up recovery did for one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    Kept {
        name: ModelName,
        version: ModelVersion,
    },
    FellBack {
        name: ModelName,
        from: ModelVersion,
        to: ModelVersion,
        reason: String,
    },
    NoValidVersion {
        name: ModelName,
        reason: String,
    },
}

#[derive(Debug)]
pub struct ModelStore {
    models: PathBuf,
    staging: PathBuf,
    keep: usize,
}

impl ModelStore {
    /// The store of `data_dir`, to read versions only: nothing is created or cleaned up. For
    /// the model check's child process, which runs beside the agent that owns the store.
    pub fn reader(data_dir: &Path) -> ModelStore {
        ModelStore {
            models: data_dir.join("models"),
            staging: data_dir.join("staging"),
            keep: usize::MAX,
        }
    }

    /// Opens the store, creating its directories and removing what a crash left half done
    /// (temp files, `.installing` directories). Staging files stay: downloads resume from them.
    pub fn open(data_dir: &Path, keep: usize) -> Result<ModelStore, StoreError> {
        let store = ModelStore {
            models: data_dir.join("models"),
            staging: data_dir.join("staging"),
            keep: keep.max(2),
        };
        for dir in [&store.models, &store.staging] {
            fs::create_dir_all(dir).map_err(io(dir))?;
        }
        for model_dir in read_dir(&store.models)? {
            if !model_dir.is_dir() {
                continue;
            }
            for entry in read_dir(&model_dir)? {
                let name = file_name(&entry);
                if name.starts_with('.') {
                    tracing::info!(path = %entry.display(), "removing what an interrupted install left");
                    let removed = if entry.is_dir() {
                        fs::remove_dir_all(&entry)
                    } else {
                        fs::remove_file(&entry)
                    };
                    removed.map_err(io(&entry))?;
                }
            }
        }
        Ok(store)
    }

    fn model_dir(&self, name: &ModelName) -> PathBuf {
        self.models.join(name.as_str())
    }

    fn version_dir(&self, name: &ModelName, version: &ModelVersion) -> PathBuf {
        self.model_dir(name).join(version.as_str())
    }

    /// Where the download of the artifact with this digest is staged.
    pub fn staging_path(&self, sha256: &Sha256Digest) -> PathBuf {
        self.staging.join(format!("{sha256}.part"))
    }

    pub fn remove_staging(&self, sha256: &Sha256Digest) {
        let path = self.staging_path(sha256);
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a staging file");
            }
        }
    }

    /// Moves a verified staged artifact into the store with its signed manifest. Installing the
    /// same version with the same bytes again is a no-op.
    pub fn install(
        &self,
        envelope: &Envelope,
        manifest: &Manifest,
        staged: &Path,
    ) -> Result<(), StoreError> {
        self.install_with_profile(envelope, manifest, staged, None)
    }

    /// [`ModelStore::install`], with the staged reference profile the manifest names (which
    /// must be given exactly when the manifest names one).
    pub fn install_with_profile(
        &self,
        envelope: &Envelope,
        manifest: &Manifest,
        staged: &Path,
        staged_profile: Option<&Path>,
    ) -> Result<(), StoreError> {
        // Hidden names mark crash leftovers (`open` removes them) and ACTIVE.json is the pointer.
        for (what, value) in [
            ("model name", manifest.name.as_str()),
            ("version", manifest.version.as_str()),
        ] {
            if value.starts_with('.') || value.eq_ignore_ascii_case(ACTIVE) {
                return Err(StoreError::ReservedName {
                    what,
                    value: value.to_string(),
                });
            }
        }
        let (size, digest) = hash_file(staged).map_err(io(staged))?;
        verify_artifact(manifest, size, &digest).map_err(|e| StoreError::Corrupt {
            path: staged.to_path_buf(),
            reason: e.to_string(),
        })?;
        match (manifest.profile(), staged_profile) {
            (None, None) => {}
            (Some(expected), Some(path)) => {
                let (size, digest) = hash_file(path).map_err(io(path))?;
                verify_blob(&expected, size, &digest).map_err(|e| StoreError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!("reference profile: {e}"),
                })?;
            }
            (Some(_), None) => {
                return Err(StoreError::Corrupt {
                    path: staged.to_path_buf(),
                    reason: "the manifest names a reference profile and none was given".into(),
                })
            }
            (None, Some(path)) => {
                return Err(StoreError::Corrupt {
                    path: path.to_path_buf(),
                    reason: "a reference profile the manifest does not name".into(),
                })
            }
        }
        let final_dir = self.version_dir(&manifest.name, &manifest.version);
        if final_dir.exists() {
            let existing = read_manifest(&final_dir)?;
            if existing.sha256 == manifest.sha256 {
                let _ = fs::remove_file(staged);
                if let Some(profile) = staged_profile {
                    let _ = fs::remove_file(profile);
                }
                return Ok(());
            }
            return Err(StoreError::Conflict {
                name: manifest.name.clone(),
                version: manifest.version.clone(),
                installed: existing.sha256,
            });
        }
        let model_dir = self.model_dir(&manifest.name);
        fs::create_dir_all(&model_dir).map_err(io(&model_dir))?;
        let building = model_dir.join(format!(".{}.installing", manifest.version));
        if building.exists() {
            fs::remove_dir_all(&building).map_err(io(&building))?;
        }
        fs::create_dir(&building).map_err(io(&building))?;
        atomic_write(&building.join(MANIFEST), &fleet_protocol::encode(envelope))
            .map_err(io(&building))?;
        if let Some(profile) = staged_profile {
            let path = building.join(PROFILE);
            fs::rename(profile, &path).map_err(io(&path))?;
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io(&path))?;
        }
        let model_path = building.join(MODEL);
        fs::rename(staged, &model_path).map_err(io(&model_path))?;
        fs::File::open(&model_path)
            .and_then(|f| f.sync_all())
            .map_err(io(&model_path))?;
        fsync_dir(&building).map_err(io(&building))?;
        sync_rename(&building, &final_dir).map_err(io(&final_dir))
    }

    /// Makes an installed version the active one; the old active one becomes `previous`.
    pub fn activate(&self, name: &ModelName, version: &ModelVersion) -> Result<(), StoreError> {
        if !self.version_dir(name, version).join(MODEL).exists() {
            return Err(StoreError::NotInstalled {
                name: name.clone(),
                version: version.clone(),
            });
        }
        let old = self.pointer(name).ok().flatten();
        let previous = match old {
            Some(p) if &p.active == version => p.previous,
            Some(p) => Some(p.active),
            None => None,
        };
        self.write_pointer(
            name,
            &ActivePointer {
                active: version.clone(),
                previous,
            },
        )
    }

    /// Goes back to the previous version and returns it. Afterwards there is no previous one:
    /// the version rolled away from is not a fallback target.
    pub fn rollback(&self, name: &ModelName) -> Result<ModelVersion, StoreError> {
        let pointer = self
            .pointer(name)?
            .and_then(|p| p.previous)
            .ok_or_else(|| StoreError::NoPrevious { name: name.clone() })?;
        self.write_pointer(
            name,
            &ActivePointer {
                active: pointer.clone(),
                previous: None,
            },
        )?;
        Ok(pointer)
    }

    fn write_pointer(&self, name: &ModelName, pointer: &ActivePointer) -> Result<(), StoreError> {
        let path = self.model_dir(name).join(ACTIVE);
        let bytes = serde_json::to_vec(pointer).expect("plain data serialises");
        atomic_write(&path, &bytes).map_err(io(&path))
    }

    /// The model's active pointer, if it has one.
    pub fn pointer(&self, name: &ModelName) -> Result<Option<ActivePointer>, StoreError> {
        let path = self.model_dir(name).join(ACTIVE);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt {
                        path,
                        reason: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(cause) => Err(StoreError::Io { path, cause }),
        }
    }

    /// Reads a version back and re-verifies it: manifest signature, artifact size and digest.
    pub fn load(
        &self,
        name: &ModelName,
        version: &ModelVersion,
        trusted: &KeyRing,
    ) -> Result<StoredModel, StoreError> {
        let dir = self.version_dir(name, version);
        if !dir.exists() {
            return Err(StoreError::NotInstalled {
                name: name.clone(),
                version: version.clone(),
            });
        }
        let manifest_path = dir.join(MANIFEST);
        let bytes = read_bounded(
            &manifest_path,
            fleet_protocol::limits::MAX_CONTROL_MESSAGE_BYTES as u64,
        )
        .map_err(io(&manifest_path))?;
        let corrupt = |reason: String| StoreError::Corrupt {
            path: manifest_path.clone(),
            reason,
        };
        let envelope: Envelope = decode(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let manifest = verify_manifest(&envelope, trusted).map_err(|e| corrupt(e.to_string()))?;
        if &manifest.name != name || &manifest.version != version {
            return Err(corrupt(format!(
                "holds the manifest of {} {}",
                manifest.name, manifest.version
            )));
        }
        let model_path = dir.join(MODEL);
        // Never more than the signed size (plus one byte, to tell "too long").
        let onnx = read_bounded(&model_path, manifest.size).map_err(io(&model_path))?;
        verify_artifact(&manifest, onnx.len() as u64, &Sha256Digest::of(&onnx)).map_err(|e| {
            StoreError::Corrupt {
                path: model_path.clone(),
                reason: e.to_string(),
            }
        })?;
        let profile = match manifest.profile() {
            None => None,
            Some(expected) => {
                let path = dir.join(PROFILE);
                let bytes = read_bounded(&path, expected.size).map_err(io(&path))?;
                verify_blob(&expected, bytes.len() as u64, &Sha256Digest::of(&bytes)).map_err(
                    |e| StoreError::Corrupt {
                        path: path.clone(),
                        reason: format!("reference profile: {e}"),
                    },
                )?;
                Some(bytes)
            }
        };
        Ok(StoredModel {
            envelope,
            manifest,
            onnx,
            profile,
        })
    }

    /// Installed versions with their release counters, oldest release first. Versions whose
    /// manifest cannot be read are left out (and logged).
    pub fn versions(&self, name: &ModelName) -> Result<Vec<(ModelVersion, u64)>, StoreError> {
        let dir = self.model_dir(name);
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut versions = Vec::new();
        for entry in read_dir(&dir)? {
            if !entry.is_dir() || file_name(&entry).starts_with('.') {
                continue;
            }
            match read_manifest(&entry) {
                Ok(manifest) => versions.push((manifest.version, manifest.release)),
                Err(e) => tracing::warn!(error = %e, "unreadable stored version"),
            }
        }
        versions.sort_by_key(|(_, release)| *release);
        Ok(versions)
    }

    /// Models with anything stored.
    pub fn models(&self) -> Result<Vec<ModelName>, StoreError> {
        let mut names: Vec<ModelName> = read_dir(&self.models)?
            .into_iter()
            .filter(|p| p.is_dir())
            .filter_map(|p| ModelName::new(file_name(&p)).ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Removes the oldest versions beyond `keep`, never the active or previous one.
    pub fn prune(&self, name: &ModelName) -> Result<Vec<ModelVersion>, StoreError> {
        let pointer = self.pointer(name)?;
        let protected = |v: &ModelVersion| {
            pointer
                .as_ref()
                .is_some_and(|p| &p.active == v || p.previous.as_ref() == Some(v))
        };
        let versions = self.versions(name)?;
        let excess = versions.len().saturating_sub(self.keep);
        let mut removed = Vec::new();
        for (version, _) in versions.into_iter() {
            if removed.len() == excess {
                break;
            }
            if protected(&version) {
                continue;
            }
            let dir = self.version_dir(name, &version);
            fs::remove_dir_all(&dir).map_err(io(&dir))?;
            removed.push(version);
        }
        if !removed.is_empty() {
            let dir = self.model_dir(name);
            fsync_dir(&dir).map_err(io(&dir))?;
        }
        Ok(removed)
    }

    /// Removes a model entirely.
    pub fn retire(&self, name: &ModelName) -> Result<(), StoreError> {
        let dir = self.model_dir(name);
        match fs::remove_dir_all(&dir) {
            Ok(()) => fsync_dir(&self.models).map_err(io(&self.models)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(cause) => Err(StoreError::Io { path: dir, cause }),
        }
    }

    /// At start: checks every model's active version with `check` (the caller loads it with
    /// tract and runs its self-test). A failing one falls back to the previous version, then to
    /// the newest other version that passes; the pointer is rewritten to match.
    pub fn recover(
        &self,
        trusted: &KeyRing,
        check: impl Fn(&StoredModel) -> Result<(), String>,
    ) -> Vec<Recovery> {
        let names = match self.models() {
            Ok(names) => names,
            Err(e) => {
                tracing::error!(error = %e, "cannot list stored models");
                return Vec::new();
            }
        };
        let mut outcomes = Vec::new();
        for name in names {
            let valid = |version: &ModelVersion| -> Result<(), String> {
                let stored = self
                    .load(&name, version, trusted)
                    .map_err(|e| e.to_string())?;
                check(&stored)
            };
            let (active, previous, reason) = match self.pointer(&name) {
                Ok(Some(pointer)) => match valid(&pointer.active) {
                    Ok(()) => {
                        outcomes.push(Recovery::Kept {
                            name: name.clone(),
                            version: pointer.active,
                        });
                        continue;
                    }
                    Err(reason) => (Some(pointer.active), pointer.previous, reason),
                },
                Ok(None) => (None, None, "no active version".to_string()),
                Err(e) => (None, None, e.to_string()),
            };
            // Candidates: the previous version first, then the others, newest release first.
            let mut candidates: Vec<ModelVersion> = previous.into_iter().collect();
            let mut others = self.versions(&name).unwrap_or_default();
            others.reverse();
            for (version, _) in others {
                if Some(&version) != active.as_ref() && !candidates.contains(&version) {
                    candidates.push(version);
                }
            }
            let fallback = candidates.into_iter().find(|v| valid(v).is_ok());
            match fallback {
                Some(to) => {
                    let pointer = ActivePointer {
                        active: to.clone(),
                        previous: None,
                    };
                    if let Err(e) = self.write_pointer(&name, &pointer) {
                        tracing::error!(model = %name, error = %e, "cannot rewrite the active pointer");
                    }
                    tracing::warn!(model = %name, to = %to, %reason, "fell back to a good version");
                    outcomes.push(match active {
                        Some(from) => Recovery::FellBack {
                            name: name.clone(),
                            from,
                            to,
                            reason,
                        },
                        None => Recovery::Kept {
                            name: name.clone(),
                            version: to,
                        },
                    });
                }
                None => {
                    tracing::error!(model = %name, %reason, "no valid version on disk");
                    outcomes.push(Recovery::NoValidVersion {
                        name: name.clone(),
                        reason,
                    });
                }
            }
        }
        outcomes
    }
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        entries.push(entry.map_err(io(dir))?.path());
    }
    entries.sort();
    Ok(entries)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The manifest of a version directory, without checking its signature (for listing only).
fn read_manifest(dir: &Path) -> Result<Manifest, StoreError> {
    let path = dir.join(MANIFEST);
    let bytes = fs::read(&path).map_err(io(&path))?;
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.clone(),
        reason,
    };
    let envelope: Envelope = decode(&bytes).map_err(|e| corrupt(e.to_string()))?;
    decode(&envelope.payload).map_err(|e| corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use fleet_protocol::{SigningKey, MANIFEST_TYPE, V1};

    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[2; 32])
    }

    fn ring() -> KeyRing {
        [key().verifying_key()].into_iter().collect()
    }

    /// A signed manifest for `models/{model}/{version}.onnx`, staged as a download would be.
    fn staged(
        store: &ModelStore,
        model: &str,
        version: &str,
        release: u64,
    ) -> (Envelope, Manifest, PathBuf) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models")
            .join(model)
            .join(format!("{version}.onnx"));
        let onnx = fs::read(&path).unwrap();
        let case = serde_json::from_slice(&fs::read(path.with_extension("selftest.json")).unwrap())
            .unwrap();
        let signature = crate::runtime::inspect(&onnx).unwrap();
        let manifest = Manifest {
            v: V1,
            name: ModelName::new(model).unwrap(),
            release,
            version: ModelVersion::new(version).unwrap(),
            sha256: Sha256Digest::of(&onnx),
            size: onnx.len() as u64,
            inputs: signature.inputs,
            outputs: signature.outputs,
            self_test: case,
            profile_sha256: None,
            profile_size: None,
            min_agent_version: None,
            created_at_ms: 0,
        };
        let envelope = Envelope::sign(MANIFEST_TYPE, fleet_protocol::encode(&manifest), &key());
        let staging = store.staging_path(&manifest.sha256);
        fs::write(&staging, &onnx).unwrap();
        (envelope, manifest, staging)
    }

    fn name() -> ModelName {
        ModelName::new("digits-mlp").unwrap()
    }

    fn v(s: &str) -> ModelVersion {
        ModelVersion::new(s).unwrap()
    }

    fn install(store: &ModelStore, version: &str, release: u64) {
        let (e, m, s) = staged(store, "digits-mlp", version, release);
        store.install(&e, &m, &s).unwrap();
        store.activate(&m.name, &m.version).unwrap();
    }

    #[test]
    fn install_activate_load_and_previous() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path(), 3).unwrap();
        install(&store, "v1", 1);
        install(&store, "v2", 2);
        let pointer = store.pointer(&name()).unwrap().unwrap();
        assert_eq!((pointer.active, pointer.previous), (v("v2"), Some(v("v1"))));
        let stored = store.load(&name(), &v("v2"), &ring()).unwrap();
        assert_eq!(stored.manifest.release, 2);
        assert_eq!(
            store.versions(&name()).unwrap(),
            vec![(v("v1"), 1), (v("v2"), 2)]
        );
        // Staging files are consumed by install.
        assert_eq!(fs::read_dir(dir.path().join("staging")).unwrap().count(), 0);
        assert_eq!(store.rollback(&name()).unwrap(), v("v1"));
        assert!(matches!(
            store.rollback(&name()),
            Err(StoreError::NoPrevious { .. })
        ));
    }

    #[test]
    fn install_is_idempotent_and_refuses_other_bytes_under_the_same_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path(), 3).unwrap();
        install(&store, "v1", 1);
        let (e, m, s) = staged(&store, "digits-mlp", "v1", 1);
        store.install(&e, &m, &s).unwrap();
        // The v2 file announced as v1.
        let (_, mut other, s) = staged(&store, "digits-mlp", "v2", 2);
        other.version = v("v1");
        let e = Envelope::sign(MANIFEST_TYPE, fleet_protocol::encode(&other), &key());
        assert!(matches!(
            store.install(&e, &other, &s),
            Err(StoreError::Conflict { .. })
        ));
    }

    #[test]
    fn a_staged_file_with_wrong_bytes_is_refused_and_nothing_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path(), 3).unwrap();
        let (e, m, s) = staged(&store, "digits-mlp", "v1", 1);
        let mut bytes = fs::read(&s).unwrap();
        bytes[100] ^= 1;
        fs::write(&s, bytes).unwrap();
        let err = store.install(&e, &m, &s).unwrap_err().to_string();
        assert!(err.contains("hash mismatch"), "{err}");
        assert!(store.versions(&name()).unwrap().is_empty());
    }

    #[test]
    fn names_that_collide_with_the_stores_own_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path(), 3).unwrap();
        for bad in [".v1", "ACTIVE.json", "active.JSON"] {
            let (_, mut m, s) = staged(&store, "digits-mlp", "v1", 1);
            m.version = v(bad);
            let e = Envelope::sign(MANIFEST_TYPE, fleet_protocol::encode(&m), &key());
            let err = store.install(&e, &m, &s).unwrap_err();
            assert!(
                matches!(err, StoreError::ReservedName { .. }),
                "{bad}: {err}"
            );
        }
        assert!(store.versions(&name()).unwrap().is_empty());
    }

    #[test]
    fn prune_keeps_active_previous_and_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path(), 2).unwrap();
        install(&store, "v1", 1);
        install(&store, "v2", 2);
        install(&store, "v3", 3);
        assert_eq!(store.prune(&name()).unwrap(), vec![v("v1")]);
        assert_eq!(store.versions(&name()).unwrap().len(), 2);
    }

    #[test]
    fn a_stored_artifact_that_grew_is_refused_without_reading_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path(), 3).unwrap();
        install(&store, "v1", 1);
        let model = dir.path().join("models/digits-mlp/v1/model.onnx");
        let size = fs::metadata(&model).unwrap().len();
        let file = fs::OpenOptions::new().append(true).open(&model).unwrap();
        // 1 GiB of holes: cheap on disk, and far more than load may read.
        file.set_len(size + (1 << 30)).unwrap();
        let err = store
            .load(&name(), &v("v1"), &ring())
            .unwrap_err()
            .to_string();
        assert!(err.contains("size"), "{err}");
        assert_eq!(
            crate::fsutil::read_bounded(&model, size).unwrap().len() as u64,
            size + 1
        );
    }

    #[test]
    fn damage_on_disk_is_caught_and_recovery_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path(), 3).unwrap();
        install(&store, "v1", 1);
        install(&store, "v2", 2);
        let model = dir.path().join("models/digits-mlp/v2/model.onnx");
        let mut bytes = fs::read(&model).unwrap();
        bytes[50] ^= 1;
        fs::write(&model, bytes).unwrap();
        assert!(store
            .load(&name(), &v("v2"), &ring())
            .unwrap_err()
            .to_string()
            .contains("hash mismatch"));
        let outcome = store.recover(&ring(), |_| Ok(()));
        assert!(
            matches!(&outcome[0], Recovery::FellBack { from, to, .. } if from == &v("v2") && to == &v("v1")),
            "{outcome:?}"
        );
        assert_eq!(store.pointer(&name()).unwrap().unwrap().active, v("v1"));

        // A manifest signed by someone else is refused at load.
        let stranger: KeyRing = [SigningKey::from_bytes(&[9; 32]).verifying_key()]
            .into_iter()
            .collect();
        assert!(store
            .load(&name(), &v("v1"), &stranger)
            .unwrap_err()
            .to_string()
            .contains("unknown key"));
    }

    #[test]
    fn a_corrupt_pointer_and_crash_leftovers_are_handled() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = ModelStore::open(dir.path(), 3).unwrap();
            install(&store, "v1", 1);
        }
        let model_dir = dir.path().join("models/digits-mlp");
        fs::write(model_dir.join(ACTIVE), b"{not json").unwrap();
        fs::create_dir(model_dir.join(".v2.installing")).unwrap();
        fs::write(model_dir.join(".ACTIVE.json.tmp-1"), b"x").unwrap();
        let store = ModelStore::open(dir.path(), 3).unwrap();
        assert!(!model_dir.join(".v2.installing").exists());
        assert!(!model_dir.join(".ACTIVE.json.tmp-1").exists());
        let err = store.pointer(&name()).unwrap_err().to_string();
        assert!(err.contains("ACTIVE.json"), "{err}");
        let outcome = store.recover(&ring(), |_| Ok(()));
        assert!(
            matches!(&outcome[0], Recovery::Kept { version, .. } if version == &v("v1")),
            "{outcome:?}"
        );
        assert_eq!(store.pointer(&name()).unwrap().unwrap().active, v("v1"));
    }
}
