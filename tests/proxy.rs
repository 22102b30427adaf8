//! The authorizing proxy, from outside: a stock HTTP client (reqwest, and
//! hand-written HTTP/1.1 for what clients refuse to send) through a proxy
//! listener to the emulator's API echo, which reports the `token_id` it saw.

mod support;

use std::time::Duration;

use flute_token_broker::Environment;
use flute_token_broker::emulator::FaultRequest;
use flute_token_broker::serve::listen::ListenAddr;
use serde_json::Value as Json;
use support::{Broker, start_broker_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SANDBOX: Environment = Environment::Sandbox;

/// A broker with a sandbox proxy on loopback TCP and a Unix socket,
/// forwarding to the sandbox emulator's API.
async fn proxied_broker(replay_limit: usize) -> Broker {
    proxied_broker_with(|proxy| proxy.replay_limit_bytes = replay_limit).await
}

async fn proxied_broker_with(adjust: impl FnOnce(&mut flute_token_broker::proxy::ProxyConfig)) -> Broker {
    start_broker_with(&[SANDBOX], Duration::from_secs(900), |emulators, config| {
        let dir = socket_dir(config);
        let proxy = &mut config.environments.get_mut(&SANDBOX).unwrap().proxy;
        proxy.listen = vec![
            ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
            ListenAddr::Unix(dir.join("sandbox-api.sock")),
        ];
        proxy.api_url = emulators[&SANDBOX].base_url();
        adjust(proxy);
    })
    .await
}

/// The broker's own temporary directory (that of its Unix socket), where
/// the proxy's socket goes too.
fn socket_dir(config: &flute_token_broker::config::Config) -> std::path::PathBuf {
    config
        .server
        .listen
        .iter()
        .find_map(|a| match a {
            ListenAddr::Unix(p) => p.parent().map(std::path::Path::to_path_buf),
            _ => None,
        })
        .unwrap()
}

fn proxy_tcp(broker: &Broker) -> String {
    broker
        .daemon
        .proxy_addrs
        .iter()
        .find_map(|(_, a)| matches!(a, ListenAddr::Tcp(_)).then(|| format!("http://{a}")))
        .unwrap()
}

fn proxy_unix(broker: &Broker) -> std::path::PathBuf {
    broker
        .daemon
        .proxy_addrs
        .iter()
        .find_map(|(_, a)| match a {
            ListenAddr::Unix(p) => Some(p.clone()),
            _ => None,
        })
        .unwrap()
}

async fn current_token_id(broker: &Broker) -> String {
    broker.daemon.sources.get(SANDBOX).unwrap().holding_token().await;
    broker
        .daemon
        .sources
        .get(SANDBOX)
        .unwrap()
        .current()
        .unwrap()
        .token_id
        .clone()
}

/// One HTTP/1.1 exchange written by hand; the status and the body.
async fn raw<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut stream: S, request: &str) -> (u16, String) {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn requests_reach_the_api_with_the_token_and_without_the_callers_credentials() {
    let broker = proxied_broker(1024 * 1024).await;
    let token_id = current_token_id(&broker).await;
    let http = support::http_client();
    let base = proxy_tcp(&broker);
    let get: Json = http
        .get(format!("{base}/v2/transactions/txn_1?expand=all"))
        .header("authorization", "Bearer the-callers-own")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("connection", "x-hop")
        .header("x-hop", "1")
        .header("x-request-id", "r-1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(get["method"], "GET");
    assert_eq!(get["path"], "/v2/transactions/txn_1");
    assert_eq!(get["query"], "expand=all");
    assert_eq!(get["token_id"], token_id.as_str());
    let headers = get["headers"].as_object().unwrap();
    assert_eq!(headers["x-request-id"][0], "r-1");
    for absent in [
        "proxy-authorization",
        "x-hop",
        "connection",
        "x-forwarded-for",
        "via",
        "forwarded",
    ] {
        assert!(!headers.contains_key(absent), "{absent} reached the API: {get}");
    }
    let host = headers["host"][0].as_str().unwrap();
    assert_eq!(
        host,
        broker.emulators[&SANDBOX].addr.to_string(),
        "the API's own host, not the caller's"
    );

    let body = serde_json::json!({"amount": 1250, "currency": "USD"}).to_string();
    let post = http
        .post(format!("{base}/v2/payments"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 200);
    let post: Json = post.json().await.unwrap();
    assert_eq!(post["method"], "POST");
    assert_eq!(post["body_bytes"], body.len());

    // The same over the Unix socket, as curl --unix-socket sends it.
    let unix = tokio::net::UnixStream::connect(proxy_unix(&broker)).await.unwrap();
    let (status, answer) = raw(
        unix,
        "GET /v2/anything HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains(&token_id), "{answer}");
}

#[tokio::test]
async fn a_revoked_token_costs_the_callers_nothing_and_one_token_request() {
    let broker = proxied_broker(1024 * 1024).await;
    let first = current_token_id(&broker).await;
    let emulator = broker.emulator(SANDBOX);
    let http = support::http_client();
    let base = proxy_tcp(&broker);
    let before = emulator.stats().token_requests;
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..60 {
        if i == 20 {
            emulator.set_faults(FaultRequest {
                revoke_current: true,
                ..Default::default()
            });
        }
        let answer = http
            .post(format!("{base}/v2/payments"))
            .body(format!("{{\"n\": {i}}}"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "call {i}");
        let echo: Json = answer.json().await.unwrap();
        seen.insert(echo["token_id"].as_str().unwrap().to_owned());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        emulator.stats().token_requests - before,
        1,
        "one token request for the revocation"
    );
    assert_eq!(seen.len(), 2);
    assert!(seen.contains(&first));
    assert_eq!(emulator.stats().api_unauthorized, 1);
    let admin = broker.daemon.admin_addr.unwrap();
    let sandbox = "{environment=\"sandbox\"}";
    assert_eq!(
        support::metric(admin, &format!("flute_broker_proxy_retried_total{sandbox}")).await,
        1.0
    );
    let ok = "flute_broker_proxy_requests_total{environment=\"sandbox\",class=\"2xx\"}";
    assert_eq!(support::metric(admin, ok).await, 60.0);
    // Secret hygiene: no token in the metrics or in any answer header.
    let text = support::metrics_text(admin).await;
    let current = broker.daemon.sources.get(SANDBOX).unwrap().current().unwrap();
    assert!(!text.contains(current.access_token()));
    assert!(text.contains("flute_broker_proxy_upstream_duration_seconds_count{environment=\"sandbox\"} 61"));
}

#[tokio::test]
async fn a_body_over_the_replay_limit_gets_the_401_with_the_reason_and_the_refresh_still_happens() {
    let broker = proxied_broker(1024).await;
    let first = current_token_id(&broker).await;
    let emulator = broker.emulator(SANDBOX);
    let before = emulator.stats().token_requests;
    emulator.set_faults(FaultRequest {
        revoke_current: true,
        ..Default::default()
    });
    let http = support::http_client();
    let base = proxy_tcp(&broker);
    let refused = http
        .post(format!("{base}/v2/documents"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["flute-broker-not-retried"], "BODY_NOT_REPLAYABLE");
    assert_eq!(emulator.stats().token_requests - before, 1);
    let not_retried = "flute_broker_proxy_not_retried_total{environment=\"sandbox\",reason=\"BODY_NOT_REPLAYABLE\"}";
    assert_eq!(
        support::metric(broker.daemon.admin_addr.unwrap(), not_retried).await,
        1.0
    );
    // The caller's own retry succeeds with the new token.
    let retried: Json = http
        .post(format!("{base}/v2/documents"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(retried["token_id"], first.as_str());
    assert_eq!(retried["body_bytes"], 4096);
}

#[tokio::test]
async fn targets_that_could_leave_the_api_are_refused_before_it_is_contacted() {
    let broker = proxied_broker(1024 * 1024).await;
    current_token_id(&broker).await;
    let addr = proxy_tcp(&broker).trim_start_matches("http://").to_owned();
    for request in [
        "GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n",
        "CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\nConnection: close\r\n\r\n",
        "GET /v2/../admin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "GET /v2/%2e%2e/admin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "OPTIONS * HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    ] {
        let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (status, body) = raw(stream, request).await;
        assert_eq!(status, 400, "{request}: {body}");
    }
    // Only the API's routes: the API host's other paths, and the dev
    // emulator's fault switch, are refused as routes (403).
    for request in [
        "GET /internal/admin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "POST /__emulator/faults HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        "GET /v2x/payments HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    ] {
        let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (status, body) = raw(stream, request).await;
        assert_eq!(status, 403, "{request}: {body}");
        assert!(body.contains("ROUTE_NOT_ALLOWED"), "{body}");
    }
    // A spoofed Host changes nothing: the API's host is the configured one.
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (status, body) = raw(
        stream,
        "GET /v2/x HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("evil.test"), "{body}");
    assert_eq!(
        broker.emulator(SANDBOX).stats().api_requests,
        1,
        "only the last request reached the API"
    );
}

#[tokio::test]
async fn a_caller_the_allow_list_refuses_gets_403_and_the_api_is_not_contacted() {
    let me = nix::unistd::getuid().as_raw();
    let broker = start_broker_with(&[SANDBOX], Duration::from_secs(900), |emulators, config| {
        let dir = socket_dir(config);
        let e = config.environments.get_mut(&SANDBOX).unwrap();
        e.allowed_unix_users = vec![me.wrapping_add(4242)];
        e.proxy.listen = vec![ListenAddr::Unix(dir.join("sandbox-api.sock"))];
        e.proxy.api_url = emulators[&SANDBOX].base_url();
    })
    .await;
    let unix = tokio::net::UnixStream::connect(proxy_unix(&broker)).await.unwrap();
    let (status, body) = raw(
        unix,
        "GET /v2/transactions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("CALLER_NOT_ALLOWED"), "{body}");
    assert_eq!(broker.emulator(SANDBOX).stats().api_requests, 0);
}

/// A request head that never ends (slowloris) on a proxy listener is cut
/// off at `server.handshake_timeout`, as on every listener, and the API
/// never sees a request.
#[tokio::test]
async fn a_slow_request_head_is_cut_off_at_the_first_request_deadline() {
    let broker = start_broker_with(&[SANDBOX], Duration::from_secs(900), |emulators, config| {
        config.server.handshake_timeout = Duration::from_secs(1);
        let proxy = &mut config.environments.get_mut(&SANDBOX).unwrap().proxy;
        proxy.listen = vec![ListenAddr::Tcp("127.0.0.1:0".parse().unwrap())];
        proxy.api_url = emulators[&SANDBOX].base_url();
    })
    .await;
    let addr = proxy_tcp(&broker).trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stream
        .write_all(b"GET /v2/transactions HTTP/1.1\r\nHost: l\r\nX-Slow: ")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection is closed at the deadline");
    assert_eq!(broker.emulator(SANDBOX).stats().api_requests, 0);
    let admin = broker.daemon.admin_addr.unwrap();
    let text = support::metrics_text(admin).await;
    assert!(
        text.lines().any(
            |l| l.starts_with("flute_broker_connections_closed_total{listener=\"proxy-sandbox:")
                && l.contains("reason=\"handshake_timeout\"")
                && l.ends_with(" 1")
        ),
        "{text}"
    );
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_cut_off_at_the_idle_deadline() {
    let broker = proxied_broker_with(|proxy| proxy.idle_timeout = Duration::from_secs(1)).await;
    current_token_id(&broker).await;
    let addr = proxy_tcp(&broker).trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // 10 of the 100 bytes announced, then nothing: the answer comes when
    // the deadline passes, and the API never sees the request.
    let (status, body) = raw(
        stream,
        "POST /v2/payments HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .await;
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("BODY_TIMEOUT"), "{body}");
    assert_eq!(broker.emulator(SANDBOX).stats().api_requests, 0);
}

/// Request smuggling: the proxy never forwards the caller's bytes, it
/// re-frames each request it parsed, so the API cannot see a request the
/// proxy did not. Ambiguous heads are refused by the HTTP/1.1 parser; with
/// both `Content-Length` and `Transfer-Encoding`, the chunked framing wins
/// (RFC 9112 §6.3) and the API gets exactly that one request.
#[tokio::test]
async fn request_smuggling_probes_are_refused() {
    let broker = proxied_broker(1024 * 1024).await;
    current_token_id(&broker).await;
    let addr = proxy_tcp(&broker).trim_start_matches("http://").to_owned();
    for probe in [
        // Two different Content-Lengths.
        "POST /v2/p HTTP/1.1\r\nHost: l\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        // Obsolete line folding.
        "GET /v2/p HTTP/1.1\r\nHost: l\r\nX-Folded: a\r\n b\r\n\r\n",
    ] {
        let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (status, body) = raw(stream, probe).await;
        assert_eq!(status, 400, "{probe:?}: {body}");
    }
    assert_eq!(broker.emulator(SANDBOX).stats().api_requests, 0);
    // Content-Length 4 against a chunked body holding a second request:
    // one request reaches the API, with the chunked body (5 bytes).
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (status, body) = raw(
        stream,
        "POST /v2/p HTTP/1.1\r\nHost: l\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nGET /\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"body_bytes\":5"), "{body}");
    assert_eq!(broker.emulator(SANDBOX).stats().api_requests, 1);
}

/// A broker whose sandbox proxy (loopback TCP) forwards to the emulator's
/// HTTPS listener, trusting the test's certificate through `tls_roots`;
/// the HTTPS listener and the certificate's directory, kept alive.
async fn broker_with_https_api() -> (Broker, flute_token_broker::emulator::RunningEmulator, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let ca_file = dir.path().join("api-ca.pem");
    std::fs::write(&ca_file, certified.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
    let mut https = None;
    let broker = start_broker_with(&[SANDBOX], Duration::from_secs(900), |emulators, config| {
        let api = emulators[&SANDBOX]
            .emulator
            .spawn_tls("127.0.0.1:0".parse().unwrap(), vec![certified.cert.der().clone()], key)
            .unwrap();
        config.oauth.tls_roots = flute_token_broker::tls_roots::TlsRoots::File(ca_file.clone());
        let proxy = &mut config.environments.get_mut(&SANDBOX).unwrap().proxy;
        proxy.listen = vec![ListenAddr::Tcp("127.0.0.1:0".parse().unwrap())];
        proxy.api_url = api.base_url();
        https = Some(api);
    })
    .await;
    let https = https.unwrap();
    assert!(https.base_url().starts_with("https://127.0.0.1:"));
    (broker, https, dir)
}

/// Sends `n` POSTs through the proxy, revoking the current token before
/// call `revoke_at`; each answer must be 200 over HTTP/2 to the API. The
/// `token_id`s the API saw, and every response header value.
async fn post_through(
    broker: &Broker,
    n: usize,
    revoke_at: usize,
) -> (std::collections::BTreeSet<String>, Vec<String>) {
    let http = support::http_client();
    let base = proxy_tcp(broker);
    let (mut seen, mut headers) = (std::collections::BTreeSet::new(), Vec::new());
    for i in 0..n {
        if i == revoke_at {
            broker.emulator(SANDBOX).set_faults(FaultRequest {
                revoke_current: true,
                ..Default::default()
            });
        }
        let answer = http
            .post(format!("{base}/v2/payments"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "call {i}");
        headers.extend(
            answer
                .headers()
                .values()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        );
        let echo: Json = answer.json().await.unwrap();
        assert_eq!(echo["version"], "HTTP/2.0", "HTTP/2 chosen by ALPN: {echo}");
        seen.insert(echo["token_id"].as_str().unwrap().to_owned());
    }
    (seen, headers)
}

/// The API over HTTPS: the proxy trusts `[oauth] tls_roots`, offers HTTP/2
/// by ALPN and keeps one pooled connection for a run of calls (counted in
/// `proxy_upstream_connections`); a revocation is absorbed on that path too.
#[tokio::test]
async fn the_api_over_https_is_reached_by_http2_on_one_pooled_connection() {
    let (broker, _https, _dir) = broker_with_https_api().await;
    let first = current_token_id(&broker).await;
    let (seen, _) = post_through(&broker, 20, 10).await;
    assert!(seen.contains(&first) && seen.len() == 2, "{seen:?}");
    let admin = broker.daemon.admin_addr.unwrap();
    let open = "flute_broker_proxy_upstream_connections{environment=\"sandbox\"}";
    assert_eq!(
        support::metric(admin, open).await,
        1.0,
        "one HTTP/2 connection for 21 requests"
    );
    assert_eq!(
        support::metric(admin, "flute_broker_proxy_retried_total{environment=\"sandbox\"}").await,
        1.0
    );
}

/// Secret hygiene on the proxy path: with every log line captured at TRACE
/// (the broker's, hyper's and h2's, all on this thread), HTTP/2
/// over TLS to the API and a revocation absorbed, neither token appears in
/// a log line, an answer header or `/metrics`.
#[tokio::test(flavor = "current_thread")]
async fn no_token_in_trace_logs_answer_headers_or_metrics() {
    let logs = support::LogCapture::default();
    let _guard = logs.install();
    let (broker, _https, _dir) = broker_with_https_api().await;
    current_token_id(&broker).await;
    let source = broker.daemon.sources.get(SANDBOX).unwrap();
    let first = source.current().unwrap().access_token().to_owned();
    let (seen, headers) = post_through(&broker, 6, 3).await;
    assert_eq!(seen.len(), 2);
    let second = source.current().unwrap().access_token().to_owned();
    assert_ne!(first, second);
    let metrics = support::metrics_text(broker.daemon.admin_addr.unwrap()).await;
    let logs = logs.text();
    assert!(logs.contains("proxied"), "the capture holds the proxy's access lines");
    assert!(
        logs.contains(" h2::") && logs.contains(" hyper"),
        "the capture holds h2's and hyper's TRACE lines too"
    );
    for token in [&first, &second] {
        assert!(!logs.contains(token.as_str()), "a token in a TRACE log line");
        assert!(
            !headers.iter().any(|h| h.contains(token.as_str())),
            "a token in an answer header"
        );
        assert!(!metrics.contains(token.as_str()), "a token in /metrics");
    }
}

/// A request body for hyper's client: `n` chunks of `size` bytes.
type Upload = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

fn upload(n: usize, size: usize) -> Upload {
    use http_body_util::BodyExt;
    let chunks = (0..n).map(move |_| Ok(http_body::Frame::data(bytes::Bytes::from(vec![b'u'; size]))));
    http_body_util::StreamBody::new(futures_util::stream::iter(chunks)).boxed()
}

/// The broker's peak resident memory (`VmHWM`) and current (`VmRSS`), in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// One HTTP/1.1 exchange over a Unix socket with hyper's client; the
/// response's status, and its body counted as it streams (with one pause
/// after the first MiB, so a broker without backpressure would have to
/// hold what the API keeps sending).
async fn exchange_counted(socket: &std::path::Path, request: http::Request<Upload>) -> (u16, u64, Vec<u8>) {
    use http_body_util::BodyExt;
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let (mut received, mut paused, mut head) = (0u64, false, Vec::new());
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len() as u64;
            if head.len() < 4096 {
                head.extend_from_slice(&data[..data.len().min(4096 - head.len())]);
            }
            if !paused && received > 1 << 20 {
                paused = true;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    (status, received, head)
}

/// A 50 MiB response and a 5 MiB upload through the proxy of a broker
/// running as its own process: both stream, and the broker's peak RSS
/// grows by less than 16 MiB while 55 MiB pass through it (the replay copy
/// is at most `replay_limit_bytes`, 1 MiB; the rest is never held).
#[tokio::test]
async fn large_bodies_stream_through_with_the_brokers_memory_bounded() {
    const MIB: u64 = 1 << 20;
    let emulator = support::start_emulator(Duration::from_secs(900), true).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, support::CLIENT_SECRET).unwrap();
    let api_socket = dir.path().join("sandbox-api.sock");
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        format!(
            r#"[credentials]
client_id = "{id}"
client_secret_file = "{secret}"
[oauth]
allow_insecure_http = true
[server]
listen = ["unix:{dir}/broker.sock"]
[admin]
listen = ""
[environments.production]
enabled = false
[environments.sandbox]
token_url = "{token_url}"
[environments.sandbox.proxy]
listen = ["unix:{api}"]
api_url = "{base}"
"#,
            id = support::CLIENT_ID,
            secret = secret.display(),
            dir = dir.path().display(),
            token_url = emulator.token_url(),
            api = api_socket.display(),
            base = emulator.base_url(),
        ),
    )
    .unwrap();
    let mut broker = tokio::process::Command::new(env!("CARGO_BIN_EXE_flute-token-broker"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = broker.id().unwrap();
    let get = |path: &str| {
        http::Request::get(path)
            .header("host", "localhost")
            .body(upload(0, 0))
            .unwrap()
    };
    // Warm: the first request waits for the socket and the token.
    let warm = async {
        loop {
            if api_socket.exists() {
                let (status, _, _) = exchange_counted(&api_socket, get("/v2/transactions")).await;
                if status == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), warm)
        .await
        .expect("the proxy answers");
    let (peak_before, _) = memory_kib(pid);

    let (status, received, _) = exchange_counted(&api_socket, get(&format!("/v2/_emulator/bytes/{}", 50 * MIB))).await;
    assert_eq!((status, received), (200, 50 * MIB));
    let upload = http::Request::post("/v2/uploads")
        .header("host", "localhost")
        .header("content-type", "application/octet-stream")
        .body(upload(5, MIB as usize))
        .unwrap();
    let (status, _, echo) = exchange_counted(&api_socket, upload).await;
    assert_eq!(status, 200);
    let echo: Json = serde_json::from_slice(&echo).unwrap();
    assert_eq!(echo["body_bytes"], 5 * MIB);

    let (peak_after, now) = memory_kib(pid);
    eprintln!("broker RSS: peak {peak_before} KiB before, {peak_after} KiB after 55 MiB; now {now} KiB");
    assert!(
        peak_after - peak_before < 16 * 1024,
        "peak RSS grew {} KiB while 55 MiB streamed",
        peak_after - peak_before
    );
    broker.kill().await.unwrap();
}

/// A route that answers 401 whatever the token (a scope the key lacks)
/// cannot rotate everyone's token: the first 401 replaces the token once
/// and the second send is refused too (`REJECTED_AGAIN`); from then on,
/// for `fresh_token_age`, that route's 401s pass through as `TOKEN_FRESH`
/// with no token request, whatever the callers do (sequential or at once,
/// any body). A revoked token on another route is still replaced at once.
#[tokio::test]
async fn a_route_that_always_answers_401_rotates_the_token_at_most_once() {
    let broker = proxied_broker(1024 * 1024).await;
    let first = current_token_id(&broker).await;
    let emulator = broker.emulator(SANDBOX);
    let before = emulator.stats().token_requests;
    let http = support::http_client();
    let base = proxy_tcp(&broker);
    let forbidden = format!("{base}/v2/_emulator/forbidden_scope");
    let reason = |answer: &reqwest::Response| {
        answer
            .headers()
            .get("flute-broker-not-retried")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let answer = http.get(&forbidden).send().await.unwrap();
    assert_eq!(answer.status(), 401);
    assert_eq!(reason(&answer).as_deref(), Some("REJECTED_AGAIN"));
    assert_eq!(emulator.stats().token_requests, before + 1, "one refresh");
    let second = current_token_id(&broker).await;
    assert_ne!(second, first);

    for n in 0..6 {
        let answer = http.get(&forbidden).send().await.unwrap();
        assert_eq!(answer.status(), 401, "call {n}");
        assert_eq!(reason(&answer).as_deref(), Some("TOKEN_FRESH"), "call {n}");
    }
    let at_once: Vec<_> = (0..20).map(|_| http.post(&forbidden).body("{}").send()).collect();
    for answer in futures_util::future::join_all(at_once).await {
        let answer = answer.unwrap();
        assert_eq!(answer.status(), 401);
        assert_eq!(reason(&answer).as_deref(), Some("TOKEN_FRESH"));
    }
    assert_eq!(emulator.stats().token_requests, before + 1, "no more token requests");
    assert_eq!(current_token_id(&broker).await, second);

    // A revocation right after: the next call on a working route carries the
    // revoked token, is answered 401, and is absorbed by one refresh.
    emulator.set_faults(FaultRequest {
        revoke_current: true,
        ..Default::default()
    });
    let answer = http.get(format!("{base}/v2/transactions")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(reason(&answer), None);
    assert_eq!(emulator.stats().token_requests, before + 2);
    assert_ne!(current_token_id(&broker).await, second);
}
