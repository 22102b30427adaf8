//! The TokenSource: one task per environment that alone talks to the token
//! endpoint. It owns the API key, the refresh token and the schedule, and
//! publishes a [`Snapshot`] on a watch channel that every reader borrows.
//! Readers that need more than the current token (more remaining lifetime,
//! or a replacement for a token the API rejected) send a message; messages
//! that arrive together are answered by one token-endpoint call, so
//! single-flight is a property of the structure rather than of a lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tracing::{error, info, warn};

use super::Token;
use super::policy::{Jitter, RefreshPolicy};
use crate::credentials::ApiKey;
use crate::environment::Environment;
use crate::metrics::{EnvLabels, Metrics};
use crate::oauth::{ErrorClass, Grant, OAuthError, TokenEndpoint, TokenResponse};

/// Settings of one TokenSource.
#[derive(Clone, Debug)]
pub struct TokenSourceConfig {
    pub environment: Environment,
    pub policy: RefreshPolicy,
    /// Use the refresh grant when the endpoint issued a refresh token.
    pub use_refresh_token: bool,
    pub jitter: Jitter,
}

impl TokenSourceConfig {
    pub fn new(environment: Environment) -> Self {
        Self {
            environment,
            policy: RefreshPolicy::default(),
            use_refresh_token: true,
            jitter: Jitter::Random,
        }
    }
}

/// Why the last token request failed. Secret-free by construction: built
/// from [`OAuthError`]'s Display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefreshFailure {
    pub message: String,
    pub class: ErrorClass,
    pub at: SystemTime,
    pub consecutive: u32,
}

/// What readers see of a TokenSource.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The token being handed out; `None` while starting or in an outage.
    pub token: Option<Arc<Token>>,
    /// The last failure since the last success.
    pub last_error: Option<Arc<RefreshFailure>>,
    /// When the task will next call the token endpoint.
    pub next_attempt: Option<Instant>,
}

/// The four states a source can be in, derived from a [`Snapshot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceState {
    /// The first request has not finished.
    Starting,
    /// A valid token, refreshes succeeding.
    Ready,
    /// A valid token, but the last refresh failed.
    Degraded,
    /// No valid token.
    Unavailable,
}

impl Snapshot {
    pub fn state(&self) -> SourceState {
        match (&self.token, &self.last_error) {
            (Some(_), None) => SourceState::Ready,
            (Some(_), Some(_)) => SourceState::Degraded,
            (None, None) => SourceState::Starting,
            (None, Some(_)) => SourceState::Unavailable,
        }
    }

    /// The token if it may be handed out at `now`.
    pub fn servable(&self, now: Instant) -> Option<&Arc<Token>> {
        self.token.as_ref().filter(|t| t.is_servable(now))
    }
}

/// Counters per source, read by GetStatus.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Requests sent to the token endpoint.
    pub endpoint_calls: AtomicU64,
    pub refreshes_ok: AtomicU64,
    pub refreshes_failed: AtomicU64,
    /// New access tokens published (a re-issued identical token is not one).
    pub rotations: AtomicU64,
    /// Caller-requested refreshes that reached the endpoint.
    pub early_refreshes: AtomicU64,
}

/// What a caller that needs more than the current token gets back.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RefreshOutcome {
    #[error("no valid token: {reason}")]
    Unavailable {
        reason: String,
        next_attempt: Option<Instant>,
    },
    #[error("tokens from this endpoint live {lifetime:?}; {requested:?} of remaining lifetime cannot be provided")]
    OutOfRange { requested: Duration, lifetime: Duration },
    #[error("token source stopped")]
    Stopped,
}

/// What an early refresh must achieve.
#[derive(Clone, Debug)]
enum Need {
    /// A token with at least this much left before expiry.
    Remaining(Duration),
    /// A token other than this one (the API rejected it).
    Replaces(String),
}

impl Need {
    fn met_by(&self, token: &Token, now: Instant) -> bool {
        match self {
            Need::Remaining(d) => token.is_servable(now) && token.remaining(now) >= *d,
            Need::Replaces(id) => token.is_servable(now) && token.token_id != *id,
        }
    }
}

type Reply = oneshot::Sender<Result<Arc<Token>, RefreshOutcome>>;

enum Command {
    Refresh {
        need: Need,
        reply: Reply,
    },
    ReplaceKey {
        key: ApiKey,
        reply: oneshot::Sender<Result<bool, OAuthError>>,
    },
}

/// A cheap, cloneable handle to one TokenSource.
#[derive(Clone)]
pub struct TokenSourceHandle {
    environment: Environment,
    state: watch::Receiver<Snapshot>,
    commands: mpsc::Sender<Command>,
    stats: Arc<SourceStats>,
}

impl TokenSourceHandle {
    pub fn environment(&self) -> Environment {
        self.environment
    }

    /// The hot path: the current token if it may be handed out. No I/O,
    /// no lock a refresh holds (the watch value is replaced, never mutated
    /// in place), one Arc clone.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.state.borrow().servable(Instant::now()).cloned()
    }

    /// Whether the source task is still running.
    pub fn is_running(&self) -> bool {
        !self.commands.is_closed()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.state.borrow().clone()
    }

    /// A receiver that sees every published change.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.state.clone()
    }

    pub fn stats(&self) -> &SourceStats {
        &self.stats
    }

    /// Waits until the first token request has finished (successfully or not).
    pub async fn started(&self) -> Snapshot {
        let mut rx = self.state.clone();
        let result = rx
            .wait_for(|s| s.state() != SourceState::Starting)
            .await
            .map(|s| s.clone());
        result.unwrap_or_default()
    }

    /// A token with at least `remaining` left; refreshes early (coalesced,
    /// rate-limited) when the current one has less.
    pub async fn token_with_remaining(&self, remaining: Duration) -> Result<Arc<Token>, RefreshOutcome> {
        if let Some(token) = self.current().filter(|t| t.remaining(Instant::now()) >= remaining) {
            return Ok(token);
        }
        self.request(Need::Remaining(remaining)).await
    }

    /// A token other than `rejected_token_id`, which the API answered 401 to.
    pub async fn replace_rejected(&self, rejected_token_id: &str) -> Result<Arc<Token>, RefreshOutcome> {
        if let Some(token) = self.current().filter(|t| t.token_id != rejected_token_id) {
            return Ok(token);
        }
        self.request(Need::Replaces(rejected_token_id.to_owned())).await
    }

    async fn request(&self, need: Need) -> Result<Arc<Token>, RefreshOutcome> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Refresh { need, reply })
            .await
            .map_err(|_| RefreshOutcome::Stopped)?;
        answer.await.unwrap_or(Err(RefreshOutcome::Stopped))
    }

    /// Offers a new API key. It is tried against the token endpoint first;
    /// only on success does it replace the current key (and the token).
    /// `Ok(false)`: the key is the one already in use.
    pub async fn replace_key(&self, key: ApiKey) -> Result<bool, OAuthError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || OAuthError::Transport("token source stopped".into());
        self.commands
            .send(Command::ReplaceKey { key, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// Starts the TokenSource task. The task ends when every handle is dropped.
pub fn spawn<E: TokenEndpoint>(
    config: TokenSourceConfig,
    endpoint: E,
    key: ApiKey,
    metrics: Arc<Metrics>,
) -> (TokenSourceHandle, JoinHandle<()>) {
    let (state_tx, state_rx) = watch::channel(Snapshot::default());
    let (commands_tx, commands_rx) = mpsc::channel(1024);
    let stats = Arc::new(SourceStats::default());
    let task = Task {
        config,
        endpoint,
        key,
        refresh_token: None,
        token: None,
        failures: 0,
        last_error: None,
        next_attempt: Instant::now(),
        last_early: None,
        waiters: Vec::new(),
        state: state_tx,
        commands: commands_rx,
        stats: stats.clone(),
        metrics,
    };
    let environment = task.config.environment;
    let join = tokio::spawn(task.run());
    (
        TokenSourceHandle {
            environment,
            state: state_rx,
            commands: commands_tx,
            stats,
        },
        join,
    )
}

struct Waiter {
    need: Need,
    reply: Reply,
}

struct Task<E> {
    config: TokenSourceConfig,
    endpoint: E,
    key: ApiKey,
    refresh_token: Option<SecretString>,
    token: Option<Arc<Token>>,
    failures: u32,
    last_error: Option<Arc<RefreshFailure>>,
    /// The scheduled refresh or retry.
    next_attempt: Instant,
    last_early: Option<Instant>,
    waiters: Vec<Waiter>,
    state: watch::Sender<Snapshot>,
    commands: mpsc::Receiver<Command>,
    stats: Arc<SourceStats>,
    metrics: Arc<Metrics>,
}

impl<E: TokenEndpoint> Task<E> {
    async fn run(mut self) {
        self.attempt().await;
        loop {
            self.expire_if_stale(Instant::now());
            self.waiters.retain(|w| !w.reply.is_closed());
            let wake = self.next_wake(Instant::now());
            tokio::select! {
                // Queued requests first: everything that arrived together is
                // answered by the same attempt.
                biased;
                command = self.commands.recv() => match command {
                    Some(Command::Refresh { need, reply }) => self.on_refresh_request(need, reply),
                    Some(Command::ReplaceKey { key, reply }) => {
                        let result = self.try_new_key(key).await;
                        let _ = reply.send(result);
                    }
                    None => return,
                },
                _ = sleep_until(wake) => {
                    let now = Instant::now();
                    if now >= self.next_attempt {
                        self.attempt().await;
                    } else if !self.waiters.is_empty() && now >= self.earliest_early_attempt(now) {
                        self.last_early = Some(now);
                        self.stats.early_refreshes.fetch_add(1, Ordering::Relaxed);
                        self.attempt().await;
                    }
                }
            }
        }
    }

    /// The next instant something is due: a refresh, an early refresh for
    /// waiting callers, or the current token leaving its serve window.
    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = self.next_attempt;
        if !self.waiters.is_empty() {
            wake = wake.min(self.earliest_early_attempt(now));
        }
        if let Some(token) = self.published_token() {
            wake = wake.min(token.serve_until);
        }
        wake
    }

    /// When waiting callers may next trigger a refresh: `now`, or later if
    /// the last early refresh was less than the rate-limit interval ago.
    fn earliest_early_attempt(&self, now: Instant) -> Instant {
        match self.last_early {
            Some(last) => now.max(last + self.config.policy.early_refresh_interval),
            None => now,
        }
    }

    fn published_token(&self) -> Option<Arc<Token>> {
        self.state.borrow().token.clone()
    }

    fn on_refresh_request(&mut self, need: Need, reply: Reply) {
        let now = Instant::now();
        if let Some(token) = self.token.as_ref().filter(|t| need.met_by(t, now)) {
            let _ = reply.send(Ok(token.clone()));
            return;
        }
        if let Err(outcome) = self.attainable(&need) {
            let _ = reply.send(Err(outcome));
            return;
        }
        if self.failures > 0 {
            // The endpoint is failing: callers do not get to bypass the backoff.
            let _ = reply.send(Err(self.unavailable()));
            return;
        }
        self.waiters.push(Waiter { need, reply });
    }

    /// Whether a fresh token could meet `need` at all.
    fn attainable(&self, need: &Need) -> Result<(), RefreshOutcome> {
        match (need, &self.token) {
            (Need::Remaining(requested), Some(token)) => {
                let usable = token
                    .lifetime
                    .saturating_sub(self.config.policy.serve_margin_for(token.lifetime));
                if *requested > usable {
                    return Err(RefreshOutcome::OutOfRange {
                        requested: *requested,
                        lifetime: token.lifetime,
                    });
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn unavailable(&self) -> RefreshOutcome {
        let reason = match &self.last_error {
            Some(e) => e.message.clone(),
            None => "no token has been issued yet".to_owned(),
        };
        RefreshOutcome::Unavailable {
            reason,
            next_attempt: Some(self.next_attempt),
        }
    }

    /// One refresh: the refresh grant when we hold a refresh token (falling
    /// back to client credentials at once if it is rejected), else client
    /// credentials. Updates state, publishes, answers every waiter.
    async fn attempt(&mut self) {
        let grant = match (&self.refresh_token, self.config.use_refresh_token) {
            (Some(refresh), true) => Grant::RefreshToken(refresh.clone()),
            _ => Grant::ClientCredentials,
        };
        let mut result = self.call(&self.key, &grant).await;
        if let (Grant::RefreshToken(_), Err(e)) = (&grant, &result)
            && e.class() == ErrorClass::InvalidGrant
        {
            warn!(environment = %self.config.environment, "refresh token rejected (invalid_grant); falling back to client credentials");
            self.refresh_token = None;
            result = self.call(&self.key, &Grant::ClientCredentials).await;
        }
        match result {
            Ok((response, issued_at, issued_wall)) => self.install(response, issued_at, issued_wall),
            Err(error) => self.record_failure(&error),
        }
        self.publish();
        self.answer_waiters();
    }

    /// One token-endpoint call, timed and counted.
    async fn call(&self, key: &ApiKey, grant: &Grant) -> Result<(TokenResponse, Instant, SystemTime), OAuthError> {
        let (sent, sent_wall) = (Instant::now(), SystemTime::now());
        self.stats.endpoint_calls.fetch_add(1, Ordering::Relaxed);
        let result = self.endpoint.request_token(key, grant).await;
        let took = sent.elapsed();
        let env = self.config.environment;
        match &result {
            Ok(response) => {
                self.metrics.record_refresh(env.as_str(), grant.name(), "ok", took);
                info!(environment = %env, grant = grant.name(), outcome = "ok", duration_ms = took.as_millis() as u64,
                      token_id = %super::token_id(response.access_token.expose_secret()), expires_in = response.lifetime.as_secs(), "token request");
            }
            Err(e) => {
                self.metrics.record_refresh(env.as_str(), grant.name(), e.label(), took);
                let class = e.class();
                if class == ErrorClass::Permanent {
                    error!(environment = %env, grant = grant.name(), outcome = e.label(), duration_ms = took.as_millis() as u64, error = %e, "token request failed");
                } else {
                    warn!(environment = %env, grant = grant.name(), outcome = e.label(), duration_ms = took.as_millis() as u64, error = %e, "token request failed");
                }
            }
        }
        result.map(|response| (response, sent, sent_wall))
    }

    fn install(&mut self, response: TokenResponse, issued_at: Instant, issued_wall: SystemTime) {
        let policy = &self.config.policy;
        let serve_margin = policy.serve_margin_for(response.lifetime);
        let same_token = self
            .token
            .as_ref()
            .is_some_and(|t| t.access_token() == response.access_token.expose_secret());
        let token = match (&self.token, same_token) {
            (Some(current), true) => current.extended(issued_at, issued_wall, response.lifetime, serve_margin),
            _ => Token::new(
                response.access_token,
                response.token_type,
                self.config.environment,
                issued_at,
                issued_wall,
                response.lifetime,
                serve_margin,
            ),
        };
        if let Some(refresh) = response.refresh_token {
            self.refresh_token = Some(refresh);
        }
        if !token.is_servable(Instant::now()) {
            self.record_failure(&OAuthError::Malformed {
                status: 200,
                reason: format!(
                    "issued token (lifetime {:?}) expired before it could be used",
                    token.lifetime
                ),
            });
            return;
        }
        self.stats.refreshes_ok.fetch_add(1, Ordering::Relaxed);
        if !same_token {
            self.stats.rotations.fetch_add(1, Ordering::Relaxed);
        }
        self.next_attempt = issued_at + policy.refresh_after(token.lifetime, self.config.jitter.sample());
        self.failures = 0;
        self.last_error = None;
        self.token = Some(Arc::new(token));
    }

    fn record_failure(&mut self, error: &OAuthError) {
        self.stats.refreshes_failed.fetch_add(1, Ordering::Relaxed);
        self.failures += 1;
        let class = match error.class() {
            // invalid_grant on client credentials has no fallback left.
            ErrorClass::InvalidGrant => ErrorClass::Permanent,
            c => c,
        };
        let delay = self.config.policy.retry_after_failure(
            class,
            self.failures,
            self.config.jitter.sample(),
            error.retry_after(),
        );
        self.next_attempt = Instant::now() + delay;
        self.last_error = Some(Arc::new(RefreshFailure {
            message: error.to_string(),
            class,
            at: SystemTime::now(),
            consecutive: self.failures,
        }));
    }

    /// Withdraws the published token once it leaves its serve window.
    fn expire_if_stale(&mut self, now: Instant) {
        if self.published_token().is_some_and(|t| !t.is_servable(now)) {
            warn!(environment = %self.config.environment, "token expired before a refresh succeeded; no token is served");
            if self.last_error.is_none() {
                self.last_error = Some(Arc::new(RefreshFailure {
                    message: "token expired before a refresh succeeded".into(),
                    class: ErrorClass::Transient,
                    at: SystemTime::now(),
                    consecutive: self.failures,
                }));
            }
            self.publish();
        }
    }

    fn publish(&self) {
        let now = Instant::now();
        let token = self.token.clone().filter(|t| t.is_servable(now));
        let labels = EnvLabels {
            environment: self.config.environment.as_str(),
        };
        self.metrics
            .token_valid
            .get_or_create(&labels)
            .set(token.is_some() as i64);
        self.metrics
            .consecutive_failures
            .get_or_create(&labels)
            .set(self.failures as i64);
        self.state.send_replace(Snapshot {
            token,
            last_error: self.last_error.clone(),
            next_attempt: Some(self.next_attempt),
        });
    }

    fn answer_waiters(&mut self) {
        let now = Instant::now();
        for waiter in std::mem::take(&mut self.waiters) {
            let answer = match (&self.token, self.failures) {
                (Some(token), 0) if token.is_servable(now) => match self.attainable(&waiter.need) {
                    Ok(()) => Ok(token.clone()),
                    Err(outcome) => Err(outcome),
                },
                _ => Err(self.unavailable()),
            };
            let _ = waiter.reply.send(answer);
        }
    }

    /// Tries `key` with a client-credentials request; adopts it (and the
    /// token it produced) only if that succeeds.
    async fn try_new_key(&mut self, key: ApiKey) -> Result<bool, OAuthError> {
        if key.digest() == self.key.digest() {
            return Ok(false);
        }
        match self.call(&key, &Grant::ClientCredentials).await {
            Ok((response, issued_at, issued_wall)) => {
                info!(environment = %self.config.environment, client_id = key.client_id(), "new API key accepted by the token endpoint; now in use");
                self.key = key;
                self.refresh_token = None;
                self.install(response, issued_at, issued_wall);
                self.publish();
                self.answer_waiters();
                Ok(true)
            }
            Err(error) => {
                error!(environment = %self.config.environment, client_id = key.client_id(), error = %error, "new API key failed verification; keeping the current key");
                Err(error)
            }
        }
    }
}
