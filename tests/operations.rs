//! Operations, in-process over real sockets: key rotation by a Kubernetes-
//! style secret swap and by reload, a failed rotation keeping the old key,
//! an invalid configuration rejected on reload, `/metrics` in Prometheus text
//! with the documented names, and readiness vs liveness during an outage.
//! Logs are captured throughout and must hold no secret and no token.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use flute_token_broker::Environment;
use flute_token_broker::config::Config;
use flute_token_broker::credentials::CredentialTable;
use flute_token_broker::daemon;
use flute_token_broker::emulator::FaultRequest;
use flute_token_broker::wire::pb;
use support::{
    CLIENT_ID, CLIENT_SECRET, LogCapture, http_client, next_outage, next_token, start_broker_with, start_emulator,
};

const SANDBOX: i32 = pb::Environment::Sandbox as i32;

/// Writes `secret` as a new version of a Kubernetes-style secret volume:
/// `dir/vN/secret`, `dir/..data -> vN` swapped atomically, `dir/secret -> ..data/secret`.
fn publish_secret(dir: &Path, version: u32, secret: &str) {
    let version_dir = dir.join(format!("v{version}"));
    std::fs::create_dir_all(&version_dir).unwrap();
    std::fs::write(version_dir.join("secret"), secret).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("v{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if !dir.join("secret").exists() {
        std::os::unix::fs::symlink("..data/secret", dir.join("secret")).unwrap();
    }
}

fn assert_no_leak(logs: &LogCapture, secrets: &[&str]) {
    let text = logs.text();
    assert!(text.contains("token request"), "logs were captured");
    for s in secrets {
        assert!(
            !text.contains(s),
            "a secret or token ({} chars) reached the logs",
            s.len()
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn secret_swap_rotates_the_key_and_a_bad_key_is_refused() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let secrets = tempfile::tempdir().unwrap();
    publish_secret(secrets.path(), 1, CLIENT_SECRET);
    let secret_path = secrets.path().join("secret");
    let broker = start_broker_with(&[Environment::Sandbox], Duration::from_secs(900), |_, config| {
        config.credentials = CredentialTable {
            client_id: Some(CLIENT_ID.into()),
            client_secret_file: Some(secret_path.clone()),
            poll_interval: Some(Duration::from_millis(100)),
            ..Default::default()
        };
    })
    .await;
    let admin = broker.daemon.admin_addr.unwrap();
    let mut client = broker.client().await;
    let mut watch = support::open_watch(&mut client, SANDBOX).await;
    let t1 = next_token(&mut watch).await;

    // Flute side: a new key replaces the compromised one. Then the secret volume is updated.
    broker
        .emulator(Environment::Sandbox)
        .set_client(CLIENT_ID, "rotated-secret-2");
    publish_secret(secrets.path(), 2, "rotated-secret-2\n");
    let t2 = next_token(&mut watch).await;
    assert_ne!(
        t2.token_id, t1.token_id,
        "the new key produced a new token, on the same open stream"
    );
    assert_eq!(
        support::metric(admin, "flute_broker_credential_reloads_total{result=\"replaced\"}").await,
        1.0
    );

    // A wrong key is tried, refused, and changes nothing.
    publish_secret(secrets.path(), 3, "typo-in-the-new-secret");
    support::await_metric(admin, "flute_broker_credential_reloads_total{result=\"failed\"}", 1.0).await;
    let current = support::current_token(&mut client, SANDBOX).await;
    assert_eq!(current.token_id, t2.token_id, "the old key's token stays");
    let stats = broker.emulator(Environment::Sandbox).stats();
    assert_eq!(
        stats.grants["client_credentials"]["invalid_client"], 1,
        "the bad key was tried once, not retried every poll: {stats:?}"
    );
    let status = client.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.environments[0].state, pb::State::Ready as i32);
    // An unreadable secret file is reported once, not on every poll, and changes nothing.
    std::fs::remove_file(secrets.path().join("v3/secret")).unwrap();
    support::await_metric(admin, "flute_broker_credential_reloads_total{result=\"failed\"}", 2.0).await;
    // Five more polls of the file, counted rather than timed.
    let polls = support::metric(admin, "flute_broker_credential_polls_total").await;
    support::await_metric(admin, "flute_broker_credential_polls_total", polls + 5.0).await;
    assert_eq!(
        support::metric(admin, "flute_broker_credential_reloads_total{result=\"failed\"}").await,
        2.0
    );
    assert_eq!(logs.text().matches("cannot re-read the API key").count(), 1);

    // And a forced refresh still works with the key in use.
    let t3 = client
        .refresh_token(pb::RefreshTokenRequest {
            environment: SANDBOX,
            rejected_token_id: t2.token_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    assert_ne!(t3.token_id, t2.token_id);
    assert_no_leak(
        &logs,
        &[
            CLIENT_SECRET,
            "rotated-secret-2",
            "typo-in-the-new-secret",
            &t1.access_token,
            &t2.access_token,
            &t3.access_token,
        ],
    );
}

fn config_file(token_url: &str, secret: &Path) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[oauth]\nallow_insecure_http = true\n\
         [credentials]\nclient_id = \"{CLIENT_ID}\"\nclient_secret_file = \"{}\"\npoll_interval = \"0s\"\n\
         [environments.sandbox]\ntoken_url = \"{token_url}\"\n[environments.production]\nenabled = false\n",
        secret.display()
    )
}

#[tokio::test(flavor = "current_thread")]
async fn reload_rejects_invalid_configuration_then_applies_a_new_key() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let emu = start_emulator(Duration::from_secs(900), true).await;
    let dir = tempfile::tempdir().unwrap();
    let (secret, path) = (dir.path().join("secret"), dir.path().join("broker.toml"));
    std::fs::write(&secret, CLIENT_SECRET).unwrap();
    std::fs::write(&path, config_file(&emu.token_url(), &secret)).unwrap();
    let config = Config::load(Some(&path)).unwrap().config;
    let running = daemon::Broker::build(config, Some(path.clone())).await.unwrap();
    let addr = running.grpc_addrs[0].to_string();
    let mut client = flute_token_broker::client::connect(&addr, Duration::from_secs(5))
        .await
        .unwrap();
    let mut watch = support::open_watch(&mut client, SANDBOX).await;
    let t1 = next_token(&mut watch).await;

    std::fs::write(&path, "[refresh]\nratio = 9.0\nnonsense = true\n").unwrap();
    let outcome = running.reload().await;
    assert!(!outcome.is_ok());
    let err = outcome.rejected().expect("rejected");
    assert!(err.problems.len() >= 2, "{err}");
    let same = support::current_token(&mut client, SANDBOX).await;
    assert_eq!(same.token_id, t1.token_id, "a rejected reload disturbs nothing");

    emu.emulator.set_client(CLIENT_ID, "second-secret");
    std::fs::write(&secret, "second-secret").unwrap();
    std::fs::write(&path, config_file(&emu.token_url(), &secret)).unwrap();
    let outcome = running.reload().await;
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(outcome.report().unwrap().replaced, vec![Environment::Sandbox]);
    let t2 = next_token(&mut watch).await;
    assert_ne!(t2.token_id, t1.token_id);
    assert_eq!(
        running.reload().await.report().unwrap().unchanged,
        vec![Environment::Sandbox],
        "reloading the same key is a no-op"
    );
    std::fs::write(&secret, "wrong-secret").unwrap();
    let outcome = running.reload().await;
    assert!(!outcome.is_ok(), "a key that fails verification is a failed reload");
    let failed = &outcome.report().expect("the file itself was valid").failed;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, Environment::Sandbox);
    let kept = support::current_token(&mut client, SANDBOX).await;
    assert_eq!(kept.token_id, t2.token_id, "the current key and token stay in use");
    running.shutdown().await;
    assert_no_leak(
        &logs,
        &[
            CLIENT_SECRET,
            "second-secret",
            "wrong-secret",
            &t1.access_token,
            &t2.access_token,
        ],
    );
}

/// Parses Prometheus/OpenMetrics text: every sample line is `name{labels} value`
/// and belongs to a family declared by `# TYPE`. Returns sample name → value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut families = Vec::new();
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families.push(rest.split_whitespace().next().unwrap().to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap();
        if series.contains('{') {
            assert!(series.ends_with('}'), "unterminated labels in {line:?}");
        }
        assert!(
            families.iter().any(|f| name.starts_with(f.as_str())),
            "{name} has no # TYPE"
        );
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name {name}"
        );
        samples.insert(series.to_owned(), value);
    }
    assert!(text.trim_end().ends_with("# EOF"));
    samples
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_the_documented_names() {
    let broker = start_broker_with(&Environment::ALL, Duration::from_secs(900), |_, _| {}).await;
    let mut client = broker.client().await;
    client
        .get_token(pb::GetTokenRequest {
            environment: SANDBOX,
            min_remaining: None,
        })
        .await
        .unwrap();
    let _ = client
        .get_token(pb::GetTokenRequest {
            environment: 0,
            min_remaining: None,
        })
        .await;
    let mut watch = support::open_watch(&mut client, SANDBOX).await;
    next_token(&mut watch).await;
    let admin = broker.daemon.admin_addr.unwrap();
    let response = http_client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert!(response.headers()["content-type"].to_str().unwrap().contains("text"));
    let samples = parse_metrics(&response.text().await.unwrap());
    let names = [
        "flute_broker_token_refreshes_total{environment=\"sandbox\",grant=\"client_credentials\",result=\"ok\"}",
        "flute_broker_token_endpoint_request_duration_seconds_count{environment=\"sandbox\"}",
        "flute_broker_token_seconds_until_expiry{environment=\"production\"}",
        "flute_broker_token_valid{environment=\"sandbox\"}",
        "flute_broker_token_consecutive_failures{environment=\"sandbox\"}",
        "flute_broker_grpc_requests_total{protocol=\"grpc\",method=\"GetToken\",code=\"OK\"}",
        "flute_broker_grpc_requests_total{protocol=\"grpc\",method=\"GetToken\",code=\"INVALID_ARGUMENT\"}",
        "flute_broker_watch_streams",
        "flute_broker_build_info{version=\"0.1.0\"}",
    ];
    for name in names {
        assert!(
            samples.contains_key(name),
            "missing {name} in {:#?}",
            samples.keys().collect::<Vec<_>>()
        );
    }
    assert_eq!(samples["flute_broker_token_valid{environment=\"sandbox\"}"], 1.0);
    assert_eq!(samples["flute_broker_watch_streams"], 1.0);
    let left = samples["flute_broker_token_seconds_until_expiry{environment=\"production\"}"];
    assert!(left > 880.0 && left <= 900.0, "{left}");
    drop(watch);
}

#[tokio::test]
async fn readiness_follows_the_tokens_while_liveness_stays_up() {
    let broker = start_broker_with(&[Environment::Sandbox], Duration::from_secs(2), |_, _| {}).await;
    let admin = broker.daemon.admin_addr.unwrap();
    let http = http_client();
    let get = |path: &str| http.get(format!("http://{admin}{path}")).send();
    let mut client = broker.client().await;
    let mut watch = support::open_watch(&mut client, SANDBOX).await;
    next_token(&mut watch).await;
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    broker.emulator(Environment::Sandbox).set_faults(FaultRequest {
        refuse_all: Some(true),
        ..Default::default()
    });
    next_outage(&mut watch).await;
    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("sandbox: no valid token"));
    assert_eq!(
        get("/healthz").await.unwrap().status(),
        200,
        "an endpoint outage never fails liveness"
    );
    assert_eq!(
        support::metric(admin, "flute_broker_token_valid{environment=\"sandbox\"}").await,
        0.0
    );
    assert!(
        support::metric(
            admin,
            "flute_broker_token_consecutive_failures{environment=\"sandbox\"}"
        )
        .await
            >= 1.0
    );

    broker.emulator(Environment::Sandbox).set_faults(FaultRequest {
        clear: true,
        ..Default::default()
    });
    next_token(&mut watch).await;
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
}
