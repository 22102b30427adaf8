//! Internal failures of a call and the one place they become `tonic::Status`.
//! Every non-OK Status carries a `google.rpc.ErrorInfo` with a stable
//! [`reason`](BrokerError::reason) in the [`ERROR_DOMAIN`] domain (clients
//! branch on it, never on message text) and, when waiting helps, a
//! `google.rpc.RetryInfo` with the delay.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

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

    pub fn code(&self) -> Code {
        match self {
            BrokerError::UnspecifiedEnvironment | BrokerError::InvalidArgument { .. } => Code::InvalidArgument,
            BrokerError::EnvironmentNotEnabled(_) => Code::FailedPrecondition,
            BrokerError::NoValidToken { .. } | BrokerError::ShuttingDown => Code::Unavailable,
            BrokerError::OutOfRange { .. } => Code::OutOfRange,
            BrokerError::PermissionDenied(_) => Code::PermissionDenied,
            BrokerError::DeadlineExceeded(_) => Code::DeadlineExceeded,
        }
    }
}

/// The `domain` of every ErrorInfo the broker sends.
pub const ERROR_DOMAIN: &str = "tokenbroker.flute.com";

/// The stable `reason` of each error (documented in the proto).
pub mod reason {
    pub const ENVIRONMENT_UNSPECIFIED: &str = "ENVIRONMENT_UNSPECIFIED";
    pub const ENVIRONMENT_NOT_ENABLED: &str = "ENVIRONMENT_NOT_ENABLED";
    pub const CALLER_NOT_ALLOWED: &str = "CALLER_NOT_ALLOWED";
    pub const INVALID_FIELD: &str = "INVALID_FIELD";
    pub const NO_VALID_TOKEN: &str = "NO_VALID_TOKEN";
    pub const MIN_REMAINING_TOO_LONG: &str = "MIN_REMAINING_TOO_LONG";
    pub const TOKEN_WAIT_EXCEEDED: &str = "TOKEN_WAIT_EXCEEDED";
    pub const SHUTTING_DOWN: &str = "SHUTTING_DOWN";
}

impl BrokerError {
    /// The stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            BrokerError::UnspecifiedEnvironment => reason::ENVIRONMENT_UNSPECIFIED,
            BrokerError::EnvironmentNotEnabled(_) => reason::ENVIRONMENT_NOT_ENABLED,
            BrokerError::PermissionDenied(_) => reason::CALLER_NOT_ALLOWED,
            BrokerError::InvalidArgument { .. } => reason::INVALID_FIELD,
            BrokerError::NoValidToken { .. } => reason::NO_VALID_TOKEN,
            BrokerError::OutOfRange { .. } => reason::MIN_REMAINING_TOO_LONG,
            BrokerError::DeadlineExceeded(_) => reason::TOKEN_WAIT_EXCEEDED,
            BrokerError::ShuttingDown => reason::SHUTTING_DOWN,
        }
    }

    fn environment(&self) -> Option<Environment> {
        match self {
            BrokerError::EnvironmentNotEnabled(env)
            | BrokerError::PermissionDenied(env)
            | BrokerError::NoValidToken { environment: env, .. }
            | BrokerError::OutOfRange { environment: env, .. }
            | BrokerError::DeadlineExceeded(env) => Some(*env),
            _ => None,
        }
    }
}

impl From<BrokerError> for Status {
    fn from(error: BrokerError) -> Self {
        let mut metadata = std::collections::HashMap::new();
        if let Some(env) = error.environment() {
            metadata.insert("environment".to_owned(), env.as_str().to_owned());
        }
        let mut details = ErrorDetails::with_error_info(error.reason(), ERROR_DOMAIN, metadata);
        match &error {
            BrokerError::NoValidToken {
                next_attempt: Some(wait),
                ..
            } => {
                details.set_retry_info(Some(*wait));
            }
            BrokerError::InvalidArgument { field, message } => {
                details.add_bad_request_violation(*field, message.clone());
            }
            BrokerError::ShuttingDown => {
                details.set_retry_info(Some(std::time::Duration::ZERO));
            }
            _ => {}
        }
        Status::with_error_details(error.code(), error.to_string(), details)
    }
}

/// A stable name for a status code, for metric labels.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
