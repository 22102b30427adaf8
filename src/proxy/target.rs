//! What a proxied request may name and carry: only origin-form targets
//! under the API base (never an absolute-form target, `CONNECT`, `*`, or a
//! path with a dot segment that could leave the base), only the API's
//! routes (`/v2` and below: not the API host's other paths, nor the dev
//! emulator's `/__emulator/…`), the upstream URI
//! built from the configured base alone (the caller's `Host` is ignored),
//! and the headers that never cross the proxy (hop-by-hop, the caller's
//! credentials).

use http::header::{self, HeaderMap, HeaderName};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, Version};

/// The configured API base, parsed once.
#[derive(Clone, Debug)]
pub struct ApiBase {
    scheme: Scheme,
    authority: Authority,
    /// The base's path without its trailing `/` (often empty).
    path: String,
}

impl ApiBase {
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| format!("{url:?}: no scheme"))?;
        let authority = uri.authority().cloned().ok_or_else(|| format!("{url:?}: no host"))?;
        if uri.query().is_some() {
            return Err(format!("{url:?}: a base URL has no query"));
        }
        Ok(Self {
            scheme,
            authority,
            path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }
}

/// Why a request target is refused (400, the API not contacted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadTarget {
    Connect,
    AbsoluteForm,
    NotOriginForm,
    PathEscape,
    /// A path outside the API's routes (`/v2/…`): refused as a route the
    /// caller may not use (403), not as a malformed one.
    OutsideApi,
}

impl BadTarget {
    pub fn message(self) -> &'static str {
        match self {
            BadTarget::Connect => "CONNECT is not proxied: send the API request itself",
            BadTarget::AbsoluteForm => {
                "absolute-form targets are not proxied: send an origin-form path (/v2/...); the API host is the configured one"
            }
            BadTarget::NotOriginForm => "the target must be a path starting with /",
            BadTarget::PathEscape => "the path has a dot segment or an encoded slash that could leave the API base",
            BadTarget::OutsideApi => "only the Flute API's routes (/v2/...) are proxied",
        }
    }
}

/// The upstream URI for a request: the base's scheme, host and path, then
/// the request's path and query.
pub fn upstream_uri(base: &ApiBase, method: &Method, version: Version, uri: &Uri) -> Result<Uri, BadTarget> {
    if method == Method::CONNECT {
        return Err(BadTarget::Connect);
    }
    // HTTP/2 requests always carry :scheme and :authority (the Host of
    // HTTP/2); over HTTP/1.x they mean an absolute-form target.
    if version < Version::HTTP_2 && (uri.scheme().is_some() || uri.authority().is_some()) {
        return Err(BadTarget::AbsoluteForm);
    }
    let path = uri.path();
    if !path.starts_with('/') {
        return Err(BadTarget::NotOriginForm);
    }
    if path.split('/').any(escapes) {
        return Err(BadTarget::PathEscape);
    }
    if !is_api_route(path) {
        return Err(BadTarget::OutsideApi);
    }
    let path_and_query: PathAndQuery = match (base.path.is_empty(), uri.path_and_query()) {
        // The usual base (`https://api.flute.com`): the request's own,
        // already parsed.
        (true, Some(own)) => own.clone(),
        _ => {
            let joined = match uri.query() {
                Some(q) => format!("{}{path}?{q}", base.path),
                None => format!("{}{path}", base.path),
            };
            joined.parse().map_err(|_| BadTarget::NotOriginForm)?
        }
    };
    Uri::builder()
        .scheme(base.scheme.clone())
        .authority(base.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| BadTarget::NotOriginForm)
}

/// The prefix of every Flute API route.
const API_ROUTES: &str = "/v2";

/// Whether `path` (already free of dot segments) is one of the API's
/// routes: `/v2` itself or below it, compared as written (`/V2/…` and
/// `/v2%2f…` are not).
fn is_api_route(path: &str) -> bool {
    path.strip_prefix(API_ROUTES)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// A path segment that is `.` or `..` in any spelling, or hides a slash.
fn escapes(segment: &str) -> bool {
    if !segment.contains(['%', '\\']) {
        // Nothing encoded: only the plain spellings.
        return segment == "." || segment == "..";
    }
    let lower = segment.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains('\\') {
        return true;
    }
    let decoded = lower.replace("%2e", ".");
    decoded == "." || decoded == ".."
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the ones a proxy sets itself.
/// As `HeaderName`s, not strings: a string is parsed into a name at every
/// lookup (about 4,800 instructions per proxied request for this list).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// Removes `Connection` and every header it names, and the other
/// hop-by-hop headers.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    remove_named(headers, &[]);
}

/// What a caller's request never takes to the API besides the hop-by-hop
/// headers: its credentials, `Host` (the upstream URI names the host) and
/// `Expect` (the body was already taken from the caller).
const CALLER_ONLY: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::HOST,
    header::EXPECT,
];

/// A caller's request headers as the API may see them: no hop-by-hop
/// header, no credential of the caller's (`Authorization`,
/// `Proxy-Authorization`), no `Host`, no `Expect`.
pub fn request_headers(headers: &mut HeaderMap) {
    remove_named(headers, &CALLER_ONLY);
}

/// Removes the hop-by-hop headers, those `Connection` names, and `also`.
/// The few headers present are each compared with the lists (no lookup
/// per listed name), and most requests have nothing to remove.
fn remove_named(headers: &mut HeaderMap, also: &[HeaderName]) {
    let mut doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| HOP_BY_HOP.contains(name) || also.contains(name))
        .cloned()
        .collect();
    doomed.extend(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok()),
    );
    for name in doomed {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(version: Version, method: Method, uri: &str) -> Result<String, BadTarget> {
        let base = ApiBase::parse("https://api.example.test/base/").unwrap();
        upstream_uri(&base, &method, version, &uri.parse().unwrap()).map(|u| u.to_string())
    }

    #[test]
    fn origin_form_paths_go_under_the_base() {
        assert_eq!(
            target(Version::HTTP_11, Method::GET, "/v2/payments?a=1&b=%20").unwrap(),
            "https://api.example.test/base/v2/payments?a=1&b=%20"
        );
        // HTTP/2 names the caller's authority: ignored, as Host is.
        assert_eq!(
            target(Version::HTTP_2, Method::POST, "http://evil.test/v2/x").unwrap(),
            "https://api.example.test/base/v2/x"
        );
        assert_eq!(
            target(Version::HTTP_11, Method::GET, "/v2").unwrap(),
            "https://api.example.test/base/v2"
        );
    }

    #[test]
    fn only_the_api_routes_are_proxied() {
        for outside in [
            "/internal/admin",
            "/__emulator/faults",
            "/",
            "/v2x/payments",
            "/V2/payments",
            "//evil.test/v2",
            "/v1/environments/sandbox/token",
        ] {
            assert_eq!(
                target(Version::HTTP_11, Method::GET, outside),
                Err(BadTarget::OutsideApi),
                "{outside}"
            );
        }
    }

    #[test]
    fn other_targets_are_refused() {
        assert_eq!(
            target(Version::HTTP_11, Method::GET, "http://evil.test/v2/x"),
            Err(BadTarget::AbsoluteForm)
        );
        assert_eq!(
            target(Version::HTTP_11, Method::CONNECT, "evil.test:443"),
            Err(BadTarget::Connect)
        );
        assert_eq!(
            target(Version::HTTP_11, Method::OPTIONS, "*"),
            Err(BadTarget::NotOriginForm)
        );
        for escape in [
            "/v2/../admin",
            "/v2/%2e%2e/admin",
            "/v2/%2E./x",
            "/v2/./x",
            "/v2/..%2fadmin",
            "/v2/a%5c..",
            "/..",
        ] {
            assert_eq!(
                target(Version::HTTP_11, Method::GET, escape),
                Err(BadTarget::PathEscape),
                "{escape}"
            );
        }
        assert!(target(Version::HTTP_11, Method::GET, "/v2/a..b/c.d").is_ok());
    }

    #[test]
    fn hop_by_hop_and_caller_credentials_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("authorization", "Bearer the-callers"),
            ("proxy-authorization", "Basic x"),
            ("host", "evil.test"),
            ("content-type", "application/json"),
            ("x-request-id", "r1"),
        ] {
            headers.append(HeaderName::from_static(name), value.parse().unwrap());
        }
        request_headers(&mut headers);
        let mut left: Vec<_> = headers.keys().map(|k| k.as_str().to_owned()).collect();
        left.sort();
        assert_eq!(left, ["content-type", "x-request-id"]);
    }
}
