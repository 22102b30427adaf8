//! TokenSource invariants under paused time, with an in-process endpoint.
//! The engine's invariants run against both kinds of source: one that calls
//! the endpoint (`Kind::Direct`), and an agent that follows such a source
//! as its upstream broker (`Kind::Agent`): the same assertions, the same
//! endpoint, the hub in between.

mod support;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flute_token_broker::Environment;
use flute_token_broker::credentials::ApiKey;
use flute_token_broker::metrics::Metrics;
use flute_token_broker::oauth::{ErrorClass, OAuthError};
use flute_token_broker::token::{
    self, Failure, Following, Jitter, KeyChange, Received, RefreshError, RefreshPolicy, Snapshot, SourceState,
    TokenSourceConfig, TokenSourceHandle, Update, Upstream,
};
use support::{FakeEndpoint, Reply};
use tokio::time::{Instant, sleep};

const LIFETIME: Duration = Duration::from_secs(900);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn start(endpoint: &FakeEndpoint) -> TokenSourceHandle {
    start_kind(Kind::Direct, endpoint)
}

/// Which kind of source a test runs against.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Calls the endpoint itself.
    Direct,
    /// Follows a direct source (the hub) that calls the endpoint.
    Agent,
}

/// The sandbox settings the tests' sources use (jitter fixed at 0.5).
fn test_config() -> TokenSourceConfig {
    let mut config = TokenSourceConfig::new(Environment::Sandbox);
    config.jitter = Jitter::Fixed(0.5);
    config
}

/// A direct source on `endpoint`: the hub when an agent follows it.
fn spawn_hub(config: &TokenSourceConfig, endpoint: &FakeEndpoint) -> TokenSourceHandle {
    token::spawn(
        config.clone(),
        endpoint.clone(),
        FakeEndpoint::key(),
        Arc::new(Metrics::new()),
    )
    .0
}

/// A token the previous process kept across a restart, issued `age` ago.
fn restored_token(environment: Environment, age: Duration) -> Arc<token::Token> {
    Arc::new(token::Token::new(
        "restored-access-token".to_owned().into(),
        "Bearer".into(),
        environment,
        Instant::now() - age,
        std::time::SystemTime::now() - age,
        LIFETIME,
        RefreshPolicy::default().serve_margin,
    ))
}

fn start_kind(kind: Kind, endpoint: &FakeEndpoint) -> TokenSourceHandle {
    let config = test_config();
    let hub = spawn_hub(&config, endpoint);
    match kind {
        Kind::Direct => hub,
        Kind::Agent => token::follow(config, InProcessHub(hub), Arc::new(Metrics::new())).0,
    }
}

/// An upstream broker in the same process: WatchToken, GetToken and
/// RefreshToken answered from a source's handle as the gRPC service
/// answers them (a Starting state is not sent; no token is an Outage).
struct InProcessHub(TokenSourceHandle);

fn received(t: &token::Token) -> Received {
    Received {
        access_token: t.access_token().to_owned().into(),
        token_type: t.token_type.clone(),
        lifetime: t.lifetime,
        serve_for: t.serve_until.saturating_duration_since(Instant::now()),
    }
}

fn update(snapshot: &Snapshot) -> Update {
    match snapshot.servable(Instant::now()) {
        Some(t) => Update::Token(received(t)),
        None => Update::Outage {
            reason: snapshot
                .last_error
                .as_ref()
                .map(|e| e.message.clone())
                .unwrap_or_default(),
        },
    }
}

fn refused(e: RefreshError) -> Failure {
    Failure::new(ErrorClass::Transient, e.to_string())
}

impl Upstream for InProcessHub {
    async fn follow(&self, _: Environment) -> Result<Following, Failure> {
        use futures_util::StreamExt;
        let first = update(&self.0.started().await);
        let updates = tokio_stream::wrappers::WatchStream::from_changes(self.0.subscribe())
            .map(|snapshot| Ok(update(&snapshot)))
            .boxed();
        Ok(Following {
            first,
            round_trip: Duration::ZERO,
            updates,
            upstream: "in-process hub".into(),
            renew_at: None,
        })
    }

    async fn get(&self, _: Environment, min_remaining: Duration) -> Result<Received, Failure> {
        self.0
            .token_with_remaining(min_remaining)
            .await
            .map(|t| received(&t))
            .map_err(refused)
    }

    async fn replace(&self, _: Environment, rejected_token_id: String) -> Result<Received, Failure> {
        self.0
            .replace_rejected(&rejected_token_id)
            .await
            .map(|t| received(&t))
            .map_err(refused)
    }
}

/// Runs the invariant test `$name(kind)` once per kind of source.
macro_rules! for_both_kinds {
    ($($name:ident),* $(,)?) => {
        mod both_kinds {
            $(
                mod $name {
                    #[tokio::test(start_paused = true)]
                    async fn direct() {
                        super::super::$name(super::super::Kind::Direct).await
                    }
                    #[tokio::test(start_paused = true)]
                    async fn agent() {
                        super::super::$name(super::super::Kind::Agent).await
                    }
                }
            )*
        }
    };
}

for_both_kinds!(
    refreshes_at_three_quarters_of_the_lifetime,
    outage_shorter_than_the_remaining_lifetime_is_invisible,
    outage_longer_than_the_lifetime_withdraws_the_token_then_recovers,
    a_thousand_concurrent_early_refreshes_cause_one_call,
    rejected_tokens_are_replaced_once_and_rate_limited,
    a_rejected_token_re_issued_by_the_endpoint_is_not_its_replacement,
    early_refresh_does_not_bypass_backoff_or_exceed_the_lifetime,
    short_lived_tokens_are_never_served_expired,
);

/// Awaits `f` for at most an hour of virtual time. Time is paused, so an
/// engine that stops answering fails the test at once, naming `what`,
/// instead of hanging it: no token, no timer, nothing to wait for.
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(secs(3600), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within an hour"))
}

/// The source's first published state (a token, or the first failure).
async fn started(h: &TokenSourceHandle) -> Snapshot {
    within("the first state", h.started()).await
}

/// `replace_rejected`, bounded as [`within`].
async fn replacement(h: &TokenSourceHandle, rejected_token_id: &str) -> Result<Arc<token::Token>, RefreshError> {
    within("a replacement", h.replace_rejected(rejected_token_id)).await
}

/// `token_with_remaining`, bounded as [`within`].
async fn token_with_remaining(h: &TokenSourceHandle, remaining: Duration) -> Result<Arc<token::Token>, RefreshError> {
    within("a token", h.token_with_remaining(remaining)).await
}

fn server_error() -> Reply {
    Reply::Fail(OAuthError::Server {
        status: 503,
        code: None,
        description: Some("down".into()),
    })
}

/// Counts published snapshots whose token was not servable at publish time.
fn watch_for_expired_publications(handle: &TokenSourceHandle) -> Arc<AtomicUsize> {
    let violations = Arc::new(AtomicUsize::new(0));
    let mut rx = handle.subscribe();
    let v = violations.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let snapshot = rx.borrow_and_update().clone();
            if snapshot.token.as_ref().is_some_and(|t| !t.is_servable(Instant::now())) {
                v.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    violations
}

async fn refreshes_at_three_quarters_of_the_lifetime(kind: Kind) {
    let ep = FakeEndpoint::new(LIFETIME);
    let h = start_kind(kind, &ep);
    let first = started(&h).await;
    assert_eq!(first.state(), SourceState::Ready);
    let t1 = first.token.unwrap();
    let t0 = ep.calls()[0].at;
    assert_eq!(t1.expires_at, t0 + LIFETIME);

    sleep(secs(674)).await;
    assert_eq!(ep.call_count(), 1);
    assert_eq!(h.current().unwrap().token_id, t1.token_id);
    sleep(secs(2)).await;
    assert_eq!(ep.call_count(), 2);
    assert_eq!(ep.calls()[1].at, t0 + secs(675));
    let t2 = h.current().unwrap();
    assert_ne!(t2.token_id, t1.token_id);
    assert_eq!(h.stats().rotations.load(Ordering::Relaxed), 2);
}

async fn outage_shorter_than_the_remaining_lifetime_is_invisible(kind: Kind) {
    let ep = FakeEndpoint::new(LIFETIME);
    let h = start_kind(kind, &ep);
    let violations = watch_for_expired_publications(&h);
    let t1 = started(&h).await.token.unwrap();
    let t0 = ep.calls()[0].at;
    ep.set_default(Some(server_error()));

    // The endpoint is down from the scheduled refresh (675 s) until 800 s.
    while Instant::now() < t0 + secs(800) {
        sleep(secs(1)).await;
        assert!(
            h.current().is_some(),
            "token withdrawn during a short outage at {:?}",
            Instant::now() - t0
        );
    }
    // The direct source reports its failing retries; an agent's token is
    // as good as the hub's, and the hub's retries are the hub's business.
    let expected = match kind {
        Kind::Direct => SourceState::Degraded,
        Kind::Agent => SourceState::Ready,
    };
    assert_eq!(h.snapshot().state(), expected);
    assert_eq!(h.current().unwrap().token_id, t1.token_id);

    // Calls during the outage follow the backoff schedule, never faster.
    let policy = RefreshPolicy::default();
    let failing: Vec<Instant> = ep.calls().iter().skip(1).map(|c| c.at).collect();
    assert!(failing.len() >= 5, "{} calls", failing.len());
    for (n, pair) in failing.windows(2).enumerate() {
        let min_gap = policy.retry_after_failure(ErrorClass::Transient, n as u32 + 1, 0.5, None);
        assert!(
            pair[1] - pair[0] >= min_gap,
            "retry {n} came after {:?}, schedule says {min_gap:?}",
            pair[1] - pair[0]
        );
    }

    // Recovery: a new token within one backoff step (the cap, 60 s at most).
    let recovered_at = Instant::now();
    ep.set_default(None);
    while h.current().unwrap().token_id == t1.token_id {
        sleep(Duration::from_millis(100)).await;
        assert!(
            Instant::now() - recovered_at <= policy.backoff_max,
            "no recovery within one backoff step"
        );
    }
    assert_eq!(h.snapshot().state(), SourceState::Ready);
    assert_eq!(violations.load(Ordering::SeqCst), 0);
}

async fn outage_longer_than_the_lifetime_withdraws_the_token_then_recovers(kind: Kind) {
    let ep = FakeEndpoint::new(LIFETIME);
    let h = start_kind(kind, &ep);
    let violations = watch_for_expired_publications(&h);
    started(&h).await;
    let t0 = ep.calls()[0].at;
    ep.set_default(Some(server_error()));

    sleep(t0 + secs(894) - Instant::now()).await;
    assert!(h.current().is_some());
    sleep(secs(2)).await;
    assert!(
        h.current().is_none(),
        "a token inside the serve margin must not be handed out"
    );
    let snapshot = h.snapshot();
    assert_eq!(snapshot.state(), SourceState::Unavailable);
    assert!(snapshot.last_error.as_ref().unwrap().message.contains("503"));
    match kind {
        Kind::Direct => assert!(snapshot.next_attempt.unwrap() > Instant::now()),
        // The agent calls nobody: the hub's stream brings the recovery.
        Kind::Agent => assert_eq!(snapshot.next_attempt, None),
    }

    sleep(secs(300)).await;
    assert!(h.current().is_none());
    ep.set_default(None);
    sleep(secs(61)).await;
    assert_eq!(h.snapshot().state(), SourceState::Ready);
    assert_eq!(
        violations.load(Ordering::SeqCst),
        0,
        "an expired token was published as valid"
    );
}

async fn a_thousand_concurrent_early_refreshes_cause_one_call(kind: Kind) {
    let ep = FakeEndpoint::new(LIFETIME);
    let h = start_kind(kind, &ep);
    let t1 = started(&h).await.token.unwrap();
    sleep(secs(300)).await; // 600 s left; callers want 700 s
    ep.set_delay(Duration::from_millis(200));
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { h.token_with_remaining(secs(700)).await })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let token = within("an early refresh", t).await.unwrap().expect("early refresh");
        assert!(token.remaining(Instant::now()) >= secs(700));
        ids.insert(token.token_id.clone());
    }
    assert_eq!(ep.call_count(), 2, "1 start-up call + 1 coalesced early refresh");
    assert_eq!(ids.len(), 1);
    assert!(!ids.contains(&t1.token_id));
}

async fn rejected_tokens_are_replaced_once_and_rate_limited(kind: Kind) {
    let ep = FakeEndpoint::new(LIFETIME);
    let h = start_kind(kind, &ep);
    let t1 = started(&h).await.token.unwrap();
    sleep(secs(10)).await;

    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (h, id) = (h.clone(), t1.token_id.clone());
            tokio::spawn(async move { h.replace_rejected(&id).await })
        })
        .collect();
    for t in tasks {
        assert_ne!(within("a replacement", t).await.unwrap().unwrap().token_id, t1.token_id);
    }
    assert_eq!(ep.call_count(), 2, "100 reports of one rejected token → one call");

    // A stale rejection gets the current token without a call.
    let t2 = replacement(&h, &t1.token_id).await.unwrap();
    assert_eq!(ep.call_count(), 2);

    // A second forced refresh waits for the rate limit (5 s by default).
    let before = Instant::now();
    let t3 = replacement(&h, &t2.token_id).await.unwrap();
    assert_ne!(t3.token_id, t2.token_id);
    assert_eq!(ep.call_count(), 3);
    let calls = ep.calls();
    assert!(
        calls[2].at - calls[1].at >= secs(5),
        "forced refreshes {:?} apart",
        calls[2].at - calls[1].at
    );
    assert!(Instant::now() - before <= secs(5));
}

/// Found by the long-run simulation: an endpoint that answers a forced
/// refresh with the very token the API rejected must not have that token
/// handed back as its replacement.
async fn a_rejected_token_re_issued_by_the_endpoint_is_not_its_replacement(kind: Kind) {
    let ep = FakeEndpoint::new(LIFETIME);
    let h = start_kind(kind, &ep);
    let t1 = started(&h).await.token.unwrap();
    ep.push(Reply::Same);
    let outcome = replacement(&h, &t1.token_id).await;
    // An agent passes on the hub's answer (over gRPC both are NO_VALID_TOKEN).
    assert!(
        match (kind, &outcome) {
            (_, Err(RefreshError::RejectedTokenReissued { .. })) => true,
            (Kind::Agent, Err(RefreshError::Unavailable { reason, .. })) => reason.contains("rejected token again"),
            _ => false,
        },
        "{outcome:?}"
    );
    assert_eq!(ep.call_count(), 2, "one forced refresh was made");
    // Readers still get the token (only the caller knows the API refused it).
    assert_eq!(h.current().unwrap().token_id, t1.token_id);
    // The next forced refresh, after the rate limit, brings a new one.
    let t2 = replacement(&h, &t1.token_id).await.unwrap();
    assert_ne!(t2.token_id, t1.token_id);
}

async fn early_refresh_does_not_bypass_backoff_or_exceed_the_lifetime(kind: Kind) {
    let ep = FakeEndpoint::new(LIFETIME);
    let h = start_kind(kind, &ep);
    let t1 = started(&h).await.token.unwrap();

    // More remaining lifetime than a fresh token has: refused without a call.
    sleep(secs(10)).await;
    let err = token_with_remaining(&h, secs(896)).await.unwrap_err();
    assert!(matches!(err, RefreshError::OutOfRange { .. }), "{err:?}");
    assert_eq!(ep.call_count(), 1);

    // While the endpoint is failing, a forced refresh is answered at once.
    ep.set_default(Some(server_error()));
    sleep(secs(670)).await;
    let calls = ep.call_count();
    let err = replacement(&h, &t1.token_id).await.unwrap_err();
    assert!(
        matches!(&err, RefreshError::Unavailable { reason, .. } if reason.contains("503")),
        "{err:?}"
    );
    assert_eq!(ep.call_count(), calls);
}

#[tokio::test(start_paused = true)]
async fn refresh_tokens_are_used_rotated_and_dropped_on_invalid_grant() {
    let ep = FakeEndpoint::new(LIFETIME).with_refresh_tokens();
    let h = start(&ep);
    started(&h).await;
    sleep(secs(676)).await;
    ep.push(Reply::Fail(OAuthError::OAuth {
        status: 400,
        code: "invalid_grant",
        description: None,
    }));
    sleep(secs(675)).await;
    let calls = ep.calls();
    let grants: Vec<_> = calls.iter().map(|c| c.grant).collect();
    assert_eq!(
        grants,
        [
            "client_credentials",
            "refresh_token",
            "refresh_token",
            "client_credentials"
        ]
    );
    assert_eq!(calls[1].refresh_token.as_deref(), Some("refresh-token-1"));
    assert_eq!(
        calls[2].refresh_token.as_deref(),
        Some("refresh-token-2"),
        "the rotated refresh token is used"
    );
    assert_eq!(
        calls[3].at, calls[2].at,
        "fallback to client credentials happens at once"
    );
    assert_eq!(h.snapshot().state(), SourceState::Ready);
}

#[tokio::test(start_paused = true)]
async fn reissued_identical_token_is_not_a_rotation() {
    let ep = FakeEndpoint::new(LIFETIME);
    let h = start(&ep);
    let mut rx = h.subscribe();
    let t1 = started(&h).await.token.unwrap();
    rx.borrow_and_update();
    ep.push(Reply::Same);
    sleep(secs(676)).await;
    let t2 = h.current().unwrap();
    assert_eq!(t2.token_id, t1.token_id);
    assert_eq!(t2.expires_at, ep.calls()[1].at + LIFETIME, "expiry is extended");
    assert_eq!(h.stats().rotations.load(Ordering::Relaxed), 1);
    assert_eq!(h.stats().refreshes_ok.load(Ordering::Relaxed), 2);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured() {
    let ep = FakeEndpoint::new(LIFETIME);
    let h = start(&ep);
    started(&h).await;
    ep.push(Reply::Fail(OAuthError::RateLimited {
        retry_after: Some(secs(30)),
    }));
    sleep(secs(706)).await;
    let calls = ep.calls();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[2].at - calls[1].at, secs(30));
}

#[tokio::test(start_paused = true)]
async fn permanent_failure_retries_slowly_and_a_new_key_is_tried_at_once() {
    let ep = FakeEndpoint::new(LIFETIME);
    let h = start(&ep);
    started(&h).await;
    ep.set_accepted_secret("rotated-secret");
    sleep(secs(675 + 125)).await;
    let calls = ep.calls();
    assert_eq!(calls.len(), 4, "refresh at 675 s, then every 60 s");
    assert_eq!(calls[2].at - calls[1].at, secs(60));
    let failure = h.snapshot().last_error.unwrap();
    assert_eq!(failure.class, ErrorClass::Permanent);
    assert!(failure.message.contains("invalid_client"));

    // A wrong new key is tried, refused, and the old key and token stay.
    let t_before = h.current().unwrap();
    let err = h
        .replace_key(ApiKey::new("client", "also-wrong").unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid_client"));
    assert_eq!(h.current().unwrap().token_id, t_before.token_id);

    let accepted = h
        .replace_key(ApiKey::new("client", "rotated-secret").unwrap())
        .await
        .unwrap();
    assert_eq!(accepted, KeyChange::Adopted);
    assert_eq!(
        ep.calls().last().unwrap().at,
        Instant::now(),
        "the new key is tried at once"
    );
    assert_eq!(h.snapshot().state(), SourceState::Ready);
    assert_ne!(h.current().unwrap().token_id, t_before.token_id);
    assert_eq!(
        h.replace_key(ApiKey::new("client", "rotated-secret").unwrap())
            .await
            .unwrap(),
        KeyChange::Unchanged,
        "same key again is a no-op"
    );

    sleep(secs(700)).await;
    assert_eq!(ep.calls().last().unwrap().client_secret, "rotated-secret");
}

async fn short_lived_tokens_are_never_served_expired(kind: Kind) {
    let ep = FakeEndpoint::new(secs(2));
    let h = start_kind(kind, &ep);
    let violations = watch_for_expired_publications(&h);
    started(&h).await;
    for _ in 0..200 {
        sleep(Duration::from_millis(97)).await;
        if let Some(t) = h.current() {
            assert!(t.is_servable(Instant::now()));
        }
    }
    assert!(
        ep.call_count() >= 19,
        "about one refresh per second: {}",
        ep.call_count()
    );
    assert_eq!(violations.load(Ordering::SeqCst), 0);
}

/// A refresh that hangs past the token's serve deadline: what readers see
/// must still follow the token, not the call. The Outage on WatchToken,
/// health NOT_SERVING and GetStatus UNAVAILABLE all appear at the serve
/// deadline, while the call is still in flight.
#[tokio::test(start_paused = true)]
async fn a_hanging_refresh_does_not_hold_back_published_state() {
    use flute_token_broker::broker::Core;
    use flute_token_broker::grpc::{TokenBrokerService, health};
    use flute_token_broker::token::TokenSources;
    use flute_token_broker::wire::pb;
    use flute_token_broker::wire::pb::token_broker_server::TokenBroker;
    use tokio_stream::StreamExt;
    use tonic_health::pb::health_server::Health;

    let ep = FakeEndpoint::new(LIFETIME);
    let metrics = Arc::new(Metrics::new());
    let mut config = TokenSourceConfig::new(Environment::Sandbox);
    config.jitter = Jitter::Fixed(0.5);
    let (handle, _task) = token::spawn(config, ep.clone(), FakeEndpoint::key(), metrics.clone());
    let serve_until = started(&handle).await.token.expect("a first token").serve_until;
    // Every later call hangs well past the token's expiry.
    ep.set_delay(secs(300));

    let sources = Arc::new(TokenSources::new([handle.clone()]));
    let (reporter, _) = tonic_health::server::health_reporter();
    let not_draining = tokio_util::sync::CancellationToken::new();
    tokio::spawn(health::report(reporter.clone(), sources.clone(), not_draining.clone()));
    let health = tonic_health::server::HealthService::from_health_reporter(reporter);
    let service = TokenBrokerService::new(Core::new(
        sources,
        not_draining,
        Default::default(),
        metrics,
        secs(30),
        Default::default(),
    ));
    let sandbox = pb::Environment::Sandbox as i32;

    let mut updates = service
        .watch_token(tonic::Request::new(pb::WatchTokenRequest { environment: sandbox }))
        .await
        .unwrap()
        .into_inner();
    let mut health_updates = health
        .watch(tonic::Request::new(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    let serving = |r: tonic_health::pb::HealthCheckResponse| r.status;
    assert_eq!(
        serving(within("health", health_updates.next()).await.unwrap().unwrap()),
        1,
        "SERVING"
    );
    let first = within("the first token", updates.next()).await.unwrap().unwrap().update;
    assert!(
        matches!(first, Some(pb::watch_token_response::Update::Token(_))),
        "{first:?}"
    );

    let outage = within("the outage", updates.next()).await.unwrap().unwrap().update;
    let outage_at = Instant::now();
    assert!(
        matches!(outage, Some(pb::watch_token_response::Update::Outage(_))),
        "{outage:?}"
    );
    assert!(
        outage_at >= serve_until && outage_at - serve_until < Duration::from_millis(100),
        "the outage came {:?} after the serve deadline",
        outage_at - serve_until
    );
    assert_eq!(ep.call_count(), 2, "the refresh is in flight");
    assert_eq!(handle.stats().refreshes_ok.load(Ordering::Relaxed), 1, "and unanswered");

    assert_eq!(
        serving(within("health", health_updates.next()).await.unwrap().unwrap()),
        2,
        "NOT_SERVING"
    );
    assert!(Instant::now() - serve_until < Duration::from_millis(100));
    let status = service
        .get_status(tonic::Request::new(pb::GetStatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.environments[0].state, pb::State::Unavailable as i32);
    assert_eq!(handle.snapshot().state(), SourceState::Unavailable);
}

/// A source task that dies (a panic: a bug) must not leave the broker
/// looking healthy with a token nobody refreshes: the outage is published
/// with the reason, logged at ERROR, and liveness fails (the watchdog and
/// /healthz read `all_running`) so the platform restarts the broker.
#[tokio::test(start_paused = true)]
async fn a_source_task_that_dies_says_so_everywhere() {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    let logs = support::LogCapture::default();
    let _guard = logs.install();
    let ep = FakeEndpoint::new(LIFETIME);
    let h = start(&ep);
    let sources = Arc::new(flute_token_broker::token::TokenSources::new([h.clone()]));
    let router = flute_token_broker::admin::router(sources.clone(), Arc::new(Metrics::new()));
    let status_of = |path: &'static str| {
        let router = router.clone();
        async move {
            router
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap()
                .status()
        }
    };
    let first = started(&h).await.token.expect("a token");
    assert!(h.is_running() && sources.all_running());
    // What systemd's STATUS= and the logs show.
    assert_eq!(
        sources.summary(),
        format!("sandbox: Ready, token {} (900s left)", first.token_id)
    );
    assert_eq!(status_of("/healthz").await, StatusCode::OK);
    assert_eq!(status_of("/readyz").await, StatusCode::OK);

    // The scheduled refresh panics the task, long before the token expires.
    ep.push(Reply::Panic);
    let mut rx = h.subscribe();
    let snapshot = within("the withdrawal", rx.wait_for(|s| s.token.is_none()))
        .await
        .unwrap()
        .clone();
    assert!(
        first.is_servable(Instant::now()),
        "withdrawn because the task died, not by expiry"
    );
    assert_eq!(snapshot.state(), SourceState::Unavailable);
    let reason = &snapshot.last_error.as_ref().unwrap().message;
    assert!(
        reason.contains("token source stopped") && reason.contains("restarted"),
        "{reason}"
    );
    assert!(!h.is_running() && !sources.all_running());
    assert_eq!(sources.summary(), "sandbox: Unavailable");
    assert!(
        h.current().is_none(),
        "no token from a source that can no longer refresh it"
    );
    assert!(matches!(
        token_with_remaining(&h, secs(1)).await,
        Err(RefreshError::Stopped)
    ));
    assert_eq!(status_of("/healthz").await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(status_of("/readyz").await, StatusCode::SERVICE_UNAVAILABLE);
    let text = logs.text();
    assert!(
        text.lines()
            .any(|l| l.contains("ERROR") && l.contains("token source task stopped")),
        "{text}"
    );
}

/// Callers that arrive while a refresh is in flight, wanting what that
/// refresh brings, are answered by it: no second endpoint call.
#[tokio::test(start_paused = true)]
async fn callers_queued_during_a_refresh_are_answered_by_it() {
    let ep = FakeEndpoint::new(LIFETIME);
    let h = start(&ep);
    let t1 = started(&h).await.token.unwrap();
    sleep(secs(300)).await; // 600 s left
    ep.set_delay(secs(2));
    let early = {
        let h = h.clone();
        tokio::spawn(async move { h.token_with_remaining(secs(700)).await })
    };
    sleep(secs(1)).await;
    assert_eq!(ep.call_count(), 2, "the early refresh is in flight");
    let (more, replacing) = {
        let (h1, h2, id) = (h.clone(), h.clone(), t1.token_id.clone());
        (
            tokio::spawn(async move { h1.token_with_remaining(secs(650)).await }),
            tokio::spawn(async move { h2.replace_rejected(&id).await }),
        )
    };
    let t2 = within("the early refresh", early)
        .await
        .unwrap()
        .expect("the early refresh");
    assert_ne!(t2.token_id, t1.token_id);
    for queued in [more, replacing] {
        assert_eq!(
            within("a queued caller", queued)
                .await
                .unwrap()
                .expect("answered by the same refresh")
                .token_id,
            t2.token_id
        );
    }
    // Past the early-refresh interval: still no second call was needed.
    sleep(secs(30)).await;
    assert_eq!(ep.call_count(), 2);
}

/// A permanent failure (the key is refused) is an ERROR: someone must act.
/// A transient one (the endpoint is down) is a WARN: retries handle it.
#[tokio::test(start_paused = true)]
async fn permanent_failures_log_errors_and_transient_ones_warnings() {
    let logs = support::LogCapture::default();
    let _guard = logs.install();
    let ep = FakeEndpoint::new(LIFETIME);
    ep.push(server_error());
    let h = start(&ep);
    started(&h).await;
    let line = |text: &str, needle: &str| text.lines().find(|l| l.contains(needle)).map(str::to_owned);
    let transient = line(&logs.text(), "token request failed").expect("the failure is logged");
    assert!(
        transient.contains("WARN") && transient.contains("server_error"),
        "{transient}"
    );
    assert!(!logs.text().contains("ERROR"), "{}", logs.text());

    ep.set_accepted_secret("rotated-secret");
    sleep(LIFETIME).await;
    let text = logs.text();
    let permanent = text
        .lines()
        .find(|l| l.contains("token request failed") && l.contains("invalid_client"))
        .expect("the refusal is logged");
    assert!(permanent.contains("ERROR"), "{permanent}");
}

/// Some servers answer `invalid_grant` to a client-credentials request (a
/// disabled client). There is no refresh token to drop and no grant to fall
/// back to: it is a permanent failure, retried every backoff_max (60 s),
/// never at once.
#[tokio::test(start_paused = true)]
async fn invalid_grant_to_client_credentials_is_a_permanent_failure() {
    let ep = FakeEndpoint::new(LIFETIME);
    ep.set_default(Some(Reply::Fail(OAuthError::OAuth {
        status: 400,
        code: "invalid_grant",
        description: None,
    })));
    let h = start(&ep);
    let failure = started(&h).await.last_error.expect("the first call failed");
    assert_eq!(failure.class, ErrorClass::Permanent);
    sleep(secs(125)).await;
    let calls = ep.calls();
    let times: Vec<_> = calls.iter().map(|c| c.at - calls[0].at).collect();
    assert_eq!(times, [secs(0), secs(60), secs(120)]);
    assert!(calls.iter().all(|c| c.grant == "client_credentials"));
}

/// The longest `min_remaining` a fresh token can meet is its lifetime less
/// the serve margin (900 s − 5 s): exactly that is refreshed for, one
/// second more is out of range at once.
#[tokio::test(start_paused = true)]
async fn min_remaining_up_to_lifetime_less_the_serve_margin_is_attainable() {
    let ep = FakeEndpoint::new(LIFETIME);
    let h = start(&ep);
    started(&h).await;
    sleep(secs(10)).await;
    let token = token_with_remaining(&h, secs(895)).await.expect("895 s is attainable");
    assert!(token.remaining(Instant::now()) >= secs(895));
    assert_eq!(ep.call_count(), 2);
    sleep(secs(10)).await;
    let refused = token_with_remaining(&h, secs(896)).await;
    assert!(matches!(refused, Err(RefreshError::OutOfRange { .. })), "{refused:?}");
    assert_eq!(ep.call_count(), 2, "no call for what no token can meet");
}

/// A token carried over from the previous process (systemd's file
/// descriptor store) is served at once with no endpoint call, refreshed on
/// its own schedule, served through an outage until its serve window ends
/// and then withdrawn, as any token.
#[tokio::test(start_paused = true)]
async fn a_restored_token_is_served_at_once_and_refreshed_on_its_schedule() {
    let ep = FakeEndpoint::new(LIFETIME);
    ep.set_default(Some(server_error()));
    let policy = RefreshPolicy::default();
    // Issued 600 s ago by the previous process: 300 s left, refresh due at 675 s.
    let restored = restored_token(Environment::Sandbox, secs(600));
    let issued_at = restored.issued_at;
    let mut config = test_config();
    config.restored = Some(restored.clone());
    let (h, _task) = token::spawn(config, ep.clone(), FakeEndpoint::key(), Arc::new(Metrics::new()));
    let violations = watch_for_expired_publications(&h);

    let first = started(&h).await;
    assert_eq!(first.token.unwrap().token_id, restored.token_id, "served at once");
    assert_eq!(h.current().unwrap().token_id, restored.token_id);
    assert!(ep.calls().is_empty(), "no call before the refresh is due");

    // The refresh is due at 675 s of the token's life; the endpoint is down.
    let due = issued_at + policy.refresh_after(LIFETIME, 0.5);
    within("the scheduled refresh", async {
        while ep.calls().is_empty() {
            sleep(secs(1)).await;
        }
    })
    .await;
    assert!(ep.calls()[0].at >= due, "not before its schedule");
    // Served through the outage until its window ends, then withdrawn.
    while Instant::now() + secs(1) < restored.serve_until {
        assert_eq!(h.current().unwrap().token_id, restored.token_id);
        sleep(secs(1)).await;
    }
    sleep(secs(2)).await;
    assert!(h.current().is_none(), "withdrawn at the end of its serve window");
    assert_eq!(violations.load(Ordering::SeqCst), 0);

    // A restored token of another environment or already past its window is ignored.
    let mut config = TokenSourceConfig::new(Environment::Production);
    config.restored = Some(restored.clone());
    let ep = FakeEndpoint::new(LIFETIME);
    let (h, _task) = token::spawn(config, ep.clone(), FakeEndpoint::key(), Arc::new(Metrics::new()));
    let fresh = started(&h).await.token.unwrap();
    assert_ne!(fresh.token_id, restored.token_id);
    assert_eq!(ep.calls().len(), 1);
}

/// An agent holds no key: an offered key is refused at once, with no call
/// to the hub or the endpoint, and its token stands.
#[tokio::test(start_paused = true)]
async fn an_agent_refuses_an_offered_key_without_a_call() {
    let ep = FakeEndpoint::new(LIFETIME);
    let agent = start_kind(Kind::Agent, &ep);
    agent.started().await;
    let held = agent.current().unwrap();
    let calls = ep.calls().len();
    let err = agent.replace_key(FakeEndpoint::key()).await.unwrap_err();
    assert!(err.to_string().contains("uses no API key"), "{err}");
    assert_eq!(ep.calls().len(), calls);
    assert_eq!(
        agent.stats().endpoint_calls.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(agent.current().unwrap().token_id, held.token_id);
}

/// An in-process hub that records the `min_remaining` an agent forwards.
struct RecordingHub(InProcessHub, Arc<std::sync::Mutex<Vec<Duration>>>);

impl Upstream for RecordingHub {
    async fn follow(&self, env: Environment) -> Result<Following, Failure> {
        self.0.follow(env).await
    }
    async fn get(&self, env: Environment, min_remaining: Duration) -> Result<Received, Failure> {
        self.1.lock().unwrap().push(min_remaining);
        self.0.get(env, min_remaining).await
    }
    async fn replace(&self, env: Environment, rejected_token_id: String) -> Result<Received, Failure> {
        self.0.replace(env, rejected_token_id).await
    }
}

/// An agent forwards a caller's `min_remaining` with one second of slack
/// (the answer must still meet the need when it arrives), never past what
/// a token of the hub's lifetime can give.
#[tokio::test(start_paused = true)]
async fn an_agent_forwards_min_remaining_with_a_second_of_slack_within_the_lifetime() {
    let ep = FakeEndpoint::new(LIFETIME);
    let config = test_config();
    let hub = spawn_hub(&config, &ep);
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (agent, _task) = token::follow(
        config,
        RecordingHub(InProcessHub(hub), asked.clone()),
        Arc::new(Metrics::new()),
    );
    agent.started().await;
    tokio::time::advance(secs(600)).await;
    let token = agent.token_with_remaining(secs(500)).await.unwrap();
    assert!(token.remaining(Instant::now()) >= secs(500));
    assert_eq!(asked.lock().unwrap().as_slice(), [secs(501)]);
    // At the lifetime's edge the ask is the most a token can give (900 s
    // less the 5 s serve margin), not one second more.
    tokio::time::advance(secs(600)).await;
    agent.token_with_remaining(secs(895)).await.unwrap();
    assert_eq!(asked.lock().unwrap().last(), Some(&secs(895)));
}

/// `holding_token` (what a broker waits on before it takes a socket path
/// over from its predecessor) resolves only once a servable token is held:
/// not while the endpoint fails, at once after it answers.
#[tokio::test(start_paused = true)]
async fn holding_token_waits_for_a_servable_token() {
    let ep = FakeEndpoint::new(LIFETIME);
    ep.push(server_error());
    ep.push(server_error());
    let h = start(&ep);
    let mut holding = Box::pin(h.holding_token());
    assert!(
        tokio::time::timeout(Duration::from_millis(10), &mut holding)
            .await
            .is_err(),
        "no token yet: still waiting"
    );
    assert!(h.current().is_none());
    within("a token after the retries", &mut holding).await;
    assert!(h.current().is_some());
    assert_eq!(ep.calls().len(), 3);
}

/// A restored token is taken only when it is of this environment and
/// still servable: one of another environment, or past its window, is
/// ignored (each condition alone).
#[tokio::test(start_paused = true)]
async fn a_restored_token_must_be_this_environments_and_servable() {
    for (restored, why) in [
        (
            restored_token(Environment::Production, secs(100)),
            "another environment's",
        ),
        (restored_token(Environment::Sandbox, secs(899)), "past its serve window"),
    ] {
        let mut config = TokenSourceConfig::new(Environment::Sandbox);
        config.restored = Some(restored.clone());
        let ep = FakeEndpoint::new(LIFETIME);
        let (h, _task) = token::spawn(config, ep.clone(), FakeEndpoint::key(), Arc::new(Metrics::new()));
        let fresh = started(&h).await.token.unwrap();
        assert_ne!(fresh.token_id, restored.token_id, "{why}");
        assert_eq!(ep.calls().len(), 1, "{why}");
    }
}

/// An agent restored with a token still opens its upstream at once (it
/// schedules no refresh of its own): it serves the restored token, then
/// the hub's as soon as the stream is open.
#[tokio::test(start_paused = true)]
async fn a_restored_agent_follows_its_hub_at_once() {
    let ep = FakeEndpoint::new(LIFETIME);
    let mut config = test_config();
    let hub = spawn_hub(&config, &ep);
    let at_hub = started(&hub).await.token.unwrap();
    config.restored = Some(restored_token(Environment::Sandbox, Duration::ZERO));
    let (agent, _task) = token::follow(config, InProcessHub(hub), Arc::new(Metrics::new()));
    let mut snapshots = agent.subscribe();
    within(
        "the hub's token at the agent",
        snapshots.wait_for(|s| s.token.as_ref().is_some_and(|t| t.token_id == at_hub.token_id)),
    )
    .await
    .unwrap();
    assert!(
        Instant::now() < at_hub.issued_at + secs(60),
        "not at a refresh schedule"
    );
}
