//! The command-line definitions (clap): every subcommand, flag and help
//! text. Shell completions and the man page are generated from these.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::client;
use crate::dial::ClientTlsFiles;
use crate::serve::listen::ListenAddr;
use crate::token_text::TokenFormat;
use crate::{Environment, duration};

/// The exit-code table (README and man page).
const EXIT_CODES: &str = "Exit codes:
  0   success
  1   other failure
  2   bad arguments
  69  the broker could not be reached (watch --no-reconnect: the connection ended)
  75  the broker has no valid token right now; for status, an environment shown has none
  77  the broker refused this caller the environment's tokens (PERMISSION_DENIED)
  78  invalid configuration (serve, check-config)
  exec exits with the command's code, 128+N when a signal N ended it";

#[derive(Parser)]
#[command(
    name = "flute-token-broker",
    version,
    about = "Holds a Flute API key and serves fresh access tokens over gRPC",
    after_long_help = EXIT_CODES
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the broker daemon.
    Serve(ServeArgs),
    /// Validate a configuration and print the effective settings (secrets redacted).
    CheckConfig {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Check the file alone: do not read the API key's sources or the
        /// TLS certificate files, nor probe the sinks' directories (for a
        /// pipeline that has the file but not the secrets or the target's
        /// directories).
        #[arg(long)]
        skip_secrets: bool,
    },
    /// Check a configuration file as the broker's reload will, then make the
    /// broker reload it (SIGHUP). An invalid file is reported and the broker
    /// is not signalled (exit 78): the systemd unit's ExecReload=, so that
    /// `systemctl reload` fails for a configuration the broker would reject.
    Reload {
        /// The TOML configuration file the broker was started with.
        #[arg(long, short)]
        config: PathBuf,
        /// The broker's process id (systemd: $MAINPID).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
        pid: i32,
    },
    /// Print a token (bare by default, for `$(...)`).
    Get {
        #[command(flatten)]
        broker: EnvironmentArgs,
        /// Refresh first unless the token stays valid this long.
        #[arg(long, value_parser = duration::parse)]
        min_remaining: Option<Duration>,
        #[arg(long, value_enum, default_value = "token")]
        format: TokenFormat,
    },
    /// Print a line for every token rotation or outage; reconnect (1 s
    /// doubling to 30 s) when the broker goes away.
    Watch {
        #[command(flatten)]
        broker: EnvironmentArgs,
        /// Exit 69 when the connection is lost instead of reconnecting.
        #[arg(long)]
        no_reconnect: bool,
    },
    /// Run a command with FLUTE_ACCESS_TOKEN and FLUTE_TOKEN_EXPIRES_AT (RFC 3339)
    /// in its environment; signals are forwarded and its exit code is ours
    /// (128+N when signal N ended it). For short jobs and cron: the token is
    /// read once, so long-running programs should ask the broker instead.
    Exec {
        #[command(flatten)]
        broker: EnvironmentArgs,
        /// Refresh first unless the token stays valid this long (e.g. the
        /// job's expected run time).
        #[arg(long, value_parser = duration::parse)]
        min_remaining: Option<Duration>,
        /// The command and its arguments (after --).
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "COMMAND"
        )]
        command: Vec<std::ffi::OsString>,
    },
    /// Show the state of every enabled environment.
    /// Exits 0 when every environment shown holds a valid token, 75 when
    /// one does not (usable as a health probe). An environment whose tokens
    /// this caller may not have is listed as RESTRICTED and does not count;
    /// asked for with --env, it exits 77.
    Status {
        #[command(flatten)]
        client: ClientArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only this environment (sandbox or production).
        #[arg(long, ignore_case = true)]
        env: Option<Environment>,
    },
    /// Run a local stand-in for Flute's token endpoint (for tests and demos).
    Emulator(EmulatorArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff); with --dir, write one page per command there.
    Man {
        /// Write flute-token-broker.1 and flute-token-broker-COMMAND.1 here
        /// (created if missing).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Wait DURATION, then exit 0: a Kubernetes preStop hook for images
    /// that have no sleep(1), such as the distroless one we ship.
    Sleep {
        /// How long, e.g. 5s.
        #[arg(value_parser = duration::parse)]
        duration: Duration,
    },
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of audit files, given oldest first (rotated
    /// ones, then the current one): exits 0 when intact, 65 naming the
    /// first record edited, removed, inserted or reordered, 66 when a file
    /// cannot be read.
    Verify {
        /// The audit files, oldest first.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "dev"])))]
pub struct ServeArgs {
    /// The TOML configuration file (environment overrides: FLUTE_BROKER__SECTION__KEY).
    #[arg(long, short, conflicts_with = "dev")]
    pub config: Option<PathBuf>,
    /// Run against a built-in emulator of Flute's token endpoint, with generated credentials.
    #[arg(long)]
    pub dev: bool,
    /// gRPC listen address, HOST:PORT or unix:PATH (repeatable; replaces server.listen).
    #[arg(long)]
    pub listen: Vec<ListenAddr>,
    /// Admin HTTP address (/metrics, /healthz, /readyz); "" disables it.
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// With --dev: the lifetime of the emulator's tokens [default: 900s].
    #[arg(long, value_parser = duration::parse, requires = "dev", conflicts_with = "config")]
    pub dev_token_lifetime: Option<Duration>,
    /// An API proxy listener, ENV=HOST:PORT or ENV=unix:PATH (repeatable;
    /// replaces that environment's proxy.listen). With --dev it forwards
    /// to the emulator's API.
    #[arg(long, value_name = "ENV=ADDR")]
    pub proxy: Vec<ProxyListen>,
}

/// `--proxy ENV=ADDR`: one proxy listener of one environment.
#[derive(Clone, Debug)]
pub struct ProxyListen {
    pub environment: Environment,
    pub addr: ListenAddr,
}

impl std::str::FromStr for ProxyListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (environment, addr) = s
            .split_once('=')
            .ok_or_else(|| format!("expected ENV=ADDR (e.g. sandbox=127.0.0.1:8481), got {s:?}"))?;
        Ok(Self {
            environment: environment.parse()?,
            addr: addr.parse()?,
        })
    }
}

/// The broker and one environment (`get`, `watch`, `exec`).
#[derive(clap::Args)]
pub struct EnvironmentArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// sandbox or production (or prod).
    #[arg(long, short, env = "FLUTE_BROKER_ENV", ignore_case = true)]
    pub env: Environment,
}

#[derive(clap::Args)]
pub struct ClientArgs {
    /// The broker: unix:/path/to.sock or http://host:port.
    #[arg(long, env = "FLUTE_BROKER_ADDR", default_value = client::DEFAULT_ADDR)]
    pub addr: String,
    /// Connect timeout, and the deadline of get and status (a watch stream
    /// has none).
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    pub timeout: Duration,
    /// With https://: the CA certificate (PEM) that signed the broker's
    /// certificate [default: the host's CA store, or the bundled Mozilla
    /// roots where it has none].
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// With https:// and a broker requiring mTLS: this client's certificate (PEM).
    #[arg(long, requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// The private key (PEM) of --cert-file.
    #[arg(long, requires = "cert_file")]
    pub key_file: Option<PathBuf>,
}

impl ClientArgs {
    pub fn target(&self) -> client::Target {
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
#[command(group(clap::ArgGroup::new("accepted_secret").required(true).args(["client_secret", "client_secret_file"])))]
pub struct EmulatorArgs {
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:9470")]
    pub listen: SocketAddr,
    /// The client id the emulator accepts.
    #[arg(long)]
    pub client_id: String,
    /// The client secret the emulator accepts (a test value: it is visible
    /// in `ps`; --client-secret-file is not).
    #[arg(long, conflicts_with = "client_secret_file")]
    pub client_secret: Option<String>,
    /// Read the accepted client secret from this file instead.
    #[arg(long)]
    pub client_secret_file: Option<PathBuf>,
    /// expires_in of issued tokens.
    #[arg(long, default_value = "900s", value_parser = duration::parse)]
    pub token_lifetime: Duration,
    /// Do not issue refresh tokens.
    #[arg(long)]
    pub no_refresh_tokens: bool,
}
