//! What a caller may do, per environment: get its tokens (GetToken,
//! WatchToken, the HTTP read, RefreshToken, GetStatus's details) and call
//! which Flute routes through its proxy. Compiled once from the settings
//! ([`Policy::compile`]) and asked per request with a [`Caller`] from
//! [`crate::identity`].
//!
//! Three forms, per environment:
//! - **open** (no `access` table, no allow-list): anyone who reaches a
//!   listener (guarded by socket permissions, network policy or mutual
//!   TLS) gets the tokens and may call any API route through the proxy;
//! - **the short form**: `allowed_unix_users`, `allowed_unix_groups`,
//!   `allowed_tls_clients`: a caller any list names gets the tokens and may
//!   call any API route;
//! - **rules**: `[callers.NAME]` name callers (a caller matches when every
//!   kind its table lists matches: Unix users, Unix groups, systemd units,
//!   client certificate names), and `[environments.X.access]` says which
//!   names get the token (`token`) and which routes each may call through
//!   the proxy (`proxy`, `METHOD /path` patterns, `*` one segment, `**` the
//!   rest). A caller allowed only the proxy never receives the token.
//!
//! An anonymous caller matches no list and no named caller.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::accounts;
use crate::environment::Environment;
use crate::identity::{Caller, caller_groups, certificate_names};
use crate::serve::peer::ProcessFacts;

/// The short form's allow-lists of one environment; empty lists mean "open".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    /// URI or DNS subject alternative names of allowed client certificates.
    pub tls_clients: Vec<String>,
}

impl AccessPolicy {
    pub fn is_open(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty() && self.tls_clients.is_empty()
    }

    /// Whether any list names `caller` (every caller, when all are empty).
    pub fn allows(&self, caller: &Caller) -> bool {
        self.is_open()
            || users_match(&self.uids, caller)
            || groups_match(&self.gids, caller)
            || tls_match(&self.tls_clients, caller)
    }
}

fn users_match(uids: &[u32], caller: &Caller) -> bool {
    matches!(caller, Caller::Unix(peer) if uids.contains(&peer.uid))
}

fn groups_match(gids: &[u32], caller: &Caller) -> bool {
    match caller {
        Caller::Unix(peer) => {
            !gids.is_empty() && (gids.contains(&peer.gid) || caller_groups(peer).iter().any(|g| gids.contains(g)))
        }
        _ => false,
    }
}

/// A URI name matches exactly (a SPIFFE ID is case-sensitive), a DNS name
/// whatever its case.
fn tls_match(allowed: &[String], caller: &Caller) -> bool {
    let Caller::Tls { certificates } = caller else {
        return false;
    };
    if allowed.is_empty() {
        return false;
    }
    let leaf = certificates.first().map(|c| certificate_names(c)).unwrap_or_default();
    leaf.iter().any(|name| {
        allowed
            .iter()
            .any(|a| a == name || (!a.contains("://") && a.eq_ignore_ascii_case(name)))
    })
}

fn unit_match(units: &[String], caller: &Caller) -> bool {
    match caller {
        Caller::Unix(peer) => match &peer.process {
            ProcessFacts::Read { workload, .. } => workload.unit.as_ref().is_some_and(|u| units.contains(u)),
            _ => false,
        },
        _ => false,
    }
}

/// `[callers.NAME]`: what identifies one named caller. Every kind listed
/// must match (a unit *and* a user, say); within a kind, any entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallerConfig {
    /// Unix users (names or uids) on the Unix socket.
    #[serde(with = "accounts::user_ids", skip_serializing_if = "Vec::is_empty")]
    pub unix_users: Vec<u32>,
    /// Unix groups (names or gids): the primary group, or a supplementary
    /// group of the connecting process.
    #[serde(with = "accounts::group_ids", skip_serializing_if = "Vec::is_empty")]
    pub unix_groups: Vec<u32>,
    /// systemd units of the connecting process (from its cgroup):
    /// `billing.service`, `user@1000.service/app.slice/foo.service`.
    #[serde(deserialize_with = "crate::settings::strings", skip_serializing_if = "Vec::is_empty")]
    pub systemd_units: Vec<String>,
    /// Client certificates (mutual TLS on TCP), by URI SAN or DNS SAN.
    #[serde(deserialize_with = "crate::settings::strings", skip_serializing_if = "Vec::is_empty")]
    pub tls_clients: Vec<String>,
}

impl CallerConfig {
    fn kinds(&self) -> usize {
        [
            !self.unix_users.is_empty(),
            !self.unix_groups.is_empty(),
            !self.systemd_units.is_empty(),
            !self.tls_clients.is_empty(),
        ]
        .into_iter()
        .filter(|k| *k)
        .count()
    }

    fn matches(&self, caller: &Caller) -> bool {
        self.kinds() > 0
            && (self.unix_users.is_empty() || users_match(&self.unix_users, caller))
            && (self.unix_groups.is_empty() || groups_match(&self.unix_groups, caller))
            && (self.systemd_units.is_empty() || unit_match(&self.systemd_units, caller))
            && (self.tls_clients.is_empty() || tls_match(&self.tls_clients, caller))
    }

    /// Problems with the values, each starting with its key.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.kinds() == 0 {
            out.push("names no identity: list unix_users, unix_groups, systemd_units or tls_clients".into());
        }
        for unit in &self.systemd_units {
            if !unit.ends_with(".service") || unit.starts_with('/') {
                out.push(format!(
                    "systemd_units: {unit:?} is not a service unit (billing.service, user@1000.service/app.slice/foo.service)"
                ));
            }
        }
        out
    }
}

/// `[environments.X.access]`: who gets this environment's token and who
/// may call which routes through its proxy, by caller name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Callers that get the token (GetToken, WatchToken, the HTTP read,
    /// RefreshToken, GetStatus's details).
    #[serde(deserialize_with = "crate::settings::strings")]
    pub token: Vec<String>,
    /// Per caller, the routes it may call through the proxy (`GET /v2/**`).
    pub proxy: BTreeMap<String, Vec<String>>,
    /// Caller-forced refreshes per minute, per caller (RefreshToken, a
    /// `min_remaining` the current token does not meet, a proxied 401).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_per_minute: Option<u32>,
    /// Proxied requests per second, per caller (a burst of twice that).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_per_second: Option<u32>,
}

/// An environment's per-caller rate limits (none: unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimits {
    pub refresh_per_minute: Option<u32>,
    pub proxy_per_second: Option<u32>,
}

/// A proxy route pattern: a method (or `*`) and a path of literal
/// segments, `*` (one segment) and a final `**` (the rest, none included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutePattern {
    method: Option<http::Method>,
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

impl std::str::FromStr for RoutePattern {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (method, path) = text
            .split_once(' ')
            .ok_or_else(|| format!("{text:?}: a route is `METHOD /path` (GET /v2/**)"))?;
        let method = match method {
            "*" => None,
            m => Some(
                http::Method::from_bytes(m.as_bytes())
                    .ok()
                    .filter(|m| m.as_str().bytes().all(|b| b.is_ascii_uppercase()))
                    .ok_or_else(|| format!("{text:?}: {m:?} is not an HTTP method in capitals (or *)"))?,
            ),
        };
        let path = path.trim();
        let Some(rest) = path.strip_prefix('/') else {
            return Err(format!("{text:?}: the path starts with /"));
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (n, part) in parts.iter().enumerate() {
            segments.push(match *part {
                "**" if n + 1 == parts.len() => Segment::Rest,
                "**" => return Err(format!("{text:?}: ** only ends a path")),
                "*" => Segment::One,
                "" | "." | ".." => return Err(format!("{text:?}: empty, . and .. segments never match")),
                p if p.contains(['*', '%', '?', '#']) => {
                    return Err(format!("{text:?}: {p:?}: a segment is literal, *, or a final **"));
                }
                p => Segment::Literal(p.to_owned()),
            });
        }
        Ok(Self { method, segments })
    }
}

impl RoutePattern {
    /// Whether a request's method and path (already free of dot segments
    /// and encoded slashes: the proxy refuses those) match. The path is
    /// compared after decoding percent-encoded unreserved characters, as
    /// the API reads it: `/v2/%74ransactions` is `/v2/transactions`.
    pub fn matches(&self, method: &http::Method, path: &str) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        for segment in &self.segments {
            match segment {
                Segment::Rest => return true,
                Segment::One => match parts.next() {
                    Some(part) if !part.is_empty() => {}
                    _ => return false,
                },
                Segment::Literal(literal) => match parts.next() {
                    Some(part) if normalised_eq(part, literal) => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }
}

/// Whether a path segment, with its percent-encoded unreserved characters
/// decoded, is `literal`.
fn normalised_eq(segment: &str, literal: &str) -> bool {
    if !segment.contains('%') {
        return segment == literal;
    }
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%'
            && let Some(byte) = segment
                .get(at + 1..at + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .filter(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
        {
            decoded.push(byte);
            at += 3;
        } else {
            decoded.push(bytes[at]);
            at += 1;
        }
    }
    decoded == literal.as_bytes()
}

/// Why the proxy refuses a caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyRefusal {
    /// No rule lets this caller use the proxy at all.
    CallerNotAllowed,
    /// This caller may use the proxy, but not for this route.
    RouteNotAllowed,
}

/// One named caller, compiled.
#[derive(Clone, Debug)]
struct NamedCaller {
    name: String,
    rule: CallerConfig,
}

/// One environment's compiled access.
#[derive(Clone, Debug)]
enum EnvironmentAccess {
    Open,
    ShortForm(AccessPolicy),
    Rules {
        /// Indexes into the callers.
        token: Vec<usize>,
        proxy: Vec<(usize, Vec<RoutePattern>)>,
        limits: RateLimits,
    },
}

/// Every environment's access, compiled once.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    callers: Vec<NamedCaller>,
    environments: BTreeMap<Environment, EnvironmentAccess>,
}

/// What one environment's settings say about access.
pub struct EnvironmentSettings<'a> {
    pub environment: Environment,
    pub short_form: AccessPolicy,
    pub access: Option<&'a AccessConfig>,
}

impl Policy {
    /// Compiles the named callers and each environment's access; every
    /// problem at once, each starting with its key.
    pub fn compile<'a>(
        callers: &BTreeMap<String, CallerConfig>,
        environments: impl IntoIterator<Item = EnvironmentSettings<'a>>,
    ) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        for (name, rule) in callers {
            problems.extend(rule.problems().into_iter().map(|p| format!("callers.{name}: {p}")));
        }
        let named: Vec<NamedCaller> = callers
            .iter()
            .map(|(name, rule)| NamedCaller {
                name: name.clone(),
                rule: rule.clone(),
            })
            .collect();
        let index = |name: &str| named.iter().position(|c| c.name == name);
        let mut compiled = BTreeMap::new();
        for settings in environments {
            let env = settings.environment;
            let access = match settings.access {
                None if settings.short_form.is_open() => EnvironmentAccess::Open,
                None => EnvironmentAccess::ShortForm(settings.short_form),
                Some(access) => {
                    if !settings.short_form.is_open() {
                        problems.push(format!(
                            "environments.{env}: allowed_unix_users, allowed_unix_groups and allowed_tls_clients are the short form of an access table: name those callers in [callers.*] and list them in environments.{env}.access instead"
                        ));
                    }
                    let mut token = Vec::new();
                    for name in &access.token {
                        match index(name) {
                            Some(i) => token.push(i),
                            None => problems.push(format!(
                                "environments.{env}.access.token: {name:?} is not a caller ([callers.{name}] is missing)"
                            )),
                        }
                    }
                    let mut proxy = Vec::new();
                    for (name, routes) in &access.proxy {
                        let Some(i) = index(name) else {
                            problems.push(format!(
                                "environments.{env}.access.proxy: {name:?} is not a caller ([callers.{name}] is missing)"
                            ));
                            continue;
                        };
                        let mut patterns = Vec::new();
                        for route in routes {
                            match route.parse::<RoutePattern>() {
                                Ok(p) => patterns.push(p),
                                Err(p) => problems.push(format!("environments.{env}.access.proxy.{name}: {p}")),
                            }
                        }
                        proxy.push((i, patterns));
                    }
                    for (key, value) in [
                        ("refresh_per_minute", access.refresh_per_minute),
                        ("proxy_per_second", access.proxy_per_second),
                    ] {
                        if value.is_some_and(|v| !(1..=1_000_000).contains(&v)) {
                            problems.push(format!(
                                "environments.{env}.access.{key}: must be between 1 and 1000000"
                            ));
                        }
                    }
                    EnvironmentAccess::Rules {
                        token,
                        proxy,
                        limits: RateLimits {
                            refresh_per_minute: access.refresh_per_minute,
                            proxy_per_second: access.proxy_per_second,
                        },
                    }
                }
            };
            compiled.insert(env, access);
        }
        match problems.is_empty() {
            true => Ok(Self {
                callers: named,
                environments: compiled,
            }),
            false => Err(problems),
        }
    }

    /// Whether `caller` gets `env`'s token (an environment this policy
    /// does not know is open: in-process test servers).
    pub fn may_get_token(&self, env: Environment, caller: &Caller) -> bool {
        match self.environments.get(&env) {
            None | Some(EnvironmentAccess::Open) => true,
            Some(EnvironmentAccess::ShortForm(lists)) => lists.allows(caller),
            Some(EnvironmentAccess::Rules { token, .. }) => token.iter().any(|&i| self.callers[i].rule.matches(caller)),
        }
    }

    /// Whether `caller` may send `method path` through `env`'s proxy.
    pub fn may_proxy(
        &self,
        env: Environment,
        caller: &Caller,
        method: &http::Method,
        path: &str,
    ) -> Result<(), ProxyRefusal> {
        match self.environments.get(&env) {
            None | Some(EnvironmentAccess::Open) => Ok(()),
            Some(EnvironmentAccess::ShortForm(lists)) => match lists.allows(caller) {
                true => Ok(()),
                false => Err(ProxyRefusal::CallerNotAllowed),
            },
            Some(EnvironmentAccess::Rules { proxy, .. }) => {
                let mut known = false;
                for (i, routes) in proxy {
                    if self.callers[*i].rule.matches(caller) {
                        known = true;
                        if routes.iter().any(|r| r.matches(method, path)) {
                            return Ok(());
                        }
                    }
                }
                Err(match known {
                    true => ProxyRefusal::RouteNotAllowed,
                    false => ProxyRefusal::CallerNotAllowed,
                })
            }
        }
    }

    /// The name `caller` is counted under (rate limits): its first named
    /// caller, else `anonymous` or `unnamed`.
    pub fn label_of(&self, caller: &Caller) -> &str {
        match self.callers.iter().find(|c| c.rule.matches(caller)) {
            Some(named) => &named.name,
            None if matches!(caller, Caller::Anonymous) => "anonymous",
            None => "unnamed",
        }
    }

    /// Whether any caller is named (per-caller metrics are kept then).
    pub fn names_callers(&self) -> bool {
        !self.callers.is_empty()
    }

    /// The rate limits of `env` (rules only).
    pub fn limits(&self, env: Environment) -> RateLimits {
        match self.environments.get(&env) {
            Some(EnvironmentAccess::Rules { limits, .. }) => *limits,
            _ => RateLimits::default(),
        }
    }

    /// The resolved table, one line per caller and environment (what
    /// `check-config` prints), and the callers no rule uses.
    pub fn table(&self) -> (Vec<String>, Vec<String>) {
        let mut lines = Vec::new();
        let mut used = BTreeSet::new();
        for (env, access) in &self.environments {
            match access {
                EnvironmentAccess::Open => lines.push(format!(
                    "access: {env}: open: anyone who reaches a listener gets the token and may call any /v2 route"
                )),
                EnvironmentAccess::ShortForm(lists) => lines.push(format!(
                    "access: {env}: allow-lists (users {:?}, groups {:?}, TLS clients {:?}) get the token and may call any /v2 route",
                    lists.uids, lists.gids, lists.tls_clients
                )),
                EnvironmentAccess::Rules { token, proxy, limits } => {
                    for (i, caller) in self.callers.iter().enumerate() {
                        let gets = token.contains(&i);
                        let routes: Vec<String> = proxy
                            .iter()
                            .filter(|(p, _)| *p == i)
                            .flat_map(|(_, r)| r.iter().map(describe_route))
                            .collect();
                        if gets || !routes.is_empty() {
                            used.insert(i);
                        }
                        let what = match (gets, routes.is_empty()) {
                            (true, true) => "gets the token".to_owned(),
                            (true, false) => format!("gets the token; proxy: {}", routes.join(", ")),
                            (false, false) => format!("proxy only (never the token): {}", routes.join(", ")),
                            (false, true) => "nothing".to_owned(),
                        };
                        lines.push(format!("access: {} → {env}: {what}", caller.name));
                    }
                    lines.push(format!("access: anyone else → {env}: nothing"));
                    if let Some(n) = limits.refresh_per_minute {
                        lines.push(format!("access: {env}: at most {n} forced refreshes per minute per caller"));
                    }
                    if let Some(n) = limits.proxy_per_second {
                        lines.push(format!("access: {env}: at most {n} proxied requests per second per caller"));
                    }
                }
            }
        }
        let unused = self
            .callers
            .iter()
            .enumerate()
            .filter(|(i, _)| !used.contains(i))
            .map(|(_, c)| format!("callers.{}: no environment's access uses it", c.name))
            .collect();
        (lines, unused)
    }
}

fn describe_route(route: &RoutePattern) -> String {
    let method = route.method.as_ref().map_or("*", http::Method::as_str);
    let path: Vec<&str> = route
        .segments
        .iter()
        .map(|s| match s {
            Segment::Literal(l) => l.as_str(),
            Segment::One => "*",
            Segment::Rest => "**",
        })
        .collect();
    format!("{method} /{}", path.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::Workload;
    use crate::serve::peer::UnixPeer;
    use std::sync::Arc;

    fn unix(uid: u32, gid: u32, groups: &[u32], unit: Option<&str>) -> Caller {
        Caller::Unix(Arc::new(UnixPeer {
            uid,
            gid,
            pid: Some(4242),
            process: ProcessFacts::Read {
                groups: groups.to_vec(),
                workload: Workload {
                    unit: unit.map(str::to_owned),
                    ..Default::default()
                },
                exe: None,
            },
        }))
    }

    fn agent() -> Caller {
        let mut params = rcgen::CertificateParams::new(vec!["agent.fleet.svc".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::URI("spiffe://fleet.example/agent".try_into().unwrap()));
        let cert = params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
        Caller::Tls {
            certificates: Arc::new(vec![cert.der().clone()]),
        }
    }

    #[test]
    fn short_form_table() {
        let me = unix(1000, 100, &[100, 2000], None);
        let agent = agent();
        let policy = |uids: &[u32], gids: &[u32], tls: &[&str]| AccessPolicy {
            uids: uids.to_vec(),
            gids: gids.to_vec(),
            tls_clients: tls.iter().map(|s| s.to_string()).collect(),
        };
        let cases = [
            (policy(&[], &[], &[]), &me, true),
            (policy(&[], &[], &[]), &Caller::Anonymous, true),
            (policy(&[], &[], &[]), &agent, true),
            (policy(&[1000], &[], &[]), &me, true),
            (policy(&[1001], &[], &[]), &me, false),
            (policy(&[], &[100], &[]), &me, true),
            (policy(&[], &[7], &[]), &me, false),
            (policy(&[], &[2000], &[]), &me, true),
            (policy(&[1000], &[], &[]), &Caller::Anonymous, false),
            (policy(&[1000], &[], &[]), &agent, false),
            (policy(&[], &[], &["spiffe://fleet.example/agent"]), &agent, true),
            (policy(&[], &[], &["AGENT.fleet.svc"]), &agent, true),
            (policy(&[], &[], &["spiffe://fleet.example/other"]), &agent, false),
            (policy(&[], &[], &["SPIFFE://fleet.example/agent"]), &agent, false),
            (policy(&[], &[], &["spiffe://fleet.example/agent"]), &me, false),
            (
                policy(&[], &[], &["spiffe://fleet.example/agent"]),
                &Caller::Anonymous,
                false,
            ),
        ];
        for (policy, caller, allowed) in cases {
            assert_eq!(policy.allows(caller), allowed, "{policy:?} {caller:?}");
        }
    }

    fn route(text: &str) -> RoutePattern {
        text.parse().unwrap()
    }

    #[test]
    fn route_patterns() {
        let get = http::Method::GET;
        let post = http::Method::POST;
        assert!(route("GET /v2/**").matches(&get, "/v2/transactions/1"));
        assert!(route("GET /v2/**").matches(&get, "/v2"));
        assert!(!route("GET /v2/**").matches(&post, "/v2/transactions"));
        assert!(route("* /v2/**").matches(&post, "/v2/transactions"));
        assert!(route("POST /v2/transactions").matches(&post, "/v2/transactions"));
        assert!(!route("POST /v2/transactions").matches(&post, "/v2/transactions/1"));
        assert!(!route("POST /v2/transactions").matches(&post, "/v2/transactionsX"));
        assert!(!route("POST /v2/transactions").matches(&post, "/v2"));
        assert!(route("GET /v2/transactions/*").matches(&get, "/v2/transactions/abc"));
        assert!(!route("GET /v2/transactions/*").matches(&get, "/v2/transactions/"));
        assert!(!route("GET /v2/transactions/*").matches(&get, "/v2/transactions/a/b"));
        // Encoded unreserved characters are what they encode; anything else stays encoded.
        assert!(route("GET /v2/transactions").matches(&get, "/v2/%74ransactions"));
        assert!(route("GET /v2/transactions").matches(&get, "/v2/%74%72ansactions"));
        assert!(!route("GET /v2/transactions").matches(&get, "/v2/transactions%20"));
        assert!(!route("GET /v2/a b").matches(&get, "/v2/a%20b"));
        // The case of a literal counts; the query never reaches the matcher.
        assert!(!route("GET /v2/transactions").matches(&get, "/v2/Transactions"));
        for bad in [
            "/v2/**",
            "GET v2",
            "get /v2",
            "GET /v2/**/x",
            "GET /v2/a*",
            "GET /v2/../x",
            "GET /v2//x",
            "GET /v2/%2f",
        ] {
            assert!(bad.parse::<RoutePattern>().is_err(), "{bad}");
        }
    }

    fn rules() -> Policy {
        let toml_callers = [
            (
                "billing",
                CallerConfig {
                    systemd_units: vec!["billing.service".into()],
                    unix_users: vec![1000],
                    ..Default::default()
                },
            ),
            (
                "reports",
                CallerConfig {
                    unix_groups: vec![3000],
                    ..Default::default()
                },
            ),
            (
                "agent",
                CallerConfig {
                    tls_clients: vec!["spiffe://fleet.example/agent".into()],
                    ..Default::default()
                },
            ),
            (
                "unused",
                CallerConfig {
                    unix_users: vec![4000],
                    ..Default::default()
                },
            ),
        ];
        let callers: BTreeMap<String, CallerConfig> =
            toml_callers.into_iter().map(|(n, c)| (n.to_owned(), c)).collect();
        let access = AccessConfig {
            token: vec!["billing".into(), "agent".into()],
            proxy: [
                (
                    "billing".to_owned(),
                    vec!["GET /v2/**".to_owned(), "POST /v2/transactions".to_owned()],
                ),
                ("reports".to_owned(), vec!["GET /v2/transactions/**".to_owned()]),
            ]
            .into(),
            ..Default::default()
        };
        Policy::compile(
            &callers,
            [EnvironmentSettings {
                environment: Environment::Production,
                short_form: AccessPolicy::default(),
                access: Some(&access),
            }],
        )
        .unwrap()
    }

    #[test]
    fn named_callers_and_their_rules() {
        let policy = rules();
        let prod = Environment::Production;
        let billing = unix(1000, 1000, &[], Some("billing.service"));
        let same_user_other_unit = unix(1000, 1000, &[], Some("other.service"));
        let reports = unix(2000, 2000, &[3000], None);
        let (get, post) = (http::Method::GET, http::Method::POST);

        assert!(policy.may_get_token(prod, &billing));
        assert!(policy.may_get_token(prod, &agent()));
        assert!(
            !policy.may_get_token(prod, &same_user_other_unit),
            "every kind listed must match"
        );
        assert!(!policy.may_get_token(prod, &reports), "proxy only: never the token");
        assert!(!policy.may_get_token(prod, &Caller::Anonymous));

        assert_eq!(policy.may_proxy(prod, &billing, &post, "/v2/transactions"), Ok(()));
        assert_eq!(policy.may_proxy(prod, &billing, &get, "/v2/anything/else"), Ok(()));
        assert_eq!(
            policy.may_proxy(prod, &billing, &post, "/v2/refunds"),
            Err(ProxyRefusal::RouteNotAllowed)
        );
        assert_eq!(policy.may_proxy(prod, &reports, &get, "/v2/transactions/7"), Ok(()));
        assert_eq!(
            policy.may_proxy(prod, &reports, &get, "/v2/payments"),
            Err(ProxyRefusal::RouteNotAllowed)
        );
        assert_eq!(
            policy.may_proxy(prod, &agent(), &get, "/v2/transactions"),
            Err(ProxyRefusal::CallerNotAllowed),
            "a token-only caller has no proxy routes"
        );
        assert_eq!(
            policy.may_proxy(prod, &Caller::Anonymous, &get, "/v2/transactions"),
            Err(ProxyRefusal::CallerNotAllowed)
        );
        // An environment the policy does not name is open.
        assert!(policy.may_get_token(Environment::Sandbox, &Caller::Anonymous));
        assert_eq!(policy.label_of(&billing), "billing");
        assert_eq!(policy.label_of(&same_user_other_unit), "unnamed");
        assert_eq!(policy.label_of(&Caller::Anonymous), "anonymous");

        let (table, unused) = policy.table();
        assert!(
            table.contains(
                &"access: reports → production: proxy only (never the token): GET /v2/transactions/**".to_owned()
            ),
            "{table:?}"
        );
        assert!(
            table.contains(
                &"access: billing → production: gets the token; proxy: GET /v2/**, POST /v2/transactions".to_owned()
            ),
            "{table:?}"
        );
        assert_eq!(unused, ["callers.unused: no environment's access uses it"]);
    }

    #[test]
    fn problems_are_all_reported() {
        let callers: BTreeMap<String, CallerConfig> = [
            ("empty".to_owned(), CallerConfig::default()),
            (
                "socket".to_owned(),
                CallerConfig {
                    systemd_units: vec!["billing.socket".into()],
                    ..Default::default()
                },
            ),
        ]
        .into();
        let access = AccessConfig {
            token: vec!["nobody".into()],
            proxy: [("empty".to_owned(), vec!["GET v2".to_owned()])].into(),
            refresh_per_minute: Some(0),
            ..Default::default()
        };
        let problems = Policy::compile(
            &callers,
            [EnvironmentSettings {
                environment: Environment::Sandbox,
                short_form: AccessPolicy {
                    uids: vec![1],
                    ..Default::default()
                },
                access: Some(&access),
            }],
        )
        .unwrap_err();
        assert_eq!(problems.len(), 6, "{problems:#?}");
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("environments.sandbox.access.refresh_per_minute"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("callers.empty: names no identity"))
        );
        assert!(problems.iter().any(|p| p.starts_with("callers.socket: systemd_units")));
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("environments.sandbox.access.token: \"nobody\""))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("environments.sandbox.access.proxy.empty:"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("environments.sandbox: allowed_unix_users"))
        );
    }
}
