//! Tokens and their lifecycle: the [`Token`] value handed to readers, the pure
//! [`policy`] that decides when to refresh and how to back off, and the
//! TokenSource of each environment: its engine ([`source`]), the handle
//! readers hold (`handle`), what it publishes (`state`), and the [`supply`]
//! seam with its two supplies, the token endpoint ([`endpoint`]) and an
//! upstream broker ([`follow`]). [`spawn`] and [`follow()`] build one.

pub mod endpoint;
pub mod follow;
mod handle;
pub mod policy;
pub mod source;
mod state;
pub mod supply;

use std::fmt;
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use crate::environment::Environment;

pub use follow::{Following, Received, Update, Upstream};
pub use handle::TokenSourceHandle;
pub use policy::{Jitter, RefreshPolicy};
pub use state::{
    KeyChange, KeyError, RefreshError, RefreshFailure, Snapshot, SourceState, SourceStats, TokenSourceConfig,
};
pub use supply::Failure;

/// Starts a TokenSource that calls the token endpoint with `key`. The task
/// ends when every handle is dropped.
pub fn spawn<E: crate::oauth::TokenEndpoint>(
    config: TokenSourceConfig,
    endpoint: E,
    key: crate::credentials::ApiKey,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> (TokenSourceHandle, tokio::task::JoinHandle<()>) {
    let supply = endpoint::EndpointSupply::new(endpoint, key, &config, metrics.clone());
    source::start(config, supply, metrics)
}

/// Starts a TokenSource that follows the same environment on an upstream
/// broker: no key, no refresh token, tokens pushed by the upstream.
pub fn follow<U: Upstream>(
    config: TokenSourceConfig,
    upstream: U,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> (TokenSourceHandle, tokio::task::JoinHandle<()>) {
    let supply = follow::FollowSupply::new(upstream, &config, metrics.clone());
    source::start(config, supply, metrics)
}

/// An access token as issued by the token endpoint. Debug never shows the
/// token itself: [`Token::token_id`] is what logs and errors name.
pub struct Token {
    access_token: SecretString,
    /// Always `Bearer`.
    pub token_type: String,
    pub environment: Environment,
    /// First 12 hex digits of SHA-256 of the access token: safe to log.
    pub token_id: String,
    /// When the request that produced the token was sent (monotonic).
    pub issued_at: Instant,
    pub expires_at: Instant,
    /// The token is handed out only before this instant (`expires_at` minus
    /// the serve margin).
    pub serve_until: Instant,
    pub issued_at_wall: SystemTime,
    pub expires_at_wall: SystemTime,
    /// `issued_at_wall` and `expires_at_wall` since the Unix epoch (zero
    /// before it), computed once for the answers that carry them.
    pub issued_at_unix: Duration,
    pub expires_at_unix: Duration,
    pub lifetime: Duration,
}

impl Token {
    /// A token issued at `issued_at` (monotonic; `issued_at_wall` for the
    /// wire), valid for `lifetime`, handed out until `serve_margin` before
    /// its expiry.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        access_token: SecretString,
        token_type: String,
        environment: Environment,
        issued_at: Instant,
        issued_at_wall: SystemTime,
        lifetime: Duration,
        serve_margin: Duration,
    ) -> Self {
        let token_id = token_id(access_token.expose_secret());
        let expires_at = issued_at + lifetime;
        Self {
            access_token,
            token_type,
            environment,
            token_id,
            issued_at,
            expires_at,
            serve_until: expires_at - serve_margin.min(lifetime),
            issued_at_wall,
            expires_at_wall: issued_at_wall + lifetime,
            issued_at_unix: since_epoch(issued_at_wall),
            expires_at_unix: since_epoch(issued_at_wall + lifetime),
            lifetime,
        }
    }

    /// A token received from an upstream broker: served until `anchor +
    /// serve_for` (the upstream's serve window, on this process's monotonic
    /// clock), expiring `serve_margin` later, issued `lifetime` before that.
    pub fn received(
        access_token: SecretString,
        token_type: String,
        environment: Environment,
        anchor: Instant,
        serve_for: Duration,
        lifetime: Duration,
        serve_margin: Duration,
    ) -> Self {
        let serve_for = serve_for.min(lifetime);
        let margin = serve_margin.min(lifetime - serve_for);
        let age = lifetime - serve_for - margin;
        let (issued_at, lifetime) = received_window(anchor.checked_sub(age), anchor, serve_for, margin, lifetime);
        let now = Instant::now();
        let issued_at_wall = SystemTime::now() - now.saturating_duration_since(issued_at);
        let token = Self::new(
            access_token,
            token_type,
            environment,
            issued_at,
            issued_at_wall,
            lifetime,
            margin,
        );
        debug_assert_eq!(token.serve_until, anchor + serve_for);
        token
    }

    /// The bearer token. Only the gRPC reply and the CLI output call this.
    pub fn access_token(&self) -> &str {
        self.access_token.expose_secret()
    }

    /// Whether the token may be handed out at `now`.
    pub fn is_servable(&self, now: Instant) -> bool {
        now < self.serve_until
    }

    /// Time left until `expires_at`.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }
}

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default()
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("environment", &self.environment)
            .field("token_id", &self.token_id)
            .field("token_type", &self.token_type)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

pub use crate::fingerprint::token_id;

/// When a received token was issued and how long it lives: `issued_at`
/// (`anchor` less its age, if this clock reaches back that far) with the
/// upstream's lifetime, or, too close to this clock's origin to go back,
/// issued at `anchor` with the same serve window (`serve_for + margin`).
fn received_window(
    issued_at: Option<Instant>,
    anchor: Instant,
    serve_for: Duration,
    margin: Duration,
    lifetime: Duration,
) -> (Instant, Duration) {
    match issued_at {
        Some(issued_at) => (issued_at, lifetime),
        None => (anchor, serve_for + margin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire times, computed once: seconds and nanoseconds since the
    /// Unix epoch of the issue and the expiry.
    #[test]
    fn a_token_carries_its_wall_times_since_the_epoch() {
        let issued = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 250);
        let token = Token::new(
            SecretString::from("t"),
            "Bearer".into(),
            Environment::Sandbox,
            Instant::now(),
            issued,
            Duration::from_secs(900),
            Duration::from_secs(60),
        );
        assert_eq!(token.issued_at_unix, Duration::new(1_700_000_000, 250));
        assert_eq!(token.expires_at_unix, Duration::new(1_700_000_900, 250));
        assert_eq!(
            since_epoch(SystemTime::UNIX_EPOCH - Duration::from_secs(1)),
            Duration::ZERO
        );
    }

    /// A received token is served for exactly `serve_for` from its anchor
    /// and expires a margin later, with a margin no larger than the room
    /// its lifetime leaves (a window as long as the lifetime has none).
    #[test]
    fn a_received_token_keeps_the_upstreams_window() {
        let anchor = Instant::now();
        let received = |serve_for: u64, lifetime: u64| {
            Token::received(
                SecretString::from("t"),
                "Bearer".into(),
                Environment::Sandbox,
                anchor,
                Duration::from_secs(serve_for),
                Duration::from_secs(lifetime),
                Duration::from_secs(5),
            )
        };
        let usual = received(600, 900);
        assert_eq!(usual.serve_until, anchor + Duration::from_secs(600));
        assert_eq!(usual.expires_at, anchor + Duration::from_secs(605));
        assert_eq!(usual.lifetime, Duration::from_secs(900));
        let whole = received(900, 900);
        assert_eq!(whole.serve_until, anchor + Duration::from_secs(900));
        assert_eq!(whole.expires_at, anchor + Duration::from_secs(900));
        let tight = received(898, 900);
        assert_eq!(tight.expires_at, anchor + Duration::from_secs(900));
    }

    /// Near this clock's origin the window is kept, not the lifetime.
    #[test]
    fn a_window_that_cannot_reach_back_keeps_its_length() {
        let anchor = Instant::now();
        let (s, m, l) = (
            Duration::from_secs(600),
            Duration::from_secs(5),
            Duration::from_secs(900),
        );
        assert_eq!(
            received_window(None, anchor, s, m, l),
            (anchor, Duration::from_secs(605))
        );
        let earlier = anchor - Duration::from_secs(295);
        assert_eq!(received_window(Some(earlier), anchor, s, m, l), (earlier, l));
    }

    #[test]
    fn token_id_is_short_stable_and_not_the_token() {
        let id = token_id("the-access-token");
        assert_eq!(id.len(), 12);
        assert_eq!(id, token_id("the-access-token"));
        assert_ne!(id, token_id("another"));
    }

    #[tokio::test(start_paused = true)]
    async fn serve_margin_and_debug() {
        let now = Instant::now();
        let t = Token::new(
            "abc-secret".to_owned().into(),
            "Bearer".into(),
            Environment::Sandbox,
            now,
            SystemTime::now(),
            Duration::from_secs(100),
            Duration::from_secs(5),
        );
        assert!(t.is_servable(now + Duration::from_secs(94)));
        assert!(!t.is_servable(now + Duration::from_secs(95)));
        let shown = format!("{t:?}");
        assert!(!shown.contains("abc-secret"));
        assert_eq!(
            shown,
            format!(
                "Token {{ environment: Sandbox, token_id: \"{}\", token_type: \"Bearer\", lifetime: 100s, .. }}",
                token_id("abc-secret")
            )
        );
    }
}

/// The TokenSources of the enabled environments.
#[derive(Clone, Default)]
pub struct TokenSources {
    sources: std::collections::BTreeMap<Environment, TokenSourceHandle>,
}

impl TokenSources {
    pub fn new(handles: impl IntoIterator<Item = TokenSourceHandle>) -> Self {
        Self {
            sources: handles.into_iter().map(|h| (h.environment(), h)).collect(),
        }
    }

    pub fn get(&self, env: Environment) -> Option<&TokenSourceHandle> {
        self.sources.get(&env)
    }

    pub fn iter(&self) -> impl Iterator<Item = &TokenSourceHandle> {
        self.sources.values()
    }

    /// Whether every source task is still running (for the systemd watchdog).
    pub fn all_running(&self) -> bool {
        self.sources.values().all(TokenSourceHandle::is_running)
    }

    /// A one-line summary (systemd STATUS=, logs).
    pub fn summary(&self) -> String {
        let now = Instant::now();
        self.sources
            .values()
            .map(|s| match s.current() {
                Some(t) => format!(
                    "{}: {:?}, token {} ({}s left)",
                    s.environment(),
                    s.snapshot().state(),
                    t.token_id,
                    t.remaining(now).as_secs()
                ),
                None => format!("{}: {:?}", s.environment(), s.snapshot().state()),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Whether every enabled environment holds a token that is handed out.
    pub fn all_ready(&self) -> bool {
        self.sources.values().all(|s| s.current().is_some())
    }
}
