//! Internal failures of a call and the one place they become `tonic::Status`.

use std::time::Duration;

use tonic::{Code, Status};

use crate::environment::Environment;
use crate::token::RefreshOutcome;

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
    #[error("{0}")]
    OutOfRange(String),
    #[error("no {0} token within the call's deadline")]
    DeadlineExceeded(Environment),
    #[error("the broker is shutting down")]
    ShuttingDown,
}

impl BrokerError {
    pub fn from_outcome(environment: Environment, outcome: RefreshOutcome) -> Self {
        match outcome {
            RefreshOutcome::Unavailable { reason, next_attempt } => BrokerError::NoValidToken {
                environment,
                reason,
                next_attempt: next_attempt.map(|at| at.saturating_duration_since(tokio::time::Instant::now())),
            },
            RefreshOutcome::OutOfRange { .. } => BrokerError::OutOfRange(format!("min_remaining: {outcome}")),
            RefreshOutcome::Stopped => BrokerError::ShuttingDown,
        }
    }

    pub fn code(&self) -> Code {
        match self {
            BrokerError::UnspecifiedEnvironment | BrokerError::InvalidArgument { .. } => Code::InvalidArgument,
            BrokerError::EnvironmentNotEnabled(_) => Code::FailedPrecondition,
            BrokerError::NoValidToken { .. } | BrokerError::ShuttingDown => Code::Unavailable,
            BrokerError::OutOfRange(_) => Code::OutOfRange,
            BrokerError::PermissionDenied(_) => Code::PermissionDenied,
            BrokerError::DeadlineExceeded(_) => Code::DeadlineExceeded,
        }
    }
}

impl From<BrokerError> for Status {
    fn from(error: BrokerError) -> Self {
        Status::new(error.code(), error.to_string())
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
