//! Failure classes of a token request. Every message is secret-free: it
//! carries the HTTP status and at most a short, sanitised excerpt of the body.

use std::time::Duration;

/// Whether retrying the same request can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Connect errors, timeouts, 5xx, 429, malformed answers: retry with backoff.
    Transient,
    /// The endpoint rejected our request or credentials: retry slowly, alert.
    Permanent,
    /// The refresh token was rejected: drop it and use client credentials now.
    InvalidGrant,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum OAuthError {
    #[error("token endpoint unreachable: {0}")]
    Transport(String),
    #[error("token endpoint did not answer within {0:?}")]
    Timeout(Duration),
    #[error("token endpoint rate-limited the request (429{})", retry_after.map(|d| format!(", Retry-After {}s", d.as_secs())).unwrap_or_default())]
    RateLimited { retry_after: Option<Duration> },
    #[error("token endpoint server error {status}{}", excerpt_suffix(excerpt))]
    Server { status: u16, excerpt: String },
    #[error("token endpoint refused the request: {status} {code}{}", description.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    OAuth {
        status: u16,
        code: String,
        description: Option<String>,
    },
    #[error("token endpoint answered {status}{}", excerpt_suffix(excerpt))]
    Http { status: u16, excerpt: String },
    #[error("malformed token response (HTTP {status}): {reason}")]
    Malformed { status: u16, reason: String },
}

fn excerpt_suffix(excerpt: &str) -> String {
    if excerpt.is_empty() {
        String::new()
    } else {
        format!(": {excerpt}")
    }
}

impl OAuthError {
    pub fn class(&self) -> ErrorClass {
        match self {
            OAuthError::Transport(_)
            | OAuthError::Timeout(_)
            | OAuthError::RateLimited { .. }
            | OAuthError::Server { .. }
            | OAuthError::Malformed { .. } => ErrorClass::Transient,
            OAuthError::OAuth { code, .. } if code == "invalid_grant" => ErrorClass::InvalidGrant,
            // Codes some servers use for passing trouble.
            OAuthError::OAuth { code, .. } if code == "temporarily_unavailable" || code == "server_error" => {
                ErrorClass::Transient
            }
            OAuthError::Http { status: 408, .. } => ErrorClass::Transient,
            OAuthError::OAuth { .. } | OAuthError::Http { .. } => ErrorClass::Permanent,
        }
    }

    pub fn is_transient(&self) -> bool {
        self.class() == ErrorClass::Transient
    }

    /// The server's requested wait, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            OAuthError::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }

    /// A short stable label for metrics and logs (`transport`, `invalid_client`, ...).
    pub fn label(&self) -> &str {
        match self {
            OAuthError::Transport(_) => "transport",
            OAuthError::Timeout(_) => "timeout",
            OAuthError::RateLimited { .. } => "rate_limited",
            OAuthError::Server { .. } => "server_error",
            OAuthError::OAuth { code, .. } => match code.as_str() {
                "invalid_request"
                | "invalid_client"
                | "invalid_grant"
                | "unauthorized_client"
                | "unsupported_grant_type"
                | "invalid_scope"
                | "temporarily_unavailable"
                | "server_error" => code,
                _ => "oauth_error",
            },
            OAuthError::Http { .. } => "http_error",
            OAuthError::Malformed { .. } => "malformed",
        }
    }
}
