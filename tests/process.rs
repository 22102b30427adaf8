//! The binary as users run it: `serve --dev` as a real process, the CLI
//! clients against it, exit codes, and SIGTERM handling.

mod support;

use std::process::Stdio;
use std::time::Duration;

use flute_token_broker::wire::pb::{self, watch_token_response::Update};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_stream::StreamExt;

const BIN: &str = env!("CARGO_BIN_EXE_flute-token-broker");

struct DevBroker {
    child: Child,
    addr: String,
    emulator: String,
    _dir: Option<tempfile::TempDir>,
}

/// Starts `serve --dev` on a Unix socket and reads its banner.
async fn start_dev(lifetime: &str) -> DevBroker {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_dev_in(dir.path(), lifetime).await;
    broker._dir = Some(dir);
    broker
}

/// As [`start_dev`], with the socket `broker.sock` in `dir`.
async fn start_dev_in(dir: &std::path::Path, lifetime: &str) -> DevBroker {
    let sock = dir.join("broker.sock");
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--admin-listen",
            "",
            "--dev-token-lifetime",
            lifetime,
            "--listen",
        ])
        .arg(format!("unix:{}", sock.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut emulator = String::new();
    let banner = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.trim().strip_prefix("emulator:") {
                emulator = rest.split_whitespace().next().unwrap().to_owned();
            }
            if line.starts_with("Stop with") {
                return;
            }
        }
        panic!("serve --dev exited before printing its banner");
    };
    tokio::time::timeout(Duration::from_secs(20), banner)
        .await
        .expect("banner within 20 s");
    assert!(emulator.starts_with("http://127.0.0.1:"), "{emulator}");
    DevBroker {
        child,
        addr: format!("unix:{}", sock.display()),
        emulator,
        _dir: None,
    }
}

async fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn sigterm_ends_watch_streams_with_unavailable_and_exits_zero() {
    let mut broker = start_dev("900s").await;
    let mut client = flute_token_broker::client::connect(&broker.addr, Duration::from_secs(5))
        .await
        .unwrap();
    let mut watch = support::open_watch(&mut client, pb::Environment::Sandbox as i32).await;
    assert!(matches!(
        watch.next().await.unwrap().unwrap().update,
        Some(Update::Token(_))
    ));

    support::signal(broker.child.id().unwrap(), nix::sys::signal::Signal::SIGTERM);
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("the stream ends promptly");
    let status = ended.expect("an error item, not a silent end").unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("reconnect now"), "{status:?}");
    use tonic_types::StatusExt;
    let details = status.get_error_details();
    assert_eq!(details.error_info().unwrap().reason, "SHUTTING_DOWN");
    assert_eq!(
        details.retry_info().unwrap().retry_delay,
        Some(Duration::ZERO),
        "clients reconnect at once"
    );
    let exit = tokio::time::timeout(Duration::from_secs(12), broker.child.wait())
        .await
        .expect("exit within the 10 s grace period")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn get_prints_a_token_the_api_accepts() {
    let broker = start_dev("900s").await;
    let (code, token, _) = cli(&["get", "--env", "sandbox", "--addr", &broker.addr]).await;
    assert_eq!(code, 0);
    let token = token.trim();
    let api = support::http_client()
        .get(format!("{}/v2/transactions", broker.emulator))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 200);

    let (code, header, _) = cli(&[
        "get",
        "--env",
        "production",
        "--addr",
        &broker.addr,
        "--format",
        "header",
    ])
    .await;
    assert_eq!(code, 0);
    assert!(header.starts_with("Authorization: Bearer "), "{header}");
    let (code, json, _) = cli(&[
        "get",
        "--env",
        "sandbox",
        "--addr",
        &broker.addr,
        "--format",
        "json",
        "--min-remaining",
        "60s",
    ])
    .await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["access_token"], token);
    assert_eq!(v["token_id"].as_str().unwrap().len(), 12);

    let (code, table, _) = cli(&["status", "--addr", &broker.addr]).await;
    assert_eq!(code, 0);
    assert!(
        table.contains("sandbox") && table.contains("production") && table.contains("READY"),
        "{table}"
    );
}

#[tokio::test]
async fn exit_codes_for_unreachable_bad_arguments_and_no_token() {
    let (code, _, err) = cli(&[
        "get",
        "--env",
        "sandbox",
        "--addr",
        "unix:/nonexistent/broker.sock",
        "--timeout",
        "2s",
    ])
    .await;
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("cannot reach the broker"), "{err}");
    let (code, _, _) = cli(&["get", "--env", "moon"]).await;
    assert_eq!(code, 2);

    let broker = start_dev("2s").await;
    let mut client = flute_token_broker::client::connect(&broker.addr, Duration::from_secs(5))
        .await
        .unwrap();
    let mut watch = support::open_watch(&mut client, pb::Environment::Sandbox as i32).await;
    let faults = support::http_client()
        .post(format!("{}/__emulator/faults", broker.emulator))
        .header("content-type", "application/json")
        .body(r#"{"refuse_all": true, "status": 503}"#)
        .send()
        .await
        .unwrap();
    assert!(faults.status().is_success());
    support::next_outage(&mut watch).await;
    let (code, _, err) = cli(&["get", "--env", "sandbox", "--addr", &broker.addr]).await;
    assert_eq!(code, 75, "{err}");
    assert!(err.contains("no valid sandbox token") && err.contains("503"), "{err}");
    // status is a probe: 75 while an environment holds no valid token.
    let (code, table, err) = cli(&["status", "--addr", &broker.addr]).await;
    assert!(table.contains("UNAVAILABLE"), "{table}");
    assert_eq!(code, 75, "{err}");
    assert!(err.contains("no valid token: sandbox"), "{err}");
    let (code, json, _) = cli(&["status", "--json", "--env", "sandbox", "--addr", &broker.addr]).await;
    assert_eq!(code, 75);
    assert!(json.ends_with("]\n"), "{json:?}");
    let listed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "--env shows one environment");
}

#[tokio::test]
async fn invalid_configuration_exits_78_listing_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = [\"nowhere\"]\nbogus = 1\n[refresh]\nratio = 3.0\n",
    )
    .unwrap();
    for command in ["check-config", "serve"] {
        let (code, _, err) = cli(&[command, "--config", path.to_str().unwrap()]).await;
        assert_eq!(code, 78, "{command}: {err}");
        for needle in [
            "server.listen",
            "server.bogus: unknown key",
            "refresh.ratio",
            "credentials",
        ] {
            assert!(err.contains(needle), "{command}: missing {needle:?} in {err}");
        }
    }
}

/// A configuration with its secret in `dir`; `extra` is appended.
fn config_with_secret(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let secret = dir.join("secret");
    std::fs::write(&secret, "a-secret\n").unwrap();
    let path = dir.join("broker.toml");
    std::fs::write(
        &path,
        format!(
            "[credentials]\nclient_id = \"id\"\nclient_secret_file = \"{}\"\n{extra}",
            secret.display()
        ),
    )
    .unwrap();
    path
}

/// A host without a CA store: `https://` token URLs with `tls_roots =
/// "system"` are a local configuration problem (78, named as such);
/// `http://` ones never load roots, and `auto` falls back to the bundled
/// roots.
#[tokio::test]
async fn tls_roots_without_a_system_store() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &'static str, command: &'static str| {
        let path = config_with_secret(dir.path(), extra);
        async move {
            let out = Command::new(BIN)
                .args([command, "--config", path.to_str().unwrap()])
                .args(if command == "serve" {
                    &["--admin-listen", ""][..]
                } else {
                    &[][..]
                })
                // rustls-native-certs reads only these when they are set.
                .env("SSL_CERT_FILE", "/nonexistent/ca.pem")
                .env("SSL_CERT_DIR", "/nonexistent")
                .stdin(Stdio::null())
                .output()
                .await
                .unwrap();
            (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };
    let https_system = "[oauth]\ntls_roots = \"system\"\n\
        [environments.sandbox]\ntoken_url = \"https://sandbox.example/oauth2/token\"\n\
        [environments.production]\nenabled = false\n[server]\nlisten = [\"127.0.0.1:0\"]\n";
    for command in ["check-config", "serve"] {
        let (code, err) = run(https_system, command).await;
        assert_eq!(code, Some(78), "{command}: {err}");
        assert!(
            err.contains("oauth.tls_roots: this host has no CA certificates")
                && err.contains("install the ca-certificates package"),
            "{command}: {err}"
        );
        assert!(!err.contains("token endpoint"), "{command} blames the endpoint: {err}");
    }
    let (code, err) = run(
        "[oauth]\ntls_roots = \"system\"\nallow_insecure_http = true\n\
         [environments.sandbox]\ntoken_url = \"http://127.0.0.1:9/oauth2/token\"\n\
         [environments.production]\nenabled = false\n",
        "check-config",
    )
    .await;
    assert_eq!(code, Some(0), "http:// needs no roots: {err}");
    let (code, err) = run(
        "[environments.sandbox]\ntoken_url = \"https://sandbox.example/oauth2/token\"\n\
         [environments.production]\nenabled = false\n",
        "check-config",
    )
    .await;
    assert_eq!(code, Some(0), "auto falls back to the bundled roots: {err}");
}

/// `reload` (the unit's ExecReload=) checks the file first: an invalid one
/// exits 78 with its problems and the process is not signalled; a valid
/// one is signalled with SIGHUP.
#[tokio::test]
async fn reload_signals_only_a_valid_configuration() {
    let dir = tempfile::tempdir().unwrap();
    // A stand-in for the broker that SIGHUP ends (its default action).
    let mut target = Command::new("sleep").arg("300").kill_on_drop(true).spawn().unwrap();
    let pid = target.id().unwrap().to_string();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[refresh]\nratio = 3.0\n").unwrap();
    let (code, _, err) = cli(&["reload", "--config", bad.to_str().unwrap(), "--pid", &pid]).await;
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("refresh.ratio") && err.contains("reload rejected: the broker (PID"),
        "{err}"
    );
    assert!(target.try_wait().unwrap().is_none(), "a rejected file is not signalled");

    let good = config_with_secret(
        dir.path(),
        "[oauth]\nallow_insecure_http = true\n[environments.sandbox]\ntoken_url = \"http://127.0.0.1:9/t\"\n\
         [environments.production]\nenabled = false\n",
    );
    let (code, _, err) = cli(&["reload", "--config", good.to_str().unwrap(), "--pid", &pid]).await;
    assert_eq!(code, 0, "{err}");
    let status = tokio::time::timeout(Duration::from_secs(30), target.wait())
        .await
        .unwrap()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(1), "SIGHUP reached the process");

    let (code, _, _) = cli(&["reload", "--config", good.to_str().unwrap(), "--pid", "0"]).await;
    assert_eq!(code, 2, "pid 0 would signal the whole process group");
}

#[tokio::test]
async fn standalone_emulator_command_issues_tokens() {
    use flute_token_broker::credentials::ApiKey;
    use flute_token_broker::oauth::{Grant, OAuthClient, OAuthClientConfig, TokenEndpoint};
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "file-secret\n").unwrap();
    let mut child = Command::new(BIN)
        .args([
            "emulator",
            "--listen",
            "127.0.0.1:0",
            "--client-id",
            "cli-id",
            "--token-lifetime",
            "60s",
            "--no-refresh-tokens",
            "--client-secret-file",
        ])
        .arg(&secret_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("the address is printed")
        .to_owned();
    let client = OAuthClient::new(OAuthClientConfig::new(format!("{base}/oauth2/token"))).unwrap();
    let token = client
        .request_token(
            &ApiKey::new("cli-id", "file-secret").unwrap(),
            &Grant::ClientCredentials,
        )
        .await
        .unwrap();
    assert_eq!(token.lifetime, Duration::from_secs(60));
    assert!(token.refresh_token.is_none());
    let wrong = client
        .request_token(&ApiKey::new("cli-id", "nope").unwrap(), &Grant::ClientCredentials)
        .await
        .unwrap_err();
    assert!(wrong.to_string().contains("invalid_client"));

    // The README's fault-injection commands, as curl sends them (-d:
    // application/x-www-form-urlencoded), against this emulator.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let bodies: Vec<&str> = readme
        .lines()
        .filter(|l| l.starts_with("curl -X POST localhost:9470/__emulator/faults -d '"))
        .map(|l| l.split('\'').nth(1).unwrap())
        .collect();
    assert!(bodies.len() >= 3, "the README shows the fault commands");
    for body in bodies {
        let answer = support::http_client()
            .post(format!("{base}/__emulator/faults"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{body}");
    }
    let stats = support::http_client()
        .get(format!("{base}/__emulator/stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(stats.status(), 200);
    support::signal(child.id().unwrap(), nix::sys::signal::Signal::SIGTERM);
    assert!(
        tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .unwrap()
            .unwrap()
            .success()
    );
}

/// stderr on a full device or a pipe nobody reads, stdout likewise: the
/// daemon keeps serving through several refreshes (each logs lines that
/// cannot be written), counts the dropped lines, and exits 0 on SIGTERM.
#[tokio::test]
async fn unwritable_stderr_or_stdout_is_not_fatal() {
    for (broken_stderr_is_full, broken_stdout_is_full) in [(true, false), (false, true)] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("broker.sock");
        let admin = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let broken = |full: bool| match full {
            true => Stdio::from(std::fs::File::options().write(true).open("/dev/full").unwrap()),
            false => Stdio::piped(),
        };
        let mut child = Command::new(BIN)
            .args(["serve", "--dev", "--dev-token-lifetime", "2s", "--admin-listen"])
            .arg(admin.to_string())
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .env("RUST_LOG", "trace")
            .stdout(broken(broken_stdout_is_full))
            .stderr(broken(broken_stderr_is_full))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // A pipe whose reader went away.
        drop(child.stdout.take());
        drop(child.stderr.take());

        let mut client = support::connect_when_up(&format!("unix:{}", sock.display())).await;
        let mut watch = support::open_watch(&mut client, pb::Environment::Sandbox as i32).await;
        for _ in 0..3 {
            support::next_token(&mut watch).await;
        }
        let dropped = support::metric(admin, "flute_broker_log_lines_dropped_total").await;
        assert!(dropped > 0.0, "log lines were written to a broken stderr");
        assert!(child.try_wait().unwrap().is_none(), "still running");
        support::signal(child.id().unwrap(), nix::sys::signal::Signal::SIGTERM);
        let exit = tokio::time::timeout(Duration::from_secs(12), child.wait())
            .await
            .expect("exit within the grace period")
            .unwrap();
        assert_eq!(exit.code(), Some(0), "stderr full: {broken_stderr_is_full}");
    }
}

#[tokio::test]
async fn get_as_an_env_file_with_the_environment_from_flute_broker_env() {
    let broker = start_dev("900s").await;
    let out = Command::new(BIN)
        .args(["get", "--format", "env", "--addr", &broker.addr])
        .env("FLUTE_BROKER_ENV", "production")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let token = lines[0].strip_prefix("FLUTE_ACCESS_TOKEN=").expect("token line");
    assert!(!token.is_empty() && !token.contains(char::is_whitespace));
    let expires = lines[1].strip_prefix("FLUTE_TOKEN_EXPIRES_AT=").expect("expiry line");
    let expires: prost_types::Timestamp = expires.parse().expect("RFC 3339");
    let expires = std::time::SystemTime::try_from(expires).unwrap();
    assert!(expires > std::time::SystemTime::now(), "a valid token");
    // The same token as the plain format gives for production.
    let (code, plain, _) = cli(&["get", "--env", "production", "--addr", &broker.addr]).await;
    assert_eq!(code, 0);
    assert_eq!(plain.trim(), token);
}

#[tokio::test]
async fn serve_needs_a_config_or_dev_and_a_taken_port_gets_a_hint() {
    let (code, _, err) = cli(&["serve"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--config") && err.contains("--dev"), "{err}");
    let (code, _, err) = cli(&["check-config"]).await;
    assert_eq!(code, 2, "{err}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = cli(&["serve", "--dev", "--admin-listen", "", "--listen", &addr]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("Address already in use") && err.contains("another broker running?"),
        "{err}"
    );
}

#[tokio::test]
async fn usage_errors_name_every_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, "").unwrap();
    // --dev-token-lifetime means nothing without --dev: refused, not ignored.
    for args in [
        &["serve", "--dev-token-lifetime", "5s"][..],
        &[
            "serve",
            "--dev-token-lifetime",
            "5s",
            "--config",
            config.to_str().unwrap(),
        ][..],
    ] {
        let (code, _, err) = cli(args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("--dev"), "{args:?}: {err}");
    }
    // The emulator's missing secret names both of its sources.
    let (code, _, err) = cli(&["emulator", "--client-id", "id"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--client-secret ") && err.contains("--client-secret-file"),
        "{err}"
    );
}

#[tokio::test]
async fn check_config_skip_secrets_checks_all_but_the_key_and_reports_each_problem_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    let missing = dir.path().join("no-such-secret");
    std::fs::write(
        &path,
        format!(
            "[credentials]\nclient_id = \"id\"\nclient_secret_file = \"{}\"\n",
            missing.display()
        ),
    )
    .unwrap();
    let path = path.to_str().unwrap();

    // Reading the key: one problem for the shared source, not one per environment.
    let (code, _, err) = cli(&["check-config", "--config", path]).await;
    assert_eq!(code, 78, "{err}");
    assert_eq!(err.matches("cannot read client secret").count(), 1, "{err}");
    assert!(err.contains("  - credentials: cannot read client secret"), "{err}");

    let (code, out, err) = cli(&["check-config", "--skip-secrets", "--config", path]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("API key sources not read"), "{err}");
    assert!(out.contains("client_secret_file"), "{out}");

    // Everything else is still checked.
    std::fs::write(
        dir.path().join("bad.toml"),
        "[refresh]\nratio = 3.0\n[credentials]\nclient_id = \"id\"\nclient_secert_file = \"x\"\n",
    )
    .unwrap();
    let bad = dir.path().join("bad.toml");
    let (code, _, err) = cli(&["check-config", "--skip-secrets", "--config", bad.to_str().unwrap()]).await;
    assert_eq!(code, 78, "{err}");
    let unknown = err.find("credentials.client_secert_file: unknown key").expect(&err);
    assert!(err.contains("refresh.ratio"), "{err}");
    // The misspelling comes first; what it leaves missing is a whole sentence.
    let missing_source = err.find("no client secret source is set").expect(&err);
    assert!(unknown < missing_source, "{err}");

    // The shipped configs pass without their secrets (what .ci/run checks too).
    let root = env!("CARGO_MANIFEST_DIR");
    for shipped in [
        "deploy/config.example.toml",
        "deploy/systemd/config.toml",
        "deploy/systemd/agent.toml",
    ] {
        let out = Command::new(BIN)
            .args([
                "check-config",
                "--skip-secrets",
                "--config",
                &format!("{root}/{shipped}"),
            ])
            .env_remove("CREDENTIALS_DIRECTORY")
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{shipped}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The next line, waiting at most 30 s for it.
async fn next_line<R: tokio::io::AsyncBufRead + Unpin>(lines: &mut tokio::io::Lines<R>, what: &str) -> String {
    tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("no {what} within 30 s"))
        .unwrap()
        .unwrap_or_else(|| panic!("output ended before {what}"))
}

#[tokio::test]
async fn exec_runs_the_command_with_the_token_and_exits_as_it_did() {
    let broker = start_dev("900s").await;
    let addr = broker.addr.as_str();
    let (code, token, err) = cli(&["get", "--env", "sandbox", "--addr", addr]).await;
    assert_eq!(code, 0, "{err}");

    let show = "printf '%s|%s' \"$FLUTE_ACCESS_TOKEN\" \"$FLUTE_TOKEN_EXPIRES_AT\"; exit 7";
    let (code, out, err) = cli(&["exec", "--env", "sandbox", "--addr", addr, "--", "sh", "-c", show]).await;
    assert_eq!(code, 7, "the command's exit code: {err}");
    let (access, expires) = out.split_once('|').expect(&out);
    assert_eq!(access, token.trim());
    let expires = humantime::parse_rfc3339(expires).expect(expires);
    assert!(expires > std::time::SystemTime::now(), "{out}");

    // Killed by signal N: 128+N, as a shell reports it.
    let (code, _, _) = cli(&[
        "exec",
        "--env",
        "sandbox",
        "--addr",
        addr,
        "--",
        "sh",
        "-c",
        "kill -KILL $$",
    ])
    .await;
    assert_eq!(code, 128 + 9);
    // The shell's codes for a command that cannot run.
    let (code, _, err) = cli(&["exec", "--env", "sandbox", "--addr", addr, "--", "/nonexistent/program"]).await;
    assert_eq!(code, 127, "{err}");
    assert!(err.contains("cannot run /nonexistent/program"), "{err}");
    // No broker: the command never runs.
    let (code, out, _) = cli(&[
        "exec",
        "--env",
        "sandbox",
        "--addr",
        "unix:/nonexistent.sock",
        "--",
        "echo",
        "ran",
    ])
    .await;
    assert_eq!((code, out.as_str()), (69, ""));
    // The environment from FLUTE_BROKER_ENV.
    let out = Command::new(BIN)
        .args([
            "exec",
            "--addr",
            addr,
            "--",
            "sh",
            "-c",
            "test -n \"$FLUTE_ACCESS_TOKEN\"",
        ])
        .env("FLUTE_BROKER_ENV", "sandbox")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn exec_forwards_signals_to_the_command() {
    use nix::sys::signal::{Signal, kill};
    let broker = start_dev("900s").await;
    let script = "trap 'echo got-term; exit 42' TERM; echo ready; while :; do sleep 0.05; done";
    let mut child = Command::new(BIN)
        .args([
            "exec",
            "--env",
            "sandbox",
            "--addr",
            &broker.addr,
            "--",
            "sh",
            "-c",
            script,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(next_line(&mut out, "the command's ready line").await, "ready");
    // SIGTERM to exec alone (as `kill` or systemd would send it): the command gets it.
    kill(nix::unistd::Pid::from_raw(child.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(next_line(&mut out, "the command's trap").await, "got-term");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(42));
}

#[tokio::test]
async fn watch_reconnects_when_the_broker_comes_back_and_no_reconnect_exits_69() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_dev_in(dir.path(), "900s").await;
    let mut watch = Command::new(BIN)
        .args(["watch", "--env", "sandbox", "--addr", &broker.addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut err = BufReader::new(watch.stderr.take().unwrap()).lines();
    let first = next_line(&mut out, "the first token").await;
    assert!(first.starts_with("sandbox token "), "{first}");

    // Killed without a goodbye: one line saying so, then retries.
    broker.child.kill().await.unwrap();
    let lost = next_line(&mut err, "the connection-lost line").await;
    assert!(
        lost.contains("connection to the broker lost") && lost.contains("reconnecting"),
        "{lost}"
    );

    // A new broker on the same socket (a new emulator: a new token).
    let mut broker = start_dev_in(dir.path(), "900s").await;
    let back = next_line(&mut err, "the reconnected line").await;
    assert!(back.contains("reconnected to the broker at unix:"), "{back}");
    let current = next_line(&mut out, "the new broker's token").await;
    assert!(
        current.starts_with("sandbox token ") && current != first,
        "{current} after {first}"
    );

    // --no-reconnect: the end of the connection ends watch with 69.
    let mut once = watch_once(&broker.addr);
    let mut once_out = BufReader::new(once.stdout.take().unwrap()).lines();
    next_line(&mut once_out, "--no-reconnect's first token").await;
    broker.child.kill().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), once.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(69));
}

/// `watch --no-reconnect` on the sandbox at `addr`, its output piped.
fn watch_once(addr: &str) -> Child {
    Command::new(BIN)
        .args(["watch", "--env", "sandbox", "--no-reconnect", "--addr", addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// A broker that shuts down was reached: `watch --no-reconnect` says the
/// broker ended the connection, once, with the broker's reason.
#[tokio::test]
async fn watch_on_a_stopping_broker_says_it_ended_the_connection() {
    let broker = start_dev("900s").await;
    let mut once = watch_once(&broker.addr);
    let mut out = BufReader::new(once.stdout.take().unwrap()).lines();
    next_line(&mut out, "the first token").await;
    support::signal(broker.child.id().unwrap(), nix::sys::signal::Signal::SIGTERM);
    let output = tokio::time::timeout(Duration::from_secs(30), once.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(output.status.code(), Some(69));
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        err.trim_end(),
        format!(
            "error: the broker at {} ended the connection: the broker is stopping or restarting; reconnect now",
            broker.addr
        )
    );
}

#[tokio::test]
async fn completions_and_man_pages_come_from_the_cli_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = cli(&["completions", shell]).await;
        assert_eq!(code, 0, "{shell}: {err}");
        for word in [
            "serve",
            "check-config",
            "exec",
            "watch",
            "no-reconnect",
            "skip-secrets",
            "production",
        ] {
            assert!(out.contains(word), "{shell} completions lack {word}");
        }
    }
    let (code, _, _) = cli(&["completions", "tcsh"]).await;
    assert_eq!(code, 2);

    let (code, page, err) = cli(&["man"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        page.starts_with(".ie") && page.contains(".TH flute-token-broker 1"),
        "{page}"
    );
    assert!(
        page.contains("Exit codes") && page.contains("128+N"),
        "the exit-code table is in the page"
    );
    let base = tempfile::tempdir().unwrap();
    // A directory that does not exist yet, as /usr/local/share/man/man1 on stock Debian.
    let dir = base.path().join("share/man/man1");
    let (code, _, err) = cli(&["man", "--dir", dir.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    for page in [
        "flute-token-broker.1",
        "flute-token-broker-exec.1",
        "flute-token-broker-serve.1",
    ] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        assert!(text.contains(".SH NAME"), "{page}");
    }
}
