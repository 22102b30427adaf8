//! The one place the core's errors ([`BrokerError`]) become what a face
//! sends: a `tonic::Status` (gRPC), or the same Status as an HTTP answer
//! (a `google.rpc.Status` JSON body with the HTTP status of its code) for
//! the HTTP/JSON read and the API proxy. Every non-OK Status carries a
//! `google.rpc.ErrorInfo` with the error's stable
//! [`reason`](BrokerError::reason) in the [`ERROR_DOMAIN`] domain and,
//! when waiting helps, a `google.rpc.RetryInfo` with the delay.

use std::time::Duration;

use axum::response::IntoResponse;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::broker::BrokerError;

/// The gRPC code of an error of the core.
pub fn code(error: &BrokerError) -> Code {
    match error {
        BrokerError::UnspecifiedEnvironment | BrokerError::InvalidArgument { .. } => Code::InvalidArgument,
        BrokerError::EnvironmentNotEnabled(_) => Code::FailedPrecondition,
        BrokerError::NoValidToken { .. } | BrokerError::ShuttingDown | BrokerError::AuditUnavailable => {
            Code::Unavailable
        }
        BrokerError::OutOfRange { .. } => Code::OutOfRange,
        BrokerError::PermissionDenied(_) | BrokerError::RouteNotAllowed(_) => Code::PermissionDenied,
        BrokerError::DeadlineExceeded(_) => Code::DeadlineExceeded,
        BrokerError::RequestRefused(_) => Code::PermissionDenied,
        BrokerError::UnknownRoute(_) => Code::NotFound,
        BrokerError::MethodNotAllowed(_) => Code::Unimplemented,
        BrokerError::HeldLimit { .. } | BrokerError::RateLimited { .. } => Code::ResourceExhausted,
    }
}

/// The `domain` of every ErrorInfo the broker sends.
pub const ERROR_DOMAIN: &str = "tokenbroker.flute.com";

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
            BrokerError::AuditUnavailable => {
                details.set_retry_info(Some(std::time::Duration::from_secs(1)));
            }
            BrokerError::HeldLimit { .. } => {
                details.set_retry_info(Some(crate::serve::guard::HELD_RETRY_DELAY));
            }
            BrokerError::RateLimited { retry_after, .. } => {
                details.set_retry_info(Some(*retry_after));
            }
            _ => {}
        }
        Status::with_error_details(code(&error), error.to_string(), details)
    }
}

impl axum::response::IntoResponse for BrokerError {
    /// The Status gRPC would send, as HTTP: the status of its code (405 for
    /// a method the route does not take), `google.rpc.Status` JSON with the
    /// same details, `Retry-After` from its RetryInfo.
    fn into_response(self) -> axum::response::Response {
        let http = match &self {
            BrokerError::MethodNotAllowed(_) => axum::http::StatusCode::METHOD_NOT_ALLOWED,
            other => http_status(code(other)),
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
