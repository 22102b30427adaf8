//! A local stand-in for Flute's token endpoint (and one protected API route),
//! with run-time fault injection. Used by `serve --dev`, by our tests, and by
//! users' own integration tests through `flute-token-broker emulator`.
//!
//! Routes:
//! - `POST /oauth2/token`: client credentials and refresh grants, Basic or
//!   form client authentication, RFC 6749 §5.2 errors.
//! - `/v2/…`: the API ([`api`]): `GET /v2/transactions`, a streamed byte
//!   count, and an echo of any other request (with the `token_id` of the
//!   bearer token it carried), each 401 for a missing, expired or revoked
//!   token.
//! - `POST /__emulator/faults`, `GET /__emulator/faults`: inject faults.
//! - `GET /__emulator/stats`: counts of what was served.
//! - `POST /__emulator/credentials`: change the accepted client id and
//!   secret (a key rotation on Flute's side).
//!
//! It serves plain HTTP ([`Emulator::spawn`]) or HTTPS with HTTP/2 and
//! HTTP/1.1 offered by ALPN ([`Emulator::spawn_tls`], with a certificate
//! the caller generated), both on the same state.

mod api;
mod faults;
mod oauth;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::routing::{any, get, post};
use secrecy::SecretString;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use faults::{FaultRequest, Faults};

/// What the emulator accepts and issues.
#[derive(Clone)]
pub struct EmulatorConfig {
    pub client_id: String,
    pub client_secret: SecretString,
    /// `expires_in` of issued tokens.
    pub token_lifetime: Duration,
    /// Issue (and rotate) refresh tokens with every token.
    pub issue_refresh_tokens: bool,
}

impl std::fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("token_lifetime", &self.token_lifetime)
            .field("issue_refresh_tokens", &self.issue_refresh_tokens)
            .finish()
    }
}

/// Counts of what the emulator served (`GET /__emulator/stats`).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Every request to the token endpoint, whatever its outcome.
    pub token_requests: u64,
    /// grant type → outcome (`ok`, an OAuth error code, or `fault`) → count.
    pub grants: BTreeMap<String, BTreeMap<String, u64>>,
    /// Requests answered by an injected fault.
    pub faults_injected: u64,
    /// Every request that reached the API side (`/v2/…`).
    pub api_requests: u64,
    pub api_ok: u64,
    pub api_unauthorized: u64,
}

impl Stats {
    /// Successful token responses for a grant type.
    pub fn ok(&self, grant: &str) -> u64 {
        self.grants.get(grant).and_then(|o| o.get("ok")).copied().unwrap_or(0)
    }
}

struct Inner {
    /// The client id and secret currently accepted.
    client_id: String,
    client_secret: SecretString,
    /// access token → expiry.
    access_tokens: HashMap<String, tokio::time::Instant>,
    /// Access tokens revoked before their expiry (the `revoke_current` fault).
    revoked: HashSet<String>,
    refresh_tokens: HashSet<String>,
    last_access_token: Option<String>,
    /// Every refresh token presented, in order (for leak tests).
    refresh_tokens_received: Vec<String>,
    faults: Faults,
    stats: Stats,
}

impl Inner {
    /// Applies a fault request: `revoke_current` at once, the rest as
    /// standing faults.
    fn apply_faults(&mut self, request: FaultRequest) {
        if request.revoke_current {
            self.revoke_last();
        }
        if let Some(token_id) = &request.revoke_token_id {
            self.revoke_id(token_id);
        }
        self.faults.apply(request);
    }

    /// Revokes the access token whose `token_id` is `token_id` (if any).
    fn revoke_id(&mut self, token_id: &str) {
        let found = self
            .access_tokens
            .keys()
            .find(|token| crate::fingerprint::token_id(token) == token_id)
            .cloned();
        if let Some(token) = found {
            tracing::info!(token_id, "emulator revoked a token");
            self.revoked.insert(token);
        }
    }

    /// Revokes the access token issued last (if any).
    fn revoke_last(&mut self) {
        if let Some(token) = self.last_access_token.clone() {
            tracing::info!(token_id = %crate::fingerprint::token_id(&token), "emulator revoked the current token");
            self.revoked.insert(token);
        }
    }
}

struct Shared {
    config: EmulatorConfig,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The emulator's state and routes. Cheap to clone.
#[derive(Clone)]
pub struct Emulator {
    shared: Arc<Shared>,
}

impl Emulator {
    pub fn new(config: EmulatorConfig) -> Self {
        let inner = Inner {
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.clone(),
            access_tokens: HashMap::new(),
            revoked: HashSet::new(),
            refresh_tokens: HashSet::new(),
            last_access_token: None,
            refresh_tokens_received: Vec::new(),
            faults: Faults::default(),
            stats: Stats::default(),
        };
        Self {
            shared: Arc::new(Shared {
                config,
                inner: Mutex::new(inner),
            }),
        }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/oauth2/token", post(oauth::token))
            .route("/v2/transactions", get(api::transactions))
            .route("/v2/_emulator/bytes/{n}", get(api::bytes))
            .route("/v2/_emulator/forbidden_scope", any(api::forbidden_scope))
            .route("/v2/{*path}", any(api::echo))
            .route("/__emulator/faults", post(faults::set).get(faults::get))
            .route("/__emulator/stats", get(stats))
            .route("/__emulator/credentials", post(set_credentials))
            .with_state(self.shared.clone())
    }

    pub fn stats(&self) -> Stats {
        self.shared.lock().stats.clone()
    }

    /// Every refresh token a client presented so far, in order.
    pub fn refresh_tokens_received(&self) -> Vec<String> {
        self.shared.lock().refresh_tokens_received.clone()
    }

    /// Accept this key from now on (the old one stops working).
    pub fn set_client(&self, client_id: &str, client_secret: &str) {
        let mut inner = self.shared.lock();
        inner.client_id = client_id.to_owned();
        inner.client_secret = client_secret.to_owned().into();
    }

    pub fn set_faults(&self, request: FaultRequest) {
        self.shared.lock().apply_faults(request);
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Binds `addr` and serves in a background task.
    pub async fn spawn(self, addr: SocketAddr) -> std::io::Result<RunningEmulator> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let emulator = self.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = self.serve(listener, std::future::pending()).await {
                tracing::error!(error = %e, "emulator stopped");
            }
        });
        Ok(RunningEmulator {
            addr,
            emulator,
            scheme: "http",
            task,
        })
    }

    /// Binds `addr` and serves HTTPS in a background task: HTTP/2 or
    /// HTTP/1.1 as the client's ALPN chooses, with `chain` and `key`. Needs
    /// no `.await`, so a test can add it to an emulator it already runs.
    pub fn spawn_tls(
        &self,
        addr: SocketAddr,
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> std::io::Result<RunningEmulator> {
        let invalid = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(invalid)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(invalid)?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let router = self.router();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, router) = (acceptor.clone(), router.clone());
                connections.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper_util::service::TowerToHyperService::new(router);
                    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(RunningEmulator {
            addr,
            emulator: self.clone(),
            scheme: "https",
            task,
        })
    }
}

/// An emulator serving in the background; stops when dropped.
pub struct RunningEmulator {
    pub addr: SocketAddr,
    pub emulator: Emulator,
    scheme: &'static str,
    task: JoinHandle<()>,
}

impl RunningEmulator {
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn token_url(&self) -> String {
        format!("{}/oauth2/token", self.base_url())
    }
}

impl Drop for RunningEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn stats(axum::extract::State(shared): axum::extract::State<Arc<Shared>>) -> axum::Json<Stats> {
    axum::Json(shared.lock().stats.clone())
}

#[derive(serde::Deserialize)]
struct NewClient {
    client_id: String,
    client_secret: String,
}

/// A JSON request body whatever its Content-Type: `curl -d` sends
/// `application/x-www-form-urlencoded`, and the documented examples must
/// work as written.
pub(crate) struct AnyJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for AnyJson<T> {
    type Rejection = (axum::http::StatusCode, String);

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let bad = |message: String| (axum::http::StatusCode::BAD_REQUEST, message);
        let body = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|e| bad(e.to_string()))?;
        serde_json::from_slice(&body)
            .map(AnyJson)
            .map_err(|e| bad(format!("invalid JSON body: {e}\n")))
    }
}

async fn set_credentials(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    AnyJson(client): AnyJson<NewClient>,
) -> axum::http::StatusCode {
    let mut inner = shared.lock();
    inner.client_id = client.client_id;
    inner.client_secret = client.client_secret.into();
    tracing::info!(client_id = %inner.client_id, "emulator credentials replaced");
    axum::http::StatusCode::NO_CONTENT
}
