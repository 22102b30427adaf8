//! The `flute-token-broker` binary: parses the command line and calls into
//! the library. Exit codes: 0 ok, 1 runtime failure, 2 bad arguments.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use flute_token_broker::duration;
use flute_token_broker::emulator::{Emulator, EmulatorConfig};

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
    /// Run a local stand-in for Flute's token endpoint (for tests and demos).
    Emulator(EmulatorArgs),
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Emulator(args) => run_emulator(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_emulator(args: EmulatorArgs) -> anyhow::Result<()> {
    init_logging();
    let secret = match (args.client_secret, args.client_secret_file) {
        (Some(s), _) => s,
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?
            .trim()
            .to_owned(),
        (None, None) => unreachable!("clap requires one of them"),
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
    println!("emulator listening on http://{addr} (token endpoint http://{addr}/oauth2/token)");
    Emulator::new(config)
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .try_init();
}
