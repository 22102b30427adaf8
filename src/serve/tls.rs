//! TLS for TCP listeners: the certificate files (`[server.tls]`) and the
//! handshakes. The material itself, swappable while the broker runs, is
//! [`crate::certs::server`]'s. Unix sockets never use TLS: file
//! permissions guard them. The client side is [`crate::dial`]'s.

use std::path::{Path, PathBuf};

use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};

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
    #[error("{0}")]
    Material(#[from] crate::certs::MaterialError),
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

/// Handshakes in flight at once on one listener (each connection is
/// already within the listener's budget and its first-request deadline).
const CONCURRENT_HANDSHAKES: usize = 128;

/// TLS over each accepted connection, handshakes run side by side: a slow
/// client delays only itself. A failed handshake is an `Err` item, which
/// the server skips.
pub(crate) fn handshakes<S, IO>(
    incoming: S,
    acceptor: tokio_rustls::TlsAcceptor,
) -> impl Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<IO>>> + Send + 'static
where
    S: Stream<Item = std::io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    incoming
        .map(move |accepted| {
            let acceptor = acceptor.clone();
            async move { acceptor.accept(accepted?).await }
        })
        .buffer_unordered(CONCURRENT_HANDSHAKES)
}
