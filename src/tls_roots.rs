//! Which certificate authorities the broker trusts when it calls out over
//! TLS (the token endpoints): `[oauth] tls_roots`. The host's store when it
//! has certificates, the Mozilla roots built into the binary otherwise, or
//! exactly what is configured. Loading happens once, only for a
//! configuration that has an `https://` URL, so an all-`http://`
//! configuration (the emulator, a local test) never needs a CA store.
//!
//! A store that cannot be loaded is a local configuration problem, reported
//! by `check-config` and at start (exit 78), never blamed on the endpoint.
//!
//! Every client built from one load verifies through its [`RotatingRoots`],
//! so a PEM file's new content (see `certs`) reaches them all at their next
//! handshake, without rebuilding one.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};

/// `oauth.tls_roots`: where the trusted CA certificates come from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TlsRoots {
    /// The system store if it has certificates, else the bundled roots.
    #[default]
    Auto,
    /// The system store only (`/etc/ssl/certs`, `SSL_CERT_FILE`, `SSL_CERT_DIR`).
    System,
    /// The Mozilla roots built into the binary (webpki-root-certs).
    Bundled,
    /// The certificates of this PEM file only.
    File(PathBuf),
}

impl TryFrom<String> for TlsRoots {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        Ok(match value.as_str() {
            "auto" => TlsRoots::Auto,
            "system" => TlsRoots::System,
            "bundled" => TlsRoots::Bundled,
            "" => return Err("expected \"auto\", \"system\", \"bundled\" or the path of a PEM file".into()),
            path => TlsRoots::File(PathBuf::from(path)),
        })
    }
}

impl From<TlsRoots> for String {
    fn from(roots: TlsRoots) -> String {
        match roots {
            TlsRoots::Auto => "auto".into(),
            TlsRoots::System => "system".into(),
            TlsRoots::Bundled => "bundled".into(),
            TlsRoots::File(path) => path.display().to_string(),
        }
    }
}

/// Loaded trust anchors, shared by every client that uses them.
#[derive(Clone, Default)]
pub struct TrustRoots {
    /// As loaded (a reload swaps what `rotating` verifies with, not these).
    pub certificates: Arc<[CertificateDer<'static>]>,
    /// Where they came from, for the log (`system store`, `bundled`, a path).
    pub origin: String,
    /// The verifier of every client built from this load (none when no
    /// certificate was loaded: `http://` only).
    pub rotating: Option<Arc<RotatingRoots>>,
}

impl TrustRoots {
    fn new(certificates: Vec<CertificateDer<'static>>, origin: String) -> Result<Self, String> {
        let rotating = RotatingRoots::new(&certificates)?;
        Ok(Self {
            certificates: certificates.into(),
            origin,
            rotating: Some(rotating),
        })
    }

    /// A TLS client configuration (ring, no client certificate) that
    /// verifies servers with these roots, as they are at each handshake.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        Ok(match &self.rotating {
            Some(rotating) => builder
                .dangerous()
                .with_custom_certificate_verifier(rotating.clone())
                .with_no_client_auth(),
            None => builder
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        })
    }
}

/// CA certificates servers must chain to, swappable in place: the WebPKI
/// verifier of the current set, read at each handshake.
#[derive(Debug)]
pub struct RotatingRoots {
    current: RwLock<Arc<WebPkiServerVerifier>>,
}

impl RotatingRoots {
    pub fn new(certificates: &[CertificateDer<'static>]) -> Result<Arc<Self>, String> {
        Ok(Arc::new(Self {
            current: RwLock::new(verifier(certificates)?),
        }))
    }

    /// Verifies with `certificates` from the next handshake on.
    pub fn replace(&self, certificates: &[CertificateDer<'static>]) -> Result<(), String> {
        let next = verifier(certificates)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    fn current(&self) -> Arc<WebPkiServerVerifier> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn verifier(certificates: &[CertificateDer<'static>]) -> Result<Arc<WebPkiServerVerifier>, String> {
    // A system store may hold a certificate webpki cannot use; the others
    // still count. None usable at all is a problem.
    let mut store = rustls::RootCertStore::empty();
    store.add_parsable_certificates(certificates.iter().cloned());
    if store.is_empty() {
        return Err("no usable CA certificate".into());
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(store), Arc::new(rustls::crypto::ring::default_provider()))
        .build()
        .map_err(|e| format!("cannot verify servers with it: {e}"))
}

impl ServerCertVerifier for RotatingRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.current()
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

impl fmt::Debug for TrustRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} certificates from {}", self.certificates.len(), self.origin)
    }
}

/// Why the configured roots cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error(
        "this host has no CA certificates{detail} (install the ca-certificates package, or set oauth.tls_roots = \"bundled\" or the path of a PEM file)"
    )]
    NoSystemRoots { detail: String },
    #[error("cannot read CA certificates from {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{path} holds no PEM certificate")]
    EmptyFile { path: PathBuf },
}

impl TlsRoots {
    /// Loads the certificates this setting names.
    pub fn load(&self) -> Result<TrustRoots, RootsError> {
        match self {
            TlsRoots::System => system(),
            TlsRoots::Bundled => Ok(bundled()),
            TlsRoots::Auto => Ok(system().unwrap_or_else(|_| bundled())),
            TlsRoots::File(path) => from_file(path),
        }
    }
}

fn system() -> Result<TrustRoots, RootsError> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        let detail = found
            .errors
            .iter()
            .map(|e| e.to_string())
            .next()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(RootsError::NoSystemRoots { detail });
    }
    TrustRoots::new(found.certs, "the system store".into()).map_err(|reason| RootsError::NoSystemRoots {
        detail: format!(" ({reason})"),
    })
}

fn bundled() -> TrustRoots {
    TrustRoots::new(
        webpki_root_certs::TLS_SERVER_ROOT_CERTS.to_vec(),
        "the bundled Mozilla roots".into(),
    )
    .expect("the bundled roots are usable")
}

fn from_file(path: &PathBuf) -> Result<TrustRoots, RootsError> {
    let file_error = |reason: String| RootsError::File {
        path: path.clone(),
        reason,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if certificates.is_empty() {
        return Err(RootsError::EmptyFile { path: path.clone() });
    }
    TrustRoots::new(certificates, path.display().to_string()).map_err(file_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_reads_and_writes_its_names_and_any_path() {
        for (text, roots) in [
            ("auto", TlsRoots::Auto),
            ("system", TlsRoots::System),
            ("bundled", TlsRoots::Bundled),
            ("/etc/ca.pem", TlsRoots::File("/etc/ca.pem".into())),
        ] {
            assert_eq!(TlsRoots::try_from(text.to_owned()), Ok(roots.clone()));
            assert_eq!(String::from(roots), text);
        }
        assert!(TlsRoots::try_from(String::new()).is_err());
    }

    #[test]
    fn bundled_roots_need_nothing_from_the_host() {
        let roots = TlsRoots::Bundled.load().unwrap();
        assert!(roots.certificates.len() > 100, "{roots:?}");
    }

    #[test]
    fn a_pem_file_gives_exactly_its_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.cert.pem().repeat(2)).unwrap();
        let roots = TlsRoots::File(path.clone()).load().unwrap();
        assert_eq!(roots.certificates.len(), 2);
        assert_eq!(roots.origin, path.display().to_string());
    }

    #[test]
    fn an_unusable_pem_file_says_which_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = TlsRoots::File(missing.clone()).load().unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot read CA certificates from {}", missing.display())),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = TlsRoots::File(empty.clone()).load().unwrap_err().to_string();
        assert_eq!(e, format!("{} holds no PEM certificate", empty.display()));
    }

    #[test]
    fn a_host_without_a_store_is_named_as_the_problem() {
        let e = RootsError::NoSystemRoots { detail: String::new() }.to_string();
        assert!(
            e.starts_with("this host has no CA certificates (install the ca-certificates package"),
            "{e}"
        );
    }
}
