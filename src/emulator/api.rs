//! The emulated Flute API: what a caller (or the broker's proxy) reaches
//! with a bearer token.
//!
//! - `GET /v2/transactions`: a fixed list of two transactions.
//! - `GET /v2/_emulator/bytes/{n}`: `n` bytes (zeros), streamed, for tests
//!   of large responses.
//! - any method on `/v2/_emulator/forbidden_scope`: 401 whatever the token,
//!   with `WWW-Authenticate: Bearer error="insufficient_scope"` (a route
//!   the key may not use: no new token helps).
//! - any other method and path under `/v2/`: an echo of the request as JSON
//!   (`method`, `path`, `query`, `body_bytes`, `body_sha256`, the `headers`
//!   it arrived with, and the `token_id` of the bearer token it carried,
//!   never the token: the `authorization` header is not echoed). The body is
//!   read as a stream and only hashed.
//!
//! Every route answers 401 with a `WWW-Authenticate: Bearer` challenge for a
//! missing, unknown, expired or revoked token (the `revoke_current` and `revoke_token_id` faults),
//! and waits `api_delay_ms` (a fault) before answering.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::Shared;

/// Largest `n` of the bytes route (1 GiB).
const MAX_BYTES: u64 = 1 << 30;

/// Why a request's bearer token is not accepted.
#[derive(Clone, Copy, Debug)]
enum Rejected {
    Missing,
    Unknown,
    Expired,
    Revoked,
}

impl Rejected {
    fn description(self) -> &'static str {
        match self {
            Rejected::Missing => "no bearer token",
            Rejected::Unknown => "The token is not valid",
            Rejected::Expired => "The token expired",
            Rejected::Revoked => "The token was revoked",
        }
    }
}

/// Checks the bearer token (counting the outcome) after the API delay
/// fault; `Ok` with the token's `token_id`.
async fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<String, Response> {
    let delay = Duration::from_millis(shared.lock().faults.api_delay_ms);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let mut inner = shared.lock();
    inner.stats.api_requests += 1;
    let verdict = match bearer {
        None => Err(Rejected::Missing),
        Some(token) if inner.revoked.contains(token) => Err(Rejected::Revoked),
        Some(token) => match inner.access_tokens.get(token) {
            Some(expires) if *expires > Instant::now() => Ok(crate::fingerprint::token_id(token)),
            Some(_) => Err(Rejected::Expired),
            None => Err(Rejected::Unknown),
        },
    };
    match verdict {
        Ok(token_id) => {
            inner.stats.api_ok += 1;
            Ok(token_id)
        }
        Err(rejected) => {
            inner.stats.api_unauthorized += 1;
            Err(unauthorized(rejected))
        }
    }
}

fn unauthorized(rejected: Rejected) -> Response {
    let description = rejected.description();
    let challenge = format!("Bearer error=\"invalid_token\", error_description=\"{description}\"");
    let mut response = (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({"error": "invalid_token", "error_description": description})),
    )
        .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_str(&challenge).expect("ascii"),
    );
    response
}

pub(super) async fn transactions(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(refused) = authorize(&shared, &headers).await {
        return refused;
    }
    let body = json!({"transactions": [
        {"id": "txn_0001", "amount": 1250, "currency": "USD", "status": "settled"},
        {"id": "txn_0002", "amount": 990, "currency": "USD", "status": "pending"}
    ]});
    (StatusCode::OK, axum::Json(body)).into_response()
}

pub(super) async fn forbidden_scope(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(refused) = authorize(&shared, &headers).await {
        return refused;
    }
    let mut response = (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({"error": "insufficient_scope", "error_description": "this key may not use this route"})),
    )
        .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"insufficient_scope\""),
    );
    response
}

pub(super) async fn bytes(State(shared): State<Arc<Shared>>, Path(n): Path<u64>, headers: HeaderMap) -> Response {
    if let Err(refused) = authorize(&shared, &headers).await {
        return refused;
    }
    if n > MAX_BYTES {
        return (StatusCode::BAD_REQUEST, format!("at most {MAX_BYTES} bytes\n")).into_response();
    }
    const CHUNK: u64 = 64 * 1024;
    let zeros = bytes::Bytes::from(vec![0u8; CHUNK as usize]);
    let chunks = futures_util::stream::unfold(n, move |left| {
        let zeros = zeros.clone();
        async move {
            (left > 0).then(|| {
                let take = left.min(CHUNK);
                (Ok::<_, std::io::Error>(zeros.slice(..take as usize)), left - take)
            })
        }
    });
    let mut response = Response::new(Body::from_stream(chunks));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    response
}

pub(super) async fn echo(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let token_id = match authorize(&shared, &parts.headers).await {
        Ok(id) => id,
        Err(refused) => return refused,
    };
    let mut digest = Sha256::new();
    let mut body_bytes: u64 = 0;
    let mut body = body.into_data_stream();
    while let Some(chunk) = futures_util::StreamExt::next(&mut body).await {
        match chunk {
            Ok(data) => {
                body_bytes += data.len() as u64;
                digest.update(&data);
            }
            Err(e) => return (StatusCode::BAD_REQUEST, format!("reading the body: {e}\n")).into_response(),
        }
    }
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        if name == header::AUTHORIZATION {
            continue;
        }
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let hex: String = digest.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let body = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "body_bytes": body_bytes,
        "body_sha256": hex,
        "headers": headers,
        "token_id": token_id,
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}
