//! The HTTP/JSON face on the gRPC listeners, from outside: plain HTTP/1.1
//! requests written by hand on the Unix socket and on TCP (what curl
//! sends), the routes checked against the API configuration's HTTP rules,
//! and the metadata-server safeguards.

mod support;

use std::time::Duration;

use flute_token_broker::Environment;
use flute_token_broker::emulator::FaultRequest;
use flute_token_broker::grpc::http;
use flute_token_broker::wire::pb;
use prost_reflect::DescriptorPool;
use serde_json::Value as Json;
use support::{next_token, open_watch, start_broker, start_broker_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Json {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// The ErrorInfo reason of a google.rpc.Status body.
    fn reason(&self) -> String {
        self.json()["details"]
            .as_array()
            .and_then(|d| {
                d.iter()
                    .find(|d| d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo")
            })
            .map(|d| d["reason"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    }
}

/// Sends one request (`Connection: close`) to `addr` (`unix:/path` or
/// `http://host:port`) and reads the whole answer.
async fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        text.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    text.push_str("\r\n");
    text.push_str(body);
    exchange(addr, text.as_bytes()).await
}

/// Writes `bytes` to `addr` and reads the whole answer (the request must
/// ask for `Connection: close`).
async fn exchange(addr: &str, bytes: &[u8]) -> Answer {
    let mut raw = Vec::new();
    if let Some(path) = addr.strip_prefix("unix:") {
        let mut stream = tokio::net::UnixStream::connect(path).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        stream.read_to_end(&mut raw).await.unwrap();
    } else {
        let mut stream = tokio::net::TcpStream::connect(addr.trim_start_matches("http://"))
            .await
            .unwrap();
        stream.write_all(bytes).await.unwrap();
        stream.read_to_end(&mut raw).await.unwrap();
    }
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete answer");
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

const BROKER: (&str, &str) = ("Flute-Broker", "true");

#[tokio::test]
async fn a_token_as_json_on_both_listeners_with_etag_and_no_store() {
    let broker = start_broker(Duration::from_secs(900)).await;
    let mut grpc = broker.client().await;
    let current = support::current_token(&mut grpc, pb::Environment::Sandbox as i32).await;
    for addr in [&broker.unix, &broker.tcp] {
        let answer = request(addr, "GET", "/v1/environments/sandbox/token", &[BROKER], "").await;
        assert_eq!(answer.status, 200, "{addr}: {answer:?}");
        let token = &answer.json()["token"];
        // The proto3 JSON mapping: camelCase, enum names, RFC 3339 times.
        assert_eq!(token["accessToken"], current.access_token.as_str());
        assert_eq!(token["tokenId"], current.token_id.as_str());
        assert_eq!(token["tokenType"], "Bearer");
        assert_eq!(token["environment"], "ENVIRONMENT_SANDBOX");
        assert!(token["expiresAt"].as_str().unwrap().ends_with('Z'));
        assert!(token["serveFor"].as_str().unwrap().ends_with('s'));
        assert_eq!(
            answer.header("etag"),
            Some(format!("\"{}\"", current.token_id).as_str())
        );
        assert_eq!(answer.header("cache-control"), Some("no-store"));
        assert_eq!(answer.header("content-type"), Some("application/json"));
        assert!(answer.header("access-control-allow-origin").is_none());
    }
    let status = request(&broker.unix, "GET", "/v1/status", &[BROKER], "").await;
    assert_eq!(status.status, 200);
    let environments = status.json()["environments"].as_array().unwrap().clone();
    assert_eq!(environments.len(), 2);
    assert_eq!(environments[0]["state"], "STATE_READY");
    // uint64 counters are strings in proto3 JSON.
    assert_eq!(environments[0]["counters"]["tokenEndpointCalls"], "1");
    let production = request(
        &broker.tcp,
        "GET",
        "/v1/environments/production/token?min_remaining=60s",
        &[BROKER],
        "",
    )
    .await;
    assert_eq!(production.status, 200);
    assert_eq!(production.json()["token"]["environment"], "ENVIRONMENT_PRODUCTION");
    // Counted under the HTTP protocol, by RPC name.
    let metrics = broker.daemon.metrics.encode();
    for line in [
        "flute_broker_grpc_requests_total{protocol=\"http\",method=\"GetToken\",code=\"OK\"} 3",
        "flute_broker_grpc_requests_total{protocol=\"http\",method=\"GetStatus\",code=\"OK\"} 1",
        "flute_broker_grpc_requests_total{protocol=\"grpc\",method=\"GetToken\",code=\"OK\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}

#[tokio::test]
async fn the_metadata_server_safeguards() {
    let broker = start_broker(Duration::from_secs(900)).await;
    let path = "/v1/environments/sandbox/token";
    let refused = |answer: &Answer, what: &str| {
        assert_eq!(answer.status, 403, "{what}: {answer:?}");
        assert_eq!(answer.reason(), "REQUEST_REFUSED", "{what}");
        assert!(!answer.body.contains("accessToken"), "{what}");
        assert!(answer.header("access-control-allow-origin").is_none(), "{what}");
    };
    let without = request(&broker.unix, "GET", path, &[], "").await;
    refused(&without, "no Flute-Broker header");
    assert!(
        without.json()["message"]
            .as_str()
            .unwrap()
            .contains("Flute-Broker: true")
    );
    refused(
        &request(&broker.unix, "GET", path, &[("Flute-Broker", "yes")], "").await,
        "a wrong value",
    );
    let proxied = request(&broker.tcp, "GET", path, &[BROKER, ("X-Forwarded-For", "10.0.0.1")], "").await;
    refused(&proxied, "X-Forwarded-For");
    refused(
        &request(&broker.tcp, "GET", path, &[BROKER, ("Forwarded", "for=10.0.0.1")], "").await,
        "Forwarded",
    );
    let preflight = request(
        &broker.tcp,
        "OPTIONS",
        path,
        &[
            ("Origin", "https://evil.example"),
            ("Access-Control-Request-Method", "GET"),
            ("Access-Control-Request-Headers", "flute-broker"),
        ],
        "",
    )
    .await;
    refused(&preflight, "a CORS preflight");
    // Only the mapped methods; unknown routes are 404; all as JSON Status.
    let wrong = request(&broker.unix, "DELETE", path, &[BROKER], "").await;
    assert_eq!(wrong.status, 405, "{wrong:?}");
    assert_eq!(wrong.reason(), "METHOD_NOT_ALLOWED");
    let unknown = request(&broker.unix, "GET", "/v1/secrets", &[BROKER], "").await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.reason(), "UNKNOWN_ROUTE");
    // The request size limit applies: a 20 KiB body is refused.
    let big = format!("{{\"rejectedTokenId\": \"{}\"}}", "a".repeat(20_000));
    let answer = request(
        &broker.unix,
        "POST",
        "/v1/environments/sandbox/token:refresh",
        &[BROKER],
        &big,
    )
    .await;
    assert_eq!(answer.status, 400, "{answer:?}");
}

/// An allow-listed environment refuses other Unix users over HTTP exactly
/// as over gRPC: 403 with the reason.
#[tokio::test]
async fn a_restricted_caller_gets_403_with_the_reason() {
    let broker = start_broker_with(&Environment::ALL, Duration::from_secs(900), |_, config| {
        let me = nix::unistd::getuid().as_raw();
        config
            .environments
            .get_mut(&Environment::Production)
            .unwrap()
            .allowed_unix_users = vec![me + 1];
    })
    .await;
    let answer = request(&broker.unix, "GET", "/v1/environments/production/token", &[BROKER], "").await;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(answer.reason(), "CALLER_NOT_ALLOWED");
    assert!(answer.json()["message"].as_str().unwrap().contains("production"));
    assert_eq!(
        request(&broker.unix, "GET", "/v1/environments/sandbox/token", &[BROKER], "")
            .await
            .status,
        200
    );
    let status = request(&broker.unix, "GET", "/v1/status", &[BROKER], "").await.json();
    assert_eq!(status["environments"][1]["state"], "STATE_RESTRICTED");
}

/// Errors are the gRPC Status as JSON with the HTTP status of its code:
/// 400 for bad input, 503 with Retry-After when no token can be had.
#[tokio::test]
async fn errors_carry_the_grpc_reason_and_retry_delay() {
    let broker = start_broker_with(&[Environment::Sandbox], Duration::from_secs(900), |emulators, _| {
        for emu in emulators.values() {
            emu.emulator.set_faults(FaultRequest {
                fail_next: Some(u32::MAX),
                status: Some(503),
                ..Default::default()
            });
        }
    })
    .await;
    let outage = request(&broker.unix, "GET", "/v1/environments/sandbox/token", &[BROKER], "").await;
    assert_eq!(outage.status, 503, "{outage:?}");
    assert_eq!(outage.reason(), "NO_VALID_TOKEN");
    let body = outage.json();
    assert_eq!(body["code"], 14);
    let retry = body["details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["@type"] == "type.googleapis.com/google.rpc.RetryInfo")
        .expect("RetryInfo")["retryDelay"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(retry.ends_with('s'), "{retry}");
    let after: u64 = outage.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!(after >= 1);

    for (path, reason) in [
        ("/v1/environments/moon/token", "ENVIRONMENT_UNSPECIFIED"),
        ("/v1/environments/production/token", "ENVIRONMENT_NOT_ENABLED"),
        ("/v1/environments/sandbox/token?min_remaining=soon", "INVALID_FIELD"),
    ] {
        let answer = request(&broker.tcp, "GET", path, &[BROKER], "").await;
        assert_eq!(
            (answer.status, answer.reason().as_str()),
            (400, reason),
            "{path}: {answer:?}"
        );
    }
    let bad_body = request(
        &broker.tcp,
        "POST",
        "/v1/environments/sandbox/token:refresh",
        &[BROKER],
        "{\"nope\": 1}",
    )
    .await;
    assert_eq!((bad_body.status, bad_body.reason().as_str()), (400, "INVALID_FIELD"));
}

#[tokio::test]
async fn refresh_by_http_replaces_a_rejected_token() {
    let broker = start_broker(Duration::from_secs(900)).await;
    let first = request(&broker.unix, "GET", "/v1/environments/sandbox/token", &[BROKER], "")
        .await
        .json();
    let rejected = first["token"]["tokenId"].as_str().unwrap();
    let body = format!("{{\"rejectedTokenId\": \"{rejected}\"}}");
    let answer = request(
        &broker.unix,
        "POST",
        "/v1/environments/sandbox/token:refresh",
        &[BROKER],
        &body,
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let replacement = answer.json()["token"]["tokenId"].as_str().unwrap().to_owned();
    assert_ne!(replacement, rejected);
    assert_eq!(answer.header("etag"), Some(format!("\"{replacement}\"").as_str()));
    assert_eq!(
        broker.emulator(Environment::Sandbox).stats().token_requests,
        2,
        "start-up and one refresh"
    );
}

/// `wait_for_change` with the current ETag answers at the next rotation,
/// with the token a gRPC watcher gets; with another ETag at once; at the
/// timeout with the current state.
#[tokio::test]
async fn a_long_poll_answers_at_the_next_rotation() {
    let broker = start_broker_with(&[Environment::Sandbox], Duration::from_secs(4), |_, _| {}).await;
    let mut grpc = broker.client().await;
    let mut watch = open_watch(&mut grpc, pb::Environment::Sandbox as i32).await;
    let current = next_token(&mut watch).await;
    let path = |etag: &str, timeout: u32| {
        format!("/v1/environments/sandbox/token?wait_for_change=true&last_etag=%22{etag}%22&timeout_sec={timeout}")
    };
    let poll = {
        let (addr, path) = (broker.unix.clone(), path(&current.token_id, 60));
        tokio::spawn(async move { request(&addr, "GET", &path, &[BROKER], "").await })
    };
    let rotated = next_token(&mut watch).await;
    let answer = poll.await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["token"]["tokenId"], rotated.token_id.as_str());
    assert_ne!(rotated.token_id, current.token_id);

    let at_once = request(&broker.unix, "GET", &path("stale", 60), &[BROKER], "").await;
    assert_eq!(at_once.json()["token"]["tokenId"], rotated.token_id.as_str());
    // A timeout with no change answers with the current token: with a
    // 1 s timeout and 4 s tokens that rotate at 2 s, either it times out
    // (the same token) or a rotation came first (the next one).
    let timed_out = request(&broker.unix, "GET", &path(&rotated.token_id, 1), &[BROKER], "").await;
    assert_eq!(timed_out.status, 200);
}

/// The routes are the ones the gRPC API configuration declares
/// (`proto/flute/tokenbroker/v1/token_broker_http.yaml`, the `http: rules:`
/// of grpc-gateway and Google's service config), and the broker answers each.
#[tokio::test]
async fn the_routes_are_the_api_configurations_http_rules() {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/proto/flute/tokenbroker/v1/token_broker_http.yaml"
    ))
    .unwrap();
    let rules = http_rules(&yaml);
    let rule_of = |name: &str| {
        rules
            .iter()
            .find(|(selector, ..)| *selector == format!("flute.tokenbroker.v1.TokenBroker.{name}"))
            .map(|(_, verb, path, body)| (verb.clone(), path.clone(), body.clone()))
            .unwrap_or_else(|| panic!("{name}: no rule in {rules:?}"))
    };
    assert_eq!(rules.len(), 3, "{rules:?}");
    assert_eq!(
        rule_of("GetToken"),
        ("GET".into(), http::GET_TOKEN.into(), String::new())
    );
    assert_eq!(
        rule_of("RefreshToken"),
        ("POST".into(), http::REFRESH_TOKEN.into(), "*".into())
    );
    assert_eq!(
        rule_of("GetStatus"),
        ("GET".into(), http::GET_STATUS.into(), String::new())
    );
    // Every rule names a method of the contract.
    let pool = DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
    let service = pool.get_service_by_name("flute.tokenbroker.v1.TokenBroker").unwrap();
    for (selector, ..) in &rules {
        let method = selector.rsplit('.').next().unwrap();
        assert!(service.methods().any(|m| m.name() == method), "{selector}");
    }

    // And the broker answers each declared route (not 404, not 405).
    let broker = start_broker(Duration::from_secs(900)).await;
    for name in ["GetToken", "RefreshToken", "GetStatus"] {
        let (verb, path, _) = rule_of(name);
        let path = path.replace("{environment}", "sandbox");
        let body = if verb == "POST" {
            "{\"rejectedTokenId\": \"x\"}"
        } else {
            ""
        };
        let answer = request(&broker.tcp, &verb, &path, &[BROKER], body).await;
        assert_eq!(answer.status, 200, "{name}: {verb} {path}: {answer:?}");
    }
}

/// gRPC is unchanged beside it: an unknown gRPC method is UNIMPLEMENTED, not
/// an HTTP 404.
#[tokio::test]
async fn unknown_grpc_methods_stay_grpc_unimplemented() {
    let broker = start_broker(Duration::from_secs(900)).await;
    let channel = broker.channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    assert!(
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .is_ok()
    );
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/flute.tokenbroker.v1.TokenBroker/Nope");
    let status = grpc
        .unary::<_, pb::GetStatusResponse, _>(
            tonic::Request::new(pb::GetStatusRequest {}),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
}

/// gRPC only over HTTP/2: a gRPC GetToken written as HTTP/1.1 (what a
/// webhook or a request forgery could be made to send, with none of the
/// HTTP face's headers) gets no token on either listener, whatever gRPC
/// content type it names; the same call over HTTP/2 is served.
#[tokio::test]
async fn grpc_over_http1_gets_no_token() {
    use prost::Message;
    let broker = start_broker(Duration::from_secs(900)).await;
    let mut grpc = broker.client().await;
    let current = support::current_token(&mut grpc, pb::Environment::Sandbox as i32).await;
    let message = pb::GetTokenRequest {
        environment: pb::Environment::Sandbox as i32,
        min_remaining: None,
    }
    .encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    for addr in [&broker.unix, &broker.tcp] {
        for content_type in ["application/grpc", "application/grpc+proto", "application/grpc-web"] {
            let mut text = format!(
                "POST /flute.tokenbroker.v1.TokenBroker/GetToken HTTP/1.1\r\nHost: localhost\r\n\
                 Connection: close\r\nContent-Type: {content_type}\r\nTE: trailers\r\n\
                 Content-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            text.extend_from_slice(&body);
            let answer = exchange(addr, &text).await;
            assert_eq!(answer.status, 403, "{addr} {content_type}: {answer:?}");
            assert_eq!(answer.reason(), "REQUEST_REFUSED", "{answer:?}");
            assert!(answer.body.contains("HTTP/2 only"), "{answer:?}");
            assert!(
                !answer.body.contains(&current.access_token),
                "{addr}: a token over HTTP/1.1"
            );
        }
    }
    // The same call over HTTP/2 (tonic's client) is answered.
    assert_eq!(
        support::current_token(&mut grpc, pb::Environment::Sandbox as i32)
            .await
            .token_id,
        current.token_id
    );
}

/// A connection accepted before the broker began to stop, whose first
/// request arrives after: it is answered, not closed unanswered (the HTTP
/// version detection and the HTTP/2 handshake would close it).
#[tokio::test]
async fn a_request_on_a_connection_accepted_before_shutdown_is_answered() {
    let broker = start_broker(Duration::from_secs(900)).await;
    let admin = broker.daemon.admin_addr.unwrap();
    let tcp = broker.tcp.trim_start_matches("http://").to_owned();
    let mut grpc = broker.client().await;
    let mut watch = open_watch(&mut grpc, pb::Environment::Sandbox as i32).await;
    next_token(&mut watch).await;
    // Accepted: the listener counts it (the gRPC client's is the first).
    let mut early = tokio::net::TcpStream::connect(&tcp).await.unwrap();
    let open = format!("flute_broker_connections{{listener=\"grpc:{tcp}\"}}");
    support::await_metric(admin, &open, 2.0).await;

    let stopping = tokio::spawn(broker.daemon.shutdown());
    // The watch stream ends once stopping began.
    use tokio_stream::StreamExt;
    while let Some(Ok(_)) = watch.next().await {}
    early
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\nFlute-Broker: true\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    early.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw:?}");
    stopping.await.unwrap();
}

/// The `http: rules:` of a gRPC API configuration: (selector, verb, path,
/// body) each. The file's own shape: a list item per rule, `key: value`
/// lines, values optionally quoted.
fn http_rules(yaml: &str) -> Vec<(String, String, String, String)> {
    let mut rules: Vec<(String, String, String, String)> = Vec::new();
    for line in yaml.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        let (is_item, line) = match line.strip_prefix("- ") {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let Some((key, value)) = line.split_once(": ") else {
            continue;
        };
        let value = value.trim().trim_matches('"').to_owned();
        if is_item {
            rules.push(Default::default());
        }
        let Some(rule) = rules.last_mut() else { continue };
        match key {
            "selector" => rule.0 = value,
            "get" | "post" | "put" | "delete" | "patch" => (rule.1, rule.2) = (key.to_uppercase(), value),
            "body" => rule.3 = value,
            _ => {}
        }
    }
    rules
}
