//! Internal failures of a call and the one place they become `tonic::Status`
//! (gRPC) or an HTTP answer (the HTTP/JSON face: the same Status, as a
//! `google.rpc.Status` JSON body with the HTTP status of its code).
//! Every non-OK Status carries a `google.rpc.ErrorInfo` with a stable
//! [`reason`](BrokerError::reason) in the [`ERROR_DOMAIN`] domain (clients
//! branch on it, never on message text) and, when waiting helps, a
//! `google.rpc.RetryInfo` with the delay.

use std::time::Duration;

use axum::response::IntoResponse;
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

    pub fn code(&self) -> Code {
        match self {
            BrokerError::UnspecifiedEnvironment | BrokerError::InvalidArgument { .. } => Code::InvalidArgument,
            BrokerError::EnvironmentNotEnabled(_) => Code::FailedPrecondition,
            BrokerError::NoValidToken { .. } | BrokerError::ShuttingDown => Code::Unavailable,
            BrokerError::OutOfRange { .. } => Code::OutOfRange,
            BrokerError::PermissionDenied(_) => Code::PermissionDenied,
            BrokerError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            BrokerError::RequestRefused(_) => Code::PermissionDenied,
            BrokerError::UnknownRoute(_) => Code::NotFound,
            BrokerError::MethodNotAllowed(_) => Code::Unimplemented,
            BrokerError::HeldLimit { .. } => Code::ResourceExhausted,
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
            BrokerError::HeldLimit { .. } => {
                details.set_retry_info(Some(crate::serve::guard::HELD_RETRY_DELAY));
            }
            _ => {}
        }
        Status::with_error_details(error.code(), error.to_string(), details)
    }
}

impl axum::response::IntoResponse for BrokerError {
    /// The Status gRPC would send, as HTTP: the status of its code (405 for
    /// a method the route does not take), `google.rpc.Status` JSON with the
    /// same details, `Retry-After` from its RetryInfo.
    fn into_response(self) -> axum::response::Response {
        let http = match &self {
            BrokerError::MethodNotAllowed(_) => axum::http::StatusCode::METHOD_NOT_ALLOWED,
            other => http_status(other.code()),
        };
        status_response(http, &Status::from(self))
    }
}

/// The HTTP status for a gRPC code (google.rpc.Code's documented mapping).
pub fn http_status(code: Code) -> axum::http::StatusCode {
    use axum::http::StatusCode as H;
    match code {
        Code::Ok => H::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => H::BAD_REQUEST,
        Code::Unauthenticated => H::UNAUTHORIZED,
        Code::PermissionDenied => H::FORBIDDEN,
        Code::NotFound => H::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => H::CONFLICT,
        Code::ResourceExhausted => H::TOO_MANY_REQUESTS,
        Code::Cancelled => H::from_u16(499).unwrap_or(H::BAD_REQUEST),
        Code::Unimplemented => H::NOT_IMPLEMENTED,
        Code::Unavailable => H::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => H::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => H::INTERNAL_SERVER_ERROR,
    }
}

/// `status` as an HTTP answer: a google.rpc.Status JSON body (the proto3
/// JSON mapping: `code`, `message`, `details` with `@type`).
pub(crate) fn status_response(http: axum::http::StatusCode, status: &Status) -> axum::response::Response {
    use axum::http::header;
    use serde_json::json;
    let details = status.get_error_details();
    let mut out = Vec::new();
    if let Some(info) = details.error_info() {
        out.push(json!({
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": info.reason,
            "domain": info.domain,
            "metadata": info.metadata,
        }));
    }
    let retry = details.retry_info().and_then(|r| r.retry_delay);
    if let Some(delay) = retry {
        out.push(json!({
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": json_duration(delay),
        }));
    }
    if let Some(bad) = details.bad_request() {
        let violations: Vec<_> = bad
            .field_violations
            .iter()
            .map(|v| json!({"field": v.field, "description": v.description}))
            .collect();
        out.push(json!({
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": violations,
        }));
    }
    let body = json!({"code": status.code() as i32, "message": status.message(), "details": out});
    let mut response = (http, axum::Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    if let Some(delay) = retry {
        let seconds = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
        headers.insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
    }
    response
}

/// A Duration in the proto3 JSON form: seconds with 0, 3, 6 or 9 decimals, then `s`.
pub(crate) fn json_duration(d: Duration) -> String {
    let nanos = d.subsec_nanos();
    match nanos {
        0 => format!("{}s", d.as_secs()),
        n if n % 1_000_000 == 0 => format!("{}.{:03}s", d.as_secs(), n / 1_000_000),
        n if n % 1_000 == 0 => format!("{}.{:06}s", d.as_secs(), n / 1_000),
        n => format!("{}.{:09}s", d.as_secs(), n),
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
