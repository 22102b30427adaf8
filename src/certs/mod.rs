//! TLS material that rotates in place: the server certificate and client
//! CA of TLS listeners ([`server`]), an agent's client certificate and the
//! CA of its hubs, and a PEM file of token-endpoint roots. Each is read at
//! start, then again whenever its files change: noticed by watching each
//! file's directory (which also sees the `..data` symlink swap of
//! Kubernetes Secret and projected volumes), by a periodic digest check
//! (`[certificates] poll_interval`), and on every reload (SIGHUP).
//!
//! New material is checked whole before any of it is used ([`material`]);
//! material that fails (a half-written pair, a key of another certificate,
//! an expired or not yet valid certificate, an unreadable file) leaves the
//! last good material in use, logs an ERROR naming the file and the
//! reason, and counts a failure. The next good write is taken. Handshakes
//! read the current material through an atomic swap, so established
//! connections and streams are never cut.

pub mod client;
pub mod material;
pub mod roots;
pub mod server;
mod watch;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{error, info};

pub use material::{CertificateInfo, MaterialError};

use crate::metrics::{Metrics, TlsReloadLabels, TlsRoleLabels};

/// `[certificates]`: how often the files of rotating TLS material are
/// checked besides watching their directories.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CertificatesConfig {
    /// Content digest check of every file (0: only directory watching and
    /// reloads).
    #[serde(with = "crate::duration::serde")]
    pub poll_interval: Duration,
    /// `check-config` warns when a certificate in use expires within this.
    #[serde(with = "crate::duration::serde")]
    pub expiry_warning: Duration,
}

impl Default for CertificatesConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(60),
            expiry_warning: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl CertificatesConfig {
    /// Problems with the values, each starting with its key.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.poll_interval.is_zero()
            && let Some(p) =
                crate::duration::out_of_range(self.poll_interval, Duration::from_secs(1), Duration::from_secs(86_400))
        {
            out.push(format!("poll_interval: {p} (or 0 to rely on watching and reloads)"));
        }
        if let Some(p) =
            crate::duration::out_of_range(self.expiry_warning, Duration::ZERO, Duration::from_secs(365 * 86_400))
        {
            out.push(format!("expiry_warning: {p}"));
        }
        out
    }
}

/// A certificate in use, by role (`server`, `client_ca`, `upstream_client`,
/// `upstream_ca`, `token_endpoint_roots`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InUse {
    pub role: &'static str,
    pub certificate: CertificateInfo,
}

/// Material read from files that can be read again.
pub trait Reloadable: Send + Sync {
    /// For logs and the `material` label of `tls_reloads_total`.
    fn name(&self) -> &'static str;
    /// Every file it is read from.
    fn files(&self) -> Vec<PathBuf>;
    /// Reads and checks every file; swaps all of it in only if all is good.
    fn reload(&self) -> Result<Vec<InUse>, MaterialError>;
    /// What is in use now.
    fn in_use(&self) -> Vec<InUse>;
}

struct Watched {
    material: Arc<dyn Reloadable>,
    /// The digest of the files' contents last looked at, and whether they
    /// were refused: the same bad content is reported once per change, and
    /// tried again only by the periodic check (a certificate not valid yet
    /// becomes good with time alone).
    seen: Mutex<([u8; 32], bool)>,
}

/// Every piece of rotating material of this broker, and what checks it.
pub struct Rotation {
    watched: Vec<Watched>,
    metrics: Arc<Metrics>,
}

impl Rotation {
    /// Starts tracking `materials` (already loaded once): their digests and
    /// the expiry of each certificate in use.
    pub fn new(materials: Vec<Arc<dyn Reloadable>>, metrics: Arc<Metrics>) -> Arc<Self> {
        let rotation = Arc::new(Self {
            watched: materials
                .into_iter()
                .map(|material| Watched {
                    seen: Mutex::new((digest(&material.files()), false)),
                    material,
                })
                .collect(),
            metrics,
        });
        for w in &rotation.watched {
            rotation.publish(&w.material.in_use());
        }
        rotation
    }

    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }

    /// Every certificate in use.
    pub fn in_use(&self) -> Vec<InUse> {
        self.watched.iter().flat_map(|w| w.material.in_use()).collect()
    }

    /// Every file read, for the watcher.
    fn files(&self) -> Vec<PathBuf> {
        self.watched.iter().flat_map(|w| w.material.files()).collect()
    }

    /// Reloads each material whose files changed since last looked at;
    /// `why` names what noticed (`watch`, `poll`, `reload`).
    pub fn check(&self, why: &'static str) {
        for w in &self.watched {
            let now = digest(&w.material.files());
            {
                let seen = w.seen.lock().unwrap_or_else(|p| p.into_inner());
                let (last, refused) = *seen;
                if last == now && !(refused && why == "poll") {
                    continue;
                }
            }
            let material = w.material.name();
            let outcome = w.material.reload();
            *w.seen.lock().unwrap_or_else(|p| p.into_inner()) = (now, outcome.is_err());
            match outcome {
                Ok(in_use) => {
                    for cert in &in_use {
                        info!(material, role = cert.role, serial = %cert.certificate.serial,
                              not_after = %humantime::format_rfc3339_seconds(cert.certificate.not_after),
                              noticed_by = why, "TLS material reloaded; new handshakes use it");
                    }
                    self.count(material, "ok");
                    self.publish(&in_use);
                }
                Err(e) => {
                    error!(material, file = %e.path.display(), reason = %e.reason, noticed_by = why,
                           "TLS material not taken; the last good material stays in use");
                    self.count(material, "failed");
                }
            }
        }
    }

    fn count(&self, material: &'static str, result: &'static str) {
        self.metrics
            .tls_reloads
            .get_or_create(&TlsReloadLabels { material, result })
            .inc();
    }

    fn publish(&self, in_use: &[InUse]) {
        for cert in in_use {
            self.metrics
                .tls_certificate_expiry
                .get_or_create(&TlsRoleLabels { role: cert.role })
                .set(cert.certificate.expires_at_unix());
        }
    }

    /// Watches the files' directories (from before this returns) and
    /// checks every `poll` (zero: never) until `stopping`.
    pub fn spawn_watch(
        self: &Arc<Self>,
        poll: Duration,
        stopping: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(watch::start(self.clone(), poll, stopping))
    }
}

/// SHA-256 over each file's path and content (or the error reading it).
fn digest(files: &[PathBuf]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for path in files {
        hash.update(path.as_os_str().as_encoded_bytes());
        match std::fs::read(path) {
            Ok(content) => {
                hash.update([1]);
                hash.update(&content);
            }
            Err(e) => {
                hash.update([0]);
                hash.update(e.kind().to_string().as_bytes());
            }
        }
    }
    hash.finalize().into()
}

/// The certificates of `in_use` expiring within `within` of `now`, one
/// line each (for `check-config`'s warnings).
pub fn expiring(in_use: &[InUse], now: SystemTime, within: Duration) -> Vec<String> {
    in_use
        .iter()
        .filter(|c| c.certificate.not_after <= now + within)
        .map(|c| {
            format!(
                "the {} certificate ({}) {}",
                c.role,
                c.certificate.subject,
                c.certificate.describe(now)
            )
        })
        .collect()
}
