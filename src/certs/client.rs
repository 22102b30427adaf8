//! The client side of TLS to a broker (the CLI, an agent's hubs), behind an
//! atomic swap: the CA that signs the brokers' certificates and this
//! client's own certificate are read at each handshake, so an agent's next
//! connection uses the newest files while its open connection keeps going.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;

use super::material::{self, CertificateInfo, MaterialError};
use super::roots::Authority;
use super::{InUse, Reloadable};

/// Certificate files of a TLS client (the CLI, an agent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// The CA that signed the broker's certificate; without it, the roots
    /// `oauth.tls_roots = "auto"` would trust (the host's store, or the
    /// bundled Mozilla roots where it has none).
    pub ca_file: Option<PathBuf>,
    /// A client certificate and key, for a broker that requires mTLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// Why client TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("{0}")]
    Material(#[from] MaterialError),
    #[error("{0}")]
    Invalid(String),
}

/// What a TLS client dials with, swappable.
pub struct ClientTls {
    files: ClientTlsFiles,
    authority: Option<Authority>,
    identity: Option<Arc<IdentitySlot>>,
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Reads and checks the files and builds the one `ClientConfig` every
    /// handshake uses (HTTP/2 by ALPN).
    pub fn load(files: &ClientTlsFiles) -> Result<Arc<Self>, ClientTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientTlsError::Invalid(e.to_string()))?;
        let authority = match &files.ca_file {
            Some(path) => Some(Authority::load(path)?),
            None => None,
        };
        let builder = match &authority {
            Some(authority) => builder
                .dangerous()
                .with_custom_certificate_verifier(authority.verifier()),
            None => {
                let roots = crate::tls_roots::TlsRoots::Auto
                    .load()
                    .map_err(|e| ClientTlsError::Invalid(e.to_string()))?;
                let verifier = roots
                    .rotating
                    .ok_or_else(|| ClientTlsError::Invalid("no CA certificates to trust".into()))?;
                builder.dangerous().with_custom_certificate_verifier(verifier)
            }
        };
        let identity = match (&files.cert_file, &files.key_file) {
            (Some(cert), Some(key)) => {
                let (key, info) = material::identity(cert, key, SystemTime::now())?;
                Some(Arc::new(IdentitySlot(RwLock::new((key, info)))))
            }
            (None, None) => None,
            _ => {
                return Err(ClientTlsError::Invalid(
                    "a client certificate needs both its certificate and its key file".into(),
                ));
            }
        };
        let mut config = match &identity {
            Some(slot) => builder.with_client_cert_resolver(slot.clone()),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(Self {
            files: files.clone(),
            authority,
            identity,
            config: Arc::new(config),
        }))
    }

    /// A connector for one handshake with the current material.
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.config.clone())
    }

    /// The client certificate now in use, if any.
    pub fn certificate(&self) -> Option<CertificateInfo> {
        self.identity
            .as_ref()
            .map(|slot| slot.0.read().unwrap_or_else(|p| p.into_inner()).1.clone())
    }
}

impl Reloadable for ClientTls {
    fn name(&self) -> &'static str {
        "upstream"
    }

    fn files(&self) -> Vec<PathBuf> {
        [&self.files.ca_file, &self.files.cert_file, &self.files.key_file]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// The client certificate is checked first, then the CA bundle is
    /// swapped in (or refused), and only then the certificate: nothing
    /// changes unless all of it is good.
    fn reload(&self) -> Result<Vec<InUse>, MaterialError> {
        let identity = match (&self.identity, &self.files.cert_file, &self.files.key_file) {
            (Some(_), Some(cert), Some(key)) => Some(material::identity(cert, key, SystemTime::now())?),
            _ => None,
        };
        if let Some(authority) = &self.authority {
            authority.reload()?;
        }
        if let (Some(slot), Some(new)) = (&self.identity, identity) {
            *slot.0.write().unwrap_or_else(|p| p.into_inner()) = new;
        }
        Ok(self.in_use())
    }

    fn in_use(&self) -> Vec<InUse> {
        let mut out = Vec::new();
        if let Some(authority) = &self.authority {
            out.push(InUse {
                role: "upstream_ca",
                certificate: authority.certificate(),
            });
        }
        if let Some(certificate) = self.certificate() {
            out.push(InUse {
                role: "upstream_client",
                certificate,
            });
        }
        out
    }
}

/// This client's certificate, read at each handshake.
#[derive(Debug)]
struct IdentitySlot(RwLock<(Arc<CertifiedKey>, CertificateInfo)>);

impl ResolvesClientCert for IdentitySlot {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
