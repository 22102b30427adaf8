//! Accepting connections so that no local user can exhaust the daemon:
//! every listener (each gRPC address and the admin address) accepts within
//! its own budget of open connections, so a flood on one never starves the
//! others; accept errors such as EMFILE back off instead of spinning; and
//! every connection must deliver its first request within a deadline
//! (which covers a missing HTTP/2 preface, a TLS handshake and slowly sent
//! headers alike) and is closed after an idle period with no request open.
//! Each limit that bites is counted in a metric and logged at WARN, at most
//! once per [`WARN_INTERVAL`] per listener.
//!
//! Held requests (a long poll, a WatchToken stream: open for minutes, so
//! neither deadline ever takes their connection) are counted by the
//! connections they hold ([`hold`]): a connection takes one slot of the
//! listener's held share from its first held request until its last one
//! ends, however many streams it multiplexes (`max_concurrent_streams`
//! bounds those per connection). A held request that would make one more
//! connection hold beyond the share is refused at once. When the budget is
//! full, connections with no request open are closed
//! (`reaped_under_pressure`) so that a new caller finds room: with holding
//! connections capped, a GetToken always gets a connection, and 10,000
//! WatchToken streams on 100 connections take 100 slots, not 10,000.
//!
//! [`Guarded`] wraps each accepted socket; [`StreamTrackingLayer`] tells
//! it when requests start and end.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, warn};

use crate::metrics::{ClosedLabels, ListenerLabels, Metrics};

/// Limit warnings are logged at most this often per listener and kind.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// File descriptors kept out of the listeners' budgets (token endpoint
/// connections, key files, the runtime's own).
pub const RESERVED_FDS: u64 = 64;

/// What one listener allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// From accept to the first request's headers (TLS handshake included).
    pub handshake_timeout: Duration,
    /// A connection with no request open for this long is closed.
    pub idle_timeout: Duration,
    /// Concurrent streams per HTTP/2 connection (advertised in SETTINGS).
    pub max_concurrent_streams: u32,
    /// Share of `max_connections` that connections holding requests may
    /// use, in percent.
    pub held_requests_percent: u8,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_concurrent_streams: 1024,
            held_requests_percent: 50,
        }
    }
}

impl ConnectionLimits {
    /// Connections with held requests open that one listener admits at
    /// once (at least one).
    pub fn max_held_connections(&self) -> usize {
        (self.max_connections * usize::from(self.held_requests_percent) / 100).max(1)
    }
}

/// A connection idle for less than this is not closed to make room: it
/// may be between two requests of the same caller, or its last answer may
/// still be on its way (closing a socket with unread input resets it, and
/// the kernel drops what it had not sent yet).
const REAP_MIN_IDLE: Duration = Duration::from_secs(1);

/// While a listener's budget stays full, idle connections are looked for
/// again this often.
const REAP_RETRY: Duration = Duration::from_millis(250);

/// The delay a refused held request is told to wait before trying again.
pub const HELD_RETRY_DELAY: Duration = Duration::from_secs(2);

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns the soft
/// limit now in force (logged with the hard one).
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft != hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        warn!(soft, hard, error = %e, "cannot raise the open-file limit");
    }
    let now = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(now, _)| now);
    tracing::info!(soft_before = soft, soft = now, hard, "open-file limit");
    // Unlimited is RLIM_INFINITY (u64::MAX), as the kernel writes it.
    now
}

/// Splits the open-file limit between `listeners`, keeping [`RESERVED_FDS`]
/// free: each listener gets at most `configured` and at most its share, so
/// that together they can never take every descriptor.
pub fn per_listener_budget(configured: usize, fd_limit: u64, listeners: usize) -> usize {
    let share = fd_limit.saturating_sub(RESERVED_FDS) / listeners.max(1) as u64;
    configured.min(share.max(1) as usize)
}

/// What one connection is doing, shared between its socket and the
/// requests it carries.
#[derive(Debug)]
pub struct Activity {
    open_requests: AtomicUsize,
    seen_request: AtomicBool,
    /// The listener's count of connections that have not begun a request.
    awaiting_first: Arc<AtomicUsize>,
    /// When the connection was accepted; `idle_since` counts from here.
    accepted: Instant,
    /// Nanoseconds after `accepted` at which the last request ended.
    idle_since: AtomicU64,
    /// Held requests open on the connection, and the slot of the
    /// listener's held share it takes while there is at least one. Locked
    /// only when a held request begins or ends, never per call.
    held: Mutex<HeldSlot>,
}

#[derive(Debug, Default)]
struct HeldSlot {
    open: usize,
    permit: Option<OwnedSemaphorePermit>,
}

impl Activity {
    fn new(accepted: Instant, awaiting_first: Arc<AtomicUsize>) -> Self {
        awaiting_first.fetch_add(1, Ordering::AcqRel);
        Self {
            open_requests: AtomicUsize::new(0),
            seen_request: AtomicBool::new(false),
            awaiting_first,
            accepted,
            idle_since: AtomicU64::new(0),
            held: Mutex::new(HeldSlot::default()),
        }
    }

    /// Marks a request open until the returned guard is dropped; the
    /// count of requests open on the connection, this one included.
    pub fn begin(self: &Arc<Self>) -> (RequestGuard, usize) {
        if !self.seen_request.swap(true, Ordering::AcqRel) {
            self.awaiting_first.fetch_sub(1, Ordering::AcqRel);
        }
        let open = self.open_requests.fetch_add(1, Ordering::AcqRel) + 1;
        (RequestGuard(self.clone()), open)
    }

    /// Whether the connection has served a request and has none open now.
    fn is_idle(&self) -> bool {
        self.open_requests.load(Ordering::Acquire) == 0 && self.seen_request.load(Ordering::Acquire)
    }

    /// When the last request ended (the accept, before any).
    fn idle_since(&self) -> Instant {
        self.accepted + Duration::from_nanos(self.idle_since.load(Ordering::Acquire))
    }

    /// Whether it has been idle for at least `at_least`.
    fn idle_for(&self, at_least: Duration, now: Instant) -> bool {
        self.is_idle() && now.saturating_duration_since(self.idle_since()) >= at_least
    }

    /// When the connection must have done something by, if anything.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<(Instant, &'static str)> {
        if self.open_requests.load(Ordering::Acquire) > 0 {
            return None;
        }
        if !self.seen_request.load(Ordering::Acquire) {
            return Some((self.accepted + limits.handshake_timeout, "handshake_timeout"));
        }
        Some((self.idle_since() + limits.idle_timeout, "idle_timeout"))
    }
}

/// Keeps a request counted as open on its connection.
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.0.open_requests.fetch_sub(1, Ordering::AcqRel) == 1 {
            let since = Instant::now().saturating_duration_since(self.0.accepted);
            self.0.idle_since.fetch_max(since.as_nanos() as u64, Ordering::AcqRel);
        }
    }
}

/// A listener's name in metrics and logs, its limits, and its counters.
pub struct ListenerGuard {
    labels: ListenerLabels,
    limits: ConnectionLimits,
    /// Open connections that have not begun a request yet.
    awaiting_first: Arc<AtomicUsize>,
    budget: Arc<Semaphore>,
    /// Connections with held requests open (long polls, WatchToken
    /// streams): one permit per such connection.
    held: Arc<Semaphore>,
    /// Cancelled (and replaced) when the budget is full: idle connections
    /// close to make room.
    /// The next reap: cancelled (and its flag set) when it fires.
    reap: Mutex<(CancellationToken, Arc<AtomicBool>)>,
    metrics: Arc<Metrics>,
    last_warning: Mutex<[Option<Instant>; 4]>,
}

#[derive(Clone, Copy)]
enum Warning {
    ConnectionLimit = 0,
    AcceptError = 1,
    StreamLimit = 2,
    HeldLimit = 3,
}

impl ListenerGuard {
    pub fn new(name: String, limits: ConnectionLimits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            labels: ListenerLabels { listener: name },
            budget: Arc::new(Semaphore::new(limits.max_connections)),
            held: Arc::new(Semaphore::new(limits.max_held_connections())),
            reap: Mutex::new((CancellationToken::new(), Arc::new(AtomicBool::new(false)))),
            awaiting_first: Arc::new(AtomicUsize::new(0)),
            limits,
            metrics,
            last_warning: Mutex::new([None; 4]),
        })
    }

    /// Whether a warning of this kind is due (rate limit).
    fn warn_due(&self, kind: Warning) -> bool {
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let slot = &mut last[kind as usize];
        if slot.is_some_and(|at| now - at < WARN_INTERVAL) {
            return false;
        }
        *slot = Some(now);
        true
    }

    /// A slot in this listener's budget; when full, says so, closes the
    /// connections that have no request open (again every [`REAP_RETRY`]
    /// while it stays full) and waits.
    async fn admit(&self) -> OwnedSemaphorePermit {
        if let Ok(permit) = self.budget.clone().try_acquire_owned() {
            return permit;
        }
        self.metrics.connection_limit_reached.get_or_create(&self.labels).inc();
        if self.warn_due(Warning::ConnectionLimit) {
            warn!(listener = %self.labels.listener, max_connections = self.limits.max_connections,
                  "connection limit reached; idle connections are closed to make room, new ones wait in the backlog");
        }
        loop {
            self.reap_idle();
            let wait = self.budget.clone().acquire_owned();
            if let Ok(permit) = tokio::time::timeout(REAP_RETRY, wait).await {
                return permit.expect("the budget semaphore is never closed");
            }
        }
    }

    /// Tells every connection idle for [`REAP_MIN_IDLE`] to close.
    fn reap_idle(&self) {
        let mut reap = self.reap.lock().unwrap_or_else(|p| p.into_inner());
        reap.1.store(true, Ordering::Release);
        reap.0.cancel();
        *reap = (CancellationToken::new(), Arc::new(AtomicBool::new(false)));
    }

    /// What the next [`ListenerGuard::reap_idle`] will cancel.
    fn next_reap(&self) -> Reap {
        let (token, flag) = self.reap.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Reap {
            fired: Box::pin(token.cancelled_owned()),
            flag,
            armed: false,
        }
    }

    /// An accept error: counted, logged (rate-limited), and waited out when
    /// it is about resources (EMFILE, ENFILE, ENOBUFS, ENOMEM), so that a
    /// full descriptor table does not turn the accept loop into a spin.
    async fn accept_failed(&self, error: io::Error, backoff: &mut Duration) {
        self.metrics.accept_errors.get_or_create(&self.labels).inc();
        use nix::errno::Errno;
        let resource = error
            .raw_os_error()
            .map(Errno::from_raw)
            .is_some_and(|e| [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM].contains(&e));
        if self.warn_due(Warning::AcceptError) {
            warn!(listener = %self.labels.listener, error = %error, "cannot accept a connection");
        }
        if resource {
            tokio::time::sleep(*backoff).await;
            *backoff = (*backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Counts a request that filled its connection's stream budget.
    fn stream_limit_reached(&self) {
        self.metrics.stream_limit_reached.get_or_create(&self.labels).inc();
        if self.warn_due(Warning::StreamLimit) {
            warn!(listener = %self.labels.listener, max_concurrent_streams = self.limits.max_concurrent_streams,
                  "a connection reached its concurrent stream limit; further streams wait");
        }
    }

    fn guard<IO>(self: &Arc<Self>, io: IO, permit: OwnedSemaphorePermit) -> Guarded<IO> {
        self.metrics.connections.get_or_create(&self.labels).inc();
        let accepted = Instant::now();
        Guarded {
            io,
            activity: Arc::new(Activity::new(accepted, self.awaiting_first.clone())),
            listener: self.clone(),
            // No deadline can come sooner than this one (see `check_deadline`).
            timer: Box::pin(tokio::time::sleep_until(
                accepted + self.limits.handshake_timeout.min(self.limits.idle_timeout),
            )),
            timer_armed: false,
            expired: None,
            reap: self.next_reap(),
            _permit: permit,
        }
    }

    /// Counts one more held request on `activity`'s connection. The
    /// connection's first takes a slot of the held share, unless the share
    /// is taken (counted, and logged once per burst); later ones on the same
    /// connection share that slot.
    fn hold(self: &Arc<Self>, activity: &Arc<Activity>) -> Result<HeldRequest, HeldLimitReached> {
        let mut slot = activity.held.lock().unwrap_or_else(|p| p.into_inner());
        if slot.open == 0 {
            let Ok(permit) = self.held.clone().try_acquire_owned() else {
                drop(slot);
                return Err(self.held_limit_reached());
            };
            slot.permit = Some(permit);
            self.metrics.held_connections.get_or_create(&self.labels).inc();
        }
        slot.open += 1;
        self.metrics.held_requests.get_or_create(&self.labels).inc();
        Ok(HeldRequest {
            listener: self.clone(),
            activity: activity.clone(),
        })
    }

    fn held_limit_reached(&self) -> HeldLimitReached {
        self.metrics.held_requests_refused.get_or_create(&self.labels).inc();
        let max_held_connections = self.limits.max_held_connections();
        if self.warn_due(Warning::HeldLimit) {
            warn!(listener = %self.labels.listener, max_held_connections,
                  "held connections limit reached; new long polls and WatchToken streams on other connections are refused for now");
        }
        HeldLimitReached { max_held_connections }
    }
}

/// One held request, counted on its connection until dropped; the last
/// one of a connection gives the connection's slot back.
pub struct HeldRequest {
    listener: Arc<ListenerGuard>,
    activity: Arc<Activity>,
}

impl Drop for HeldRequest {
    fn drop(&mut self) {
        let metrics = &self.listener.metrics;
        let labels = &self.listener.labels;
        metrics.held_requests.get_or_create(labels).dec();
        let mut slot = self.activity.held.lock().unwrap_or_else(|p| p.into_inner());
        slot.open -= 1;
        if slot.open == 0 {
            slot.permit = None;
            metrics.held_connections.get_or_create(labels).dec();
        }
    }
}

impl std::fmt::Debug for HeldRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldRequest")
            .field("listener", &self.listener.labels.listener)
            .finish()
    }
}

/// The listener's share for holding connections is taken: answer at once
/// with RESOURCE_EXHAUSTED / 429 and [`HELD_RETRY_DELAY`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldLimitReached {
    pub max_held_connections: usize,
}

/// Counts a held request (a long poll, a WatchToken stream) on the
/// connection it arrived on; keep it for as long as the request is held.
/// Refused only when it is its connection's first held request and the
/// listener's share of holding connections is taken. A request from no
/// guarded listener (an in-process test server) is not limited.
pub fn hold(extensions: &http::Extensions) -> Result<Option<HeldRequest>, HeldLimitReached> {
    match request_connection(extensions) {
        Some((activity, listener)) => listener.hold(activity).map(Some),
        None => Ok(None),
    }
}

/// A socket a listener can accept.
pub trait Accept: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Accept for TcpListener {
    type Io = TcpStream;
    async fn accept(&self) -> io::Result<TcpStream> {
        let (stream, _) = TcpListener::accept(self).await?;
        // Small replies must not wait for Nagle's algorithm (~40 ms).
        stream.set_nodelay(true)?;
        keep_alive(&stream)?;
        Ok(stream)
    }
}

/// A vanished TCP peer (a crashed host, a dropped NAT mapping) is found by
/// the kernel's keepalive probes: the first after 30 s without traffic,
/// then every 10 s, and the connection is closed after 3 unanswered (about
/// 60 s). The kernel does this at no cost per request, where HTTP/2 PING
/// frames would put timer bookkeeping on every frame; a Unix socket's
/// peer cannot vanish without the kernel closing it.
fn keep_alive(stream: &TcpStream) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(stream, sockopt::KeepAlive, &true)?;
    setsockopt(stream, sockopt::TcpKeepIdle, &TCP_KEEPALIVE_IDLE)?;
    setsockopt(stream, sockopt::TcpKeepInterval, &TCP_KEEPALIVE_INTERVAL)?;
    setsockopt(stream, sockopt::TcpKeepCount, &TCP_KEEPALIVE_PROBES)?;
    Ok(())
}

/// Seconds without traffic before the first keepalive probe.
pub const TCP_KEEPALIVE_IDLE: u32 = 30;
/// Seconds between unanswered probes.
pub const TCP_KEEPALIVE_INTERVAL: u32 = 10;
/// Unanswered probes before the kernel closes the connection.
pub const TCP_KEEPALIVE_PROBES: u32 = 3;

impl Accept for UnixListener {
    type Io = UnixStream;
    async fn accept(&self) -> io::Result<UnixStream> {
        UnixListener::accept(self).await.map(|(stream, _)| stream)
    }
}

/// Accepts the next connection within the listener's budget.
pub async fn accept<L: Accept>(listener: &L, guard: &Arc<ListenerGuard>) -> Guarded<L::Io> {
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = guard.admit().await;
        match listener.accept().await {
            Ok(io) => return guard.guard(io, permit),
            Err(e) => guard.accept_failed(e, &mut backoff).await,
        }
    }
}

/// The connections of `listener`, as a stream for the serve loop
/// (`serve::connections`). Once `stopping` is cancelled no connection is
/// accepted any more (the stream stays pending: the server ends by its
/// shutdown signal, [`ListenerGuard::settled`]); those still queued are
/// left to the successor that inherits the socket.
pub fn incoming<L: Accept>(
    listener: L,
    guard: Arc<ListenerGuard>,
    stopping: tokio_util::sync::CancellationToken,
) -> impl futures_util::Stream<Item = io::Result<Guarded<L::Io>>> + Send + 'static {
    futures_util::stream::unfold((listener, guard), move |(listener, guard)| {
        let stopping = stopping.clone();
        async move {
            tokio::select! {
                biased;
                _ = stopping.cancelled() => std::future::pending().await,
                conn = accept(&listener, &guard) => Some((Ok(conn), (listener, guard))),
            }
        }
    })
}

/// Longest a stopping listener waits for its accepted connections to
/// begin their first request.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

impl ListenerGuard {
    /// Resolves once `stopping` is cancelled and every connection accepted
    /// before it has begun its first request (or closed), at most
    /// [`FIRST_REQUEST_GRACE`] later: the server's shutdown signal. A
    /// connection still reading its first bytes (HTTP version detection, the
    /// HTTP/2 handshake) would otherwise be closed by the graceful shutdown
    /// without an answer; with a request open it gets GOAWAY or its answer.
    pub async fn settled(self: Arc<Self>, stopping: tokio_util::sync::CancellationToken) {
        stopping.cancelled().await;
        let deadline = Instant::now() + FIRST_REQUEST_GRACE.min(self.limits.handshake_timeout);
        while self.awaiting_first.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// An accepted socket under its listener's deadlines. Reading fails with
/// `TimedOut` once a deadline passes, which makes the server close it.
///
/// The timer is armed at or before the connection's real deadline and
/// re-armed only when it fires, so requests cost a few atomic operations
/// and no timer work: a deadline only ever moves later.
pub struct Guarded<IO> {
    io: IO,
    activity: Arc<Activity>,
    listener: Arc<ListenerGuard>,
    timer: Pin<Box<Sleep>>,
    /// The timer has been polled since it was last reset, so the task is
    /// woken when it fires; until then a read checks it with one atomic
    /// load (`is_elapsed`) instead of polling it.
    timer_armed: bool,
    expired: Option<&'static str>,
    /// Fires when the listener's budget is full (see [`ListenerGuard::admit`]).
    reap: Reap,
    _permit: OwnedSemaphorePermit,
}

impl<IO> Guarded<IO> {
    /// `Err` once the connection has outlived its deadline, or is idle
    /// while its listener needs room.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.timer_armed || self.timer.is_elapsed() {
            while self.expired.is_none() && self.timer.as_mut().poll(cx).is_ready() {
                let limits = &self.listener.limits;
                let now = Instant::now();
                match self.activity.deadline(limits) {
                    Some((deadline, _)) if now < deadline => self.timer.as_mut().reset(deadline),
                    Some((_, reason)) => self.expire(reason),
                    // Requests are open: no deadline now; the earliest one there
                    // can be is an idle period after the last request ends.
                    None => self.timer.as_mut().reset(now + limits.idle_timeout),
                }
            }
            self.timer_armed = true;
        }
        // Only an idle connection listens for the reaper (a request in
        // progress is never cut); one that missed a round re-arms. The
        // waker is registered once (the connection is always polled by the
        // same task); after that a read costs one atomic load.
        while self.expired.is_none() && self.activity.is_idle() {
            if !self.reap.armed {
                self.reap.armed = true;
                if self.reap.fired.as_mut().poll(cx).is_pending() {
                    break;
                }
            } else if !self.reap.flag.load(Ordering::Acquire) {
                break;
            }
            if self.activity.idle_for(REAP_MIN_IDLE, Instant::now()) {
                self.expire("reaped_under_pressure");
            } else {
                self.reap = self.listener.next_reap();
            }
        }
        match self.expired {
            None => Ok(()),
            Some(reason) => Err(io::Error::new(io::ErrorKind::TimedOut, reason)),
        }
    }
}

/// A connection's view of its listener's reaper.
struct Reap {
    /// Set when the reap fires: one atomic load per read once armed.
    flag: Arc<AtomicBool>,
    /// Wakes the connection when `token` is cancelled, once polled.
    fired: Pin<Box<WaitForCancellationFutureOwned>>,
    armed: bool,
}

impl<IO> Guarded<IO> {
    fn expire(&mut self, reason: &'static str) {
        self.expired = Some(reason);
        let labels = ClosedLabels {
            listener: self.listener.labels.listener.clone(),
            reason,
        };
        self.listener.metrics.connections_closed.get_or_create(&labels).inc();
        debug!(listener = %labels.listener, reason, "closing a connection");
    }
}

impl<IO> Drop for Guarded<IO> {
    fn drop(&mut self) {
        if !self.activity.seen_request.swap(true, Ordering::AcqRel) {
            self.activity.awaiting_first.fetch_sub(1, Ordering::AcqRel);
        }
        self.listener
            .metrics
            .connections
            .get_or_create(&self.listener.labels)
            .dec();
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.check_deadline(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

/// `AsyncWrite` for a connection wrapper that changes only the read side:
/// every write goes straight to its `io` field.
macro_rules! forward_writes {
    ($wrapper:ident) => {
        impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<IO> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.io).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
            }
            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }
        }
    };
}
pub(crate) use forward_writes;

forward_writes!(Guarded);

/// What a request learns of its connection, put in every request's
/// extensions by the serve loop: who is at the other end (read once per
/// connection, [`super::peer`]), and the connection's activity and
/// listener (for the held share and request tracking).
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub peer: super::peer::Peer,
    pub(crate) activity: Arc<Activity>,
    listener: Arc<ListenerGuard>,
}

impl std::fmt::Debug for ListenerGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerGuard")
            .field("listener", &self.labels.listener)
            .finish()
    }
}

/// An accepted connection the serve loop can describe to its requests.
pub trait Connection {
    fn info(&self) -> ConnectionInfo;
}

impl<IO: super::peer::Peered> Connection for Guarded<IO> {
    fn info(&self) -> ConnectionInfo {
        ConnectionInfo {
            peer: self.io.peer(),
            activity: self.activity.clone(),
            listener: self.listener.clone(),
        }
    }
}

impl<IO: super::peer::Peered> Connection for tokio_rustls::server::TlsStream<Guarded<IO>> {
    fn info(&self) -> ConnectionInfo {
        use super::peer::Peered;
        let guarded = self.get_ref().0;
        ConnectionInfo {
            peer: self.peer(),
            activity: guarded.activity.clone(),
            listener: guarded.listener.clone(),
        }
    }
}

impl<IO: super::peer::Peered> super::peer::Peered for Guarded<IO> {
    fn peer(&self) -> super::peer::Peer {
        self.io.peer()
    }
}

/// For a tonic `Server` serving guarded connections (the benches): the
/// same information in the request's extensions.
impl<IO: super::peer::Peered> tonic::transport::server::Connected for Guarded<IO> {
    type ConnectInfo = ConnectionInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info()
    }
}

/// The connection a request arrived on, whatever the transport.
fn request_connection(extensions: &http::Extensions) -> Option<(&Arc<Activity>, &Arc<ListenerGuard>)> {
    extensions.get::<ConnectionInfo>().map(|i| (&i.activity, &i.listener))
}

/// A face's screen of HTTP/1.x requests: `Some(answer)` refuses one before
/// any route runs (the API face refuses gRPC content types over HTTP/1.x).
pub type Http1Screen = fn(&http::HeaderMap) -> Option<http::Response<tonic::body::Body>>;

/// The entry of every request into a face: an HTTP/1.x request first
/// passes the face's [`Http1Screen`], then it is counted as open on its
/// connection until its response body has been sent, and its body is
/// held to the face's size limit ([`super::request_limit`]) (a WatchToken stream
/// stays open for its lifetime). One layer at the server, not a layer per
/// route: the router's own routes are not wrapped again.
#[derive(Clone, Copy, Debug)]
pub struct StreamTrackingLayer {
    pub http1_screen: Option<Http1Screen>,
    /// The face's request size limit ([`super::request_limit`]).
    pub max_request_bytes: usize,
}

impl<S> tower::Layer<S> for StreamTrackingLayer {
    type Service = StreamTracking<S>;
    fn layer(&self, inner: S) -> Self::Service {
        StreamTracking {
            inner,
            http1_screen: self.http1_screen,
            max_request_bytes: self.max_request_bytes,
        }
    }
}

#[derive(Clone, Debug)]
pub struct StreamTracking<S> {
    inner: S,
    http1_screen: Option<Http1Screen>,
    max_request_bytes: usize,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for StreamTracking<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Tracked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.version() < http::Version::HTTP_2
            && let Some(refused) = self.http1_screen.and_then(|screen| screen(request.headers()))
        {
            return Tracked {
                inner: None,
                refused: Some(refused),
                guard: None,
                span: None,
            };
        }
        let guard = request_connection(request.extensions()).map(|(activity, listener)| {
            let (guard, open) = activity.begin();
            if open >= listener.limits.max_concurrent_streams as usize {
                listener.stream_limit_reached();
            }
            guard
        });
        let request = super::request_limit::limited(request, self.max_request_bytes);
        if !crate::telemetry::enabled() || !crate::telemetry::sampled(request.headers()) {
            return Tracked {
                inner: Some(self.inner.call(request)),
                refused: None,
                guard,
                span: None,
            };
        }
        // Traces on: the request is a server span, child of the caller's
        // `traceparent` when it sent one (path only: never a query).
        let span = tracing::info_span!("request", otel.name = request.uri().path(), otel.kind = "server");
        crate::telemetry::adopt_parent(&span, request.headers());
        let inner = span.in_scope(|| self.inner.call(request));
        Tracked {
            inner: Some(inner),
            refused: None,
            guard,
            span: Some(span),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of a tracked request: the router's, its body holding
    /// the request's [`RequestGuard`] (inside the request's span when
    /// traces are on); or the face's refusal of an HTTP/1.x request.
    pub struct Tracked<F> {
        #[pin]
        inner: Option<F>,
        refused: Option<http::Response<tonic::body::Body>>,
        guard: Option<RequestGuard>,
        span: Option<tracing::Span>,
    }
}

impl<F, E> Future for Tracked<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Ok(this.refused.take().expect("Tracked polled after it completed")));
        };
        let _entered = this.span.as_ref().map(tracing::Span::enter);
        let response = ready!(inner.poll(cx))?;
        Poll::Ready(Ok(match this.guard.take() {
            Some(guard) => response.map(|body| {
                let guarded = http_body_util::BodyExt::boxed_unsync(GuardedBody { body, _guard: guard });
                tonic::body::Body::new(guarded)
            }),
            None => response,
        }))
    }
}

/// A response body that keeps its request counted until it is dropped.
struct GuardedBody {
    body: tonic::body::Body,
    _guard: RequestGuard,
}

impl http_body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every face's listener accepts through this: every
    /// accepted TCP socket has Nagle's algorithm off.
    #[tokio::test]
    async fn accepted_tcp_sockets_have_nodelay_and_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let guard = ListenerGuard::new("test".into(), ConnectionLimits::default(), Arc::new(Metrics::new()));
        let (_client, accepted) = tokio::join!(TcpStream::connect(addr), accept(&listener, &guard));
        assert!(accepted.io.nodelay().unwrap());
        use nix::sys::socket::{getsockopt, sockopt};
        assert!(getsockopt(&accepted.io, sockopt::KeepAlive).unwrap());
        assert_eq!(
            getsockopt(&accepted.io, sockopt::TcpKeepIdle).unwrap(),
            TCP_KEEPALIVE_IDLE
        );
        assert_eq!(
            getsockopt(&accepted.io, sockopt::TcpKeepInterval).unwrap(),
            TCP_KEEPALIVE_INTERVAL
        );
        assert_eq!(
            getsockopt(&accepted.io, sockopt::TcpKeepCount).unwrap(),
            TCP_KEEPALIVE_PROBES
        );
    }

    #[test]
    fn budgets_fit_in_the_fd_limit() {
        assert_eq!(per_listener_budget(1024, 1_048_576, 3), 1024);
        assert_eq!(per_listener_budget(1024, 256, 3), 64);
        assert_eq!(per_listener_budget(1024, 10, 3), 1);
        assert_eq!(per_listener_budget(1024, u64::MAX, 3), 1024);
    }
}
