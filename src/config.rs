//! The configuration: schema, defaults, loading (TOML file plus
//! `FLUTE_BROKER__SECTION__KEY` environment overrides through the config
//! crate) and validation. Every problem is collected with its key path and
//! reported at once; unknown keys are problems too.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::credentials::{KeySource, ValueSource};
use crate::environment::Environment;
use crate::grpc::access::AccessPolicy;
use crate::grpc::listener::ListenAddr;
use crate::grpc::tls::ServerTlsFiles;
use crate::logging::LogFormat;
use crate::oauth::{ClientAuth, LifetimeBounds};
use crate::token::RefreshPolicy;

const HOUR: Duration = Duration::from_secs(3600);
const MINUTES_10: Duration = Duration::from_secs(600);

/// Prefix of environment overrides: `FLUTE_BROKER__SERVER__LISTEN`.
pub const ENV_PREFIX: &str = "FLUTE_BROKER";

#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    pub listen: Vec<ListenAddr>,
    /// Permission bits of the Unix socket file.
    pub unix_socket_mode: u32,
    /// Group (name or numeric id) that owns the Unix socket file.
    pub unix_socket_group: Option<String>,
    /// How long shutdown waits for in-flight calls.
    pub shutdown_grace: Duration,
    /// Longest a call waits for a token (first fetch, early refresh) when
    /// the caller set no shorter deadline.
    pub request_wait: Duration,
    /// TLS (and optionally mTLS) for every TCP listener; `None`: plaintext.
    pub tls: Option<ServerTlsFiles>,
    /// Per-listener connection budget, deadlines and stream cap (the admin
    /// listener included).
    pub limits: crate::connections::ConnectionLimits,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter (`info`, `flute_token_broker=debug`); RUST_LOG wins.
    pub level: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct OAuthSettings {
    pub client_auth: ClientAuth,
    pub scope: Option<String>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub use_refresh_token: bool,
    /// Lifetime assumed when the endpoint sends no `expires_in`.
    pub default_lifetime: Duration,
    /// Allow `http://` token URLs on loopback hosts (development only).
    pub allow_insecure_http: bool,
}

impl OAuthSettings {
    pub fn lifetime_bounds(&self) -> LifetimeBounds {
        LifetimeBounds {
            default: self.default_lifetime,
            ..LifetimeBounds::default()
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct EnvironmentConfig {
    pub enabled: bool,
    pub token_url: String,
    /// Overrides the shared `[credentials]` for this environment.
    pub credentials: Option<KeySource>,
    /// Who may get this environment's tokens (default: anyone who reaches a listener).
    pub access: AccessPolicy,
}

/// The whole validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    /// The admin HTTP listener (`/metrics`, `/healthz`, `/readyz`); `None` disables it.
    pub admin_listen: Option<SocketAddr>,
    pub log: LogConfig,
    pub oauth: OAuthSettings,
    pub refresh: RefreshPolicy,
    /// The API key shared by every environment without its own.
    pub credentials: Option<KeySource>,
    /// How often credential files are checked for changes (0 disables).
    pub credentials_poll_interval: Duration,
    /// systemd: READY=1 is sent at the latest after this, token or not.
    pub ready_timeout: Duration,
    pub environments: BTreeMap<Environment, EnvironmentConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig {
                listen: vec![ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 50051)))],
                unix_socket_mode: 0o660,
                unix_socket_group: None,
                shutdown_grace: Duration::from_secs(10),
                request_wait: Duration::from_secs(30),
                tls: None,
                limits: crate::connections::ConnectionLimits::default(),
            },
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            log: LogConfig {
                format: LogFormat::Auto,
                level: "info".into(),
            },
            oauth: OAuthSettings {
                client_auth: ClientAuth::ClientSecretBasic,
                scope: Some("offline_access".into()),
                connect_timeout: Duration::from_secs(10),
                request_timeout: Duration::from_secs(30),
                use_refresh_token: true,
                default_lifetime: Duration::from_secs(900),
                allow_insecure_http: false,
            },
            refresh: RefreshPolicy::default(),
            credentials: None,
            credentials_poll_interval: Duration::from_secs(5),
            ready_timeout: Duration::from_secs(30),
            environments: Environment::ALL
                .into_iter()
                .map(|env| {
                    (
                        env,
                        EnvironmentConfig {
                            enabled: true,
                            token_url: env.default_token_url().into(),
                            credentials: None,
                            access: AccessPolicy::default(),
                        },
                    )
                })
                .collect(),
        }
    }
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

impl Config {
    /// Loads `path` (if any) plus the process environment's overrides.
    pub fn load(path: Option<&Path>) -> Result<Loaded, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// As [`Config::load`], with the environment given explicitly (tests).
    pub fn load_with_env(path: Option<&Path>, env: Option<HashMap<String, String>>) -> Result<Loaded, ConfigError> {
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
        Self::merge_and_validate(file, env)
    }

    /// Validates TOML text with exactly the given environment overrides
    /// (for fuzzing and tests; nothing of the process environment is read).
    pub fn from_toml_str(text: &str, env: HashMap<String, String>) -> Result<Loaded, ConfigError> {
        Self::merge_and_validate(Some(config::File::from_str(text, config::FileFormat::Toml)), Some(env))
    }

    fn merge_and_validate<S>(file: Option<S>, env: Option<HashMap<String, String>>) -> Result<Loaded, ConfigError>
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
        let value = builder
            .add_source(env_source)
            .build()
            .and_then(|c| c.try_deserialize::<Value>())
            .map_err(|e| ConfigError {
                problems: vec![e.to_string()],
            })?;
        Self::from_value(value)
    }

    /// Validates an already-merged configuration tree.
    pub fn from_value(value: Value) -> Result<Loaded, ConfigError> {
        let problems = Rc::new(RefCell::new(Vec::new()));
        let mut warnings = Vec::new();
        let root_map = match value {
            Value::Object(m) => m,
            Value::Null => Map::new(),
            _ => {
                return Err(ConfigError {
                    problems: vec!["the configuration must be a table".into()],
                });
            }
        };
        let mut root = Section {
            path: String::new(),
            map: root_map,
            problems: problems.clone(),
        };
        let d = Config::default();

        let mut s = root.section("server");
        let listen = s.list("listen").map(|items| {
            items
                .iter()
                .filter_map(|item| item.parse::<ListenAddr>().map_err(|e| s.problem("listen", &e)).ok())
                .collect()
        });
        let server = ServerConfig {
            listen: listen.unwrap_or(d.server.listen),
            unix_socket_mode: s.mode("unix_socket_mode").unwrap_or(d.server.unix_socket_mode),
            unix_socket_group: s.take_opt("unix_socket_group").filter(|g: &String| !g.is_empty()),
            shutdown_grace: s.duration("shutdown_grace", d.server.shutdown_grace),
            request_wait: s.duration("request_wait", d.server.request_wait),
            tls: tls_files(&mut s),
            limits: crate::connections::ConnectionLimits {
                max_connections: s.take("max_connections", d.server.limits.max_connections),
                handshake_timeout: s.duration("handshake_timeout", d.server.limits.handshake_timeout),
                idle_timeout: s.duration("idle_timeout", d.server.limits.idle_timeout),
                max_concurrent_streams: s.take("max_concurrent_streams", d.server.limits.max_concurrent_streams),
            },
        };
        if server.listen.is_empty() {
            s.problem("listen", "at least one listener is required");
        }
        s.range("shutdown_grace", server.shutdown_grace, Duration::ZERO, MINUTES_10);
        let limits = &server.limits;
        if !(1..=1_000_000).contains(&limits.max_connections) {
            s.problem("max_connections", "must be between 1 and 1000000");
        }
        if !(1..=100_000).contains(&limits.max_concurrent_streams) {
            s.problem("max_concurrent_streams", "must be between 1 and 100000");
        }
        s.range(
            "handshake_timeout",
            limits.handshake_timeout,
            Duration::from_millis(100),
            MINUTES_10,
        );
        s.range(
            "idle_timeout",
            limits.idle_timeout,
            Duration::from_secs(1),
            Duration::from_secs(86_400),
        );
        s.range(
            "request_wait",
            server.request_wait,
            Duration::from_millis(100),
            MINUTES_10,
        );
        s.finish();

        let mut s = root.section("admin");
        let admin_listen = match s.take_opt::<String>("listen") {
            None => d.admin_listen,
            Some(text) if text.is_empty() => None,
            Some(text) => text
                .parse()
                .map_err(|_| s.problem("listen", &format!("{text:?}: expected IP:PORT, or \"\" to disable")))
                .ok(),
        };
        s.finish();

        let mut s = root.section("log");
        let format = match s.take("format", "auto".to_owned()).as_str() {
            "auto" => LogFormat::Auto,
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                s.problem("format", &format!("{other:?}: expected auto, text or json"));
                LogFormat::Auto
            }
        };
        let level: String = s.take("level", d.log.level.clone());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
            s.problem("level", &format!("{level:?}: {e}"));
        }
        s.finish();

        let mut s = root.section("oauth");
        let scope: String = s.take("scope", "offline_access".into());
        let oauth = OAuthSettings {
            client_auth: s.take("client_auth", d.oauth.client_auth),
            scope: (!scope.is_empty()).then_some(scope),
            connect_timeout: s.duration("connect_timeout", d.oauth.connect_timeout),
            request_timeout: s.duration("request_timeout", d.oauth.request_timeout),
            use_refresh_token: s.take("use_refresh_token", d.oauth.use_refresh_token),
            default_lifetime: s.duration("default_lifetime", d.oauth.default_lifetime),
            allow_insecure_http: s.take("allow_insecure_http", false),
        };
        for (key, value, min, max) in [
            ("connect_timeout", oauth.connect_timeout, 1, 120),
            ("request_timeout", oauth.request_timeout, 1, 300),
            ("default_lifetime", oauth.default_lifetime, 1, 86_400),
        ] {
            s.range(key, value, Duration::from_secs(min), Duration::from_secs(max));
        }
        s.finish();

        let mut s = root.section("refresh");
        let p = &d.refresh;
        let refresh = RefreshPolicy {
            refresh_ratio: s.take("ratio", p.refresh_ratio),
            jitter_ratio: s.take("jitter", p.jitter_ratio),
            expiry_margin: s.duration("expiry_margin", p.expiry_margin),
            serve_margin: s.duration("serve_margin", p.serve_margin),
            backoff_initial: s.duration("backoff_initial", p.backoff_initial),
            backoff_max: s.duration("backoff_max", p.backoff_max),
            retry_after_max: s.duration("retry_after_max", p.retry_after_max),
            early_refresh_interval: s.duration("early_refresh_interval", p.early_refresh_interval),
        };
        for problem in refresh.problems() {
            s.problems.borrow_mut().push(problem);
        }
        s.range(
            "serve_margin",
            refresh.serve_margin,
            Duration::ZERO,
            Duration::from_secs(300),
        );
        s.range("expiry_margin", refresh.expiry_margin, Duration::ZERO, HOUR);
        s.range("retry_after_max", refresh.retry_after_max, Duration::ZERO, HOUR);
        s.range(
            "early_refresh_interval",
            refresh.early_refresh_interval,
            Duration::ZERO,
            HOUR,
        );
        s.finish();

        let mut s = root.section("credentials");
        let credentials_poll_interval = s.duration("poll_interval", d.credentials_poll_interval);
        s.range("poll_interval", credentials_poll_interval, Duration::ZERO, HOUR);
        let credentials = key_source(&mut s);
        s.finish();

        let mut s = root.section("systemd");
        let ready_timeout = s.duration("ready_timeout", d.ready_timeout);
        s.range("ready_timeout", ready_timeout, Duration::ZERO, HOUR);
        s.finish();

        let mut envs_section = root.section("environments");
        let mut environments = BTreeMap::new();
        for env in Environment::ALL {
            let mut s = envs_section.section(env.as_str());
            let enabled = s.take("enabled", true);
            let token_url: String = s.take("token_url", env.default_token_url().to_owned());
            let access = AccessPolicy {
                uids: ids(&mut s, "allowed_unix_users", crate::grpc::access::resolve_user),
                gids: ids(&mut s, "allowed_unix_groups", crate::grpc::access::resolve_group),
            };
            let mut c = s.section("credentials");
            let own = key_source(&mut c);
            c.finish();
            if enabled {
                check_token_url(&mut s, &token_url, oauth.allow_insecure_http);
                match own.as_ref().or(credentials.as_ref()) {
                    Some(source) => match source.load() {
                        Ok(_) => warnings.extend(source.permission_warnings()),
                        Err(e) => s.problem("credentials", &e.to_string()),
                    },
                    None => s.problem(
                        "credentials",
                        "no API key: set [credentials] (client_id and client_secret_file, client_secret_env or client_secret_credential)",
                    ),
                }
            }
            s.finish();
            environments.insert(
                env,
                EnvironmentConfig {
                    enabled,
                    token_url,
                    credentials: own,
                    access,
                },
            );
        }
        envs_section.finish();
        if !environments.values().any(|e| e.enabled) {
            problems
                .borrow_mut()
                .push("environments: at least one environment must be enabled".into());
        }
        root.finish();

        let problems = problems.take();
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        let config = Config {
            server,
            admin_listen,
            log: LogConfig { format, level },
            oauth,
            refresh,
            credentials,
            credentials_poll_interval,
            ready_timeout,
            environments,
        };
        Ok(Loaded { config, warnings })
    }

    /// The key source that applies to `env`.
    pub fn key_source(&self, env: Environment) -> Option<&KeySource> {
        self.environments
            .get(&env)
            .and_then(|e| e.credentials.as_ref())
            .or(self.credentials.as_ref())
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
        let d = crate::duration::format;
        let source = |k: &Option<KeySource>| -> Value {
            let Some(k) = k else { return json!({}) };
            let mut m = Map::new();
            for (prefix, v) in [("client_id", &k.client_id), ("client_secret", &k.client_secret)] {
                let (suffix, text) = match v {
                    ValueSource::Inline(t) if prefix == "client_id" => ("", t.clone()),
                    ValueSource::Inline(_) => ("", "[redacted]".into()),
                    ValueSource::File(p) => ("_file", p.display().to_string()),
                    ValueSource::Env(n) => ("_env", n.clone()),
                    ValueSource::SystemdCredential(n) => ("_credential", n.clone()),
                };
                m.insert(format!("{prefix}{suffix}"), json!(text));
            }
            Value::Object(m)
        };
        let mut credentials = source(&self.credentials);
        credentials["poll_interval"] = json!(d(self.credentials_poll_interval));
        let environments: Map<String, Value> = self
            .environments
            .iter()
            .map(|(env, e)| {
                let mut v = json!({"enabled": e.enabled, "token_url": e.token_url});
                let numbers = |ids: &[u32]| ids.iter().map(ToString::to_string).collect::<Vec<_>>();
                if !e.access.is_open() {
                    v["allowed_unix_users"] = json!(numbers(&e.access.uids));
                    v["allowed_unix_groups"] = json!(numbers(&e.access.gids));
                }
                if e.credentials.is_some() {
                    v["credentials"] = source(&e.credentials);
                }
                (env.as_str().to_owned(), v)
            })
            .collect();
        let p = &self.refresh;
        let value = json!({
            "server": {
                "listen": self.server.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "unix_socket_mode": format!("{:04o}", self.server.unix_socket_mode),
                "unix_socket_group": self.server.unix_socket_group.clone().unwrap_or_default(),
                "shutdown_grace": d(self.server.shutdown_grace),
                "request_wait": d(self.server.request_wait),
                "max_connections": self.server.limits.max_connections,
                "handshake_timeout": d(self.server.limits.handshake_timeout),
                "idle_timeout": d(self.server.limits.idle_timeout),
                "max_concurrent_streams": self.server.limits.max_concurrent_streams,
                "tls": self.server.tls.as_ref().map(|t| {
                    let mut v = json!({"cert_file": t.cert_file.display().to_string(), "key_file": t.key_file.display().to_string()});
                    if let Some(ca) = &t.client_ca_file {
                        v["client_ca_file"] = json!(ca.display().to_string());
                    }
                    v
                }).unwrap_or_else(|| json!({})),
            },
            "admin": {"listen": self.admin_listen.map(|a| a.to_string()).unwrap_or_default()},
            "log": {"format": format!("{:?}", self.log.format).to_lowercase(), "level": self.log.level},
            "credentials": credentials,
            "oauth": {
                "client_auth": self.oauth.client_auth,
                "scope": self.oauth.scope.clone().unwrap_or_default(),
                "connect_timeout": d(self.oauth.connect_timeout),
                "request_timeout": d(self.oauth.request_timeout),
                "use_refresh_token": self.oauth.use_refresh_token,
                "default_lifetime": d(self.oauth.default_lifetime),
                "allow_insecure_http": self.oauth.allow_insecure_http,
            },
            "refresh": {
                "ratio": p.refresh_ratio, "jitter": p.jitter_ratio, "expiry_margin": d(p.expiry_margin),
                "serve_margin": d(p.serve_margin), "backoff_initial": d(p.backoff_initial), "backoff_max": d(p.backoff_max),
                "retry_after_max": d(p.retry_after_max), "early_refresh_interval": d(p.early_refresh_interval),
            },
            "systemd": {"ready_timeout": d(self.ready_timeout)},
            "environments": environments,
        });
        toml::to_string(&value).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

/// A list of user or group names (or numeric ids as strings), resolved now.
fn ids(s: &mut Section, key: &str, resolve: fn(&str) -> Result<u32, String>) -> Vec<u32> {
    let names: Vec<String> = s.take(key, Vec::new());
    names
        .iter()
        .filter_map(|name| resolve(name).map_err(|e| s.problem(key, &e)).ok())
        .collect()
}

/// `[server.tls]`: cert_file and key_file together, client_ca_file optional.
fn tls_files(server: &mut Section) -> Option<ServerTlsFiles> {
    let mut s = server.section("tls");
    let cert: Option<String> = s.take_opt("cert_file");
    let key: Option<String> = s.take_opt("key_file");
    let ca: Option<String> = s.take_opt("client_ca_file");
    let files = match (cert, key) {
        (Some(cert), Some(key)) => Some(ServerTlsFiles {
            cert_file: cert.into(),
            key_file: key.into(),
            client_ca_file: ca.map(Into::into),
        }),
        (None, None) if ca.is_none() => None,
        _ => {
            s.problem("cert_file", "TLS needs both cert_file and key_file");
            None
        }
    };
    if let Some(f) = &files {
        for path in [Some(&f.cert_file), Some(&f.key_file), f.client_ca_file.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = std::fs::metadata(path) {
                s.problem("tls", &format!("cannot read {}: {e}", path.display()));
            }
        }
    }
    s.finish();
    files
}

fn check_token_url(s: &mut Section, url: &str, allow_insecure_http: bool) {
    let parsed = match reqwest::Url::parse(url) {
        Ok(u) => u,
        Err(e) => return s.problem("token_url", &format!("{url:?}: {e}")),
    };
    match parsed.scheme() {
        "https" => {}
        "http" => {
            let loopback = match parsed.host() {
                Some(url::Host::Domain(d)) => d == "localhost",
                Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
                Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
                None => false,
            };
            if !allow_insecure_http {
                s.problem(
                    "token_url",
                    &format!("{url:?}: https is required (oauth.allow_insecure_http permits http on loopback)"),
                );
            } else if !loopback {
                s.problem(
                    "token_url",
                    &format!("{url:?}: plain http is only allowed for loopback hosts"),
                );
            }
        }
        other => s.problem("token_url", &format!("{url:?}: unsupported scheme {other:?}")),
    }
}

/// Reads the client id and secret sources of a credentials table.
fn key_source(s: &mut Section) -> Option<KeySource> {
    if s.map.contains_key("client_secret") {
        s.map.remove("client_secret");
        s.problem("client_secret", "secrets are never written in the configuration: use client_secret_file, client_secret_env or client_secret_credential");
    }
    let mut pick = |what: &str, inline_allowed: bool| -> Option<ValueSource> {
        let mut found = Vec::new();
        if inline_allowed && let Some(v) = s.take_opt::<String>(what) {
            found.push(ValueSource::Inline(v));
        }
        if let Some(v) = s.take_opt::<String>(&format!("{what}_file")) {
            found.push(ValueSource::File(v.into()));
        }
        if let Some(v) = s.take_opt::<String>(&format!("{what}_env")) {
            found.push(ValueSource::Env(v));
        }
        if let Some(v) = s.take_opt::<String>(&format!("{what}_credential")) {
            found.push(ValueSource::SystemdCredential(v));
        }
        if found.len() > 1 {
            s.problem(what, "give exactly one source (inline, _file, _env or _credential)");
        }
        found.pop()
    };
    let client_id = pick("client_id", true);
    let client_secret = pick("client_secret", false);
    match (client_id, client_secret) {
        (Some(client_id), Some(client_secret)) => Some(KeySource {
            client_id,
            client_secret,
        }),
        (None, None) => None,
        (Some(_), None) => {
            s.problem("client_secret_file", "client_id is set but no client secret source is");
            None
        }
        (None, Some(_)) => {
            s.problem("client_id", "a client secret source is set but no client_id");
            None
        }
    }
}

/// One table of the configuration being read: values are taken out as
/// they are understood, so whatever is left at the end is unknown.
struct Section {
    path: String,
    map: Map<String, Value>,
    problems: Rc<RefCell<Vec<String>>>,
}

impl Section {
    fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn problem(&self, key: &str, message: &str) {
        self.problems
            .borrow_mut()
            .push(format!("{}: {message}", self.key_path(key)));
    }

    fn section(&mut self, key: &str) -> Section {
        let map = match self.map.remove(key) {
            None => Map::new(),
            Some(Value::Object(m)) => m,
            Some(_) => {
                self.problem(key, "expected a table");
                Map::new()
            }
        };
        Section {
            path: self.key_path(key),
            map,
            problems: self.problems.clone(),
        }
    }

    /// Takes a value; strings from environment overrides are parsed too
    /// (`"true"`, `"0.8"`).
    fn take_opt<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        let value = self.map.remove(key)?;
        if let Ok(v) = serde_json::from_value::<T>(value.clone()) {
            return Some(v);
        }
        if let Value::String(text) = &value
            && let Ok(v) = serde_json::from_str::<T>(text)
        {
            return Some(v);
        }
        let shown = match &value {
            Value::String(s) => format!("{s:?}"),
            other => other.to_string(),
        };
        let expected = std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("value")
            .to_owned();
        self.problem(
            key,
            &format!("invalid value {shown} (expected {})", expected.to_lowercase()),
        );
        None
    }

    fn take<T: DeserializeOwned>(&mut self, key: &str, default: T) -> T {
        self.take_opt(key).unwrap_or(default)
    }

    fn duration(&mut self, key: &str, default: Duration) -> Duration {
        match self.map.remove(key) {
            None => default,
            Some(Value::Number(n)) if n.as_u64().is_some() => Duration::from_secs(n.as_u64().unwrap_or_default()),
            Some(Value::String(text)) => crate::duration::parse(&text).unwrap_or_else(|e| {
                self.problem(key, &e);
                default
            }),
            Some(other) => {
                self.problem(key, &format!("invalid duration {other} (expected e.g. \"30s\")"));
                default
            }
        }
    }

    fn range(&self, key: &str, value: Duration, min: Duration, max: Duration) {
        if value < min || value > max {
            let f = crate::duration::format;
            self.problem(key, &format!("{} is out of range ({}..{})", f(value), f(min), f(max)));
        }
    }

    /// An array, or a comma-separated string (environment overrides).
    fn list(&mut self, key: &str) -> Option<Vec<String>> {
        match self.map.remove(key)? {
            Value::Array(items) => Some(
                items
                    .iter()
                    .map(|i| i.as_str().map(str::to_owned).unwrap_or_else(|| i.to_string()))
                    .collect(),
            ),
            Value::String(s) => Some(
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
            other => {
                self.problem(key, &format!("expected a list, got {other}"));
                None
            }
        }
    }

    /// File mode: an octal string ("0660") or a number (TOML `0o660`).
    fn mode(&mut self, key: &str) -> Option<u32> {
        let mode = match self.map.remove(key)? {
            Value::String(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8).ok(),
            Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            _ => None,
        };
        match mode {
            Some(m) if m <= 0o777 => Some(m),
            _ => {
                self.problem(key, "expected an octal mode such as \"0660\"");
                None
            }
        }
    }

    fn finish(self) {
        for key in self.map.keys() {
            self.problem(key, "unknown key");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "127.0.0.1:50051".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:50051".parse().unwrap())
        );
        assert_eq!(
            "[::1]:1".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("[::1]:1".parse().unwrap())
        );
        assert_eq!(
            "localhost:9".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:9".parse().unwrap())
        );
        assert_eq!(
            "unix:/run/x.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/x.sock".into())
        );
        for bad in ["unix:", "unix:relative.sock", "nohost", "1.2.3.4", "example.com:80"] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
    }
}
