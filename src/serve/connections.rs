//! The serve loop under every face: each accepted connection is served by
//! hyper-util's automatic builder (HTTP/1.1 or HTTP/2, told apart by the
//! HTTP/2 preface), with the connection's information
//! ([`super::guard::ConnectionInfo`]: its peer, read once when the
//! connection's task starts, and its activity) in every request's
//! extensions.
//!
//! At the shutdown signal no connection is accepted any more, every open
//! connection is told to shut down gracefully (HTTP/2: GOAWAY, then the
//! requests in flight finish; HTTP/1.1: closed after the response in
//! flight), and the loop returns once all have ended. The drain is one
//! atomic flag each connection reads when it wakes, plus a waker it
//! registers once; a `watch` channel polled at every wake (as tonic's own
//! serve loop does) costs about 240 instructions per wake, a few per cent
//! of a GetToken.
//!
//! The HTTP/2 settings are the ones tonic's server applied: the face's
//! concurrent stream limit, no PINGs (kernel TCP keepalive finds vanished
//! peers, see [`super::guard`]), hyper's default windows and frame size,
//! h2's defaults for reset streams; and hyper's HTTP/1.1 header read
//! timeout (30 s), which needs the timer.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};

use futures_util::{Stream, StreamExt};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::task::TaskTracker;
use tonic::body::Body;
use tower::ServiceExt;
use tracing::debug;

/// Serves `service` on every connection `incoming` yields until `signal`,
/// then drains them (see the module documentation). An `Err` item (a
/// failed TLS handshake) is skipped.
pub(crate) async fn serve_connections<I, IO, S>(
    incoming: I,
    service: S,
    max_concurrent_streams: u32,
    signal: impl Future<Output = ()>,
) where
    I: Stream<Item = std::io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + super::guard::Connection + Unpin + Send + 'static,
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder = builder(max_concurrent_streams);
    let drain = Arc::new(Drain::default());
    let connections = TaskTracker::new();
    // One connection, served until it ends; told to shut down gracefully
    // once the drain starts.
    let serve_one = |io: IO| {
        let (service, builder, drain) = (service.clone(), builder.clone(), drain.clone());
        async move {
            let info = io.info();
            let service = service.map_request(move |request: http::Request<hyper::body::Incoming>| {
                let mut request = request.map(Body::new);
                request.extensions_mut().insert(info.clone());
                request
            });
            let connection = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
            let mut connection = std::pin::pin!(connection);
            let mut registration = Registration { drain, slot: None };
            let mut told = false;
            let served = std::future::poll_fn(|cx| {
                if !told && registration.drained(cx) {
                    told = true;
                    connection.as_mut().graceful_shutdown();
                }
                connection.as_mut().poll(cx)
            })
            .await;
            if let Err(e) = served {
                debug!(error = %e, "a connection ended with an error");
            }
        }
    };
    {
        // Dropped as soon as accepting stops.
        let mut incoming = std::pin::pin!(incoming);
        let mut signal = std::pin::pin!(signal);
        loop {
            tokio::select! {
                _ = &mut signal => break,
                accepted = incoming.next() => match accepted {
                    Some(Ok(io)) => {
                        connections.spawn(serve_one(io));
                    }
                    Some(Err(e)) => debug!(error = %e, "a connection failed before its first request"),
                    None => break,
                },
            }
        }
    }
    drain.start();
    connections.close();
    connections.wait().await;
}

fn builder(max_concurrent_streams: u32) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(max_concurrent_streams)
        .keep_alive_interval(None)
        .adaptive_window(false)
        .max_pending_accept_reset_streams(None)
        .max_local_error_reset_streams(None);
    builder.http1().timer(TokioTimer::new());
    builder
}

/// The drain signal: set once, then every registered connection is woken.
#[derive(Default)]
struct Drain {
    started: AtomicBool,
    wakers: Mutex<slab::Slab<Waker>>,
}

impl Drain {
    fn start(&self) {
        self.started.store(true, Ordering::Release);
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, waker) in wakers {
            waker.wake();
        }
    }

    fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }
}

/// One connection's place in the drain: its task's waker, registered on
/// its first poll (a task's waker stays valid for the task's life), removed
/// when the connection ends.
struct Registration {
    drain: Arc<Drain>,
    slot: Option<usize>,
}

impl Registration {
    /// Whether the drain has started; registers the waker first if needed
    /// (checked after registering, so a drain that starts in between is
    /// never missed).
    fn drained(&mut self, cx: &Context<'_>) -> bool {
        if self.slot.is_none() && !self.drain.started() {
            let mut wakers = self.drain.wakers.lock().unwrap_or_else(|p| p.into_inner());
            self.slot = Some(wakers.insert(cx.waker().clone()));
        }
        self.drain.started()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            // The list was emptied when the drain started: the slot may be
            // gone, or hold a waker of a connection already told.
            let mut wakers = self.drain.wakers.lock().unwrap_or_else(|p| p.into_inner());
            wakers.try_remove(slot);
        }
    }
}
