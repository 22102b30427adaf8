//! The direct mode's herd: many token sources started at once (a fleet of
//! brokers restarting together) against the emulator admitting 20 token
//! requests per second and answering 429 with `Retry-After` beyond that.
//! Measures the time until every source holds a token and the calls made,
//! and checks that no source called again sooner than its backoff allowed
//! (the `Retry-After` it was given, and the policy's 50 ms floor). Real
//! time, real HTTP over loopback. Run:
//! `HERD_SOURCES=1000 HERD_RATE=20 cargo bench --bench herd`.
//! Exits non-zero if a source called too soon.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flute_token_broker::Environment;
use flute_token_broker::credentials::ApiKey;
use flute_token_broker::emulator::{Emulator, EmulatorConfig, FaultRequest};
use flute_token_broker::metrics::Metrics;
use flute_token_broker::oauth::{Grant, OAuthClient, OAuthClientConfig, OAuthError, TokenEndpoint, TokenResponse};
use flute_token_broker::token::{self, TokenSourceConfig};

/// One token request as the source made it.
struct Call {
    sent: Instant,
    answered: Instant,
    /// `Retry-After` of a 429, if that was the answer.
    retry_after: Option<Duration>,
}

/// The real client, with every call recorded.
struct Recording {
    client: OAuthClient,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl TokenEndpoint for Recording {
    async fn request_token(&self, key: &ApiKey, grant: &Grant) -> Result<TokenResponse, OAuthError> {
        let sent = Instant::now();
        let result = self.client.request_token(key, grant).await;
        let retry_after = match &result {
            Err(OAuthError::RateLimited { retry_after }) => Some(retry_after.unwrap_or_default()),
            _ => None,
        };
        let answered = Instant::now();
        self.calls.lock().unwrap().push(Call {
            sent,
            answered,
            retry_after,
        });
        result
    }
}

fn env_number(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let sources = env_number("HERD_SOURCES", 1000);
    let rate = env_number("HERD_RATE", 20);
    flute_token_broker::serve::guard::raise_fd_limit();
    let emulator = Emulator::new(EmulatorConfig {
        client_id: "herd".into(),
        client_secret: "herd-secret".to_owned().into(),
        token_lifetime: Duration::from_secs(900),
        issue_refresh_tokens: false,
    })
    .spawn("127.0.0.1:0".parse().unwrap())
    .await
    .expect("the emulator starts");
    emulator.emulator.set_faults(FaultRequest {
        rate_limit_per_second: Some(rate),
        ..Default::default()
    });

    let metrics = Arc::new(Metrics::new());
    let started = Instant::now();
    let mut herd = Vec::new();
    for _ in 0..sources {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let endpoint = Recording {
            client: OAuthClient::new(OAuthClientConfig::new(emulator.token_url())).unwrap(),
            calls: calls.clone(),
        };
        let key = ApiKey::new("herd", "herd-secret").unwrap();
        let (handle, _task) = token::spawn(
            TokenSourceConfig::new(Environment::Sandbox),
            endpoint,
            key,
            metrics.clone(),
        );
        herd.push((handle, calls));
    }
    let mut ready_after = Vec::new();
    for (handle, _) in &herd {
        handle.holding_token().await;
        ready_after.push(started.elapsed());
    }
    let all_ready = started.elapsed();

    let (mut total, mut limited, mut too_soon, mut most) = (0, 0, 0, 0);
    for (_, calls) in &herd {
        let calls = calls.lock().unwrap();
        total += calls.len();
        most = most.max(calls.len());
        for pair in calls.windows(2) {
            let waited = pair[1].sent.duration_since(pair[0].answered);
            let allowed = pair[0].retry_after.unwrap_or_default().max(Duration::from_millis(50));
            if pair[0].retry_after.is_some() {
                limited += 1;
            }
            if waited < allowed {
                too_soon += 1;
            }
        }
        if calls.last().is_some_and(|c| c.retry_after.is_some()) {
            limited += 1;
        }
    }
    // Each source's own time to its token, not the order it was awaited in.
    let mut own: Vec<Duration> = herd
        .iter()
        .map(|(_, calls)| {
            let calls = calls.lock().unwrap();
            calls
                .last()
                .map(|c| c.answered.duration_since(started))
                .unwrap_or_default()
        })
        .collect();
    own.sort();
    println!(
        "herd: {sources} token sources started at once, endpoint admitting {rate} calls/s (429 + Retry-After beyond)"
    );
    println!("  every source holding a token after {:.1} s", all_ready.as_secs_f64());
    println!(
        "  time to a token per source: p50 {:.1} s, p99 {:.1} s, max {:.1} s",
        percentile(&own, 0.5).as_secs_f64(),
        percentile(&own, 0.99).as_secs_f64(),
        own.last().unwrap().as_secs_f64()
    );
    println!(
        "  token requests: {total} ({:.2} per source, at most {most} by one source), {limited} answered 429",
        total as f64 / sources as f64
    );
    println!(
        "  admitted rate over the run: {:.1} calls/s",
        sources as f64 / all_ready.as_secs_f64()
    );
    println!("  calls sooner than the backoff allowed: {too_soon}");
    if too_soon > 0 {
        std::process::exit(1);
    }
}
