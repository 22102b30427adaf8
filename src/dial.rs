//! Dialing a broker: the channel the CLI client and an agent's upstream
//! both use (a `unix:` path, or `http://` / `https://` with the client's
//! TLS files), so neither borrows the other's code.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

use crate::serve::tls::{TlsError, read};

/// Where and how to reach a broker.
#[derive(Clone, Debug)]
pub struct Target {
    /// `unix:/path`, `http://host:port`, `https://host:port` or `host:port`.
    pub addr: String,
    /// Connect timeout, and the deadline of unary calls.
    pub timeout: Duration,
    /// Certificates for `https://` addresses.
    pub tls: ClientTlsFiles,
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
            connect_to: None,
        }
    }
}

/// Certificate files of a TLS client (the CLI, an agent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// The CA that signed the broker's certificate (system roots are not used).
    pub ca_file: Option<PathBuf>,
    /// A client certificate and key, for a broker that requires mTLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

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

/// TLS for a client of the broker: the CA of `--ca-file`, or else the
/// roots `oauth.tls_roots = "auto"` would trust (the host's store, or the
/// bundled Mozilla roots where it has none).
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
/// `https://host:port` (with `target.tls`), or `host:port`.
pub async fn channel(target: &Target) -> Result<Channel, ConnectError> {
    let (addr, timeout) = (target.addr.as_str(), target.timeout);
    let wants_tls = target.tls != ClientTlsFiles::default();
    let channel = if let Some(path) = addr.strip_prefix("unix:") {
        if wants_tls {
            return Err(ConnectError::Usage(
                "TLS options apply to https:// addresses, not Unix sockets".into(),
            ));
        }
        let path = path.to_owned();
        Endpoint::from_static("http://broker.invalid")
            .connect_timeout(timeout)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            }))
            .await
    } else {
        let uri = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| ConnectError::Usage(format!("invalid address {addr:?}: {e}")))?
            .connect_timeout(timeout)
            // A peer that vanishes without closing (a lost node) is noticed
            // within 20 s even on an idle WatchToken stream.
            .http2_keep_alive_interval(Duration::from_secs(15))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        if uri.starts_with("https://") {
            let tls = client_config(&target.tls).map_err(|e| ConnectError::Usage(e.to_string()))?;
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| ConnectError::Usage(format!("TLS: {}", crate::error_chain(&e))))?;
        } else if wants_tls {
            return Err(ConnectError::Usage("TLS options need an https:// address".into()));
        }
        match target.connect_to {
            Some(socket_addr) => {
                endpoint
                    .connect_with_connector(tower::service_fn(move |_: Uri| async move {
                        let stream = tokio::net::TcpStream::connect(socket_addr).await?;
                        stream.set_nodelay(true)?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }))
                    .await
            }
            None => endpoint.connect().await,
        }
    };
    channel.map_err(|e| unreachable(addr, &e))
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
