//! The seam between the TokenSource engine and where its tokens come
//! from. The engine asks for a [`Call`]; a [`Supply`] starts it and says
//! what its result means (a [`Landing`]); a supply may also push updates
//! on its own. [`Failure`] and [`Need`] are the vocabulary both sides share.

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
    /// Try this API key before adopting it.
    VerifyKey(ApiKey),
}

/// When a call was sent, on both clocks.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub at: Instant,
    pub wall: SystemTime,
}

/// What a finished call, or an update the supply pushed, means.
pub enum Landing {
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

/// A call in progress, as the supply started it.
pub type Pending<D> = Pin<Box<dyn Future<Output = D> + Send>>;

/// Where a TokenSource's tokens come from: the token endpoint
/// ([`super::endpoint::EndpointSupply`]) or an upstream broker ([`super::follow::FollowSupply`]). The
/// engine (`source::Task`) owns everything else: waiters, coalescing, the early
/// refresh rate limit, backoff, the serve window and publishing.
pub trait Supply: Send + 'static {
    /// What a call resolves to, interpreted by [`Supply::land`].
    type Done: Send + 'static;
    /// Whether the engine refreshes ahead of each token's expiry (the
    /// endpoint), rather than waiting for tokens to be pushed (a follower).
    const SCHEDULED: bool;
    /// Starts one call.
    fn start(&mut self, call: &Call) -> Pending<Self::Done>;
    /// Interprets a finished call: logs it and keeps what the supply needs
    /// (a refresh token, an adopted key, an open stream).
    fn land(&mut self, call: &Call, sent: Sent, done: Self::Done) -> Landing;
    /// The next update the supply pushes on its own; never, for the endpoint.
    fn pushed(&mut self) -> impl Future<Output = Landing> + Send;
    /// Whether `key` is the key in use (so it is not verified again).
    fn holds_key(&self, key: &ApiKey) -> bool;
}
