//! Traces over OTLP, from outside: a hub and an agent run as processes
//! with `[telemetry]` pointing at an OTLP receiver in this test; a
//! RefreshToken at the agent, sent with a `traceparent`, must arrive as
//! one trace: the agent's server span, its refresh and its call to the hub,
//! the hub's server span, its refresh and its token request, each the
//! child of the one before, with no secret or token in any attribute.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flute_token_broker::wire::pb;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

const BIN: &str = env!("CARGO_BIN_EXE_flute-token-broker");

/// One span as received: its service, name, ids and string attributes.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attributes: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
            .as_ref()
            .and_then(|v| v.value.clone())
        {
            Some(Value::StringValue(s)) => s,
            Some(Value::IntValue(i)) => i.to_string(),
            Some(Value::BoolValue(b)) => b.to_string(),
            other => format!("{other:?}"),
        };
        let mut spans = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(&kv.value))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        name: span.name.clone(),
                        trace_id: span.trace_id.clone(),
                        span_id: span.span_id.clone(),
                        parent: span.parent_span_id.clone(),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(&kv.value)))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn start_receiver() -> (String, Receiver) {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), receiver)
}

/// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf) feeding the same
/// collection as the gRPC one.
async fn start_http_receiver() -> (String, Receiver) {
    use axum::routing::post;
    let receiver = Receiver::default();
    let state = receiver.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let state = state.clone();
            async move {
                let request = <ExportTraceServiceRequest as prost::Message>::decode(body).unwrap();
                state.export(tonic::Request::new(request)).await.unwrap();
                let answer = ExportTraceServiceResponse { partial_success: None };
                (
                    [("content-type", "application/x-protobuf")],
                    prost::Message::encode_to_vec(&answer),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), receiver)
}

/// A broker's configuration in `dir` (named `name`): the test key, the
/// sandbox alone, calling `token_url`, served on the Unix socket `sock`,
/// the admin listener at `admin` (`""`: none), then `extra`.
fn broker_config(
    dir: &std::path::Path,
    name: &str,
    sock: &std::path::Path,
    token_url: &str,
    admin: &str,
    extra: &str,
) -> std::path::PathBuf {
    let secret = dir.join("secret");
    std::fs::write(&secret, support::CLIENT_SECRET).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[credentials]\nclient_id = \"{id}\"\nclient_secret_file = \"{secret}\"\n[oauth]\nallow_insecure_http = true\n[server]\nlisten = [\"unix:{sock}\"]\nshutdown_grace = \"3s\"\n[admin]\nlisten = \"{admin}\"\n[environments.production]\nenabled = false\n[environments.sandbox]\ntoken_url = \"{token_url}\"\n{extra}",
            id = support::CLIENT_ID,
            secret = secret.display(),
            sock = sock.display(),
        ),
    )
    .unwrap();
    config
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first span received that `wanted` accepts, waited for (at most 20 s).
async fn span_where(receiver: &Receiver, wanted: impl Fn(&Received) -> bool) -> Received {
    let arrived = async {
        loop {
            if let Some(span) = receiver.0.lock().unwrap().iter().find(|s| wanted(s)).cloned() {
                return span;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), arrived)
        .await
        .unwrap_or_else(|_| panic!("no such span within 20 s: {:#?}", receiver.0.lock().unwrap()))
}

fn telemetry(endpoint: &str, service: &str) -> String {
    telemetry_over(endpoint, service, "grpc")
}

fn telemetry_over(endpoint: &str, service: &str, protocol: &str) -> String {
    format!(
        "[telemetry]\nendpoint = \"{endpoint}\"\nprotocol = \"{protocol}\"\nservice_name = \"{service}\"\nexport_interval = \"100ms\"\n[telemetry.resource_attributes]\n\"deployment.environment\" = \"test\"\n"
    )
}

fn spawn(config: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn a_refresh_at_an_agent_is_one_trace_through_the_hub_to_the_token_endpoint() {
    let (endpoint, receiver) = start_receiver().await;
    let emulator = support::start_emulator(Duration::from_secs(900), false).await;
    let dir = tempfile::tempdir().unwrap();
    let (hub_sock, agent_sock) = (dir.path().join("hub.sock"), dir.path().join("agent.sock"));
    let proxy = format!(
        "[environments.sandbox.proxy]\nlisten = [\"unix:{}\"]\napi_url = \"{}\"\n",
        dir.path().join("api.sock").display(),
        emulator.base_url()
    );
    let hub_config = broker_config(
        dir.path(),
        "hub",
        &hub_sock,
        &emulator.token_url(),
        "",
        &format!("{proxy}{}", telemetry(&endpoint, "hub")),
    );
    let agent_config = dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "[server]\nlisten = [\"unix:{agent}\"]\n[admin]\nlisten = \"\"\n[environments.production]\nenabled = false\n[environments.sandbox]\nupstream = [\"unix:{hub}\"]\n{t}",
            agent = agent_sock.display(),
            hub = hub_sock.display(),
            t = telemetry(&endpoint, "agent"),
        ),
    )
    .unwrap();
    let _hub = spawn(&hub_config);
    let hub_addr = format!("unix:{}", hub_sock.display());
    support::connect_when_up(&hub_addr).await;
    let _agent = spawn(&agent_config);
    let mut agent = support::connect_when_up(&format!("unix:{}", agent_sock.display())).await;
    let first = support::current_token(&mut agent, pb::Environment::Sandbox as i32).await;

    // The caller's own trace: a RefreshToken for the token the API refused.
    let (trace_id, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut request = tonic::Request::new(pb::RefreshTokenRequest {
        environment: pb::Environment::Sandbox as i32,
        rejected_token_id: first.token_id.clone(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    let second = agent.refresh_token(request).await.unwrap().into_inner().token.unwrap();
    assert_ne!(second.token_id, first.token_id);

    let trace = || -> Vec<Received> {
        receiver
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| hex(&s.trace_id) == trace_id)
            .cloned()
            .collect()
    };
    let complete = async {
        loop {
            let spans = trace();
            if spans.iter().any(|s| s.service == "hub" && s.name == "token request") && spans.len() >= 6 {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let spans = tokio::time::timeout(Duration::from_secs(20), complete)
        .await
        .unwrap_or_else(|_| panic!("the trace reached the receiver within 20 s: {:#?}", trace()));

    // The chain, each span the child of the one before.
    let find = |service: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.service == service && s.name == name)
            .unwrap_or_else(|| panic!("no {service} span {name}: {spans:#?}"))
            .clone()
    };
    let chain = [
        find("agent", "/flute.tokenbroker.v1.TokenBroker/RefreshToken"),
        find("agent", "token refresh"),
        find("agent", "upstream call"),
        find("hub", "/flute.tokenbroker.v1.TokenBroker/RefreshToken"),
        find("hub", "token refresh"),
        find("hub", "token request"),
    ];
    assert_eq!(
        hex(&chain[0].parent),
        caller_span,
        "the agent continues the caller's trace"
    );
    for pair in chain.windows(2) {
        assert_eq!(
            pair[1].parent, pair[0].span_id,
            "{} is the child of {}",
            pair[1].name, pair[0].name
        );
    }
    assert_eq!(
        chain[4].attributes.get("attempt").map(String::as_str),
        Some("1"),
        "{:?}",
        chain[4]
    );
    let request = &chain[5];
    assert_eq!(request.attributes.get("outcome").map(String::as_str), Some("ok"));
    assert_eq!(request.attributes.get("token_id"), Some(&second.token_id));
    // Printed for the record: the tree as received.
    for (depth, span) in chain.iter().enumerate() {
        eprintln!(
            "{}{} / {} {:?}",
            "  ".repeat(depth),
            span.service,
            span.name,
            span.attributes
        );
    }
    // A proxied API call continues the caller's trace: the API gets a
    // traceparent with the caller's trace id, its parent the hub's span
    // for the request.
    let (proxy_trace, proxy_caller) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let mut stream = tokio::net::UnixStream::connect(dir.path().join("api.sock"))
        .await
        .unwrap();
    let head = format!(
        "GET /v2/traced HTTP/1.1\r\nHost: localhost\r\ntraceparent: 00-{proxy_trace}-{proxy_caller}-01\r\nConnection: close\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer)
        .await
        .unwrap();
    let echo: serde_json::Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    let sent = echo["headers"]["traceparent"][0].as_str().unwrap().to_owned();
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts[1], proxy_trace, "{sent}");
    assert_ne!(
        parts[2], proxy_caller,
        "the API's parent is the hub's span, not the caller's: {sent}"
    );
    let server = span_where(&receiver, |s| hex(&s.span_id) == parts[2]).await;
    assert_eq!((server.service.as_str(), server.name.as_str()), ("hub", "/v2/traced"));
    assert_eq!(hex(&server.parent), proxy_caller);

    // Nothing secret in any attribute of any span received.
    let all = receiver.0.lock().unwrap().clone();
    for span in &all {
        for value in span.attributes.values() {
            assert!(!value.contains(support::CLIENT_SECRET), "the secret in {span:?}");
            assert!(
                !value.contains(&first.access_token) && !value.contains(&second.access_token),
                "a token in {span:?}"
            );
        }
    }
}

/// A collector that is not there: calls are answered as usual, and the
/// broker still stops at once on SIGTERM (the queued spans are given up
/// after a bounded wait within the shutdown grace).
#[tokio::test]
async fn a_dead_collector_costs_the_callers_nothing() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let emulator = support::start_emulator(Duration::from_secs(900), false).await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("broker.sock");
    let admin = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let collector = format!("http://127.0.0.1:{closed}");
    let config = broker_config(
        dir.path(),
        "broker",
        &sock,
        &emulator.token_url(),
        &admin.to_string(),
        &telemetry(&collector, "dead-collector"),
    );
    let mut broker = spawn(&config);
    let mut client = support::connect_when_up(&format!("unix:{}", sock.display())).await;
    for _ in 0..200 {
        support::current_token(&mut client, pb::Environment::Sandbox as i32).await;
    }
    // Every call was traced (ratio 1): its spans end, none is exported, and
    // the failed exports are counted.
    support::await_metric(admin, "flute_broker_trace_spans_total{outcome=\"ended\"}", 200.0).await;
    let failed = async {
        while support::metric(admin, "flute_broker_trace_spans_total{outcome=\"failed\"}").await == 0.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), failed)
        .await
        .expect("failed exports counted");
    assert_eq!(
        support::metric(admin, "flute_broker_trace_spans_total{outcome=\"exported\"}").await,
        0.0
    );
    support::signal(broker.id().unwrap(), nix::sys::signal::Signal::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(15), broker.wait())
        .await
        .expect("stopped within the grace and the flush bound")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// OTLP over HTTP/protobuf: the same spans reach a collector's `/v1/traces`.
#[tokio::test]
async fn spans_go_to_an_otlp_http_collector_too() {
    let (endpoint, receiver) = start_http_receiver().await;
    let emulator = support::start_emulator(Duration::from_secs(900), false).await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("broker.sock");
    let over_http = telemetry_over(&endpoint, "over-http", "http/protobuf");
    let config = broker_config(dir.path(), "broker", &sock, &emulator.token_url(), "", &over_http);
    let _broker = spawn(&config);
    let mut client = support::connect_when_up(&format!("unix:{}", sock.display())).await;
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4737";
    let mut request = tonic::Request::new(pb::GetTokenRequest {
        environment: pb::Environment::Sandbox as i32,
        min_remaining: None,
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-10f067aa0ba902b7-01").parse().unwrap(),
    );
    client.get_token(request).await.unwrap();
    let span = span_where(&receiver, |s| hex(&s.trace_id) == trace_id).await;
    assert_eq!(
        (span.service.as_str(), span.name.as_str()),
        ("over-http", "/flute.tokenbroker.v1.TokenBroker/GetToken")
    );
}
