//! The HTTPS token client (reqwest over rustls/ring): builds the request for
//! a grant, authenticates the client one way only, bounds time and body size,
//! and hands the answer to the parsers.

use std::time::Duration;

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use super::redaction::SecretFilter;
use super::response::{LifetimeBounds, TokenResponse, clean, parse_error_response, parse_token_response};
use super::{Grant, OAuthError, TokenEndpoint, basic_authorization};
use crate::credentials::ApiKey;
use crate::tls_roots::{TlsRoots, TrustRoots};

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum ClientAuth {
    /// HTTP Basic with the form-urlencoded id and secret.
    #[default]
    ClientSecretBasic,
    /// `client_id` and `client_secret` as form fields.
    ClientSecretPost,
}

crate::named_choices!(ClientAuth {
    ClientSecretBasic => "client_secret_basic",
    ClientSecretPost => "client_secret_post",
});

/// `[oauth]`: how every environment's token endpoint is called. Each
/// default is defined here once; [`OAuthClientConfig::new`] uses them too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthSettings {
    pub client_auth: ClientAuth,
    /// Sent with client-credentials requests; `""` sends no scope.
    pub scope: String,
    #[serde(with = "crate::duration::serde")]
    pub connect_timeout: Duration,
    #[serde(with = "crate::duration::serde")]
    pub request_timeout: Duration,
    /// Keep and use the refresh token the endpoint issues.
    pub use_refresh_token: bool,
    /// Lifetime assumed when the endpoint sends no `expires_in`.
    #[serde(with = "crate::duration::serde")]
    pub default_lifetime: Duration,
    /// Allow `http://` token URLs on loopback hosts (development only).
    pub allow_insecure_http: bool,
    /// The CAs trusted for `https://` token URLs.
    pub tls_roots: TlsRoots,
}

impl Default for OAuthSettings {
    fn default() -> Self {
        Self {
            client_auth: ClientAuth::ClientSecretBasic,
            scope: "offline_access".into(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            use_refresh_token: true,
            default_lifetime: super::DEFAULT_LIFETIME,
            allow_insecure_http: false,
            tls_roots: TlsRoots::Auto,
        }
    }
}

impl OAuthSettings {
    /// The client of one environment's endpoint, trusting `roots` (loaded
    /// once from [`OAuthSettings::tls_roots`] for every `https://` URL).
    pub fn client_config(&self, token_url: impl Into<String>, roots: TrustRoots) -> OAuthClientConfig {
        OAuthClientConfig {
            token_url: token_url.into(),
            roots,
            client_auth: self.client_auth,
            scope: (!self.scope.is_empty()).then(|| self.scope.clone()),
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            max_body_bytes: MAX_BODY_BYTES,
            lifetime: LifetimeBounds {
                default: self.default_lifetime,
                ..LifetimeBounds::default()
            },
        }
    }

    /// Problems with the values, each starting with its key.
    pub fn problems(&self) -> Vec<String> {
        let secs = Duration::from_secs;
        [
            ("connect_timeout", self.connect_timeout, secs(120)),
            ("request_timeout", self.request_timeout, secs(300)),
            ("default_lifetime", self.default_lifetime, secs(86_400)),
        ]
        .into_iter()
        .filter_map(|(key, value, max)| {
            crate::duration::out_of_range(value, secs(1), max).map(|p| format!("{key}: {p}"))
        })
        .collect()
    }

    /// Whether `token_url` may be used: https, or http on a loopback host
    /// when `allow_insecure_http` is set.
    pub fn check_token_url(&self, url: &str) -> Result<(), String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?}: {e}"))?;
        match parsed.scheme() {
            "https" => Ok(()),
            "http" if !self.allow_insecure_http => Err(format!(
                "{url:?}: https is required (oauth.allow_insecure_http permits http on loopback)"
            )),
            "http" => {
                let loopback = match parsed.host() {
                    Some(url::Host::Domain(d)) => d == "localhost",
                    Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                    Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                    None => false,
                };
                if loopback {
                    Ok(())
                } else {
                    Err(format!("{url:?}: plain http is only allowed for loopback hosts"))
                }
            }
            other => Err(format!("{url:?}: unsupported scheme {other:?}")),
        }
    }
}

/// Largest response body read; larger answers are malformed.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Settings of one token endpoint client.
#[derive(Clone, Debug)]
pub struct OAuthClientConfig {
    pub token_url: String,
    pub client_auth: ClientAuth,
    /// Sent with client-credentials requests; `None` sends no scope.
    pub scope: Option<String>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Largest response body read; larger answers are malformed.
    pub max_body_bytes: usize,
    pub lifetime: LifetimeBounds,
    /// The only CAs trusted (none for an `http://` URL).
    pub roots: TrustRoots,
}

impl OAuthClientConfig {
    /// A client with the default [`OAuthSettings`], trusting no CA (for
    /// `http://` URLs; set `roots` for `https://`).
    pub fn new(token_url: impl Into<String>) -> Self {
        OAuthSettings::default().client_config(token_url, TrustRoots::default())
    }
}

/// The HTTP client could not be built (a local problem, not the endpoint's).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the token endpoint's HTTP client: {0}")]
pub struct ClientBuildError(String);

/// A client for one token endpoint.
#[derive(Clone)]
pub struct OAuthClient {
    http: reqwest::Client,
    config: OAuthClientConfig,
}

impl std::fmt::Debug for OAuthClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl OAuthClient {
    pub fn new(config: OAuthClientConfig) -> Result<Self, ClientBuildError> {
        crate::install_crypto_provider();
        // Exactly these roots, as they are at each handshake (a PEM file's
        // new content is taken in place): the platform verifier would read
        // the host's store, which may not exist and is not what was configured.
        let tls = config.roots.client_config().map_err(ClientBuildError)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .user_agent(concat!(env!("CARGO_PKG_NAME"), "/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ClientBuildError(crate::error_chain(&e)))?;
        Ok(Self { http, config })
    }

    pub fn config(&self) -> &OAuthClientConfig {
        &self.config
    }

    /// The form body and the optional Authorization header value for a grant.
    fn request_parts(&self, key: &ApiKey, grant: &Grant) -> (String, Option<String>) {
        let mut form = form_urlencoded::Serializer::new(String::new());
        match grant {
            Grant::ClientCredentials => {
                form.append_pair("grant_type", "client_credentials");
                if let Some(scope) = &self.config.scope {
                    form.append_pair("scope", scope);
                }
            }
            Grant::RefreshToken(refresh) => {
                form.append_pair("grant_type", "refresh_token");
                form.append_pair("refresh_token", refresh.expose_secret());
            }
        }
        let header = match self.config.client_auth {
            ClientAuth::ClientSecretBasic => Some(basic_authorization(key.client_id(), key.expose_secret())),
            ClientAuth::ClientSecretPost => {
                form.append_pair("client_id", key.client_id());
                form.append_pair("client_secret", key.expose_secret());
                None
            }
        };
        (form.finish(), header)
    }

    async fn send(&self, key: &ApiKey, grant: &Grant) -> Result<TokenResponse, OAuthError> {
        let (body, authorization) = self.request_parts(key, grant);
        let mut request = self
            .http
            .post(&self.config.token_url)
            .header(ACCEPT, "application/json")
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body);
        if crate::telemetry::enabled() {
            let mut context = reqwest::header::HeaderMap::new();
            crate::telemetry::inject(&tracing::Span::current(), &mut context);
            request = request.headers(context);
        }
        if let Some(value) = authorization {
            let mut value = reqwest::header::HeaderValue::from_str(&value)
                .map_err(|_| OAuthError::Transport("client id or secret cannot be sent in a header".into()))?;
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        let mut response = request.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status().as_u16();
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        let (www_authenticate, retry_after) = (header(WWW_AUTHENTICATE), header(RETRY_AFTER));

        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.transport_error(e))? {
            if body.len() + chunk.len() > self.config.max_body_bytes {
                return Err(OAuthError::Malformed {
                    status,
                    reason: format!("response body exceeds {} bytes", self.config.max_body_bytes),
                });
            }
            body.extend_from_slice(&chunk);
        }
        if (200..300).contains(&status) {
            parse_token_response(status, &body, &self.config.lifetime)
        } else {
            let answer = parse_error_response(status, &body, www_authenticate.as_deref(), retry_after.as_deref());
            Err(answer.into_error(&SecretFilter::for_request(key, grant)))
        }
    }

    fn transport_error(&self, error: reqwest::Error) -> OAuthError {
        if error.is_timeout() {
            return OAuthError::Timeout(self.config.request_timeout);
        }
        // reqwest's Display names the URL (never a credential: those travel in
        // the header or body); the source chain says what actually failed.
        OAuthError::Transport(clean(&crate::error_chain(&error.without_url())))
    }
}

impl TokenEndpoint for OAuthClient {
    async fn request_token(&self, key: &ApiKey, grant: &Grant) -> Result<TokenResponse, OAuthError> {
        if !crate::telemetry::enabled() {
            return self.send(key, grant).await;
        }
        // A span of the caller's trace (the refresh that needed it), its
        // context sent as `traceparent`; never a credential or a token in it.
        use tracing::Instrument;
        let span = tracing::info_span!(
            "token request",
            otel.kind = "client",
            grant = grant.name(),
            outcome = tracing::field::Empty,
            token_id = tracing::field::Empty
        );
        let answer = self.send(key, grant).instrument(span.clone()).await;
        match &answer {
            Ok(response) => {
                span.record("outcome", "ok");
                span.record(
                    "token_id",
                    crate::fingerprint::token_id(secrecy::ExposeSecret::expose_secret(&response.access_token)).as_str(),
                );
            }
            Err(e) => {
                span.record("outcome", e.label());
            }
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    /// Decodes a Basic header the way RFC 6749 §2.3.1 servers do.
    fn decode_basic(header: &str) -> (String, String) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(header.strip_prefix("Basic ").unwrap())
            .unwrap();
        let joined = String::from_utf8(raw).unwrap();
        let (id, secret) = joined.split_once(':').unwrap();
        let decode = |s: &str| {
            form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .unwrap()
                .1
                .into_owned()
        };
        (decode(id), decode(secret))
    }

    #[test]
    fn basic_round_trips_awkward_secrets() {
        for secret in ["a:b", "100%", "a+b c", "x/y=z", ":%+/= all"] {
            let header = basic_authorization("my:client", secret);
            assert_eq!(
                decode_basic(&header),
                ("my:client".to_owned(), secret.to_owned()),
                "{secret}"
            );
        }
    }

    #[test]
    fn exactly_one_client_auth_form() {
        let key = ApiKey::new("id", "sec").unwrap();
        let mut config = OAuthClientConfig::new("https://example.invalid/oauth2/token");
        let basic = OAuthClient::new(config.clone()).unwrap();
        let (body, header) = basic.request_parts(&key, &Grant::ClientCredentials);
        assert_eq!(body, "grant_type=client_credentials&scope=offline_access");
        assert!(header.is_some());
        config.client_auth = ClientAuth::ClientSecretPost;
        let post = OAuthClient::new(config).unwrap();
        let (body, header) = post.request_parts(&key, &Grant::RefreshToken("r1".to_owned().into()));
        assert_eq!(
            body,
            "grant_type=refresh_token&refresh_token=r1&client_id=id&client_secret=sec"
        );
        assert!(header.is_none());
    }

    #[test]
    fn token_urls_need_https_unless_insecure_http_is_allowed_on_loopback() {
        let strict = OAuthSettings::default();
        let lax = OAuthSettings {
            allow_insecure_http: true,
            ..OAuthSettings::default()
        };
        for url in ["https://oauth.api.flute.com/oauth2/token", "https://10.0.0.1/token"] {
            assert_eq!(strict.check_token_url(url), Ok(()), "{url}");
            assert_eq!(lax.check_token_url(url), Ok(()), "{url}");
        }
        for url in [
            "http://127.0.0.1:9470/oauth2/token",
            "http://localhost/t",
            "http://[::1]:8080/t",
        ] {
            let refused = strict.check_token_url(url).unwrap_err();
            assert!(refused.contains("https is required"), "{url}: {refused}");
            assert_eq!(lax.check_token_url(url), Ok(()), "{url}");
        }
        for url in [
            "http://10.0.0.1/t",
            "http://example.com/t",
            "http://localhost.example.com/t",
        ] {
            let refused = lax.check_token_url(url).unwrap_err();
            assert!(refused.contains("only allowed for loopback"), "{url}: {refused}");
        }
        for (url, why) in [
            ("ftp://127.0.0.1/t", "unsupported scheme"),
            ("not a url", "relative URL"),
        ] {
            let refused = lax.check_token_url(url).unwrap_err();
            assert!(refused.contains(why), "{url}: {refused}");
        }
    }

    #[test]
    fn settings_bounds_are_one_second_to_their_maximum() {
        let secs = Duration::from_secs;
        assert!(OAuthSettings::default().problems().is_empty());
        let at_limits = OAuthSettings {
            connect_timeout: secs(120),
            request_timeout: secs(1),
            default_lifetime: secs(86_400),
            ..OAuthSettings::default()
        };
        assert!(at_limits.problems().is_empty(), "{:?}", at_limits.problems());
        let past = OAuthSettings {
            connect_timeout: secs(121),
            request_timeout: Duration::from_millis(999),
            default_lifetime: secs(86_401),
            ..OAuthSettings::default()
        };
        let problems = past.problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
        for (problem, key) in problems
            .iter()
            .zip(["connect_timeout: ", "request_timeout: ", "default_lifetime: "])
        {
            assert!(
                problem.starts_with(key) && problem.contains("out of range"),
                "{problem}"
            );
        }
    }

    #[test]
    fn each_environment_client_takes_the_shared_settings() {
        let settings = OAuthSettings {
            client_auth: ClientAuth::ClientSecretPost,
            scope: String::new(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(7),
            default_lifetime: Duration::from_secs(120),
            ..OAuthSettings::default()
        };
        let roots = crate::tls_roots::TlsRoots::Bundled.load().unwrap();
        let config = settings.client_config("https://example.invalid/token", roots);
        assert_eq!(config.token_url, "https://example.invalid/token");
        assert_eq!(config.client_auth, ClientAuth::ClientSecretPost);
        assert_eq!(config.scope, None, "an empty scope sends none");
        assert_eq!(
            (config.connect_timeout, config.request_timeout),
            (Duration::from_secs(3), Duration::from_secs(7))
        );
        assert_eq!(config.max_body_bytes, 64 * 1024);
        assert_eq!(config.lifetime.default, Duration::from_secs(120));
        assert_eq!(
            (config.lifetime.min, config.lifetime.max),
            (Duration::from_secs(1), Duration::from_secs(86_400))
        );
        let scoped = OAuthSettings::default().client_config("https://example.invalid/token", TrustRoots::default());
        assert_eq!(scoped.scope.as_deref(), Some("offline_access"));
        let client = OAuthClient::new(config).unwrap();
        let shown = format!("{client:?}");
        assert!(
            shown.starts_with("OAuthClient { config: OAuthClientConfig { token_url: \"https://example.invalid/token\"")
                && shown.ends_with(", .. }"),
            "{shown}"
        );
    }
}
