//! Parsing what the token endpoint says: the success body (RFC 6749 §5.1,
//! with the variants seen in the wild) and every error shape Flute uses
//! (RFC 6749 §5.2 JSON, PascalCase keys, ASP.NET ProblemDetails, an empty
//! 401 with only `WWW-Authenticate`). Pure functions, table-tested.

use std::time::Duration;

use secrecy::SecretString;
use serde_json::{Map, Value};

use super::OAuthError;
use super::error::registered_code;
use super::redaction::SecretFilter;

/// Longest body excerpt kept in an error message.
const EXCERPT_CHARS: usize = 160;

/// How `expires_in` is turned into a lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LifetimeBounds {
    /// Used when `expires_in` is absent.
    pub default: Duration,
    pub min: Duration,
    pub max: Duration,
}

impl Default for LifetimeBounds {
    fn default() -> Self {
        Self {
            default: super::DEFAULT_LIFETIME,
            min: Duration::from_secs(1),
            max: Duration::from_secs(86_400),
        }
    }
}

impl LifetimeBounds {
    fn clamp(&self, secs: f64) -> Duration {
        if !secs.is_finite() || secs <= 0.0 {
            return self.min;
        }
        let max = self.max.as_secs_f64();
        Duration::from_secs_f64(secs.min(max)).max(self.min)
    }
}

/// A validated successful token response.
pub struct TokenResponse {
    pub access_token: SecretString,
    /// Normalised to `Bearer`.
    pub token_type: String,
    /// `expires_in` after defaulting and clamping.
    pub lifetime: Duration,
    /// Whether the server sent `expires_in` at all.
    pub lifetime_from_server: bool,
    pub refresh_token: Option<SecretString>,
    pub scope: Option<String>,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"[redacted]")
            .field("token_type", &self.token_type)
            .field("lifetime", &self.lifetime)
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "[redacted]"))
            .field("scope", &self.scope)
            .finish()
    }
}

/// Parses a 2xx body. Errors never quote the body: it holds tokens.
pub fn parse_token_response(status: u16, body: &[u8], bounds: &LifetimeBounds) -> Result<TokenResponse, OAuthError> {
    let malformed = |reason: &str| OAuthError::Malformed {
        status,
        reason: reason.to_owned(),
    };
    let value: Value = serde_json::from_slice(body).map_err(|_| malformed("body is not valid JSON"))?;
    let Value::Object(obj) = value else {
        return Err(malformed("body is not a JSON object"));
    };

    let access_token = match get_ci(&obj, &["access_token", "AccessToken", "accessToken"]) {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(malformed("access_token is empty")),
        Some(_) => return Err(malformed("access_token is not a string")),
        None => return Err(malformed("access_token is missing")),
    };
    let token_type = match get_ci(&obj, &["token_type", "TokenType", "tokenType"]) {
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => "Bearer".to_owned(),
        Some(Value::String(_)) => return Err(malformed("unsupported token_type (expected Bearer)")),
        Some(_) => return Err(malformed("token_type is not a string")),
        None => return Err(malformed("token_type is missing")),
    };
    let (lifetime, lifetime_from_server) = match get_ci(&obj, &["expires_in", "ExpiresIn", "expiresIn"]) {
        None | Some(Value::Null) => (bounds.default, false),
        Some(Value::Number(n)) => (bounds.clamp(n.as_f64().unwrap_or(0.0)), true),
        Some(Value::String(s)) => match s.trim().parse::<f64>() {
            Ok(secs) => (bounds.clamp(secs), true),
            Err(_) => return Err(malformed("expires_in is not a number")),
        },
        Some(_) => return Err(malformed("expires_in is not a number")),
    };
    let refresh_token = match get_ci(&obj, &["refresh_token", "RefreshToken", "refreshToken"]) {
        Some(Value::String(s)) if !s.is_empty() => Some(SecretString::from(s.clone())),
        _ => None,
    };
    let scope = match get_ci(&obj, &["scope", "Scope"]) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    Ok(TokenResponse {
        access_token: SecretString::from(access_token),
        token_type,
        lifetime,
        lifetime_from_server,
        refresh_token,
        scope,
    })
}

/// A non-2xx answer as parsed. The description is the endpoint's own text,
/// whole and unchecked: it leaves only through [`ErrorAnswer::into_error`],
/// which passes it through a [`SecretFilter`] first.
pub struct ErrorAnswer {
    pub status: u16,
    /// The OAuth error code (registered, or [`super::error::UNRECOGNISED`]), from the
    /// body or the `WWW-Authenticate` challenge.
    pub code: Option<&'static str>,
    description: Option<String>,
    pub retry_after: Option<Duration>,
}

impl std::fmt::Debug for ErrorAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ErrorAnswer")
            .field("status", &self.status)
            .field("code", &self.code)
            .field(
                "description",
                &self
                    .description
                    .as_ref()
                    .map(|d| format!("[{} bytes, unchecked]", d.len())),
            )
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

/// Shown instead of a description that quoted a credential.
pub const WITHHELD: &str = "[description withheld: it quoted a credential]";

impl ErrorAnswer {
    /// The matching [`OAuthError`], with the description only if `filter`
    /// finds no secret in it (checked before it is shortened).
    pub fn into_error(self, filter: &SecretFilter) -> OAuthError {
        let status = self.status;
        if status == 429 {
            return OAuthError::RateLimited {
                retry_after: self.retry_after,
            };
        }
        let description = self.description.map(|d| {
            filter
                .admit(d)
                .map(|d| clean(&d))
                .unwrap_or_else(|| WITHHELD.to_owned())
        });
        if status >= 500 {
            return OAuthError::Server {
                status,
                code: self.code,
                description,
            };
        }
        match self.code.or_else(|| inferred_code(status)) {
            Some(code) => OAuthError::OAuth {
                status,
                code,
                description,
            },
            None => OAuthError::Http { status, description },
        }
    }
}

/// Parses a non-2xx answer. `www_authenticate` and `retry_after` are the raw
/// header values. Nothing of a body that is not a JSON error object is kept.
pub fn parse_error_response(
    status: u16,
    body: &[u8],
    www_authenticate: Option<&str>,
    retry_after: Option<&str>,
) -> ErrorAnswer {
    let (body_code, body_description) = error_fields(body).unwrap_or_default();
    let header_code = www_authenticate.and_then(|h| auth_param(h, "error"));
    let header_description = www_authenticate.and_then(|h| auth_param(h, "error_description"));
    ErrorAnswer {
        status,
        code: body_code.or(header_code).map(|c| registered_code(&c)),
        description: body_description.or(header_description),
        retry_after: if status == 429 {
            retry_after.and_then(parse_retry_after)
        } else {
            None
        },
    }
}

/// A 401 from a token endpoint means the client failed to authenticate
/// (RFC 6749 §5.2), even when the server says nothing else.
fn inferred_code(status: u16) -> Option<&'static str> {
    (status == 401).then_some("invalid_client")
}

/// Extracts (error code, description) from the JSON error shapes Flute uses,
/// unshortened. `None` when the body is not a JSON object.
fn error_fields(body: &[u8]) -> Option<(Option<String>, Option<String>)> {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let text = |keys: &[&str]| match get_ci(&obj, keys) {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        _ => None,
    };
    let code = text(&["error", "Error", "error_code", "ErrorCode", "code"]).filter(|c| is_error_code(c));
    let mut description = text(&[
        "error_description",
        "ErrorDescription",
        "errorDescription",
        "detail",
        "Detail",
    ]);
    // ASP.NET ProblemDetails: title plus the first validation message.
    if description.is_none() {
        let title = text(&["title", "Title"]);
        let first_error = match get_ci(&obj, &["errors", "Errors"]) {
            Some(Value::Object(errs)) => errs.iter().find_map(|(field, msgs)| match msgs {
                Value::Array(list) => list.first().and_then(Value::as_str).map(|m| format!("{field}: {m}")),
                Value::String(m) => Some(format!("{field}: {m}")),
                _ => None,
            }),
            _ => None,
        };
        description = match (title, first_error) {
            (Some(t), Some(e)) => Some(format!("{t} ({e})")),
            (t, e) => t.or(e),
        };
    }
    Some((code, description))
}

/// An OAuth error code is a short token of `[a-z_]`; anything else is prose.
fn is_error_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

/// Case-insensitive lookup over several spellings of a key.
fn get_ci<'a>(obj: &'a Map<String, Value>, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().find_map(|k| obj.get(*k)).or_else(|| {
        obj.iter()
            .find(|(name, _)| keys.iter().any(|k| normalise(name) == normalise(k)))
            .map(|(_, v)| v)
    })
}

fn normalise(key: &str) -> String {
    key.chars().filter(|c| *c != '_').flat_map(char::to_lowercase).collect()
}

/// Reads one parameter of a `WWW-Authenticate` challenge (`error="invalid_client"`).
fn auth_param(header: &str, name: &str) -> Option<String> {
    let lower = header.to_ascii_lowercase();
    let mut search = 0;
    while let Some(found) = lower[search..].find(name) {
        let start = search + found;
        search = start + name.len();
        let before_ok = start == 0 || matches!(lower.as_bytes()[start - 1], b' ' | b',');
        let rest = header[search..].trim_start();
        if !before_ok || !rest.starts_with('=') {
            continue;
        }
        let rest = rest[1..].trim_start();
        let value = if let Some(quoted) = rest.strip_prefix('"') {
            quoted.split('"').next().unwrap_or_default()
        } else {
            rest.split([',', ' ']).next().unwrap_or_default()
        };
        return (!value.is_empty()).then(|| value.to_owned());
    }
    None
}

/// `Retry-After` as delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// A short, printable, single-line form of a text of ours or one that
/// passed the [`SecretFilter`].
pub(crate) fn clean(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if out.chars().count() > EXCERPT_CHARS {
        out = out.chars().take(EXCERPT_CHARS).collect::<String>() + "…";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn ok(body: &str) -> Result<TokenResponse, OAuthError> {
        parse_token_response(200, body.as_bytes(), &LifetimeBounds::default())
    }

    #[test]
    fn expires_in_variants() {
        let cases: &[(&str, u64, bool)] = &[
            (r#""expires_in": 3600"#, 3600, true),
            (r#""expires_in": "3600""#, 3600, true),
            (r#""expires_in": 3600.0"#, 3600, true),
            (r#""expires_in": 0"#, 1, true),
            (r#""expires_in": -5"#, 1, true),
            (r#""expires_in": 99999999"#, 86_400, true),
            (r#""expires_in": null"#, 900, false),
            (r#""ignored": 1"#, 900, false),
            (r#""ExpiresIn": 60"#, 60, true),
        ];
        for (field, secs, from_server) in cases {
            let body = format!(r#"{{"access_token":"abc","token_type":"Bearer",{field}}}"#);
            let t = ok(&body).unwrap_or_else(|e| panic!("{field}: {e}"));
            assert_eq!(t.lifetime, Duration::from_secs(*secs), "{field}");
            assert_eq!(t.lifetime_from_server, *from_server, "{field}");
        }
        let bad = ok(r#"{"access_token":"abc","token_type":"Bearer","expires_in":"soon"}"#).unwrap_err();
        assert!(bad.to_string().contains("expires_in"), "{bad}");
    }

    #[test]
    fn token_type_variants() {
        for tt in ["Bearer", "bearer", "BEARER"] {
            let t = ok(&format!(r#"{{"access_token":"abc","token_type":"{tt}"}}"#)).unwrap();
            assert_eq!(t.token_type, "Bearer");
        }
        for (body, needle) in [
            (r#"{"access_token":"abc","token_type":"mac"}"#, "unsupported token_type"),
            (r#"{"access_token":"abc"}"#, "token_type is missing"),
            (r#"{"access_token":"abc","token_type":7}"#, "not a string"),
        ] {
            let e = ok(body).unwrap_err().to_string();
            assert!(e.contains(needle), "{body}: {e}");
        }
    }

    #[test]
    fn access_token_validation_and_no_leak() {
        for (body, needle) in [
            (r#"{"token_type":"Bearer"}"#, "access_token is missing"),
            (r#"{"access_token":"","token_type":"Bearer"}"#, "access_token is empty"),
            (r#"{"access_token":5,"token_type":"Bearer"}"#, "not a string"),
            ("not json at all SECRETTOKEN", "not valid JSON"),
            ("[1,2]", "not a JSON object"),
        ] {
            let e = ok(body).unwrap_err();
            assert!(e.to_string().contains(needle), "{body}: {e}");
            assert!(e.is_transient());
            assert!(!format!("{e} {e:?}").contains("SECRETTOKEN"));
        }
    }

    #[test]
    fn optional_fields_and_unknown_fields() {
        let t = ok(r#"{"access_token":"tok","token_type":"Bearer","expires_in":900,"refresh_token":"def502","scope":"offline_access","x":{"y":1}}"#).unwrap();
        assert_eq!(t.access_token.expose_secret(), "tok");
        assert_eq!(t.refresh_token.as_ref().unwrap().expose_secret(), "def502");
        assert_eq!(t.scope.as_deref(), Some("offline_access"));
        let dbg = format!("{t:?}");
        assert!(!dbg.contains("tok\"") && !dbg.contains("def502"), "{dbg}");
    }

    fn err(status: u16, body: &str, www: Option<&str>, retry: Option<&str>) -> OAuthError {
        parse_error_response(status, body.as_bytes(), www, retry).into_error(&SecretFilter::new([]))
    }

    #[test]
    fn error_shapes() {
        use crate::oauth::ErrorClass::*;
        let cases: Vec<(OAuthError, &str, &str, crate::oauth::ErrorClass)> = vec![
            (
                err(
                    400,
                    r#"{"error":"invalid_request","error_description":"The mandatory 'client_id' parameter is missing."}"#,
                    None,
                    None,
                ),
                "invalid_request",
                "client_id' parameter is missing",
                Permanent,
            ),
            (
                err(
                    401,
                    r#"{"Error":"invalid_client","ErrorDescription":"bad secret"}"#,
                    None,
                    None,
                ),
                "invalid_client",
                "bad secret",
                Permanent,
            ),
            (
                err(
                    400,
                    r#"{"type":"https://tools.ietf.org/html/rfc7231#section-6.5.1","title":"One or more validation errors occurred.","status":400,"errors":{"grant_type":["The grant_type field is required."]},"traceId":"00-abc"}"#,
                    None,
                    None,
                ),
                "400",
                "grant_type: The grant_type field is required.",
                Permanent,
            ),
            (
                err(401, "", Some(r#"Basic realm="flute", error="invalid_client""#), None),
                "invalid_client",
                "invalid_client",
                Permanent,
            ),
            (
                err(401, "", Some(r#"Basic realm="flute""#), None),
                "invalid_client",
                "401",
                Permanent,
            ),
            (
                err(400, r#"{"error":"invalid_grant"}"#, None, None),
                "invalid_grant",
                "invalid_grant",
                InvalidGrant,
            ),
            (
                err(503, "<html>down for maintenance</html>", None, None),
                "503",
                "server error 503",
                Transient,
            ),
            (
                err(
                    500,
                    r#"{"error":"server_error","error_description":"oops"}"#,
                    None,
                    None,
                ),
                "500",
                "server_error: oops",
                Transient,
            ),
            (err(429, "", None, Some("7")), "429", "Retry-After 7s", Transient),
            (
                err(404, "<h1>Not Found</h1>", None, None),
                "404",
                "answered 404",
                Permanent,
            ),
            (err(408, "", None, None), "408", "408", Transient),
            (
                err(400, r#"{"error":"temporarily_unavailable"}"#, None, None),
                "temporarily_unavailable",
                "400",
                Transient,
            ),
        ];
        for (e, label_or_status, needle, class) in cases {
            let text = e.to_string();
            assert!(text.contains(needle), "{text:?} should contain {needle:?}");
            if label_or_status.parse::<u16>().is_ok() {
                assert!(text.contains(label_or_status), "{text}");
            } else {
                assert_eq!(e.label(), label_or_status, "{text}");
            }
            assert_eq!(e.class(), class, "{text}");
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        let in_a_minute = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(61));
        let d = parse_retry_after(&in_a_minute).unwrap();
        assert!(d > Duration::from_secs(50) && d <= Duration::from_secs(61), "{d:?}");
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn excerpts_are_short_and_single_line() {
        let long = "x\n".repeat(1000);
        let e = err(502, &long, None, None).to_string();
        assert!(e.len() < 250 && !e.contains('\n'), "{e}");
    }

    /// A description is shown whole up to 160 characters, on one line with
    /// its whitespace collapsed; a longer one is cut there and marked.
    #[test]
    fn descriptions_are_cut_at_160_characters() {
        let shown = |description: &str| {
            let body = serde_json::json!({"error": "invalid_request", "error_description": description}).to_string();
            match err(400, &body, None, None) {
                OAuthError::OAuth { description, .. } => description.unwrap(),
                other => panic!("{other:?}"),
            }
        };
        let exact = "é".repeat(160);
        assert_eq!(shown(&exact), exact, "160 characters (320 bytes) stay whole");
        assert_eq!(shown(&format!("{exact}x")), format!("{exact}…"));
        assert_eq!(shown("two\n\tlines  here"), "two lines here");
    }

    /// Random and mutated bodies: the parsers return errors, never panic.
    #[test]
    fn arbitrary_bodies_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let seeds: [&[u8]; 4] = [
            br#"{"access_token":"a","token_type":"Bearer","expires_in":"3600"}"#,
            br#"{"error":"invalid_client","error_description":"x"}"#,
            br#"{"type":"t","title":"T","status":400,"errors":{"a":["b"]}}"#,
            b"\xff\xfe{\"\x00\\u0000",
        ];
        for i in 0..20_000 {
            let mut body: Vec<u8> = seeds[i % seeds.len()].to_vec();
            for _ in 0..rng.random_range(0..6) {
                let at = rng.random_range(0..=body.len());
                match rng.random_range(0..3) {
                    0 if at < body.len() => body[at] = rng.random(),
                    1 => body.insert(at, rng.random()),
                    _ => body.truncate(at),
                }
            }
            let status = [200, 400, 401, 429, 500, 503][i % 6];
            let _ = parse_token_response(status, &body, &LifetimeBounds::default());
            let text = String::from_utf8_lossy(&body).into_owned();
            let _ =
                parse_error_response(status, &body, Some(&text), Some(&text)).into_error(&SecretFilter::new([text]));
        }
    }

    /// RFC 6750 §3: the error may come only in the challenge, on any status.
    #[test]
    fn errors_in_www_authenticate_alone_are_read() {
        let cases = [
            (
                400,
                r#"Bearer error="invalid_request", error_description="scope is wrong""#,
                "invalid_request",
                Some("scope is wrong"),
            ),
            (
                403,
                r#"Bearer realm="flute",error=insufficient_scope"#,
                "insufficient_scope",
                None,
            ),
            // A parameter whose name merely contains "error" is not the error.
            (
                400,
                r#"Bearer xerror="invalid_client", error="invalid_scope""#,
                "invalid_scope",
                None,
            ),
            (
                400,
                r#"Bearer error_uri="https://x", error="invalid_grant""#,
                "invalid_grant",
                None,
            ),
            // Case-insensitive names; unquoted values end at a comma or space.
            (
                400,
                r#"Bearer ERROR=invalid_request,realm="x""#,
                "invalid_request",
                None,
            ),
        ];
        for (status, header, code, description) in cases {
            let answer = parse_error_response(status, b"", Some(header), None);
            assert_eq!(answer.code, Some(code), "{header}");
            match answer.into_error(&SecretFilter::new([])) {
                OAuthError::OAuth {
                    status: s,
                    code: c,
                    description: d,
                } => {
                    assert_eq!((s, c), (status, code), "{header}");
                    assert_eq!(d.as_deref(), description, "{header}");
                }
                other => panic!("{header}: {other:?}"),
            }
        }
        // An empty value, or no value at all, is no error code.
        for header in [r#"Bearer error="""#, "Bearer error", r#"Bearer realm="error""#] {
            let e = err(403, "", Some(header), None);
            assert!(matches!(e, OAuthError::Http { status: 403, .. }), "{header}: {e:?}");
        }
        // The body wins over the header.
        let e = err(
            400,
            r#"{"error":"invalid_grant"}"#,
            Some(r#"Bearer error="invalid_token""#),
            None,
        );
        assert_eq!(e.label(), "invalid_grant");
    }

    #[test]
    fn blank_fields_count_as_absent() {
        let t = ok(r#"{"access_token":"a","token_type":"Bearer","refresh_token":""}"#).unwrap();
        assert!(t.refresh_token.is_none(), "an empty refresh_token is no refresh token");
        let e = err(400, r#"{"error":"  ","error_description":" \t "}"#, None, None);
        assert_eq!(e.to_string(), "token endpoint answered 400");
        let e = err(
            400,
            r#"{"error":"invalid_request","error_description":"  padded  "}"#,
            None,
            None,
        );
        assert_eq!(
            e.to_string(),
            "token endpoint refused the request: 400 invalid_request: padded"
        );
    }

    #[test]
    fn problem_details_errors_as_lists_or_strings() {
        for (errors, shown) in [
            (r#"{"grant_type":["is required","x"]}"#, "Bad (grant_type: is required)"),
            (r#"{"grant_type":"is required"}"#, "Bad (grant_type: is required)"),
            (r#"{"grant_type":7}"#, "Bad"),
        ] {
            let body = format!(r#"{{"title":"Bad","errors":{errors}}}"#);
            let e = err(400, &body, None, None);
            assert_eq!(
                e.to_string(),
                format!("token endpoint answered 400: {shown}"),
                "{errors}"
            );
        }
        let e = err(400, r#"{"errors":{"scope":"unknown"}}"#, None, None);
        assert_eq!(e.to_string(), "token endpoint answered 400: scope: unknown");
    }

    #[test]
    fn debug_shows_the_shape_but_no_secret() {
        let t = ok(r#"{"access_token":"tok-secret","token_type":"Bearer","expires_in":60,"refresh_token":"ref-secret","scope":"s"}"#).unwrap();
        assert_eq!(
            format!("{t:?}"),
            r#"TokenResponse { access_token: "[redacted]", token_type: "Bearer", lifetime: 60s, refresh_token: Some("[redacted]"), scope: Some("s") }"#
        );
        let answer = parse_error_response(
            400,
            br#"{"error":"invalid_request","error_description":"abc"}"#,
            None,
            None,
        );
        assert_eq!(
            format!("{answer:?}"),
            r#"ErrorAnswer { status: 400, code: Some("invalid_request"), description: Some("[3 bytes, unchecked]"), retry_after: None }"#
        );
    }

    #[test]
    fn unknown_codes_do_not_become_metric_labels() {
        let e = err(400, r#"{"error":"weird_thing"}"#, None, None);
        assert_eq!(e.label(), "oauth_error");
        let prose = err(400, r#"{"error":"Something went wrong here"}"#, None, None);
        assert!(matches!(prose, OAuthError::Http { .. }), "{prose:?}");
    }
}
