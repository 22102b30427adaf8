//! Dialing a broker: the channel the CLI client and an agent's upstream
//! both use (a `unix:` path, or `http://` / `https://` with the client's
//! TLS files), so neither borrows the other's code.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio_util::either::Either;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::certs::client::ClientTls;

/// Where and how to reach a broker.
#[derive(Clone, Debug)]
pub struct Target {
    /// `unix:/path`, `http://host:port`, `https://host:port` or `host:port`.
    pub addr: String,
    /// Connect timeout, and the deadline of unary calls.
    pub timeout: Duration,
    /// Certificates for `https://` addresses, read for this channel…
    pub tls: ClientTlsFiles,
    /// …unless the caller keeps them loaded (an agent: rotating in place).
    pub client_tls: Option<Arc<ClientTls>>,
    /// Connect to this address rather than to what the host name resolves
    /// to (one replica behind a DNS name); TLS still checks the name.
    pub connect_to: Option<std::net::SocketAddr>,
}

impl Target {
    pub fn new(addr: impl Into<String>, timeout: Duration) -> Self {
        Self {
            addr: addr.into(),
            timeout,
            tls: ClientTlsFiles::default(),
            client_tls: None,
            connect_to: None,
        }
    }
}

pub use crate::certs::client::ClientTlsFiles;

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address or the TLS options cannot work: asking again cannot help.
    #[error("{0}")]
    Usage(String),
    /// The broker was not reached. `kind` is the innermost I/O error's
    /// kind, when there is one, for callers that add hints or classify.
    #[error("cannot reach the broker at {addr}: {detail}")]
    Unreachable {
        addr: String,
        kind: Option<std::io::ErrorKind>,
        detail: String,
    },
}

/// A gRPC channel to `target`: `unix:/path`, `http://host:port`,
/// `https://host:port` (TLS with `target.client_tls`, or else
/// `target.tls`'s files read now), or `host:port`.
pub async fn channel(target: &Target) -> Result<Channel, ConnectError> {
    let (addr, timeout) = (target.addr.as_str(), target.timeout);
    let wants_tls = target.tls != ClientTlsFiles::default() || target.client_tls.is_some();
    if let Some(path) = addr.strip_prefix("unix:") {
        if wants_tls {
            return Err(ConnectError::Usage(
                "TLS options apply to https:// addresses, not Unix sockets".into(),
            ));
        }
        let path = path.to_owned();
        return Endpoint::from_static("http://broker.invalid")
            .connect_timeout(timeout)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            }))
            .await
            .map_err(|e| unreachable(addr, &e));
    }
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let parsed: Uri = uri
        .parse()
        .map_err(|e| ConnectError::Usage(format!("invalid address {addr:?}: {e}")))?;
    let https = parsed.scheme_str() == Some("https");
    if wants_tls && !https {
        return Err(ConnectError::Usage("TLS options need an https:// address".into()));
    }
    let authority = parsed
        .authority()
        .ok_or_else(|| ConnectError::Usage(format!("invalid address {addr:?}: no host")))?
        .clone();
    // TLS is ours (its material can rotate), so tonic sees plain http.
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| ConnectError::Usage(format!("invalid address {addr:?}: {e}")))?
        .connect_timeout(timeout)
        // A peer that vanishes without closing (a lost node) is noticed
        // within 20 s even on an idle WatchToken stream.
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tls = match (https, &target.client_tls) {
        (false, _) => None,
        (true, Some(loaded)) => Some(loaded.clone()),
        (true, None) => Some(ClientTls::load(&target.tls).map_err(|e| ConnectError::Usage(format!("TLS: {e}")))?),
    };
    let tls = match tls {
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| ConnectError::Usage(format!("invalid host {host:?} for TLS: {e}")))?;
            Some((tls, name))
        }
        None => None,
    };
    let connect_to = target.connect_to;
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (host, tls) = (host.clone(), tls.clone());
            async move {
                let tcp = match connect_to {
                    Some(socket_addr) => tokio::net::TcpStream::connect(socket_addr).await?,
                    None => tokio::net::TcpStream::connect((host.as_str(), port)).await?,
                };
                tcp.set_nodelay(true)?;
                Ok::<_, std::io::Error>(TokioIo::new(match tls {
                    Some((tls, name)) => Either::Right(Box::new(tls.connector().connect(name, tcp).await?)),
                    None => Either::Left(tcp),
                }))
            }
        }))
        .await
        .map_err(|e| unreachable(addr, &e))
}

/// An unreachable broker: the innermost I/O error (and its kind) when
/// there is one, else the whole chain.
fn unreachable(addr: &str, error: &(dyn std::error::Error + 'static)) -> ConnectError {
    let mut io = None;
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<std::io::Error>() {
            io = Some(found);
        }
        current = e.source();
    }
    ConnectError::Unreachable {
        addr: addr.to_owned(),
        kind: io.map(std::io::Error::kind),
        detail: io.map_or_else(|| crate::error_chain(error), ToString::to_string),
    }
}
