//! Traces over OTLP (`[telemetry]`, off by default): the exporter, the
//! sampler and the `tracing` layer that turns the broker's spans into
//! OpenTelemetry spans, plus W3C `traceparent`/`tracestate` taken from
//! incoming requests and sent on outgoing ones.
//!
//! Spans are made only while telemetry is on ([`enabled`], one atomic load
//! per request when off), and only for requests that are traced
//! ([`sampled`]: the caller's decision, else `sampling_ratio`): the others
//! cost a header lookup and a random number. The exporter batches in a bounded queue on its
//! own thread: a slow or absent collector costs requests nothing; spans
//! that do not fit are dropped (the SDK's queue). Spans are counted as
//! they end, are exported, or fail to be (`flute_broker_trace_spans_total
//! {outcome}`): ended − exported − failed is what the queue dropped. Attributes never hold a secret, a token, a refresh token or a
//! query string: only `token_id`s, environments, grants, outcomes, paths.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// `[telemetry]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The OTLP collector, e.g. `http://127.0.0.1:4317`; empty: no traces.
    pub endpoint: String,
    /// `grpc` (OTLP/gRPC) or `http/protobuf` (OTLP/HTTP: the endpoint's
    /// `/v1/traces` unless it names a path).
    pub protocol: String,
    /// `service.name` of every span.
    pub service_name: String,
    /// More resource attributes (`deployment.environment = "prod"`, …).
    pub resource_attributes: BTreeMap<String, String>,
    /// Share of requests traced when the caller sent no `traceparent` (one
    /// that did is traced as its caller decided). The broker's own
    /// background work (scheduled refreshes, follow connections) is
    /// always traced.
    pub sampling_ratio: f64,
    /// Spans held for export at most; beyond it new spans are dropped.
    pub queue_size: usize,
    /// How long one export may take.
    #[serde(with = "crate::duration::serde")]
    pub export_timeout: Duration,
    /// How often queued spans are sent.
    #[serde(with = "crate::duration::serde")]
    pub export_interval: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            protocol: "grpc".into(),
            service_name: "flute-token-broker".into(),
            resource_attributes: BTreeMap::new(),
            sampling_ratio: 1.0,
            queue_size: 2048,
            export_timeout: Duration::from_secs(5),
            export_interval: Duration::from_secs(5),
        }
    }
}

impl TelemetryConfig {
    pub fn is_enabled(&self) -> bool {
        !self.endpoint.is_empty()
    }

    /// Problems with the values, each starting with its key.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.is_enabled() {
            return out;
        }
        if !(self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://")) {
            out.push(format!(
                "endpoint: {:?} is not an http:// or https:// URL",
                self.endpoint
            ));
        }
        if self.protocol != "grpc" && self.protocol != "http/protobuf" {
            out.push(format!(
                "protocol: {:?} is not \"grpc\" (OTLP/gRPC, port 4317) or \"http/protobuf\" (OTLP/HTTP, port 4318)",
                self.protocol
            ));
        }
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            out.push(format!(
                "sampling_ratio: {} is not between 0 and 1",
                self.sampling_ratio
            ));
        }
        if self.queue_size == 0 || self.queue_size > 1_000_000 {
            out.push(format!("queue_size: {} is not between 1 and 1000000", self.queue_size));
        }
        out
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
/// `sampling_ratio` as f64 bits, read by [`sampled`].
static RATIO: AtomicU64 = AtomicU64::new(0);

/// Whether a request with these headers is traced: as its caller decided
/// (the `sampled` flag of a valid `traceparent`), else at
/// `sampling_ratio`. Decided before any span exists, so a request that is
/// not traced costs a header lookup and a random number, not a span.
pub fn sampled(headers: &http::HeaderMap) -> bool {
    if let Some(parent) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        let fields: Vec<&str> = parent.split('-').collect();
        if let [_, trace_id, span_id, flags] = fields.as_slice()
            && trace_id.len() == 32
            && span_id.len() == 16
            && let Ok(flags) = u8::from_str_radix(flags, 16)
        {
            return flags & 1 == 1;
        }
    }
    rand::random::<f64>() < f64::from_bits(RATIO.load(Ordering::Relaxed))
}

/// Whether spans are made at all (telemetry on in this process).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// What keeps the exporter running; flushes at [`Tracing::shutdown`].
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Exports what is queued, waiting at most `within`.
    pub async fn shutdown(self, within: Duration) {
        let provider = self.provider;
        let flush = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(within));
        let _ = tokio::time::timeout(within + Duration::from_millis(100), flush).await;
    }
}

/// The `tracing` layer for `config`, and what keeps its exporter running.
/// Must be called inside the Tokio runtime (the gRPC exporter's channel).
pub fn layer<S>(
    config: &TelemetryConfig,
) -> Result<
    (
        tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
        Tracing,
    ),
    String,
>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let exporter = match config.protocol.as_str() {
        "http/protobuf" => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_http_client(OtlpHttp::new()?)
            .with_endpoint(http_traces_url(&config.endpoint))
            .with_timeout(config.export_timeout)
            .build(),
        _ => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(config.export_timeout)
            .build(),
    }
    .map_err(|e| format!("telemetry.endpoint: {e}"))?;
    let batches = BatchConfigBuilder::default()
        .with_max_queue_size(config.queue_size)
        .with_scheduled_delay(config.export_interval)
        .build();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attributes(
            config
                .resource_attributes
                .iter()
                .map(|(k, v)| opentelemetry::KeyValue::new(k.clone(), v.clone())),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(Counting(
            BatchSpanProcessor::builder(Counted(exporter))
                .with_batch_config(batches)
                .build(),
        ))
        // The ratio is applied where requests enter ([`sampled`]); what
        // starts a trace of its own besides (a scheduled refresh, an
        // agent's follow connection: a few per hour) is always kept.
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("flute-token-broker");
    RATIO.store(config.sampling_ratio.to_bits(), Ordering::Relaxed);
    ENABLED.store(true, Ordering::Relaxed);
    Ok((tracing_opentelemetry::layer().with_tracer(tracer), Tracing { provider }))
}

/// OTLP/HTTP's traces URL: the endpoint as given when it names a path,
/// else its `/v1/traces`.
fn http_traces_url(endpoint: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(url) if url.path() == "/" || url.path().is_empty() => {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        }
        _ => endpoint.to_owned(),
    }
}

type HttpBody = http_body_util::Full<bytes::Bytes>;

/// The OTLP/HTTP exporter's client: this project's hyper client (HTTP/1.1,
/// TLS with the roots `oauth.tls_roots = "auto"` would trust). The exporter
/// calls it from its own thread; each request runs on the Tokio runtime it
/// was made in.
#[derive(Debug, Clone)]
struct OtlpHttp {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        HttpBody,
    >,
    runtime: tokio::runtime::Handle,
}

/// The largest answer read from a collector.
const MAX_COLLECTOR_ANSWER: usize = 4 * 1024 * 1024;

impl OtlpHttp {
    fn new() -> Result<Self, String> {
        let roots = crate::tls_roots::TlsRoots::Auto
            .load()
            .map_err(|e| format!("telemetry: {e}"))?;
        let tls = roots.client_config().map_err(|e| format!("telemetry: {e}"))?;
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| format!("telemetry: {e}"))?;
        Ok(Self { client, runtime })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpHttp {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        use http_body_util::BodyExt;
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move {
            let (parts, body) = request.into_parts();
            let response = client
                .request(http::Request::from_parts(parts, HttpBody::new(body)))
                .await?;
            let (parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, MAX_COLLECTOR_ANSWER)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
        });
        sent.await?
    }
}

fn count(outcome: &'static str, spans: usize) {
    crate::metrics::TRACE_SPANS
        .get_or_create(&crate::metrics::SpanOutcomeLabels { outcome })
        .inc_by(spans as u64);
}

/// The batch processor, counting the spans handed to it.
#[derive(Debug)]
struct Counting(BatchSpanProcessor);

impl opentelemetry_sdk::trace::SpanProcessor for Counting {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.0.on_start(span, cx);
    }

    fn on_end(&self, span: opentelemetry_sdk::trace::SpanData) {
        count("ended", 1);
        self.0.on_end(span);
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.0.set_resource(resource);
    }
}

/// The OTLP exporter, counting the spans of each export by its outcome.
#[derive(Debug)]
struct Counted<E>(E);

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<opentelemetry_sdk::trace::SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        let spans = batch.len();
        let result = self.0.export(batch).await;
        count(if result.is_ok() { "exported" } else { "failed" }, spans);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.0.set_resource(resource);
    }
}

/// The W3C trace context of `headers` (gRPC metadata and HTTP headers
/// alike) made the parent of `span`.
pub fn adopt_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    let _ = span.set_parent(parent);
}

/// Writes `span`'s W3C trace context into `headers` (a request going out).
pub fn inject(span: &tracing::Span, headers: &mut http::HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeadersMut(headers));
}

/// Writes `span`'s W3C trace context into a gRPC request's metadata.
pub fn inject_metadata(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    let mut headers = http::HeaderMap::new();
    inject(span, &mut headers);
    for (name, value) in headers.iter() {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(name.as_str().as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_bytes()),
        ) {
            metadata.insert(key, value);
        }
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut http::HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
