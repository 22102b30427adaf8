//! Prometheus metrics: one registry, the families the daemon records, and the
//! text encoding the admin listener serves. Names are listed in the README.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// Log lines dropped because stderr could not take them (exported as
/// `flute_broker_log_lines_dropped_total`). A process-wide counter, not a
/// registry member: logging starts before any registry exists and counts
/// into it from there.
pub static DROPPED_LOG_LINES: std::sync::LazyLock<prometheus_client::metrics::counter::Counter> =
    std::sync::LazyLock::new(Default::default);

/// Spans of traces (`[telemetry]`), process-wide for the same reason: the
/// exporter starts with logging. `ended`: sampled spans handed to the
/// exporter's queue; `exported`: those a collector took; `failed`: those in
/// exports that failed. The queue drops what does not fit: ended −
/// exported − failed, once the queue is empty.
pub static TRACE_SPANS: std::sync::LazyLock<Family<SpanOutcomeLabels, prometheus_client::metrics::counter::Counter>> =
    std::sync::LazyLock::new(Default::default);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpanOutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    pub environment: &'static str,
    pub grant: &'static str,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EnvLabels {
    pub environment: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    /// `grpc`, or `http` for the HTTP/JSON read.
    pub protocol: &'static str,
    pub method: &'static str,
    pub code: &'static str,
}

/// One listener: `grpc:ADDRESS` or `admin:ADDRESS`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    pub listener: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// A proxied request's outcome: its environment and HTTP status class
/// (`2xx` … `5xx`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyLabels {
    pub environment: &'static str,
    pub class: &'static str,
}

/// A named caller's outcome: the caller (a configured name, `unnamed` or
/// `anonymous`: a bounded set), its environment, and the refusal reason or
/// the proxied answer's status class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallerLabels {
    pub caller: String,
    pub environment: &'static str,
    pub outcome: &'static str,
}

/// Why the proxy passed an API 401 through instead of retrying.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NotRetriedLabels {
    pub environment: &'static str,
    pub reason: &'static str,
}

/// An outcome (`ok`, `failed`) in one environment.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultEnvLabels {
    pub environment: &'static str,
    pub result: &'static str,
}

/// A TLS material reload: which material (`server`, `upstream`,
/// `token_endpoint_roots`) and whether it was taken (`ok`, `failed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsReloadLabels {
    pub material: &'static str,
    pub result: &'static str,
}

/// A certificate in use, by role (`server`, `client_ca`, `upstream_client`,
/// `upstream_ca`, `token_endpoint_roots`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsRoleLabels {
    pub role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

type HistogramFamily = Family<EnvLabels, Histogram, fn() -> Histogram>;

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    pub refreshes: Family<RefreshLabels, Counter>,
    pub endpoint_latency: HistogramFamily,
    pub seconds_until_expiry: Family<EnvLabels, Gauge<f64, AtomicU64>>,
    pub token_valid: Family<EnvLabels, Gauge>,
    pub consecutive_failures: Family<EnvLabels, Gauge>,
    pub grpc_requests: Family<GrpcLabels, Counter>,
    pub watch_streams: Gauge,
    pub credential_reloads: Family<ResultLabels, Counter>,
    /// Completed checks of the key files by the poller.
    pub credential_polls: Counter,
    /// Open connections per listener.
    pub connections: Family<ListenerLabels, Gauge>,
    /// Times a listener's connection budget was full.
    pub connection_limit_reached: Family<ListenerLabels, Counter>,
    /// Connections closed by a deadline (`handshake_timeout`, `idle_timeout`).
    pub connections_closed: Family<ClosedLabels, Counter>,
    /// Failed accept calls (EMFILE and the like).
    pub accept_errors: Family<ListenerLabels, Counter>,
    /// Requests that filled their connection's concurrent stream limit.
    pub stream_limit_reached: Family<ListenerLabels, Counter>,
    /// Refusals per caller (`outcome`: the reason, RATE_LIMITED included).
    pub caller_refusals: Family<CallerLabels, Counter>,
    /// Proxied requests per caller (`outcome`: the status class).
    pub caller_proxy_requests: Family<CallerLabels, Counter>,
    /// Audit records that could not be written (or were dropped).
    pub audit_failures: Counter,
    /// Held requests (long polls, WatchToken streams) open per listener.
    pub held_requests: Family<ListenerLabels, Gauge>,
    /// Connections with at least one held request open, per listener.
    pub held_connections: Family<ListenerLabels, Gauge>,
    /// Held requests refused because the listener's share of holding
    /// connections was taken.
    pub held_requests_refused: Family<ListenerLabels, Counter>,
    /// Proxied requests by environment and the status class answered.
    pub proxy_requests: Family<ProxyLabels, Counter>,
    /// Proxied requests sent again after an API 401, with a new token.
    pub proxy_retried: Family<EnvLabels, Counter>,
    /// API 401s passed through, by the reason the broker did not retry.
    pub proxy_not_retried: Family<NotRetriedLabels, Counter>,
    /// From sending a request to the API until its response head.
    pub proxy_upstream_latency: HistogramFamily,
    /// Connections to the API the proxy holds open (pooled or in use).
    pub proxy_upstream_connections: Family<EnvLabels, Gauge>,
    /// Reloads of TLS material after its files changed, by outcome.
    pub tls_reloads: Family<TlsReloadLabels, Counter>,
    /// When each certificate in use expires (seconds since the epoch).
    pub tls_certificate_expiry: Family<TlsRoleLabels, Gauge<f64, AtomicU64>>,
    /// An agent's follow streams replaced by a new connection before the
    /// client certificate they were opened with expired.
    pub upstream_renewals: Family<ResultEnvLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flute_broker");
        let refreshes = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "token_refreshes",
            "Token endpoint requests by environment, grant and result",
            refreshes.clone(),
        );
        let endpoint_latency: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 14)));
        registry.register(
            "token_endpoint_request_duration_seconds",
            "Token endpoint request latency",
            endpoint_latency.clone(),
        );
        let seconds_until_expiry = Family::<EnvLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "token_seconds_until_expiry",
            "Seconds until the current token expires (0 without a token)",
            seconds_until_expiry.clone(),
        );
        let token_valid = Family::<EnvLabels, Gauge>::default();
        registry.register(
            "token_valid",
            "1 while the environment holds a token that is handed out",
            token_valid.clone(),
        );
        let consecutive_failures = Family::<EnvLabels, Gauge>::default();
        registry.register(
            "token_consecutive_failures",
            "Token endpoint failures since the last success",
            consecutive_failures.clone(),
        );
        let grpc_requests = Family::<GrpcLabels, Counter>::default();
        registry.register(
            "grpc_requests",
            "API calls by protocol (grpc, or http for the HTTP/JSON read), method and gRPC status code",
            grpc_requests.clone(),
        );
        let watch_streams = Gauge::default();
        registry.register("watch_streams", "Open WatchToken streams", watch_streams.clone());
        let credential_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "credential_reloads",
            "API key reloads by result",
            credential_reloads.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Build information", build_info);
        let credential_polls = Counter::default();
        registry.register(
            "credential_polls",
            "Completed checks of the API key files for changes",
            credential_polls.clone(),
        );
        let connections = Family::<ListenerLabels, Gauge>::default();
        registry.register("connections", "Open connections per listener", connections.clone());
        let connection_limit_reached = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "connection_limit_reached",
            "Times a listener's connection budget was full (new connections wait)",
            connection_limit_reached.clone(),
        );
        let connections_closed = Family::<ClosedLabels, Counter>::default();
        registry.register(
            "connections_closed",
            "Connections closed by a deadline, by reason",
            connections_closed.clone(),
        );
        let accept_errors = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "accept_errors",
            "Failed accept calls per listener",
            accept_errors.clone(),
        );
        let stream_limit_reached = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "stream_limit_reached",
            "Requests that filled their connection's concurrent stream limit",
            stream_limit_reached.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because stderr could not be written",
            DROPPED_LOG_LINES.clone(),
        );
        registry.register(
            "trace_spans",
            "Sampled trace spans: ended (queued for export), exported, failed (in exports that failed); the queue drops the rest",
            TRACE_SPANS.clone(),
        );
        let caller_refusals = Family::<CallerLabels, Counter>::default();
        registry.register(
            "caller_refusals",
            "Requests refused per caller (configured name, unnamed or anonymous), environment and reason",
            caller_refusals.clone(),
        );
        let caller_proxy_requests = Family::<CallerLabels, Counter>::default();
        registry.register(
            "caller_proxy_requests",
            "Proxied requests per caller (configured name, unnamed or anonymous), environment and status class",
            caller_proxy_requests.clone(),
        );
        let audit_failures = Counter::default();
        registry.register(
            "audit_failures",
            "Audit records that could not be written to the audit file, or were dropped",
            audit_failures.clone(),
        );
        let held_requests = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "held_requests",
            "Held requests (long polls, WatchToken streams) open per listener",
            held_requests.clone(),
        );
        let held_connections = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "held_connections",
            "Connections with at least one held request open per listener (they count against server.held_requests_percent)",
            held_connections.clone(),
        );
        let held_requests_refused = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "held_requests_refused",
            "Held requests refused at once because the listener's share of holding connections (server.held_requests_percent) was taken",
            held_requests_refused.clone(),
        );
        let proxy_requests = Family::<ProxyLabels, Counter>::default();
        registry.register(
            "proxy_requests",
            "Requests through the API proxy by environment and HTTP status class",
            proxy_requests.clone(),
        );
        let proxy_retried = Family::<EnvLabels, Counter>::default();
        registry.register(
            "proxy_retried",
            "Proxied requests sent once more with a new token after the API answered 401",
            proxy_retried.clone(),
        );
        let proxy_not_retried = Family::<NotRetriedLabels, Counter>::default();
        registry.register(
            "proxy_not_retried",
            "API 401s passed through to the caller, by why the broker did not retry",
            proxy_not_retried.clone(),
        );
        let proxy_upstream_latency: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16)));
        registry.register(
            "proxy_upstream_duration_seconds",
            "API latency through the proxy: request sent until response head",
            proxy_upstream_latency.clone(),
        );
        let proxy_upstream_connections = Family::<EnvLabels, Gauge>::default();
        registry.register(
            "proxy_upstream_connections",
            "Connections to the Flute API the proxy holds open, pooled or in use",
            proxy_upstream_connections.clone(),
        );
        let tls_reloads = Family::<TlsReloadLabels, Counter>::default();
        registry.register(
            "tls_reloads",
            "Reloads of TLS material after its files changed: ok (taken) or failed (the last good material stays)",
            tls_reloads.clone(),
        );
        let tls_certificate_expiry = Family::<TlsRoleLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When each TLS certificate in use expires, by role (for a CA bundle: its earliest)",
            tls_certificate_expiry.clone(),
        );
        let upstream_renewals = Family::<ResultEnvLabels, Counter>::default();
        registry.register(
            "upstream_renewals",
            "Follow streams replaced by a new connection (opened first) before their client certificate expired: ok, or failed (tried again in a second while the old stream goes on)",
            upstream_renewals.clone(),
        );
        Self {
            registry,
            upstream_renewals,
            tls_reloads,
            tls_certificate_expiry,
            proxy_upstream_connections,
            proxy_requests,
            proxy_retried,
            proxy_not_retried,
            proxy_upstream_latency,
            refreshes,
            endpoint_latency,
            seconds_until_expiry,
            token_valid,
            consecutive_failures,
            grpc_requests,
            watch_streams,
            credential_reloads,
            credential_polls,
            connections,
            connection_limit_reached,
            connections_closed,
            accept_errors,
            stream_limit_reached,
            caller_refusals,
            caller_proxy_requests,
            audit_failures,
            held_requests,
            held_connections,
            held_requests_refused,
        }
    }

    pub fn record_refresh(&self, environment: &'static str, grant: &'static str, result: &str, took: Duration) {
        self.refreshes
            .get_or_create(&RefreshLabels {
                environment,
                grant,
                result: result.to_owned(),
            })
            .inc();
        self.endpoint_latency
            .get_or_create(&EnvLabels { environment })
            .observe(took.as_secs_f64());
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
