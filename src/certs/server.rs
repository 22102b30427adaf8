//! A TLS listener's material behind an atomic swap: the certificate
//! resolver and the client-certificate verifier read the current material
//! at each handshake, so new handshakes use new files at once while
//! established connections keep theirs. Nothing is rebuilt.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use super::material::{self, CertificateInfo, MaterialError};
use super::{InUse, Reloadable};

/// Certificate files of a TLS listener (`[server.tls]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mTLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
}

impl ServerTlsFiles {
    /// Problems with the table, each starting with its key: both files
    /// are needed, and every file must be readable.
    pub fn problems(&self) -> Vec<String> {
        if self.cert_file.as_os_str().is_empty() || self.key_file.as_os_str().is_empty() {
            return vec!["cert_file: TLS needs both cert_file and key_file".into()];
        }
        Vec::new()
    }

    /// Files that cannot be read, each with its key: a check of the host
    /// (skipped by `check-config --skip-secrets`, like the key sources).
    pub fn file_problems(&self) -> Vec<String> {
        [
            ("cert_file", Some(&self.cert_file)),
            ("key_file", Some(&self.key_file)),
            ("client_ca_file", self.client_ca_file.as_ref()),
        ]
        .into_iter()
        .filter_map(|(key, path)| Some((key, path?)))
        .filter(|(_, path)| !path.as_os_str().is_empty())
        .filter_map(|(key, path)| {
            std::fs::metadata(path)
                .err()
                .map(|e| format!("{key}: cannot read {}: {e}", path.display()))
        })
        .collect()
    }
}

/// What a TLS listener serves with, swappable.
pub struct ServerTls {
    files: ServerTlsFiles,
    identity: Arc<IdentitySlot>,
    clients: Option<Arc<ClientCaSlot>>,
    /// ALPN `h2` only (gRPC and the HTTP/JSON read over TLS).
    h2: Arc<rustls::ServerConfig>,
    /// ALPN `h2` and `http/1.1` (the API proxy's callers).
    h2_and_http1: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads and checks the files (the error names the file, never its
    /// content) and builds the `ServerConfig`s every handshake uses (ALPN
    /// `h2`, or `h2` and `http/1.1`), client certificates required when
    /// `client_ca_file` is set.
    pub fn load(files: &ServerTlsFiles) -> Result<Arc<Self>, MaterialError> {
        let now = SystemTime::now();
        let (key, info) = material::identity(&files.cert_file, &files.key_file, now)?;
        let identity = Arc::new(IdentitySlot(RwLock::new((key, info))));
        let clients = match &files.client_ca_file {
            Some(path) => Some(Arc::new(ClientCaSlot(RwLock::new(client_verifier(path)?)))),
            None => None,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| MaterialError {
                path: files.cert_file.clone(),
                reason: e.to_string(),
            })?;
        let builder = match &clients {
            Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut h2 = builder.with_cert_resolver(identity.clone());
        h2.alpn_protocols = vec![b"h2".to_vec()];
        let mut h2_and_http1 = h2.clone();
        h2_and_http1.alpn_protocols.push(b"http/1.1".to_vec());
        Ok(Arc::new(Self {
            files: files.clone(),
            identity,
            clients,
            h2: Arc::new(h2),
            h2_and_http1: Arc::new(h2_and_http1),
        }))
    }

    /// The acceptor of a TLS listener: offering HTTP/2 only by ALPN, or
    /// HTTP/1.1 too (`http1`). Both read the same swappable material.
    pub fn acceptor(&self, http1: bool) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(if http1 { &self.h2_and_http1 } else { &self.h2 }.clone())
    }

    /// Whether clients must present a certificate (mutual TLS).
    pub fn requires_client_certificates(&self) -> bool {
        self.clients.is_some()
    }

    /// The server certificate now in use.
    pub fn certificate(&self) -> CertificateInfo {
        self.identity.0.read().unwrap_or_else(|p| p.into_inner()).1.clone()
    }
}

impl Reloadable for ServerTls {
    fn name(&self) -> &'static str {
        "server"
    }

    fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.files.cert_file.clone(), self.files.key_file.clone()];
        files.extend(self.files.client_ca_file.clone());
        files
    }

    /// Checks all the files first; only when every one is good is any of
    /// them swapped in, so a half-written pair never serves.
    fn reload(&self) -> Result<Vec<InUse>, MaterialError> {
        let (key, info) = material::identity(&self.files.cert_file, &self.files.key_file, SystemTime::now())?;
        let verifier = match (&self.clients, &self.files.client_ca_file) {
            (Some(_), Some(path)) => Some(client_verifier(path)?),
            _ => None,
        };
        *self.identity.0.write().unwrap_or_else(|p| p.into_inner()) = (key, info);
        if let (Some(slot), Some(verifier)) = (&self.clients, verifier) {
            *slot.0.write().unwrap_or_else(|p| p.into_inner()) = verifier;
        }
        Ok(self.in_use())
    }

    fn in_use(&self) -> Vec<InUse> {
        let mut out = vec![InUse {
            role: "server",
            certificate: self.certificate(),
        }];
        if let (Some(slot), Some(_)) = (&self.clients, &self.files.client_ca_file) {
            out.push(InUse {
                role: "client_ca",
                certificate: slot.0.read().unwrap_or_else(|p| p.into_inner()).1.clone(),
            });
        }
        out
    }
}

type Verifier = (Arc<dyn ClientCertVerifier>, CertificateInfo);

fn client_verifier(path: &std::path::Path) -> Result<Verifier, MaterialError> {
    let (certs, earliest) = material::authorities(path)?;
    let store = material::root_store(path, &certs)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| MaterialError {
        path: path.to_owned(),
        reason: format!("cannot verify clients with it: {e}"),
    })?;
    Ok((verifier, earliest))
}

/// The server certificate, read at each handshake.
#[derive(Debug)]
struct IdentitySlot(RwLock<(Arc<CertifiedKey>, CertificateInfo)>);

impl ResolvesServerCert for IdentitySlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).0.clone())
    }
}

/// The client CA, read at each handshake.
struct ClientCaSlot(RwLock<Verifier>);

impl std::fmt::Debug for ClientCaSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientCaSlot")
    }
}

impl ClientCaSlot {
    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).0.clone()
    }
}

impl ClientCertVerifier for ClientCaSlot {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No hints: they would have to outlive a swap. Clients send the one
    /// certificate they have either way.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}
