//! Held requests cannot starve short ones, and are counted by the
//! connections they hold. One local process holds 1,100 long polls (one
//! HTTP/1.1 connection each, as curl makes them), or 1,100 connections each
//! holding one WatchToken stream, on a TCP listener with a budget of 1,024
//! connections (half of them for holding connections): the held ones beyond
//! the share are refused at once with a retry delay, and a GetToken (gRPC)
//! and an HTTP read on new connections to that same listener are still
//! answered. With default settings, 10,000 WatchToken streams on 100
//! connections take 100 slots: all open and all receive a rotation.

mod support;

use std::time::{Duration, Instant};

use flute_token_broker::wire::pb;
use support::start_broker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const SANDBOX: i32 = pb::Environment::Sandbox as i32;
const HOLDERS: usize = 1_100;
/// The listener's budget in the starvation tests, and half of it.
const BUDGET: usize = 1_024;
const HELD_SHARE: usize = 512;
/// Longest a call in these tests may take before it counts as starved.
const STARVED: Duration = Duration::from_secs(10);

/// A broker whose listeners have a budget of [`BUDGET`] connections.
async fn start_broker_with_budget() -> support::Broker {
    support::start_broker_with(
        &flute_token_broker::environment::Environment::ALL,
        Duration::from_secs(900),
        |_, config| config.server.max_connections = BUDGET,
    )
    .await
}

/// A GetToken on a new connection to `tcp`, and how long it took.
async fn get_token_on_a_new_connection(tcp: &str) -> Duration {
    let started = Instant::now();
    let call = async {
        let mut client = flute_token_broker::client::connect(tcp, STARVED).await.unwrap();
        support::current_token(&mut client, SANDBOX).await
    };
    let token = tokio::time::timeout(STARVED, call)
        .await
        .expect("GetToken on the held listener starved");
    assert!(!token.access_token.is_empty());
    started.elapsed()
}

/// An HTTP read on a new connection to `tcp`, and how long it took.
async fn http_read_on_a_new_connection(tcp: &str) -> Duration {
    let started = Instant::now();
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(tcp.trim_start_matches("http://"))
            .await
            .unwrap();
        stream
            .write_all(
                b"GET /v1/environments/sandbox/token HTTP/1.1\r\nHost: localhost\r\nFlute-Broker: true\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    };
    let answer = tokio::time::timeout(STARVED, read)
        .await
        .expect("the HTTP read on the held listener starved");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_beyond_their_share_are_refused_and_get_token_finds_room() {
    let broker = start_broker_with_budget().await;
    let mut client = broker.client().await;
    let current = support::current_token(&mut client, SANDBOX).await;
    let (baseline_grpc, baseline_http) = (
        get_token_on_a_new_connection(&broker.tcp).await,
        http_read_on_a_new_connection(&broker.tcp).await,
    );

    // Each poller: one connection, one long poll for a change that does not
    // come; it reports the status line of an answer, if one comes.
    let (answered, mut answers) = mpsc::unbounded_channel();
    let addr = broker.tcp.trim_start_matches("http://").to_owned();
    let request = format!(
        "GET /v1/environments/sandbox/token?wait_for_change=true&last_etag=%22{}%22&timeout_sec=300 HTTP/1.1\r\n\
         Host: localhost\r\nFlute-Broker: true\r\n\r\n",
        current.token_id
    );
    let mut pollers = Vec::new();
    for _ in 0..HOLDERS {
        let (addr, request, answered) = (addr.clone(), request.clone(), answered.clone());
        pollers.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            // A refused poll is answered and its connection closed.
            let _ = stream.read_to_end(&mut answer).await;
            let _ = answered.send(String::from_utf8_lossy(&answer).into_owned());
        }));
    }
    let mut refused = 0;
    while refused < HOLDERS - HELD_SHARE {
        let answer = tokio::time::timeout(STARVED, answers.recv())
            .await
            .expect("every long poll beyond the share is answered at once")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
        assert!(answer.contains("retry-after: 2"), "{answer}");
        assert!(answer.contains("HELD_REQUESTS_LIMIT"), "{answer}");
        refused += 1;
    }
    // The held ones are still open: none of them answered.
    assert!(answers.try_recv().is_err());

    let (loaded_grpc, loaded_http) = (
        get_token_on_a_new_connection(&broker.tcp).await,
        http_read_on_a_new_connection(&broker.tcp).await,
    );
    eprintln!(
        "{HOLDERS} long polls: {refused} refused, {HELD_SHARE} held; GetToken on a new connection \
         {baseline_grpc:?} before, {loaded_grpc:?} during; HTTP read {baseline_http:?} before, {loaded_http:?} during"
    );
    for poller in pollers {
        poller.abort();
    }
}

/// Counts watchers' first answers (held: `None`; refused: the status)
/// until `total` have answered.
async fn count_answers(
    answers: &mut mpsc::UnboundedReceiver<Option<tonic::Status>>,
    held: &mut usize,
    refused: &mut usize,
    total: usize,
) {
    while *held + *refused < total {
        match tokio::time::timeout(STARVED * 3, answers.recv())
            .await
            .expect("every watcher is answered, held or refused")
            .unwrap()
        {
            None => *held += 1,
            Some(status) => *refused += check_refusal(status),
        }
    }
}

/// A refused WatchToken: RESOURCE_EXHAUSTED, its reason and retry delay.
fn check_refusal(status: tonic::Status) -> usize {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    let details = status.get_error_details();
    assert_eq!(details.error_info().unwrap().reason, "HELD_REQUESTS_LIMIT");
    assert_eq!(details.retry_info().unwrap().retry_delay, Some(Duration::from_secs(2)));
    1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_beyond_their_share_are_refused_and_get_token_finds_room() {
    let broker = start_broker_with_budget().await;
    let baseline = get_token_on_a_new_connection(&broker.tcp).await;

    // Each watcher: its own connection (a channel each), one stream, kept
    // open with the connection after the first answer. They connect in
    // waves of 100 (1,100 connects at one instant would overflow the
    // kernel's accept queue, which is not what this test is about).
    let (answered, mut answers) = mpsc::unbounded_channel();
    let mut watchers = Vec::new();
    let (mut held, mut refused) = (0, 0);
    for started in 0..HOLDERS {
        if started % 100 == 0 {
            count_answers(&mut answers, &mut held, &mut refused, started).await;
        }
        let (tcp, answered) = (broker.tcp.clone(), answered.clone());
        watchers.push(tokio::spawn(async move {
            let channel = tonic::transport::Endpoint::from_shared(tcp).unwrap().connect_lazy();
            let mut client = pb::token_broker_client::TokenBrokerClient::new(channel);
            let outcome = match client.watch_token(pb::WatchTokenRequest { environment: SANDBOX }).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    match stream.message().await {
                        Ok(Some(_)) => Ok(stream),
                        other => panic!("a held stream's first message: {other:?}"),
                    }
                }
                Err(status) => Err(status),
            };
            let held = match outcome {
                Ok(stream) => {
                    let _ = answered.send(None);
                    Some(stream)
                }
                Err(status) => {
                    let _ = answered.send(Some(status));
                    None
                }
            };
            // Hold the stream (or the refused connection) until aborted.
            let _keep = (client, held);
            std::future::pending::<()>().await;
        }));
    }
    count_answers(&mut answers, &mut held, &mut refused, HOLDERS).await;
    assert_eq!((held, refused), (HELD_SHARE, HOLDERS - HELD_SHARE));

    let loaded = get_token_on_a_new_connection(&broker.tcp).await;
    let http = http_read_on_a_new_connection(&broker.tcp).await;
    eprintln!(
        "{HOLDERS} watch connections: {held} streams held, {refused} refused; GetToken on a new connection \
         {baseline:?} before, {loaded:?} during; HTTP read {http:?} during"
    );
    for watcher in watchers {
        watcher.abort();
    }
}

/// Streams per connection in the fleet-sized case, well inside the default
/// `max_concurrent_streams` (1,024).
const STREAMS_PER_CONNECTION: usize = 100;
const FLEET_STREAMS: usize = 10_000;

/// 10,000 WatchToken streams multiplexed on 100 connections (a hub's
/// agents, two environments each, or the perf harness's watchers) take 100
/// of the 512 holding connections a default listener admits: every stream
/// opens, and every one receives the next rotation.
async fn fleet_of_streams_opens_and_rotates(addr: &str, broker: &support::Broker) {
    let mut streams = Vec::with_capacity(FLEET_STREAMS);
    let mut connections = Vec::new();
    for _ in 0..FLEET_STREAMS / STREAMS_PER_CONNECTION {
        let client = flute_token_broker::client::connect(addr, STARVED).await.unwrap();
        let opened: Vec<_> = (0..STREAMS_PER_CONNECTION)
            .map(|_| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    let mut stream = support::open_watch(&mut client, SANDBOX).await;
                    let first = support::next_token(&mut stream).await;
                    (stream, first.token_id)
                })
            })
            .collect();
        for stream in opened {
            streams.push(stream.await.expect("every stream of the fleet opens"));
        }
        connections.push(client);
    }
    assert_eq!(streams.len(), FLEET_STREAMS);
    let current = streams[0].1.clone();
    assert!(streams.iter().all(|(_, id)| *id == current));
    // Counted by connection: the 100 connections hold, the streams on them
    // take no slot of their own, and none was refused.
    let metrics = support::metrics_text(broker.daemon.admin_addr.unwrap()).await;
    let sum = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(sum("flute_broker_held_requests_refused_total"), 0.0, "{metrics}");
    assert_eq!(
        sum("flute_broker_held_connections"),
        (FLEET_STREAMS / STREAMS_PER_CONNECTION) as f64
    );
    assert_eq!(sum("flute_broker_held_requests"), FLEET_STREAMS as f64);

    // One rotation reaches every stream.
    let waiting: Vec<_> = streams
        .into_iter()
        .map(|(mut stream, _)| tokio::spawn(async move { support::next_token(&mut stream).await.token_id }))
        .collect();
    let mut client = flute_token_broker::client::connect(addr, STARVED).await.unwrap();
    let fresh = client
        .refresh_token(pb::RefreshTokenRequest {
            environment: SANDBOX,
            rejected_token_id: current.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    assert_ne!(fresh.token_id, current);
    for received in waiting {
        let received = tokio::time::timeout(STARVED * 3, received)
            .await
            .expect("every stream receives the rotation")
            .unwrap();
        assert_eq!(received, fresh.token_id);
    }
    drop(connections);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_watch_streams_on_a_hundred_tcp_connections_open_and_rotate() {
    let broker = start_broker(Duration::from_secs(900)).await;
    fleet_of_streams_opens_and_rotates(&broker.tcp, &broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_watch_streams_on_a_hundred_unix_connections_open_and_rotate() {
    let broker = start_broker(Duration::from_secs(900)).await;
    fleet_of_streams_opens_and_rotates(&broker.unix, &broker).await;
}
