//! TLS for the ext_proc server: a certificate from `--cert-path` (`tls.crt`, `tls.key`), or a
//! self-signed one generated at start (as the Go EPP does). ALPN `h2` is negotiated by tonic.
//! With `--client-ca-path`, clients (Envoy) must present a certificate signed by that CA.
//!
//! [`write_bundle`] (`epp --write-certs DIR`) makes what a local or test deployment needs to
//! verify both ends: a CA (`ca.crt`), epp's certificate signed by it (`tls.crt`, `tls.key`,
//! the layout of a Kubernetes TLS secret) and a client certificate for Envoy (`client.crt`,
//! `client.key`).

use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// PEM certificate and key.
#[derive(Debug, Clone)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A self-signed certificate for `localhost` and the pod's names.
pub fn self_signed() -> Result<CertPair, TlsError> {
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "epp".to_owned(),
    ];
    let key = rcgen::generate_simple_self_signed(names)?;
    Ok(CertPair {
        cert_pem: key.cert.pem(),
        key_pem: key.signing_key.serialize_pem(),
    })
}

/// `tls.crt` and `tls.key` from a directory (e.g. a mounted Kubernetes TLS secret).
pub fn from_dir(dir: &Path) -> Result<CertPair, TlsError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })
    };
    Ok(CertPair {
        cert_pem: read("tls.crt")?,
        key_pem: read("tls.key")?,
    })
}

/// The tonic server TLS config for a certificate pair; with `client_ca` (PEM), clients must
/// present a certificate that CA signed.
pub fn server_config(pair: &CertPair, client_ca: Option<&str>) -> ServerTlsConfig {
    let config = ServerTlsConfig::new().identity(Identity::from_pem(&pair.cert_pem, &pair.key_pem));
    match client_ca {
        Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
        None => config,
    }
}

/// Reads a PEM file (the client CA).
pub fn read_pem(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Names epp's certificate is valid for when none are given.
pub const DEFAULT_HOSTS: [&str; 3] = ["epp", "localhost", "127.0.0.1"];

/// Writes a CA, a server certificate for `hosts` and a client certificate into `dir` (see the
/// module doc for the file names).
pub fn write_bundle(dir: &Path, hosts: &[String]) -> Result<(), TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "epp local CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| -> Result<CertPair, TlsError> {
        let mut params = CertificateParams::new(names)?;
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    };
    let server = leaf(hosts.to_vec(), ExtendedKeyUsagePurpose::ServerAuth)?;
    let client = leaf(
        vec!["envoy".to_owned()],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    for (name, text) in [
        ("ca.crt", ca_cert.pem()),
        ("tls.crt", server.cert_pem),
        ("tls.key", server.key_pem),
        ("client.crt", client.cert_pem),
        ("client.key", client.key_pem),
    ] {
        let path = dir.join(name);
        let write = || -> std::io::Result<()> {
            std::fs::write(&path, text)?;
            if name.ends_with(".key") {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
            Ok(())
        };
        write().map_err(|source| TlsError::Write {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_pem() {
        let p = self_signed().unwrap();
        assert!(p.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(p.key_pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn from_dir_names_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = from_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("tls.crt"), "{e}");
        let p = self_signed().unwrap();
        std::fs::write(dir.path().join("tls.crt"), &p.cert_pem).unwrap();
        std::fs::write(dir.path().join("tls.key"), &p.key_pem).unwrap();
        assert_eq!(from_dir(dir.path()).unwrap().cert_pem, p.cert_pem);
    }

    #[test]
    fn bundle_has_every_file_and_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        write_bundle(dir.path(), &["epp".to_owned()]).unwrap();
        for name in ["ca.crt", "tls.crt", "client.crt"] {
            let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{name}");
        }
        use std::os::unix::fs::PermissionsExt;
        for name in ["tls.key", "client.key"] {
            let meta = std::fs::metadata(dir.path().join(name)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name}");
        }
        assert!(from_dir(dir.path()).is_ok());
    }
}
