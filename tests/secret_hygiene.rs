//! Refresh cycles with a known secret against the emulator, with every log
//! line captured at TRACE: neither the secret nor any issued token may appear
//! in the logs or in any error's Display/Debug.

mod support;

use std::sync::Arc;
use std::time::Duration;

use flute_token_broker::Environment;
use flute_token_broker::credentials::ApiKey;
use flute_token_broker::emulator::FaultRequest;
use flute_token_broker::metrics::Metrics;
use flute_token_broker::oauth::{ClientAuth, Grant, OAuthClient, OAuthClientConfig, TokenEndpoint};
use flute_token_broker::token::{self, TokenSourceConfig};
use secrecy::ExposeSecret;
use support::{CLIENT_ID, CLIENT_SECRET, LogCapture, start_emulator, test_key};

#[tokio::test(flavor = "current_thread")]
async fn no_secret_or_token_in_logs_or_errors() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let emu = start_emulator(Duration::from_secs(2), true).await;
    let mut seen_tokens = Vec::new();
    let mut errors = Vec::new();

    for auth in [ClientAuth::ClientSecretBasic, ClientAuth::ClientSecretPost] {
        let mut config = OAuthClientConfig::new(emu.token_url());
        config.client_auth = auth;
        let client = OAuthClient::new(config).unwrap();
        errors.push(format!("{client:?}"));
        let mut source_config = TokenSourceConfig::new(Environment::Sandbox);
        source_config.policy.backoff_initial = Duration::from_millis(100);
        let (handle, task) = token::spawn(source_config, client.clone(), test_key(), Arc::new(Metrics::new()));
        let mut rx = handle.subscribe();
        // Three rotations (2 s tokens refresh every second), with a fault
        // injected after the first: counted, not timed.
        let mut rotations = 0;
        let mut injected = false;
        while rotations < 3 {
            tokio::time::timeout(Duration::from_secs(10), rx.changed())
                .await
                .expect("the source publishes within 10 s")
                .unwrap();
            let snapshot = rx.borrow_and_update().clone();
            if let Some(t) = &snapshot.token {
                rotations += 1;
                seen_tokens.push(t.access_token().to_owned());
                errors.push(format!("{t:?}"));
                if !injected {
                    emu.emulator.set_faults(FaultRequest {
                        fail_next: Some(1),
                        status: Some(500),
                        ..Default::default()
                    });
                    injected = true;
                }
            }
            if let Some(e) = &snapshot.last_error {
                errors.push(format!("{e:?} {}", e.message));
            }
        }
        task.abort();

        // Errors of every kind, with the real secret and a wrong one.
        let wrong = ApiKey::new(CLIENT_ID, "wrong-but-also-secret").unwrap();
        let e = client
            .request_token(&wrong, &Grant::ClientCredentials)
            .await
            .unwrap_err();
        errors.push(format!("{e} {e:?}"));
        let r = client
            .request_token(&test_key(), &Grant::ClientCredentials)
            .await
            .unwrap();
        seen_tokens.push(r.access_token.expose_secret().to_owned());
        errors.push(format!("{r:?} {:?}", test_key()));
        let e = client
            .request_token(
                &test_key(),
                &Grant::RefreshToken("not-a-real-refresh".to_owned().into()),
            )
            .await
            .unwrap_err();
        errors.push(format!("{e} {e:?}"));
    }

    assert!(
        seen_tokens.len() >= 6,
        "expected several rotations, saw {}",
        seen_tokens.len()
    );
    let logs = logs.text();
    assert!(
        logs.contains("token request"),
        "the capture should hold the refresh events"
    );
    let haystack = format!("{logs}\n{}", errors.join("\n"));
    for needle in [CLIENT_SECRET, "wrong-but-also-secret", "not-a-real-refresh"]
        .iter()
        .map(|s| s.to_string())
        .chain(seen_tokens)
    {
        assert!(
            !haystack.contains(&needle),
            "leaked a secret or token ({} chars)",
            needle.len()
        );
    }
}

/// Every form in which a secret of ours could come back inside an echo.
fn leak_forms(secrets: &[String]) -> Vec<String> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let form = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let percent = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    let mut forms = Vec::new();
    let id_secret = [
        format!("{CLIENT_ID}:{CLIENT_SECRET}"),
        format!("{}:{}", form(CLIENT_ID), form(CLIENT_SECRET)),
    ];
    for s in secrets.iter().chain(&id_secret) {
        forms.extend([s.clone(), form(s), percent(s)]);
        for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            forms.push(engine.encode(s));
        }
    }
    // Any 8-character piece of a secret (what a length cut leaves behind).
    for s in secrets {
        let chars: Vec<char> = s.chars().collect();
        forms.extend(chars.windows(8).map(|w| w.iter().collect::<String>()));
    }
    forms
}

/// A token endpoint that quotes the whole request (Authorization header and
/// form body) in its error answers: 400, 401 (also in WWW-Authenticate),
/// 500 and a malformed 200, for both client authentication methods and
/// both grants. Nothing of the request may reach a log line, a Status
/// message, a WatchToken outage reason, GetStatus or the CLI.
#[tokio::test(flavor = "current_thread")]
async fn an_endpoint_echoing_the_request_leaks_nothing() {
    use flute_token_broker::wire::pb;
    use support::{next_outage, next_token, open_watch, start_broker_with};

    let logs = LogCapture::default();
    let _guard = logs.install();
    let sandbox = pb::Environment::Sandbox as i32;
    let mut outputs = Vec::new();
    let mut refresh_tokens = Vec::new();
    let passes = [
        (ClientAuth::ClientSecretBasic, true),
        (ClientAuth::ClientSecretPost, true),
        (ClientAuth::ClientSecretPost, false),
    ];
    for (auth, use_refresh_token) in passes {
        let broker = start_broker_with(&[Environment::Sandbox], Duration::from_secs(1), |_, config| {
            config.oauth.client_auth = auth;
            config.oauth.use_refresh_token = use_refresh_token;
        })
        .await;
        let emulator = broker.emulator(Environment::Sandbox);
        let mut client = broker.client().await;
        let mut watch = open_watch(&mut client, sandbox).await;
        next_token(&mut watch).await;
        for status in [400u16, 401, 500, 200] {
            emulator.set_faults(FaultRequest {
                refuse_all: Some(true),
                status: Some(status),
                echo_request: Some(true),
                ..Default::default()
            });
            let reason = next_outage(&mut watch).await.reason;
            // The outage is the echo's, and it was judged, not passed through.
            assert!(reason.contains(&status.to_string()), "{auth:?} {status}: {reason}");
            if status != 200 {
                assert!(
                    reason.contains(flute_token_broker::oauth::WITHHELD),
                    "{auth:?} {status}: {reason}"
                );
            }
            outputs.push(reason);
            let refused = client
                .get_token(pb::GetTokenRequest {
                    environment: sandbox,
                    min_remaining: None,
                })
                .await
                .unwrap_err();
            outputs.push(format!("{refused:?} {}", refused.message()));
            let status_reply = client.get_status(pb::GetStatusRequest {}).await.unwrap();
            outputs.push(format!("{:?}", status_reply.into_inner()));
            for args in [
                vec!["status", "--addr", &broker.tcp],
                vec!["status", "--json", "--addr", &broker.tcp],
                vec!["get", "--env", "sandbox", "--addr", &broker.tcp],
            ] {
                let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_flute-token-broker"))
                    .args(&args)
                    .output()
                    .await
                    .unwrap();
                outputs.push(String::from_utf8_lossy(&out.stdout).into_owned());
                outputs.push(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            emulator.set_faults(FaultRequest {
                clear: true,
                ..Default::default()
            });
            next_token(&mut watch).await;
        }
        let received = emulator.refresh_tokens_received();
        assert_eq!(
            received.is_empty(),
            !use_refresh_token,
            "the refresh grant is exercised exactly when enabled"
        );
        refresh_tokens.extend(received);
        broker.daemon.shutdown().await;
    }

    let mut secrets = vec![CLIENT_SECRET.to_owned()];
    secrets.extend(refresh_tokens);
    let logs = logs.text();
    assert!(
        logs.contains(flute_token_broker::oauth::WITHHELD),
        "the failures are logged"
    );
    let haystack = format!("{logs}\n{}", outputs.join("\n"));
    for form in leak_forms(&secrets) {
        assert!(
            !haystack.contains(&form),
            "a secret leaked in the form {:?}… ({} chars)",
            &form[..3],
            form.len()
        );
    }
}
