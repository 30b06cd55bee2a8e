//! TLS for the ext_proc server: a certificate from `--cert-path` (`tls.crt`, `tls.key`), or a
//! self-signed one generated at start (as the Go EPP does). ALPN `h2` is negotiated by tonic.
//! With `--client-ca-path`, clients (Envoy) must present a certificate signed by that CA.
//!
//! [`write_bundle`] (`epp --write-certs DIR`) makes what a local or test deployment needs to
//! verify both ends: a CA (`ca.crt`), epp's certificate signed by it (`tls.crt`, `tls.key`,
//! the layout of a Kubernetes TLS secret) and a client certificate for Envoy (`client.crt`,
//! `client.key`).

use std::path::Path;

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Certificate(String),
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

/// Where the ext_proc server's certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// Generated at start.
    SelfSigned,
    /// `tls.crt` and `tls.key` in a directory; with `reload`, re-read when they change.
    Dir { path: PathBuf, reload: bool },
}

/// ext_proc TLS settings.
#[derive(Debug, Clone)]
pub struct ServerTlsOptions {
    pub cert: CertSource,
    /// PEM CA bundle for mutual TLS.
    pub client_ca: Option<String>,
    /// Refuse TLS 1.2.
    pub tls13_only: bool,
}

/// The Go EPP's `--tls-min-version` values: `VersionTLS12` / `VersionTLS13` (also `1.2`,
/// `1.3`); `Ok(true)` means TLS 1.3 only.
pub fn parse_min_version(v: &str) -> Result<bool, String> {
    match v.trim() {
        "VersionTLS12" | "1.2" | "TLS12" | "" => Ok(false),
        "VersionTLS13" | "1.3" | "TLS13" => Ok(true),
        "VersionTLS10" | "VersionTLS11" | "1.0" | "1.1" => Err(format!(
            "--tls-min-version {v}: epp supports TLS 1.2 and 1.3 only"
        )),
        other => Err(format!("--tls-min-version: unknown version {other:?}")),
    }
}

fn certified_key(pair: &CertPair) -> Result<Arc<CertifiedKey>, TlsError> {
    let bad = |reason: String| TlsError::Certificate(reason);
    let certs = rustls_pemfile_certs(&pair.cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes())
        .map_err(|e| bad(format!("private key: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad(format!("private key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(certs, signing)))
}

fn rustls_pemfile_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| TlsError::Certificate(format!("certificate: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Certificate(
            "no certificate in the PEM text".into(),
        ));
    }
    Ok(certs)
}

/// Serves the current certificate; a reload swaps it in for new handshakes.
#[derive(Debug)]
pub struct CertResolver {
    current: arc_swap::ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The TLS acceptor for the ext_proc port (ALPN `h2`). With a reloading [`CertSource::Dir`],
/// a task re-reads the files every 5 s and swaps the certificate when they changed (bad files
/// are logged and the old certificate kept).
pub fn server_acceptor(options: &ServerTlsOptions) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    server_acceptor_reloading_every(options, std::time::Duration::from_secs(5))
}

/// [`server_acceptor`] with the reload period given.
pub fn server_acceptor_reloading_every(
    options: &ServerTlsOptions,
    period: std::time::Duration,
) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let pair = match &options.cert {
        CertSource::SelfSigned => self_signed()?,
        CertSource::Dir { path, .. } => from_dir(path)?,
    };
    let resolver = Arc::new(CertResolver {
        current: arc_swap::ArcSwap::new(certified_key(&pair)?),
    });
    if let CertSource::Dir { path, reload: true } = &options.cert {
        tokio::spawn(reload_loop(path.clone(), pair, resolver.clone(), period));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if options.tls13_only {
        &[&rustls::version::TLS13]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    let builder = match &options.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Certificate(format!("client CA: {e}")))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| TlsError::Certificate(format!("client CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn reload_loop(
    dir: PathBuf,
    mut last: CertPair,
    resolver: Arc<CertResolver>,
    period: std::time::Duration,
) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let pair = match from_dir(&dir) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "certificate reload: keeping the current certificate");
                continue;
            }
        };
        if pair.cert_pem == last.cert_pem && pair.key_pem == last.key_pem {
            continue;
        }
        match certified_key(&pair) {
            Ok(key) => {
                resolver.current.store(key);
                tracing::info!(dir = %dir.display(), "certificate reloaded");
                last = pair;
            }
            Err(e) => {
                tracing::warn!(error = %e, "certificate reload: keeping the current certificate")
            }
        }
    }
}

/// Reads a PEM file (the client CA).
pub fn read_pem(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// A TLS client configuration for scrapes: the system's root certificates, or (insecure)
/// any certificate at all, as the Go EPP's `insecureSkipVerify` (its default) does.
pub fn client_config(insecure: bool) -> rustls::ClientConfig {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder_with_protocol_versions(rustls::DEFAULT_VERSIONS)
        });
    if insecure {
        return builder
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
    }
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    builder.with_root_certificates(roots).with_no_client_auth()
}

/// Accepts every server certificate (signatures are still checked to be well-formed).
#[derive(Debug)]
struct AnyCertificate(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
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

    /// The certificate a TLS client is served by `acceptor` (trusting `ca`).
    async fn served_certificate(acceptor: &tokio_rustls::TlsAcceptor, ca: &str) -> Vec<u8> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = acceptor.accept(tcp).await;
        });
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile_certs(ca).unwrap() {
            roots.add(c).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("epp").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    #[tokio::test]
    async fn a_changed_certificate_is_served_after_reload() {
        let dir = tempfile::tempdir().unwrap();
        write_bundle(dir.path(), &["epp".to_owned()]).unwrap();
        let options = ServerTlsOptions {
            cert: CertSource::Dir {
                path: dir.path().to_owned(),
                reload: true,
            },
            client_ca: None,
            tls13_only: false,
        };
        let acceptor =
            server_acceptor_reloading_every(&options, std::time::Duration::from_millis(50))
                .unwrap();
        let ca = std::fs::read_to_string(dir.path().join("ca.crt")).unwrap();
        let before = served_certificate(&acceptor, &ca).await;
        // A new bundle (new CA too): the served certificate changes without a restart.
        let next = tempfile::tempdir().unwrap();
        write_bundle(next.path(), &["epp".to_owned()]).unwrap();
        for f in ["tls.crt", "tls.key"] {
            std::fs::copy(next.path().join(f), dir.path().join(f)).unwrap();
        }
        let new_ca = std::fs::read_to_string(next.path().join("ca.crt")).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let after = served_certificate(&acceptor, &new_ca).await;
        assert_ne!(before, after);
        // A broken file keeps the current certificate.
        std::fs::write(dir.path().join("tls.crt"), "garbage").unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(served_certificate(&acceptor, &new_ca).await, after);
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
