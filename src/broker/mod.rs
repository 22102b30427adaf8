//! The broker's core, the one place that decides: which environment a
//! caller may use ([`Core::authorize`]), GetToken ([`Core::get_token`]:
//! the current token from the source's watch channel, no lock a refresh
//! holds, no I/O; or one from the source's coalesced request path, bounded
//! by the call's wait), RefreshToken ([`Core::refresh_token`]), GetStatus
//! ([`Core::status`]) and WatchToken ([`Core::watch`]), and their one error
//! type ([`BrokerError`], no transport in it). Every face (gRPC, the
//! HTTP/JSON read, the API proxy) translates its requests into these calls
//! and the answers back; none decides on its own, and none imports another.

mod error;
mod limits;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

pub use error::{BrokerError, reason};

use crate::audit::Audit;
use crate::environment::Environment;
use crate::identity::Caller;
use crate::metrics::Metrics;
use crate::policy::{Policy, ProxyRefusal};
use crate::serve::guard::HeldRequest;
use crate::token::{RefreshError, Snapshot, SourceState, Token, TokenSourceHandle, TokenSources};
use crate::wire::{self, pb, pb::watch_token_response::Update, timestamp, wall_time};
use limits::EnvironmentLimits;
use std::collections::BTreeMap;

/// Longest accepted `rejected_token_id`.
const MAX_TOKEN_ID_LEN: usize = 128;

#[derive(Clone)]
pub struct Core {
    sources: Arc<TokenSources>,
    /// Cancelled once the listeners stopped and every connection has GOAWAY:
    /// every WatchToken stream ends with UNAVAILABLE / SHUTTING_DOWN and a
    /// zero retry delay, so clients reconnect at once (to the successor).
    /// Unary calls are still answered from the tokens held.
    draining: CancellationToken,
    /// Every open WatchToken stream holds a token of this tracker, so that
    /// shutdown can wait for them to end.
    streams: TaskTracker,
    metrics: Arc<Metrics>,
    /// Longest wait for a token when the caller's deadline is longer or unset.
    request_wait: Duration,
    /// Who may get which environment's tokens and call which routes.
    policy: Arc<Policy>,
    /// Where what it decides is recorded.
    audit: Audit,
    /// Per environment, the per-caller limits of forced refreshes and of
    /// proxied requests, where the rules set them.
    limits: Arc<BTreeMap<Environment, EnvironmentLimits>>,
    /// The TLS material in use, shown by GetStatus.
    certificates: Option<Arc<crate::certs::Rotation>>,
}

impl Core {
    pub fn new(
        sources: Arc<TokenSources>,
        draining: CancellationToken,
        streams: TaskTracker,
        metrics: Arc<Metrics>,
        request_wait: Duration,
        policy: Policy,
    ) -> Self {
        Self {
            sources,
            draining,
            streams,
            request_wait,
            limits: Arc::new(
                Environment::ALL
                    .into_iter()
                    .map(|env| (env, EnvironmentLimits::new(policy.limits(env))))
                    .collect(),
            ),
            policy: Arc::new(policy),
            audit: Audit::default(),
            metrics,
            certificates: None,
        }
    }

    /// GetStatus shows the certificates of `rotation` with their expiry.
    pub fn with_certificates(mut self, rotation: Arc<crate::certs::Rotation>) -> Self {
        self.certificates = Some(rotation);
        self
    }

    /// The source of `env`, if it is enabled and `caller` may use it: the
    /// one access check of a request (a long poll included).
    pub fn authorize(&self, env: Environment, caller: &Caller) -> Result<&TokenSourceHandle, BrokerError> {
        let source = self.sources.get(env).ok_or(BrokerError::EnvironmentNotEnabled(env))?;
        if !self.audit.admits() {
            return Err(BrokerError::AuditUnavailable);
        }
        if !self.allows(env, caller) {
            self.audit.refused(caller, env, reason::CALLER_NOT_ALLOWED);
            return Err(self.refusal(caller, BrokerError::PermissionDenied(env)));
        }
        Ok(source)
    }

    /// Counts `error` against `caller` (per-caller metrics) and returns it.
    fn refusal(&self, caller: &Caller, error: BrokerError) -> BrokerError {
        let environment = error.environment().map_or("", |e| e.as_str());
        self.metrics
            .caller_refusals
            .get_or_create(&crate::metrics::CallerLabels {
                caller: self.policy.label_of(caller).to_owned(),
                environment,
                outcome: error.reason(),
            })
            .inc();
        error
    }

    /// The name `caller` is counted under (its first named caller, else
    /// `unnamed` or `anonymous`), when the configuration names callers.
    pub fn caller_label(&self, caller: &Caller) -> Option<&str> {
        self.policy.names_callers().then(|| self.policy.label_of(caller))
    }

    /// Records what this core decides in `audit`.
    pub fn with_audit(mut self, audit: Audit) -> Self {
        self.audit = audit;
        self
    }

    /// The audit trail this core records in (a no-op one when off).
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// The metrics the core and its faces count in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Longest wait for a token when the caller sets no deadline.
    pub fn request_wait(&self) -> Duration {
        self.request_wait
    }

    /// Cancelled when the broker starts draining (long polls answer then).
    pub fn draining(&self) -> &CancellationToken {
        &self.draining
    }

    /// GetToken: the current token, or (with `min_remaining`, or before the
    /// first token) one from the source's coalesced request path, waited for
    /// at most `wait()` (worked out only when the call has to wait).
    pub(crate) async fn get_token(
        &self,
        source: &TokenSourceHandle,
        caller: &Caller,
        min_remaining: Option<Duration>,
        wait: impl FnOnce() -> Duration,
    ) -> Result<Served, BrokerError> {
        let served = self.obtain(source, caller, min_remaining, wait).await?;
        self.audit.served(caller, source.environment(), &served.token);
        Ok(served)
    }

    /// The token a proxied request is sent with: as GetToken, but not
    /// handed out (the caller never sees it), so not recorded as served.
    pub(crate) async fn token_for_proxy(
        &self,
        source: &TokenSourceHandle,
        caller: &Caller,
        wait: Duration,
    ) -> Result<Arc<Token>, BrokerError> {
        Ok(self.obtain(source, caller, None, || wait).await?.token)
    }

    async fn obtain(
        &self,
        source: &TokenSourceHandle,
        caller: &Caller,
        min_remaining: Option<Duration>,
        wait: impl FnOnce() -> Duration,
    ) -> Result<Served, BrokerError> {
        let min_remaining = min_remaining.unwrap_or_default();
        // The hot path: one clock read for the check and the answer.
        let now = Instant::now();
        if let Some(token) = source.current_at(now).filter(|t| t.remaining(now) >= min_remaining) {
            return Ok(Served { token, at: now });
        }
        let env = source.environment();
        let wait = wait();
        if source.snapshot().state() == SourceState::Starting {
            tokio::time::timeout(wait, source.started())
                .await
                .map_err(|_| BrokerError::DeadlineExceeded(env))?;
        }
        let token = if min_remaining.is_zero() {
            source.current().ok_or_else(|| no_valid_token(source))?
        } else {
            // A refresh this caller forces: within its limit, and recorded.
            self.admit(env, caller, LimitKind::Refresh)?;
            self.audit.refresh_forced(caller, env, None, "min_remaining");
            within(env, wait, source.token_with_remaining(min_remaining)).await?
        };
        Ok(Served {
            token,
            at: Instant::now(),
        })
    }

    /// RefreshToken: a token other than the one the API rejected.
    pub(crate) async fn refresh_token(
        &self,
        source: &TokenSourceHandle,
        caller: &Caller,
        rejected_token_id: &str,
        wait: Duration,
        by: &'static str,
    ) -> Result<Arc<Token>, BrokerError> {
        let id = rejected_token_id.trim();
        if id.is_empty() || id.len() > MAX_TOKEN_ID_LEN {
            let message = format!("must be the token_id of the rejected token (1 to {MAX_TOKEN_ID_LEN} characters)");
            return Err(BrokerError::InvalidArgument {
                field: "rejected_token_id",
                message,
            });
        }
        // Only a rejection of the current token forces a refresh (any
        // other is answered with the current token): that counts.
        if source.current().is_some_and(|t| t.token_id == id) {
            self.admit(source.environment(), caller, LimitKind::Refresh)?;
            self.audit.refresh_forced(caller, source.environment(), Some(id), by);
        }
        within(source.environment(), wait, source.replace_rejected(id)).await
    }

    /// One more of `kind` for `caller` in `env`, within its limit.
    fn admit(&self, env: Environment, caller: &Caller, kind: LimitKind) -> Result<(), BrokerError> {
        let Some(limits) = self.limits.get(&env) else {
            return Ok(());
        };
        let limiter = match kind {
            LimitKind::Refresh => &limits.refresh,
            LimitKind::Proxy => &limits.proxy,
        };
        let Some(limiter) = limiter else { return Ok(()) };
        limiter
            .take(self.policy.label_of(caller), Instant::now())
            .map_err(|retry_after| {
                self.refusal(
                    caller,
                    BrokerError::RateLimited {
                        environment: env,
                        what: kind.what(),
                        retry_after,
                    },
                )
            })
    }

    /// Every enabled environment; those the caller may not get tokens of
    /// are listed as restricted, without details.
    pub fn status(&self, caller: &Caller) -> pb::GetStatusResponse {
        let environments = self
            .sources
            .iter()
            .map(|source| match self.allows(source.environment(), caller) {
                true => environment_status(source),
                false => pb::EnvironmentStatus {
                    environment: pb::Environment::from(source.environment()) as i32,
                    state: pb::State::Restricted as i32,
                    ..Default::default()
                },
            })
            .collect();
        let certificates = self
            .certificates
            .iter()
            .flat_map(|rotation| rotation.in_use())
            .map(|cert| pb::CertificateStatus {
                role: cert.role.to_owned(),
                subject: cert.certificate.subject.clone(),
                serial: cert.certificate.serial.clone(),
                not_after: Some(prost_types::Timestamp::from(cert.certificate.not_after)),
            })
            .collect();
        pb::GetStatusResponse {
            environments,
            certificates,
        }
    }

    fn allows(&self, env: Environment, caller: &Caller) -> bool {
        self.policy.may_get_token(env, caller)
    }

    /// The source of `env`, if it is enabled and `caller` may send
    /// `method path` through its proxy (a caller allowed only the proxy
    /// gets the source, never the token itself).
    pub fn authorize_proxy(
        &self,
        env: Environment,
        caller: &Caller,
        method: &http::Method,
        path: &str,
    ) -> Result<&TokenSourceHandle, BrokerError> {
        let source = self.sources.get(env).ok_or(BrokerError::EnvironmentNotEnabled(env))?;
        if !self.audit.admits() {
            return Err(BrokerError::AuditUnavailable);
        }
        match self.policy.may_proxy(env, caller, method, path) {
            Ok(()) => {
                self.admit(env, caller, LimitKind::Proxy)?;
                Ok(source)
            }
            Err(ProxyRefusal::CallerNotAllowed) => Err(self.refusal(caller, BrokerError::PermissionDenied(env))),
            Err(ProxyRefusal::RouteNotAllowed) => Err(self.refusal(caller, BrokerError::RouteNotAllowed(env))),
        }
    }

    /// WatchToken on an authorized source, holding one of its listener's
    /// held-request slots for as long as the stream lives.
    pub fn watch(&self, source: &TokenSourceHandle, caller: &Caller, held: Option<HeldRequest>) -> WatchStream {
        let state = WatchState {
            caller: caller.clone(),
            audit: self.audit.clone(),
            _held: held,
            environment: source.environment(),
            snapshots: source.subscribe(),
            draining: self.draining.clone(),
            _tracked: self.streams.token(),
            last: None,
            done: false,
            _open: OpenStream::new(self.metrics.clone()),
        };
        Box::pin(futures_util::stream::unfold(state, WatchState::next))
    }
}

/// The per-caller limits.
#[derive(Clone, Copy, Debug)]
enum LimitKind {
    Refresh,
    Proxy,
}

impl LimitKind {
    fn what(self) -> &'static str {
        match self {
            LimitKind::Refresh => "forced refreshes (access.refresh_per_minute)",
            LimitKind::Proxy => "proxied requests (access.proxy_per_second)",
        }
    }
}

/// A token GetToken hands out, and the instant it was found servable at
/// (its `serve_for` counts from there).
pub struct Served {
    pub token: Arc<Token>,
    pub at: Instant,
}

/// A token from the source's request path, waited for at most `wait`.
async fn within(
    env: Environment,
    wait: Duration,
    request: impl Future<Output = Result<Arc<Token>, RefreshError>>,
) -> Result<Arc<Token>, BrokerError> {
    tokio::time::timeout(wait, request)
        .await
        .map_err(|_| BrokerError::DeadlineExceeded(env))?
        .map_err(|error| BrokerError::from_refresh(env, error))
}

fn no_valid_token(source: &TokenSourceHandle) -> BrokerError {
    let snapshot = source.snapshot();
    BrokerError::NoValidToken {
        environment: source.environment(),
        reason: snapshot
            .last_error
            .map(|e| e.message.clone())
            .unwrap_or_else(|| "no token has been issued yet".into()),
        next_attempt: snapshot
            .next_attempt
            .map(|at| at.saturating_duration_since(Instant::now())),
    }
}

fn environment_status(source: &TokenSourceHandle) -> pb::EnvironmentStatus {
    let snapshot = source.snapshot();
    let state = match snapshot.state() {
        SourceState::Starting => pb::State::Starting,
        SourceState::Ready => pb::State::Ready,
        SourceState::Degraded => pb::State::Degraded,
        SourceState::Unavailable => pb::State::Unavailable,
    };
    let stats = source.stats();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let token = snapshot.token.as_ref();
    pb::EnvironmentStatus {
        environment: pb::Environment::from(source.environment()) as i32,
        state: state as i32,
        token_id: token.map(|t| t.token_id.clone()).unwrap_or_default(),
        issued_at: token.map(|t| wire::unix_timestamp(t.issued_at_unix)),
        expires_at: token.map(|t| wire::unix_timestamp(t.expires_at_unix)),
        next_attempt_at: snapshot.next_attempt.map(|at| timestamp(wall_time(at))),
        last_error: snapshot
            .last_error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default(),
        last_error_at: snapshot.last_error.as_ref().map(|e| timestamp(e.at)),
        consecutive_failures: snapshot.last_error.as_ref().map(|e| e.consecutive).unwrap_or(0),
        counters: Some(pb::Counters {
            token_endpoint_calls: load(&stats.endpoint_calls),
            refreshes_succeeded: load(&stats.refreshes_ok),
            refreshes_failed: load(&stats.refreshes_failed),
            rotations: load(&stats.rotations),
            early_refreshes: load(&stats.early_refreshes),
        }),
    }
}

/// A WatchToken stream: every change of the source's token or outage,
/// ending with [`BrokerError::ShuttingDown`] when the broker drains.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchTokenResponse, BrokerError>> + Send>>;

/// What a watcher last saw: a token (by id) or an outage.
#[derive(Clone, Debug, PartialEq)]
enum View {
    Token(String),
    Outage(String, Option<Instant>),
}

/// Counts an open WatchToken stream for as long as it lives.
struct OpenStream(Arc<Metrics>);

impl OpenStream {
    fn new(metrics: Arc<Metrics>) -> Self {
        metrics.watch_streams.inc();
        Self(metrics)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.watch_streams.dec();
    }
}

/// One WatchToken stream. It reads the watch channel at its own pace and
/// only ever sees the latest state, so a slow reader holds nothing back.
struct WatchState {
    /// Whom the stream hands tokens to, for the audit trail.
    caller: Caller,
    audit: Audit,
    environment: crate::Environment,
    snapshots: watch::Receiver<Snapshot>,
    draining: CancellationToken,
    _tracked: TaskTrackerToken,
    /// The stream's slot among the listener's held requests.
    _held: Option<HeldRequest>,
    last: Option<View>,
    done: bool,
    _open: OpenStream,
}

impl WatchState {
    async fn next(mut self) -> Option<(Result<pb::WatchTokenResponse, BrokerError>, Self)> {
        loop {
            if self.done {
                return None;
            }
            if let Some(update) = self.update() {
                return Some((Ok(pb::WatchTokenResponse { update: Some(update) }), self));
            }
            let ended = tokio::select! {
                biased;
                _ = self.draining.cancelled() => true,
                changed = self.snapshots.changed() => changed.is_err(),
            };
            if ended {
                self.done = true;
                return Some((Err(BrokerError::ShuttingDown), self));
            }
        }
    }

    /// The update to send for the latest snapshot, if it differs from the last one sent.
    fn update(&mut self) -> Option<Update> {
        let snapshot = self.snapshots.borrow_and_update().clone();
        let now = Instant::now();
        let (view, update) = match snapshot.servable(now) {
            Some(token) => {
                self.audit.served(&self.caller, self.environment, token);
                (
                    View::Token(token.token_id.clone()),
                    Update::Token(token.as_ref().into()),
                )
            }
            None if snapshot.state() == SourceState::Starting => return None,
            None => {
                let reason = snapshot
                    .last_error
                    .as_ref()
                    .map(|e| e.message.clone())
                    .unwrap_or_else(|| "token expired".into());
                let outage = pb::Outage {
                    environment: pb::Environment::from(self.environment) as i32,
                    reason: reason.clone(),
                    next_attempt_at: snapshot.next_attempt.map(|at| timestamp(wall_time(at))),
                };
                (View::Outage(reason, snapshot.next_attempt), Update::Outage(outage))
            }
        };
        if self.last.as_ref() == Some(&view) {
            return None;
        }
        self.last = Some(view);
        Some(update)
    }
}
