//! Key files on disk: private keys as PKCS#8 PEM with mode 0600, public keys as SPKI PEM.
//! An existing key file is never overwritten: losing a release key is unrecoverable.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use fleet_protocol::keys::{self, KeyError};
use fleet_protocol::{KeyId, SigningKey, VerifyingKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite a key (move it away first)")]
    Exists { path: PathBuf },
    #[error("{path}: {cause}")]
    Key { path: PathBuf, cause: KeyError },
    #[error("no randomness available from the operating system: {0}")]
    Random(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |cause| KeyFileError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// A freshly generated key pair on disk.
#[derive(Debug)]
pub struct GeneratedKey {
    pub private_path: PathBuf,
    pub public_path: PathBuf,
    pub key_id: KeyId,
}

/// Generates an Ed25519 key pair as `{dir}/{name}.pem` (mode 0600) and `{dir}/{name}.pub`.
/// Creates `dir` (mode 0700) if needed; refuses if either file exists.
pub fn generate(dir: &Path, name: &str) -> Result<GeneratedKey, KeyFileError> {
    let private_path = dir.join(format!("{name}.pem"));
    let public_path = dir.join(format!("{name}.pub"));
    for path in [&private_path, &public_path] {
        if path.exists() {
            return Err(KeyFileError::Exists { path: path.clone() });
        }
    }
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyFileError::Random(e.to_string()))?;
    let key = SigningKey::from_bytes(&seed);
    let private_pem = keys::signing_key_to_pem(&key).map_err(|cause| KeyFileError::Key {
        path: private_path.clone(),
        cause,
    })?;
    let public_pem =
        keys::verifying_key_to_pem(&key.verifying_key()).map_err(|cause| KeyFileError::Key {
            path: public_path.clone(),
            cause,
        })?;
    write_new(&private_path, private_pem.as_bytes(), 0o600)?;
    if let Err(e) = write_new(&public_path, public_pem.as_bytes(), 0o644) {
        // Leave no half pair behind: a private key without its public half is confusing.
        let _ = fs::remove_file(&private_path);
        return Err(e);
    }
    Ok(GeneratedKey {
        private_path,
        public_path,
        key_id: KeyId::of(&key.verifying_key()),
    })
}

/// Writes a file that must not exist yet, with `mode`, and syncs it.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), KeyFileError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|cause| {
            if cause.kind() == std::io::ErrorKind::AlreadyExists {
                KeyFileError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                KeyFileError::Io {
                    path: path.to_path_buf(),
                    cause,
                }
            }
        })?;
    file.write_all(contents).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// Reads a private key.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, KeyFileError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    keys::signing_key_from_pem(&text).map_err(|cause| KeyFileError::Key {
        path: path.to_path_buf(),
        cause,
    })
}

/// Reads a public key.
pub fn read_verifying_key(path: &Path) -> Result<VerifyingKey, KeyFileError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    keys::verifying_key_from_pem(&text).map_err(|cause| KeyFileError::Key {
        path: path.to_path_buf(),
        cause,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn generates_a_private_key_only_its_owner_can_read_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join("keys");
        let key = generate(&keys_dir, "release").unwrap();
        let mode = fs::metadata(&key.private_path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let signing = read_signing_key(&key.private_path).unwrap();
        let public = read_verifying_key(&key.public_path).unwrap();
        assert_eq!(signing.verifying_key(), public);
        assert_eq!(KeyId::of(&public), key.key_id);

        let before = fs::read(&key.private_path).unwrap();
        assert!(matches!(
            generate(&keys_dir, "release"),
            Err(KeyFileError::Exists { .. })
        ));
        assert_eq!(fs::read(&key.private_path).unwrap(), before);
    }
}
