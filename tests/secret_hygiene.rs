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
        // A few rotations (2 s tokens refresh every second), including a fault.
        let until = tokio::time::Instant::now() + Duration::from_millis(3500);
        let mut injected = false;
        while tokio::time::Instant::now() < until {
            let _ = tokio::time::timeout_at(until, rx.changed()).await;
            let snapshot = rx.borrow_and_update().clone();
            if let Some(t) = &snapshot.token {
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
