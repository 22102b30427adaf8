//! The emulated token endpoint.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use rand::RngCore;
use secrecy::ExposeSecret;
use serde_json::json;
use tokio::time::Instant;

use super::Shared;
use super::faults::Injected;

pub(super) async fn token(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let params: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let grant = param(&params, "grant_type").unwrap_or("missing").to_owned();
    let grant_label = match grant.as_str() {
        "client_credentials" | "refresh_token" => grant.clone(),
        _ => "other".to_owned(),
    };
    let (delay, injected) = {
        let mut inner = shared.lock();
        inner.stats.token_requests += 1;
        if let Some(refresh) = param(&params, "refresh_token") {
            inner.refresh_tokens_received.push(refresh.to_owned());
        }
        inner.faults.next()
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let response = match injected {
        Some(Injected::Fail {
            status,
            retry_after,
            error,
            echo,
        }) => {
            let echoed = echo.then(|| echo_text(&headers, &body));
            Outcome::Fault(fault_response(status, retry_after, error, echoed))
        }
        Some(Injected::Malformed) => Outcome::Fault(
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                "{\"access_token\": ",
            )
                .into_response(),
        ),
        Some(Injected::SameToken) => handle(&shared, &headers, &params, true),
        None => handle(&shared, &headers, &params, false),
    };
    let (outcome, response) = match response {
        Outcome::Ok(r) => ("ok".to_owned(), r),
        Outcome::Error(code, r) => (code.to_owned(), r),
        Outcome::Fault(r) => ("fault".to_owned(), r),
    };
    let mut inner = shared.lock();
    if outcome == "fault" {
        inner.stats.faults_injected += 1;
    }
    *inner
        .stats
        .grants
        .entry(grant_label.clone())
        .or_default()
        .entry(outcome.clone())
        .or_default() += 1;
    tracing::info!(grant = %grant_label, outcome = %outcome, status = response.status().as_u16(), "emulator token request");
    response
}

enum Outcome {
    Ok(Response),
    Error(&'static str, Response),
    Fault(Response),
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn oauth_error(status: StatusCode, code: &'static str, description: &str) -> Outcome {
    let mut response = (
        status,
        no_store(),
        axum::Json(json!({"error": code, "error_description": description})),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        let challenge = format!("Basic realm=\"flute-emulator\", error=\"{code}\"");
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_str(&challenge).expect("ascii"),
        );
    }
    Outcome::Error(code, response)
}

fn no_store() -> [(header::HeaderName, &'static str); 2] {
    [(header::CACHE_CONTROL, "no-store"), (header::PRAGMA, "no-cache")]
}

/// The request as a debugging proxy would quote it: every header, then the body.
fn echo_text(headers: &HeaderMap, body: &[u8]) -> String {
    let mut text = String::from("POST /oauth2/token;");
    for (name, value) in headers {
        text.push_str(&format!(" {name}: {};", String::from_utf8_lossy(value.as_bytes())));
    }
    text.push_str(&format!(" body: {}", String::from_utf8_lossy(body)));
    text
}

fn fault_response(status: u16, retry_after: Option<u64>, error: Option<String>, echo: Option<String>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut response = match (error, &echo) {
        (code, Some(echo)) => (
            status,
            axum::Json(json!({"error": code.unwrap_or_else(|| "invalid_request".into()), "error_description": echo})),
        )
            .into_response(),
        (Some(code), None) => (
            status,
            axum::Json(json!({"error": code, "error_description": "injected by the emulator"})),
        )
            .into_response(),
        (None, None) => (status, "injected fault").into_response(),
    };
    if let Some(echo) = echo.filter(|_| status == StatusCode::UNAUTHORIZED) {
        let quoted = echo.replace(['"', '\\'], "'");
        let challenge =
            format!("Basic realm=\"flute-emulator\", error=\"invalid_client\", error_description=\"{quoted}\"");
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
        }
    }
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// The client (id, secret) from Basic auth or the form; never both.
#[allow(clippy::result_large_err)] // a cold path of a test server
fn client_credentials(headers: &HeaderMap, params: &[(String, String)]) -> Result<(String, String), Outcome> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "));
    let form_secret = param(params, "client_secret");
    match (basic, form_secret) {
        (Some(_), Some(_)) => Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "more than one client authentication method",
        )),
        (Some(encoded), None) => {
            let bad = || {
                oauth_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "malformed Basic credentials",
                )
            };
            let raw = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|_| bad())?;
            let joined = String::from_utf8(raw).map_err(|_| bad())?;
            let (id, secret) = joined.split_once(':').ok_or_else(bad)?;
            // RFC 6749 §2.3.1: both parts are form-urlencoded.
            let decode = |s: &str| {
                form_urlencoded::parse(format!("v={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            };
            Ok((decode(id), decode(secret)))
        }
        (None, Some(secret)) => match param(params, "client_id") {
            Some(id) => Ok((id.to_owned(), secret.to_owned())),
            None => Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "The mandatory 'client_id' parameter is missing.",
            )),
        },
        (None, None) => Err(oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication is required",
        )),
    }
}

fn handle(shared: &Shared, headers: &HeaderMap, params: &[(String, String)], same_token: bool) -> Outcome {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type.starts_with("application/x-www-form-urlencoded") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Content-Type must be application/x-www-form-urlencoded",
        );
    }
    let mut names: Vec<&str> = params.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "a parameter is repeated");
    }
    let (id, secret) = match client_credentials(headers, params) {
        Ok(c) => c,
        Err(outcome) => return outcome,
    };
    let config = &shared.config;
    let mut inner = shared.lock();
    if id != inner.client_id || secret != inner.client_secret.expose_secret() {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    }
    match param(params, "grant_type") {
        None => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "The mandatory 'grant_type' parameter is missing.",
            );
        }
        Some("client_credentials") => {
            if param(params, "scope").is_some_and(|scope| scope.split(' ').any(|s| s != "offline_access")) {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    "only offline_access is supported",
                );
            }
        }
        Some("refresh_token") => match param(params, "refresh_token") {
            None => {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "The mandatory 'refresh_token' parameter is missing.",
                );
            }
            Some(refresh) => {
                if !inner.refresh_tokens.remove(refresh) {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "refresh token is invalid, expired or already used",
                    );
                }
            }
        },
        Some(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "supported: client_credentials, refresh_token",
            );
        }
    }

    let lifetime = config.token_lifetime.max(Duration::from_secs(1));
    let now = Instant::now();
    inner.access_tokens.retain(|_, expires| *expires > now);
    let access = match (&inner.last_access_token, same_token) {
        (Some(last), true) => last.clone(),
        _ => random_token(),
    };
    inner.access_tokens.insert(access.clone(), now + lifetime);
    inner.last_access_token = Some(access.clone());
    let mut body = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": lifetime.as_secs().max(1),
        "scope": "offline_access",
    });
    if config.issue_refresh_tokens {
        let refresh = random_token();
        inner.refresh_tokens.insert(refresh.clone());
        body["refresh_token"] = json!(refresh);
    }
    Outcome::Ok((StatusCode::OK, no_store(), axum::Json(body)).into_response())
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
