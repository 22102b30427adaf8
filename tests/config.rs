//! Configuration validation as a table: every rule, several problems at
//! once, environment overrides, redaction, and the example file.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use flute_token_broker::Environment;
use flute_token_broker::config::Config;
use flute_token_broker::credentials::ValueSource;
use flute_token_broker::serve::listen::ListenAddr;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "very-secret-value\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        Self { dir }
    }

    fn secret(&self) -> String {
        self.dir.path().join("secret").display().to_string()
    }

    /// A valid configuration plus `extra` TOML.
    fn load(&self, extra: &str) -> Result<flute_token_broker::config::Loaded, Vec<String>> {
        self.load_with_env(extra, HashMap::new())
    }

    fn load_with_env(
        &self,
        extra: &str,
        env: HashMap<String, String>,
    ) -> Result<flute_token_broker::config::Loaded, Vec<String>> {
        let path = self.dir.path().join("broker.toml");
        let base = format!(
            "[credentials]\nclient_id = \"my-id\"\nclient_secret_file = \"{}\"\n",
            self.secret()
        );
        std::fs::write(&path, merge(&base, extra)).unwrap();
        Config::load_with_env(Some(&path), Some(env)).map_err(|e| e.problems)
    }
}

/// Appends `extra`, letting it replace the base [credentials] table.
fn merge(base: &str, extra: &str) -> String {
    if extra.contains("[credentials]") {
        extra.to_owned()
    } else {
        format!("{base}\n{extra}")
    }
}

#[test]
fn defaults_point_at_flute_and_need_only_credentials() {
    let f = Fixture::new();
    let config = f.load("").unwrap().config;
    assert_eq!(
        config.environments[&Environment::Sandbox].token_url,
        "https://sandbox.oauth.api.flute.com/oauth2/token"
    );
    assert_eq!(
        config.environments[&Environment::Production].token_url,
        "https://oauth.api.flute.com/oauth2/token"
    );
    assert!(config.enabled().count() == 2);
    assert_eq!(
        config.server.listen,
        vec![ListenAddr::Tcp("127.0.0.1:50051".parse().unwrap())]
    );
    assert_eq!(config.refresh.refresh_ratio, 0.75);
    assert_eq!(config.oauth.request_timeout, Duration::from_secs(30));
    assert_eq!(
        config.key_source(Environment::Sandbox).unwrap().client_secret,
        ValueSource::File(f.secret().into())
    );
}

#[test]
fn each_rule_reports_its_key_path() {
    let f = Fixture::new();
    let cases: &[(&str, &str)] = &[
        ("bogus = 1", "bogus: unknown key"),
        ("[server]\nlisten_on = []", "server.listen_on: unknown key"),
        ("[server]\nlisten = [\"nowhere\"]", "server.listen"),
        ("[server]\nlisten = []", "server.listen: at least one listener"),
        ("[server]\nlisten = [\"unix:relative.sock\"]", "must be absolute"),
        ("[server]\nunix_socket_mode = \"999\"", "server.unix_socket_mode"),
        ("[server]\nshutdown_grace = \"soon\"", "server.shutdown_grace"),
        ("[admin]\nlisten = \"everywhere\"", "admin.listen"),
        ("[log]\nformat = \"xml\"", "log.format"),
        ("[log]\nlevel = \"info,[[[\"", "log.level"),
        ("[oauth]\nclient_auth = \"private_key_jwt\"", "oauth.client_auth"),
        (
            "[oauth]\nrequest_timeout = \"10m\"",
            "oauth.request_timeout: 10m is out of range",
        ),
        (
            "[oauth]\nuse_refresh_token = \"maybe\"",
            "oauth.use_refresh_token: invalid value",
        ),
        ("[refresh]\nratio = 1.5", "refresh.ratio must be between"),
        (
            "[telemetry]\nendpoint = \"collector:4317\"",
            "telemetry.endpoint: \"collector:4317\" is not an http:// or https:// URL",
        ),
        (
            "[telemetry]\nendpoint = \"http://c:4318\"\nprotocol = \"thrift\"",
            "telemetry.protocol: \"thrift\" is not \"grpc\"",
        ),
        (
            "[telemetry]\nendpoint = \"http://c:4317\"\nsampling_ratio = 2.0",
            "telemetry.sampling_ratio: 2 is not between 0 and 1",
        ),
        (
            "[certificates]\npoll_interval = \"100ms\"",
            "certificates.poll_interval",
        ),
        ("[refresh]\njitter = 0.5", "refresh.jitter must be between"),
        (
            "[refresh]\nbackoff_initial = \"2m\"\nbackoff_max = \"1m\"",
            "refresh.backoff_initial",
        ),
        ("[refresh]\nserve_margin = \"1h\"", "refresh.serve_margin"),
        ("[refresh]\nretry_after_max = \"100000d\"", "refresh.retry_after_max"),
        (
            "[refresh]\nearly_refresh_interval = \"2h\"",
            "refresh.early_refresh_interval",
        ),
        ("[server]\nrequest_wait = \"0s\"", "server.request_wait"),
        (
            "[environments.sandbox.proxy]\nlisten = [\"0.0.0.0:8481\"]",
            "environments.sandbox.proxy.listen: 0.0.0.0:8481 is not a loopback address",
        ),
        (
            "[environments.sandbox.proxy]\nlisten = [\"127.0.0.1:8481\"]\napi_url = \"http://api.example.com\"",
            "environments.sandbox.proxy.api_url",
        ),
        (
            "[environments.sandbox.proxy]\nlisten = [\"127.0.0.1:8481\"]\nreplay_limit_bytes = 2048\nmax_body_bytes = 1024",
            "environments.sandbox.proxy.replay_limit_bytes: must not exceed max_body_bytes",
        ),
        (
            "[environments.sandbox.proxy]\nlisten = [\"127.0.0.1:50051\"]",
            "environments.sandbox.proxy.listen: 127.0.0.1:50051 is also a server.listen address",
        ),
        (
            "[credentials]\nclient_id = \"my-id\"\nclient_secret_file = \"SECRET\"\npoll_interval = \"2h\"",
            "credentials.poll_interval",
        ),
        ("[systemd]\nready_timeout = \"2h\"", "systemd.ready_timeout"),
        (
            "[environments.production]\nallowed_unix_users = [\"no-such-user-x\"]",
            "environments.production.allowed_unix_users: unknown user",
        ),
        (
            "[environments.production]\nallowed_unix_groups = [\"no-such-group-x\"]",
            "environments.production.allowed_unix_groups: unknown group",
        ),
        (
            "[environments.production]\nallowed_tls_clients = [\"spiffe://fleet.example/agent\"]",
            "environments.production.allowed_tls_clients: needs server.tls.client_ca_file",
        ),
        (
            "[environments.sandbox]\ntoken_url = \"http://oauth.example.com/token\"",
            "environments.sandbox.token_url: \"http://oauth.example.com/token\": https is required",
        ),
        (
            "[oauth]\nallow_insecure_http = true\n[environments.sandbox]\ntoken_url = \"http://oauth.example.com/token\"",
            "only allowed for loopback",
        ),
        (
            "[environments.sandbox]\ntoken_url = \"ftp://x/y\"",
            "unsupported scheme",
        ),
        (
            "[environments.sandbox]\ntoken_url = \"not a url\"",
            "environments.sandbox.token_url",
        ),
        (
            "[environments.sandbox]\nenabled = false\n[environments.production]\nenabled = false",
            "at least one environment must be enabled",
        ),
        (
            "[environments.staging]\nenabled = true",
            "environments.staging: unknown key",
        ),
        (
            "[credentials]\nclient_id = \"x\"\nclient_secret = \"inline!\"",
            "credentials.client_secret: secrets are never written",
        ),
        (
            "[credentials]\nclient_id = \"x\"",
            "credentials.client_id: set, but no client secret source is set",
        ),
        (
            "[credentials]\nclient_id = \"x\"\nclient_secret_env = \"A\"\nclient_secret_file = \"/b\"",
            "credentials.client_secret: give exactly one source",
        ),
        (
            "[credentials]\nclient_id = \"x\"\nclient_secret_file = \"/nonexistent/secret\"",
            "cannot read client secret from /nonexistent/secret",
        ),
        (
            "[credentials]\nclient_id = \"x\"\nclient_secret_env = \"FLUTE_TEST_UNSET_SECRET_VAR\"",
            "FLUTE_TEST_UNSET_SECRET_VAR is not set",
        ),
        (
            "[credentials]\nclient_id = \"x\"\nclient_secret_credential = \"flute-secret\"",
            "CREDENTIALS_DIRECTORY",
        ),
        ("[credentials]\npoll_interval = \"5s\"", "credentials: no API key"),
    ];
    for (extra, needle) in cases {
        let problems = f
            .load(extra)
            .err()
            .unwrap_or_else(|| panic!("{extra:?} should be rejected"));
        assert!(
            problems.iter().any(|p| p.contains(needle)),
            "{extra:?}: expected {needle:?} in {problems:#?}"
        );
        assert!(
            !problems
                .iter()
                .any(|p| p.contains("very-secret-value") || p.contains("inline!")),
            "a secret leaked into {problems:?}"
        );
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let f = Fixture::new();
    let problems = f.load("junk = 1\n[server]\nlisten = [\"bad\"]\n[refresh]\nratio = 7.0\n[log]\nformat = \"x\"\n[environments.sandbox]\ntoken_url = \"http://a.b/c\"").unwrap_err();
    assert!(problems.len() >= 5, "{problems:#?}");
}

#[test]
fn accepted_variants() {
    let f = Fixture::new();
    let ok = |extra: &str| f.load(extra).unwrap_or_else(|p| panic!("{extra:?}: {p:?}")).config;
    let c = ok("[admin]\nlisten = \"\"");
    assert_eq!(c.admin.listen, None);
    let c = ok(
        "[oauth]\nallow_insecure_http = true\n[environments.sandbox]\ntoken_url = \"http://127.0.0.1:8080/oauth2/token\"",
    );
    assert!(c.oauth.allow_insecure_http);
    let c = ok("[server]\nunix_socket_mode = 0o600\nlisten = [\"unix:/run/x.sock\", \"[::1]:5\"]");
    assert_eq!(c.server.unix_socket_mode, 0o600);
    assert_eq!(c.server.listen.len(), 2);
    let c = ok("[refresh]\nexpiry_margin = 30\nbackoff_max = \"2m\"");
    assert_eq!(c.refresh.expiry_margin, Duration::from_secs(30));
    assert_eq!(c.refresh.backoff_max, Duration::from_secs(120));
    let c = ok("[environments.production]\nallowed_unix_users = [\"root\", \"1001\"]\nallowed_unix_groups = [\"0\"]");
    assert_eq!(
        c.environments[&Environment::Production].allowed_unix_users,
        vec![0, 1001]
    );
    assert_eq!(c.environments[&Environment::Production].allowed_unix_groups, vec![0]);
    let c = ok("[environments.production]\nenabled = false");
    assert_eq!(c.enabled().count(), 1);
    // Per-environment credentials.
    let c = ok(&format!(
        "[environments.production.credentials]\nclient_id = \"prod-id\"\nclient_secret_file = \"{}\"",
        f.secret()
    ));
    assert_eq!(
        c.key_source(Environment::Production).unwrap().client_id,
        ValueSource::Inline("prod-id".into())
    );
    assert_eq!(
        c.key_source(Environment::Sandbox).unwrap().client_id,
        ValueSource::Inline("my-id".into())
    );
}

#[test]
fn environment_overrides() {
    let f = Fixture::new();
    let env: HashMap<String, String> = [
        ("FLUTE_BROKER__SERVER__LISTEN", "unix:/run/broker.sock, 127.0.0.1:7000"),
        ("FLUTE_BROKER__REFRESH__RATIO", "0.8"),
        ("FLUTE_BROKER__OAUTH__USE_REFRESH_TOKEN", "false"),
        ("FLUTE_BROKER__OAUTH__CLIENT_AUTH", "client_secret_post"),
        ("FLUTE_BROKER__ENVIRONMENTS__PRODUCTION__ENABLED", "false"),
        ("FLUTE_BROKER__SERVER__UNIX_SOCKET_MODE", "0600"),
        ("FLUTE_BROKER__LOG__FORMAT", "json"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let c = f.load_with_env("[refresh]\nratio = 0.7", env).unwrap().config;
    assert_eq!(
        c.server.listen,
        vec![
            ListenAddr::Unix("/run/broker.sock".into()),
            ListenAddr::Tcp("127.0.0.1:7000".parse().unwrap())
        ]
    );
    assert_eq!(c.refresh.refresh_ratio, 0.8, "the environment wins over the file");
    assert!(!c.oauth.use_refresh_token);
    assert_eq!(
        c.oauth.client_auth,
        flute_token_broker::oauth::ClientAuth::ClientSecretPost
    );
    assert!(!c.environments[&Environment::Production].enabled);
    assert_eq!(c.server.unix_socket_mode, 0o600);
    let bad: HashMap<String, String> = [("FLUTE_BROKER__REFRESH__RATIO".to_owned(), "lots".to_owned())].into();
    assert!(
        f.load_with_env("", bad)
            .unwrap_err()
            .iter()
            .any(|p| p.contains("refresh.ratio"))
    );
}

#[test]
fn readable_secret_file_warns() {
    let f = Fixture::new();
    std::fs::set_permissions(f.secret(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let loaded = f.load("").unwrap();
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("accessible by group or others")),
        "{:?}",
        loaded.warnings
    );
}

#[test]
fn a_secret_readable_by_the_brokers_own_group_is_accepted() {
    use std::os::unix::fs::MetadataExt;
    let f = Fixture::new();
    let own_gid = nix::unistd::getegid().as_raw();
    // How Kubernetes (Secret volume, defaultMode 0400, fsGroup) and systemd
    // (LoadCredential) deliver it: 0440, owned by a group the process is in.
    std::fs::set_permissions(f.secret(), std::fs::Permissions::from_mode(0o440)).unwrap();
    assert_eq!(std::fs::metadata(f.secret()).unwrap().gid(), own_gid);
    let loaded = f.load("").unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);

    // A group the broker is not in still warns (needs root to chown).
    if nix::unistd::geteuid().is_root() {
        let stranger = 4242;
        assert!(!nix::unistd::getgroups().unwrap().iter().any(|g| g.as_raw() == stranger));
        std::os::unix::fs::chown(f.secret(), None, Some(stranger)).unwrap();
        let loaded = f.load("").unwrap();
        assert!(
            loaded
                .warnings
                .iter()
                .any(|w| w.contains("group 4242, which the broker is not in")),
            "{:?}",
            loaded.warnings
        );
    }
}

#[test]
fn effective_configuration_round_trips_without_secrets() {
    let f = Fixture::new();
    let config = f
        .load("[refresh]\nratio = 0.7\n[server]\nlisten = [\"unix:/run/b.sock\"]")
        .unwrap()
        .config;
    let text = config.to_toml();
    assert!(!text.contains("very-secret-value"));
    assert!(text.contains("client_secret_file"));
    let path = f.dir.path().join("effective.toml");
    std::fs::write(&path, &text).unwrap();
    let again = Config::load_with_env(Some(&path), Some(HashMap::new())).unwrap().config;
    assert_eq!(again, config);
}

#[test]
fn the_example_file_is_valid() {
    let f = Fixture::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config.example.toml");
    let env: HashMap<String, String> =
        [("FLUTE_BROKER__CREDENTIALS__CLIENT_SECRET_FILE".to_owned(), f.secret())].into();
    let config = Config::load_with_env(Some(&example), Some(env))
        .unwrap_or_else(|e| panic!("{e}"))
        .config;
    let defaults = Config {
        credentials: config.credentials.clone(),
        ..Default::default()
    };
    assert_eq!(config, defaults, "the example must show the defaults");
}

#[test]
fn missing_file_is_a_clear_error() {
    let err = Config::load_with_env(Some(Path::new("/nonexistent/broker.toml")), Some(HashMap::new())).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/broker.toml"));
}

#[test]
fn reload_diff_applies_key_sources_live_and_names_every_other_change() {
    let f = Fixture::new();
    let old = f.load("").unwrap().config;
    assert_eq!(old.diff(&old), Default::default());
    let new = f
        .load(&format!(
            "[credentials]\nclient_id = \"other-id\"\nclient_secret_file = \"{secret}\"\npoll_interval = \"1m\"\n\
             [refresh]\nratio = 0.7\n[server]\nlisten = [\"127.0.0.1:7000\"]\n\
             [environments.production.credentials]\nclient_id = \"p\"\nclient_secret_file = \"{secret}\"",
            secret = f.secret()
        ))
        .unwrap()
        .config;
    let diff = old.diff(&new);
    assert_eq!(
        diff.credentials,
        vec!["credentials.client_id", "environments.production.credentials"]
    );
    assert_eq!(
        diff.needs_restart,
        vec!["credentials.poll_interval", "refresh.ratio", "server.listen"]
    );
}

/// Hub and agent configurations: an environment either calls the endpoint
/// (token_url, an API key) or follows hubs (upstream, no key); mixed
/// configurations are fine per environment, contradictions are named.
#[test]
fn upstream_environments_need_no_key_and_contradictions_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let load = |text: &str| {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        Config::load_with_env(Some(&path), Some(HashMap::new()))
    };
    // An agent: no [credentials] at all, nothing read.
    let agent = load(
        "[environments.sandbox]\nupstream = [\"unix:/run/hub/broker.sock\", \"https://hub.flute-token-broker.svc:50051\"]\n\
         [environments.production]\nupstream = [\"https://hub.flute-token-broker.svc:50051\"]\n",
    )
    .expect("an agent needs no API key");
    assert!(agent.warnings.is_empty(), "{:?}", agent.warnings);
    assert!(agent.config.key_source(Environment::Sandbox).is_none());
    assert!(agent.config.environments[&Environment::Sandbox].token_url.is_empty());
    assert!(!agent.config.to_toml().contains("token_url"));

    // Mixed: production direct with a key, sandbox following a hub.
    let fixture = Fixture::new();
    let mixed = fixture
        .load("[environments.sandbox]\nupstream = [\"unix:/run/hub/broker.sock\"]\n")
        .expect("mixed");
    assert!(mixed.config.key_source(Environment::Sandbox).is_none());
    assert!(mixed.config.key_source(Environment::Production).is_some());

    // Every enabled environment follows, yet a key is configured: unused.
    let idle = fixture
        .load("[environments.sandbox]\nupstream = [\"unix:/run/a.sock\"]\n[environments.production]\nupstream = [\"unix:/run/a.sock\"]\n")
        .unwrap();
    assert!(
        idle.warnings.iter().any(|w| w.starts_with("credentials: not used")),
        "{:?}",
        idle.warnings
    );

    let problems = load(
        "[environments.sandbox]\nupstream = [\"hub:50051\", \"https://hub\", \"unix:relative.sock\"]\ntoken_url = \"https://x.example/token\"\n\
         [environments.sandbox.credentials]\nclient_id = \"a\"\nclient_secret_env = \"X\"\n\
         [environments.production]\nenabled = false\n\
         [upstream]\ncert_file = \"/a.pem\"\n",
    )
    .unwrap_err()
    .problems;
    for needle in [
        "environments.sandbox.upstream: \"hub:50051\": expected unix:/path, http://host:port or https://host:port",
        "environments.sandbox.upstream: \"https://hub\": name the port",
        "environments.sandbox.upstream: \"unix:relative.sock\": a Unix socket needs an absolute path",
        "environments.sandbox: token_url and upstream are both set",
        "environments.sandbox.credentials: this environment follows hub brokers",
        "upstream.cert_file and key_file: set both",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(needle)),
            "{needle}: {problems:#?}"
        );
    }

    // Nothing at all: the problem says both ways out.
    let none = load("").unwrap_err().problems;
    assert!(
        none.iter().any(|p| p.contains("environments.NAME.upstream")),
        "{none:?}"
    );

    // Certificates that cannot be read are a problem before start.
    let unreadable = load(
        "[upstream]\nca_file = \"/nonexistent/hub-ca.pem\"\n[environments.sandbox]\nupstream = [\"https://hub.example:50051\"]\n[environments.production]\nenabled = false\n",
    )
    .unwrap_err()
    .problems;
    assert!(
        unreadable
            .iter()
            .any(|p| p.starts_with("upstream: /nonexistent/hub-ca.pem: cannot read")),
        "{unreadable:?}"
    );

    // A hub over plain http across the network carries tokens in clear.
    let clear = load(
        "[environments.sandbox]\nupstream = [\"http://10.0.0.7:50051\"]\n[environments.production]\nenabled = false\n",
    )
    .unwrap();
    assert!(
        clear.warnings.iter().any(|w| w.contains("unencrypted")),
        "{:?}",
        clear.warnings
    );
}

#[test]
fn named_callers_and_access_rules() {
    let f = Fixture::new();
    let rules = "[callers.billing]\nsystemd_units = [\"billing.service\"]\nunix_users = [\"root\"]\n\
                 [callers.reports]\nunix_groups = \"0\"\n\
                 [callers.spare]\nunix_users = [0]\n\
                 [environments.production.access]\ntoken = [\"billing\"]\n\
                 proxy = { billing = [\"GET /v2/**\", \"POST /v2/transactions\"], reports = [\"GET /v2/transactions/**\"] }\n";
    let loaded = f.load(rules).unwrap();
    assert_eq!(
        loaded.config.callers["billing"].unix_users,
        [0],
        "names resolved to ids"
    );
    assert!(
        loaded
            .warnings
            .contains(&"callers.spare: no environment's access uses it".to_owned()),
        "{:?}",
        loaded.warnings
    );
    let (table, _) = loaded.config.policy().unwrap().table();
    assert!(
        table.contains(
            &"access: reports → production: proxy only (never the token): GET /v2/transactions/**".to_owned()
        ),
        "{table:#?}"
    );
    assert!(
        table.iter().any(|l| l.starts_with("access: sandbox: open")),
        "{table:#?}"
    );
    // The effective configuration round-trips with its rules.
    let again = Config::from_toml_str(&loaded.config.to_toml(), HashMap::new()).unwrap();
    assert_eq!(again.config.callers, loaded.config.callers);
    assert_eq!(again.config.environments, loaded.config.environments);

    let problems = f
        .load(
            "[callers.empty]\n[callers.x]\nsystemd_units = [\"x.socket\"]\nbogus = 1\n\
             [environments.sandbox]\nallowed_unix_users = [\"root\"]\n\
             [environments.sandbox.access]\ntoken = [\"ghost\"]\nproxy = { empty = [\"GET v2\"] }\n",
        )
        .unwrap_err();
    for expected in [
        "callers.x.bogus",
        "callers.empty: names no identity",
        "environments.sandbox.access.token: \"ghost\" is not a caller",
        "environments.sandbox.access.proxy.empty: \"GET v2\"",
        "environments.sandbox: allowed_unix_users",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{expected}: {problems:#?}"
        );
    }
}
