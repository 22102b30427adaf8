//! What can go wrong in a call to the core, whichever face carried it:
//! [`BrokerError`], with the stable [`reason`] clients branch on (never on
//! message text). How a face sends one (a gRPC Status, an HTTP answer) is
//! [`crate::rpc_status`]'s.

use std::time::Duration;

use crate::environment::Environment;
use crate::token::RefreshError;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("environment must be ENVIRONMENT_SANDBOX or ENVIRONMENT_PRODUCTION")]
    UnspecifiedEnvironment,
    #[error("environment {0} is not enabled in this broker")]
    EnvironmentNotEnabled(Environment),
    #[error("this caller may not get {0} tokens")]
    PermissionDenied(Environment),
    /// This caller's limit (`access.refresh_per_minute`,
    /// `access.proxy_per_second`) is used up: retry after the delay.
    #[error("this caller has used its {what} in {environment}; retry in {}", crate::duration::format(*retry_after))]
    RateLimited {
        environment: Environment,
        what: &'static str,
        retry_after: Duration,
    },
    /// `audit.on_failure = "refuse"` and the audit trail cannot take
    /// records now: nothing is served unrecorded.
    #[error("the audit trail cannot be written; calls are refused until it can")]
    AuditUnavailable,
    /// A proxied request on a route no rule gives this caller.
    #[error("this caller may not call this route of the {0} API")]
    RouteNotAllowed(Environment),
    #[error("{field}: {message}")]
    InvalidArgument { field: &'static str, message: String },
    #[error("no valid {environment} token: {reason}{}", next_attempt.map(|d| format!("; next attempt in {}", crate::duration::format(Duration::from_secs(d.as_secs().max(1))))).unwrap_or_default())]
    NoValidToken {
        environment: Environment,
        reason: String,
        next_attempt: Option<Duration>,
    },
    #[error("{message}")]
    OutOfRange { environment: Environment, message: String },
    #[error("no {0} token within the call's deadline")]
    DeadlineExceeded(Environment),
    /// WatchToken streams end this way when the broker stops or restarts
    /// (unary calls are answered until the connection closes), and so does
    /// a call whose token source has stopped: reconnect at once.
    #[error("the broker is stopping or restarting; reconnect now")]
    ShuttingDown,
    /// HTTP only: a request the metadata-server safeguards refuse (no
    /// `Flute-Broker: true`, through a proxy, a CORS preflight).
    #[error("{0}")]
    RequestRefused(&'static str),
    /// HTTP only: no route for this path.
    #[error("no such route: {0}")]
    UnknownRoute(String),
    /// HTTP only: a route that exists, with another method.
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    /// A long poll or WatchToken stream that would make one more connection
    /// hold beyond the listener's share (`server.held_requests_percent`):
    /// retry after the delay, or on a connection that already holds one.
    #[error("this listener has its limit of {max} connections holding long polls or watch streams; retry shortly")]
    HeldLimit { max: usize },
}

impl From<crate::serve::guard::HeldLimitReached> for BrokerError {
    fn from(limit: crate::serve::guard::HeldLimitReached) -> Self {
        BrokerError::HeldLimit {
            max: limit.max_held_connections,
        }
    }
}

impl BrokerError {
    pub fn from_refresh(environment: Environment, error: RefreshError) -> Self {
        let wait =
            |at: Option<tokio::time::Instant>| at.map(|at| at.saturating_duration_since(tokio::time::Instant::now()));
        match error {
            RefreshError::Unavailable { reason, next_attempt } => BrokerError::NoValidToken {
                environment,
                reason,
                next_attempt: wait(next_attempt),
            },
            RefreshError::RejectedTokenReissued { next_attempt } => BrokerError::NoValidToken {
                environment,
                reason: "the token endpoint issued the rejected token again".into(),
                next_attempt: wait(next_attempt),
            },
            RefreshError::OutOfRange { .. } => BrokerError::OutOfRange {
                environment,
                message: format!("min_remaining: {error}"),
            },
            RefreshError::Stopped => BrokerError::ShuttingDown,
        }
    }
}

/// The stable `reason` of each error (documented in the proto).
pub mod reason {
    pub const ENVIRONMENT_UNSPECIFIED: &str = "ENVIRONMENT_UNSPECIFIED";
    pub const ENVIRONMENT_NOT_ENABLED: &str = "ENVIRONMENT_NOT_ENABLED";
    pub const CALLER_NOT_ALLOWED: &str = "CALLER_NOT_ALLOWED";
    pub const ROUTE_NOT_ALLOWED: &str = "ROUTE_NOT_ALLOWED";
    pub const RATE_LIMITED: &str = "RATE_LIMITED";
    pub const AUDIT_UNAVAILABLE: &str = "AUDIT_UNAVAILABLE";
    pub const INVALID_FIELD: &str = "INVALID_FIELD";
    pub const NO_VALID_TOKEN: &str = "NO_VALID_TOKEN";
    pub const MIN_REMAINING_TOO_LONG: &str = "MIN_REMAINING_TOO_LONG";
    pub const TOKEN_WAIT_EXCEEDED: &str = "TOKEN_WAIT_EXCEEDED";
    pub const SHUTTING_DOWN: &str = "SHUTTING_DOWN";
    pub const REQUEST_REFUSED: &str = "REQUEST_REFUSED";
    pub const UNKNOWN_ROUTE: &str = "UNKNOWN_ROUTE";
    pub const METHOD_NOT_ALLOWED: &str = "METHOD_NOT_ALLOWED";
    pub const HELD_REQUESTS_LIMIT: &str = "HELD_REQUESTS_LIMIT";
}

impl BrokerError {
    /// The stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            BrokerError::UnspecifiedEnvironment => reason::ENVIRONMENT_UNSPECIFIED,
            BrokerError::EnvironmentNotEnabled(_) => reason::ENVIRONMENT_NOT_ENABLED,
            BrokerError::PermissionDenied(_) => reason::CALLER_NOT_ALLOWED,
            BrokerError::RouteNotAllowed(_) => reason::ROUTE_NOT_ALLOWED,
            BrokerError::RateLimited { .. } => reason::RATE_LIMITED,
            BrokerError::AuditUnavailable => reason::AUDIT_UNAVAILABLE,
            BrokerError::InvalidArgument { .. } => reason::INVALID_FIELD,
            BrokerError::NoValidToken { .. } => reason::NO_VALID_TOKEN,
            BrokerError::OutOfRange { .. } => reason::MIN_REMAINING_TOO_LONG,
            BrokerError::DeadlineExceeded(_) => reason::TOKEN_WAIT_EXCEEDED,
            BrokerError::ShuttingDown => reason::SHUTTING_DOWN,
            BrokerError::RequestRefused(_) => reason::REQUEST_REFUSED,
            BrokerError::UnknownRoute(_) => reason::UNKNOWN_ROUTE,
            BrokerError::MethodNotAllowed(_) => reason::METHOD_NOT_ALLOWED,
            BrokerError::HeldLimit { .. } => reason::HELD_REQUESTS_LIMIT,
        }
    }

    /// The environment the error is about, if any.
    pub fn environment(&self) -> Option<Environment> {
        match self {
            BrokerError::EnvironmentNotEnabled(env)
            | BrokerError::PermissionDenied(env)
            | BrokerError::RouteNotAllowed(env)
            | BrokerError::RateLimited { environment: env, .. }
            | BrokerError::NoValidToken { environment: env, .. }
            | BrokerError::OutOfRange { environment: env, .. }
            | BrokerError::DeadlineExceeded(env) => Some(*env),
            _ => None,
        }
    }
}
