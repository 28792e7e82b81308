//! The model registry: signed manifests in the database, artifact and profile bytes on disk,
//! content-addressed by SHA-256 (`{data_dir}/blobs/ab/abcdef…`).
//!
//! A push streams each blob into a staging file while hashing it, so a model of any size
//! costs a fixed amount of memory, and nothing reaches the blob directory until the manifest's
//! signature, size and digest all check out. Chunks are served from the same files with
//! positioned reads (see `artifacts`), never by loading a blob whole.

use std::path::{Path, PathBuf};

use fleet_protocol::manifest::Manifest;
use fleet_protocol::{decode, BlobRef, Envelope, KeyRing, Sha256Digest, TrustError};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::store::{now_ms, ModelRecord, Store, StoreError};

/// Why a push, a show or a delete was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("the manifest is not signed by a trusted release key: {0}")]
    Untrusted(TrustError),
    #[error("no release key is trusted: configure [trust] release_keys")]
    NoTrustedKeys,
    #[error("malformed manifest envelope: {0}")]
    BadEnvelope(String),
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    Conflict(String),
    #[error("no model {0}")]
    NotFound(String),
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Content-addressed files on disk.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    pub fn new(dir: PathBuf) -> BlobStore {
        BlobStore { dir }
    }

    /// Where the blob with this digest lives (whether or not it exists).
    pub fn path(&self, sha256: &str) -> PathBuf {
        let prefix = sha256.get(..2).unwrap_or("xx");
        self.dir.join(prefix).join(sha256)
    }

    /// A new staging file to stream a blob into.
    pub async fn stage(&self) -> Result<StagedBlob, std::io::Error> {
        let dir = self.dir.join("staging");
        tokio::fs::create_dir_all(&dir).await?;
        let mut name = [0u8; 12];
        getrandom::fill(&mut name).map_err(|e| std::io::Error::other(e.to_string()))?;
        let path = dir.join(hex::encode(name));
        let file = tokio::fs::File::create(&path).await?;
        Ok(StagedBlob {
            path,
            file: Some(file),
            hasher: Sha256::new(),
            size: 0,
            limit: u64::MAX,
        })
    }

    /// Moves a verified staging file into place (crash-safe: fsync, rename, fsync dir).
    async fn commit(&self, staged: StagedBlob, sha256: &str) -> Result<(), std::io::Error> {
        let target = self.path(sha256);
        let parent = target.parent().unwrap_or(&self.dir).to_path_buf();
        tokio::fs::create_dir_all(&parent).await?;
        if tokio::fs::try_exists(&target).await? {
            // The same bytes are there already (another version shares them).
            tokio::fs::remove_file(&staged.path).await?;
            return Ok(());
        }
        tokio::fs::rename(&staged.path, &target).await?;
        let dir = tokio::fs::File::open(&parent).await?;
        dir.sync_all().await?;
        Ok(())
    }

    pub async fn remove(&self, sha256: &str) -> Result<(), std::io::Error> {
        match tokio::fs::remove_file(self.path(sha256)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// A blob being received: hashed and counted as it is written.
pub struct StagedBlob {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    hasher: Sha256,
    size: u64,
    limit: u64,
}

impl StagedBlob {
    /// Refuse more than `limit` bytes (the manifest's size, once known).
    pub fn limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), RegistryError> {
        self.size += bytes.len() as u64;
        if self.size > self.limit {
            return Err(RegistryError::Mismatch(format!(
                "more than the {} bytes the manifest declares",
                self.limit
            )));
        }
        self.hasher.update(bytes);
        if let Some(file) = &mut self.file {
            file.write_all(bytes).await?;
        }
        Ok(())
    }

    /// Flushes to disk; returns (size, digest).
    async fn finish(&mut self) -> Result<(u64, Sha256Digest), RegistryError> {
        if let Some(mut file) = self.file.take() {
            file.flush().await?;
            file.sync_all().await?;
        }
        let digest = Sha256Digest::from(std::mem::take(&mut self.hasher).finalize());
        Ok((self.size, digest))
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for StagedBlob {
    fn drop(&mut self) {
        // A refused or abandoned push leaves nothing behind; a committed one was renamed away.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    Stored,
    /// The same manifest and bytes were there already.
    AlreadyPresent,
}

/// The registry: the database's model rows and the blob files, under one set of rules.
#[derive(Clone)]
pub struct Registry {
    store: Store,
    blobs: BlobStore,
    release_keys: KeyRing,
}

impl Registry {
    pub fn new(store: Store, blobs: BlobStore, release_keys: KeyRing) -> Registry {
        Registry {
            store,
            blobs,
            release_keys,
        }
    }

    /// The reference profile a model version was pushed with, when it has one.
    pub async fn profile(
        &self,
        record: &ModelRecord,
    ) -> Result<Option<fleet_protocol::ReferenceProfile>, RegistryError> {
        let Some(sha) = &record.profile_sha256 else {
            return Ok(None);
        };
        let bytes = tokio::fs::read(self.blobs.path(sha)).await?;
        let profile = decode(&bytes).map_err(|e| {
            std::io::Error::other(format!(
                "the profile of {}@{} is unreadable: {e}",
                record.name, record.version
            ))
        })?;
        Ok(Some(profile))
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// Opens and checks a manifest envelope as pushed: JSON, signed by a trusted release key.
    pub fn verify_envelope(&self, bytes: &[u8]) -> Result<(Envelope, Manifest), RegistryError> {
        if self.release_keys.is_empty() {
            return Err(RegistryError::NoTrustedKeys);
        }
        let envelope: Envelope =
            decode(bytes).map_err(|e| RegistryError::BadEnvelope(e.to_string()))?;
        // The signature first, then the contents: a well-signed manifest naming, say, a model
        // `../x` is malformed, not untrusted.
        let payload = envelope
            .open(&self.release_keys, fleet_protocol::MANIFEST_TYPE)
            .map_err(RegistryError::Untrusted)?;
        let manifest: Manifest =
            decode(payload).map_err(|e| RegistryError::BadEnvelope(format!("manifest: {e}")))?;
        Ok((envelope, manifest))
    }

    /// Stores a verified manifest with its staged artifact (and profile, when the manifest
    /// names one). The bytes must match the manifest exactly; the same name and version may
    /// be pushed again only with the same manifest and bytes.
    pub async fn push(
        &self,
        manifest_bytes: &[u8],
        manifest: &Manifest,
        mut artifact: StagedBlob,
        profile: Option<StagedBlob>,
    ) -> Result<PushOutcome, RegistryError> {
        check_blob("artifact", &mut artifact, manifest.artifact()).await?;
        let mut profile = match (manifest.profile(), profile) {
            (Some(expected), Some(mut staged)) => {
                check_blob("profile", &mut staged, expected).await?;
                Some(staged)
            }
            (Some(_), None) => {
                return Err(RegistryError::Mismatch(
                    "the manifest names a reference profile, and none was uploaded".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(RegistryError::Mismatch(
                    "a profile was uploaded, and the manifest names none (sign with --profile)"
                        .into(),
                ))
            }
            (None, None) => None,
        };
        let (name, version) = (manifest.name.as_str(), manifest.version.as_str());
        if let Some(existing) = self.store.model(name, version).await? {
            if existing.manifest == manifest_bytes {
                return Ok(PushOutcome::AlreadyPresent);
            }
            return Err(RegistryError::Conflict(format!(
                "{name}@{version} exists with other contents (sha256 {}); push a new version",
                existing.sha256
            )));
        }
        if let Some(existing) = self
            .store
            .model_by_release(name, manifest.release as i64)
            .await?
        {
            return Err(RegistryError::Conflict(format!(
                "{name} release {} is already {name}@{}",
                manifest.release, existing.version
            )));
        }
        let sha = manifest.sha256.to_hex();
        self.blobs.commit(artifact, &sha).await?;
        if let (Some(staged), Some(expected)) = (profile.take(), manifest.profile()) {
            self.blobs.commit(staged, &expected.sha256.to_hex()).await?;
        }
        self.store
            .insert_model(&ModelRecord {
                name: name.to_string(),
                version: version.to_string(),
                release: manifest.release as i64,
                sha256: sha,
                size: manifest.size as i64,
                profile_sha256: manifest.profile_sha256.map(|d| d.to_hex()),
                profile_size: manifest.profile_size.map(|s| s as i64),
                manifest: manifest_bytes.to_vec(),
                pushed_at_ms: now_ms(),
            })
            .await?;
        tracing::info!(
            model = name,
            version,
            release = manifest.release,
            "model pushed"
        );
        Ok(PushOutcome::Stored)
    }

    /// Deletes a version unless a device is assigned it or reports running it, and the blobs
    /// no other version uses.
    pub async fn delete(&self, name: &str, version: &str) -> Result<(), RegistryError> {
        let Some(record) = self.store.model(name, version).await? else {
            return Err(RegistryError::NotFound(format!("{name}@{version}")));
        };
        // A device may still run a version no longer assigned to it (it has not applied its
        // new directive yet, or is offline): its own report decides.
        let release = u64::try_from(record.release).unwrap_or(0);
        let running: Vec<String> = self
            .store
            .devices()
            .await?
            .into_iter()
            .filter(|d| {
                d.state
                    .as_ref()
                    .and_then(|s| serde_json::from_value::<fleet_protocol::State>(s.clone()).ok())
                    .is_some_and(|s| {
                        s.models.iter().any(|m| {
                            m.name.as_str() == name
                                && m.active.as_ref().is_some_and(|a| a.release == release)
                        })
                    })
            })
            .map(|d| d.id)
            .collect();
        if !running.is_empty() {
            return Err(RegistryError::Conflict(format!(
                "{name}@{version} is running on {} device(s): {}",
                running.len(),
                running.join(", ")
            )));
        }
        let orphans = self
            .store
            .delete_model(name, version)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(m) => RegistryError::Conflict(m),
                other => RegistryError::Store(other),
            })?;
        for digest in orphans {
            self.blobs.remove(&digest).await?;
        }
        tracing::info!(model = name, version, "model deleted");
        Ok(())
    }

    /// The manifest of a stored version, decoded (it was verified at push).
    pub fn manifest_of(record: &ModelRecord) -> Result<(Envelope, Manifest), RegistryError> {
        let envelope: Envelope = decode(&record.manifest)
            .map_err(|e| RegistryError::BadEnvelope(format!("stored manifest: {e}")))?;
        let manifest: Manifest = decode(&envelope.payload)
            .map_err(|e| RegistryError::BadEnvelope(format!("stored manifest: {e}")))?;
        Ok((envelope, manifest))
    }
}

async fn check_blob(
    what: &str,
    staged: &mut StagedBlob,
    expected: BlobRef,
) -> Result<(), RegistryError> {
    let (size, digest) = staged.finish().await?;
    if size != expected.size {
        return Err(RegistryError::Mismatch(format!(
            "the {what} is {size} bytes; the manifest says {}",
            expected.size
        )));
    }
    if digest != expected.sha256 {
        return Err(RegistryError::Mismatch(format!(
            "the {what}'s sha256 is {digest}; the manifest says {}",
            expected.sha256
        )));
    }
    Ok(())
}

/// Reads the keys listed in `[trust] release_keys`.
pub fn load_release_keys(paths: &[PathBuf]) -> Result<KeyRing, crate::keyfile::KeyFileError> {
    let mut ring = KeyRing::new();
    for path in paths {
        ring.insert(crate::keyfile::read_verifying_key(Path::new(path))?);
    }
    Ok(ring)
}
