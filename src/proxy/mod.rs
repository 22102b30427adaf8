//! The authorizing proxy face: a service points its Flute base URL at a
//! proxy listener of the broker and never handles a token. Each request is
//! checked ([`target`]: origin-form only, no path leaving the API base, no
//! hop-by-hop header or caller credential passed on), its caller checked
//! against the environment's allow-lists, and sent to the configured API
//! with the environment's current servable token. An API 401 for that
//! token causes one RefreshToken through the engine's coalesced path and,
//! when the body could be kept (`replay_limit_bytes`), one more send with
//! the new token: the caller sees only the second answer; unless a refresh
//! was just shown not to help ([`rotation`]: the 401 passes through as
//! `TOKEN_FRESH`). Nothing else is ever retried.
//!
//! A proxy face is served by [`crate::serve::serve`] like the API face:
//! the same budgets, deadlines, drain and handover.

mod counted;
mod idle;
mod rotation;
pub mod settings;
pub mod target;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{StatusCode, Version};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tracing::debug;

pub use settings::ProxyConfig;
use target::{ApiBase, BadTarget};

use crate::broker::{BrokerError, Core};
use crate::environment::Environment;
use crate::identity::Caller;
use crate::rpc_status::{ERROR_DOMAIN, status_response};
use crate::tls_roots::TrustRoots;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;
type UpstreamClient = Client<hyper_rustls::HttpsConnector<counted::Counted<HttpConnector>>, UpstreamBody>;

/// The response header that says why an API 401 reached the caller.
pub const NOT_RETRIED_HEADER: &str = "flute-broker-not-retried";

/// One environment's proxy: what each of its requests needs.
pub struct Proxy {
    environment: Environment,
    metrics: Arc<crate::metrics::Metrics>,
    core: Core,
    base: ApiBase,
    client: UpstreamClient,
    settings: ProxyConfig,
    /// Which API 401s may force a refresh.
    rotations: rotation::Rotations,
}

/// Why a proxy cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("environments.{environment}.proxy.api_url: {reason}")]
    ApiUrl { environment: Environment, reason: String },
    #[error("TLS for the API: {0}")]
    Tls(String),
}

impl Proxy {
    pub fn new(
        environment: Environment,
        settings: &ProxyConfig,
        core: Core,
        roots: &TrustRoots,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Arc<Self>, ProxyError> {
        let base = ApiBase::parse(settings.api_url(environment))
            .map_err(|reason| ProxyError::ApiUrl { environment, reason })?;
        let labels = crate::metrics::EnvLabels {
            environment: environment.as_str(),
        };
        let open = metrics.proxy_upstream_connections.get_or_create(&labels).clone();
        Ok(Arc::new(Self {
            environment,
            metrics,
            core,
            base,
            client: upstream_client(roots, open)?,
            rotations: rotation::Rotations::new(settings.fresh_token_age),
            settings: settings.clone(),
        }))
    }

    /// The face of one environment's proxy listeners.
    pub fn face(self: &Arc<Self>) -> crate::serve::Face {
        let router = axum::Router::new().fallback(forward).with_state(self.clone());
        crate::serve::Face {
            name: self.environment.proxy_face_name(),
            routes: tonic::service::Routes::from(router),
            max_request_bytes: self.settings.max_body_bytes,
            http1_screen: None,
            tls_http1: true,
        }
    }
}

/// A pooled client for the API: HTTP/2 where the API offers it by ALPN,
/// HTTP/1.1 keep-alive otherwise, TLS trusting `[oauth] tls_roots`; its
/// connections counted in `open`.
fn upstream_client(
    roots: &TrustRoots,
    open: prometheus_client::metrics::gauge::Gauge,
) -> Result<UpstreamClient, ProxyError> {
    let tls = roots.client_config().map_err(ProxyError::Tls)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(counted::Counted::new(http, open));
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .build(connector))
}

/// A request body ready to send: kept whole (it can be sent again), or
/// streamed through once.
enum Prepared {
    Kept(Bytes),
    Streamed(UpstreamBody),
}

impl Prepared {
    fn body(&mut self) -> UpstreamBody {
        match self {
            Prepared::Kept(bytes) => http_body_util::Full::new(bytes.clone())
                .map_err(|never| match never {})
                .boxed_unsync(),
            Prepared::Streamed(body) => std::mem::take(body),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Prepared::Kept(_))
    }
}

/// Reads up to `limit` bytes of `body`: all of it (kept), or the part read
/// followed by the rest as a stream. A pause of `idle` within the body
/// fails it ([`idle::Stalled`]).
async fn prepare(body: Body, limit: usize, idle: Duration) -> Result<Prepared, BoxError> {
    let mut body = Body::new(idle::IdleDeadline::new(body, idle));
    let mut kept: Vec<Bytes> = Vec::new();
    let mut size = 0usize;
    loop {
        match body.frame().await {
            None => {
                let mut all = bytes::BytesMut::with_capacity(size);
                for chunk in kept {
                    all.extend_from_slice(&chunk);
                }
                return Ok(Prepared::Kept(all.freeze()));
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    size += data.len();
                    kept.push(data);
                    if size > limit {
                        break;
                    }
                }
            }
        }
    }
    let head = futures_util::stream::iter(kept.into_iter().map(|d| Ok::<_, BoxError>(http_body::Frame::data(d))));
    let rest = futures_util::StreamExt::map(body.into_data_stream(), |r| {
        r.map(http_body::Frame::data).map_err(BoxError::from)
    });
    let stream = futures_util::StreamExt::chain(head, rest);
    Ok(Prepared::Streamed(
        http_body_util::StreamBody::new(stream).boxed_unsync(),
    ))
}

/// The reason the broker refused a proxied request itself, kept on the
/// answer for the audit record.
#[derive(Clone, Copy, Debug)]
struct Refusal(&'static str);

/// A proxy error answer: `google.rpc.Status` JSON with an ErrorInfo reason.
fn refuse(http: StatusCode, code: tonic::Code, reason: &'static str, message: &str) -> Response {
    let details = tonic_types::ErrorDetails::with_error_info(reason, ERROR_DOMAIN, std::collections::HashMap::new());
    use tonic_types::StatusExt;
    let mut response = status_response(http, &tonic::Status::with_error_details(code, message, details));
    response.extensions_mut().insert(Refusal(reason));
    response
}

/// An answer from the token side (403, 503…), with `Retry-After` on a 503.
fn broker_refusal(error: BrokerError) -> Response {
    let reason = error.reason();
    let mut response = error.into_response();
    response.extensions_mut().insert(Refusal(reason));
    if response.status() == StatusCode::SERVICE_UNAVAILABLE && !response.headers().contains_key(header::RETRY_AFTER) {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
    }
    response
}

async fn forward(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    let started = tokio::time::Instant::now();
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let caller = Caller::from_extensions(request.extensions());
    let (response, token_id) = proxy.handle(request, &caller).await;
    let class = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    let environment = proxy.environment.as_str();
    proxy
        .metrics
        .proxy_requests
        .get_or_create(&crate::metrics::ProxyLabels { environment, class })
        .inc();
    if let Some(label) = proxy.core.caller_label(&caller) {
        proxy
            .metrics
            .caller_proxy_requests
            .get_or_create(&crate::metrics::CallerLabels {
                caller: label.to_owned(),
                environment,
                outcome: class,
            })
            .inc();
    }
    debug!(environment = %proxy.environment, %method, path, status = response.status().as_u16(),
           duration_ms = started.elapsed().as_millis() as u64, token_id = token_id.as_deref().unwrap_or(""), "proxied");
    let refusal = response.extensions().get::<Refusal>().map(|r| r.0);
    let not_retried = response.headers().get(NOT_RETRIED_HEADER).and_then(|v| v.to_str().ok());
    let request_id = ["x-request-id", "request-id", "x-flute-request-id"]
        .iter()
        .find_map(|name| response.headers().get(*name).and_then(|v| v.to_str().ok()));
    proxy.core.audit().proxied(crate::audit::ProxiedCall {
        caller: &caller,
        environment: proxy.environment,
        method: method.as_str(),
        path: &path,
        status: Some(response.status().as_u16()),
        refusal: refusal.or(not_retried),
        duration: started.elapsed(),
        token_id: token_id.as_deref(),
        retried: response.extensions().get::<Retried>().is_some(),
        request_id,
    });
    response
}

/// Marks an answer to a request that was sent again with a new token.
#[derive(Clone, Copy, Debug)]
struct Retried;

impl Proxy {
    /// Answers one request; also the `token_id` it was sent with last.
    async fn handle(&self, request: Request, caller: &Caller) -> (Response, Option<String>) {
        let (mut parts, body) = request.into_parts();
        let uri = match target::upstream_uri(&self.base, &parts.method, parts.version, &parts.uri) {
            Ok(uri) => uri,
            Err(bad) => return (bad_target(bad), None),
        };
        let source = match self
            .core
            .authorize_proxy(self.environment, caller, &parts.method, parts.uri.path())
        {
            Ok(source) => source,
            Err(refused) => return (broker_refusal(refused), None),
        };
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.settings.max_body_bytes as u64) {
            return (too_large(self.settings.max_body_bytes), None);
        }
        let wait = self.core.request_wait();
        let token = match self.core.token_for_proxy(source, caller, wait).await {
            Ok(token) => token,
            Err(refused) => return (broker_refusal(refused), None),
        };
        let mut body = match prepare(body, self.settings.replay_limit_bytes, self.settings.idle_timeout).await {
            Ok(body) => body,
            Err(e) if is_too_large(&e) => return (too_large(self.settings.max_body_bytes), None),
            Err(e) if idle::is_stalled(e.as_ref()) => {
                let message = "the request body paused longer than proxy.idle_timeout";
                return (
                    refuse(
                        StatusCode::REQUEST_TIMEOUT,
                        tonic::Code::DeadlineExceeded,
                        "BODY_TIMEOUT",
                        message,
                    ),
                    None,
                );
            }
            Err(_) => {
                let message = "the request body could not be read";
                return (
                    refuse(
                        StatusCode::BAD_REQUEST,
                        tonic::Code::InvalidArgument,
                        "BODY_UNREADABLE",
                        message,
                    ),
                    None,
                );
            }
        };
        target::request_headers(&mut parts.headers);
        // The route as the API's 401s are remembered by: its path, never
        // the query.
        let route = parts.uri.path().to_owned();
        parts.uri = uri;
        // HTTP/1.1 to the API unless ALPN chooses HTTP/2 (hyper picks it).
        parts.version = Version::HTTP_11;
        parts.extensions = http::Extensions::new();
        let first = match self.send(&parts, body.body(), token.access_token()).await {
            Ok(response) => response,
            Err(answer) => return (answer, Some(token.token_id.clone())),
        };
        if first.status() != StatusCode::UNAUTHORIZED {
            return (self.relay(first), Some(token.token_id.clone()));
        }
        // The API rejected this token: unless a refresh was just shown not
        // to help, one refresh (coalesced with every other caller that saw
        // it rejected), then one more send.
        if self
            .rotations
            .on_unauthorized(&route, &token.token_id, tokio::time::Instant::now())
            == rotation::Verdict::Fresh
        {
            return (self.not_retried(first, "TOKEN_FRESH"), Some(token.token_id.clone()));
        }
        let refreshed = self
            .core
            .refresh_token(source, caller, &token.token_id, wait, "proxied 401")
            .await;
        let reason = match (&refreshed, body.replayable()) {
            (Ok(new), false) => {
                self.rotations
                    .not_replayed(&route, &new.token_id, tokio::time::Instant::now());
                "BODY_NOT_REPLAYABLE"
            }
            (Err(_), false) => "BODY_NOT_REPLAYABLE",
            (Err(_), true) => "REFRESH_FAILED",
            (Ok(new), true) => {
                let labels = crate::metrics::EnvLabels {
                    environment: self.environment.as_str(),
                };
                self.metrics.proxy_retried.get_or_create(&labels).inc();
                let second = match self.send(&parts, body.body(), new.access_token()).await {
                    Ok(response) => response,
                    Err(answer) => return (answer, Some(new.token_id.clone())),
                };
                if second.status() != StatusCode::UNAUTHORIZED {
                    let mut answer = self.relay(second);
                    answer.extensions_mut().insert(Retried);
                    return (answer, Some(new.token_id.clone()));
                }
                self.rotations
                    .rejected_again(&route, &new.token_id, tokio::time::Instant::now());
                return (self.not_retried(second, "REJECTED_AGAIN"), Some(new.token_id.clone()));
            }
        };
        (self.not_retried(first, reason), Some(token.token_id.clone()))
    }

    /// Sends one request to the API with `token`, within `request_timeout`.
    async fn send(
        &self,
        parts: &http::request::Parts,
        body: UpstreamBody,
        token: &str,
    ) -> Result<http::Response<hyper::body::Incoming>, Response> {
        let mut request = http::Request::new(body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = parts.uri.clone();
        *request.version_mut() = parts.version;
        *request.headers_mut() = parts.headers.clone();
        let mut bearer = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            refuse(
                StatusCode::BAD_GATEWAY,
                tonic::Code::Internal,
                "TOKEN_UNUSABLE",
                "the token cannot be sent in a header",
            )
        })?;
        bearer.set_sensitive(true);
        request.headers_mut().insert(header::AUTHORIZATION, bearer);
        if crate::telemetry::enabled() {
            // The API call continues the caller's trace (its request span).
            crate::telemetry::inject(&tracing::Span::current(), request.headers_mut());
        }
        let sent = tokio::time::Instant::now();
        match tokio::time::timeout(self.settings.request_timeout, self.client.request(request)).await {
            Ok(Ok(response)) => {
                let labels = crate::metrics::EnvLabels {
                    environment: self.environment.as_str(),
                };
                let took = sent.elapsed().as_secs_f64();
                self.metrics.proxy_upstream_latency.get_or_create(&labels).observe(took);
                Ok(response)
            }
            Ok(Err(e)) => {
                debug!(environment = %self.environment, error = %e, "the API could not be reached");
                Err(refuse(
                    StatusCode::BAD_GATEWAY,
                    tonic::Code::Unavailable,
                    "API_UNREACHABLE",
                    "the Flute API could not be reached",
                ))
            }
            Err(_) => Err(refuse(
                StatusCode::GATEWAY_TIMEOUT,
                tonic::Code::DeadlineExceeded,
                "API_TIMEOUT",
                "the Flute API did not answer within proxy.request_timeout",
            )),
        }
    }
}

fn bad_target(bad: BadTarget) -> Response {
    match bad {
        BadTarget::OutsideApi => refuse(
            StatusCode::FORBIDDEN,
            tonic::Code::PermissionDenied,
            crate::broker::reason::ROUTE_NOT_ALLOWED,
            bad.message(),
        ),
        _ => refuse(
            StatusCode::BAD_REQUEST,
            tonic::Code::InvalidArgument,
            "INVALID_TARGET",
            bad.message(),
        ),
    }
}

fn too_large(limit: usize) -> Response {
    refuse(
        StatusCode::PAYLOAD_TOO_LARGE,
        tonic::Code::ResourceExhausted,
        "BODY_TOO_LARGE",
        &format!("the request body is larger than proxy.max_body_bytes ({limit})"),
    )
}

/// Whether a body error is the request limit's (RESOURCE_EXHAUSTED).
fn is_too_large(error: &BoxError) -> bool {
    idle::find_source::<tonic::Status>(error.as_ref()).is_some_and(|s| s.code() == tonic::Code::ResourceExhausted)
}

impl Proxy {
    /// The API's answer as the caller gets it: hop-by-hop headers removed,
    /// the body streamed (cut off after a pause of `idle_timeout`).
    fn relay(&self, response: http::Response<hyper::body::Incoming>) -> Response {
        let (mut parts, body) = response.into_parts();
        target::strip_hop_by_hop(&mut parts.headers);
        Response::from_parts(
            parts,
            Body::new(idle::IdleDeadline::new(body, self.settings.idle_timeout)),
        )
    }

    /// An API 401 passed through: `reason` in the response header and in
    /// `proxy_not_retried`.
    fn not_retried(&self, response: http::Response<hyper::body::Incoming>, reason: &'static str) -> Response {
        let labels = crate::metrics::NotRetriedLabels {
            environment: self.environment.as_str(),
            reason,
        };
        self.metrics.proxy_not_retried.get_or_create(&labels).inc();
        let mut response = self.relay(response);
        response
            .headers_mut()
            .insert(NOT_RETRIED_HEADER, HeaderValue::from_static(reason));
        response
    }
}
