//! Token file sinks (`[[sinks]]`): for programs that can only read a file,
//! the pattern of Vault Agent's sinks and the SPIFFE helper. Each sink
//! follows one environment's token source and keeps one file:
//!
//! - written when the broker first holds a token and on every rotation,
//!   atomically (a temporary file in the same directory, fsync, rename,
//!   fsync of the directory), so a reader sees the old file or the new one;
//! - removed when the token leaves its serve window with no replacement (an
//!   outage), so a reader never finds an expired token; written again on
//!   recovery;
//! - removed when the broker starts (a file left by an earlier run may hold
//!   an expired token) and when it stops.
//!
//! Logs name the path and the token_id, never the token.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::Environment;
use crate::accounts::resolve_group;
use crate::token::{Snapshot, TokenSources};
use crate::token_text::{self, TokenFormat};
use crate::wire::pb;

/// A failed write is tried again after this long (or at the next rotation).
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// One `[[sinks]]` table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Whose token the file holds.
    pub environment: Environment,
    /// An absolute path in an existing directory the broker may write.
    pub path: PathBuf,
    /// `token` (the bare token, no newline), `json` (with expires_at),
    /// `env` (FLUTE_ACCESS_TOKEN=… and FLUTE_TOKEN_EXPIRES_AT=… lines) or
    /// `header`.
    #[serde(default)]
    pub format: TokenFormat,
    /// Permission bits of the file.
    #[serde(default = "default_mode", with = "crate::settings::octal_mode")]
    pub mode: u32,
    /// Group (name or numeric id) of the file; `""`: the process's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
}

fn default_mode() -> u32 {
    0o600
}

/// Problems of every sink (key paths `sinks[N].…`) and warnings, given the
/// enabled environments. With `probe_directories` it also checks the
/// directories as they are now: each must exist and take a new file (one is
/// created and removed to prove it).
pub fn problems(sinks: &[SinkConfig], enabled: &[Environment], probe_directories: bool) -> (Vec<String>, Vec<String>) {
    let (mut problems, mut warnings) = (Vec::new(), Vec::new());
    for (i, sink) in sinks.iter().enumerate() {
        let key = format!("sinks[{i}]");
        if !enabled.contains(&sink.environment) {
            problems.push(format!("{key}.environment: {} is not enabled", sink.environment));
        }
        if let Some(first) = sinks[..i].iter().position(|other| other.path == sink.path) {
            problems.push(format!(
                "{key}.path: {} is also sinks[{first}]'s path",
                sink.path.display()
            ));
        }
        if let Err(p) = check_path(&sink.path, probe_directories) {
            problems.push(format!("{key}.path: {p}"));
        }
        if !sink.group.is_empty()
            && let Err(p) = resolve_group(&sink.group)
        {
            problems.push(format!("{key}.group: {p}"));
        }
        if sink.mode & 0o007 != 0 {
            warnings.push(format!(
                "{key}.mode: {:04o} lets every local user read the token; use 0600, or 0640 with a group",
                sink.mode
            ));
        }
    }
    (problems, warnings)
}

fn check_path(path: &Path, probe_directory: bool) -> Result<(), String> {
    let shown = path.display();
    if !path.is_absolute() {
        return Err(format!("{shown}: must be an absolute path"));
    }
    let (Some(dir), Some(_)) = (path.parent(), path.file_name()) else {
        return Err(format!("{shown}: names no file"));
    };
    if !probe_directory {
        return Ok(());
    }
    if path.is_dir() {
        return Err(format!("{shown} is a directory"));
    }
    if !dir.is_dir() {
        return Err(format!("directory {} does not exist", dir.display()));
    }
    let probe = temporary_path(path, "check");
    match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&probe) {
        Ok(_) => {
            let _ = fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!("cannot create files in {}: {e}", dir.display())),
    }
}

/// `.NAME.WHAT-PID` beside `path`: hidden, and unique to this process.
fn temporary_path(path: &Path, what: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{what}-{}", std::process::id()))
}

/// A sink ready to write: its group resolved.
struct Sink {
    config: SinkConfig,
    gid: Option<u32>,
}

impl Sink {
    fn write(&self, token: &pb::Token) -> io::Result<()> {
        let path = &self.config.path;
        let temporary = temporary_path(path, "tmp");
        let _ = fs::remove_file(&temporary);
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temporary)?;
            if let Some(gid) = self.gid {
                std::os::unix::fs::fchown(&file, None, Some(gid))?;
            }
            // Explicitly: the umask would narrow the mode given to open().
            file.set_permissions(Permissions::from_mode(self.config.mode))?;
            file.write_all(token_text::render(token, self.config.environment, self.config.format).as_bytes())?;
            file.sync_all()?;
            fs::rename(&temporary, path)?;
            File::open(path.parent().unwrap_or(Path::new("/")))?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temporary);
        }
        result
    }

    fn remove(&self) -> io::Result<bool> {
        match fs::remove_file(&self.config.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Starts a task per sink; each removes its file and ends when `stopping`
/// is cancelled.
pub fn spawn(sinks: &[SinkConfig], sources: &TokenSources, stopping: &CancellationToken) -> Vec<JoinHandle<()>> {
    sinks
        .iter()
        .filter_map(|config| {
            let source = sources.get(config.environment)?;
            let gid = match config.group.as_str() {
                "" => None,
                group => match resolve_group(group) {
                    Ok(gid) => Some(gid),
                    Err(e) => {
                        error!(path = %config.path.display(), error = %e, "token file sink disabled");
                        return None;
                    }
                },
            };
            let sink = Sink {
                config: config.clone(),
                gid,
            };
            Some(tokio::spawn(follow(sink, source.subscribe(), stopping.clone())))
        })
        .collect()
}

/// What the file holds: the token_id and expiry written (a re-issued token
/// keeps its id but gets a new expiry), or nothing.
type Written = Option<(String, SystemTime)>;

async fn follow(sink: Sink, mut snapshots: watch::Receiver<Snapshot>, stopping: CancellationToken) {
    let path = sink.config.path.display().to_string();
    match sink.remove() {
        Ok(true) => info!(%path, "token file from an earlier run removed"),
        Ok(false) => {}
        Err(e) => warn!(%path, error = %e, "cannot remove the token file"),
    }
    let mut written: Written = None;
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        let mut wake = None;
        match snapshot.servable(Instant::now()) {
            Some(token) => {
                let key = (token.token_id.clone(), token.expires_at_wall);
                if written.as_ref() != Some(&key) {
                    match sink.write(&token.as_ref().into()) {
                        Ok(()) => {
                            info!(%path, token_id = %token.token_id, "token file written");
                            written = Some(key);
                        }
                        Err(e) => {
                            error!(%path, token_id = %token.token_id, error = %e, "cannot write the token file");
                            wake = Some(Instant::now() + RETRY_AFTER);
                        }
                    }
                }
                let leaves = token.serve_until;
                wake = Some(wake.map_or(leaves, |w| w.min(leaves)));
            }
            None => {
                if written.take().is_some() {
                    match sink.remove() {
                        Ok(_) => warn!(%path, "token file removed: no valid token until the endpoint answers again"),
                        Err(e) => error!(%path, error = %e, "cannot remove the token file"),
                    }
                }
            }
        }
        let ended = tokio::select! {
            _ = stopping.cancelled() => true,
            changed = snapshots.changed() => changed.is_err(),
            _ = sleep_until(wake) => false,
        };
        if ended {
            break;
        }
    }
    match sink.remove() {
        Ok(true) => info!(%path, "token file removed: the broker is stopping"),
        Ok(false) => {}
        Err(e) => error!(%path, error = %e, "cannot remove the token file"),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
