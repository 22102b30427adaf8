//! A day in the life of the broker, under paused time: one TokenSource per
//! environment against a simulated token endpoint that follows a seeded
//! random fault schedule (5xx, 429 with and without Retry-After, hangs past
//! the request timeout, malformed and same-token answers, invalid_grant on
//! refresh, invalid_client stretches, outages longer than a token lifetime),
//! with random callers (GetToken, min_remaining, RefreshToken, watchers)
//! going through the real gRPC service. Invariants are checked at every step:
//!
//! 1. no token is handed out past its serve deadline (as the endpoint issued
//!    it), nor with less than the `min_remaining` asked for;
//! 2. no UNAVAILABLE while a servable token exists;
//! 3. endpoint calls never come faster than the backoff schedule;
//! 4. every watcher sees every rotation, in order.
//!
//! Used by `tests/long_run.rs` (a few seeds) and `benches/long_run.rs` (many).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flute_token_broker::Environment;
use flute_token_broker::broker::Core;
use flute_token_broker::credentials::ApiKey;
use flute_token_broker::grpc::TokenBrokerService;
use flute_token_broker::metrics::Metrics;
use flute_token_broker::oauth::{ErrorClass, Grant, OAuthError, TokenEndpoint, TokenResponse};
use flute_token_broker::token::{self, Jitter, RefreshPolicy, TokenSourceConfig, TokenSources};
use flute_token_broker::wire::pb;
use flute_token_broker::wire::pb::token_broker_server::TokenBroker;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;
use tokio_stream::StreamExt;

/// The reqwest client's default request timeout, which a hang runs into.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Instants closer than this are treated as simultaneous.
const TOLERANCE: Duration = Duration::from_millis(1);

/// What the endpoint does to a request during a fault window.
#[derive(Clone, Copy, Debug)]
enum Fault {
    ServerError,
    RateLimited(Option<u64>),
    Hang,
    Malformed,
    SameToken,
    InvalidGrantOnRefresh,
    InvalidClient,
    Refused,
}

#[derive(Clone, Debug)]
struct Window {
    from: Duration,
    to: Duration,
    fault: Fault,
    /// The share of requests in the window that suffer the fault.
    probability: f64,
}

/// One token-endpoint call as the endpoint saw it.
#[derive(Clone, Debug)]
struct CallRecord {
    arrived: Instant,
    answered: Instant,
    refresh_grant: bool,
    outcome: Result<(String, Duration), (ErrorClass, Option<Duration>)>,
}

struct EndpointState {
    rng: StdRng,
    start: Instant,
    windows: Vec<Window>,
    lifetime: Duration,
    issued: u64,
    last_token: Option<String>,
    refresh_token: Option<String>,
    calls: Vec<CallRecord>,
}

#[derive(Clone)]
struct SimEndpoint(Arc<Mutex<EndpointState>>);

impl SimEndpoint {
    fn fault_now(&self, s: &mut EndpointState, now: Instant) -> Option<Fault> {
        let at = now - s.start;
        let window = s.windows.iter().find(|w| w.from <= at && at < w.to)?.clone();
        s.rng.random_bool(window.probability).then_some(window.fault)
    }
}

impl TokenEndpoint for SimEndpoint {
    async fn request_token(&self, _key: &ApiKey, grant: &Grant) -> Result<TokenResponse, OAuthError> {
        let arrived = Instant::now();
        let refresh_grant = matches!(grant, Grant::RefreshToken(_));
        let (fault, delay) = {
            let mut s = self.0.lock().unwrap();
            let fault = self.fault_now(&mut s, arrived);
            let delay = match fault {
                Some(Fault::Hang) => REQUEST_TIMEOUT,
                // Some answers take a while even when healthy.
                _ if s.rng.random_bool(0.1) => Duration::from_millis(s.rng.random_range(10..8_000)),
                _ => Duration::ZERO,
            };
            (fault, delay)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut s = self.0.lock().unwrap();
        let presented = match grant {
            Grant::RefreshToken(r) => Some(r.expose_secret().to_owned()),
            Grant::ClientCredentials => None,
        };
        let error = match (fault, &presented) {
            (Some(Fault::ServerError), _) => Some(OAuthError::Server {
                status: 503,
                code: None,
                description: None,
            }),
            (Some(Fault::RateLimited(secs)), _) => Some(OAuthError::RateLimited {
                retry_after: secs.map(Duration::from_secs),
            }),
            (Some(Fault::Hang), _) => Some(OAuthError::Timeout(REQUEST_TIMEOUT)),
            (Some(Fault::Malformed), _) => Some(OAuthError::Malformed {
                status: 200,
                reason: "body is not valid JSON".into(),
            }),
            (Some(Fault::InvalidClient), _) => Some(OAuthError::OAuth {
                status: 401,
                code: "invalid_client",
                description: None,
            }),
            (Some(Fault::Refused), _) => Some(OAuthError::Transport("connection refused".into())),
            (Some(Fault::InvalidGrantOnRefresh), Some(_)) => Some(OAuthError::OAuth {
                status: 400,
                code: "invalid_grant",
                description: None,
            }),
            // A refresh token other than the one last issued.
            (_, Some(r)) if s.refresh_token.as_deref() != Some(r.as_str()) => Some(OAuthError::OAuth {
                status: 400,
                code: "invalid_grant",
                description: None,
            }),
            _ => None,
        };
        let answered = Instant::now();
        if let Some(error) = error {
            s.calls.push(CallRecord {
                arrived,
                answered,
                refresh_grant,
                outcome: Err((error.class(), error.retry_after())),
            });
            return Err(error);
        }
        let access = match (fault, &s.last_token) {
            (Some(Fault::SameToken), Some(last)) => last.clone(),
            _ => {
                s.issued += 1;
                format!("sim-access-{}", s.issued)
            }
        };
        let refresh = format!("sim-refresh-{}", s.issued);
        s.last_token = Some(access.clone());
        s.refresh_token = Some(refresh.clone());
        let lifetime = s.lifetime;
        s.calls.push(CallRecord {
            arrived,
            answered,
            refresh_grant,
            outcome: Ok((token::token_id(&access), lifetime)),
        });
        Ok(TokenResponse {
            access_token: SecretString::from(access),
            token_type: "Bearer".into(),
            lifetime,
            lifetime_from_server: true,
            refresh_token: Some(SecretString::from(refresh)),
            scope: None,
        })
    }
}

/// A random fault schedule over `span`: healthy stretches between fault
/// windows, some of them longer than a token lifetime.
fn schedule(rng: &mut StdRng, span: Duration, lifetime: Duration) -> Vec<Window> {
    let mut windows = Vec::new();
    let mut at = Duration::from_secs(rng.random_range(60..1800));
    while at < span {
        let fault = match rng.random_range(0..8) {
            0 => Fault::ServerError,
            1 => Fault::RateLimited(rng.random_bool(0.5).then(|| rng.random_range(1..120))),
            2 => Fault::Hang,
            3 => Fault::Malformed,
            4 => Fault::SameToken,
            5 => Fault::InvalidGrantOnRefresh,
            6 => Fault::InvalidClient,
            _ => Fault::Refused,
        };
        let length = if rng.random_bool(0.25) {
            // An outage longer than a token lifetime.
            lifetime + Duration::from_secs(rng.random_range(1..=lifetime.as_secs().max(2)))
        } else {
            Duration::from_secs(rng.random_range(10..600))
        };
        windows.push(Window {
            from: at,
            to: at + length,
            fault,
            probability: rng.random_range(0.3..=1.0),
        });
        at += length + Duration::from_secs(rng.random_range(300..7200));
    }
    windows
}

/// What a finished simulation did.
#[derive(Debug, Default)]
pub struct Summary {
    pub endpoint_calls: usize,
    pub rotations: usize,
    pub caller_requests: usize,
    pub unavailable_answers: usize,
    pub watchers: usize,
    pub fault_windows: usize,
}

/// A token the endpoint issued.
struct Issued {
    token_id: String,
    /// When the request arrived: the broker's lifetime starts no later.
    arrived: Instant,
    /// When the broker had it.
    answered: Instant,
    lifetime: Duration,
}

/// The tokens the endpoint issued, in order.
fn issuances(calls: &[CallRecord]) -> Vec<Issued> {
    calls
        .iter()
        .filter_map(|c| {
            c.outcome.as_ref().ok().map(|(id, lifetime)| Issued {
                token_id: id.clone(),
                arrived: c.arrived,
                answered: c.answered,
                lifetime: *lifetime,
            })
        })
        .collect()
}

/// Runs `hours` simulated hours of both environments; `Err` names the
/// first violated invariant. Call under paused time.
pub async fn run(seed: u64, hours: u64) -> Result<Summary, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let span = Duration::from_secs(hours * 3600);
    let start = Instant::now();
    let policy = RefreshPolicy::default();
    let metrics = Arc::new(Metrics::new());
    let mut endpoints = BTreeMap::new();
    let mut handles = Vec::new();
    let mut jitters = BTreeMap::new();
    for env in Environment::ALL {
        let lifetime = Duration::from_secs([30, 120, 900, 3600][rng.random_range(0..4)]);
        let windows = schedule(&mut rng, span, lifetime);
        let endpoint = SimEndpoint(Arc::new(Mutex::new(EndpointState {
            rng: StdRng::seed_from_u64(rng.random()),
            start,
            windows,
            lifetime,
            issued: 0,
            last_token: None,
            refresh_token: None,
            calls: Vec::new(),
        })));
        let jitter = rng.random_range(0.0..1.0);
        let mut config = TokenSourceConfig::new(env);
        config.policy = policy.clone();
        config.jitter = Jitter::Fixed(jitter);
        let key = ApiKey::new("sim-client", "sim-secret").unwrap();
        let (handle, _task) = token::spawn(config, endpoint.clone(), key, metrics.clone());
        handles.push(handle);
        endpoints.insert(env, endpoint);
        jitters.insert(env, jitter);
    }
    let sources = Arc::new(TokenSources::new(handles));
    let service = TokenBrokerService::new(Core::new(
        sources.clone(),
        Default::default(),
        Default::default(),
        metrics,
        Duration::from_secs(30),
        Default::default(),
    ));
    let mut summary = Summary::default();
    let mut watchers: Vec<(Environment, Arc<Mutex<Vec<String>>>)> = Vec::new();
    let fail = |message: String| Err(format!("seed {seed}: {message}"));

    while Instant::now() - start < span {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..45_000))).await;
        let env = Environment::ALL[rng.random_range(0..2)];
        let pb_env = pb::Environment::from(env) as i32;
        let now = Instant::now();
        let issued = issuances(&endpoints[&env].0.lock().unwrap().calls);
        let margin = |lifetime| policy.serve_margin_for(lifetime);
        // When the endpoint's view says this token must stop being served.
        // Read afresh: the call may have fetched a new token.
        let serve_until = |id: &str| {
            issuances(&endpoints[&env].0.lock().unwrap().calls)
                .iter()
                .rev()
                .find(|i| i.token_id == id)
                .map(|i| (i.arrived + i.lifetime - margin(i.lifetime), i.arrived + i.lifetime))
        };
        summary.caller_requests += 1;
        match rng.random_range(0..10) {
            0..=5 => {
                let min_remaining = rng.random_bool(0.3).then(|| {
                    Duration::from_secs(rng.random_range(0..=issued.last().map_or(60, |i| i.lifetime.as_secs())))
                });
                let request = pb::GetTokenRequest {
                    environment: pb_env,
                    min_remaining: min_remaining.map(|d| prost_types::Duration::try_from(d).unwrap()),
                };
                match service.get_token(tonic::Request::new(request)).await {
                    Ok(reply) => {
                        let token = reply.into_inner().token.unwrap();
                        let answered_at = Instant::now();
                        let Some((until, expires)) = serve_until(&token.token_id) else {
                            return fail(format!("{env}: served a token the endpoint never issued"));
                        };
                        if answered_at >= until {
                            return fail(format!(
                                "{env}: served token {} {:?} past its serve deadline",
                                token.token_id,
                                answered_at - until
                            ));
                        }
                        if let Some(min) = min_remaining
                            && expires - answered_at < min
                        {
                            return fail(format!("{env}: served less than min_remaining {min:?}"));
                        }
                    }
                    Err(status) if status.code() == tonic::Code::Unavailable => {
                        summary.unavailable_answers += 1;
                        // A token the broker has had for a moment and that is still servable.
                        let servable = issued
                            .iter()
                            .rev()
                            .find(|i| i.answered + TOLERANCE <= now)
                            .is_some_and(|i| now + TOLERANCE < i.arrived + i.lifetime - margin(i.lifetime));
                        if servable && min_remaining.is_none() {
                            return fail(format!("{env}: UNAVAILABLE while a servable token exists: {status:?}"));
                        }
                    }
                    Err(status) if matches!(status.code(), tonic::Code::DeadlineExceeded | tonic::Code::OutOfRange) => {
                    }
                    Err(status) => return fail(format!("{env}: unexpected {status:?}")),
                }
            }
            6..=7 => {
                let rejected = match sources.get(env).and_then(|s| s.current()) {
                    Some(t) => t.token_id.clone(),
                    None => continue,
                };
                let request = pb::RefreshTokenRequest {
                    environment: pb_env,
                    rejected_token_id: rejected.clone(),
                };
                match service.refresh_token(tonic::Request::new(request)).await {
                    Ok(reply) => {
                        let token = reply.into_inner().token.unwrap();
                        if token.token_id == rejected {
                            return fail(format!("{env}: RefreshToken returned the rejected token"));
                        }
                        match serve_until(&token.token_id) {
                            Some((until, _)) if Instant::now() < until => {}
                            _ => return fail(format!("{env}: RefreshToken returned an unservable token")),
                        }
                    }
                    Err(status)
                        if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded) => {}
                    Err(status) => return fail(format!("{env}: unexpected RefreshToken {status:?}")),
                }
            }
            _ if watchers.len() < 6 => {
                let request = pb::WatchTokenRequest { environment: pb_env };
                let mut stream = service
                    .watch_token(tonic::Request::new(request))
                    .await
                    .map_err(|s| format!("seed {seed}: WatchToken {s:?}"))?
                    .into_inner();
                let seen = Arc::new(Mutex::new(Vec::new()));
                let record = seen.clone();
                tokio::spawn(async move {
                    while let Some(Ok(update)) = stream.next().await {
                        if let Some(pb::watch_token_response::Update::Token(t)) = update.update {
                            let mut seen = record.lock().unwrap();
                            if seen.last() != Some(&t.token_id) {
                                seen.push(t.token_id);
                            }
                        }
                    }
                });
                watchers.push((env, seen));
                summary.watchers += 1;
            }
            _ => {}
        }
    }

    // Let every watcher take in the last update.
    tokio::time::sleep(Duration::from_millis(10)).await;
    for (env, endpoint) in &endpoints {
        let state = endpoint.0.lock().unwrap();
        summary.endpoint_calls += state.calls.len();
        summary.fault_windows += state.windows.len();
        check_backoff(&state.calls, &policy, jitters[env]).map_err(|e| format!("seed {seed}: {env}: {e}"))?;
        // Every rotation, in order, as the endpoint issued them.
        let mut rotations: Vec<String> = Vec::new();
        for issued in issuances(&state.calls) {
            if rotations.last() != Some(&issued.token_id) {
                rotations.push(issued.token_id);
            }
        }
        summary.rotations += rotations.len();
        for (_, seen) in watchers.iter().filter(|(e, _)| e == env) {
            let seen = seen.lock().unwrap();
            let Some(first) = seen.first() else { continue };
            let from = rotations
                .iter()
                .position(|id| id == first)
                .ok_or_else(|| format!("seed {seed}: {env}: a watcher saw a token never issued"))?;
            if rotations[from..] != seen[..] {
                return Err(format!(
                    "seed {seed}: {env}: a watcher saw {} rotations, the endpoint issued {} since it opened",
                    seen.len(),
                    rotations.len() - from
                ));
            }
        }
    }
    Ok(summary)
}

/// After each failed call, the next one comes no sooner than the policy's
/// delay for that failure (the fallback after a rejected refresh token
/// excepted, which is immediate by design).
fn check_backoff(calls: &[CallRecord], policy: &RefreshPolicy, jitter: f64) -> Result<(), String> {
    let mut failures = 0u32;
    for pair in calls.windows(2) {
        let (call, next) = (&pair[0], &pair[1]);
        let Err((class, retry_after)) = call.outcome else {
            failures = 0;
            continue;
        };
        if class == ErrorClass::InvalidGrant && call.refresh_grant {
            continue;
        }
        failures += 1;
        let class = match class {
            ErrorClass::InvalidGrant => ErrorClass::Permanent,
            c => c,
        };
        let delay = policy.retry_after_failure(class, failures, jitter, retry_after);
        if next.arrived + TOLERANCE < call.answered + delay {
            return Err(format!(
                "call after failure #{failures} ({class:?}) came {:?} after it, the schedule says {delay:?}",
                next.arrived - call.answered
            ));
        }
    }
    Ok(())
}
