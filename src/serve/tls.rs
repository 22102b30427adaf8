//! TLS for TCP listeners: the server certificate and, for mutual TLS, the
//! CA client certificates must chain to. Unix sockets never use TLS: file
//! permissions guard them. The client side is [`crate::dial`]'s.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

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

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
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
