//! Wiring: from a validated [`Config`] to a running broker (token sources,
//! gRPC listeners, health, admin), credential reload, and graceful shutdown.
//! [`Broker::build`] returns a [`RunningBroker`] so tests can run the whole
//! daemon in-process; [`RunningBroker::run`] adds signals, reload and systemd
//! around it for the `serve` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_health::server::HealthReporter;
use tracing::{error, info, warn};

mod reload;
pub mod token_store;

pub use reload::{ReloadOutcome, ReloadReport, Reloader};

use crate::config::Config;
use crate::config::Origin;
use crate::credentials::ApiKey;
use crate::credentials::{CredentialTable, CredentialsError};
use crate::emulator::{Emulator, EmulatorConfig, RunningEmulator};
use crate::environment::Environment;
use crate::grpc::{TokenBrokerService, health};
use crate::metrics::Metrics;
use crate::oauth::{ClientBuildError, OAuthClient};
use crate::serve::listen::{self, Bound, ListenAddr, ListenError};
use crate::serve::passed_fds::PassedFds;
use crate::tls_roots::RootsError;
use crate::token::Token;
use crate::token::{self, TokenSourceConfig, TokenSources};
use crate::upstream::{GrpcUpstream, UpstreamAddr};

/// Longest shutdown waits for watch streams to deliver their final status
/// before connections are closed.
const STREAM_END_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{environment}: {source}")]
    Credentials {
        environment: Environment,
        #[source]
        source: CredentialsError,
    },
    #[error("{environment}: no API key configured")]
    NoCredentials { environment: Environment },
    #[error("{environment}: {problems}")]
    Origin { environment: Environment, problems: String },
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot listen on admin address {addr}: {source}")]
    AdminBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    HttpClient(#[from] ClientBuildError),
    #[error("oauth.tls_roots: {0}")]
    TlsRoots(#[from] RootsError),
    #[error("TLS: {0}")]
    Tls(#[from] crate::serve::tls::TlsError),
    #[error("upstream TLS: {0}")]
    UpstreamTls(#[from] crate::certs::client::ClientTlsError),
    #[error("server reflection: {0}")]
    Reflection(String),
    #[error("emulator: {0}")]
    Emulator(std::io::Error),
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
    #[error("access: {0}")]
    Access(String),
    #[error("audit.file: {0}")]
    Audit(String),
}

impl DaemonError {
    /// Exit code: 78 for configuration and credential problems, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Credentials { .. }
            | DaemonError::NoCredentials { .. }
            | DaemonError::Origin { .. }
            | DaemonError::Tls(_)
            | DaemonError::UpstreamTls(_)
            | DaemonError::Proxy(_)
            | DaemonError::Access(_)
            | DaemonError::Audit(_)
            | DaemonError::TlsRoots(_) => crate::exit::CONFIG,
            DaemonError::Listen(e) if e.is_configuration() => crate::exit::CONFIG,
            _ => crate::exit::FAILURE,
        }
    }
}

/// A running broker.
pub struct RunningBroker {
    /// The addresses actually bound (ports resolved).
    pub grpc_addrs: Vec<ListenAddr>,
    /// Each proxy listener actually bound, with its environment.
    pub proxy_addrs: Vec<(Environment, ListenAddr)>,
    pub admin_addr: Option<SocketAddr>,
    pub sources: Arc<TokenSources>,
    pub metrics: Arc<Metrics>,
    reloader: Arc<Reloader>,
    /// TLS material that rotates in place (checked again at each reload).
    pub rotation: Arc<crate::certs::Rotation>,
    /// The audit trail (reopened at each reload).
    audit: crate::audit::Audit,
    /// First stage of shutdown: listeners stop accepting and every
    /// connection gets GOAWAY (clients open their next connection to the
    /// successor); calls in flight and new calls on open connections are
    /// still answered.
    stopping: CancellationToken,
    /// Second stage: every WatchToken stream ends with "reconnect now" and
    /// token file sinks remove their files.
    draining: CancellationToken,
    /// Cancelled once every environment holds a token (or `ready_timeout`
    /// passed) and the sockets waiting to take over their path have moved.
    pub ready: CancellationToken,
    /// The open WatchToken streams (shutdown waits for them to end).
    streams: TaskTracker,
    health: HealthReporter,
    servers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    source_tasks: Vec<JoinHandle<()>>,
    /// Token file sinks: each removes its file when draining starts.
    sinks: Vec<JoinHandle<()>>,
    grace: Duration,
}

/// Builds a broker from a validated configuration.
pub struct Broker;

impl Broker {
    /// Starts everything the configuration asks for. Keys are loaded and
    /// every listener bound before anything is served. `config_path` is
    /// re-read on reload.
    pub async fn build(config: Config, config_path: Option<PathBuf>) -> Result<RunningBroker, DaemonError> {
        let metrics = Arc::new(Metrics::new());
        let planned = plan_sources(&config)?;
        let tls = config
            .server
            .tls
            .as_ref()
            .map(crate::certs::server::ServerTls::load)
            .transpose()
            .map_err(crate::serve::tls::TlsError::from)?;
        // An agent's TLS to its hubs: loaded once, rotated in place.
        let follows_https = planned
            .iter()
            .any(|(_, p)| matches!(p, Planned::Follow { upstream } if upstream.iter().any(UpstreamAddr::is_https)));
        let upstream_tls = match follows_https {
            true => Some(crate::certs::client::ClientTls::load(&config.upstream.tls_files())?),
            false => None,
        };
        // One load of the token endpoints' roots for every client (token
        // sources and proxies): a PEM file's new content reaches them all.
        let roots = config.token_endpoint_roots()?;
        if !roots.certificates.is_empty() {
            info!(roots = %roots.origin, certificates = roots.certificates.len(), "token endpoint TLS roots loaded");
        }
        let mut materials: Vec<Arc<dyn crate::certs::Reloadable>> = Vec::new();
        if let Some(tls) = &tls {
            materials.push(tls.clone());
        }
        if let Some(tls) = &upstream_tls {
            materials.push(tls.clone());
        }
        if let (crate::tls_roots::TlsRoots::File(path), Some(rotating)) = (&config.oauth.tls_roots, &roots.rotating) {
            let authority = crate::certs::roots::Authority::adopt(path, rotating.clone())
                .map_err(|e| DaemonError::Tls(e.into()))?;
            materials.push(Arc::new(crate::certs::roots::TokenEndpointRoots(authority)));
        }
        let rotation = crate::certs::Rotation::new(materials, metrics.clone());
        let passed = PassedFds::from_env()?;
        let restored = token_store::restore(passed.token_store, &config.refresh);
        let mut inherited = passed.sockets;
        let unix = config.server.unix_socket_options();
        let mut bound = Vec::new();
        for addr in &config.server.listen {
            bound.push(acquire(&mut inherited, addr, &unix).await?);
        }
        let mut proxy_bound = Vec::new();
        for (env, e) in config.enabled() {
            for addr in &e.proxy.listen {
                proxy_bound.push((env, acquire(&mut inherited, addr, &unix).await?));
            }
        }
        inherited.finish()?;
        let listeners = bound.len() + proxy_bound.len() + usize::from(config.admin.listen.is_some());
        let limits = crate::serve::connection_limits(&config.server, listeners);
        let admin_listener = match config.admin.listen {
            Some(addr) => {
                let bind_error = |source| DaemonError::AdminBind { addr, source };
                let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind_error)?;
                let bound = listener.local_addr().map_err(bind_error)?;
                Some((listener, bound))
            }
            None => None,
        };

        let (sources, source_tasks) =
            spawn_sources(&config, planned, restored, &roots, upstream_tls.clone(), &metrics)?;
        let stopping = CancellationToken::new();
        let draining = CancellationToken::new();
        let sinks = crate::sinks::spawn(&config.sinks, &sources, &draining);
        let mut servers = Vec::new();
        let streams = TaskTracker::new();
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health::set_not_serving(&health_reporter, &sources).await;
        // Validated with the configuration: compiles here.
        let policy = config
            .policy()
            .map_err(|problems| DaemonError::Access(problems.join("; ")))?;
        let core = crate::broker::Core::new(
            sources.clone(),
            draining.clone(),
            streams.clone(),
            metrics.clone(),
            config.server.request_wait,
            policy,
        )
        .with_certificates(rotation.clone())
        .with_audit(
            crate::audit::Audit::start(&config.audit, metrics.clone())
                .map_err(|e| DaemonError::Audit(format!("{}: {e}", config.audit.file.display())))?,
        );
        let audit = core.audit().clone();
        let service = TokenBrokerService::new(core.clone());
        let api =
            crate::grpc::face(service.clone(), health_service).map_err(|e| DaemonError::Reflection(e.to_string()))?;

        let pending_sockets: Vec<_> = bound
            .iter()
            .chain(proxy_bound.iter().map(|(_, b)| b))
            .filter_map(|b| match b {
                Bound::Unix(_, file) if file.is_pending() => Some(file.clone()),
                _ => None,
            })
            .collect();
        let mut proxy_addrs = Vec::new();
        if !proxy_bound.is_empty() {
            let mut faces = std::collections::BTreeMap::new();
            for (env, e) in config.enabled().filter(|(_, e)| e.proxy.is_enabled()) {
                let proxy = crate::proxy::Proxy::new(env, &e.proxy, core.clone(), &roots, metrics.clone())?;
                info!(environment = %env, api = e.proxy.api_url(env), "proxying the Flute API");
                faces.insert(env, proxy.face());
            }
            for (env, listener) in proxy_bound {
                proxy_addrs.push((env, listener.addr()));
                servers.push(crate::serve::serve(
                    listener,
                    &faces[&env],
                    tls.as_ref(),
                    limits,
                    &stopping,
                    &metrics,
                ));
            }
        }
        let mut grpc_addrs = Vec::new();
        for listener in bound {
            grpc_addrs.push(listener.addr());
            servers.push(crate::serve::serve(
                listener,
                &api,
                tls.as_ref(),
                limits,
                &stopping,
                &metrics,
            ));
        }

        let ready = CancellationToken::new();
        let mut background = vec![
            tokio::spawn(health::report(
                health_reporter.clone(),
                sources.clone(),
                draining.clone(),
            )),
            tokio::spawn(become_ready(
                sources.clone(),
                config.systemd.ready_timeout,
                pending_sockets,
                ready.clone(),
            )),
        ];
        let mut admin_addr = None;
        if let Some((listener, addr)) = admin_listener {
            let admin = crate::admin::face(sources.clone(), metrics.clone());
            background.push(crate::serve::serve(
                Bound::Tcp(listener),
                &admin,
                None,
                limits,
                &stopping,
                &metrics,
            ));
            admin_addr = Some(addr);
        }

        if !rotation.is_empty() {
            background.push(rotation.spawn_watch(config.certificates.poll_interval, stopping.clone()));
        }

        let reloader = Arc::new(Reloader::new(&config, config_path, sources.clone(), metrics.clone()));
        if !config.poll_interval().is_zero() && reloader.watches_files().await {
            background.push(tokio::spawn(
                reloader.clone().poll(config.poll_interval(), stopping.clone()),
            ));
        }

        Ok(RunningBroker {
            grpc_addrs,
            proxy_addrs,
            admin_addr,
            sources,
            metrics,
            reloader,
            rotation,
            audit,
            stopping,
            draining,
            ready,
            streams,
            health: health_reporter,
            servers,
            background,
            source_tasks,
            sinks,
            grace: config.server.shutdown_grace,
        })
    }
}

/// What each enabled environment's source will be built from: its origin,
/// with the API key read now for one that calls the token endpoint (before
/// anything is bound).
enum Planned {
    Endpoint { token_url: String, key: ApiKey },
    Follow { upstream: Vec<UpstreamAddr> },
}

fn plan_sources(config: &Config) -> Result<Vec<(Environment, Planned)>, DaemonError> {
    config
        .enabled()
        .map(|(env, e)| {
            let origin = e.origin().map_err(|problems| DaemonError::Origin {
                environment: env,
                problems: problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
            })?;
            let planned = match origin {
                Origin::Endpoint { token_url } => {
                    let source = config
                        .key_source(env)
                        .ok_or(DaemonError::NoCredentials { environment: env })?;
                    let key = source.load().map_err(|source| DaemonError::Credentials {
                        environment: env,
                        source,
                    })?;
                    Planned::Endpoint { token_url, key }
                }
                Origin::Follow { upstream } => Planned::Follow { upstream },
            };
            Ok((env, planned))
        })
        .collect()
}

/// One TokenSource task per enabled environment, each starting from the
/// token kept across a restart when there is one.
fn spawn_sources(
    config: &Config,
    planned: Vec<(Environment, Planned)>,
    restored: Vec<(Environment, Arc<Token>)>,
    roots: &crate::tls_roots::TrustRoots,
    upstream_tls: Option<Arc<crate::certs::client::ClientTls>>,
    metrics: &Arc<Metrics>,
) -> Result<(Arc<TokenSources>, Vec<JoinHandle<()>>), DaemonError> {
    let mut handles = Vec::new();
    let mut tasks = Vec::new();
    for (env, planned) in planned {
        let mut source_config = TokenSourceConfig::new(env);
        source_config.policy = config.refresh.clone();
        source_config.use_refresh_token = config.oauth.use_refresh_token;
        source_config.restored = restored.iter().find(|(e, _)| *e == env).map(|(_, t)| t.clone());
        let (handle, task) = match planned {
            Planned::Endpoint { token_url, key } => {
                let client = OAuthClient::new(config.oauth.client_config(&token_url, roots.clone()))?;
                info!(environment = %env, token_url = %token_url, "token source started");
                token::spawn(source_config, client, key, metrics.clone())
            }
            Planned::Follow { upstream } => {
                let listed = upstream.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
                info!(environment = %env, upstream = %listed, "token source started, following upstream brokers");
                token::follow(
                    source_config,
                    GrpcUpstream::new(upstream, config.upstream.clone(), upstream_tls.clone()),
                    metrics.clone(),
                )
            }
        };
        handles.push(handle);
        tasks.push(task);
    }
    Ok((Arc::new(TokenSources::new(handles)), tasks))
}

impl RunningBroker {
    /// Re-reads the TLS material whose files changed, the configuration
    /// file (if any) and the API keys; see [`Reloader::reload`].
    pub async fn reload(&self) -> ReloadOutcome {
        self.rotation.check("reload");
        self.audit.reopen();
        let outcome = self.reloader.reload().await;
        let detail = match &outcome {
            ReloadOutcome::Rejected(e) => serde_json::json!({"outcome": "rejected", "problems": e.problems.len()}),
            ReloadOutcome::Applied(report) => serde_json::json!({
                "outcome": "applied",
                "keys_replaced": report.replaced.iter().map(|e| e.as_str()).collect::<Vec<_>>(),
                "keys_failed": report.failed.iter().map(|(e, _)| e.as_str()).collect::<Vec<_>>(),
            }),
        };
        self.audit.event("reload", detail);
        outcome
    }

    /// Health NOT_SERVING; the listeners stop accepting and every
    /// connection gets GOAWAY, so clients open their next connection to the
    /// successor (systemd's socket backlog, or the socket a new broker moved
    /// over the path); calls on open connections are still answered from
    /// the tokens held. Then every watch stream ends with "reconnect now"
    /// (its connection already has GOAWAY, so the client reconnects to the
    /// successor), token files go, and the connections drain, all within
    /// the grace period.
    pub async fn shutdown(self) {
        info!(grace = %crate::duration::format(self.grace), "shutting down");
        let deadline = tokio::time::Instant::now() + self.grace;
        health::set_not_serving(&self.health, &self.sources).await;
        self.stopping.cancel();
        self.draining.cancel();
        self.streams.close();
        let _ = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + STREAM_END_WAIT),
            self.streams.wait(),
        )
        .await;
        // Token files go before the broker does: nobody would remove them at expiry.
        let _ = tokio::time::timeout_at(deadline, futures_util::future::join_all(self.sinks)).await;
        let drain = futures_util::future::join_all(self.servers);
        if tokio::time::timeout_at(deadline, drain).await.is_err() {
            warn!("grace period over; closing the remaining connections");
        }
        for task in self.background.into_iter().chain(self.source_tasks) {
            task.abort();
        }
        // The last interval's records, before the process goes.
        self.audit.flush(Duration::from_secs(2)).await;
        info!("stopped");
    }
}

impl RunningBroker {
    /// Serves until SIGTERM or SIGINT, reloading on SIGHUP and keeping
    /// systemd informed (READY once every environment holds a token or
    /// `ready_timeout` passed, STATUS, WATCHDOG, RELOADING, STOPPING); then
    /// shuts down. Returns the exit code.
    pub async fn run(self, signals: Signals) -> u8 {
        let helpers = spawn_systemd_helpers(&self);
        let code = wait_for_signals(&self, signals).await;
        helpers.abort();
        crate::systemd::stopping();
        token_store::save(&self.sources);
        self.shutdown().await;
        code
    }
}

/// Cancels `ready` once every environment holds a token, or when
/// `ready_timeout` passed without (so an endpoint outage does not fail the
/// boot). The sockets that wait to take over a path another broker serves
/// move only once every environment holds a token, however long that takes:
/// a broker without tokens never takes callers from one that has them.
async fn become_ready(
    sources: Arc<TokenSources>,
    ready_timeout: Duration,
    pending_sockets: Vec<Arc<listen::SocketFile>>,
    ready: CancellationToken,
) {
    let holding = async {
        for s in sources.iter() {
            s.holding_token().await;
        }
    };
    tokio::pin!(holding);
    if tokio::time::timeout(ready_timeout, &mut holding).await.is_err() {
        ready.cancel();
        if !pending_sockets.is_empty() {
            warn!("no token yet: the previous broker keeps the socket path until this one holds its tokens");
        }
        holding.await;
    }
    for socket in pending_sockets {
        match socket.publish() {
            Ok(()) => info!(path = %socket.path().display(), "took over the socket path from the previous broker"),
            Err(e) => error!(path = %socket.path().display(), error = %e,
                "cannot take over the socket path; callers still reach the previous broker"),
        }
    }
    ready.cancel();
}

/// READY=1 once the broker is ready (see [`become_ready`]), STATUS=
/// updates, and WATCHDOG=1 while the token sources run.
fn spawn_systemd_helpers(daemon: &RunningBroker) -> JoinHandle<()> {
    let sources = daemon.sources.clone();
    let ready = daemon.ready.clone();
    tokio::spawn(async move {
        ready.cancelled().await;
        crate::systemd::ready(&sources.summary());
        info!(status = %sources.summary(), "ready");
        let watchdog = crate::systemd::watchdog_interval();
        let mut ticker =
            tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(10)).min(Duration::from_secs(10)));
        loop {
            ticker.tick().await;
            if watchdog.is_some() && sources.all_running() {
                crate::systemd::watchdog();
            }
            crate::systemd::status(&sources.summary());
        }
    })
}

/// SIGTERM, SIGINT and SIGHUP, caught from the start of `serve` so that a
/// signal during start-up is never taken by its default action.
pub struct Signals {
    pub term: tokio::signal::unix::Signal,
    pub int: tokio::signal::unix::Signal,
    pub hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; call it first thing, before any await.
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Runs until SIGTERM or SIGINT; SIGHUP reloads. Returns the exit code.
async fn wait_for_signals(daemon: &RunningBroker, signals: Signals) -> u8 {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM received"); return crate::exit::OK; }
            _ = int.recv() => { info!("SIGINT received"); return crate::exit::OK; }
            _ = hup.recv() => {
                info!("SIGHUP received: reloading configuration and credentials");
                crate::systemd::reloading();
                daemon.reload().await.log();
                crate::systemd::ready(&daemon.sources.summary());
            }
        }
    }
}

/// `serve --dev`: an in-process emulator with generated credentials, and a
/// configuration pointing both environments at it.
/// The socket systemd passed for `addr`, or else a new one bound.
async fn acquire(
    inherited: &mut listen::Inherited,
    addr: &ListenAddr,
    unix: &crate::serve::listen::UnixSocketOptions,
) -> Result<Bound, DaemonError> {
    match inherited.take(addr)? {
        Some(socket) => {
            info!(%addr, "using the socket passed by systemd");
            Ok(socket)
        }
        None => Ok(listen::bind(addr, unix).await?),
    }
}

pub async fn dev_setup(mut config: Config, token_lifetime: Duration) -> Result<(Config, RunningEmulator), DaemonError> {
    let secret = random_secret();
    let emulator_config = EmulatorConfig {
        client_id: "dev-client".into(),
        client_secret: secret.clone().into(),
        token_lifetime,
        issue_refresh_tokens: true,
    };
    let emulator = Emulator::new(emulator_config)
        .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(DaemonError::Emulator)?;
    config.credentials = CredentialTable::generated("dev-client", secret);
    config.oauth.allow_insecure_http = true;
    // Every environment calls the emulator, for its tokens and through a
    // proxy: an `upstream` from the file is dropped, so no environment has
    // both origins.
    for env in config.environments.values_mut() {
        env.enabled = true;
        env.token_url = emulator.token_url();
        env.proxy.api_url = emulator.base_url();
        env.upstream.clear();
        env.credentials = None;
    }
    Ok((config, emulator))
}

fn random_secret() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..32)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[rng.random_range(0..62)]))
        .collect()
}
