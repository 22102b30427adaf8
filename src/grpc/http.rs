//! The HTTP/JSON face of the TokenBroker service, for callers without a
//! gRPC stack (`curl`, PHP, shell): GetToken, RefreshToken and GetStatus at
//! the paths `proto/flute/tokenbroker/v1/token_broker_http.yaml` declares
//! (a gRPC API configuration; tested equal), served on the gRPC
//! listeners (HTTP/1.1 and HTTP/2; a request that is not gRPC is routed
//! here by its path). Each handler calls the same service logic as gRPC
//! with the same caller; errors are the same [`BrokerError`], answered as
//! HTTP by its one mapping.
//!
//! The safeguards of the cloud metadata servers apply to every request:
//! the header `Flute-Broker: true` is required (an SSRF through an
//! application cannot add it), a request that came through a proxy
//! (`X-Forwarded-For`, `Forwarded`) or a CORS preflight is refused, and no
//! answer carries CORS headers or may be cached.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

use super::MAX_REQUEST_BYTES;
use super::service::{Protocol, Rpc, TokenBrokerService};
use crate::broker::BrokerError;
use crate::environment::Environment;
use crate::identity::Caller;
use crate::token::{Snapshot, Token, TokenSourceHandle};
use crate::wire::pb;

/// The routes, as the API configuration's HTTP rules declare them.
pub const GET_TOKEN: &str = "/v1/environments/{environment}/token";
pub const REFRESH_TOKEN: &str = "/v1/environments/{environment}/token:refresh";
pub const GET_STATUS: &str = "/v1/status";

/// The header every request must carry, and its value.
pub const REQUIRED_HEADER: &str = "flute-broker";

/// Longest `timeout_sec` of a long poll; longer values are shortened.
pub const MAX_LONG_POLL: Duration = Duration::from_secs(300);
/// A long poll's timeout when the request names none.
pub const DEFAULT_LONG_POLL: Duration = Duration::from_secs(60);

/// The HTTP routes, guarded; merged with the gRPC routes by the daemon.
pub fn router(service: TokenBrokerService) -> Router {
    Router::new()
        .route(GET_TOKEN, axum::routing::get(get_token))
        .route(REFRESH_TOKEN, axum::routing::post(refresh_token))
        .route(GET_STATUS, axum::routing::get(get_status))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(service)
}

/// gRPC only over HTTP/2 (the API face's HTTP/1.x screen): a request with
/// a gRPC content type that came over HTTP/1.x is refused (403,
/// `REQUEST_REFUSED`) before any route runs. No gRPC client speaks
/// HTTP/1.1, but an application that can be made to send a POST with
/// chosen headers (a webhook, a request forgery) can; so every HTTP/1.x
/// request passes the HTTP face's safeguards.
pub fn grpc_over_http1(headers: &HeaderMap) -> Option<http::Response<tonic::body::Body>> {
    is_grpc(headers).then(|| {
        BrokerError::RequestRefused("gRPC is served over HTTP/2 only; over HTTP/1.1 use the HTTP/JSON routes")
            .into_response()
            .map(tonic::body::Body::new)
    })
}

/// Whether a request says it carries gRPC (`application/grpc`, `+proto`,
/// `-web`, any suffix).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// For requests no route takes: gRPC ones get gRPC's UNIMPLEMENTED (as
/// tonic would answer), anything else a 404 JSON Status.
pub async fn fallback(request: Request) -> Response {
    if is_grpc(request.headers()) {
        return tonic::Status::unimplemented("")
            .into_http::<axum::body::Body>()
            .into_response();
    }
    BrokerError::UnknownRoute(format!("{} {}", request.method(), request.uri().path())).into_response()
}

async fn method_not_allowed(request: Request) -> Response {
    if let Err(refused) = safeguards(&request) {
        return refused.into_response();
    }
    BrokerError::MethodNotAllowed(request.method().to_string()).into_response()
}

/// The metadata-server safeguards, checked first by every route (and by
/// the method-not-allowed answer, so a CORS preflight gets 403): a plain
/// function rather than a middleware layer, which would cost every request
/// a boxed service.
fn safeguards(request: &Request) -> Result<(), BrokerError> {
    let headers = request.headers();
    let refused = if headers.contains_key("x-forwarded-for") || headers.contains_key(header::FORWARDED) {
        Some("requests that came through a proxy (X-Forwarded-For or Forwarded) are refused: call the broker directly")
    } else if request.method() == Method::OPTIONS {
        Some("cross-origin requests are not served: this API sends no CORS headers")
    } else if !headers
        .get(REQUIRED_HEADER)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
    {
        Some("the header `Flute-Broker: true` is required")
    } else {
        None
    };
    match refused {
        Some(why) => Err(BrokerError::RequestRefused(why)),
        None => Ok(()),
    }
}

/// The environment in a path: `sandbox`, `production` (or the enum's names).
fn environment(name: &str) -> Result<Environment, BrokerError> {
    match name {
        "ENVIRONMENT_SANDBOX" => Ok(Environment::Sandbox),
        "ENVIRONMENT_PRODUCTION" => Ok(Environment::Production),
        other => other
            .parse::<Environment>()
            .map_err(|_| BrokerError::UnspecifiedEnvironment),
    }
}

/// A Duration in a query: the proto3 JSON form (`60s`, `1.5s`) or the
/// configuration's (`5m`, `90`).
fn duration(field: &'static str, text: &str) -> Result<Duration, BrokerError> {
    let invalid = || BrokerError::InvalidArgument {
        field,
        message: format!("{text:?} is not a duration (60s, 1.5s, 5m)"),
    };
    if let Some(seconds) = text.strip_suffix('s').and_then(|s| s.parse::<f64>().ok()) {
        return Duration::try_from_secs_f64(seconds).map_err(|_| invalid());
    }
    crate::duration::parse(text).map_err(|_| invalid())
}

async fn get_token(
    State(service): State<TokenBrokerService>,
    Path(env): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> Response {
    if let Err(refused) = safeguards(&request) {
        return refused.into_response();
    }
    let http1 = request.version() < http::Version::HTTP_2;
    // Everything that reads the request's connection happens before the
    // first await (the request body is not Sync): the one access check,
    // and a long poll's held-request slot.
    let caller = Caller::from_extensions(request.extensions());
    let admitted = environment(&env)
        .and_then(|env| service.core().authorize(env, &caller))
        .and_then(|source| {
            let long_poll = query.get("wait_for_change").is_some_and(|v| v == "true");
            let held = match long_poll {
                true => Some(crate::serve::guard::hold(request.extensions())?),
                false => None,
            };
            Ok((source.clone(), held))
        });
    drop(request);
    let result = async {
        let (source, held) = admitted?;
        let min_remaining = query
            .get("min_remaining")
            .map(|d| duration("min_remaining", d))
            .transpose()?;
        if let Some(_held) = held {
            wait_for_change(&service, &source, &query).await?;
        }
        service
            .core()
            .get_token(&source, &caller, min_remaining, || service.core().request_wait())
            .await
    }
    .await;
    service.count(Protocol::Http, Rpc::GetToken, &result);
    match result {
        Ok(served) => token_answer(&served.token, served.at),
        // An HTTP/1.1 connection refused a long poll is closed, so that a
        // caller opening one connection per poll frees its slot at once.
        Err(error @ BrokerError::HeldLimit { .. }) if http1 => {
            let mut response = error.into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
        Err(error) => error.into_response(),
    }
}

/// The long poll: returns once the state differs from `last_etag` (a
/// rotation, or an outage), at `timeout_sec`, or when the broker drains.
async fn wait_for_change(
    service: &TokenBrokerService,
    source: &TokenSourceHandle,
    query: &HashMap<String, String>,
) -> Result<(), BrokerError> {
    let timeout = match query.get("timeout_sec") {
        Some(t) => Duration::from_secs(t.parse::<u64>().map_err(|_| BrokerError::InvalidArgument {
            field: "timeout_sec",
            message: format!("{t:?} is not a whole number of seconds"),
        })?),
        None => DEFAULT_LONG_POLL,
    }
    .min(MAX_LONG_POLL);
    let last = query.get("last_etag").map(|e| e.trim_matches('"').to_owned());
    let current = |s: &Snapshot| s.servable(tokio::time::Instant::now()).map(|t| t.token_id.clone());
    let mut snapshots = source.subscribe();
    let changed = snapshots.wait_for(|s| current(s) != last);
    tokio::select! {
        _ = changed => {}
        _ = tokio::time::sleep(timeout) => {}
        _ = service.core().draining().cancelled() => {}
    }
    Ok(())
}

async fn refresh_token(
    State(service): State<TokenBrokerService>,
    Path(env): Path<String>,
    request: Request,
) -> Response {
    if let Err(refused) = safeguards(&request) {
        return refused.into_response();
    }
    let caller = Caller::from_extensions(request.extensions());
    let admitted = environment(&env)
        .and_then(|env| service.core().authorize(env, &caller))
        .cloned();
    let result = async {
        let source = admitted?;
        let body = axum::body::to_bytes(request.into_body(), MAX_REQUEST_BYTES)
            .await
            .map_err(|e| BrokerError::InvalidArgument {
                field: "body",
                message: format!("cannot read the body: {e}"),
            })?;
        let request: pb::RefreshTokenRequest = from_json("RefreshTokenRequest", &body)?;
        service
            .core()
            .refresh_token(
                &source,
                &caller,
                &request.rejected_token_id,
                service.core().request_wait(),
                "RefreshToken (HTTP)",
            )
            .await
    }
    .await;
    service.count(Protocol::Http, Rpc::RefreshToken, &result);
    match result {
        Ok(token) => token_answer(&token, tokio::time::Instant::now()),
        Err(error) => error.into_response(),
    }
}

async fn get_status(State(service): State<TokenBrokerService>, request: Request) -> Response {
    if let Err(refused) = safeguards(&request) {
        return refused.into_response();
    }
    let caller = Caller::from_extensions(request.extensions());
    let reply = service.core().status(&caller);
    service.count::<()>(Protocol::Http, Rpc::GetStatus, &Ok(()));
    let mut response = json("GetStatusResponse", &reply).into_response();
    no_store(response.headers_mut());
    response
}

/// A token answer (GetTokenResponse and RefreshTokenResponse have the same
/// shape): the JSON, `ETag` (the token_id), never cached.
fn token_answer(token: &Token, at: tokio::time::Instant) -> Response {
    let (json, etag) = token_response_json_and_etag(token, at);
    let mut response = JsonBody(json.into_bytes()).into_response();
    let headers = response.headers_mut();
    no_store(headers);
    if let Some(etag) = etag {
        headers.insert(header::ETAG, etag);
    }
    response
}

fn no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// `{"token": …}` in the proto3 JSON mapping, written directly from the
/// token (its `serveFor` measured at `now`): the hot path of the HTTP read.
/// It is the same text prost-reflect writes from the descriptors for the
/// wire message (a test compares them); the other messages go through
/// [`json`].
pub fn token_response_json(token: &Token, now: tokio::time::Instant) -> String {
    token_response_json_and_etag(token, now).0
}

/// What stays the same for every answer with one token: the JSON up to
/// `serveFor` and the `ETag`. Written once per token and thread (one entry
/// per environment), so an answer costs one copy and the `serveFor` field.
struct FixedPart {
    environment: crate::environment::Environment,
    token_id: String,
    issued_at: std::time::SystemTime,
    expires_at: std::time::SystemTime,
    json: String,
    etag: Option<HeaderValue>,
}

impl FixedPart {
    fn is_for(&self, token: &Token) -> bool {
        self.environment == token.environment
            && self.token_id == token.token_id
            && self.issued_at == token.issued_at_wall
            && self.expires_at == token.expires_at_wall
    }

    fn of(token: &Token) -> Self {
        let mut json = String::with_capacity(256);
        json.push_str("{\"token\":{");
        let mut first = true;
        let mut field = |name: &str, value: &str| {
            if value.is_empty() {
                return;
            }
            if !first {
                json.push(',');
            }
            first = false;
            json.push('"');
            json.push_str(name);
            json.push_str("\":");
            push_json_string(&mut json, value);
        };
        field("accessToken", token.access_token());
        field("tokenType", &token.token_type);
        field(
            "issuedAt",
            &json_timestamp(&crate::wire::unix_timestamp(token.issued_at_unix)),
        );
        field(
            "expiresAt",
            &json_timestamp(&crate::wire::unix_timestamp(token.expires_at_unix)),
        );
        field("environment", pb::Environment::from(token.environment).as_str_name());
        field("tokenId", &token.token_id);
        FixedPart {
            environment: token.environment,
            token_id: token.token_id.clone(),
            issued_at: token.issued_at_wall,
            expires_at: token.expires_at_wall,
            json,
            etag: HeaderValue::from_str(&format!("\"{}\"", token.token_id)).ok(),
        }
    }
}

fn token_response_json_and_etag(token: &Token, now: tokio::time::Instant) -> (String, Option<HeaderValue>) {
    thread_local! {
        static FIXED: std::cell::RefCell<Vec<FixedPart>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    FIXED.with_borrow_mut(|cache| {
        let at = match cache.iter().position(|f| f.is_for(token)) {
            Some(at) => at,
            None => {
                // One entry per environment: a new token replaces its predecessor.
                cache.retain(|f| f.environment != token.environment);
                cache.push(FixedPart::of(token));
                cache.len() - 1
            }
        };
        let fixed = &cache[at];
        let serve_for = crate::rpc_status::json_duration(token.serve_until.saturating_duration_since(now));
        let mut out = String::with_capacity(fixed.json.len() + serve_for.len() + 16);
        out.push_str(&fixed.json);
        out.push_str(",\"serveFor\":\"");
        out.push_str(&serve_for);
        out.push_str("\"}}");
        (out, fixed.etag.clone())
    })
}

/// `value` as a JSON string (quotes, and the escapes JSON requires).
fn push_json_string(out: &mut String, value: &str) {
    use std::fmt::Write;
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A Timestamp in the proto3 JSON form: RFC 3339 in UTC with 0, 3, 6 or 9
/// fractional digits.
fn json_timestamp(t: &prost_types::Timestamp) -> String {
    let at = std::time::UNIX_EPOCH
        + Duration::from_secs(t.seconds.max(0) as u64)
        + Duration::from_nanos(t.nanos.max(0) as u64);
    let full = humantime::format_rfc3339_nanos(at).to_string();
    let (seconds, _) = full.split_at(19);
    let nanos = t.nanos.max(0) as u32;
    match nanos {
        0 => format!("{seconds}Z"),
        n if n % 1_000_000 == 0 => format!("{seconds}.{:03}Z", n / 1_000_000),
        n if n % 1_000 == 0 => format!("{seconds}.{:06}Z", n / 1_000),
        n => format!("{seconds}.{n:09}Z"),
    }
}

/// The descriptors of flute.tokenbroker.v1, for the proto3 JSON mapping.
static POOL: LazyLock<DescriptorPool> =
    LazyLock::new(|| DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET).expect("the build's own descriptor set decodes"));

/// A message as proto3 JSON (camelCase names, enums by name, Timestamp and
/// Duration as strings, 64-bit integers as strings, defaults omitted).
struct JsonBody(Vec<u8>);

impl IntoResponse for JsonBody {
    fn into_response(self) -> Response {
        ([(header::CONTENT_TYPE, "application/json")], self.0).into_response()
    }
}

fn descriptor(name: &str) -> prost_reflect::MessageDescriptor {
    POOL.get_message_by_name(&format!("flute.tokenbroker.v1.{name}"))
        .expect("every message of the API is in the descriptor set")
}

fn json(name: &str, message: &impl prost::Message) -> JsonBody {
    let dynamic = DynamicMessage::decode(descriptor(name), message.encode_to_vec().as_slice())
        .expect("a message the broker built decodes as itself");
    let mut out = Vec::with_capacity(256);
    let mut serializer = serde_json::Serializer::new(&mut out);
    dynamic
        .serialize_with_options(&mut serializer, &SerializeOptions::new())
        .expect("a message serializes to JSON");
    JsonBody(out)
}

fn from_json<M: prost::Message + Default>(name: &str, body: &[u8]) -> Result<M, BrokerError> {
    let invalid = |message: String| BrokerError::InvalidArgument { field: "body", message };
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let dynamic = DynamicMessage::deserialize(descriptor(name), &mut deserializer)
        .map_err(|e| invalid(format!("not a {name} in JSON: {e}")))?;
    dynamic.transcode_to::<M>().map_err(|e| invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written token JSON is exactly the descriptor-driven proto3
    /// JSON of the wire message, across fractional-second shapes.
    #[test]
    fn token_json_is_the_proto3_mapping() {
        use secrecy::SecretString;
        let shapes = [0, 5_000_000, 120_000, 123_456_789, 999_999_999];
        let now = tokio::time::Instant::now();
        for (i, nanos) in shapes.into_iter().enumerate() {
            let issued_wall = std::time::UNIX_EPOCH + Duration::new(1_764_556_800 + i as u64, nanos);
            let lifetime = Duration::new(900, shapes[(i + 1) % shapes.len()]);
            let environment = [Environment::Sandbox, Environment::Production][i % 2];
            let token = Token::new(
                SecretString::from(format!("tok-{i}-\"quoted\"/+=\\\n\t\u{8}\u{c}\u{1}é")),
                "Bearer".into(),
                environment,
                now - Duration::from_millis(i as u64 * 1_234),
                issued_wall,
                lifetime,
                Duration::from_secs(5),
            );
            let reply = pb::GetTokenResponse {
                token: Some(crate::wire::pb_token(&token, now)),
            };
            let expected = String::from_utf8(json("GetTokenResponse", &reply).0).unwrap();
            assert_eq!(token_response_json(&token, now), expected);
        }
    }
}
