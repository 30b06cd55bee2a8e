//! TLS for the ext_proc server: a certificate from `--cert-path` (`tls.crt`, `tls.key`), or a
//! self-signed one generated at start (as the Go EPP does). ALPN `h2` is negotiated by tonic.

use std::path::Path;

use tonic::transport::{Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
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

/// The tonic server TLS config for a certificate pair.
pub fn server_config(pair: &CertPair) -> ServerTlsConfig {
    ServerTlsConfig::new().identity(Identity::from_pem(&pair.cert_pem, &pair.key_pem))
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
}
