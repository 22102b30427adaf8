//! TLS for TCP listeners (server certificate, optionally client certificates
//! for mutual TLS) and for the CLI client. Unix sockets never use TLS: file
//! permissions guard them.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, Server, ServerTlsConfig};

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

/// Certificate files of a TLS client (the CLI).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// The CA that signed the broker's certificate (system roots are not used).
    pub ca_file: Option<PathBuf>,
    /// A client certificate and key, for a broker that requires mTLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid TLS configuration: {0}")]
    Invalid(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

/// Reads and checks the files; the error names the file, never its content.
pub fn server_config(files: &ServerTlsFiles) -> Result<ServerTlsConfig, TlsError> {
    crate::install_crypto_provider();
    let mut config =
        ServerTlsConfig::new().identity(Identity::from_pem(read(&files.cert_file)?, read(&files.key_file)?));
    if let Some(ca) = &files.client_ca_file {
        config = config.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    // Building a server is where tonic parses the PEM: fail now, not at the first connection.
    Server::builder()
        .tls_config(config.clone())
        .map_err(|e| TlsError::Invalid(crate::error_chain(&e)))?;
    Ok(config)
}

/// TLS for a client of the broker: the CA of `--ca-file`, or else the
/// roots `oauth.tls_roots = "auto"` would trust (the host's store, or the
/// bundled Mozilla roots where it has none).
/// A DER certificate as PEM (what tonic's `Certificate` takes).
fn pem(der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|line| std::str::from_utf8(line).expect("base64 is ASCII"))
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

pub fn client_config(files: &ClientTlsFiles) -> Result<ClientTlsConfig, TlsError> {
    crate::install_crypto_provider();
    let mut config = ClientTlsConfig::new();
    match &files.ca_file {
        Some(ca) => config = config.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => {
            let roots = crate::tls_roots::TlsRoots::Auto
                .load()
                .map_err(|e| TlsError::Invalid(e.to_string()))?;
            config = config.ca_certificates(roots.certificates.iter().map(|der| Certificate::from_pem(pem(der))));
        }
    }
    match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => config = config.identity(Identity::from_pem(read(cert)?, read(key)?)),
        (None, None) => {}
        _ => {
            return Err(TlsError::Invalid(
                "a client certificate needs both --cert-file and --key-file".into(),
            ));
        }
    }
    Ok(config)
}
