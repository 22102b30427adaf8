//! What a TokenSource shows its readers and callers: its settings, the
//! [`Snapshot`] it publishes (token, last failure, next attempt) and the
//! [`SourceState`] derived from it, its counters, and the errors a caller
//! of its request path can get.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::Token;
use super::policy::{Jitter, RefreshPolicy};
use crate::environment::Environment;
use crate::oauth::ErrorClass;

/// Settings of one TokenSource.
#[derive(Clone, Debug)]
pub struct TokenSourceConfig {
    pub environment: Environment,
    pub policy: RefreshPolicy,
    /// Use the refresh grant when the endpoint issued a refresh token.
    pub use_refresh_token: bool,
    pub jitter: Jitter,
    /// A token carried over from the previous process (systemd's file
    /// descriptor store): served at once, refreshed on its schedule.
    pub restored: Option<Arc<Token>>,
}

impl TokenSourceConfig {
    pub fn new(environment: Environment) -> Self {
        Self {
            environment,
            policy: RefreshPolicy::default(),
            use_refresh_token: true,
            jitter: Jitter::Random,
            restored: None,
        }
    }
}

/// Why the last token request failed. Secret-free by construction: built
/// from [`crate::oauth::OAuthError`]'s Display.
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

/// Why a caller that needs more than the current token did not get one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    /// No valid token: the endpoint is failing, or none was issued yet.
    #[error("no valid token: {reason}")]
    Unavailable {
        reason: String,
        next_attempt: Option<Instant>,
    },
    /// The forced refresh brought back the very token the API rejected.
    #[error("no valid token: the token endpoint issued the rejected token again")]
    RejectedTokenReissued { next_attempt: Option<Instant> },
    /// More remaining lifetime than the endpoint's tokens ever have.
    #[error("tokens from this endpoint live {lifetime:?}; {requested:?} of remaining lifetime cannot be provided")]
    OutOfRange { requested: Duration, lifetime: Duration },
    /// The TokenSource task has ended (shutdown).
    #[error("token source stopped")]
    Stopped,
}

/// What offering a new API key did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyChange {
    /// The endpoint accepted it; it and its token are now in use.
    Adopted,
    /// It is the key already in use.
    Unchanged,
}

/// Why an offered API key was not adopted.
#[derive(Clone, Debug, thiserror::Error)]
pub enum KeyError {
    /// The token endpoint refused it (the reason); the current key stays.
    #[error("{0}")]
    Rejected(String),
    /// The TokenSource task has ended (shutdown).
    #[error("token source stopped")]
    Stopped,
}
