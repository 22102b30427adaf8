//! TLS for TCP listeners: the certificate files (`[server.tls]`) and the
//! handshakes. The material itself, swappable while the broker runs, is
//! [`crate::certs::server`]'s. Unix sockets never use TLS: file
//! permissions guard them. The client side is [`crate::dial`]'s.

use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};

pub use crate::certs::server::ServerTlsFiles;

/// Why a TLS listener cannot start: its material (the file and why).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Material(#[from] crate::certs::MaterialError),
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
