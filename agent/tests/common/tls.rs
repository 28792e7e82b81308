//! A throwaway PKI for TLS tests: a CA, a broker certificate for 127.0.0.1, and device
//! certificates whose CN is the device id, all written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use super::{free_port, wait_for_port, TestBroker};

/// A CA that can issue broker and device certificates into `dir`.
pub struct TestPki {
    pub dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl TestPki {
    /// A new CA named `name`, its certificate written to `dir/{name}.pem`.
    pub fn new(dir: &Path, name: &str) -> TestPki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), ca.pem()).unwrap();
        TestPki {
            dir: dir.to_path_buf(),
            ca,
        }
    }

    /// Issues a certificate for `cn` and writes `{file}.pem` and `{file}.key`; returns their
    /// paths.
    pub fn issue(&self, file: &str, cn: &str, server: bool) -> (PathBuf, PathBuf) {
        let names = if server {
            vec!["127.0.0.1".to_string(), "localhost".to_string()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_path, key_path) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

/// A Mosquitto with two listeners: plain MQTT on `port` for the test's server side, and
/// mutual TLS on `tls_port` (`require_certificate`, the CN as the user name) for devices.
pub struct TlsMosquitto {
    pub broker: TestBroker,
    pub tls_port: u16,
}

pub fn start_mosquitto_tls(pki: &TestPki, ca_name: &str) -> TlsMosquitto {
    let (cert, key) = pki.issue("broker", "broker", true);
    let port = free_port();
    let tls_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\nallow_anonymous true\npersistence false\nmax_packet_size 8388608\nset_tcp_nodelay true\nlog_dest stderr\nlog_type error\n\
             listener {port} 127.0.0.1\n\
             listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate true\nuse_identity_as_username true\n",
            ca = pki.dir.join(format!("{ca_name}.pem")).display(),
            cert = cert.display(),
            key = key.display(),
        ),
    )
    .unwrap();
    let binary = std::env::var("MOSQUITTO").unwrap_or_else(|_| "mosquitto".into());
    let child = std::process::Command::new(&binary)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        // The refused handshakes the test provokes would fill its output with OpenSSL errors.
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
    wait_for_port(port, "mosquitto");
    wait_for_port(tls_port, "mosquitto (TLS)");
    TlsMosquitto {
        broker: TestBroker::from_process("mosquitto (mutual TLS)", port, child, dir),
        tls_port,
    }
}
