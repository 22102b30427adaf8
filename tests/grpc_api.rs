//! The TokenBroker gRPC API over real sockets (TCP and Unix), with the
//! emulator as the token endpoint.

mod support;

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use flute_token_broker::Environment;
use flute_token_broker::emulator::FaultRequest;
use flute_token_broker::wire::pb::{self, watch_token_response::Update};
use support::{start_broker, start_broker_with};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const SANDBOX: i32 = pb::Environment::Sandbox as i32;
const PRODUCTION: i32 = pb::Environment::Production as i32;

fn get(env: i32) -> pb::GetTokenRequest {
    pb::GetTokenRequest {
        environment: env,
        min_remaining: None,
    }
}

/// The ErrorInfo reason of a broker Status (and its domain checked).
fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let details = status.get_error_details();
    let info = details
        .error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo on {status:?}"));
    assert_eq!(info.domain, flute_token_broker::rpc_status::ERROR_DOMAIN);
    info.reason.clone()
}

fn expires_at(t: &pb::Token) -> SystemTime {
    SystemTime::try_from(t.expires_at.unwrap()).unwrap()
}

#[tokio::test]
async fn every_rpc_over_tcp_and_unix() {
    let broker = start_broker(Duration::from_secs(900)).await;
    for mut client in [broker.client().await, broker.unix_client().await] {
        for env in [SANDBOX, PRODUCTION] {
            let token = client.get_token(get(env)).await.unwrap().into_inner().token.unwrap();
            assert_eq!(token.token_type, "Bearer");
            assert_eq!(token.environment, env);
            assert_eq!(token.token_id.len(), 12);
            assert!(!token.access_token.is_empty());
            assert!(expires_at(&token) > SystemTime::now() + Duration::from_secs(800));
            // serve_for: the serve window left (900 s less the 5 s margin), no clock needed.
            let serve_for = token.serve_for.expect("serve_for is set");
            assert!((800..=895).contains(&serve_for.seconds), "{serve_for:?}");

            let mut watch = client
                .watch_token(pb::WatchTokenRequest { environment: env })
                .await
                .unwrap()
                .into_inner();
            match watch.next().await.unwrap().unwrap().update {
                Some(Update::Token(t)) => assert_eq!(t.token_id, token.token_id),
                other => panic!("expected the current token first, got {other:?}"),
            }

            let refreshed = client
                .refresh_token(pb::RefreshTokenRequest {
                    environment: env,
                    rejected_token_id: token.token_id.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .token
                .unwrap();
            assert_ne!(refreshed.token_id, token.token_id);
            match watch.next().await.unwrap().unwrap().update {
                Some(Update::Token(t)) => assert_eq!(t.token_id, refreshed.token_id, "the watcher sees the rotation"),
                other => panic!("expected the new token, got {other:?}"),
            }
        }
        let status = client.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
        assert_eq!(status.environments.len(), 2);
        for e in &status.environments {
            assert_eq!(e.state, pb::State::Ready as i32);
            assert!(!e.token_id.is_empty() && e.last_error.is_empty());
            assert!(e.counters.unwrap().token_endpoint_calls >= 2);
        }
    }
}

#[tokio::test]
async fn cold_start_thousand_concurrent_get_token_one_call_per_environment() {
    let broker = start_broker_with(&Environment::ALL, Duration::from_secs(900), |emulators, _| {
        for emu in emulators.values() {
            emu.emulator.set_faults(FaultRequest {
                delay_ms: Some(300),
                ..Default::default()
            });
        }
    })
    .await;
    let clients: Vec<_> = futures_util::future::join_all((0..4).map(|_| broker.client())).await;
    let mut calls = Vec::new();
    for i in 0..1000 {
        let mut c = clients[i % clients.len()].clone();
        let env = if i % 2 == 0 { SANDBOX } else { PRODUCTION };
        calls.push(tokio::spawn(async move {
            c.get_token(get(env))
                .await
                .map(|r| r.into_inner().token.unwrap().token_id)
        }));
    }
    let mut ids = HashSet::new();
    for call in calls {
        ids.insert(call.await.unwrap().expect("GetToken during cold start"));
    }
    assert_eq!(ids.len(), 2, "one token per environment");
    for env in Environment::ALL {
        let stats = broker.emulator(env).stats();
        println!(
            "cold start: {env}: {} token endpoint call(s) for 500 concurrent GetToken",
            stats.token_requests
        );
        assert_eq!(stats.token_requests, 1, "{env}");
    }
}

#[tokio::test]
async fn watchers_see_each_rotation_once_and_in_order_even_when_slow() {
    let broker = start_broker_with(&[Environment::Sandbox], Duration::from_secs(2), |_, _| {}).await;
    let mut client = broker.client().await;
    // How many rotations the fast reader has seen so far.
    let progress = tokio::sync::watch::channel(0usize).0;
    let fast = async {
        let mut stream = support::open_watch(&mut client.clone(), SANDBOX).await;
        let mut seen = Vec::new();
        while seen.len() < 8 {
            let t = support::next_token(&mut stream).await;
            seen.push((t.token_id.clone(), expires_at(&t)));
            progress.send_replace(seen.len());
        }
        seen
    };
    let slow = async {
        let mut stream = support::open_watch(&mut client.clone(), SANDBOX).await;
        let mut fast_progress = progress.subscribe();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let t = support::next_token(&mut stream).await;
            seen.push((t.token_id.clone(), expires_at(&t)));
            // Fall behind: let two more rotations happen before reading on.
            let target = *fast_progress.borrow_and_update() + 2;
            fast_progress.wait_for(|n| *n >= target).await.unwrap();
        }
        seen
    };
    let (fast, slow) = tokio::join!(fast, slow);
    println!(
        "watch: fast reader saw {} rotations, slow reader {}",
        fast.len(),
        slow.len()
    );
    for pair in fast.windows(2) {
        assert_ne!(pair[0].0, pair[1].0, "a rotation was sent twice");
        assert!(pair[1].1 > pair[0].1, "rotations out of order");
    }
    // The slow reader sees a subsequence of the same rotations, in order,
    // never a repeat (what it missed while not reading is buffered by
    // HTTP/2 or skipped, never reordered).
    let order: Vec<&String> = fast.iter().map(|(id, _)| id).collect();
    let positions: Vec<usize> = slow
        .iter()
        .map(|(id, _)| {
            order
                .iter()
                .position(|o| *o == id)
                .expect("slow reader saw an unknown token")
        })
        .collect();
    assert!(
        positions.windows(2).all(|p| p[1] > p[0]),
        "slow reader out of order: {positions:?}"
    );
    let now = client
        .get_token(get(SANDBOX))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    assert!(expires_at(&now) > SystemTime::now());
}

async fn health(client: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Waits (on the health Watch stream, not by polling) for `status`.
async fn await_health(client: &mut HealthClient<tonic::transport::Channel>, service: &str, status: ServingStatus) {
    let mut stream = client
        .watch(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(update) = stream.next().await {
            if update.unwrap().status == status as i32 {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("health of {service:?} never became {status:?}"));
}

#[tokio::test]
async fn outage_longer_than_the_lifetime_then_recovery() {
    let broker = start_broker_with(&[Environment::Sandbox], Duration::from_secs(2), |_, _| {}).await;
    let mut client = broker.client().await;
    let mut health_client = HealthClient::new(broker.channel().await);
    await_health(&mut health_client, "", ServingStatus::Serving).await;
    assert_eq!(
        health(&mut health_client, "flute.tokenbroker.v1.TokenBroker/sandbox").await,
        ServingStatus::Serving as i32
    );

    let mut watch = support::open_watch(&mut client, SANDBOX).await;
    assert!(matches!(
        watch.next().await.unwrap().unwrap().update,
        Some(Update::Token(_))
    ));
    broker.emulator(Environment::Sandbox).set_faults(FaultRequest {
        refuse_all: Some(true),
        status: Some(503),
        ..Default::default()
    });

    // Until the outage shows, every token handed out is unexpired.
    let outage = loop {
        match tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("an outage is announced")
            .unwrap()
            .unwrap()
            .update
        {
            Some(Update::Outage(o)) => break o,
            Some(Update::Token(t)) => assert!(expires_at(&t) > SystemTime::now()),
            None => {}
        }
    };
    assert!(outage.reason.contains("503"), "{}", outage.reason);
    assert!(outage.next_attempt_at.is_some());
    let err = client.get_token(get(SANDBOX)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(reason(&err), "NO_VALID_TOKEN");
    {
        use tonic_types::StatusExt;
        let retry = err.get_error_details().retry_info().cloned().expect("a RetryInfo");
        assert!(
            retry.retry_delay.is_some_and(|d| d <= Duration::from_secs(1)),
            "{retry:?}"
        );
    }
    assert!(
        err.message().contains("503") && err.message().contains("next attempt"),
        "{}",
        err.message()
    );
    await_health(&mut health_client, "", ServingStatus::NotServing).await;
    let status = client.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.environments[0].state, pb::State::Unavailable as i32);
    assert!(status.environments[0].consecutive_failures >= 1);

    broker.emulator(Environment::Sandbox).set_faults(FaultRequest {
        clear: true,
        ..Default::default()
    });
    loop {
        match tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("recovery is announced")
            .unwrap()
            .unwrap()
            .update
        {
            Some(Update::Token(t)) => {
                assert!(expires_at(&t) > SystemTime::now());
                break;
            }
            _ => continue,
        }
    }
    assert!(client.get_token(get(SANDBOX)).await.is_ok());
    await_health(&mut health_client, "", ServingStatus::Serving).await;
}

#[tokio::test]
async fn hundred_concurrent_refresh_token_calls_cause_one_fetch() {
    let broker = start_broker_with(&[Environment::Sandbox], Duration::from_secs(900), |_, _| {}).await;
    let client = broker.client().await;
    let token = client
        .clone()
        .get_token(get(SANDBOX))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    let before = broker.emulator(Environment::Sandbox).stats().token_requests;
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let mut c = client.clone();
            let id = token.token_id.clone();
            tokio::spawn(async move {
                c.refresh_token(pb::RefreshTokenRequest {
                    environment: SANDBOX,
                    rejected_token_id: id,
                })
                .await
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for call in calls {
        ids.insert(call.await.unwrap().unwrap().into_inner().token.unwrap().token_id);
    }
    let after = broker.emulator(Environment::Sandbox).stats().token_requests;
    println!(
        "RefreshToken: 100 concurrent callers → {} token endpoint call(s)",
        after - before
    );
    assert_eq!(after - before, 1);
    assert_eq!(ids.len(), 1);
    assert!(!ids.contains(&token.token_id));
}

/// Sends `body` as the request message of a unary `path`; returns the error.
async fn raw_unary(channel: tonic::transport::Channel, path: &'static str, body: &[u8]) -> tonic::Status {
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    struct Raw;
    impl Encoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            bytes::BufMut::put_slice(dst, &item);
            Ok(())
        }
    }
    impl Decoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
            let n = bytes::Buf::remaining(src);
            Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
        }
    }
    struct RawCodec;
    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body.to_vec()),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .expect_err("a malformed request is refused")
}

#[tokio::test]
async fn bad_requests_get_the_documented_codes() {
    let broker = start_broker_with(&[Environment::Sandbox], Duration::from_secs(900), |_, _| {}).await;
    let mut c = broker.client().await;
    let code = |r: Result<tonic::Response<pb::GetTokenResponse>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(code(c.get_token(get(0)).await), Code::InvalidArgument);
    assert_eq!(code(c.get_token(get(42)).await), Code::InvalidArgument);
    assert_eq!(code(c.get_token(get(PRODUCTION)).await), Code::FailedPrecondition);
    // Each carries its machine-readable reason.
    for (request, expected) in [
        (get(0), "ENVIRONMENT_UNSPECIFIED"),
        (get(PRODUCTION), "ENVIRONMENT_NOT_ENABLED"),
        (
            pb::GetTokenRequest {
                environment: SANDBOX,
                min_remaining: Some(prost_types::Duration { seconds: -1, nanos: 0 }),
            },
            "INVALID_FIELD",
        ),
        (
            pb::GetTokenRequest {
                environment: SANDBOX,
                min_remaining: Some(prost_types::Duration {
                    seconds: 7200,
                    nanos: 0,
                }),
            },
            "MIN_REMAINING_TOO_LONG",
        ),
    ] {
        assert_eq!(reason(&c.get_token(request).await.unwrap_err()), expected);
    }
    let negative = pb::GetTokenRequest {
        environment: SANDBOX,
        min_remaining: Some(prost_types::Duration { seconds: -5, nanos: 0 }),
    };
    assert_eq!(code(c.get_token(negative).await), Code::InvalidArgument);
    let too_long = pb::GetTokenRequest {
        environment: SANDBOX,
        min_remaining: Some(prost_types::Duration {
            seconds: 7200,
            nanos: 0,
        }),
    };
    assert_eq!(code(c.get_token(too_long).await), Code::OutOfRange);
    let fine = pb::GetTokenRequest {
        environment: SANDBOX,
        min_remaining: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
    };
    assert!(c.get_token(fine).await.is_ok());

    let refresh = |id: String| pb::RefreshTokenRequest {
        environment: SANDBOX,
        rejected_token_id: id,
    };
    assert_eq!(
        c.refresh_token(refresh(String::new())).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.refresh_token(refresh("x".repeat(200))).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // Oversized messages: just over the 16 KiB limit, and far over it.
    for size in [16 * 1024 + 1, 100_000, 4_000_000] {
        let huge = c.refresh_token(refresh("x".repeat(size))).await.unwrap_err();
        assert_eq!(huge.code(), Code::ResourceExhausted, "{size} bytes: {huge:?}");
    }
    // Durations that google.protobuf.Duration does not allow.
    for (seconds, nanos) in [
        (1, 1_000_000_000),
        (1, -5),
        (-1, 5),
        (0, i32::MAX),
        (400_000_000_000, 0),
    ] {
        let request = pb::GetTokenRequest {
            environment: SANDBOX,
            min_remaining: Some(prost_types::Duration { seconds, nanos }),
        };
        let status = c.get_token(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{seconds}s {nanos}ns: {status:?}");
    }
    // Bytes that are not a valid request: invalid UTF-8 in a string field,
    // a truncated field, a wrong wire type.
    let channel = broker.channel().await;
    for body in [
        &[0x08, 0x01, 0x12, 0x02, 0xff, 0xfe][..],
        &[0x08, 0x01, 0x12, 0x09, b'a'][..],
        &[0x0d, 0x01][..],
    ] {
        let status = raw_unary(channel.clone(), "/flute.tokenbroker.v1.TokenBroker/RefreshToken", body).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{body:x?}: {status:?}");
    }
    let watch = c
        .watch_token(pb::WatchTokenRequest {
            environment: PRODUCTION,
        })
        .await
        .unwrap_err();
    assert_eq!(watch.code(), Code::FailedPrecondition);
    // The broker is still fine.
    assert!(c.get_token(get(SANDBOX)).await.is_ok());
}

#[tokio::test]
async fn a_slow_endpoint_yields_deadline_exceeded() {
    let broker = start_broker_with(&[Environment::Sandbox], Duration::from_secs(10), |_, _| {}).await;
    let mut c = broker.client().await;
    c.get_token(get(SANDBOX)).await.unwrap();
    broker.emulator(Environment::Sandbox).set_faults(FaultRequest {
        delay_ms: Some(3000),
        ..Default::default()
    });
    // A forced refresh has to wait for the slow endpoint, past the call's deadline.
    let current = support::current_token(&mut c, SANDBOX).await;
    let mut request = tonic::Request::new(pb::RefreshTokenRequest {
        environment: SANDBOX,
        rejected_token_id: current.token_id,
    });
    request.set_timeout(Duration::from_millis(500));
    let err = c.refresh_token(request).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
}

#[tokio::test]
async fn reflection_lists_the_service() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let broker = start_broker_with(&[Environment::Sandbox], Duration::from_secs(900), |_, _| {}).await;
    let mut client = ServerReflectionClient::new(broker.channel().await);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = stream.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"flute.tokenbroker.v1.TokenBroker"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    // The same through v1alpha, which older clients speak.
    use tonic_reflection::pb::v1alpha as alpha;
    let mut client = alpha::server_reflection_client::ServerReflectionClient::new(broker.channel().await);
    let request = alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(alpha::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        stream.next().await.unwrap().unwrap().message_response
    else {
        panic!("no v1alpha service list")
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "flute.tokenbroker.v1.TokenBroker"),
        "{list:?}"
    );
}

/// Device and inode of the socket file at `path`.
fn socket_identity(path: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.dev(), meta.ino())
}

/// A sandbox token over `client`.
async fn sandbox_token(client: &mut support::Client) -> pb::Token {
    client
        .get_token(get(SANDBOX))
        .await
        .expect("a token")
        .into_inner()
        .token
        .unwrap()
}

/// A sandbox token over a new connection to `addr`.
async fn sandbox_token_on_a_new_connection(addr: &str) -> pb::Token {
    let mut client = flute_token_broker::client::connect(addr, Duration::from_secs(5))
        .await
        .unwrap();
    sandbox_token(&mut client).await
}

/// Two brokers on one socket path, as a DaemonSet rolling update runs them:
/// a stale file is replaced at once; a live broker keeps the path until
/// the new one holds its tokens, then one rename moves the path to the new
/// one; the old broker still answers on its open connections, and its
/// shutdown leaves the successor's socket in place.
#[tokio::test]
async fn a_second_broker_takes_over_a_served_socket_once_ready() {
    use flute_token_broker::emulator::FaultRequest;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // a crashed run's leftover
    let stale = socket_identity(&path);
    let first = start_broker_with(&[Environment::Sandbox], Duration::from_secs(900), |_, config| {
        config.server.listen = vec![flute_token_broker::serve::listen::ListenAddr::Unix(path.clone())];
    })
    .await;
    let addr = format!("unix:{}", path.display());
    let first_socket = socket_identity(&path);
    assert_ne!(first_socket, stale, "the stale file was replaced at once");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o660);
    let mut on_first = flute_token_broker::client::connect(&addr, Duration::from_secs(5))
        .await
        .unwrap();
    let t1 = sandbox_token(&mut on_first).await;

    // The successor cannot get a token yet: the path stays the first's.
    first.emulator(Environment::Sandbox).set_faults(FaultRequest {
        refuse_all: Some(true),
        ..Default::default()
    });
    let mut config = support::broker_config(&first.emulators, dir.path());
    config.server.listen = vec![flute_token_broker::serve::listen::ListenAddr::Unix(path.clone())];
    config.admin.listen = None;
    config.systemd.ready_timeout = Duration::from_millis(100);
    let second = flute_token_broker::daemon::Broker::build(config, None)
        .await
        .expect("a successor starts");
    // Past its ready timeout without a token: still no takeover.
    tokio::time::timeout(Duration::from_secs(30), second.ready.cancelled())
        .await
        .expect("the ready timeout passes");
    assert_eq!(
        socket_identity(&path),
        first_socket,
        "without a token the path stays the first broker's"
    );
    let still = sandbox_token_on_a_new_connection(&addr).await;
    assert_eq!(still.token_id, t1.token_id, "a new caller reaches the first broker");

    // Once it holds a token, one rename hands the path over.
    first.emulator(Environment::Sandbox).set_faults(FaultRequest {
        clear: true,
        ..Default::default()
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while socket_identity(&path) == first_socket {
        assert!(
            std::time::Instant::now() < deadline,
            "the successor takes the path over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        second.sources.iter().all(|s| s.current().is_some()),
        "it holds its token"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o660);
    let mut on_second = flute_token_broker::client::connect(&addr, Duration::from_secs(5))
        .await
        .unwrap();
    let t2 = sandbox_token(&mut on_second).await;
    assert_ne!(t2.token_id, t1.token_id, "a new caller reaches the successor");
    let old = sandbox_token(&mut on_first).await;
    assert_eq!(old.token_id, t1.token_id, "open connections stay with the first broker");

    let successor_socket = socket_identity(&path);
    first.daemon.shutdown().await;
    assert_eq!(
        socket_identity(&path),
        successor_socket,
        "the first broker's shutdown leaves the successor's socket"
    );
    assert!(on_second.get_token(get(SANDBOX)).await.is_ok());
    second.shutdown().await;
    assert!(!path.exists(), "the last broker removes its own socket");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(leftovers.is_empty(), "no temporary socket left: {leftovers:?}");
}

#[tokio::test]
async fn allow_lists_gate_environments_by_unix_peer_credentials() {
    let (uid, gid) = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
    let broker = start_broker_with(&Environment::ALL, Duration::from_secs(900), |_, config| {
        config
            .environments
            .get_mut(&Environment::Sandbox)
            .unwrap()
            .allowed_unix_groups = vec![gid];
        config
            .environments
            .get_mut(&Environment::Production)
            .unwrap()
            .allowed_unix_users = vec![uid + 4242];
    })
    .await;
    let mut unix = broker.unix_client().await;
    let mut tcp = broker.client().await;

    assert!(
        unix.get_token(get(SANDBOX)).await.is_ok(),
        "the caller's group is allowed"
    );
    assert_eq!(
        unix.get_token(get(PRODUCTION)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let refresh = pb::RefreshTokenRequest {
        environment: PRODUCTION,
        rejected_token_id: "abc".into(),
    };
    assert_eq!(
        unix.refresh_token(refresh).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let watch = unix
        .watch_token(pb::WatchTokenRequest {
            environment: PRODUCTION,
        })
        .await
        .unwrap_err();
    assert_eq!(watch.code(), Code::PermissionDenied);
    assert_eq!(reason(&watch), "CALLER_NOT_ALLOWED");
    assert!(watch.message().contains("production"), "{}", watch.message());
    // TCP callers carry no identity: refused wherever an allow-list applies.
    assert_eq!(
        tcp.get_token(get(SANDBOX)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // GetStatus lists every environment but shows details only of those the
    // caller may get tokens of: over Unix, sandbox yes and production no;
    // over TCP neither.
    let status_of = |reply: pb::GetStatusResponse, env: i32| {
        reply
            .environments
            .into_iter()
            .find(|e| e.environment == env)
            .expect("every enabled environment is listed")
    };
    let unix_status = unix.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    let sandbox = status_of(unix_status.clone(), SANDBOX);
    assert_eq!(sandbox.state, pb::State::Ready as i32);
    assert!(!sandbox.token_id.is_empty() && sandbox.counters.is_some());
    let restricted = pb::EnvironmentStatus {
        environment: PRODUCTION,
        state: pb::State::Restricted as i32,
        ..Default::default()
    };
    assert_eq!(status_of(unix_status, PRODUCTION), restricted);
    // `status` as a probe: a restricted environment is listed but is not the
    // caller's failure; asked for by name, it is a refusal (exit 77).
    let target = flute_token_broker::client::Target::new(broker.unix.clone(), Duration::from_secs(5));
    let report = flute_token_broker::client::status(&target, false, None).await.unwrap();
    assert!(report.without_token.is_empty(), "{:?}", report.without_token);
    assert!(report.text.contains("RESTRICTED"), "{}", report.text);
    let only = flute_token_broker::client::status(&target, false, Some(Environment::Production))
        .await
        .err()
        .expect("production is not shown to this caller");
    assert_eq!(only.exit_code(), 77, "{only}");
    assert!(
        flute_token_broker::client::status(&target, false, Some(Environment::Sandbox))
            .await
            .is_ok()
    );
    let tcp_status = tcp.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(tcp_status.environments.len(), 2);
    for env in [SANDBOX, PRODUCTION] {
        let shown = status_of(tcp_status.clone(), env);
        assert_eq!(
            shown,
            pb::EnvironmentStatus {
                environment: env,
                ..restricted.clone()
            }
        );
    }
}

/// A connection with nothing open is closed after `idle_timeout`; one that
/// carries a WatchToken stream is not, however long the stream is quiet.
#[tokio::test]
async fn idle_connections_are_closed_but_open_streams_keep_theirs() {
    let broker = start_broker_with(&[Environment::Sandbox], Duration::from_secs(4), |_, config| {
        config.server.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let mut watcher = broker.client().await;
    let mut stream = support::open_watch(&mut watcher, SANDBOX).await;
    support::next_token(&mut stream).await;
    let mut idle = broker.client().await;
    support::current_token(&mut idle, SANDBOX).await;

    let admin = broker.daemon.admin_addr.unwrap();
    let series = format!(
        "flute_broker_connections_closed_total{{listener=\"grpc:{}\",reason=\"idle_timeout\"}}",
        broker.tcp.trim_start_matches("http://")
    );
    support::await_metric(admin, &series, 1.0).await;
    // The stream's connection is still there: it carries the next rotation.
    support::next_token(&mut stream).await;
    // And the idle client simply reconnects.
    support::current_token(&mut idle, SANDBOX).await;
}
