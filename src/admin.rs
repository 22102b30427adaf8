//! The admin HTTP listener: `/metrics` (Prometheus text), `/healthz` (the
//! process is alive and every token source task runs: independent of the
//! token endpoint, so an outage never triggers restarts) and `/readyz` (every enabled environment holds a
//! valid token).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::time::Instant;

use crate::metrics::{EnvLabels, Metrics};
use crate::serve::Face;
use crate::token::TokenSources;

/// `[admin]`: where the admin HTTP listener binds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `IP:PORT`; `None` (written `""`) disables the listener.
    #[serde(serialize_with = "write_listen", deserialize_with = "read_listen")]
    pub listen: Option<SocketAddr>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
        }
    }
}

impl AdminConfig {
    /// `IP:PORT`, or `""` for no listener (the `--admin-listen` syntax too).
    pub fn parse_listen(text: &str) -> Result<Option<SocketAddr>, String> {
        match text.trim() {
            "" => Ok(None),
            text => text
                .parse()
                .map(Some)
                .map_err(|_| format!("{text:?}: expected IP:PORT, or \"\" to disable")),
        }
    }
}

fn read_listen<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<SocketAddr>, D::Error> {
    AdminConfig::parse_listen(&String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
}

fn write_listen<S: Serializer>(listen: &Option<SocketAddr>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&listen.map(|a| a.to_string()).unwrap_or_default())
}

#[derive(Clone)]
struct AdminState {
    sources: Arc<TokenSources>,
    metrics: Arc<Metrics>,
}

/// The admin face: served by [`crate::serve::serve`] like the API, under
/// the same budgets and deadlines, without TLS.
pub fn face(sources: Arc<TokenSources>, metrics: Arc<Metrics>) -> Face {
    Face {
        name: "admin",
        routes: tonic::service::Routes::from(router(sources, metrics)),
        max_request_bytes: 16 * 1024,
        http1_screen: None,
        tls_http1: false,
    }
}

pub fn router(sources: Arc<TokenSources>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(live))
        .route("/readyz", get(ready))
        .with_state(AdminState { sources, metrics })
}

async fn metrics_text(State(state): State<AdminState>) -> impl IntoResponse {
    let now = Instant::now();
    for source in state.sources.iter() {
        let labels = EnvLabels {
            environment: source.environment().as_str(),
        };
        let token = source.current();
        let left = token.as_ref().map(|t| t.remaining(now).as_secs_f64()).unwrap_or(0.0);
        state.metrics.seconds_until_expiry.get_or_create(&labels).set(left);
        state
            .metrics
            .token_valid
            .get_or_create(&labels)
            .set(token.is_some() as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// Liveness: the process serves and every token source task runs. Never
/// about the token endpoint (an outage must not restart the broker).
async fn live(State(state): State<AdminState>) -> impl IntoResponse {
    if state.sources.all_running() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "a token source task stopped: restart the broker\n",
        )
    }
}

async fn ready(State(state): State<AdminState>) -> impl IntoResponse {
    let lines: Vec<String> = state
        .sources
        .iter()
        .map(|s| {
            format!(
                "{}: {}",
                s.environment(),
                if s.current().is_some() {
                    "ready"
                } else {
                    "no valid token"
                }
            )
        })
        .collect();
    let status = if state.sources.all_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, lines.join("\n") + "\n")
}
