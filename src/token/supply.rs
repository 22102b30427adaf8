//! The seam between the TokenSource engine and where its tokens come
//! from. The engine asks for a [`Call`]; a [`Supply`] starts it and says
//! what its result means (a [`Landed`]); a supply may also push updates on
//! its own (a [`Pushed`]), and may verify API keys (a [`KeyVerifier`]).
//! [`Failure`] and [`Need`] are the vocabulary both sides share.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::Token;
use crate::credentials::ApiKey;
use crate::oauth::{ErrorClass, OAuthError};

/// Why a call produced no usable token. Secret-free by construction: the
/// message comes from the error's Display, which never shows a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub message: String,
    pub class: ErrorClass,
    /// How long the other side asked us to wait (`Retry-After`, RetryInfo).
    pub retry_after: Option<Duration>,
}

impl Failure {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            class,
            retry_after: None,
        }
    }

    /// A token-endpoint error. invalid_grant here is final: the refresh
    /// grant's fallback has been tried by then.
    pub fn from_oauth(error: &OAuthError) -> Self {
        let class = match error.class() {
            ErrorClass::InvalidGrant => ErrorClass::Permanent,
            class => class,
        };
        Self {
            message: error.to_string(),
            class,
            retry_after: error.retry_after(),
        }
    }

    /// The answer came, but the token's window was over before it could be
    /// handed out.
    pub(super) fn expired_on_arrival(lifetime: Duration) -> Self {
        Self::new(
            ErrorClass::Transient,
            format!("the issued token (lifetime {lifetime:?}) expired before it could be used"),
        )
    }
}

/// What an early refresh must achieve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// A token with at least this much left before expiry.
    Remaining(Duration),
    /// A token other than this one (the API rejected it).
    Replaces(String),
}

impl Need {
    pub fn met_by(&self, token: &Token, now: Instant) -> bool {
        match self {
            Need::Remaining(d) => token.is_servable(now) && token.remaining(now) >= *d,
            Need::Replaces(id) => token.is_servable(now) && token.token_id != *id,
        }
    }
}

/// A call the engine asks its supply to make.
#[derive(Clone, Debug)]
pub enum Call {
    /// The scheduled refresh or a retry (for a follower: opening the
    /// upstream stream).
    Refresh,
    /// Waiting callers need what the current token does not give: the
    /// strongest of their needs.
    Early(Need),
}

/// What a call in flight is for: a token, or trying a new API key (only a
/// supply with a [`KeyVerifier`] is ever asked).
#[derive(Clone, Debug)]
pub enum Attempt {
    Call(Call),
    VerifyKey(ApiKey),
}

/// When a call was sent, on both clocks.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub at: Instant,
    pub wall: SystemTime,
}

/// What a finished call means.
pub enum Landed {
    /// A token to install.
    Issued(Token),
    /// No token; the engine retries after its backoff.
    Failed(Failure),
    /// No token, and the supply itself delivers the recovery (an upstream's
    /// outage reported on an open stream): no retry is scheduled.
    Awaiting(Failure),
    /// A forwarded call was refused, but the source's token and stream
    /// stand: the waiting callers get the reason, the state is unchanged.
    Refused(Failure),
    /// Make this call at once (the refresh grant was rejected).
    Again(Call),
}

/// What an update the supply sent on its own means.
pub enum Pushed {
    /// A token to install.
    Issued(Token),
    /// The stream that pushes was lost: retry after the backoff.
    Failed(Failure),
    /// The upstream reported an outage: it pushes the recovery.
    Awaiting(Failure),
    /// Nothing the callers can see changed (a connection renewal that
    /// failed while the current stream goes on).
    Unchanged,
}

/// A call in progress, as the supply started it.
pub type Pending<D> = Pin<Box<dyn Future<Output = D> + Send>>;

/// Where a TokenSource's tokens come from: the token endpoint
/// ([`super::endpoint::EndpointSupply`]) or an upstream broker
/// ([`super::follow::FollowSupply`]). The engine (`source::Task`) owns
/// everything else: waiters, coalescing, the early refresh rate limit,
/// backoff, the serve window and publishing.
pub trait Supply: Send + 'static {
    /// What a call resolves to, interpreted by [`Supply::land`].
    type Done: Send + 'static;
    /// Whether the engine refreshes ahead of each token's expiry (the
    /// endpoint), rather than waiting for tokens to be pushed (a follower).
    const SCHEDULED: bool;
    /// Starts one call.
    fn start(&mut self, call: &Call) -> Pending<Self::Done>;
    /// Interprets a finished attempt: logs it and keeps what the supply
    /// needs (a refresh token, an adopted key, an open stream).
    fn land(&mut self, attempt: &Attempt, sent: Sent, done: Self::Done) -> Landed;
    /// The next update the supply pushes on its own; never, by default.
    fn pushed(&mut self) -> impl Future<Output = Pushed> + Send {
        std::future::pending()
    }
    /// Key verification, for a supply that calls with an API key; a source
    /// whose supply has none refuses every offered key.
    fn verifier(&mut self) -> Option<&mut dyn KeyVerifier<Self::Done>> {
        None
    }
}

/// The optional capability of a supply that holds an API key.
pub trait KeyVerifier<D> {
    /// Whether `key` is the key in use (so it is not verified again).
    fn holds(&self, key: &ApiKey) -> bool;
    /// Starts a call with `key`; [`Supply::land`] gets it as
    /// [`Attempt::VerifyKey`] and adopts the key if it worked.
    fn verify(&mut self, key: &ApiKey) -> Pending<D>;
}
