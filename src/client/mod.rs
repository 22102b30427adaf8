//! The client commands (`get`, `watch`, `status`): a thin gRPC client of
//! the broker, reachable over TCP or a Unix socket, with exit codes scripts
//! can branch on.

use std::io::Write;
use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

use crate::dial::ConnectError;
pub use crate::dial::Target;
use crate::environment::Environment;
use crate::exit;
use crate::token_text::{self, TokenFormat, ts};
use crate::wire::pb::token_broker_client::TokenBrokerClient;
use crate::wire::pb::{self, watch_token_response::Update};

/// The address `serve --dev` listens on.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the broker at {addr}: {message}")]
    Unreachable { addr: String, message: String },
    /// The broker was reached, then ended the call or stream (shutting
    /// down, restarted, killed).
    #[error("the broker at {addr} ended the connection: {message}")]
    Disconnected { addr: String, message: String },
    #[error("{0}")]
    NoToken(String),
    #[error("{0}")]
    NotAllowed(String),
    #[error("{0}")]
    Usage(String),
    #[error("broker answered {code:?}: {message}")]
    Broker { code: Code, message: String },
    #[error("cannot write the output: {0}")]
    Output(#[source] std::io::Error),
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Unreachable { .. } | ClientError::Disconnected { .. } => exit::UNREACHABLE,
            ClientError::NoToken(_) => exit::NO_TOKEN,
            ClientError::NotAllowed(_) => exit::NOT_ALLOWED,
            ClientError::Usage(_) => exit::USAGE,
            ClientError::Broker { .. } => exit::FAILURE,
            ClientError::Output(_) => exit::IO_ERROR,
        }
    }

    /// The broker went away (unreachable, shutting down, or the connection
    /// broke mid-stream): worth reconnecting, unlike a refusal.
    pub fn is_connection_loss(&self) -> bool {
        matches!(
            self,
            ClientError::Unreachable { .. }
                | ClientError::Disconnected { .. }
                | ClientError::Broker {
                    code: Code::Unknown | Code::Cancelled | Code::Internal,
                    ..
                }
        )
    }

    /// Classifies a Status by the broker's ErrorInfo reason; a Status
    /// without one (from the transport, or another server) by its code.
    pub fn from_status(addr: &str, status: tonic::Status) -> Self {
        use crate::broker::reason;
        use crate::rpc_status::ERROR_DOMAIN;
        use tonic_types::StatusExt;
        let message = status.message().to_owned();
        let details = status.get_error_details();
        let broker_reason = details
            .error_info()
            .filter(|info| info.domain == ERROR_DOMAIN)
            .map(|info| info.reason.as_str());
        match (broker_reason, status.code()) {
            (Some(reason::NO_VALID_TOKEN), _) => ClientError::NoToken(message),
            (Some(reason::CALLER_NOT_ALLOWED), _) => ClientError::NotAllowed(message),
            (Some(reason::SHUTTING_DOWN), _) => ClientError::Disconnected {
                addr: addr.to_owned(),
                message,
            },
            (None, Code::Unavailable) => ClientError::Unreachable {
                addr: addr.to_owned(),
                message,
            },
            (
                Some(
                    reason::ENVIRONMENT_UNSPECIFIED
                    | reason::ENVIRONMENT_NOT_ENABLED
                    | reason::INVALID_FIELD
                    | reason::MIN_REMAINING_TOO_LONG,
                ),
                _,
            ) => ClientError::Usage(message),
            (_, code) => ClientError::Broker { code, message },
        }
    }
}

/// Connects to `unix:/path` or `http://host:port` (`host:port` works too).
pub async fn connect(addr: &str, timeout: Duration) -> Result<TokenBrokerClient<Channel>, ClientError> {
    connect_to(&Target::new(addr, timeout)).await
}

pub async fn connect_to(target: &Target) -> Result<TokenBrokerClient<Channel>, ClientError> {
    Ok(TokenBrokerClient::new(channel_to(target).await?))
}

/// A gRPC channel to the broker (for the health or reflection services too).
pub async fn channel(addr: &str, timeout: Duration) -> Result<Channel, ClientError> {
    channel_to(&Target::new(addr, timeout)).await
}

/// A channel to `target`; an unreachable broker's error says what to check.
pub async fn channel_to(target: &Target) -> Result<Channel, ClientError> {
    crate::dial::channel(target).await.map_err(ClientError::from)
}

impl From<ConnectError> for ClientError {
    fn from(error: ConnectError) -> Self {
        match error {
            ConnectError::Usage(message) => ClientError::Usage(message),
            ConnectError::Unreachable { addr, kind, detail } => {
                let hint = match kind {
                    Some(std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound) => {
                        "; is it running? set --addr or FLUTE_BROKER_ADDR"
                    }
                    Some(std::io::ErrorKind::PermissionDenied) => "; is this user in the socket's group?",
                    _ => "",
                };
                ClientError::Unreachable {
                    addr,
                    message: format!("{detail}{hint}"),
                }
            }
        }
    }
}

fn pb_env(env: Environment) -> i32 {
    pb::Environment::from(env) as i32
}

/// A token from the broker (refreshed first if it would not stay valid
/// `min_remaining`).
pub async fn fetch(
    target: &Target,
    env: Environment,
    min_remaining: Option<Duration>,
) -> Result<pb::Token, ClientError> {
    let (addr, timeout) = (target.addr.as_str(), target.timeout);
    let mut client = connect_to(target).await?;
    let mut request = tonic::Request::new(pb::GetTokenRequest {
        environment: pb_env(env),
        min_remaining: min_remaining.map(crate::wire::pb_duration),
    });
    request.set_timeout(timeout);
    Ok(client
        .get_token(request)
        .await
        .map_err(|s| ClientError::from_status(addr, s))?
        .into_inner()
        .token
        .unwrap_or_default())
}

/// A token printed the way `format` says.
pub async fn get(
    target: &Target,
    env: Environment,
    min_remaining: Option<Duration>,
    format: TokenFormat,
) -> Result<String, ClientError> {
    Ok(token_text::render(
        &fetch(target, env, min_remaining).await?,
        env,
        format,
    ))
}

/// `watch`'s first wait before reconnecting; it doubles up to the max.
pub const RECONNECT_INITIAL: Duration = Duration::from_secs(1);
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);

type UpdateStream = tonic::Streaming<pb::WatchTokenResponse>;

/// Prints a line per update. When the connection to the broker is lost
/// (killed, restarted, shut down) it says so on stderr and, with
/// `reconnect`, tries again (at once when the broker ended the stream
/// because it stops or restarts, else after 1 s), then after 1 s, 2 s,
/// 4 s … 30 s, says when it is back and goes on from the broker's current state; without `reconnect`
/// it returns [`ClientError::Unreachable`]. The first connection is not
/// retried: a wrong address fails at once.
pub async fn watch(
    target: &Target,
    env: Environment,
    reconnect: bool,
    out: &mut impl Write,
) -> Result<(), ClientError> {
    let mut stream = open_watch(target, env).await?;
    loop {
        // A broker that stops or restarts says so: its successor (or
        // another replica) is there already, so the first retry is at once.
        let (lost, at_once) = match print_updates(&mut stream, env, target, out).await {
            Ok(()) => ("the stream ended".to_owned(), false),
            Err(ClientError::Disconnected { message, .. }) => (message, true),
            Err(ClientError::Unreachable { message, .. }) => (message, false),
            Err(e) if e.is_connection_loss() => (e.to_string(), false),
            Err(e) => return Err(e),
        };
        if !reconnect {
            return Err(ClientError::Disconnected {
                addr: target.addr.clone(),
                message: lost,
            });
        }
        let when = if at_once { "at once" } else { "with backoff" };
        crate::logging::to_stderr(format_args!(
            "connection to the broker lost ({lost}); reconnecting {when}"
        ));
        let mut delay = if at_once { Duration::ZERO } else { RECONNECT_INITIAL };
        stream = loop {
            tokio::time::sleep(delay).await;
            match open_watch(target, env).await {
                Ok(stream) => break stream,
                Err(e) if e.is_connection_loss() => delay = (delay * 2).clamp(RECONNECT_INITIAL, RECONNECT_MAX),
                Err(e) => return Err(e),
            }
        };
        crate::logging::to_stderr(format_args!("reconnected to the broker at {}", target.addr));
    }
}

async fn open_watch(target: &Target, env: Environment) -> Result<UpdateStream, ClientError> {
    let mut client = connect_to(target).await?;
    Ok(client
        .watch_token(pb::WatchTokenRequest {
            environment: pb_env(env),
        })
        .await
        .map_err(|s| ClientError::from_status(&target.addr, s))?
        .into_inner())
}

/// Prints the stream's updates until it ends (Ok) or fails.
async fn print_updates(
    stream: &mut UpdateStream,
    env: Environment,
    target: &Target,
    out: &mut impl Write,
) -> Result<(), ClientError> {
    while let Some(item) = stream.next().await {
        let update = item.map_err(|s| ClientError::from_status(&target.addr, s))?;
        let line = match update.update {
            Some(Update::Token(t)) => format!("{env} token {} expires_at={}", t.token_id, ts(&t.expires_at)),
            Some(Update::Outage(o)) => format!(
                "{env} outage next_attempt_at={} reason={:?}",
                ts(&o.next_attempt_at),
                o.reason
            ),
            None => continue,
        };
        writeln!(out, "{line}")
            .and_then(|_| out.flush())
            .map_err(ClientError::Output)?;
    }
    Ok(())
}

/// A table (or JSON) of every enabled environment's state.
/// What `status` shows, and which environments hold no valid token.
pub struct StatusReport {
    pub text: String,
    /// Environments (of those shown) in no state that holds a valid token.
    pub without_token: Vec<String>,
}

/// The broker's status as a table or JSON, for every environment or `only` one.
pub async fn status(target: &Target, json: bool, only: Option<Environment>) -> Result<StatusReport, ClientError> {
    let (addr, timeout) = (target.addr.as_str(), target.timeout);
    let mut client = connect_to(target).await?;
    let mut request = tonic::Request::new(pb::GetStatusRequest {});
    request.set_timeout(timeout);
    let status = client
        .get_status(request)
        .await
        .map_err(|s| ClientError::from_status(addr, s))?
        .into_inner();
    let mut status = status;
    if let Some(env) = only {
        let wanted = pb_env(env);
        status.environments.retain(|e| e.environment == wanted);
    }
    let restricted = |e: &pb::EnvironmentStatus| e.state == pb::State::Restricted as i32;
    if let (Some(env), Some(_)) = (only, status.environments.iter().find(|e| restricted(e))) {
        return Err(ClientError::NotAllowed(format!(
            "the broker does not show {env} to this caller: it is not allowed that environment's tokens"
        )));
    }
    // A restricted environment's state is not this caller's to judge.
    let without_token = status
        .environments
        .iter()
        .filter(|e| {
            !restricted(e) && !matches!(pb::State::try_from(e.state), Ok(pb::State::Ready | pb::State::Degraded))
        })
        .map(|e| {
            pb::Environment::try_from(e.environment)
                .map(|e| e.as_str_name().trim_start_matches("ENVIRONMENT_").to_lowercase())
                .unwrap_or_default()
        })
        .collect();
    let env_name = |v: i32| {
        pb::Environment::try_from(v)
            .map(|e| e.as_str_name().trim_start_matches("ENVIRONMENT_").to_lowercase())
            .unwrap_or_default()
    };
    let state_name = |v: i32| {
        pb::State::try_from(v)
            .map(|s| s.as_str_name().trim_start_matches("STATE_").to_owned())
            .unwrap_or_default()
    };
    if json {
        let items: Vec<_> = status
            .environments
            .iter()
            .map(|e| {
                let c = e.counters.unwrap_or_default();
                serde_json::json!({
                    "environment": env_name(e.environment), "state": state_name(e.state), "token_id": e.token_id,
                    "expires_at": ts(&e.expires_at), "next_attempt_at": ts(&e.next_attempt_at),
                    "last_error": e.last_error, "consecutive_failures": e.consecutive_failures,
                    "token_endpoint_calls": c.token_endpoint_calls, "rotations": c.rotations,
                    "refreshes_succeeded": c.refreshes_succeeded, "refreshes_failed": c.refreshes_failed,
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&items).unwrap_or_default() + "\n";
        return Ok(StatusReport { text, without_token });
    }
    let mut out = format!(
        "{:<12} {:<12} {:<13} {:<21} {:<21} {:>5} {:>6}  {}\n",
        "ENVIRONMENT", "STATE", "TOKEN_ID", "EXPIRES_AT", "NEXT_ATTEMPT_AT", "CALLS", "FAILS", "LAST_ERROR"
    );
    for e in &status.environments {
        let c = e.counters.unwrap_or_default();
        let short = |t: &Option<prost_types::Timestamp>| match t {
            Some(_) => ts(t).chars().take(19).collect::<String>() + "Z",
            None => "-".into(),
        };
        out.push_str(&format!(
            "{:<12} {:<12} {:<13} {:<21} {:<21} {:>5} {:>6}  {}\n",
            env_name(e.environment),
            state_name(e.state),
            if e.token_id.is_empty() { "-" } else { &e.token_id },
            short(&e.expires_at),
            short(&e.next_attempt_at),
            c.token_endpoint_calls,
            e.consecutive_failures,
            if e.last_error.is_empty() { "-" } else { &e.last_error },
        ));
    }
    let now = std::time::SystemTime::now();
    for cert in &status.certificates {
        let Some(not_after) = cert.not_after.and_then(|t| std::time::SystemTime::try_from(t).ok()) else {
            continue;
        };
        let info = crate::certs::CertificateInfo {
            serial: cert.serial.clone(),
            subject: cert.subject.clone(),
            not_before: std::time::UNIX_EPOCH,
            not_after,
        };
        out.push_str(&format!(
            "certificate: {} ({}): {}\n",
            cert.role,
            cert.subject,
            info.describe(now)
        ));
    }
    Ok(StatusReport {
        text: out,
        without_token,
    })
}
