//! Tokens carried across a restart in systemd's file descriptor store
//! (`FDSTORE=1`, `FileDescriptorStoreMax=` in the unit), never on disk.
//!
//! At shutdown the broker writes its servable access tokens into a sealed
//! memfd and hands it to systemd (`FDNAME=tokens`); systemd passes it to the
//! next process of the service (`LISTEN_FDNAMES`), which serves the tokens
//! at once and refreshes them on their schedule, so a restart during a
//! token-endpoint outage refuses nothing either. Measured on systemd 252: the
//! store survives `systemctl restart` and a crash restart, and is emptied by
//! `systemctl stop`. Refresh tokens are not carried (the next process uses
//! client credentials).
//!
//! Lifetimes are anchored on `CLOCK_BOOTTIME` (monotonic, counts suspend,
//! shared by both processes of one boot), never on the wall clock; a token
//! whose serve window has passed is dropped on load.

use std::io::Read;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::environment::Environment;
use crate::token::{RefreshPolicy, Token, TokenSources};

use crate::serve::passed_fds::{PassedFile, TOKEN_STORE_NAME as FD_NAME};

/// Largest store read back (two tokens are a few kilobytes).
const MAX_BYTES: u64 = 256 * 1024;

#[derive(Serialize, Deserialize)]
struct Stored {
    environment: Environment,
    access_token: String,
    token_type: String,
    /// `CLOCK_BOOTTIME` when the request that produced it was sent.
    issued_boottime_ns: u128,
    issued_wall_unix_ms: u128,
    lifetime_ms: u64,
}

fn boottime() -> Duration {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(now) => Duration::new(now.tv_sec() as u64, now.tv_nsec() as u32),
        // Linux always has CLOCK_BOOTTIME; without it no stored age is trusted.
        Err(_) => Duration::ZERO,
    }
}

/// Hands the servable tokens to systemd for the next process, when systemd
/// runs the broker (`$NOTIFY_SOCKET`). Failures are logged, never fatal.
pub fn save(sources: &TokenSources) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let (now_boot, now) = (boottime(), tokio::time::Instant::now());
    let stored: Vec<Stored> = sources
        .iter()
        .filter_map(|source| source.current())
        .map(|token| {
            let age = now.saturating_duration_since(token.issued_at);
            Stored {
                environment: token.environment,
                access_token: token.access_token().to_owned(),
                token_type: token.token_type.clone(),
                issued_boottime_ns: now_boot.saturating_sub(age).as_nanos(),
                issued_wall_unix_ms: token
                    .issued_at_wall
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis(),
                lifetime_ms: token.lifetime.as_millis() as u64,
            }
        })
        .collect();
    if stored.is_empty() {
        return;
    }
    match store(&stored) {
        Ok(()) => info!(tokens = stored.len(), "tokens handed to systemd for the next start"),
        Err(e) => warn!(error = %e, "cannot hand the tokens to systemd; the next start fetches new ones"),
    }
}

fn store(stored: &[Stored]) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let body = serde_json::to_vec(stored).map_err(std::io::Error::other)?;
    let memfd = memfd_create(
        c"flute-token-broker-tokens",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(memfd);
    std::io::Write::write_all(&mut file, &body)?;
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    use sd_notify::NotifyState;
    // An older store (from a start that found none to restore) goes first.
    sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(FD_NAME)])?;
    sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(FD_NAME)], &[file.as_fd()])
}

/// The tokens the previous process stored, still servable now, by
/// environment; the store is emptied so that a later start never sees them.
pub fn restore(passed: Option<PassedFile>, policy: &RefreshPolicy) -> Vec<(Environment, Arc<Token>)> {
    let Some(passed) = passed else {
        return Vec::new();
    };
    let read = passed.open().and_then(|file| {
        let mut body = Vec::new();
        file.take(MAX_BYTES).read_to_end(&mut body)?;
        Ok(body)
    });
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::FdStoreRemove,
        sd_notify::NotifyState::FdName(FD_NAME),
    ]);
    let stored: Vec<Stored> = match read.map(|body| serde_json::from_slice(&body)) {
        Ok(Ok(stored)) => stored,
        Ok(Err(e)) => {
            warn!(error = %e, "the tokens systemd kept are unreadable; fetching new ones");
            return Vec::new();
        }
        Err(e) => {
            warn!(error = %e, "cannot read the tokens systemd kept; fetching new ones");
            return Vec::new();
        }
    };
    let (now_boot, now) = (boottime(), tokio::time::Instant::now());
    stored
        .into_iter()
        .filter_map(|s| {
            let age = now_boot.checked_sub(Duration::from_nanos(s.issued_boottime_ns.try_into().ok()?))?;
            let issued_at = now.checked_sub(age)?;
            let issued_wall = SystemTime::UNIX_EPOCH + Duration::from_millis(s.issued_wall_unix_ms.try_into().ok()?);
            let token = Token::new(
                SecretString::from(s.access_token),
                s.token_type,
                s.environment,
                issued_at,
                issued_wall,
                Duration::from_millis(s.lifetime_ms),
                policy.serve_margin,
            );
            if !token.is_servable(now) {
                return None;
            }
            info!(environment = %token.environment, token_id = %token.token_id,
                  remaining_s = token.remaining(now).as_secs(), "serving the token kept across the restart");
            Some((token.environment, Arc::new(token)))
        })
        .collect()
}

/// A stored token's secret never reaches Debug output.
impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored")
            .field("environment", &self.environment)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_token_shows_no_secret() {
        let stored = Stored {
            environment: Environment::Sandbox,
            access_token: "secret-access-token".into(),
            token_type: "Bearer".into(),
            issued_boottime_ns: 1,
            issued_wall_unix_ms: 1,
            lifetime_ms: 900_000,
        };
        assert!(!format!("{stored:?}").contains("secret-access-token"));
    }

    /// The sealed memfd is built the same way under systemd or not (outside
    /// it, `NOTIFY_SOCKET` is unset and the hand-over is a no-op).
    #[test]
    fn the_store_is_a_sealed_memfd_outside_systemd_too() {
        assert!(std::env::var_os("NOTIFY_SOCKET").is_none());
        store(&[]).expect("memfd_create, write and seals");
        assert!(boottime() > Duration::ZERO);
    }
}
