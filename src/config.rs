//! The configuration: one serde schema composed of the settings types the
//! components own, loaded from a TOML file plus `FLUTE_BROKER__SECTION__KEY`
//! environment overrides (the config crate), then validated.
//!
//! Every problem is reported at once, each with its key path: a value that
//! does not deserialize (or an unknown key) is recorded and removed, and
//! deserialization runs again until the rest is understood; then
//! [`Config::validate`] adds every cross-field problem of what remains.
//! `check-config` prints the same types through `Serialize`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::accounts;
use crate::admin::AdminConfig;
use crate::credentials::{CredentialTable, DEFAULT_POLL_INTERVAL, KeySource};
use crate::environment::Environment;
use crate::logging::LogConfig;
use crate::oauth::OAuthSettings;
use crate::policy::{AccessConfig, AccessPolicy, CallerConfig, EnvironmentSettings, Policy};
use crate::serve::ServerConfig;
use crate::sinks::SinkConfig;
use crate::systemd::SystemdConfig;
use crate::tls_roots::{RootsError, TrustRoots};
use crate::token::RefreshPolicy;
use crate::upstream::{UpstreamAddr, UpstreamSettings};

/// Prefix of environment overrides: `FLUTE_BROKER__SERVER__LISTEN`.
pub const ENV_PREFIX: &str = "FLUTE_BROKER";

/// The whole configuration. Every default is the component's own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    /// The admin HTTP listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin: AdminConfig,
    pub log: LogConfig,
    /// The API key shared by every environment without its own, and how
    /// often key files are checked.
    pub credentials: CredentialTable,
    pub oauth: OAuthSettings,
    pub refresh: RefreshPolicy,
    pub systemd: SystemdConfig,
    /// How environments with `upstream` reach their hub brokers.
    pub upstream: UpstreamSettings,
    /// Both environments, always (missing tables take the defaults).
    #[serde(deserialize_with = "read_environments")]
    pub environments: BTreeMap<Environment, EnvironmentConfig>,
    /// `[[sinks]]`: token files for programs that can only read a file.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sinks: Vec<SinkConfig>,
    /// How TLS material that rotates in place is checked.
    pub certificates: crate::certs::CertificatesConfig,
    /// Traces over OTLP (off unless an endpoint is set).
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// `[audit]`: the tamper-evident audit trail (off unless a file is set).
    pub audit: crate::audit::AuditConfig,
    /// `[callers.NAME]`: named callers, for `environments.X.access`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub callers: BTreeMap<String, CallerConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            credentials: CredentialTable::default(),
            oauth: OAuthSettings::default(),
            refresh: RefreshPolicy::default(),
            systemd: SystemdConfig::default(),
            upstream: UpstreamSettings::default(),
            environments: Environment::ALL
                .into_iter()
                .map(|env| (env, EnvironmentConfig::for_environment(env)))
                .collect(),
            sinks: Vec::new(),
            certificates: crate::certs::CertificatesConfig::default(),
            telemetry: crate::telemetry::TelemetryConfig::default(),
            audit: crate::audit::AuditConfig::default(),
            callers: BTreeMap::new(),
        }
    }
}

/// `[environments.NAME]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnvironmentConfig {
    pub enabled: bool,
    /// Flute's endpoint for the environment when not written (or `""`);
    /// empty when the environment follows an upstream broker.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub token_url: String,
    /// Follow this environment on upstream brokers (hubs) instead of
    /// calling the token endpoint: `unix:/path`, `http(s)://host:port`,
    /// tried in turn; a DNS name stands for every address it resolves to.
    /// Such an environment needs no API key.
    #[serde(deserialize_with = "crate::settings::strings", skip_serializing_if = "Vec::is_empty")]
    pub upstream: Vec<String>,
    /// Unix users (names or uids) that may get this environment's tokens;
    /// with `allowed_unix_groups` empty too, anyone who reaches a listener may.
    #[serde(with = "accounts::user_ids")]
    pub allowed_unix_users: Vec<u32>,
    #[serde(with = "accounts::group_ids")]
    pub allowed_unix_groups: Vec<u32>,
    /// Client certificates (mutual TLS on TCP) that may get this
    /// environment's tokens, by URI SAN (`spiffe://…`) or DNS SAN; needs
    /// `server.tls.client_ca_file`.
    #[serde(deserialize_with = "crate::settings::strings")]
    pub allowed_tls_clients: Vec<String>,
    /// Overrides the shared `[credentials]` for this environment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialTable>,
    /// The authorizing proxy to this environment's Flute API (off while
    /// `proxy.listen` is empty).
    pub proxy: crate::proxy::ProxyConfig,
    /// Who gets the token and who may call which routes through the
    /// proxy, by caller name; without it, the allow-lists (or anyone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessConfig>,
}

impl Default for EnvironmentConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            token_url: String::new(),
            upstream: Vec::new(),
            allowed_unix_users: Vec::new(),
            allowed_unix_groups: Vec::new(),
            allowed_tls_clients: Vec::new(),
            credentials: None,
            proxy: crate::proxy::ProxyConfig::default(),
            access: None,
        }
    }
}

impl EnvironmentConfig {
    fn for_environment(env: Environment) -> Self {
        Self {
            token_url: env.default_token_url().into(),
            ..Self::default()
        }
    }

    /// Whether this environment takes its tokens from upstream brokers.
    pub fn follows_upstream(&self) -> bool {
        !self.upstream.is_empty()
    }

    /// Where this environment's tokens come from, every address parsed;
    /// `Err` with each problem (both origins set, an address that cannot
    /// work). `Config::validate` reports the same problems with the path.
    pub fn origin(&self) -> Result<Origin, Vec<OriginProblem>> {
        if !self.follows_upstream() {
            return Ok(Origin::Endpoint {
                token_url: self.token_url.clone(),
            });
        }
        let mut problems = Vec::new();
        let mut upstream = Vec::new();
        for addr in &self.upstream {
            match addr.parse::<UpstreamAddr>() {
                Ok(addr) => upstream.push(addr),
                Err(problem) => problems.push(OriginProblem::Address(problem)),
            }
        }
        if !self.token_url.is_empty() {
            problems.push(OriginProblem::BothSet);
        }
        match problems.is_empty() {
            true => Ok(Origin::Follow { upstream }),
            false => Err(problems),
        }
    }

    /// The short form's allow-lists.
    pub fn allow_lists(&self) -> AccessPolicy {
        AccessPolicy {
            uids: self.allowed_unix_users.clone(),
            gids: self.allowed_unix_groups.clone(),
            tls_clients: self.allowed_tls_clients.clone(),
        }
    }
}

/// Where an environment's tokens come from: written as `token_url` or
/// `upstream` in its table (never both), matched on by everything that
/// builds a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The token endpoint, called with the API key.
    Endpoint { token_url: String },
    /// Upstream brokers (hubs), tried in turn; no API key on this host.
    Follow { upstream: Vec<UpstreamAddr> },
}

/// Why an environment's table names no usable origin.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OriginProblem {
    /// An `upstream` address that cannot work.
    #[error("upstream: {0}")]
    Address(String),
    #[error(
        "token_url and upstream are both set: an environment either calls the token endpoint (token_url, with an API key) or follows hub brokers (upstream, without one); remove one"
    )]
    BothSet,
}

impl OriginProblem {
    /// The problem under the table's path: `environments.sandbox.upstream: …`
    /// for an address, `environments.sandbox: …` for the table.
    pub fn at(&self, path: &str) -> String {
        match self {
            OriginProblem::Address(_) => format!("{path}.{self}"),
            OriginProblem::BothSet => format!("{path}: {self}"),
        }
    }
}

/// `[environments]` holds `sandbox` and `production` only; an absent one
/// or an absent `token_url` takes Flute's defaults.
fn read_environments<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<Environment, EnvironmentConfig>, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Tables {
        #[serde(default)]
        sandbox: Option<EnvironmentConfig>,
        #[serde(default)]
        production: Option<EnvironmentConfig>,
    }
    let Tables { sandbox, production } = Tables::deserialize(deserializer)?;
    Ok([(Environment::Sandbox, sandbox), (Environment::Production, production)]
        .into_iter()
        .map(|(env, table)| {
            let mut table = table.unwrap_or_else(|| EnvironmentConfig::for_environment(env));
            if table.token_url.is_empty() && table.upstream.is_empty() {
                table.token_url = env.default_token_url().into();
            }
            (env, table)
        })
        .collect())
}

/// Every problem found, each with its key path.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

/// A validated configuration and the warnings found on the way.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// What changed between the running configuration and a reloaded one,
/// as key paths.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// Key sources: applied live.
    pub credentials: Vec<String>,
    /// Everything else: takes effect after a restart.
    pub needs_restart: Vec<String>,
}

/// Whether validation touches the host: reads the API keys (to prove they
/// load) and probes each sink's directory (by creating a file there). Skip
/// checks only the text (`check-config --skip-secrets`, for a pipeline that
/// has the config file but neither the secret nor the target's directories).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretCheck {
    Read,
    Skip,
}

/// Deserialization gives up after this many problems.
const MAX_PROBLEMS: usize = 100;

impl Config {
    /// Loads `path` (if any) plus the process environment's overrides.
    pub fn load(path: Option<&Path>) -> Result<Loaded, ConfigError> {
        Self::load_checking(path, None, SecretCheck::Read)
    }

    /// As [`Config::load`], with the environment given explicitly (tests).
    pub fn load_with_env(path: Option<&Path>, env: Option<HashMap<String, String>>) -> Result<Loaded, ConfigError> {
        Self::load_checking(path, env, SecretCheck::Read)
    }

    /// As [`Config::load_with_env`], reading the API keys or not.
    pub fn load_checking(
        path: Option<&Path>,
        env: Option<HashMap<String, String>>,
        secrets: SecretCheck,
    ) -> Result<Loaded, ConfigError> {
        let file = match path {
            Some(path) if !path.is_file() => {
                return Err(ConfigError {
                    problems: vec![format!(
                        "config file {} does not exist or is not a file",
                        path.display()
                    )],
                });
            }
            Some(path) => Some(config::File::from(path).format(config::FileFormat::Toml).required(true)),
            None => None,
        };
        Self::merge_and_validate(file, env, secrets)
    }

    /// Validates TOML text with exactly the given environment overrides
    /// (for fuzzing: nothing of the process environment or the file system
    /// is read or written).
    pub fn from_toml_str(text: &str, env: HashMap<String, String>) -> Result<Loaded, ConfigError> {
        Self::merge_and_validate(
            Some(config::File::from_str(text, config::FileFormat::Toml)),
            Some(env),
            SecretCheck::Skip,
        )
    }

    fn merge_and_validate<S>(
        file: Option<S>,
        env: Option<HashMap<String, String>>,
        secrets: SecretCheck,
    ) -> Result<Loaded, ConfigError>
    where
        S: config::Source + Send + Sync + 'static,
    {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(file);
        }
        let mut env_source = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__");
        if env.is_some() {
            env_source = env_source.source(env);
        }
        let tree = builder.add_source(env_source).build().map_err(|e| ConfigError {
            problems: vec![e.to_string()],
        })?;
        let (config, mut problems) = deserialize_reporting_all(tree.cache);
        let warnings = match config.as_ref().map(|c| c.validate_with(secrets)) {
            Some(Ok(warnings)) => warnings,
            Some(Err(more)) => {
                problems.extend(more);
                Vec::new()
            }
            None => Vec::new(),
        };
        match config {
            Some(config) if problems.is_empty() => Ok(Loaded { config, warnings }),
            _ => Err(ConfigError { problems }),
        }
    }

    /// Every cross-field problem at once, each with its key path; the
    /// warnings when there is none. Reads the API keys to prove they load.
    pub fn validate(&self) -> Result<Vec<String>, Vec<String>> {
        self.validate_with(SecretCheck::Read)
    }

    /// As [`Config::validate`]; with [`SecretCheck::Skip`] no key is read.
    /// A problem of the shared `[credentials]` is reported once, under
    /// `credentials`, however many environments use it.
    pub fn validate_with(&self, secrets: SecretCheck) -> Result<Vec<String>, Vec<String>> {
        let mut problems = Vec::new();
        let mut section = |prefix: &str, found: Vec<String>| {
            problems.extend(found.into_iter().map(|p| format!("{prefix}.{p}")));
        };
        section("server", self.server.problems());
        section("log", self.log.problems());
        section("oauth", self.oauth.problems());
        section("refresh", self.refresh.problems());
        section("systemd", self.systemd.problems());
        section("upstream", self.upstream.problems());
        section("certificates", self.certificates.problems());
        section("telemetry", self.telemetry.problems());
        section("audit", self.audit.problems());
        if let Some(p) = crate::duration::out_of_range(self.poll_interval(), Duration::ZERO, Duration::from_secs(3600))
        {
            section("credentials", vec![format!("poll_interval: {p}")]);
        }
        let (shared, shared_readable) = match self.credentials.key_source() {
            Ok(shared) => (shared, true),
            Err(found) => {
                section("credentials", found);
                (None, false)
            }
        };
        let mut warnings = Vec::new();
        match self.policy() {
            Ok(policy) => warnings.extend(policy.table().1),
            Err(found) => problems.extend(found),
        }
        if shared.is_some() && self.enabled().all(|(_, e)| e.follows_upstream()) {
            warnings.push("credentials: not used: every enabled environment follows an upstream broker, so no API key is read; remove [credentials] so this host holds no secret".into());
        }
        let (mut shared_checked, mut missing_reported) = (false, false);
        for (env, e) in &self.environments {
            let path = format!("environments.{env}");
            let own = match &e.credentials {
                Some(table) => {
                    if table.poll_interval.is_some() {
                        problems.push(format!("{path}.credentials.poll_interval: set in [credentials] only"));
                    }
                    table.key_source().unwrap_or_else(|found| {
                        problems.extend(found.into_iter().map(|p| format!("{path}.credentials.{p}")));
                        None
                    })
                }
                None => None,
            };
            if !e.enabled {
                continue;
            }
            problems.extend(
                self.proxy_problems(*env, e)
                    .into_iter()
                    .map(|p| format!("{path}.proxy.{p}")),
            );
            if e.follows_upstream() {
                match e.origin() {
                    Ok(Origin::Follow { upstream }) => warnings.extend(
                        upstream
                            .iter()
                            .filter(|a| a.is_cleartext_network())
                            .map(|a| format!("{path}.upstream: {a} carries tokens across the network unencrypted; use https:// (with [upstream] certificates) or a Unix socket")),
                    ),
                    Ok(Origin::Endpoint { .. }) => {}
                    Err(origin_problems) => problems.extend(origin_problems.iter().map(|p| p.at(&path))),
                }
                if e.credentials.is_some() {
                    problems.push(format!(
                        "{path}.credentials: this environment follows hub brokers (upstream) and reads no API key; remove the table so this host holds no secret"
                    ));
                }
                continue;
            }
            if let Err(p) = self.oauth.check_token_url(&e.token_url) {
                problems.push(format!("{path}.token_url: {p}"));
            }
            let mutual_tls = self.server.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
            if !e.allowed_tls_clients.is_empty() && !mutual_tls {
                problems.push(format!(
                    "{path}.allowed_tls_clients: needs server.tls.client_ca_file (mutual TLS): without client certificates no caller can match"
                ));
            }
            let (source, prefix) = match (own.as_ref(), shared.as_ref()) {
                (Some(own), _) => (own, format!("{path}.credentials")),
                (None, Some(_)) if shared_checked => continue,
                (None, Some(shared)) => {
                    shared_checked = true;
                    (shared, "credentials".to_string())
                }
                (None, None) => {
                    if shared_readable && !missing_reported {
                        missing_reported = true;
                        problems.push(
                            "credentials: no API key: set [credentials] (client_id and client_secret_file, client_secret_env or client_secret_credential), or [environments.NAME.credentials] for each enabled environment that calls the token endpoint, or make it follow a hub broker with environments.NAME.upstream"
                                .into(),
                        );
                    }
                    continue;
                }
            };
            if secrets == SecretCheck::Skip {
                continue;
            }
            match source.load() {
                // Environments sharing one key source warn once.
                Ok(_) => {
                    for warning in source.permission_warnings() {
                        if !warnings.contains(&warning) {
                            warnings.push(warning);
                        }
                    }
                }
                Err(err) => problems.push(format!("{prefix}: {err}")),
            }
        }
        if !self.environments.values().any(|e| e.enabled) {
            problems.push("environments: at least one environment must be enabled".into());
        }
        if secrets == SecretCheck::Read
            && let Err(e) = self.token_endpoint_roots()
        {
            problems.push(format!("oauth.tls_roots: {e}"));
        }
        if secrets == SecretCheck::Read
            && let Some(tls) = &self.server.tls
        {
            let unreadable = tls.file_problems();
            if unreadable.is_empty() {
                // Readable: the whole material is checked as the broker will
                // (pair, validity, CA bundle).
                if let Err(e) = crate::certs::server::ServerTls::load(tls) {
                    problems.push(format!("server.tls: {e}"));
                }
            }
            problems.extend(unreadable.into_iter().map(|p| format!("server.tls.{p}")));
        }
        let https_upstream = self.enabled().any(|(_, e)| match e.origin() {
            Ok(Origin::Follow { upstream }) => upstream.iter().any(UpstreamAddr::is_https),
            _ => false,
        });
        if secrets == SecretCheck::Read
            && https_upstream
            && let Err(e) = crate::certs::client::ClientTls::load(&self.upstream.tls_files())
        {
            problems.push(format!("upstream: {e}"));
        }
        let enabled: Vec<Environment> = self.enabled().map(|(env, _)| env).collect();
        let (sink_problems, sink_warnings) =
            crate::sinks::problems(&self.sinks, &enabled, secrets == SecretCheck::Read);
        problems.extend(sink_problems);
        warnings.extend(sink_warnings);
        if problems.is_empty() {
            Ok(warnings)
        } else {
            Err(problems)
        }
    }

    /// The CAs the token endpoint clients trust: loaded from
    /// `oauth.tls_roots` when an enabled environment's token URL is
    /// `https://`, none otherwise (an all-`http://` configuration needs no
    /// CA store on the host).
    pub fn token_endpoint_roots(&self) -> Result<TrustRoots, RootsError> {
        let https = |url: &str| url::Url::parse(url).is_ok_and(|u| u.scheme() == "https");
        let proxies_https =
            |env: Environment, e: &EnvironmentConfig| e.proxy.is_enabled() && https(e.proxy.api_url(env));
        if self
            .enabled()
            .any(|(env, e)| https(&e.token_url) || proxies_https(env, e))
        {
            self.oauth.tls_roots.load()
        } else {
            Ok(TrustRoots::default())
        }
    }

    /// The key source that applies to `env`: its own, or the shared one;
    /// none for an environment that follows an upstream broker.
    pub fn key_source(&self, env: Environment) -> Option<KeySource> {
        let env_config = self.environments.get(&env)?;
        if env_config.follows_upstream() {
            return None;
        }
        let own = env_config.credentials.as_ref();
        own.and_then(|table| table.key_source().ok().flatten())
            .or_else(|| self.credentials.key_source().ok().flatten())
    }

    /// What is wrong with an enabled environment's proxy settings: its
    /// values, its API URL (https, or http on loopback only with
    /// `oauth.allow_insecure_http`), and any listener on a non-loopback
    /// TCP address unless callers must present client certificates and
    /// the environment names the ones allowed: a plain proxy on the network
    /// would let anyone who reaches it call Flute with this key.
    fn proxy_problems(&self, env: Environment, e: &EnvironmentConfig) -> Vec<String> {
        let proxy = &e.proxy;
        if !proxy.is_enabled() {
            return Vec::new();
        }
        let mut out = proxy.problems();
        if let Err(p) = self.oauth.check_token_url(proxy.api_url(env)) {
            out.push(format!("api_url: {p}"));
        }
        let mutual_tls = self.server.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
        for addr in &proxy.listen {
            if let crate::serve::listen::ListenAddr::Tcp(a) = addr
                && !a.ip().is_loopback()
                && (!mutual_tls || e.allowed_tls_clients.is_empty())
            {
                out.push(format!(
                    "listen: {a} is not a loopback address, and a proxy reachable from the network lets anyone who reaches it call Flute with this broker's key: listen on 127.0.0.1, ::1 or a unix: socket, or require client certificates (server.tls.client_ca_file) and name the allowed ones in environments.{env}.allowed_tls_clients"
                ));
            }
            if self.server.listen.contains(addr) {
                out.push(format!("listen: {addr} is also a server.listen address"));
            }
        }
        out
    }

    /// Every enabled environment's proxy problems, each with its path: for
    /// listeners given on the command line (`serve --proxy`) after the
    /// file was validated.
    pub fn proxy_listener_problems(&self) -> Vec<String> {
        self.enabled()
            .flat_map(|(env, e)| {
                self.proxy_problems(env, e)
                    .into_iter()
                    .map(move |p| format!("environments.{env}.proxy.{p}"))
            })
            .collect()
    }

    /// Every TLS certificate this configuration puts in use (server, client
    /// CA, the agent's client certificate and hub CA): what `check-config`
    /// shows with its expiry. Material that cannot be read is left out (it
    /// is a problem of its own).
    pub fn certificates_in_use(&self) -> Vec<crate::certs::InUse> {
        use crate::certs::Reloadable;
        let mut out = Vec::new();
        if let Some(Ok(tls)) = self.server.tls.as_ref().map(crate::certs::server::ServerTls::load) {
            out.extend(tls.in_use());
        }
        let https_upstream = self.enabled().any(|(_, e)| match e.origin() {
            Ok(Origin::Follow { upstream }) => upstream.iter().any(UpstreamAddr::is_https),
            _ => false,
        });
        if https_upstream && let Ok(tls) = crate::certs::client::ClientTls::load(&self.upstream.tls_files()) {
            out.extend(tls.in_use());
        }
        out
    }

    /// One line per environment saying where its tokens come from (for
    /// `check-config`): a mixed hub/agent configuration reads at a glance.
    pub fn token_sources_summary(&self) -> Vec<String> {
        self.environments
            .iter()
            .map(
                |(env, e)| match (e.enabled, e.follows_upstream(), self.key_source(*env)) {
                    (false, _, _) => format!("{env}: disabled"),
                    (true, true, _) => format!(
                        "{env}: follows upstream brokers {} (no API key on this host)",
                        e.upstream.join(", ")
                    ),
                    (true, false, Some(_)) => format!("{env}: calls {} with the API key", e.token_url),
                    (true, false, None) => format!("{env}: calls {} (no API key configured)", e.token_url),
                },
            )
            .chain(self.enabled().filter(|(_, e)| e.proxy.is_enabled()).map(|(env, e)| {
                let listen: Vec<String> = e.proxy.listen.iter().map(ToString::to_string).collect();
                format!("{env}: proxies {} to {}", listen.join(", "), e.proxy.api_url(env))
            }))
            .collect()
    }

    /// Every enabled environment's access, compiled with the named callers.
    pub fn policy(&self) -> Result<Policy, Vec<String>> {
        Policy::compile(
            &self.callers,
            self.enabled().map(|(env, e)| EnvironmentSettings {
                environment: env,
                short_form: e.allow_lists(),
                access: e.access.as_ref(),
            }),
        )
    }

    /// How often key files are checked for changes (zero: never).
    pub fn poll_interval(&self) -> Duration {
        self.credentials.poll_interval.unwrap_or(DEFAULT_POLL_INTERVAL)
    }

    pub fn enabled(&self) -> impl Iterator<Item = (Environment, &EnvironmentConfig)> {
        self.environments
            .iter()
            .filter(|(_, e)| e.enabled)
            .map(|(env, e)| (*env, e))
    }

    /// The effective configuration as TOML. Holds no secret: only where
    /// secrets are read from.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// What a reload from `self` to `new` changes: key sources apply
    /// live, every other changed key needs a restart.
    pub fn diff(&self, new: &Config) -> ConfigDiff {
        let (Ok(old), Ok(new)) = (toml::Value::try_from(self), toml::Value::try_from(new)) else {
            return ConfigDiff::default();
        };
        let mut changed = Vec::new();
        changed_keys("", &old, &new, &mut changed);
        let (credentials, needs_restart) = changed.into_iter().partition(|key: &String| {
            let live = key.starts_with("credentials.") && key != "credentials.poll_interval";
            live || (key.starts_with("environments.") && key.contains(".credentials"))
        });
        ConfigDiff {
            credentials,
            needs_restart,
        }
    }
}

/// The key paths whose values differ between two trees.
fn changed_keys(path: &str, old: &toml::Value, new: &toml::Value, out: &mut Vec<String>) {
    match (old, new) {
        (toml::Value::Table(old), toml::Value::Table(new)) => {
            let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
            for key in keys {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match (old.get(key), new.get(key)) {
                    (Some(a), Some(b)) => changed_keys(&child, a, b, out),
                    _ => out.push(child),
                }
            }
        }
        (old, new) if old != new => out.push(path.to_owned()),
        _ => {}
    }
}

/// Deserializes the merged tree, reporting every value that does not fit
/// the schema: each failing key is recorded, removed (so its default
/// applies) and deserialization runs again. `None` when the tree could not
/// be made to fit at all.
fn deserialize_reporting_all(mut tree: config::Value) -> (Option<Config>, Vec<String>) {
    let mut problems = Vec::new();
    while problems.len() < MAX_PROBLEMS {
        let error = match serde_path_to_error::deserialize::<_, Config>(tree.clone()) {
            Ok(config) => {
                problems.sort();
                return (Some(config), problems);
            }
            Err(error) => error,
        };
        let keys: Vec<KeyPart> = error
            .path()
            .iter()
            .map_while(|segment| match segment {
                serde_path_to_error::Segment::Map { key } => Some(KeyPart::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => Some(KeyPart::Index(*index)),
                _ => None,
            })
            .collect();
        problems.push(format!("{}: {}", key_path(&keys), describe(error.inner())));
        if !remove_key(&mut tree, &keys) {
            break;
        }
    }
    problems.sort();
    (None, problems)
}

/// A deserialization error in words, without the config crate's location
/// suffixes (the key path is prefixed by the caller).
fn describe(error: &config::ConfigError) -> String {
    match error {
        config::ConfigError::At { error, .. } => describe(error),
        config::ConfigError::Type {
            unexpected, expected, ..
        } => format!("invalid value {unexpected} (expected {expected})"),
        // serde's wording for a key `deny_unknown_fields` refused.
        config::ConfigError::Message(message) if message.starts_with("unknown field") => "unknown key".into(),
        config::ConfigError::Message(message) => message.clone(),
        other => other.to_string(),
    }
}

/// One step of a key path: a table key, or an index into an array of
/// tables (`[[sinks]]`).
enum KeyPart {
    Key(String),
    Index(usize),
}

/// `server.listen`, `sinks[2].format`.
fn key_path(keys: &[KeyPart]) -> String {
    let mut path = String::new();
    for part in keys {
        match part {
            KeyPart::Key(key) if path.is_empty() => path.push_str(key),
            KeyPart::Key(key) => {
                path.push('.');
                path.push_str(key);
            }
            KeyPart::Index(index) => path.push_str(&format!("[{index}]")),
        }
    }
    path
}

/// Removes the value at `keys`; false when there is none.
fn remove_key(tree: &mut config::Value, keys: &[KeyPart]) -> bool {
    match (&mut tree.kind, keys) {
        (_, []) => false,
        (config::ValueKind::Table(table), [KeyPart::Key(key)]) => table.remove(key).is_some(),
        (config::ValueKind::Table(table), [KeyPart::Key(key), rest @ ..]) => {
            table.get_mut(key).is_some_and(|child| remove_key(child, rest))
        }
        (config::ValueKind::Array(items), [KeyPart::Index(index)]) if *index < items.len() => {
            items.remove(*index);
            true
        }
        (config::ValueKind::Array(items), [KeyPart::Index(index), rest @ ..]) => {
            items.get_mut(*index).is_some_and(|child| remove_key(child, rest))
        }
        _ => false,
    }
}
