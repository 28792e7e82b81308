//! The fleet's device CA: one ECDSA P-256 key and self-signed certificate in a directory,
//! issuing device client certificates (CN = device id), the broker's server certificate, and
//! CRLs for brokers that read one (Mosquitto's `crlfile`).
//!
//! The CA key never leaves `dir/ca.key` (mode 0600); an existing CA is never overwritten,
//! because every enrolled device trusts exactly this certificate.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fleet_protocol::DeviceId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// File name of the CA certificate inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Common name of a CA this module creates.
pub const CA_COMMON_NAME: &str = "Driftgate device CA";
/// How long a new CA certificate is valid: devices pin it, so replacing it means re-enrolling.
pub const CA_VALID_DAYS: i64 = 20 * 365;
/// `nextUpdate` of a CRL, counted from its issue. OpenSSL (Mosquitto) refuses every client
/// once the CRL has expired, so the server must re-issue it well before (on every revoke and
/// at start); a year keeps a forgotten re-issue from taking the fleet offline soon.
pub const CRL_VALID_DAYS: i64 = 365;
/// Certificates start to be valid this long before their issue: devices with a slightly
/// late clock must not refuse a certificate issued "in their future".
const BACKDATE: Duration = Duration::hours(1);
/// Length of the random serial numbers, in bytes (RFC 5280 allows up to 20).
const SERIAL_BYTES: usize = 16;

/// Why a CA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{present} exists but {missing} does not; refusing to create a new CA over half of one (restore the missing file or move both away)")]
    HalfPresent { present: PathBuf, missing: PathBuf },
    #[error("{path} is readable by group or others (mode {mode:o}); the CA key must be 0600 (chmod 600 it)")]
    KeyTooOpen { path: PathBuf, mode: u32 },
    #[error("{path}: not a usable CA: {cause}")]
    BadCa { path: PathBuf, cause: rcgen::Error },
    #[error("cannot {what}: {cause}")]
    Generate {
        what: &'static str,
        cause: rcgen::Error,
    },
    #[error("serial {serial:?} is not an even-length hex string of at most 20 bytes")]
    BadSerial { serial: String },
    #[error("revocation time {unix} is out of range")]
    BadTime { unix: i64 },
    #[error("no server name given; the broker certificate needs at least one DNS name or IP")]
    NoServerNames,
    #[error("validity of {days} days is not allowed (1 to 36500)")]
    BadValidity { days: u32 },
    #[error("no randomness available from the operating system: {0}")]
    Random(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |cause| CaError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// A freshly issued certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    /// The serial as lower-case hex, 32 digits (what `crl_pem` takes back).
    pub serial_hex: String,
    pub not_after_unix: i64,
}

impl std::fmt::Debug for IssuedCert {
    /// Leaves the private key out: debug output ends up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial_hex", &self.serial_hex)
            .field("not_after_unix", &self.not_after_unix)
            .finish_non_exhaustive()
    }
}

/// The device CA, loaded from (or created in) its directory.
pub struct DeviceCa {
    dir: PathBuf,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for DeviceCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCa")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl DeviceCa {
    /// Loads `dir/ca.pem` + `dir/ca.key` (key file mode 0600), or creates them (and `dir`,
    /// mode 0700) when neither exists; the bool is true when the CA was created now.
    pub fn load_or_create(dir: &Path) -> Result<(DeviceCa, bool), CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Ok((Self::load(dir, &cert_path, &key_path)?, false)),
            (false, false) => Ok((Self::create(dir, &cert_path, &key_path)?, true)),
            (true, false) => Err(CaError::HalfPresent {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(CaError::HalfPresent {
                present: key_path,
                missing: cert_path,
            }),
        }
    }

    fn load(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<DeviceCa, CaError> {
        let mode = fs::metadata(key_path)
            .map_err(io(key_path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(CaError::KeyTooOpen {
                path: key_path.to_path_buf(),
                mode: mode & 0o777,
            });
        }
        let key_pem = fs::read_to_string(key_path).map_err(io(key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|cause| CaError::BadCa {
            path: key_path.to_path_buf(),
            cause,
        })?;
        let cert_pem = fs::read_to_string(cert_path).map_err(io(cert_path))?;
        // Rebuilds the issuer (subject DN, key identifier) from the certificate itself, so
        // what we sign names exactly the CA the devices trust. rcgen also checks that the key
        // belongs to the certificate.
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|cause| CaError::BadCa {
            path: cert_path.to_path_buf(),
            cause,
        })?;
        tracing::info!(dir = %dir.display(), "loaded the device CA");
        Ok(DeviceCa {
            dir: dir.to_path_buf(),
            cert_pem,
            issuer,
        })
    }

    fn create(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<DeviceCa, CaError> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
        }
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, CA_COMMON_NAME);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Driftgate");
        // Path length 0: this CA signs leaf certificates only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(CA_VALID_DAYS);
        params.serial_number = Some(random_serial()?.0);
        params.key_identifier_method = KeyIdMethod::Sha256;
        let key = KeyPair::generate().map_err(|cause| CaError::Generate {
            what: "generate the CA key",
            cause,
        })?;
        let cert = params
            .self_signed(&key)
            .map_err(|cause| CaError::Generate {
                what: "self-sign the CA certificate",
                cause,
            })?;
        let cert_pem = cert.pem();
        // Key first: a crash in between leaves a key without a certificate, which the next
        // start refuses loudly instead of silently making a second CA.
        write_new_atomically(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_new_atomically(cert_path, cert_pem.as_bytes(), 0o644)?;
        sync_dir(dir)?;
        tracing::info!(dir = %dir.display(), "created a new device CA");
        Ok(DeviceCa {
            dir: dir.to_path_buf(),
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM: what devices and brokers trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// `dir/ca.pem`.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    /// A client certificate for `device`: CN = device id, EKU clientAuth only (so it cannot
    /// serve as a broker certificate), a random 16-byte serial, valid for `valid_days`.
    pub fn issue_device(&self, device: &DeviceId, valid_days: u32) -> Result<IssuedCert, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, device.as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, valid_days, "device certificate")
    }

    /// The broker's server certificate: SANs = `names` (DNS names or IP addresses), EKU
    /// serverAuth only (so it cannot log in as a device).
    pub fn issue_server(&self, names: &[String], valid_days: u32) -> Result<IssuedCert, CaError> {
        let first = names.first().ok_or(CaError::NoServerNames)?;
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(|cause| CaError::Generate {
                what: "use the broker's names",
                cause,
            })?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, first);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, valid_days, "broker certificate")
    }

    fn issue(
        &self,
        mut params: CertificateParams,
        valid_days: u32,
        what: &'static str,
    ) -> Result<IssuedCert, CaError> {
        if !(1..=36_500).contains(&valid_days) {
            return Err(CaError::BadValidity { days: valid_days });
        }
        let now = OffsetDateTime::now_utc();
        let not_after = now + Duration::days(i64::from(valid_days));
        let (serial, serial_hex) = random_serial()?;
        params.serial_number = Some(serial);
        params.not_before = now - BACKDATE;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(|cause| CaError::Generate { what, cause })?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|cause| CaError::Generate { what, cause })?;
        tracing::debug!(serial = %serial_hex, what, "issued a certificate");
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial_hex,
            not_after_unix: not_after.unix_timestamp(),
        })
    }

    /// A PEM CRL listing `revoked` = (serial_hex, revoked_at_unix), numbered `crl_number`
    /// (must grow with every new CRL), valid for [`CRL_VALID_DAYS`].
    pub fn crl_pem(&self, revoked: &[(String, i64)], crl_number: u64) -> Result<String, CaError> {
        let revoked_certs = revoked
            .iter()
            .map(|(serial, at)| {
                Ok(RevokedCertParams {
                    serial_number: parse_serial(serial)?,
                    revocation_time: OffsetDateTime::from_unix_timestamp(*at)
                        .map_err(|_| CaError::BadTime { unix: *at })?,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, CaError>>()?;
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            // Backdated like certificates: a verifier with a slow clock must not see a CRL
            // from the future.
            this_update: now - BACKDATE,
            next_update: now + Duration::days(CRL_VALID_DAYS),
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|cause| CaError::Generate {
                what: "sign the CRL",
                cause,
            })?;
        crl.pem().map_err(|cause| CaError::Generate {
            what: "encode the CRL",
            cause,
        })
    }
}

/// A random positive serial of exactly [`SERIAL_BYTES`] bytes, and its hex. The top bit is
/// cleared (a DER INTEGER with it set would be negative) and the next one set (so there is no
/// leading zero byte and the hex always has 32 digits, whatever tool prints it).
fn random_serial() -> Result<(SerialNumber, String), CaError> {
    let mut bytes = [0u8; SERIAL_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| CaError::Random(e.to_string()))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok((SerialNumber::from_slice(&bytes), hex::encode(bytes)))
}

fn parse_serial(serial: &str) -> Result<SerialNumber, CaError> {
    let bad = || CaError::BadSerial {
        serial: serial.to_string(),
    };
    let bytes = hex::decode(serial).map_err(|_| bad())?;
    if bytes.is_empty() || bytes.len() > 20 {
        return Err(bad());
    }
    Ok(SerialNumber::from_slice(&bytes))
}

/// Writes `path` through a temporary file (mode `mode`, synced, renamed), refusing to replace
/// an existing file.
fn write_new_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    if path.exists() {
        return Err(CaError::Io {
            path: path.to_path_buf(),
            cause: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists"),
        });
    }
    let tmp = path.with_extension("tmp");
    // A leftover from an earlier crash holds nothing anyone trusts yet.
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(contents).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), CaError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_loads_the_same_ca_and_keeps_the_key_private() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let (ca, created) = DeviceCa::load_or_create(&ca_dir).unwrap();
        assert!(created);
        let mode = fs::metadata(ca_dir.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, created) = DeviceCa::load_or_create(&ca_dir).unwrap();
        assert!(!created);
        assert_eq!(ca.cert_pem(), again.cert_pem());
        assert_eq!(again.cert_path(), ca_dir.join(CA_CERT_FILE));

        let device = DeviceId::new("dev-17").unwrap();
        let issued = again.issue_device(&device, 30).unwrap();
        assert_eq!(issued.serial_hex.len(), 32);
        assert!(issued.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{issued:?}").contains("PRIVATE"));
        let crl = again
            .crl_pem(&[(issued.serial_hex.clone(), 1_700_000_000)], 1)
            .unwrap();
        assert!(crl.starts_with("-----BEGIN X509 CRL-----"));
    }

    #[test]
    fn refuses_half_a_ca_an_open_key_and_bad_serials() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = DeviceCa::load_or_create(dir.path()).unwrap();
        assert!(matches!(
            ca.crl_pem(&[("xyz".into(), 0)], 1),
            Err(CaError::BadSerial { .. })
        ));
        assert!(matches!(
            ca.issue_server(&[], 30),
            Err(CaError::NoServerNames)
        ));
        let key = dir.path().join(CA_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            DeviceCa::load_or_create(dir.path()),
            Err(CaError::KeyTooOpen { .. })
        ));
        fs::remove_file(&key).unwrap();
        assert!(matches!(
            DeviceCa::load_or_create(dir.path()),
            Err(CaError::HalfPresent { .. })
        ));
    }
}
