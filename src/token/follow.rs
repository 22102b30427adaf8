//! An upstream broker as a TokenSource's supply: the agent side of a hub
//! and its agents. The source follows the same environment on the upstream
//! over WatchToken and forwards what its own callers need that the current
//! token does not give (a replacement for a rejected token, more remaining
//! lifetime); it holds no API key and no refresh token.
//!
//! Serve window: a received token is served for the `serve_for` the
//! upstream measured when it built the message, counted from the agent's
//! own monotonic clock at the moment the request was sent (a unary answer)
//! or at receipt less the stream's observed round trip (a pushed update).
//! No wall clock is read, so neither clock skew nor transit time extends a
//! token's life here.

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use secrecy::SecretString;
use tokio::time::Instant;
use tracing::{info, warn};

use super::Token;
use super::policy::RefreshPolicy;
use super::state::TokenSourceConfig;
use super::supply::{Attempt, Call, Failure, Landed, Need, Pending, Pushed, Sent, Supply};
use crate::environment::Environment;
use crate::oauth::ErrorClass;

/// A token as an upstream broker sent it.
pub struct Received {
    pub access_token: SecretString,
    pub token_type: String,
    /// The token's whole lifetime (its expiry less its issue time, both on
    /// the upstream's clock, so skew cancels out).
    pub lifetime: Duration,
    /// How long the upstream would still hand it out when it built the message.
    pub serve_for: Duration,
}

/// One update of a followed environment.
pub enum Update {
    Token(Received),
    /// The upstream has no valid token either; the reason is its own.
    Outage {
        reason: String,
    },
}

/// An open follow stream.
pub struct Following {
    /// The update the stream opened with (the upstream's current state).
    pub first: Update,
    /// From sending the request to receiving `first`: an upper bound for
    /// the transit time of any later update on the same stream.
    pub round_trip: Duration,
    /// The later updates; an `Err` or the end means the stream is lost.
    pub updates: BoxStream<'static, Result<Update, Failure>>,
    /// Which upstream answered (for logs).
    pub upstream: String,
    /// When to replace this stream by a new connection, opened before the
    /// old one is let go (its client certificate is about to expire).
    pub renew_at: Option<Instant>,
}

/// What a follower needs from an upstream broker: the gRPC client
/// ([`crate::upstream::GrpcUpstream`]), or a broker in the same process in
/// tests that run under paused time.
pub trait Upstream: Send + Sync + 'static {
    /// Opens WatchToken for `environment` (failing over between replicas).
    fn follow(&self, environment: Environment) -> impl Future<Output = Result<Following, Failure>> + Send;
    /// GetToken with `min_remaining`.
    fn get(
        &self,
        environment: Environment,
        min_remaining: Duration,
    ) -> impl Future<Output = Result<Received, Failure>> + Send;
    /// RefreshToken for a token the API rejected.
    fn replace(
        &self,
        environment: Environment,
        rejected_token_id: String,
    ) -> impl Future<Output = Result<Received, Failure>> + Send;
}

/// What a follower's call brought back.
pub enum FollowDone {
    Opened(Result<Following, Failure>),
    Answered(Result<Received, Failure>),
}

/// Follows one environment on an upstream broker.
pub struct FollowSupply<U> {
    upstream: std::sync::Arc<U>,
    environment: Environment,
    policy: RefreshPolicy,
    /// The open stream and its round trip; `None` until opened or once lost.
    stream: Option<(BoxStream<'static, Result<Update, Failure>>, Duration)>,
    /// When the open stream is to be replaced by a new connection.
    renew_at: Option<Instant>,
    /// The replacement being opened (kept across a cancelled `pushed`).
    renewal: Option<Pending<Result<Following, Failure>>>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// The lifetime of the tokens received so far, to keep a forwarded
    /// `min_remaining` within what the upstream can provide.
    lifetime: Option<Duration>,
}

/// Slack added to a forwarded `min_remaining`, for the transit back and
/// the serve margin the agent keeps: the answer must still meet the
/// caller's need when it arrives here.
const FORWARD_SLACK: Duration = Duration::from_secs(1);

impl<U: Upstream> FollowSupply<U> {
    pub fn new(upstream: U, config: &TokenSourceConfig, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        Self {
            upstream: std::sync::Arc::new(upstream),
            environment: config.environment,
            policy: config.policy.clone(),
            stream: None,
            renew_at: None,
            renewal: None,
            metrics,
            lifetime: None,
        }
    }

    /// The token for `received`, served until `anchor + serve_for`.
    fn token(&mut self, received: Received, anchor: Instant) -> Token {
        self.lifetime = Some(received.lifetime);
        Token::received(
            received.access_token,
            received.token_type,
            self.environment,
            anchor,
            received.serve_for,
            received.lifetime,
            self.policy.serve_margin_for(received.lifetime),
        )
    }

    fn landing(&mut self, update: Update, anchor: Instant) -> Arrived {
        match update {
            Update::Token(received) => Arrived::Token(self.token(received, anchor)),
            Update::Outage { reason } => Arrived::Outage(Failure::new(
                ErrorClass::Transient,
                format!("the upstream broker has no valid token: {reason}"),
            )),
        }
    }
}

impl<U: Upstream> Supply for FollowSupply<U> {
    type Done = FollowDone;
    const SCHEDULED: bool = false;

    fn start(&mut self, call: &Call) -> Pending<Self::Done> {
        let upstream = self.upstream.clone();
        let env = self.environment;
        match call.clone() {
            Call::Refresh => {
                // (Re)opening replaces whatever stream there was.
                self.stream = None;
                Box::pin(async move { FollowDone::Opened(upstream.follow(env).await) })
            }
            Call::Early(Need::Replaces(id)) => {
                Box::pin(async move { FollowDone::Answered(upstream.replace(env, id).await) })
            }
            Call::Early(Need::Remaining(d)) => {
                let most = self
                    .lifetime
                    .map(|l| l.saturating_sub(self.policy.serve_margin_for(l)))
                    .unwrap_or(Duration::MAX);
                let ask = (d + FORWARD_SLACK).min(most).max(d);
                Box::pin(async move { FollowDone::Answered(upstream.get(env, ask).await) })
            }
        }
    }

    fn land(&mut self, _attempt: &Attempt, sent: Sent, done: Self::Done) -> Landed {
        match done {
            FollowDone::Opened(Ok(following)) => {
                info!(upstream = %following.upstream, round_trip_ms = following.round_trip.as_millis() as u64, "following the upstream broker");
                let anchor = before(following.round_trip);
                self.stream = Some((following.updates, following.round_trip));
                self.renew_at = following.renew_at;
                self.renewal = None;
                match self.landing(following.first, anchor) {
                    Arrived::Token(token) => Landed::Issued(token),
                    Arrived::Outage(failure) => Landed::Awaiting(failure),
                }
            }
            FollowDone::Opened(Err(failure)) => {
                warn!(error = %failure.message, "cannot follow the upstream broker");
                Landed::Failed(failure)
            }
            // The answer is anchored where the request left: whatever the
            // transit took is already off the token's window.
            FollowDone::Answered(Ok(received)) => Landed::Issued(self.token(received, sent.at)),
            FollowDone::Answered(Err(failure)) => {
                warn!(error = %failure.message, "upstream broker call failed");
                match self.stream {
                    // The stream stands: the token it delivered is still
                    // good for everyone else, and it brings the next one.
                    Some(_) => Landed::Refused(failure),
                    None => Landed::Failed(failure),
                }
            }
        }
    }

    async fn pushed(&mut self) -> Pushed {
        let Some((stream, round_trip)) = self.stream.as_mut() else {
            return std::future::pending().await;
        };
        let round_trip = *round_trip;
        let next = tokio::select! {
            next = stream.next() => next,
            renewed = renewed(&mut self.renew_at, &mut self.renewal, &self.upstream, self.environment) => {
                return self.renewed(renewed);
            }
        };
        match next {
            Some(Ok(update)) => {
                let anchor = before(round_trip);
                self.landing(update, anchor).into()
            }
            Some(Err(failure)) => {
                self.stream = None;
                warn!(error = %failure.message, "lost the upstream broker; reconnecting");
                Pushed::Failed(failure)
            }
            None => {
                self.stream = None;
                warn!("the upstream broker ended the stream; reconnecting");
                Pushed::Failed(Failure::new(
                    ErrorClass::Transient,
                    "the upstream broker ended the stream",
                ))
            }
        }
    }
}

impl<U: Upstream> FollowSupply<U> {
    /// A replacement stream opened (make before break: the old one is
    /// dropped only now), or the failure to open one (the old stream goes
    /// on; another try in a second while its certificate lasts).
    fn renewed(&mut self, renewed: Result<Following, Failure>) -> Pushed {
        match renewed {
            Ok(following) => {
                info!(upstream = %following.upstream, "renewed the connection to the upstream broker before its client certificate expires");
                self.count_renewal("ok");
                let anchor = before(following.round_trip);
                self.stream = Some((following.updates, following.round_trip));
                self.renew_at = following.renew_at;
                self.landing(following.first, anchor).into()
            }
            Err(failure) => {
                warn!(error = %failure.message, "cannot renew the connection to the upstream broker; the current one goes on");
                self.count_renewal("failed");
                self.renew_at = Some(Instant::now() + RENEW_RETRY);
                // Nothing changed for the callers: the current token stands.
                Pushed::Unchanged
            }
        }
    }
}

impl<U> FollowSupply<U> {
    fn count_renewal(&self, result: &'static str) {
        let labels = crate::metrics::ResultEnvLabels {
            environment: self.environment.as_str(),
            result,
        };
        self.metrics.upstream_renewals.get_or_create(&labels).inc();
    }
}

/// What an update from the upstream brings.
enum Arrived {
    Token(Token),
    Outage(Failure),
}

impl From<Arrived> for Pushed {
    fn from(arrived: Arrived) -> Self {
        match arrived {
            Arrived::Token(token) => Pushed::Issued(token),
            Arrived::Outage(failure) => Pushed::Awaiting(failure),
        }
    }
}

/// How soon a failed renewal is tried again.
const RENEW_RETRY: Duration = Duration::from_secs(1);

/// Waits for `renew_at`, then opens a replacement stream; `renewal` keeps
/// the attempt when the caller's future is dropped midway.
async fn renewed<U: Upstream>(
    renew_at: &mut Option<Instant>,
    renewal: &mut Option<Pending<Result<Following, Failure>>>,
    upstream: &std::sync::Arc<U>,
    environment: Environment,
) -> Result<Following, Failure> {
    if renewal.is_none() {
        let Some(at) = *renew_at else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(at).await;
        let upstream = upstream.clone();
        *renewal = Some(Box::pin(async move { upstream.follow(environment).await }));
    }
    let result = renewal.as_mut().expect("set above").await;
    *renewal = None;
    *renew_at = None;
    result
}

/// `now − round_trip`: the latest instant an update received now can have
/// been built at.
fn before(round_trip: Duration) -> Instant {
    let now = Instant::now();
    now.checked_sub(round_trip).unwrap_or(now)
}
