//! The agent's view of its hub: the `[upstream]` settings, the addresses an
//! environment follows (`environments.NAME.upstream`), and
//! [`GrpcUpstream`], the gRPC client a following TokenSource uses. It
//! fails over between the listed addresses and every address a DNS name
//! resolves to (a headless Kubernetes Service lists each hub replica), and
//! checks every token it receives before the source may serve it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, timeout};
use tonic::Code;
use tonic::transport::Channel;

use crate::certs::client::ClientTls;
use crate::dial::{ClientTlsFiles, ConnectError, Target};
use crate::environment::Environment;
use crate::oauth::ErrorClass;
use crate::token::{Failure, Following, Received, Update, Upstream};
use crate::wire::pb::token_broker_client::TokenBrokerClient;
use crate::wire::pb::{self, watch_token_response};
use crate::wire::{duration_from_pb, pb_duration};

/// `[upstream]`: how an agent reaches its hub brokers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSettings {
    /// The CA that signed the hubs' certificates (`https://` upstreams);
    /// without it, the system roots (the bundled set where there are none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// This agent's client certificate and key, for hubs that admit agents
    /// by certificate (`allowed_tls_clients`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Connect timeout, and the deadline of each call and of a stream's
    /// first update (5 s).
    #[serde(with = "crate::duration::serde")]
    pub timeout: Duration,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            ca_file: None,
            cert_file: None,
            key_file: None,
            timeout: Duration::from_secs(5),
        }
    }
}

impl UpstreamSettings {
    /// Problems with the values, each starting with its key.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.cert_file.is_some() != self.key_file.is_some() {
            out.push("cert_file and key_file: set both (a client certificate and its key) or neither".into());
        }
        if let Some(p) =
            crate::duration::out_of_range(self.timeout, Duration::from_millis(100), Duration::from_secs(300))
        {
            out.push(format!("timeout: {p}"));
        }
        out
    }

    pub fn tls_files(&self) -> ClientTlsFiles {
        ClientTlsFiles {
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        }
    }
}

/// One upstream broker address, parsed once (from `environments.NAME.upstream`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamAddr {
    /// `unix:/path`.
    Unix(std::path::PathBuf),
    /// `http://host:port` or `https://host:port`; a DNS name stands for
    /// every address it resolves to.
    Network { https: bool, host: String, port: u16 },
}

impl std::str::FromStr for UpstreamAddr {
    type Err = String;

    fn from_str(addr: &str) -> Result<Self, String> {
        let expected = || format!("{addr:?}: expected unix:/path, http://host:port or https://host:port");
        if let Some(path) = addr.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("{addr:?}: a Unix socket needs an absolute path (unix:/run/…)"));
            }
            return Ok(UpstreamAddr::Unix(path.into()));
        }
        let url = url::Url::parse(addr).map_err(|_| expected())?;
        let (Some(host), true) = (url.host_str(), matches!(url.scheme(), "http" | "https")) else {
            return Err(expected());
        };
        let Some(port) = url.port() else {
            return Err(format!("{addr:?}: name the port (the hub's gRPC port, e.g. :50051)"));
        };
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            return Err(format!("{addr:?}: an upstream address has no path"));
        }
        Ok(UpstreamAddr::Network {
            https: url.scheme() == "https",
            host: host.to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            UpstreamAddr::Network { https, host, port } => {
                write!(f, "{}://{host}:{port}", if *https { "https" } else { "http" })
            }
        }
    }
}

impl UpstreamAddr {
    /// Whether tokens from here would cross a network in clear text.
    pub fn is_cleartext_network(&self) -> bool {
        match self {
            UpstreamAddr::Unix(_) => false,
            UpstreamAddr::Network { https, host, .. } => {
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                let loopback = bare == "localhost" || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
                !https && !loopback
            }
        }
    }

    /// Whether this hub is reached over TLS.
    pub fn is_https(&self) -> bool {
        matches!(self, UpstreamAddr::Network { https: true, .. })
    }
}

/// Follows an environment on the first hub of `addresses` that answers.
pub struct GrpcUpstream {
    addresses: Vec<UpstreamAddr>,
    settings: UpstreamSettings,
    /// Where the next attempt starts: each (re)connection starts one
    /// further, so a lost replica's agents try another one first.
    rotation: AtomicUsize,
    /// The connection the stream was opened on, for forwarded calls.
    current: Mutex<Option<(Channel, String)>>,
    /// TLS to `https://` hubs, kept loaded: its files rotate in place.
    tls: Option<Arc<ClientTls>>,
}

impl GrpcUpstream {
    /// `tls`: the loaded `[upstream]` TLS material (needed for `https://`
    /// addresses; without it each connection reads the files).
    pub fn new(addresses: Vec<UpstreamAddr>, settings: UpstreamSettings, tls: Option<Arc<ClientTls>>) -> Self {
        Self {
            addresses,
            settings,
            rotation: AtomicUsize::new(rand::random::<u32>() as usize),
            current: Mutex::new(None),
            tls,
        }
    }

    /// Every address to try, DNS names expanded to each address they
    /// resolve to; plus why each unresolvable one was left out.
    async fn candidates(&self) -> (Vec<(Target, String)>, Vec<String>) {
        let (mut found, mut problems) = (Vec::new(), Vec::new());
        for addr in &self.addresses {
            let text = addr.to_string();
            let mut target = Target::new(text.clone(), self.settings.timeout);
            let UpstreamAddr::Network { https, host, port } = addr else {
                found.push((target, text));
                continue;
            };
            match (https, &self.tls) {
                (true, Some(tls)) => target.client_tls = Some(tls.clone()),
                (true, None) => target.tls = self.settings.tls_files(),
                (false, _) => {}
            }
            match resolve(host, *port, self.settings.timeout).await {
                Ok(resolved) => found.extend(resolved.into_iter().map(|socket_addr| {
                    let mut target = target.clone();
                    target.connect_to = Some(socket_addr);
                    (target, format!("{addr} ({socket_addr})"))
                })),
                Err(why) => problems.push(format!("{text}: {why}")),
            }
        }
        (found, problems)
    }

    fn channel(&self) -> Result<(Channel, String), Failure> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Failure::new(ErrorClass::Transient, "not connected to an upstream broker"))
    }

    /// Opens WatchToken on one hub and waits for its first update.
    async fn open(&self, target: &Target, label: &str, env: Environment) -> Result<(Following, Channel), Failure> {
        let channel = crate::dial::channel(target)
            .await
            .map_err(|e| connect_failure(label, e))?;
        let mut client = TokenBrokerClient::new(channel.clone());
        let sent = Instant::now();
        let request = pb::WatchTokenRequest {
            environment: pb::Environment::from(env) as i32,
        };
        let wait = self.settings.timeout;
        let span = traced("follow", label);
        let watch = client.watch_token(with_context(request, &span));
        let mut stream = timeout(wait, tracing::Instrument::instrument(watch, span))
            .await
            .map_err(|_| timed_out(label, wait))?
            .map_err(|s| status_failure(label, s))?
            .into_inner();
        let first = timeout(wait, stream.message())
            .await
            .map_err(|_| timed_out(label, wait))?
            .map_err(|s| status_failure(label, s))?
            .ok_or_else(|| Failure::new(ErrorClass::Transient, format!("{label}: ended the stream at once")))?;
        let round_trip = sent.elapsed();
        let first = update_from_pb(first, env).map_err(|why| invalid(label, why))?;
        let stream_label = label.to_owned();
        let updates = stream
            .map(move |item| match item {
                Ok(message) => update_from_pb(message, env).map_err(|why| invalid(&stream_label, why)),
                Err(status) => Err(status_failure(&stream_label, status)),
            })
            .boxed();
        let following = Following {
            first,
            round_trip,
            updates,
            upstream: label.to_owned(),
            renew_at: target
                .client_tls
                .as_ref()
                .and_then(|tls| tls.certificate())
                .and_then(|cert| renewal(cert.not_before, cert.not_after, std::time::SystemTime::now())),
        };
        Ok((following, channel))
    }

    async fn unary<F, Fut>(&self, env: Environment, call: F) -> Result<Received, Failure>
    where
        F: FnOnce(TokenBrokerClient<Channel>, tracing::Span) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Option<pb::Token>>, tonic::Status>>,
    {
        let (channel, label) = self.channel()?;
        let wait = self.settings.timeout;
        let span = traced("upstream call", &label);
        let answer = timeout(
            wait,
            tracing::Instrument::instrument(call(TokenBrokerClient::new(channel), span.clone()), span),
        )
        .await
        .map_err(|_| timed_out(&label, wait))?
        .map_err(|s| status_failure(&label, s))?;
        received_from_pb(answer.into_inner(), env).map_err(|why| invalid(&label, why))
    }
}

impl Upstream for GrpcUpstream {
    async fn follow(&self, env: Environment) -> Result<Following, Failure> {
        let (candidates, mut problems) = self.candidates().await;
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        let mut all_permanent = !candidates.is_empty();
        let mut retry_after = None;
        for i in 0..candidates.len() {
            let (target, label) = &candidates[(start + i) % candidates.len()];
            match self.open(target, label, env).await {
                Ok((following, channel)) => {
                    *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((channel, label.clone()));
                    return Ok(following);
                }
                Err(failure) => {
                    all_permanent &= failure.class == ErrorClass::Permanent;
                    retry_after = retry_after.max(failure.retry_after);
                    problems.push(failure.message);
                }
            }
        }
        Err(Failure {
            message: format!("no upstream broker answered: {}", problems.join("; ")),
            class: if all_permanent {
                ErrorClass::Permanent
            } else {
                ErrorClass::Transient
            },
            retry_after,
        })
    }

    async fn get(&self, env: Environment, min_remaining: Duration) -> Result<Received, Failure> {
        let request = pb::GetTokenRequest {
            environment: pb::Environment::from(env) as i32,
            min_remaining: Some(pb_duration(min_remaining)),
        };
        self.unary(env, |mut client, span| async move {
            client
                .get_token(with_context(request, &span))
                .await
                .map(|r| r.map(|m| m.token))
        })
        .await
    }

    async fn replace(&self, env: Environment, rejected_token_id: String) -> Result<Received, Failure> {
        let request = pb::RefreshTokenRequest {
            environment: pb::Environment::from(env) as i32,
            rejected_token_id,
        };
        self.unary(env, |mut client, span| async move {
            client
                .refresh_token(with_context(request, &span))
                .await
                .map(|r| r.map(|m| m.token))
        })
        .await
    }
}

/// With traces on, a client span for a call to a hub (`Span::none()` off).
fn traced(name: &'static str, upstream: &str) -> tracing::Span {
    if crate::telemetry::enabled() {
        tracing::info_span!("upstream", otel.name = name, otel.kind = "client", upstream = upstream)
    } else {
        tracing::Span::none()
    }
}

/// A request to a hub carrying `span`'s trace context (when traces are on).
fn with_context<T>(message: T, span: &tracing::Span) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if crate::telemetry::enabled() {
        crate::telemetry::inject_metadata(span, request.metadata_mut());
    }
    request
}

/// When a connection opened with a client certificate valid from
/// `not_before` to `not_after` is replaced by a new one (with the newest
/// certificate): at nine tenths of its validity (for a one-hour SVID, six
/// minutes before it ends); `None` when that moment has passed (renewing
/// at once would only loop on a certificate nobody renewed).
fn renewal(
    not_before: std::time::SystemTime,
    not_after: std::time::SystemTime,
    now: std::time::SystemTime,
) -> Option<Instant> {
    let life = not_after.duration_since(not_before).ok()?;
    let at = not_before + life.mul_f64(0.9);
    Some(Instant::now() + at.duration_since(now).ok()?)
}

/// Every address `host` resolves to.
async fn resolve(host: &str, port: u16, wait: Duration) -> Result<Vec<SocketAddr>, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let found = timeout(wait, tokio::net::lookup_host((host.as_str(), port)))
        .await
        .map_err(|_| format!("resolving {host} took longer than {wait:?}"))?
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    let mut found: Vec<SocketAddr> = found.collect();
    found.dedup();
    if found.is_empty() {
        return Err(format!("{host} resolves to no address"));
    }
    Ok(found)
}

fn timed_out(label: &str, wait: Duration) -> Failure {
    Failure::new(ErrorClass::Transient, format!("{label}: no answer within {wait:?}"))
}

fn invalid(label: &str, why: String) -> Failure {
    Failure::new(ErrorClass::Transient, format!("{label}: sent an invalid token: {why}"))
}

/// A hub that could not be reached: worth retrying, unless the address or
/// TLS files cannot work at all.
fn connect_failure(label: &str, error: ConnectError) -> Failure {
    let class = match error {
        ConnectError::Usage(_) => ErrorClass::Permanent,
        ConnectError::Unreachable { .. } => ErrorClass::Transient,
    };
    Failure::new(class, format!("{label}: {error}"))
}

/// A hub's refusal: permanent when asking again cannot help (not allowed,
/// environment not enabled there), else transient; RetryInfo is honoured.
fn status_failure(label: &str, status: tonic::Status) -> Failure {
    use tonic_types::StatusExt;
    let retry_after = status.get_error_details().retry_info().and_then(|r| r.retry_delay);
    let class = match status.code() {
        Code::PermissionDenied | Code::FailedPrecondition | Code::InvalidArgument | Code::Unimplemented => {
            ErrorClass::Permanent
        }
        _ => ErrorClass::Transient,
    };
    let message = format!("{label}: {:?}: {}", status.code(), status.message());
    Failure {
        message,
        class,
        retry_after,
    }
}

fn update_from_pb(message: pb::WatchTokenResponse, env: Environment) -> Result<Update, String> {
    match message.update {
        Some(watch_token_response::Update::Token(token)) => received_from_pb(Some(token), env).map(Update::Token),
        Some(watch_token_response::Update::Outage(outage)) => Ok(Update::Outage { reason: outage.reason }),
        None => Err("an update with neither a token nor an outage".into()),
    }
}

/// Checks a token from the hub: the environment asked for, a fingerprint
/// that matches, a positive lifetime, and a serve window within it. The
/// error never quotes the token.
fn received_from_pb(token: Option<pb::Token>, env: Environment) -> Result<Received, String> {
    let token = token.ok_or("an answer without a token")?;
    if crate::wire::environment_from_pb(token.environment) != Some(env) {
        return Err(format!(
            "a token for environment {} (asked for {env})",
            token.environment
        ));
    }
    if token.access_token.is_empty() {
        return Err("an empty access token".into());
    }
    if crate::token::token_id(&token.access_token) != token.token_id {
        // Not quoted: from a confused upstream it could be anything.
        return Err("its token_id does not match the access token".into());
    }
    let (Some(issued), Some(expires)) = (token.issued_at, token.expires_at) else {
        return Err("no issued_at or expires_at".into());
    };
    let nanos = |t: &prost_types::Timestamp| i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    let lifetime_nanos = nanos(&expires) - nanos(&issued);
    if lifetime_nanos <= 0 || lifetime_nanos > 86_400 * 1_000_000_000 {
        return Err("a lifetime (expires_at − issued_at) outside 0 to 24 h".into());
    }
    let lifetime = Duration::from_nanos(lifetime_nanos as u64);
    let serve_for = token
        .serve_for
        .ok_or("no serve_for (the upstream broker is older than this agent; upgrade the hubs first)")?;
    let serve_for = duration_from_pb(&serve_for).map_err(|e| format!("serve_for {e}"))?;
    if serve_for > lifetime {
        return Err(format!(
            "serve_for {serve_for:?} is longer than the lifetime {lifetime:?}"
        ));
    }
    Ok(Received {
        access_token: SecretString::from(token.access_token),
        token_type: token.token_type,
        lifetime,
        serve_for,
    })
}

#[cfg(test)]
mod tests {
    use super::{UpstreamAddr, UpstreamSettings, received_from_pb};
    use crate::Environment;
    use crate::wire::pb;
    use std::time::Duration;

    /// A hub's answer: a 900 s token with sub-second instants, served 880 s more.
    fn answer() -> pb::Token {
        let access_token = "hub-token".to_owned();
        pb::Token {
            token_id: crate::token::token_id(&access_token),
            access_token,
            token_type: "Bearer".into(),
            issued_at: Some(prost_types::Timestamp {
                seconds: 1_764_556_800,
                nanos: 900_000_000,
            }),
            expires_at: Some(prost_types::Timestamp {
                seconds: 1_764_557_701,
                nanos: 100_000_000,
            }),
            environment: pb::Environment::Sandbox as i32,
            serve_for: Some(prost_types::Duration { seconds: 880, nanos: 0 }),
        }
    }

    #[test]
    fn every_received_token_is_checked_before_it_is_served() {
        let received = received_from_pb(Some(answer()), Environment::Sandbox).unwrap();
        assert_eq!(received.lifetime, Duration::from_millis(900_200));
        assert_eq!(received.serve_for, Duration::from_secs(880));
        let refused = |change: &dyn Fn(&mut pb::Token), env: Environment, why: &str| {
            let mut token = answer();
            change(&mut token);
            let Err(error) = received_from_pb(Some(token), env) else {
                panic!("{why}: accepted");
            };
            assert!(error.contains(why), "{why}: {error}");
        };
        let at = |seconds: i64| Some(prost_types::Timestamp { seconds, nanos: 0 });
        refused(&|_| {}, Environment::Production, "asked for production");
        refused(&|t| t.access_token.clear(), Environment::Sandbox, "empty access token");
        refused(
            &|t| t.token_id = "0123456789ab".into(),
            Environment::Sandbox,
            "does not match",
        );
        refused(&|t| t.expires_at = None, Environment::Sandbox, "no issued_at");
        refused(
            &|t| t.expires_at = t.issued_at,
            Environment::Sandbox,
            "outside 0 to 24 h",
        );
        refused(
            &|t| (t.issued_at, t.expires_at) = (at(2_000), at(1_000)),
            Environment::Sandbox,
            "outside 0 to 24 h",
        );
        refused(
            &|t| (t.issued_at, t.expires_at) = (at(0), at(86_401)),
            Environment::Sandbox,
            "outside 0 to 24 h",
        );
        refused(&|t| t.serve_for = None, Environment::Sandbox, "no serve_for");
        refused(
            &|t| t.serve_for = Some(prost_types::Duration { seconds: 901, nanos: 0 }),
            Environment::Sandbox,
            "longer than the lifetime",
        );
        assert!(received_from_pb(None, Environment::Sandbox).is_err());
        // A window as long as the lifetime is taken.
        let mut whole = answer();
        whole.serve_for = Some(prost_types::Duration {
            seconds: 900,
            nanos: 200_000_000,
        });
        assert_eq!(
            received_from_pb(Some(whole), Environment::Sandbox).unwrap().serve_for,
            Duration::from_millis(900_200)
        );
        // A whole day is the longest lifetime taken.
        let mut day = answer();
        (day.issued_at, day.expires_at) = (at(0), at(86_400));
        assert_eq!(
            received_from_pb(Some(day), Environment::Sandbox).unwrap().lifetime,
            Duration::from_secs(86_400)
        );
    }

    #[test]
    fn settings_name_each_problem_by_key() {
        assert!(UpstreamSettings::default().problems().is_empty());
        let half_pair = UpstreamSettings {
            cert_file: Some("/a.pem".into()),
            ..Default::default()
        };
        assert_eq!(half_pair.problems().len(), 1);
        assert!(half_pair.problems()[0].starts_with("cert_file and key_file"));
        let key_only = UpstreamSettings {
            key_file: Some("/a.key".into()),
            ..Default::default()
        };
        assert_eq!(key_only.problems().len(), 1);
        for (timeout, ok) in [
            (Duration::from_millis(50), false),
            (Duration::from_secs(5), true),
            (Duration::from_secs(301), false),
        ] {
            let settings = UpstreamSettings {
                timeout,
                ..Default::default()
            };
            assert_eq!(settings.problems().is_empty(), ok, "{timeout:?}");
        }
        let tls = UpstreamSettings {
            ca_file: Some("/ca.pem".into()),
            cert_file: Some("/c.pem".into()),
            key_file: Some("/c.key".into()),
            ..Default::default()
        }
        .tls_files();
        assert_eq!(
            (tls.ca_file, tls.cert_file, tls.key_file),
            (Some("/ca.pem".into()), Some("/c.pem".into()), Some("/c.key".into()))
        );
    }

    #[test]
    fn addresses_are_parsed_once_and_written_back_as_given() {
        for text in [
            "unix:/run/hub/broker.sock",
            "https://hub.example:50051",
            "http://127.0.0.1:50051",
            "http://[::1]:50051",
        ] {
            let addr: UpstreamAddr = text.parse().unwrap();
            assert_eq!(addr.to_string(), text);
        }
        for (text, problem) in [
            ("hub:50051", "expected unix:/path"),
            ("https://hub", "name the port"),
            ("unix:relative.sock", "absolute path"),
            ("https://hub:50051/v1", "has no path"),
            ("ftp://hub:21", "expected unix:/path"),
        ] {
            let error = text.parse::<UpstreamAddr>().unwrap_err();
            assert!(error.contains(problem), "{text}: {error}");
        }
    }

    #[test]
    fn cleartext_is_named_only_off_the_host() {
        let cleartext = |text: &str| text.parse::<UpstreamAddr>().unwrap().is_cleartext_network();
        assert!(cleartext("http://10.0.0.7:50051"));
        assert!(cleartext("http://hub.example:50051"));
        assert!(!cleartext("http://127.0.0.1:50051"));
        assert!(!cleartext("http://[::1]:50051"));
        assert!(!cleartext("http://localhost:50051"));
        assert!(!cleartext("https://hub.example:50051"));
        assert!(!cleartext("unix:/run/hub.sock"));
        assert!("https://hub.example:50051".parse::<UpstreamAddr>().unwrap().is_https());
        assert!(!"http://hub.example:50051".parse::<UpstreamAddr>().unwrap().is_https());
    }
}
