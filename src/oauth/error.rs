//! Failure classes of a token request. Every message is secret-free by
//! construction: of what the endpoint sent it carries only the HTTP status,
//! an OAuth error code from the RFC 6749 / RFC 6750 registry (anything else
//! reads `unrecognised`), and a description that passed the
//! [`SecretFilter`](super::SecretFilter). Raw body text never reaches it.

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
    #[error("token endpoint server error {status}{}{}", code.map(|c| format!(": {c}")).unwrap_or_default(), suffix(description))]
    Server {
        status: u16,
        code: Option<&'static str>,
        description: Option<String>,
    },
    #[error("token endpoint refused the request: {status} {code}{}", suffix(description))]
    OAuth {
        status: u16,
        /// A registered OAuth error code, or [`UNRECOGNISED`].
        code: &'static str,
        description: Option<String>,
    },
    #[error("token endpoint answered {status}{}", suffix(description))]
    Http { status: u16, description: Option<String> },
    #[error("malformed token response (HTTP {status}): {reason}")]
    Malformed { status: u16, reason: String },
}

/// The code shown for an OAuth `error` value outside the registry.
pub const UNRECOGNISED: &str = "unrecognised";

/// The error codes of RFC 6749 (§4.1.2.1, §5.2) and RFC 6750 (§3.1).
const REGISTERED_CODES: [&str; 12] = [
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "access_denied",
    "unsupported_response_type",
    "server_error",
    "temporarily_unavailable",
    "invalid_token",
    "insufficient_scope",
];

/// The registered code `code` names (exactly, as the RFCs spell them), or
/// [`UNRECOGNISED`]: never text chosen by the endpoint.
pub fn registered_code(code: &str) -> &'static str {
    REGISTERED_CODES
        .iter()
        .find(|known| **known == code)
        .copied()
        .unwrap_or(UNRECOGNISED)
}

fn suffix(description: &Option<String>) -> String {
    description.as_ref().map(|d| format!(": {d}")).unwrap_or_default()
}

impl OAuthError {
    pub fn class(&self) -> ErrorClass {
        match self {
            OAuthError::Transport(_)
            | OAuthError::Timeout(_)
            | OAuthError::RateLimited { .. }
            | OAuthError::Server { .. }
            | OAuthError::Malformed { .. } => ErrorClass::Transient,
            OAuthError::OAuth {
                code: "invalid_grant", ..
            } => ErrorClass::InvalidGrant,
            // Codes some servers use for passing trouble.
            OAuthError::OAuth {
                code: "temporarily_unavailable" | "server_error",
                ..
            } => ErrorClass::Transient,
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
    pub fn label(&self) -> &'static str {
        match self {
            OAuthError::Transport(_) => "transport",
            OAuthError::Timeout(_) => "timeout",
            OAuthError::RateLimited { .. } => "rate_limited",
            OAuthError::Server { .. } => "server_error",
            OAuthError::OAuth { code, .. } if *code == UNRECOGNISED => "oauth_error",
            OAuthError::OAuth { code, .. } => code,
            OAuthError::Http { .. } => "http_error",
            OAuthError::Malformed { .. } => "malformed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oauth(status: u16, code: &'static str) -> OAuthError {
        OAuthError::OAuth {
            status,
            code,
            description: None,
        }
    }

    #[test]
    fn each_failure_has_its_class_label_and_wait() {
        let wait = Some(Duration::from_secs(7));
        let cases = [
            (
                OAuthError::Transport("refused".into()),
                ErrorClass::Transient,
                "transport",
            ),
            (
                OAuthError::Timeout(Duration::from_secs(10)),
                ErrorClass::Transient,
                "timeout",
            ),
            (
                OAuthError::RateLimited { retry_after: wait },
                ErrorClass::Transient,
                "rate_limited",
            ),
            (
                OAuthError::Server {
                    status: 503,
                    code: None,
                    description: None,
                },
                ErrorClass::Transient,
                "server_error",
            ),
            (
                OAuthError::Malformed {
                    status: 200,
                    reason: "x".into(),
                },
                ErrorClass::Transient,
                "malformed",
            ),
            (oauth(400, "invalid_grant"), ErrorClass::InvalidGrant, "invalid_grant"),
            (
                oauth(400, "temporarily_unavailable"),
                ErrorClass::Transient,
                "temporarily_unavailable",
            ),
            (oauth(400, "server_error"), ErrorClass::Transient, "server_error"),
            (oauth(401, "invalid_client"), ErrorClass::Permanent, "invalid_client"),
            (oauth(400, "invalid_scope"), ErrorClass::Permanent, "invalid_scope"),
            (oauth(400, UNRECOGNISED), ErrorClass::Permanent, "oauth_error"),
            (
                OAuthError::Http {
                    status: 408,
                    description: None,
                },
                ErrorClass::Transient,
                "http_error",
            ),
            (
                OAuthError::Http {
                    status: 404,
                    description: None,
                },
                ErrorClass::Permanent,
                "http_error",
            ),
        ];
        for (error, class, label) in cases {
            assert_eq!(error.class(), class, "{error}");
            assert_eq!(error.is_transient(), class == ErrorClass::Transient, "{error}");
            assert_eq!(error.label(), label, "{error}");
            let expected_wait = matches!(error, OAuthError::RateLimited { .. })
                .then_some(wait)
                .flatten();
            assert_eq!(error.retry_after(), expected_wait, "{error}");
        }
    }

    #[test]
    fn only_registered_codes_are_kept() {
        for code in REGISTERED_CODES {
            assert_eq!(registered_code(code), code);
        }
        for other in ["Invalid_Client", "invalid_client ", "made_up", ""] {
            assert_eq!(registered_code(other), UNRECOGNISED, "{other:?}");
        }
    }

    #[test]
    fn messages_carry_status_code_and_description() {
        let e = OAuthError::Server {
            status: 502,
            code: Some("server_error"),
            description: Some("upstream".into()),
        };
        assert_eq!(e.to_string(), "token endpoint server error 502: server_error: upstream");
        let e = OAuthError::RateLimited { retry_after: None };
        assert_eq!(e.to_string(), "token endpoint rate-limited the request (429)");
    }
}
