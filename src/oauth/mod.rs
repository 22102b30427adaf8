//! The token endpoint client: how a token request is made (grants, client
//! authentication), how the answer is validated, and how failures are
//! classified. [`TokenEndpoint`] is the seam the token lifecycle is tested
//! through; [`OAuthClient`] is the real implementation over HTTPS.

mod client;
mod error;
mod redaction;
mod response;

use std::future::Future;
use std::time::Duration;

use secrecy::SecretString;

pub use client::{ClientAuth, ClientBuildError, OAuthClient, OAuthClientConfig, OAuthSettings};
pub use error::{ErrorClass, OAuthError, UNRECOGNISED, registered_code};
pub use redaction::SecretFilter;
pub use response::{ErrorAnswer, LifetimeBounds, TokenResponse, WITHHELD, parse_error_response, parse_token_response};

use crate::credentials::ApiKey;

/// The grant a token request uses.
#[derive(Clone)]
pub enum Grant {
    /// `grant_type=client_credentials` (scope comes from the client's configuration).
    ClientCredentials,
    /// `grant_type=refresh_token` with the refresh token last issued.
    RefreshToken(SecretString),
}

impl Grant {
    pub fn name(&self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::RefreshToken(_) => "refresh_token",
        }
    }
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Anything that can answer a token request: the real HTTP client, or an
/// in-process fake in tests that run under paused time.
pub trait TokenEndpoint: Send + Sync + 'static {
    fn request_token(
        &self,
        key: &ApiKey,
        grant: &Grant,
    ) -> impl Future<Output = Result<TokenResponse, OAuthError>> + Send;
}

/// Default lifetime assumed when the endpoint omits `expires_in`.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(900);

/// `Authorization: Basic` per RFC 6749 §2.3.1: each part form-urlencoded
/// first. The client sends it; the redaction filter must know its form.
pub(crate) fn basic_authorization(client_id: &str, client_secret: &str) -> String {
    use base64::Engine;
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let joined = format!("{}:{}", encode(client_id), encode(client_secret));
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(joined))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_shows_its_type_never_its_refresh_token() {
        assert_eq!(format!("{:?}", Grant::ClientCredentials), "client_credentials");
        assert_eq!(
            format!("{:?}", Grant::RefreshToken(SecretString::from("rt-secret"))),
            "refresh_token"
        );
    }
}
