//! The token endpoint as a TokenSource's supply: the API key, the refresh
//! token and the choice of grant, and the log line and metric of every
//! token request. The schedule, coalescing and backoff are the engine's.

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use tracing::{error, info, warn};

use super::Token;
use super::policy::RefreshPolicy;
use super::state::TokenSourceConfig;
use super::supply::{Attempt, Call, Failure, KeyVerifier, Landed, Pending, Sent, Supply};
use crate::credentials::ApiKey;
use crate::environment::Environment;
use crate::metrics::Metrics;
use crate::oauth::{ErrorClass, Grant, OAuthError, TokenEndpoint, TokenResponse};

/// Calls the token endpoint with the API key (and the refresh token, when
/// one was issued and `use_refresh_token` is on).
pub struct EndpointSupply<E> {
    endpoint: Arc<E>,
    key: ApiKey,
    refresh_token: Option<SecretString>,
    use_refresh_token: bool,
    environment: Environment,
    policy: RefreshPolicy,
    metrics: Arc<Metrics>,
}

impl<E: TokenEndpoint> EndpointSupply<E> {
    pub fn new(endpoint: E, key: ApiKey, config: &TokenSourceConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            endpoint: Arc::new(endpoint),
            key,
            refresh_token: None,
            use_refresh_token: config.use_refresh_token,
            environment: config.environment,
            policy: config.policy.clone(),
            metrics,
        }
    }

    /// Logs and counts one finished token request.
    fn log_call(&self, grant: &Grant, sent: Sent, result: &Result<TokenResponse, OAuthError>) {
        let took = sent.at.elapsed();
        let (env, grant) = (self.environment, grant.name());
        let duration_ms = took.as_millis() as u64;
        match result {
            Ok(response) => {
                self.metrics.record_refresh(env.as_str(), grant, "ok", took);
                info!(grant, outcome = "ok", duration_ms, token_id = %super::token_id(response.access_token.expose_secret()),
                      expires_in = response.lifetime.as_secs(), "token request");
            }
            Err(e) => {
                self.metrics.record_refresh(env.as_str(), grant, e.label(), took);
                if e.class() == ErrorClass::Permanent {
                    error!(grant, outcome = e.label(), duration_ms, error = %e, "token request failed");
                } else {
                    warn!(grant, outcome = e.label(), duration_ms, error = %e, "token request failed");
                }
            }
        }
    }
}

impl<E: TokenEndpoint> Supply for EndpointSupply<E> {
    type Done = (Grant, Result<TokenResponse, OAuthError>);
    const SCHEDULED: bool = true;

    /// A refresh uses the refresh grant when we hold a refresh token.
    fn start(&mut self, _call: &Call) -> Pending<Self::Done> {
        let grant = match (&self.refresh_token, self.use_refresh_token) {
            (Some(refresh), true) => Grant::RefreshToken(refresh.clone()),
            _ => Grant::ClientCredentials,
        };
        self.request(self.key.clone(), grant)
    }

    fn land(&mut self, attempt: &Attempt, sent: Sent, (grant, result): Self::Done) -> Landed {
        self.log_call(&grant, sent, &result);
        if let (Attempt::Call(call), Grant::RefreshToken(_), Err(e)) = (attempt, &grant, &result)
            && e.class() == ErrorClass::InvalidGrant
        {
            warn!("refresh token rejected (invalid_grant); falling back to client credentials");
            self.refresh_token = None;
            return Landed::Again(call.clone());
        }
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                if let Attempt::VerifyKey(key) = attempt {
                    error!(client_id = key.client_id(), error = %error, "new API key failed verification; keeping the current key");
                }
                return Landed::Failed(Failure::from_oauth(&error));
            }
        };
        if let Attempt::VerifyKey(key) = attempt {
            info!(
                client_id = key.client_id(),
                "new API key accepted by the token endpoint; now in use"
            );
            self.key = key.clone();
            self.refresh_token = None;
        }
        if let Some(refresh) = response.refresh_token {
            self.refresh_token = Some(refresh);
        }
        // A re-issued token is built afresh too: same token, same
        // token_id, new expiry.
        Landed::Issued(Token::new(
            response.access_token,
            response.token_type,
            self.environment,
            sent.at,
            sent.wall,
            response.lifetime,
            self.policy.serve_margin_for(response.lifetime),
        ))
    }

    fn verifier(&mut self) -> Option<&mut dyn KeyVerifier<Self::Done>> {
        Some(self)
    }
}

impl<E: TokenEndpoint> KeyVerifier<<Self as Supply>::Done> for EndpointSupply<E> {
    fn holds(&self, key: &ApiKey) -> bool {
        key.digest() == self.key.digest()
    }

    /// A new key is tried with client credentials.
    fn verify(&mut self, key: &ApiKey) -> Pending<<Self as Supply>::Done> {
        self.request(key.clone(), Grant::ClientCredentials)
    }
}

impl<E: TokenEndpoint> EndpointSupply<E> {
    fn request(&self, key: ApiKey, grant: Grant) -> Pending<<Self as Supply>::Done> {
        let endpoint = self.endpoint.clone();
        Box::pin(async move {
            let result = endpoint.request_token(&key, &grant).await;
            (grant, result)
        })
    }
}
