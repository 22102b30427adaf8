//! systemd notifications (Type=notify): READY, STATUS, RELOADING, STOPPING
//! and WATCHDOG. Every call is a no-op when `$NOTIFY_SOCKET` is unset
//! (sd-notify checks it).

use std::time::Duration;

use sd_notify::NotifyState;
use serde::{Deserialize, Serialize};

/// `[systemd]`: how the daemon reports readiness.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SystemdConfig {
    /// READY=1 is sent at the latest after this, token or not.
    #[serde(with = "crate::duration::serde")]
    pub ready_timeout: Duration,
}

impl Default for SystemdConfig {
    fn default() -> Self {
        Self {
            ready_timeout: Duration::from_secs(30),
        }
    }
}

impl SystemdConfig {
    /// Problems with the values, each starting with its key.
    pub fn problems(&self) -> Vec<String> {
        crate::duration::out_of_range(self.ready_timeout, Duration::ZERO, Duration::from_secs(3600))
            .map(|p| format!("ready_timeout: {p}"))
            .into_iter()
            .collect()
    }
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// The interval at which WATCHDOG=1 must be sent, if the watchdog is on
/// (half of `WatchdogSec=`, as systemd recommends).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}
