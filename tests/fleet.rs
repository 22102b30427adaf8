//! Hub and agents over real gRPC: an agent broker (no API key) follows an
//! environment on hub brokers and serves it through the same API. Hubs are
//! whole brokers in this process on their own emulators; the skew tests use
//! a hand-written upstream whose clock is five minutes off.

mod support;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use flute_token_broker::Environment;
use flute_token_broker::config::Config;
use flute_token_broker::daemon::{self, RunningBroker};
use flute_token_broker::serve::listen::ListenAddr;
use flute_token_broker::wire::pb;
use flute_token_broker::wire::pb::token_broker_server::{TokenBroker, TokenBrokerServer};
use support::{CLIENT_SECRET, Client, current_token, next_outage, next_token, open_watch, start_broker_with};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

const SANDBOX: i32 = pb::Environment::Sandbox as i32;

/// An agent broker following the sandbox on `upstream`, with no
/// `[credentials]` at all.
async fn start_agent(upstream: Vec<String>, dir: &std::path::Path) -> (RunningBroker, Client, String) {
    start_agent_with(upstream, dir, |_| {}).await
}

/// [`start_agent`], with `adjust` applied to its configuration last.
async fn start_agent_with(
    upstream: Vec<String>,
    dir: &std::path::Path,
    adjust: impl FnOnce(&mut Config),
) -> (RunningBroker, Client, String) {
    let mut config = Config::default();
    let socket = dir.join("agent.sock");
    config.server.listen = vec![ListenAddr::Unix(socket.clone())];
    config.server.shutdown_grace = Duration::from_secs(5);
    config.admin.listen = None;
    config.refresh.backoff_initial = Duration::from_millis(200);
    config.refresh.backoff_max = Duration::from_secs(1);
    let sandbox = config.environments.get_mut(&Environment::Sandbox).unwrap();
    sandbox.token_url = String::new();
    sandbox.upstream = upstream;
    config.environments.get_mut(&Environment::Production).unwrap().enabled = false;
    adjust(&mut config);
    config
        .validate()
        .expect("an agent configuration without credentials is valid");
    let agent = daemon::Broker::build(config, None).await.expect("agent starts");
    let addr = format!("unix:{}", socket.display());
    let client = support::connect_when_up(&addr).await;
    (agent, client, addr)
}

async fn hub(lifetime: Duration) -> support::Broker {
    start_broker_with(&[Environment::Sandbox], lifetime, |_, _| {}).await
}

async fn status(client: &mut Client) -> pb::EnvironmentStatus {
    let reply = client.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    reply.environments.into_iter().next().unwrap()
}

fn serve_for(token: &pb::Token) -> Duration {
    let d = token.serve_for.unwrap();
    Duration::new(d.seconds as u64, d.nanos as u32)
}

#[tokio::test]
async fn an_agent_serves_the_hubs_tokens_and_their_rotations_without_a_secret() {
    let hub = hub(Duration::from_secs(4)).await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, mut client, _) = start_agent(vec![hub.unix.clone()], dir.path()).await;
    let mut at_hub = hub.unix_client().await;

    let mut watch = open_watch(&mut client, SANDBOX).await;
    let first = next_token(&mut watch).await;
    assert_eq!(first.token_id, current_token(&mut at_hub, SANDBOX).await.token_id);
    assert!(serve_for(&first) <= Duration::from_secs(4));
    // The hub rotates (4 s tokens, refreshed at half-life): the agent's
    // watcher gets each new token, the one the hub serves.
    let mut seen = vec![first.token_id.clone()];
    for _ in 0..2 {
        let next = next_token(&mut watch).await;
        assert!(!seen.contains(&next.token_id));
        seen.push(next.token_id);
    }
    assert_eq!(
        hub.emulator(Environment::Sandbox).stats().token_requests as usize,
        seen.len(),
        "one endpoint call per rotation, all by the hub"
    );
    let state = status(&mut client).await;
    assert_eq!(state.state, pb::State::Ready as i32);
    // Nothing the agent says carries the key: it never had it.
    let shown = format!("{state:?}{:?}", agent.sources.summary());
    assert!(!shown.contains(CLIENT_SECRET));
    agent.shutdown().await;
}

#[tokio::test]
async fn concurrent_refreshes_at_agents_reach_the_endpoint_once() {
    let hub = hub(Duration::from_secs(900)).await;
    let dir = tempfile::tempdir().unwrap();
    let (_agent, mut client, addr) = start_agent(vec![hub.unix.clone()], dir.path()).await;
    let rejected = current_token(&mut client, SANDBOX).await;
    let before = hub.emulator(Environment::Sandbox).stats().token_requests;

    let calls: Vec<_> = (0..50)
        .map(|_| {
            let (addr, id) = (addr.clone(), rejected.token_id.clone());
            tokio::spawn(async move {
                let mut client = flute_token_broker::client::connect(&addr, Duration::from_secs(5))
                    .await
                    .unwrap();
                let request = pb::RefreshTokenRequest {
                    environment: SANDBOX,
                    rejected_token_id: id,
                };
                client.refresh_token(request).await.unwrap().into_inner().token.unwrap()
            })
        })
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    for call in calls {
        ids.insert(call.await.unwrap().token_id);
    }
    assert_eq!(ids.len(), 1, "every caller got the same replacement");
    assert!(!ids.contains(&rejected.token_id));
    assert_eq!(
        hub.emulator(Environment::Sandbox).stats().token_requests,
        before + 1,
        "50 reports at the agent → one forwarded call → one token request"
    );
    // A min_remaining the current token meets costs nothing upstream.
    let request = pb::GetTokenRequest {
        environment: SANDBOX,
        min_remaining: Some(prost_types::Duration { seconds: 600, nanos: 0 }),
    };
    client.get_token(request).await.unwrap();
    assert_eq!(hub.emulator(Environment::Sandbox).stats().token_requests, before + 1);
}

#[tokio::test]
async fn losing_the_only_hub_keeps_the_token_until_its_window_ends_then_says_why() {
    let hub = hub(Duration::from_secs(6)).await;
    let hub_addr = hub.unix.clone();
    let dir = tempfile::tempdir().unwrap();
    let (_agent, mut client, _) = start_agent(vec![hub_addr.clone()], dir.path()).await;
    let mut watch = open_watch(&mut client, SANDBOX).await;
    let held = next_token(&mut watch).await;

    hub.daemon.shutdown().await;
    // The token stays served while its window lasts...
    let still = current_token(&mut client, SANDBOX).await;
    assert!(still.token_id == held.token_id || serve_for(&still) > Duration::ZERO);
    // ...then the outage, naming the hub that cannot be reached.
    let outage = next_outage(&mut watch).await;
    assert!(outage.reason.contains(&hub_addr), "{}", outage.reason);
    let err = client
        .get_token(pb::GetTokenRequest {
            environment: SANDBOX,
            min_remaining: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains(&hub_addr), "{}", err.message());
}

#[tokio::test]
async fn a_hub_replicas_loss_costs_the_agents_callers_nothing() {
    let (a, b) = (hub(Duration::from_secs(900)).await, hub(Duration::from_secs(900)).await);
    let dir = tempfile::tempdir().unwrap();
    let (_agent, mut client, addr) = start_agent(vec![a.tcp.clone(), b.tcp.clone()], dir.path()).await;
    let mut watch = open_watch(&mut client, SANDBOX).await;
    let first = next_token(&mut watch).await;
    let token_of = |hub: &support::Broker| {
        hub.daemon
            .sources
            .iter()
            .next()
            .unwrap()
            .current()
            .unwrap()
            .token_id
            .clone()
    };
    let (followed, other) = if first.token_id == token_of(&a) { (a, b) } else { (b, a) };
    assert_eq!(first.token_id, token_of(&followed));

    // Callers at the agent, without pause, while the followed hub goes away.
    let stop = Arc::new(tokio::sync::Notify::new());
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let caller = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let mut client = flute_token_broker::client::connect(&addr, Duration::from_secs(5))
                .await
                .unwrap();
            loop {
                let request = pb::GetTokenRequest {
                    environment: SANDBOX,
                    min_remaining: None,
                };
                tokio::select! {
                    _ = stop.notified() => return,
                    r = client.get_token(request) => match r {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    },
                };
            }
        })
    };
    followed.daemon.shutdown().await;
    // The agent moves to the other replica: its watcher gets that token.
    let next = next_token(&mut watch).await;
    assert_eq!(next.token_id, token_of(&other));
    stop.notify_one();
    caller.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "{} calls succeeded",
        ok.load(Ordering::Relaxed)
    );
    assert!(ok.load(Ordering::Relaxed) > 0);
    assert_eq!(status(&mut client).await.state, pb::State::Ready as i32);
}

#[tokio::test]
async fn a_hub_refuses_an_agent_its_allow_list_does_not_name() {
    let hub = start_broker_with(&[Environment::Sandbox], Duration::from_secs(900), |_, config| {
        let me = nix::unistd::getuid().as_raw();
        config
            .environments
            .get_mut(&Environment::Sandbox)
            .unwrap()
            .allowed_unix_users = vec![me + 1];
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (_agent, mut client, _) = start_agent(vec![hub.unix.clone()], dir.path()).await;
    let mut watch = open_watch(&mut client, SANDBOX).await;
    let outage = next_outage(&mut watch).await;
    assert!(
        outage.reason.contains("PermissionDenied") && outage.reason.contains("may not get sandbox tokens"),
        "{}",
        outage.reason
    );
    // Not allowed is not worth hammering: the next attempt is backoff_max away.
    let state = status(&mut client).await;
    assert_eq!(state.state, pb::State::Unavailable as i32);
    assert_eq!(hub.emulator(Environment::Sandbox).stats().token_requests, 1);
}

/// An upstream whose wall clock is `offset` off: its timestamps say so,
/// its `serve_for` does not.
struct SkewedHub {
    offset_secs: i64,
    serve_for: Duration,
    access_token: String,
}

impl SkewedHub {
    fn token(&self) -> pb::Token {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let issued = now + self.offset_secs - 5;
        pb::Token {
            access_token: self.access_token.clone(),
            token_type: "Bearer".into(),
            issued_at: Some(prost_types::Timestamp {
                seconds: issued,
                nanos: 0,
            }),
            expires_at: Some(prost_types::Timestamp {
                seconds: issued + 900,
                nanos: 0,
            }),
            environment: SANDBOX,
            token_id: flute_token_broker::token::token_id(&self.access_token),
            serve_for: Some(prost_types::Duration {
                seconds: self.serve_for.as_secs() as i64,
                nanos: self.serve_for.subsec_nanos() as i32,
            }),
        }
    }
}

type Updates = Pin<Box<dyn futures_util::Stream<Item = Result<pb::WatchTokenResponse, Status>> + Send>>;

#[tonic::async_trait]
impl TokenBroker for SkewedHub {
    async fn get_token(&self, _: Request<pb::GetTokenRequest>) -> Result<Response<pb::GetTokenResponse>, Status> {
        Ok(Response::new(pb::GetTokenResponse {
            token: Some(self.token()),
        }))
    }
    type WatchTokenStream = Updates;
    async fn watch_token(&self, _: Request<pb::WatchTokenRequest>) -> Result<Response<Updates>, Status> {
        use futures_util::StreamExt;
        let first = pb::WatchTokenResponse {
            update: Some(pb::watch_token_response::Update::Token(self.token())),
        };
        Ok(Response::new(
            futures_util::stream::iter([Ok(first)])
                .chain(futures_util::stream::pending())
                .boxed(),
        ))
    }
    async fn refresh_token(
        &self,
        _: Request<pb::RefreshTokenRequest>,
    ) -> Result<Response<pb::RefreshTokenResponse>, Status> {
        Err(Status::unavailable("not in this test"))
    }
    async fn get_status(&self, _: Request<pb::GetStatusRequest>) -> Result<Response<pb::GetStatusResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// Serves a hand-written upstream on loopback; its `http://` address.
async fn serve_upstream(hub: impl TokenBroker) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TokenBrokerServer::new(hub))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// The invariant under skew: the agent serves a token for the `serve_for`
/// its hub sent, from its own clock, whichever way the clocks differ. An
/// agent that trusted `expires_at` would serve five minutes too long (hub
/// ahead), or refuse a good token (hub behind).
#[tokio::test]
async fn a_five_minute_clock_skew_neither_extends_nor_cuts_a_tokens_window() {
    for offset_secs in [300, -300] {
        let short = Duration::from_secs(3);
        let sent = Instant::now();
        let upstream = serve_upstream(SkewedHub {
            offset_secs,
            serve_for: short,
            access_token: format!("skewed-{offset_secs}"),
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let (agent, mut client, _) = start_agent(vec![upstream], dir.path()).await;
        let mut watch = open_watch(&mut client, SANDBOX).await;
        let token = next_token(&mut watch).await;
        assert_eq!(
            token.token_id,
            flute_token_broker::token::token_id(&format!("skewed-{offset_secs}"))
        );
        assert!(
            serve_for(&token) <= short,
            "offset {offset_secs}: {:?}",
            serve_for(&token)
        );
        // The expiry the agent reports is on its own clock: the serve
        // window plus the margin from now, not the hub's clock ± 5 min.
        let expires = token.expires_at.unwrap().seconds;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (expires - now).abs() <= 10,
            "offset {offset_secs}: expires_at {} s from now",
            expires - now
        );
        // The window ends when the hub said, not five minutes later.
        next_outage(&mut watch).await;
        assert!(
            sent.elapsed() < short + Duration::from_secs(2),
            "offset {offset_secs}: served too long"
        );
        agent.shutdown().await;
    }
}

/// A hub that lies (a token_id that is not the token's, a serve window
/// longer than the lifetime) is not believed.
#[tokio::test]
async fn tokens_from_a_lying_upstream_are_refused_with_the_reason() {
    struct Liar;
    #[tonic::async_trait]
    impl TokenBroker for Liar {
        async fn get_token(&self, _: Request<pb::GetTokenRequest>) -> Result<Response<pb::GetTokenResponse>, Status> {
            Err(Status::unavailable("no"))
        }
        type WatchTokenStream = Updates;
        async fn watch_token(&self, _: Request<pb::WatchTokenRequest>) -> Result<Response<Updates>, Status> {
            use futures_util::StreamExt;
            let mut token = SkewedHub {
                offset_secs: 0,
                serve_for: Duration::from_secs(3600),
                access_token: "lie".into(),
            }
            .token();
            token.token_id = "000000000000".into();
            let first = pb::WatchTokenResponse {
                update: Some(pb::watch_token_response::Update::Token(token)),
            };
            Ok(Response::new(futures_util::stream::iter([Ok(first)]).boxed()))
        }
        async fn refresh_token(
            &self,
            _: Request<pb::RefreshTokenRequest>,
        ) -> Result<Response<pb::RefreshTokenResponse>, Status> {
            Err(Status::unavailable("no"))
        }
        async fn get_status(
            &self,
            _: Request<pb::GetStatusRequest>,
        ) -> Result<Response<pb::GetStatusResponse>, Status> {
            Err(Status::unimplemented("no"))
        }
    }
    let upstream = serve_upstream(Liar).await;
    let dir = tempfile::tempdir().unwrap();
    let (_agent, mut client, _) = start_agent(vec![upstream], dir.path()).await;
    let mut watch = open_watch(&mut client, SANDBOX).await;
    let outage = next_outage(&mut watch).await;
    assert!(
        outage
            .reason
            .contains("sent an invalid token: its token_id does not match"),
        "{}",
        outage.reason
    );
    assert!(!outage.reason.contains("lie\""));
}

/// `serve --dev` on an agent's configuration: every environment calls the
/// built-in emulator, none keeps its `upstream` (an environment never has
/// both origins).
#[tokio::test]
async fn dev_mode_turns_an_agent_configuration_into_direct_sources() {
    use flute_token_broker::config::Origin;
    let mut config = Config::default();
    for env in config.environments.values_mut() {
        env.token_url.clear();
        env.upstream = vec!["https://hub.example:50051".into()];
    }
    let (config, emulator) = daemon::dev_setup(config, Duration::from_secs(900)).await.unwrap();
    for (env, e) in config.enabled() {
        assert_eq!(
            e.origin(),
            Ok(Origin::Endpoint {
                token_url: emulator.token_url()
            }),
            "{env}"
        );
    }
}

/// `GrpcUpstream` on its own: each (re)connection starts one address
/// further, so consecutive follows alternate between two hubs.
#[tokio::test]
async fn each_follow_starts_at_the_next_hub() {
    use flute_token_broker::token::Upstream;
    use flute_token_broker::upstream::{GrpcUpstream, UpstreamSettings};
    let (a, b) = (hub(Duration::from_secs(900)).await, hub(Duration::from_secs(900)).await);
    let upstream = GrpcUpstream::new(
        vec![a.unix.parse().unwrap(), b.unix.parse().unwrap()],
        UpstreamSettings::default(),
        None,
    );
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(
            upstream
                .follow(Environment::Sandbox)
                .await
                .map(|f| f.upstream)
                .unwrap_or_else(|f| panic!("{}", f.message)),
        );
    }
    assert_ne!(seen[0], seen[1], "{seen:?}");
    assert_eq!(seen[0], seen[2], "{seen:?}");
    assert_eq!(seen[1], seen[3], "{seen:?}");
    assert!(seen.contains(&a.unix) && seen.contains(&b.unix), "{seen:?}");
}

/// How a failed follow is classified: permanent only when every hub
/// refused for good (or the address cannot work at all); one hub that may
/// come back, or no hub to ask, is transient.
#[tokio::test]
async fn a_follow_fails_for_good_only_when_every_hub_refuses_for_good() {
    use flute_token_broker::oauth::ErrorClass;
    use flute_token_broker::token::Upstream;
    use flute_token_broker::upstream::{GrpcUpstream, UpstreamSettings};
    // Hubs that serve production only: a sandbox follow is refused
    // (FAILED_PRECONDITION, environment not enabled there).
    let refusing = || start_broker_with(&[Environment::Production], Duration::from_secs(900), |_, _| {});
    let (r1, r2) = (refusing().await, refusing().await);
    let dir = tempfile::tempdir().unwrap();
    let gone = format!("unix:{}", dir.path().join("no-hub.sock").display());
    let class = |addresses: Vec<String>, settings: UpstreamSettings| async move {
        let upstream = GrpcUpstream::new(addresses.iter().map(|a| a.parse().unwrap()).collect(), settings, None);
        match upstream.follow(Environment::Sandbox).await {
            Ok(_) => panic!("{addresses:?}: followed"),
            Err(failure) => (failure.class, failure.message),
        }
    };
    let (both, message) = class(vec![r1.unix.clone(), r2.unix.clone()], UpstreamSettings::default()).await;
    assert_eq!(both, ErrorClass::Permanent, "{message}");
    assert!(message.contains(&r1.unix) && message.contains(&r2.unix), "{message}");
    let (mixed, message) = class(vec![r1.unix.clone(), gone.clone()], UpstreamSettings::default()).await;
    assert_eq!(mixed, ErrorClass::Transient, "{message}");
    let (unreachable, _) = class(vec![gone], UpstreamSettings::default()).await;
    assert_eq!(unreachable, ErrorClass::Transient);
    // A name that resolves to nothing leaves no hub to ask: transient.
    let (unresolved, message) = class(
        vec!["http://no-such-hub.invalid:50051".into()],
        UpstreamSettings::default(),
    )
    .await;
    assert_eq!(unresolved, ErrorClass::Transient, "{message}");
    // TLS files that cannot be read: no retry can help.
    let settings = UpstreamSettings {
        ca_file: Some(dir.path().join("missing-ca.pem")),
        ..Default::default()
    };
    let (usage, message) = class(vec!["https://127.0.0.1:9".into()], settings).await;
    assert_eq!(usage, ErrorClass::Permanent, "{message}");
    assert!(message.contains("missing-ca.pem"), "{message}");
}

/// Within one follow, hubs are tried in the listed order, cyclically from
/// where the rotation starts (what the failure lists, in order).
#[tokio::test]
async fn a_follow_tries_the_hubs_in_the_listed_order() {
    use flute_token_broker::token::Upstream;
    use flute_token_broker::upstream::{GrpcUpstream, UpstreamSettings};
    let dir = tempfile::tempdir().unwrap();
    let listed: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| format!("unix:{}", dir.path().join(format!("{n}.sock")).display()))
        .collect();
    let upstream = GrpcUpstream::new(
        listed.iter().map(|a| a.parse().unwrap()).collect(),
        UpstreamSettings::default(),
        None,
    );
    let mut starts = Vec::new();
    for _ in 0..2 {
        let Err(failure) = upstream.follow(Environment::Sandbox).await else {
            panic!("no hub runs");
        };
        let tried: Vec<usize> = {
            let mut at: Vec<(usize, usize)> = listed
                .iter()
                .enumerate()
                .map(|(i, a)| (failure.message.find(a.as_str()).expect("every hub named"), i))
                .collect();
            at.sort();
            at.into_iter().map(|(_, i)| i).collect()
        };
        let first = tried[0];
        assert_eq!(
            tried,
            (0..4).map(|k| (first + k) % 4).collect::<Vec<_>>(),
            "{}",
            failure.message
        );
        starts.push(first);
    }
    assert_eq!(starts[1], (starts[0] + 1) % 4, "the next follow starts one further");
}

/// An agent's API proxy: requests go out with the hub's token; when the
/// API revokes it, the 401s of 20 concurrent requests become one
/// RefreshToken forwarded to the hub and one token request at Flute, and
/// every caller gets the API's 200.
#[tokio::test]
async fn an_agents_proxy_absorbs_a_revocation_with_one_forwarded_refresh() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hub = hub(Duration::from_secs(900)).await;
    let dir = tempfile::tempdir().unwrap();
    let api_socket = dir.path().join("sandbox-api.sock");
    let flute = hub.emulator(Environment::Sandbox).clone();
    let base_url = hub.emulators[&Environment::Sandbox].base_url();
    let (_agent, mut client, _) = start_agent_with(vec![hub.unix.clone()], dir.path(), |config| {
        config.oauth.allow_insecure_http = true;
        let proxy = &mut config.environments.get_mut(&Environment::Sandbox).unwrap().proxy;
        proxy.listen = vec![ListenAddr::Unix(api_socket.clone())];
        proxy.api_url = base_url;
    })
    .await;
    let first = current_token(&mut client, SANDBOX).await;
    let post = |socket: std::path::PathBuf| async move {
        let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
        stream
            .write_all(
                b"POST /v2/payments HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            )
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    };
    let answer = post(api_socket.clone()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains(&first.token_id),
        "the hub's token reached the API: {answer}"
    );

    let before = flute.stats().token_requests;
    flute.set_faults(flute_token_broker::emulator::FaultRequest {
        revoke_current: true,
        ..Default::default()
    });
    let calls: Vec<_> = (0..20).map(|_| tokio::spawn(post(api_socket.clone()))).collect();
    for call in calls {
        let answer = call.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(!answer.contains(&first.token_id), "{answer}");
    }
    assert_eq!(
        flute.stats().token_requests,
        before + 1,
        "20 rejected requests at the agent → one forwarded refresh → one token request"
    );
}
