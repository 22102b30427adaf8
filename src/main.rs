//! The `flute-token-broker` binary: parses the command line and calls into
//! the library. Exit codes (all in `flute_token_broker::exit`): 0 ok, 1 runtime failure, 2 bad arguments,
//! 78 invalid configuration; the client commands add 69 (broker
//! unreachable) and 75 (no valid token).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use flute_token_broker::client::{self, TokenFormat};
use flute_token_broker::config::{Config, Loaded};
use flute_token_broker::daemon::{self, RunningDaemon};
use flute_token_broker::emulator::{Emulator, EmulatorConfig};
use flute_token_broker::exit;
use flute_token_broker::grpc::listener::ListenAddr;
use flute_token_broker::grpc::tls::ClientTlsFiles;
use flute_token_broker::{Environment, duration, logging, systemd};

#[derive(Parser)]
#[command(
    name = "flute-token-broker",
    version,
    about = "Holds a Flute API key and serves fresh access tokens over gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker daemon.
    Serve(ServeArgs),
    /// Validate a configuration and print the effective settings (secrets redacted).
    CheckConfig {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print a token (bare by default, for `$(...)`).
    Get {
        #[command(flatten)]
        client: ClientArgs,
        /// sandbox or production.
        #[arg(long, short)]
        env: Environment,
        /// Refresh first unless the token stays valid this long.
        #[arg(long, value_parser = duration::parse)]
        min_remaining: Option<Duration>,
        #[arg(long, value_enum, default_value = "token")]
        format: TokenFormat,
    },
    /// Print a line for every token rotation or outage.
    Watch {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long, short)]
        env: Environment,
    },
    /// Show the state of every enabled environment.
    Status {
        #[command(flatten)]
        client: ClientArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run a local stand-in for Flute's token endpoint (for tests and demos).
    Emulator(EmulatorArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The TOML configuration file (environment overrides: FLUTE_BROKER__SECTION__KEY).
    #[arg(long, short, conflicts_with = "dev")]
    config: Option<PathBuf>,
    /// Run against a built-in emulator of Flute's token endpoint, with generated credentials.
    #[arg(long)]
    dev: bool,
    /// gRPC listen address, HOST:PORT or unix:PATH (repeatable; replaces server.listen).
    #[arg(long)]
    listen: Vec<ListenAddr>,
    /// Admin HTTP address (/metrics, /healthz, /readyz); "" disables it.
    #[arg(long)]
    admin_listen: Option<String>,
    /// With --dev: the lifetime of the emulator's tokens.
    #[arg(long, default_value = "900s", value_parser = duration::parse, requires = "dev")]
    dev_token_lifetime: Duration,
}

#[derive(clap::Args)]
struct ClientArgs {
    /// The broker: unix:/path/to.sock or http://host:port.
    #[arg(long, env = "FLUTE_BROKER_ADDR", default_value = client::DEFAULT_ADDR)]
    addr: String,
    /// Give up after this long.
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    timeout: Duration,
    /// With https://: the CA certificate (PEM) that signed the broker's certificate.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// With https:// and a broker requiring mTLS: this client's certificate (PEM).
    #[arg(long, requires = "key_file")]
    cert_file: Option<PathBuf>,
    /// The private key (PEM) of --cert-file.
    #[arg(long, requires = "cert_file")]
    key_file: Option<PathBuf>,
}

impl ClientArgs {
    fn target(&self) -> client::Target {
        let mut target = client::Target::new(self.addr.clone(), self.timeout);
        target.tls = ClientTlsFiles {
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        };
        target
    }
}

#[derive(clap::Args)]
struct EmulatorArgs {
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:9470")]
    listen: SocketAddr,
    /// The client id the emulator accepts.
    #[arg(long)]
    client_id: String,
    /// The client secret the emulator accepts (a test value: it is visible in `ps`).
    #[arg(
        long,
        conflicts_with = "client_secret_file",
        required_unless_present = "client_secret_file"
    )]
    client_secret: Option<String>,
    /// Read the accepted client secret from this file instead.
    #[arg(long)]
    client_secret_file: Option<PathBuf>,
    /// expires_in of issued tokens.
    #[arg(long, default_value = "900s", value_parser = duration::parse)]
    token_lifetime: Duration,
    /// Do not issue refresh tokens.
    #[arg(long)]
    no_refresh_tokens: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            logging::to_stderr(format_args!("error: cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    ExitCode::from(runtime.block_on(run(cli.command)))
}

async fn run(command: Command) -> u8 {
    match command {
        Command::Serve(args) => serve(args).await,
        Command::CheckConfig { config } => check_config(config),
        Command::Get {
            client,
            env,
            min_remaining,
            format,
        } => print_result(
            client::get(&client.target(), env, min_remaining, format)
                .await
                .and_then(|t| print_out(format_args!("{t}\n"))),
        ),
        Command::Watch { client, env } => {
            print_result(client::watch(&client.target(), env, &mut std::io::stdout()).await)
        }
        Command::Status { client, json } => {
            print_result(client::status(&client.target(), json).await.and_then(print_out))
        }
        Command::Emulator(args) => match run_emulator(args).await {
            Ok(()) => exit::OK,
            Err(e) => {
                logging::to_stderr(format_args!("error: {e:#}"));
                1
            }
        },
    }
}

fn print_out(text: impl std::fmt::Display) -> Result<(), client::ClientError> {
    logging::to_stdout(text).map_err(client::ClientError::Output)
}

fn print_result(result: Result<(), client::ClientError>) -> u8 {
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            logging::to_stderr(format_args!("error: {e}"));
            e.exit_code()
        }
    }
}

fn load_config(path: Option<&std::path::Path>) -> Result<Loaded, u8> {
    Config::load(path).map_err(|e| {
        logging::to_stderr(format_args!("error: {e}"));
        exit::CONFIG
    })
}

fn check_config(path: Option<PathBuf>) -> u8 {
    match load_config(path.as_deref()) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                logging::to_stderr(format_args!("warning: {w}"));
            }
            if let Err(e) = logging::to_stdout(loaded.config.to_toml()) {
                logging::to_stderr(format_args!("error: cannot write the output: {e}"));
                return exit::IO_ERROR;
            }
            logging::to_stderr("configuration is valid");
            exit::OK
        }
        Err(code) => code,
    }
}

async fn serve(args: ServeArgs) -> u8 {
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            logging::to_stderr(format_args!("error: cannot install signal handlers: {e}"));
            return exit::FAILURE;
        }
    };
    let (mut config, warnings) = if args.dev {
        (Config::default(), Vec::new())
    } else {
        match load_config(args.config.as_deref()) {
            Ok(Loaded { config, warnings }) => (config, warnings),
            Err(code) => return code,
        }
    };
    if !args.listen.is_empty() {
        config.server.listen = args.listen.clone();
    }
    if let Some(admin) = &args.admin_listen {
        config.admin_listen = match admin.as_str() {
            "" => None,
            text => match text.parse() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    logging::to_stderr(format_args!("error: --admin-listen {text:?}: expected IP:PORT"));
                    return exit::USAGE;
                }
            },
        };
    }
    logging::init(config.log.format, &config.log.level);
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let mut emulator = None;
    if args.dev {
        match daemon::dev_setup(config, args.dev_token_lifetime).await {
            Ok((c, e)) => {
                config = c;
                emulator = Some(e);
            }
            Err(e) => {
                logging::to_stderr(format_args!("error: {e}"));
                return exit::FAILURE;
            }
        }
    }
    let ready_timeout = config.ready_timeout;
    let daemon = match daemon::start(config, args.config.clone()).await {
        Ok(d) => d,
        Err(e) => {
            logging::to_stderr(format_args!("error: {e}"));
            return e.exit_code();
        }
    };
    if let Some(emulator) = &emulator {
        print_dev_banner(&daemon, &emulator.base_url(), args.dev_token_lifetime);
    }
    let helpers = spawn_systemd_helpers(&daemon, ready_timeout);
    let code = wait_for_signals(&daemon, signals).await;
    helpers.abort();
    systemd::stopping();
    daemon.shutdown().await;
    drop(emulator);
    code
}

/// READY=1 once every environment holds a token (or `ready_timeout`
/// passed), STATUS= updates, and WATCHDOG=1 while the token sources run.
fn spawn_systemd_helpers(daemon: &RunningDaemon, ready_timeout: Duration) -> tokio::task::JoinHandle<()> {
    let sources = daemon.sources.clone();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + ready_timeout;
        let started = async {
            for s in sources.iter() {
                s.started().await;
            }
        };
        let _ = tokio::time::timeout_at(deadline, started).await;
        systemd::ready(&sources.summary());
        tracing::info!(status = %sources.summary(), "ready");
        let watchdog = systemd::watchdog_interval();
        let mut ticker =
            tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(10)).min(Duration::from_secs(10)));
        loop {
            ticker.tick().await;
            if watchdog.is_some() && sources.all_running() {
                systemd::watchdog();
            }
            systemd::status(&sources.summary());
        }
    })
}

/// SIGTERM, SIGINT and SIGHUP, caught from the start of `serve` so that a
/// signal during start-up is never taken by its default action.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Runs until SIGTERM or SIGINT; SIGHUP reloads. Returns the exit code.
async fn wait_for_signals(daemon: &RunningDaemon, signals: Signals) -> u8 {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM received"); return exit::OK; }
            _ = int.recv() => { tracing::info!("SIGINT received"); return exit::OK; }
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: reloading configuration and credentials");
                systemd::reloading();
                match daemon.reload().await {
                    Ok(report) => tracing::info!(replaced = ?report.replaced, unchanged = ?report.unchanged, failed = ?report.failed, "reload finished"),
                    Err(_) => tracing::error!("reload rejected; the running configuration is unchanged"),
                }
                systemd::ready(&daemon.sources.summary());
            }
        }
    }
}

fn print_dev_banner(daemon: &RunningDaemon, emulator: &str, lifetime: Duration) {
    let grpc: Vec<String> = daemon.grpc_addrs.iter().map(ToString::to_string).collect();
    let addr_flag = match daemon.grpc_addrs.first() {
        Some(ListenAddr::Tcp(a)) if a.to_string() == "127.0.0.1:50051" => String::new(),
        Some(ListenAddr::Tcp(a)) => format!(" --addr http://{a}"),
        Some(ListenAddr::Unix(p)) => format!(" --addr unix:{}", p.display()),
        None => String::new(),
    };
    let mut banner = Vec::new();
    banner.push(
        "flute-token-broker is running in dev mode against a built-in emulator of Flute's token endpoint.".to_owned(),
    );
    banner.push(format!("  gRPC:      {}", grpc.join(", ")));
    banner.push(format!(
        "  emulator:  {emulator} (tokens live {})",
        duration::format(lifetime)
    ));
    if let Some(admin) = daemon.admin_addr {
        banner.push(format!("  admin:     http://{admin}/metrics  /healthz  /readyz"));
    }
    banner.push(String::new());
    banner.push("In another terminal:".to_owned());
    banner.push(format!("  cargo run --release -- get --env sandbox{addr_flag}"));
    banner.push(format!("  curl -H \"Authorization: Bearer $(cargo run -q --release -- get --env sandbox{addr_flag})\" {emulator}/v2/transactions"));
    banner.push(format!("  cargo run --release -- watch --env sandbox{addr_flag}"));
    banner.push(format!("  cargo run --release -- status{addr_flag}"));
    banner.push("Stop with Ctrl-C.".to_owned());
    // The daemon keeps running when stdout is closed or full.
    let _ = logging::to_stdout(banner.join("\n") + "\n");
}

async fn run_emulator(args: EmulatorArgs) -> anyhow::Result<()> {
    logging::init(flute_token_broker::logging::LogFormat::Text, "info");
    let secret = match (args.client_secret, args.client_secret_file) {
        (Some(s), _) => s,
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?
            .trim()
            .to_owned(),
        (None, None) => anyhow::bail!("--client-secret or --client-secret-file is required"),
    };
    let config = EmulatorConfig {
        client_id: args.client_id,
        client_secret: secret.into(),
        token_lifetime: args.token_lifetime,
        issue_refresh_tokens: !args.no_refresh_tokens,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    let Signals { mut term, mut int, .. } = Signals::install()?;
    let _ = logging::to_stdout(format_args!(
        "emulator listening on http://{addr} (token endpoint http://{addr}/oauth2/token)\n"
    ));
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    Emulator::new(config).serve(listener, shutdown).await?;
    Ok(())
}
