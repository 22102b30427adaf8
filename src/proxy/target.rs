//! What a proxied request may name and carry: only origin-form targets
//! under the API base (never an absolute-form target, `CONNECT`, `*`, or a
//! path with a dot segment that could leave the base), the upstream URI
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
    let path_and_query = match uri.query() {
        Some(q) => format!("{}{path}?{q}", base.path),
        None => format!("{}{path}", base.path),
    };
    let path_and_query: PathAndQuery = path_and_query.parse().map_err(|_| BadTarget::NotOriginForm)?;
    Uri::builder()
        .scheme(base.scheme.clone())
        .authority(base.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| BadTarget::NotOriginForm)
}

/// A path segment that is `.` or `..` in any spelling, or hides a slash.
fn escapes(segment: &str) -> bool {
    let lower = segment.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains('\\') {
        return true;
    }
    let decoded = lower.replace("%2e", ".");
    decoded == "." || decoded == ".."
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the ones a proxy sets itself.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

/// Removes `Connection` and every header it names, and the other
/// hop-by-hop headers.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// A caller's request headers as the API may see them: no hop-by-hop
/// header, no credential of the caller's (`Authorization`,
/// `Proxy-Authorization`), no `Host` (the upstream URI names the host), no
/// `Expect` (the body was already taken from the caller).
pub fn request_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    for name in [
        header::AUTHORIZATION,
        header::PROXY_AUTHORIZATION,
        header::HOST,
        header::EXPECT,
    ] {
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
            target(Version::HTTP_11, Method::GET, "//evil.test/v2").unwrap(),
            "https://api.example.test/base//evil.test/v2"
        );
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
