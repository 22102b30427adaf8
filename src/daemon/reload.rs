//! Re-reading the API keys: on SIGHUP (with the configuration file, which
//! is validated first and whose non-credential changes are reported as
//! needing a restart) and when a key file changes (polled). A changed key is
//! offered to its TokenSource, which tries it against the token endpoint
//! before adopting it; a key that failed is not retried by the poller for
//! a minute.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError};
use crate::environment::Environment;
use crate::metrics::{Metrics, ResultLabels};
use crate::token::{KeyChange, TokenSources};

/// What one reload did, per environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    pub replaced: Vec<Environment>,
    pub unchanged: Vec<Environment>,
    pub failed: Vec<(Environment, String)>,
}

/// What one reload did: the one answer for SIGHUP, `systemctl reload` (via
/// `flute-token-broker reload`, which checks the file the same way first)
/// and the tests.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// The new configuration is invalid; nothing changed.
    Rejected(ConfigError),
    /// The configuration was adopted; what became of each environment's key.
    Applied(ReloadReport),
}

impl ReloadOutcome {
    /// The configuration was adopted and no key failed to load or verify.
    pub fn is_ok(&self) -> bool {
        matches!(self, ReloadOutcome::Applied(report) if report.failed.is_empty())
    }

    /// The report of an applied reload.
    pub fn report(&self) -> Option<&ReloadReport> {
        match self {
            ReloadOutcome::Applied(report) => Some(report),
            ReloadOutcome::Rejected(_) => None,
        }
    }

    /// The problems of a rejected reload.
    pub fn rejected(&self) -> Option<&ConfigError> {
        match self {
            ReloadOutcome::Rejected(e) => Some(e),
            ReloadOutcome::Applied(_) => None,
        }
    }

    /// Logs the outcome: ERROR when rejected or a key failed, INFO otherwise.
    pub fn log(&self) {
        let names = |envs: &[Environment]| envs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        match self {
            ReloadOutcome::Rejected(e) => error!(
                problems = %e.problems.join("; "),
                "reload rejected: the new configuration is invalid; nothing changed"
            ),
            ReloadOutcome::Applied(report) if !report.failed.is_empty() => {
                let failed: Vec<String> = report.failed.iter().map(|(env, why)| format!("{env}: {why}")).collect();
                error!(
                    replaced = %names(&report.replaced),
                    failed = %failed.join("; "),
                    "reload finished, but a new API key was not adopted; the current one stays in use"
                )
            }
            ReloadOutcome::Applied(report) => info!(
                replaced = %names(&report.replaced),
                unchanged = %names(&report.unchanged),
                "reload finished"
            ),
        }
    }
}

/// Re-reads API keys (on SIGHUP and when a key file changes) and offers
/// changed keys to the token sources, which try them before adopting them.
pub struct Reloader {
    config_path: Option<PathBuf>,
    state: Mutex<ReloadState>,
    sources: Arc<TokenSources>,
    metrics: Arc<Metrics>,
}

struct ReloadState {
    /// The configuration in force (key sources may change on reload).
    config: Config,
    /// Per environment: the digest of a key that failed, and when.
    failed: Vec<(Environment, [u8; 32], tokio::time::Instant)>,
    /// The last problem the file poller met reading each key, logged once.
    unreadable: Vec<(Environment, String)>,
}

/// A key that failed verification is not retried by the file poller for this long.
const FAILED_KEY_RETRY: Duration = Duration::from_secs(60);

impl Reloader {
    pub(super) fn new(
        config: &Config,
        config_path: Option<PathBuf>,
        sources: Arc<TokenSources>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let state = ReloadState {
            config: config.clone(),
            failed: Vec::new(),
            unreadable: Vec::new(),
        };
        Self {
            config_path,
            state: Mutex::new(state),
            sources,
            metrics,
        }
    }

    pub(super) async fn watches_files(&self) -> bool {
        let state = self.state.lock().await;
        state.config.enabled().any(|(env, _)| {
            state
                .config
                .key_source(env)
                .is_some_and(|k| !k.watched_paths().is_empty())
        })
    }

    /// SIGHUP: a new configuration is loaded and validated first; if it is
    /// invalid nothing changes. Then every key is re-read and offered.
    pub async fn reload(&self) -> ReloadOutcome {
        let mut state = self.state.lock().await;
        if let Some(path) = &self.config_path {
            match Config::load(Some(path)) {
                Ok(loaded) => {
                    for w in &loaded.warnings {
                        warn!("{w}");
                    }
                    let diff = state.config.diff(&loaded.config);
                    if !diff.needs_restart.is_empty() {
                        warn!(keys = %diff.needs_restart.join(", "), "these settings changed; they take effect after a restart");
                    }
                    state.config.credentials = loaded.config.credentials.clone();
                    for (env, e) in state.config.environments.iter_mut() {
                        e.credentials = loaded.config.environments[env].credentials.clone();
                    }
                }
                Err(e) => {
                    self.metrics
                        .credential_reloads
                        .get_or_create(&ResultLabels {
                            result: "config_invalid",
                        })
                        .inc();
                    return ReloadOutcome::Rejected(e);
                }
            }
        }
        state.failed.clear();
        ReloadOutcome::Applied(self.offer_keys(&mut state, true).await)
    }

    /// Checks key files every `interval`; offers a key when it changed.
    pub(super) async fn poll(self: Arc<Self>, interval: Duration, stopping: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stopping.cancelled() => return,
            }
            let mut state = self.state.lock().await;
            self.offer_keys(&mut state, false).await;
            self.metrics.credential_polls.inc();
        }
    }

    async fn offer_keys(&self, state: &mut ReloadState, explicit: bool) -> ReloadReport {
        let mut report = ReloadReport::default();
        for source in self.sources.iter() {
            let env = source.environment();
            let Some(key_source) = state.config.key_source(env) else {
                continue;
            };
            let key = match key_source.load() {
                Ok(key) => {
                    state.unreadable.retain(|(e, _)| *e != env);
                    key
                }
                Err(e) => {
                    let message = e.to_string();
                    let new_problem = !state.unreadable.iter().any(|(en, m)| *en == env && *m == message);
                    if explicit || new_problem {
                        error!(environment = %env, error = %message, "cannot re-read the API key; keeping the current one");
                        self.count("failed");
                        report.failed.push((env, message.clone()));
                    }
                    state.unreadable.retain(|(en, _)| *en != env);
                    state.unreadable.push((env, message));
                    continue;
                }
            };
            let now = tokio::time::Instant::now();
            let digest = key.digest();
            if !explicit
                && state
                    .failed
                    .iter()
                    .any(|(e, d, at)| *e == env && *d == digest && now - *at < FAILED_KEY_RETRY)
            {
                continue;
            }
            match source.replace_key(key).await {
                Ok(KeyChange::Adopted) => {
                    info!(environment = %env, "API key replaced");
                    self.count("replaced");
                    state.failed.retain(|(e, _, _)| *e != env);
                    report.replaced.push(env);
                }
                Ok(KeyChange::Unchanged) => report.unchanged.push(env),
                Err(e) => {
                    self.count("failed");
                    state.failed.retain(|(e, _, _)| *e != env);
                    state.failed.push((env, digest, now));
                    report.failed.push((env, e.to_string()));
                }
            }
        }
        report
    }

    fn count(&self, result: &'static str) {
        self.metrics
            .credential_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}
