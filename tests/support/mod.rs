//! Helpers shared by the black-box tests: an in-process fake token endpoint
//! for paused-time tests, a log capture, and emulator start-up.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flute_token_broker::credentials::ApiKey;
use flute_token_broker::emulator::{Emulator, EmulatorConfig, RunningEmulator};
use flute_token_broker::oauth::{Grant, OAuthError, TokenEndpoint, TokenResponse};
use secrecy::{ExposeSecret, SecretString};

/// One scripted answer of the fake endpoint.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A new token.
    Fresh,
    /// The access token issued last time, again.
    Same,
    Fail(OAuthError),
    /// The endpoint code panics (a bug): the source task dies.
    Panic,
}

/// What the fake endpoint saw in one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub grant: &'static str,
    pub refresh_token: Option<String>,
    pub client_secret: String,
    pub at: tokio::time::Instant,
}

#[derive(Default)]
struct FakeState {
    calls: Vec<Call>,
    script: VecDeque<Reply>,
    /// Used when the script is empty.
    default_reply: Option<Reply>,
    lifetime: Duration,
    issue_refresh_tokens: bool,
    accepted_secret: String,
    delay: Duration,
    issued: u64,
    last: Option<String>,
    outstanding_refresh: Option<String>,
}

/// An in-process token endpoint; works under `tokio::time::pause()`.
#[derive(Clone)]
pub struct FakeEndpoint {
    state: Arc<Mutex<FakeState>>,
}

impl FakeEndpoint {
    pub fn new(lifetime: Duration) -> Self {
        let state = FakeState {
            lifetime,
            accepted_secret: "secret".into(),
            ..Default::default()
        };
        Self {
            state: Arc::new(Mutex::new(state)),
        }
    }

    pub fn with_refresh_tokens(self) -> Self {
        self.state.lock().unwrap().issue_refresh_tokens = true;
        self
    }

    pub fn key() -> ApiKey {
        ApiKey::new("client", "secret").unwrap()
    }

    pub fn push(&self, reply: Reply) {
        self.state.lock().unwrap().script.push_back(reply);
    }

    /// Answer every unscripted call this way (`None`: fresh tokens).
    pub fn set_default(&self, reply: Option<Reply>) {
        self.state.lock().unwrap().default_reply = reply;
    }

    pub fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    pub fn set_accepted_secret(&self, secret: &str) {
        self.state.lock().unwrap().accepted_secret = secret.to_owned();
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn call_count(&self) -> usize {
        self.state.lock().unwrap().calls.len()
    }
}

impl TokenEndpoint for FakeEndpoint {
    async fn request_token(&self, key: &ApiKey, grant: &Grant) -> Result<TokenResponse, OAuthError> {
        let delay = {
            let mut s = self.state.lock().unwrap();
            let refresh_token = match grant {
                Grant::RefreshToken(r) => Some(r.expose_secret().to_owned()),
                Grant::ClientCredentials => None,
            };
            s.calls.push(Call {
                grant: grant.name(),
                refresh_token,
                client_secret: key.expose_secret().to_owned(),
                at: tokio::time::Instant::now(),
            });
            s.delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut s = self.state.lock().unwrap();
        if key.expose_secret() != s.accepted_secret {
            return Err(OAuthError::OAuth {
                status: 401,
                code: "invalid_client",
                description: Some("bad client secret".into()),
            });
        }
        if let Grant::RefreshToken(r) = grant
            && s.outstanding_refresh.as_deref() != Some(r.expose_secret())
        {
            return Err(OAuthError::OAuth {
                status: 400,
                code: "invalid_grant",
                description: None,
            });
        }
        let reply = s
            .script
            .pop_front()
            .or_else(|| s.default_reply.clone())
            .unwrap_or(Reply::Fresh);
        let access = match reply {
            Reply::Fail(e) => return Err(e),
            Reply::Panic => {
                drop(s);
                panic!("the fake endpoint was told to panic");
            }
            Reply::Same if s.last.is_some() => s.last.clone().unwrap(),
            Reply::Same | Reply::Fresh => {
                s.issued += 1;
                format!("access-token-{}", s.issued)
            }
        };
        s.last = Some(access.clone());
        let refresh_token = s.issue_refresh_tokens.then(|| format!("refresh-token-{}", s.issued));
        s.outstanding_refresh = refresh_token.clone().or(s.outstanding_refresh.take());
        Ok(TokenResponse {
            access_token: SecretString::from(access),
            token_type: "Bearer".into(),
            lifetime: s.lifetime,
            lifetime_from_server: true,
            refresh_token: refresh_token.map(SecretString::from),
            scope: None,
        })
    }
}

/// A `MakeWriter` that keeps everything logged, for leak checks.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Installs a TRACE-level subscriber for the current thread.
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(self.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }
}

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

pub const CLIENT_ID: &str = "test-client";
pub const CLIENT_SECRET: &str = "s3cr:et%+/=value";

/// Starts an emulator on a free loopback port.
pub async fn start_emulator(lifetime: Duration, refresh_tokens: bool) -> RunningEmulator {
    let config = EmulatorConfig {
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.to_owned().into(),
        token_lifetime: lifetime,
        issue_refresh_tokens: refresh_tokens,
    };
    Emulator::new(config)
        .spawn("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

pub fn test_key() -> ApiKey {
    ApiKey::new(CLIENT_ID, CLIENT_SECRET).unwrap()
}

use flute_token_broker::Environment;
use flute_token_broker::config::Config;
use flute_token_broker::credentials::CredentialTable;
use flute_token_broker::daemon::{self, RunningBroker};
use flute_token_broker::serve::listen::ListenAddr;
use flute_token_broker::wire::pb::token_broker_client::TokenBrokerClient;

/// A whole broker in-process, with one emulator per environment.
pub struct Broker {
    pub daemon: RunningBroker,
    pub emulators: std::collections::BTreeMap<Environment, RunningEmulator>,
    pub tcp: String,
    pub unix: String,
    pub dir: tempfile::TempDir,
}

impl Broker {
    pub async fn client(&self) -> TokenBrokerClient<tonic::transport::Channel> {
        flute_token_broker::client::connect(&self.tcp, Duration::from_secs(5))
            .await
            .unwrap()
    }

    pub async fn channel(&self) -> tonic::transport::Channel {
        flute_token_broker::client::channel(&self.tcp, Duration::from_secs(5))
            .await
            .unwrap()
    }

    pub async fn unix_client(&self) -> TokenBrokerClient<tonic::transport::Channel> {
        flute_token_broker::client::connect(&self.unix, Duration::from_secs(5))
            .await
            .unwrap()
    }

    pub fn emulator(&self, env: Environment) -> &Emulator {
        &self.emulators[&env].emulator
    }
}

/// A configuration for a broker whose environments use `emulators`.
pub fn broker_config(
    emulators: &std::collections::BTreeMap<Environment, RunningEmulator>,
    dir: &std::path::Path,
) -> Config {
    let mut config = Config::default();
    config.server.listen = vec![
        ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        ListenAddr::Unix(dir.join("broker.sock")),
    ];
    config.server.shutdown_grace = Duration::from_secs(5);
    config.admin.listen = Some("127.0.0.1:0".parse().unwrap());
    config.oauth.allow_insecure_http = true;
    config.refresh.backoff_initial = Duration::from_millis(200);
    config.refresh.backoff_max = Duration::from_secs(1);
    config.credentials = CredentialTable::generated(CLIENT_ID, CLIENT_SECRET.into());
    for (env, e) in config.environments.iter_mut() {
        match emulators.get(env) {
            Some(emu) => e.token_url = emu.token_url(),
            None => e.enabled = false,
        }
    }
    config
}

/// Starts emulators for `envs` (tokens living `lifetime`), lets `prepare`
/// adjust them and the configuration, then starts the broker.
pub async fn start_broker_with(
    envs: &[Environment],
    lifetime: Duration,
    prepare: impl FnOnce(&std::collections::BTreeMap<Environment, RunningEmulator>, &mut Config),
) -> Broker {
    let mut emulators = std::collections::BTreeMap::new();
    for env in envs {
        emulators.insert(*env, start_emulator(lifetime, true).await);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = broker_config(&emulators, dir.path());
    prepare(&emulators, &mut config);
    let daemon = daemon::Broker::build(config, None).await.expect("broker starts");
    let tcp = daemon
        .grpc_addrs
        .iter()
        .find_map(|a| matches!(a, ListenAddr::Tcp(_)).then(|| format!("http://{a}")))
        .unwrap_or_default();
    let unix = daemon
        .grpc_addrs
        .iter()
        .find_map(|a| matches!(a, ListenAddr::Unix(_)).then(|| a.to_string()))
        .unwrap_or_default();
    Broker {
        daemon,
        emulators,
        tcp,
        unix,
        dir,
    }
}

pub async fn start_broker(lifetime: Duration) -> Broker {
    start_broker_with(&Environment::ALL, lifetime, |_, _| {}).await
}

/// A plain HTTP client for talking to the emulator and admin endpoints.
pub fn http_client() -> reqwest::Client {
    flute_token_broker::install_crypto_provider();
    reqwest::Client::new()
}

pub type Client = TokenBrokerClient<tonic::transport::Channel>;
pub type WatchStream = tonic::Streaming<flute_token_broker::wire::pb::WatchTokenResponse>;
use flute_token_broker::wire::pb;

/// The current token of `environment` (a `pb::Environment` value).
pub async fn current_token(client: &mut Client, environment: i32) -> pb::Token {
    let request = pb::GetTokenRequest {
        environment,
        min_remaining: None,
    };
    client
        .get_token(request)
        .await
        .expect("GetToken")
        .into_inner()
        .token
        .expect("a token")
}

pub async fn open_watch(client: &mut Client, environment: i32) -> WatchStream {
    client
        .watch_token(pb::WatchTokenRequest { environment })
        .await
        .expect("WatchToken")
        .into_inner()
}

/// The next update of `stream` that `pick` accepts, within 10 s.
async fn next_matching<T>(stream: &mut WatchStream, pick: impl Fn(pb::watch_token_response::Update) -> Option<T>) -> T {
    use tokio_stream::StreamExt;
    let wait = async {
        while let Some(item) = stream.next().await {
            if let Some(found) = item.expect("the watch stream stays open").update.and_then(&pick) {
                return found;
            }
        }
        panic!("watch stream ended");
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("an update within 10 s")
}

/// The next Token update (outages in between are skipped).
pub async fn next_token(stream: &mut WatchStream) -> pb::Token {
    next_matching(stream, |u| match u {
        pb::watch_token_response::Update::Token(t) => Some(t),
        _ => None,
    })
    .await
}

/// The next Outage update (tokens in between are skipped).
pub async fn next_outage(stream: &mut WatchStream) -> pb::Outage {
    next_matching(stream, |u| match u {
        pb::watch_token_response::Update::Outage(o) => Some(o),
        _ => None,
    })
    .await
}

/// Sends `signal` to a child process.
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).expect("kill");
}

/// One sample of the admin listener's `/metrics` (0 when absent).
/// The admin endpoint's `/metrics` text.
pub async fn metrics_text(admin: impl std::fmt::Display) -> String {
    http_client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub async fn metric(admin: impl std::fmt::Display, sample: &str) -> f64 {
    metrics_text(admin)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Polls a metric until it reaches `value`, for at most 10 s (the admin
/// endpoint is the only way to observe some events from outside).
pub async fn await_metric(admin: impl std::fmt::Display + Copy, sample: &str, value: f64) {
    for _ in 0..200 {
        if metric(admin, sample).await >= value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{sample} never reached {value}");
}

/// Connects to a broker that is starting, retrying for at most 20 s.
pub async fn connect_when_up(addr: &str) -> Client {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match flute_token_broker::client::connect(addr, Duration::from_secs(1)).await {
            Ok(client) => return client,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("broker not up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
