//! The TokenSource engine: one task per environment that alone obtains its
//! tokens, from a [`Supply`]: the token endpoint (`endpoint::EndpointSupply`,
//! which owns the API key and the refresh token) or an upstream broker
//! (`follow::FollowSupply`). The engine owns the schedule, backoff, serve
//! window and waiters, and publishes a [`Snapshot`] on a watch channel that
//! every reader borrows. Readers that need more than the current token
//! (more remaining lifetime, or a replacement for a token the API rejected)
//! send a message; messages that arrive together are answered by one
//! call, so single-flight is a property of the structure rather than of a
//! lock.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tracing::{Instrument, error, info_span, warn};

use super::Token;
use super::handle::{Command, KeyReply, Reply, TokenSourceHandle};
pub use super::state::TokenSourceConfig;
use super::state::{KeyChange, KeyError, RefreshError, RefreshFailure, Snapshot, SourceStats};
use super::supply::{Attempt, Call, Failure, Landed, Need, Pending, Pushed, Sent, Supply};
use crate::credentials::ApiKey;
use crate::metrics::{EnvLabels, Metrics};
use crate::oauth::ErrorClass;

pub(super) fn start<S: Supply>(
    config: TokenSourceConfig,
    supply: S,
    metrics: Arc<Metrics>,
) -> (TokenSourceHandle, JoinHandle<()>) {
    let (state_tx, state_rx) = watch::channel(Snapshot::default());
    let (commands_tx, commands_rx) = mpsc::channel(1024);
    let stats = Arc::new(SourceStats::default());
    let mut config = config;
    let restored = config
        .restored
        .take()
        .filter(|t| t.environment == config.environment && t.is_servable(Instant::now()));
    let next_attempt = match &restored {
        Some(token) if S::SCHEDULED => {
            token.issued_at + config.policy.refresh_after(token.lifetime, config.jitter.sample())
        }
        _ => Instant::now(),
    };
    let task = Task {
        config,
        supply,
        token: restored,
        failures: 0,
        last_error: None,
        next_attempt: Some(next_attempt),
        last_early: None,
        waiters: Vec::new(),
        pending_keys: VecDeque::new(),
        state: state_tx,
        commands: commands_rx,
        stats: stats.clone(),
        metrics,
    };
    let environment = task.config.environment;
    let span = info_span!("token_source", environment = %environment);
    let supervisor_state = task.state.clone();
    let join = tokio::spawn(supervise(task.run(), supervisor_state).instrument(span));
    (TokenSourceHandle::new(environment, state_rx, commands_tx, stats), join)
}

/// Runs the task. It ends normally when every handle is dropped; if it
/// ends any other way (a panic: a bug), nothing refreshes this
/// environment's token any more, so the source says so where every reader
/// looks: an ERROR log, and a snapshot without a token and with the reason
/// (GetToken answers UNAVAILABLE, health NOT_SERVING, /readyz 503). The
/// handles then report it not running: /healthz fails and the systemd
/// watchdog stops, so the platform restarts the broker.
async fn supervise(run: impl Future<Output = ()>, state: watch::Sender<Snapshot>) {
    use futures_util::FutureExt;
    let Err(panic) = std::panic::AssertUnwindSafe(run).catch_unwind().await else {
        return;
    };
    let why = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into());
    error!(reason = %why, "token source task stopped: no token for this environment until the broker restarts");
    state.send_replace(Snapshot {
        token: None,
        last_error: Some(Arc::new(RefreshFailure {
            message: format!("token source stopped ({why}); the broker must be restarted"),
            class: ErrorClass::Permanent,
            at: SystemTime::now(),
            consecutive: 0,
        })),
        next_attempt: None,
    });
}

struct Waiter {
    need: Need,
    reply: Reply,
    /// The caller's span: the call made for it continues the caller's trace.
    span: tracing::Span,
}

/// One call in progress. The task polls it alongside its timers, commands
/// and pushed updates, so a slow call never holds back what readers see (a
/// token leaving its serve window is withdrawn on time) nor the queueing of
/// callers.
struct Flight<D> {
    attempt: Attempt,
    /// The caller offering the key, for `Attempt::VerifyKey`.
    key_reply: Option<KeyReply>,
    sent: Sent,
    done: Pending<D>,
}

/// The engine of one TokenSource.
struct Task<S> {
    config: TokenSourceConfig,
    supply: S,
    token: Option<Arc<Token>>,
    failures: u32,
    last_error: Option<Arc<RefreshFailure>>,
    /// The scheduled refresh or retry; `None` while a follower waits for
    /// its upstream to push.
    next_attempt: Option<Instant>,
    last_early: Option<Instant>,
    waiters: Vec<Waiter>,
    /// New keys offered while a call was in flight, tried in order after it.
    pending_keys: VecDeque<(ApiKey, KeyReply)>,
    state: watch::Sender<Snapshot>,
    commands: mpsc::Receiver<Command>,
    stats: Arc<SourceStats>,
    metrics: Arc<Metrics>,
}

impl<S: Supply> Task<S> {
    async fn run(mut self) {
        // A restored token is served at once (and refreshed on its
        // schedule); without one the first call starts now.
        let mut flight = if self.token.is_some() {
            self.publish();
            None
        } else {
            Some(self.start_call(Call::Refresh, None))
        };
        loop {
            let now = Instant::now();
            self.expire_if_stale(now);
            self.waiters.retain(|w| !w.reply.is_closed());
            if flight.is_none() {
                flight = self.next_flight(now);
            }
            let wake = self.next_wake(now, flight.is_some());
            tokio::select! {
                // Queued requests first: everything that arrived together is
                // answered by the same call.
                biased;
                command = self.commands.recv() => match command {
                    Some(Command::Refresh { need, reply, span }) => self.on_refresh_request(need, reply, span),
                    Some(Command::ReplaceKey { key, reply }) => self.pending_keys.push_back((key, reply)),
                    None => return,
                },
                done = poll_flight(&mut flight), if flight.is_some() => {
                    let landed = flight.take().expect("polled only while a call is in flight");
                    flight = self.finish(landed, done);
                }
                pushed = self.supply.pushed() => {
                    if self.apply(pushed) {
                        self.publish();
                        self.answer_waiters();
                    }
                }
                _ = sleep_until_some(wake) => {}
            }
        }
    }

    /// The call to start now that none is in flight, if any is due: a new
    /// key to verify, the scheduled refresh, or an early refresh for
    /// waiting callers (rate-limited).
    fn next_flight(&mut self, now: Instant) -> Option<Flight<S::Done>> {
        if let Some((key, reply)) = self.pending_keys.pop_front() {
            let done = match self.supply.verifier() {
                None => {
                    let _ = reply.send(Err(KeyError::Rejected(
                        "this environment takes its tokens from an upstream broker and uses no API key".into(),
                    )));
                    return None;
                }
                Some(verifier) if verifier.holds(&key) => {
                    let _ = reply.send(Ok(KeyChange::Unchanged));
                    return None;
                }
                Some(verifier) => verifier.verify(&key),
            };
            return Some(self.flight(Attempt::VerifyKey(key), done, Some(reply)));
        }
        if self.next_attempt.is_some_and(|at| now >= at) {
            let call = self.start_call(Call::Refresh, None);
            return Some(self.traced(call));
        }
        if !self.waiters.is_empty() && now >= self.earliest_early_attempt(now) {
            self.last_early = Some(now);
            self.stats.early_refreshes.fetch_add(1, Ordering::Relaxed);
            let call = self.start_call(Call::Early(self.strongest_need()), None);
            return Some(self.traced(call));
        }
        None
    }

    /// The one need that, met, meets every waiter's: a replacement when
    /// anyone reports a rejected token (a fresh token has the full
    /// lifetime), else the longest remaining lifetime asked for.
    fn strongest_need(&self) -> Need {
        let needs = self.waiters.iter().map(|w| &w.need);
        if let Some(replaces) = needs.clone().find(|n| matches!(n, Need::Replaces(_))) {
            return replaces.clone();
        }
        Need::Remaining(
            needs
                .filter_map(|n| match n {
                    Need::Remaining(d) => Some(*d),
                    Need::Replaces(_) => None,
                })
                .max()
                .unwrap_or_default(),
        )
    }

    /// With traces on, the call made for waiting callers runs in a span of
    /// the first caller's trace (it answers them all).
    /// A scheduled one is a trace of its own. `attempt`: 1, or one more
    /// than the failures in a row before it.
    fn traced(&self, mut flight: Flight<S::Done>) -> Flight<S::Done> {
        if !crate::telemetry::enabled() {
            return flight;
        }
        use tracing::Instrument;
        let environment = self.config.environment.as_str();
        let (callers, attempt) = (self.waiters.len(), self.failures + 1);
        let span = match self.waiters.first() {
            Some(first) => tracing::info_span!(parent: &first.span, "token refresh", environment, callers, attempt),
            None => tracing::info_span!(parent: None, "token refresh", environment, callers, attempt),
        };
        flight.done = Box::pin(flight.done.instrument(span));
        flight
    }

    fn start_call(&mut self, call: Call, key_reply: Option<KeyReply>) -> Flight<S::Done> {
        let done = self.supply.start(&call);
        self.flight(Attempt::Call(call), done, key_reply)
    }

    /// An attempt just started, counted.
    fn flight(&mut self, attempt: Attempt, done: Pending<S::Done>, key_reply: Option<KeyReply>) -> Flight<S::Done> {
        self.stats.endpoint_calls.fetch_add(1, Ordering::Relaxed);
        Flight {
            attempt,
            key_reply,
            sent: Sent {
                at: Instant::now(),
                wall: SystemTime::now(),
            },
            done,
        }
    }

    /// Applies a finished call; returns the call to make at once, if any
    /// (client credentials after a rejected refresh token).
    fn finish(&mut self, flight: Flight<S::Done>, done: S::Done) -> Option<Flight<S::Done>> {
        let landed = self.supply.land(&flight.attempt, flight.sent, done);
        match (flight.key_reply, landed) {
            (key_reply, Landed::Again(call)) => return Some(self.start_call(call, key_reply)),
            (Some(reply), Landed::Issued(token)) => {
                self.install(token);
                let _ = reply.send(Ok(KeyChange::Adopted));
            }
            (Some(reply), Landed::Failed(failure) | Landed::Awaiting(failure) | Landed::Refused(failure)) => {
                // The offered key was refused: the current key and token stay.
                let _ = reply.send(Err(KeyError::Rejected(failure.message)));
                return None;
            }
            (None, Landed::Refused(failure)) => {
                self.answer_waiters_refused(&failure);
                return None;
            }
            (None, Landed::Issued(token)) => self.install(token),
            (None, Landed::Failed(failure)) => self.record_failure(failure, true),
            (None, Landed::Awaiting(failure)) => self.record_failure(failure, false),
        }
        self.publish();
        self.answer_waiters();
        None
    }

    /// Applies what the supply pushed; whether anything changed.
    fn apply(&mut self, pushed: Pushed) -> bool {
        match pushed {
            Pushed::Issued(token) => self.install(token),
            Pushed::Failed(failure) => self.record_failure(failure, true),
            Pushed::Awaiting(failure) => self.record_failure(failure, false),
            Pushed::Unchanged => return false,
        }
        true
    }

    /// Answers every waiter with the reason a forwarded call was refused.
    /// None of them can be met by the current token: a need the token
    /// meets is answered on arrival, and every change of the token answers
    /// all waiters (`answer_waiters`).
    fn answer_waiters_refused(&mut self, failure: &Failure) {
        for waiter in std::mem::take(&mut self.waiters) {
            let _ = waiter.reply.send(Err(RefreshError::Unavailable {
                reason: failure.message.clone(),
                next_attempt: self.next_attempt,
            }));
        }
    }

    /// The next instant something is due: a refresh, an early refresh for
    /// waiting callers, or the current token leaving its serve window.
    /// While a call is in flight only the serve window matters.
    fn next_wake(&self, now: Instant, in_flight: bool) -> Option<Instant> {
        let mut due = Vec::with_capacity(3);
        if !in_flight {
            due.extend(self.next_attempt);
            if !self.waiters.is_empty() {
                due.push(self.earliest_early_attempt(now));
            }
        }
        due.extend(self.published_token().map(|t| t.serve_until));
        due.into_iter().min()
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

    fn on_refresh_request(&mut self, need: Need, reply: Reply, span: tracing::Span) {
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
            // The supply is failing: callers do not get to bypass the backoff.
            let _ = reply.send(Err(self.unavailable()));
            return;
        }
        self.waiters.push(Waiter { need, reply, span });
    }

    /// Whether a fresh token could meet `need` at all.
    fn attainable(&self, need: &Need) -> Result<(), RefreshError> {
        match (need, &self.token) {
            (Need::Remaining(requested), Some(token)) => {
                let usable = token
                    .lifetime
                    .saturating_sub(self.config.policy.serve_margin_for(token.lifetime));
                if *requested > usable {
                    return Err(RefreshError::OutOfRange {
                        requested: *requested,
                        lifetime: token.lifetime,
                    });
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn unavailable(&self) -> RefreshError {
        let reason = match &self.last_error {
            Some(e) => e.message.clone(),
            None => "no token has been issued yet".to_owned(),
        };
        RefreshError::Unavailable {
            reason,
            next_attempt: self.next_attempt,
        }
    }

    fn install(&mut self, token: Token) {
        if !token.is_servable(Instant::now()) {
            self.record_failure(Failure::expired_on_arrival(token.lifetime), true);
            return;
        }
        let same_token = self
            .token
            .as_ref()
            .is_some_and(|t| t.access_token() == token.access_token());
        self.stats.refreshes_ok.fetch_add(1, Ordering::Relaxed);
        if !same_token {
            self.stats.rotations.fetch_add(1, Ordering::Relaxed);
        }
        let policy = &self.config.policy;
        self.next_attempt =
            S::SCHEDULED.then(|| token.issued_at + policy.refresh_after(token.lifetime, self.config.jitter.sample()));
        self.failures = 0;
        self.last_error = None;
        self.token = Some(Arc::new(token));
    }

    /// Counts a failure; with `retry`, schedules the next call after the
    /// backoff (else the supply pushes the recovery itself).
    fn record_failure(&mut self, failure: Failure, retry: bool) {
        self.stats.refreshes_failed.fetch_add(1, Ordering::Relaxed);
        self.failures += 1;
        let delay = self.config.policy.retry_after_failure(
            failure.class,
            self.failures,
            self.config.jitter.sample(),
            failure.retry_after,
        );
        self.next_attempt = retry.then(|| Instant::now() + delay);
        self.last_error = Some(Arc::new(RefreshFailure {
            message: failure.message,
            class: failure.class,
            at: SystemTime::now(),
            consecutive: self.failures,
        }));
    }

    /// Withdraws the published token once it leaves its serve window.
    fn expire_if_stale(&mut self, now: Instant) {
        if self.published_token().is_some_and(|t| !t.is_servable(now)) {
            warn!("token expired before a refresh succeeded; no token is served");
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
            next_attempt: self.next_attempt,
        });
    }

    fn answer_waiters(&mut self) {
        let now = Instant::now();
        for waiter in std::mem::take(&mut self.waiters) {
            let answer = match (&self.token, self.failures) {
                (Some(token), 0) if waiter.need.met_by(token, now) => Ok(token.clone()),
                (Some(token), 0) if token.is_servable(now) => match self.attainable(&waiter.need) {
                    // The call succeeded, but with a token that does not
                    // do: the rejected one again.
                    Ok(()) => Err(RefreshError::RejectedTokenReissued {
                        next_attempt: self.next_attempt,
                    }),
                    Err(outcome) => Err(outcome),
                },
                _ => Err(self.unavailable()),
            };
            let _ = waiter.reply.send(answer);
        }
    }
}

/// Waits for the call in flight (the select guard ensures there is one).
async fn poll_flight<D>(flight: &mut Option<Flight<D>>) -> D {
    match flight {
        Some(flight) => flight.done.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}
