//! Everything between a socket and a face: where listeners come from
//! ([`passed_fds`]: what systemd passed, read once; [`listen`]: binding, the
//! Unix socket handover by rename, [`listen::SocketFile`]), what each
//! connection may take ([`guard`]: the fd limit, per-listener connection
//! budgets, first-request and idle deadlines, request tracking), who is
//! at the other end of each connection ([`peer`], read once per
//! connection), the
//! Unix-socket `:authority` adapter ([`unix_authority`]), TLS ([`tls`]),
//! the request size limit ([`request_limit`]) and the serve loop (`connections`:
//! each connection on hyper-util, and the graceful drain).
//!
//! A *face* is what a listener serves: a router and its request limit
//! ([`Face`]). The gRPC API (with its HTTP/JSON read) and the admin
//! endpoints are faces; every face gets the same budgets, deadlines,
//! graceful drain and handover from [`serve`]. Adding a face is a router
//! plus one call of [`serve`] in the daemon's composition.

mod connections;
pub mod guard;
pub mod listen;
pub mod passed_fds;
pub mod peer;
pub mod request_limit;
pub mod settings;
pub mod tls;
pub mod unix_authority;

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tracing::{info, warn};

pub use settings::ServerConfig;

use crate::metrics::Metrics;
use connections::serve_connections;
use guard::{ConnectionLimits, ListenerGuard, StreamTrackingLayer, incoming};
use listen::Bound;

use crate::certs::server::ServerTls;

/// What one kind of listener serves.
#[derive(Clone)]
pub struct Face {
    /// Its name in logs and in the listener label of metrics
    /// (`grpc:127.0.0.1:50051`, `admin:127.0.0.1:9090`).
    pub name: &'static str,
    /// The router: HTTP/1.1 and HTTP/2 requests alike reach it.
    pub routes: Routes,
    /// Largest request accepted: one gRPC message, or a body of that many bytes.
    pub max_request_bytes: usize,
    /// Refuses HTTP/1.x requests the face must not take, before routing.
    pub http1_screen: Option<guard::Http1Screen>,
    /// Over TLS, offer HTTP/1.1 by ALPN besides HTTP/2 (the API face
    /// offers `h2` only, as gRPC needs; the proxy takes HTTP/1.1 callers).
    pub tls_http1: bool,
}

/// Serves `face` on one listener until `stopping` (then GOAWAY and drain):
/// within the listener's connection budget, with TLS on TCP when `tls` is
/// set, and the `:authority` adapter on Unix sockets.
pub fn serve(
    listener: Bound,
    face: &Face,
    tls: Option<&Arc<ServerTls>>,
    limits: ConnectionLimits,
    stopping: &CancellationToken,
    metrics: &Arc<Metrics>,
) -> JoinHandle<()> {
    let addr = listener.addr();
    let service = tower::Layer::layer(
        &StreamTrackingLayer {
            http1_screen: face.http1_screen,
            max_request_bytes: face.max_request_bytes,
        },
        face.routes.clone(),
    );
    let streams = limits.max_concurrent_streams;
    let acceptor = tls
        .filter(|_| matches!(listener, Bound::Tcp(_)))
        .map(|t| t.acceptor(face.tls_http1));
    let name = face.name;
    info!(face = name, %addr, tls = acceptor.is_some(), max_connections = limits.max_connections, "listening");
    let guard = ListenerGuard::new(format!("{name}:{addr}"), limits, metrics.clone());
    // Stop accepting at `stopping`; begin the graceful shutdown (GOAWAY)
    // once every accepted connection has begun its first request.
    let signal = guard.clone().settled(stopping.clone());
    let stopping = stopping.clone();
    tokio::spawn(async move {
        match (listener, acceptor) {
            (Bound::Tcp(l), Some(acceptor)) => {
                let incoming = tls::handshakes(incoming(l, guard, stopping), acceptor);
                serve_connections(incoming, service, streams, signal).await
            }
            (Bound::Tcp(l), None) => serve_connections(incoming(l, guard, stopping), service, streams, signal).await,
            // The socket file lives as long as its server.
            (Bound::Unix(l, _file), _) => {
                let l = unix_authority::UnixAuthorityListener(l);
                serve_connections(incoming(l, guard, stopping), service, streams, signal).await
            }
        }
    })
}

/// The per-listener connection limits: `server.max_connections` each, or an
/// equal share of the open-file limit when they do not all fit in it.
pub fn connection_limits(server: &ServerConfig, listeners: usize) -> ConnectionLimits {
    let fd_limit = guard::raise_fd_limit();
    let mut limits = server.limits();
    limits.max_connections = guard::per_listener_budget(limits.max_connections, fd_limit, listeners);
    if limits.max_connections < server.max_connections {
        // The default is sized for a hub; on a host with a lower limit an
        // equal share is the expected outcome, worth a WARN only when the
        // operator asked for more.
        if server.max_connections == ServerConfig::default().max_connections {
            info!(
                configured = server.max_connections,
                budget = limits.max_connections,
                fd_limit,
                "the default server.max_connections does not fit in the open-file limit; each listener gets an equal share"
            );
        } else {
            warn!(
                configured = server.max_connections,
                budget = limits.max_connections,
                fd_limit,
                "server.max_connections does not fit in the open-file limit; each listener gets an equal share"
            );
        }
    }
    limits
}
