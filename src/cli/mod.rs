//! The command line: runs each subcommand (`serve`, `check-config`, `get`,
//! `reload`, `watch`, `exec`, `status`, `emulator`, `completions`, `man`, `sleep`) and turns its outcome into an exit code.
//! `main.rs` only parses the arguments and starts the runtime.

mod args;
mod exec;

use std::path::PathBuf;
use std::time::Duration;

pub use args::{Cli, ClientArgs, Command, EmulatorArgs, EnvironmentArgs, ServeArgs};

use clap::CommandFactory;

use crate::client;
use crate::config::{Config, Loaded, SecretCheck};
use crate::daemon::{self, RunningBroker, Signals};
use crate::emulator::{Emulator, EmulatorConfig};
use crate::exit;
use crate::serve::listen::ListenAddr;
use crate::{duration, logging};

/// `serve --dev` tokens live as long as Flute's (about 15 minutes).
const DEV_TOKEN_LIFETIME: Duration = Duration::from_secs(900);

/// Runs one command; returns the exit code (see [`crate::exit`]).
pub async fn run(command: Command) -> u8 {
    match command {
        Command::Serve(args) => serve(args).await,
        Command::CheckConfig { config, skip_secrets } => check_config(config, skip_secrets),
        Command::Reload { config, pid } => reload(&config, pid),
        Command::Get {
            broker: EnvironmentArgs { client, env },
            min_remaining,
            format,
        } => print_result(
            client::get(&client.target(), env, min_remaining, format)
                .await
                .and_then(|t| print_out(format_args!("{t}\n"))),
        ),
        Command::Exec {
            broker: EnvironmentArgs { client, env },
            min_remaining,
            command,
        } => exec::run(&client.target(), env, min_remaining, &command).await,
        Command::Watch {
            broker: EnvironmentArgs { client, env },
            no_reconnect,
        } => print_result(client::watch(&client.target(), env, !no_reconnect, &mut std::io::stdout()).await),
        Command::Status { client, json, env } => match client::status(&client.target(), json, env).await {
            Ok(report) => {
                if print_out(&report.text).is_err() {
                    return exit::IO_ERROR;
                }
                if report.without_token.is_empty() {
                    exit::OK
                } else {
                    logging::to_stderr(format_args!("no valid token: {}", report.without_token.join(", ")));
                    exit::NO_TOKEN
                }
            }
            Err(e) => print_result(Err(e)),
        },
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "flute-token-broker", &mut script);
            print_bytes(&script)
        }
        Command::Man { dir: None } => {
            let mut page = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut page) {
                Ok(()) => print_bytes(&page),
                Err(e) => {
                    logging::to_stderr(format_args!("error: cannot render the man page: {e}"));
                    exit::FAILURE
                }
            }
        }
        Command::Man { dir: Some(dir) } => {
            match std::fs::create_dir_all(&dir).and_then(|()| clap_mangen::generate_to(Cli::command(), &dir)) {
                Ok(()) => exit::OK,
                Err(e) => {
                    logging::to_stderr(format_args!("error: cannot write man pages to {}: {e}", dir.display()));
                    exit::IO_ERROR
                }
            }
        }
        Command::Sleep { duration } => {
            tokio::time::sleep(duration).await;
            exit::OK
        }
        Command::Audit {
            command: args::AuditCommand::Verify { files },
        } => audit_verify(&files),
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

fn print_bytes(bytes: &[u8]) -> u8 {
    match print_out(String::from_utf8_lossy(bytes)) {
        Ok(()) => exit::OK,
        Err(e) => print_result(Err(e)),
    }
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

fn load_config(path: Option<&std::path::Path>, secrets: SecretCheck) -> Result<Loaded, u8> {
    Config::load_checking(path, None, secrets).map_err(|e| {
        logging::error_to_stderr(&e);
        exit::CONFIG
    })
}

/// `reload`: the file is checked with the same loader the broker's reload
/// uses; only a valid one is signalled. Key sources are not read here: under
/// the unit, systemd 252 gives `ExecReload=` no access to the service's
/// credentials, and the broker reads and tries every key itself (a key
/// that fails is logged at ERROR and the current one kept).
fn reload(path: &std::path::Path, pid: i32) -> u8 {
    use nix::sys::signal::{Signal, kill};
    let loaded = match load_config(Some(path), SecretCheck::Skip) {
        Ok(loaded) => loaded,
        Err(code) => {
            logging::error_to_stderr(format_args!(
                "reload rejected: the broker (PID {pid}) keeps its current configuration"
            ));
            return code;
        }
    };
    for w in &loaded.warnings {
        logging::to_stderr(format_args!("warning: {w}"));
    }
    match kill(nix::unistd::Pid::from_raw(pid), Signal::SIGHUP) {
        Ok(()) => {
            logging::to_stderr(format_args!(
                "configuration is valid; the broker (PID {pid}) is reloading it"
            ));
            exit::OK
        }
        Err(e) => {
            logging::error_to_stderr(format_args!("cannot signal the broker (PID {pid}): {e}"));
            exit::FAILURE
        }
    }
}

/// `audit verify FILE…`: the chain across the files, oldest first.
fn audit_verify(files: &[PathBuf]) -> u8 {
    let mut texts = Vec::new();
    for file in files {
        match std::fs::read(file) {
            Ok(bytes) => texts.push((file.display().to_string(), String::from_utf8_lossy(&bytes).into_owned())),
            Err(e) => {
                logging::to_stderr(format_args!("error: {}: {e}", file.display()));
                return exit::NO_INPUT;
            }
        }
    }
    match crate::audit::chain::verify(texts.iter().map(|(name, text)| (name.as_str(), text.as_str()))) {
        Ok(verified) => {
            let last = verified.last_seq.map_or("none".to_owned(), |s| s.to_string());
            let _ = print_out(format_args!(
                "intact: {} records, last seq {last}, last hash {}\n",
                verified.records, verified.last_hash
            ));
            exit::OK
        }
        Err(broken) => {
            logging::to_stderr(format_args!("broken: {broken}"));
            exit::DATA_ERROR
        }
    }
}

fn check_config(path: PathBuf, skip_secrets: bool) -> u8 {
    let secrets = if skip_secrets {
        SecretCheck::Skip
    } else {
        SecretCheck::Read
    };
    match load_config(Some(&path), secrets) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                logging::to_stderr(format_args!("warning: {w}"));
            }
            for line in loaded.config.token_sources_summary() {
                logging::to_stderr(line);
            }
            if let Ok(policy) = loaded.config.policy() {
                for line in policy.table().0 {
                    logging::to_stderr(line);
                }
            }
            if !skip_secrets {
                let now = std::time::SystemTime::now();
                let in_use = loaded.config.certificates_in_use();
                for cert in &in_use {
                    logging::to_stderr(format_args!(
                        "certificate: {} ({}): {}",
                        cert.role,
                        cert.certificate.subject,
                        cert.certificate.describe(now)
                    ));
                }
                for soon in crate::certs::expiring(&in_use, now, loaded.config.certificates.expiry_warning) {
                    logging::to_stderr(format_args!("warning: {soon}: renew it (it is reloaded in place)"));
                }
            }
            if let Err(e) = logging::to_stdout(loaded.config.to_toml()) {
                logging::to_stderr(format_args!("error: cannot write the output: {e}"));
                return exit::IO_ERROR;
            }
            logging::to_stderr(if skip_secrets {
                "configuration is valid (API key sources not read)"
            } else {
                "configuration is valid"
            });
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
        match load_config(args.config.as_deref(), SecretCheck::Read) {
            Ok(Loaded { config, warnings }) => (config, warnings),
            Err(code) => return code,
        }
    };
    let dev_token_lifetime = args.dev_token_lifetime.unwrap_or(DEV_TOKEN_LIFETIME);
    if !args.listen.is_empty() {
        config.server.listen = args.listen.clone();
    }
    if let Some(admin) = &args.admin_listen {
        match crate::admin::AdminConfig::parse_listen(admin) {
            Ok(listen) => config.admin.listen = listen,
            Err(e) => {
                logging::to_stderr(format_args!("error: --admin-listen {e}"));
                return exit::USAGE;
            }
        }
    }
    let traces = match logging::init_with_traces(&config.log, Some(&config.telemetry)) {
        Ok(traces) => traces,
        Err(e) => {
            logging::to_stderr(format_args!("error: {e}"));
            return exit::CONFIG;
        }
    };
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let mut emulator = None;
    if args.dev {
        match daemon::dev_setup(config, dev_token_lifetime).await {
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
    if let Err(code) = apply_proxy_flags(&mut config, &args.proxy) {
        return code;
    }
    // Queued spans are flushed at exit within the shutdown grace (at most 5 s).
    let grace = config.server.shutdown_grace.min(Duration::from_secs(5));
    let daemon = match daemon::Broker::build(config, args.config.clone()).await {
        Ok(d) => d,
        Err(e) => {
            logging::error_to_stderr(&e);
            return e.exit_code();
        }
    };
    if let Some(emulator) = &emulator {
        print_dev_banner(&daemon, &emulator.base_url(), dev_token_lifetime);
    }
    let code = daemon.run(signals).await;
    drop(emulator);
    if let Some(traces) = traces {
        // What is queued goes out within a bounded time.
        traces.shutdown(grace).await;
    }
    code
}

/// `--proxy ENV=ADDR`: each named environment's proxy listeners replaced
/// by those given, then checked as the file's are (a non-loopback plain
/// TCP proxy is refused here too).
fn apply_proxy_flags(config: &mut Config, flags: &[args::ProxyListen]) -> Result<(), u8> {
    if flags.is_empty() {
        return Ok(());
    }
    for flag in flags {
        if let Some(env) = config.environments.get_mut(&flag.environment) {
            env.proxy.listen.clear();
        }
    }
    for flag in flags {
        match config.environments.get_mut(&flag.environment) {
            Some(env) if env.enabled => env.proxy.listen.push(flag.addr.clone()),
            _ => {
                logging::to_stderr(format_args!(
                    "error: --proxy {}={}: the {} environment is not enabled",
                    flag.environment, flag.addr, flag.environment
                ));
                return Err(exit::CONFIG);
            }
        }
    }
    let problems = config.proxy_listener_problems();
    if problems.is_empty() {
        return Ok(());
    }
    for problem in problems {
        logging::to_stderr(format_args!("error: {problem}"));
    }
    Err(exit::CONFIG)
}

fn print_dev_banner(daemon: &RunningBroker, emulator: &str, lifetime: Duration) {
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
    for (env, addr) in &daemon.proxy_addrs {
        let url = match addr {
            ListenAddr::Tcp(a) => format!("http://{a}"),
            unix => unix.to_string(),
        };
        banner.push(format!("  proxy:     {env} {url} (to the emulator's API)"));
    }
    banner.push(String::new());
    banner.push("In another terminal:".to_owned());
    banner.push(format!("  cargo run --release -- get --env sandbox{addr_flag}"));
    banner.push(format!("  curl -H \"Authorization: Bearer $(cargo run -q --release -- get --env sandbox{addr_flag})\" {emulator}/v2/transactions"));
    banner.push(format!("  cargo run --release -- watch --env sandbox{addr_flag}"));
    banner.push(format!("  cargo run --release -- status{addr_flag}"));
    match daemon.proxy_addrs.first() {
        Some((_, ListenAddr::Tcp(a))) => banner.push(format!("  curl http://{a}/v2/transactions")),
        Some((_, ListenAddr::Unix(p))) => banner.push(format!(
            "  curl --unix-socket {} http://localhost/v2/transactions",
            p.display()
        )),
        None => {}
    }
    banner.push("Stop with Ctrl-C.".to_owned());
    // The daemon keeps running when stdout is closed or full.
    let _ = logging::to_stdout(banner.join("\n") + "\n");
}

async fn run_emulator(args: EmulatorArgs) -> anyhow::Result<()> {
    logging::init(&logging::LogConfig {
        format: logging::LogFormat::Text,
        ..Default::default()
    });
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
