//! The OAuth client against the emulator over real loopback sockets: both
//! client-authentication forms, both grants, every fault kind, and the
//! emulator's own error answers.

mod support;

use std::time::Duration;

use flute_token_broker::credentials::ApiKey;
use flute_token_broker::emulator::FaultRequest;
use flute_token_broker::oauth::{
    ClientAuth, ErrorClass, Grant, OAuthClient, OAuthClientConfig, OAuthError, TokenEndpoint,
};
use secrecy::ExposeSecret;
use support::{CLIENT_ID, CLIENT_SECRET, start_emulator, test_key};

fn client(url: String, auth: ClientAuth) -> OAuthClient {
    client_with(url, |config| {
        config.client_auth = auth;
        config.request_timeout = Duration::from_secs(2);
    })
}

/// A client for `url` with the defaults, changed by `adjust`.
fn client_with(url: String, adjust: impl FnOnce(&mut OAuthClientConfig)) -> OAuthClient {
    let mut config = OAuthClientConfig::new(url);
    adjust(&mut config);
    OAuthClient::new(config).unwrap()
}

#[tokio::test]
async fn both_client_auth_forms_and_both_grants() {
    let emu = start_emulator(Duration::from_secs(900), true).await;
    for auth in [ClientAuth::ClientSecretBasic, ClientAuth::ClientSecretPost] {
        let c = client(emu.token_url(), auth);
        let first = c.request_token(&test_key(), &Grant::ClientCredentials).await.unwrap();
        assert_eq!(first.token_type, "Bearer");
        assert_eq!(first.lifetime, Duration::from_secs(900));
        let refresh = first.refresh_token.clone().expect("emulator issues refresh tokens");
        let second = c
            .request_token(&test_key(), &Grant::RefreshToken(refresh.clone()))
            .await
            .unwrap();
        assert_ne!(second.access_token.expose_secret(), first.access_token.expose_secret());
        assert_ne!(
            second.refresh_token.as_ref().unwrap().expose_secret(),
            refresh.expose_secret(),
            "refresh token rotated"
        );
        // The used refresh token is gone.
        let reused = c
            .request_token(&test_key(), &Grant::RefreshToken(refresh))
            .await
            .unwrap_err();
        assert_eq!(reused.class(), ErrorClass::InvalidGrant, "{reused}");
    }
    let stats = emu.emulator.stats();
    assert_eq!(stats.ok("client_credentials"), 2);
    assert_eq!(stats.ok("refresh_token"), 2);
    assert_eq!(stats.grants["refresh_token"]["invalid_grant"], 2);
}

#[tokio::test]
async fn wrong_secret_is_a_permanent_invalid_client() {
    let emu = start_emulator(Duration::from_secs(900), false).await;
    for auth in [ClientAuth::ClientSecretBasic, ClientAuth::ClientSecretPost] {
        let bad = ApiKey::new(CLIENT_ID, "wrong-secret").unwrap();
        let err = client(emu.token_url(), auth)
            .request_token(&bad, &Grant::ClientCredentials)
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                OAuthError::OAuth {
                    status: 401,
                    code: "invalid_client",
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.class(), ErrorClass::Permanent);
        assert!(!format!("{err} {err:?}").contains("wrong-secret"));
    }
}

#[tokio::test]
async fn no_refresh_tokens_mode() {
    let emu = start_emulator(Duration::from_secs(60), false).await;
    let t = client(emu.token_url(), ClientAuth::ClientSecretBasic)
        .request_token(&test_key(), &Grant::ClientCredentials)
        .await
        .unwrap();
    assert!(t.refresh_token.is_none());
    assert_eq!(t.lifetime, Duration::from_secs(60));
}

#[tokio::test]
async fn every_fault_kind_maps_to_its_error_class() {
    let emu = start_emulator(Duration::from_secs(900), false).await;
    let c = client(emu.token_url(), ClientAuth::ClientSecretBasic);
    let key = test_key();
    type Check = Box<dyn Fn(&OAuthError) -> bool>;
    let cases: Vec<(FaultRequest, Check)> = vec![
        (
            FaultRequest {
                fail_next: Some(1),
                status: Some(500),
                ..Default::default()
            },
            Box::new(|e| matches!(e, OAuthError::Server { status: 500, .. })),
        ),
        (
            FaultRequest {
                fail_next: Some(1),
                status: Some(503),
                ..Default::default()
            },
            Box::new(|e| matches!(e, OAuthError::Server { status: 503, .. })),
        ),
        (
            FaultRequest {
                fail_next: Some(1),
                status: Some(429),
                retry_after: Some(7),
                ..Default::default()
            },
            Box::new(|e| matches!(e, OAuthError::RateLimited { retry_after: Some(d) } if *d == Duration::from_secs(7))),
        ),
        (
            FaultRequest {
                malformed_next: Some(1),
                ..Default::default()
            },
            Box::new(|e| matches!(e, OAuthError::Malformed { status: 200, .. })),
        ),
        (
            FaultRequest {
                fail_next: Some(1),
                status: Some(400),
                error: Some("invalid_scope".into()),
                ..Default::default()
            },
            Box::new(|e| {
                matches!(
                    e,
                    OAuthError::OAuth {
                        code: "invalid_scope",
                        ..
                    }
                )
            }),
        ),
        (
            FaultRequest {
                refuse_all: Some(true),
                status: Some(502),
                ..Default::default()
            },
            Box::new(|e| matches!(e, OAuthError::Server { status: 502, .. })),
        ),
    ];
    for (fault, expected) in cases {
        emu.emulator.set_faults(FaultRequest {
            clear: true,
            ..fault.clone()
        });
        let err = c.request_token(&key, &Grant::ClientCredentials).await.unwrap_err();
        assert!(expected(&err), "{fault:?} gave {err:?}");
    }
    // refuse_all holds until cleared.
    assert!(c.request_token(&key, &Grant::ClientCredentials).await.is_err());
    // A hung endpoint: the request timeout ends the call (a short one here,
    // so that the test does not wait out the usual seconds).
    emu.emulator.set_faults(FaultRequest {
        clear: true,
        delay_ms: Some(3_000),
        ..Default::default()
    });
    let impatient = client_with(emu.token_url(), |config| {
        config.request_timeout = Duration::from_millis(200)
    });
    let err = impatient
        .request_token(&key, &Grant::ClientCredentials)
        .await
        .unwrap_err();
    assert!(
        matches!(err, OAuthError::Timeout(d) if d == Duration::from_millis(200)),
        "a 3 s delay gave {err:?}"
    );
    emu.emulator.set_faults(FaultRequest {
        clear: true,
        ..Default::default()
    });
    let a = c.request_token(&key, &Grant::ClientCredentials).await.unwrap();
    emu.emulator.set_faults(FaultRequest {
        same_token_next: Some(1),
        ..Default::default()
    });
    let b = c.request_token(&key, &Grant::ClientCredentials).await.unwrap();
    assert_eq!(a.access_token.expose_secret(), b.access_token.expose_secret());
    assert!(emu.emulator.stats().faults_injected >= 7);
}

#[tokio::test]
async fn fault_and_stats_control_endpoints_over_http() {
    let emu = start_emulator(Duration::from_secs(900), false).await;
    let http = support::http_client();
    let faults: serde_json::Value = http
        .post(format!("{}/__emulator/faults", emu.base_url()))
        .json(&serde_json::json!({"fail_next": 2, "status": 503}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(faults["fail_next"], 2);
    let bad = http
        .post(format!("{}/__emulator/faults", emu.base_url()))
        .json(&serde_json::json!({"nonsense": 1}))
        .send()
        .await
        .unwrap();
    assert!(bad.status().is_client_error());
    let c = client(emu.token_url(), ClientAuth::ClientSecretPost);
    for _ in 0..2 {
        assert!(
            c.request_token(&test_key(), &Grant::ClientCredentials)
                .await
                .unwrap_err()
                .is_transient()
        );
    }
    c.request_token(&test_key(), &Grant::ClientCredentials).await.unwrap();
    let stats: serde_json::Value = http
        .get(format!("{}/__emulator/stats", emu.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["token_requests"], 3);
    assert_eq!(stats["grants"]["client_credentials"]["fault"], 2);
    assert_eq!(stats["grants"]["client_credentials"]["ok"], 1);
}

async fn raw_token_request(
    url: &str,
    body: &str,
    basic: Option<(&str, &str)>,
) -> (u16, serde_json::Value, Option<String>) {
    let mut req = support::http_client()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned());
    if let Some((id, secret)) = basic {
        req = req.basic_auth(id, Some(secret));
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let www = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        resp.headers().get("cache-control").map(|v| v.to_str().unwrap()),
        Some("no-store")
    );
    (status, resp.json().await.unwrap_or_default(), www)
}

#[tokio::test]
async fn emulator_answers_rfc6749_errors() {
    let emu = start_emulator(Duration::from_secs(900), true).await;
    let url = emu.token_url();
    let good = format!(
        "client_id={CLIENT_ID}&client_secret={}",
        form_urlencoded::byte_serialize(CLIENT_SECRET.as_bytes()).collect::<String>()
    );
    let cases = [
        (
            format!("grant_type=password&{good}"),
            None,
            400,
            "unsupported_grant_type",
        ),
        (good.clone(), None, 400, "invalid_request"),
        (format!("grant_type=refresh_token&{good}"), None, 400, "invalid_request"),
        (
            format!("grant_type=refresh_token&refresh_token=nope&{good}"),
            None,
            400,
            "invalid_grant",
        ),
        (
            format!("grant_type=client_credentials&scope=admin&{good}"),
            None,
            400,
            "invalid_scope",
        ),
        ("grant_type=client_credentials".to_owned(), None, 401, "invalid_client"),
        (
            "grant_type=client_credentials&client_secret=x".to_owned(),
            None,
            400,
            "invalid_request",
        ),
        (
            format!("grant_type=client_credentials&{good}"),
            Some((CLIENT_ID, "x")),
            400,
            "invalid_request",
        ),
    ];
    for (body, basic, status, code) in cases {
        let (got_status, json, www) = raw_token_request(&url, &body, basic).await;
        assert_eq!(
            (got_status, json["error"].as_str().unwrap_or_default()),
            (status, code),
            "{body}"
        );
        if status == 401 {
            assert!(www.unwrap().contains("invalid_client"));
        }
    }
}

#[tokio::test]
async fn protected_route_accepts_only_live_tokens() {
    let emu = start_emulator(Duration::from_secs(1), false).await;
    let token = client(emu.token_url(), ClientAuth::ClientSecretBasic)
        .request_token(&test_key(), &Grant::ClientCredentials)
        .await
        .unwrap();
    let http = support::http_client();
    let api = format!("{}/v2/transactions", emu.base_url());
    let ok = http
        .get(&api)
        .bearer_auth(token.access_token.expose_secret())
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let body: serde_json::Value = ok.json().await.unwrap();
    assert!(body["transactions"].is_array());
    let bad = http.get(&api).bearer_auth("forged").send().await.unwrap();
    assert_eq!(bad.status(), 401);
    assert!(
        bad.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    // Once the token's real 1 s lifetime is over, the API refuses it.
    let expired = async {
        loop {
            let answer = http
                .get(&api)
                .bearer_auth(token.access_token.expose_secret())
                .send()
                .await
                .unwrap();
            if answer.status() != 200 {
                return answer.status();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let status = tokio::time::timeout(Duration::from_secs(10), expired)
        .await
        .expect("the token expires");
    assert_eq!(status, 401);
}

/// The API side the proxy is tested against: an echo of any `/v2/` request
/// naming the `token_id` it carried (never the token), a streamed byte
/// count, a token revoked before its expiry, and delayed answers.
#[tokio::test]
async fn api_echo_bytes_revocation_and_delay() {
    let emu = start_emulator(Duration::from_secs(900), false).await;
    let token = client(emu.token_url(), ClientAuth::ClientSecretBasic)
        .request_token(&test_key(), &Grant::ClientCredentials)
        .await
        .unwrap();
    let secret = token.access_token.expose_secret().to_owned();
    let token_id = flute_token_broker::token::token_id(&secret);
    let http = support::http_client();
    let body = b"{\"amount\": 1250}".to_vec();
    let echo = http
        .post(format!("{}/v2/payments/abc?x=1&y=%20", emu.base_url()))
        .bearer_auth(&secret)
        .header("x-request-id", "r-1")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(echo.status(), 200);
    let text = echo.text().await.unwrap();
    assert!(!text.contains(&secret), "the echo never quotes the token");
    let echo: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/v2/payments/abc");
    assert_eq!(echo["query"], "x=1&y=%20");
    assert_eq!(echo["body_bytes"], body.len());
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(&body).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(echo["body_sha256"], digest);
    assert_eq!(echo["token_id"], token_id.as_str());
    assert_eq!(echo["headers"]["x-request-id"][0], "r-1");
    assert!(echo["headers"].get("authorization").is_none());

    // A streamed answer of a given size.
    let bytes = http
        .get(format!("{}/v2/_emulator/bytes/200000", emu.base_url()))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(bytes.status(), 200);
    assert_eq!(bytes.bytes().await.unwrap().len(), 200_000);

    // Answers wait for the API delay fault.
    emu.emulator.set_faults(FaultRequest {
        api_delay_ms: Some(300),
        ..Default::default()
    });
    let started = std::time::Instant::now();
    let delayed = http
        .get(format!("{}/v2/transactions", emu.base_url()))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(delayed.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    emu.emulator.set_faults(FaultRequest {
        api_delay_ms: Some(0),
        ..Default::default()
    });

    // Revoked before its expiry: 401 for it from then on, over HTTP too.
    let revoke = http
        .post(format!("{}/__emulator/faults", emu.base_url()))
        .json(&serde_json::json!({"revoke_current": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(revoke.status(), 200);
    let refused = http
        .get(format!("{}/v2/anything", emu.base_url()))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert!(
        refused.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("revoked")
    );
    let stats = emu.emulator.stats();
    assert_eq!((stats.api_requests, stats.api_ok, stats.api_unauthorized), (4, 3, 1));
}

#[tokio::test]
async fn transport_failures_are_transient() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = client(format!("http://{addr}/oauth2/token"), ClientAuth::ClientSecretBasic)
        .request_token(&test_key(), &Grant::ClientCredentials)
        .await
        .unwrap_err();
    assert!(matches!(err, OAuthError::Transport(_)), "{err:?}");
    assert!(err.is_transient());
}

#[tokio::test]
async fn oversized_and_redirecting_answers_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for answer in [
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
                100_000,
                "x".repeat(100_000)
            ),
            "HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:1/steal\r\ncontent-length: 0\r\n\r\n".to_owned(),
        ] {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = sock.read(&mut buf).await;
            let _ = sock.write_all(answer.as_bytes()).await;
        }
    });
    let c = client(format!("http://{addr}/oauth2/token"), ClientAuth::ClientSecretBasic);
    let big = c
        .request_token(&test_key(), &Grant::ClientCredentials)
        .await
        .unwrap_err();
    assert!(big.to_string().contains("exceeds 65536 bytes"), "{big}");
    let redirect = c
        .request_token(&test_key(), &Grant::ClientCredentials)
        .await
        .unwrap_err();
    assert!(matches!(redirect, OAuthError::Http { status: 302, .. }), "{redirect:?}");
}

/// The body limit: an answer of exactly `max_body_bytes` is read, one byte
/// more is malformed (and never buffered whole).
#[tokio::test]
async fn bodies_up_to_the_limit_are_read_and_larger_ones_refused() {
    const LIMIT: usize = 200;
    let body_of = |len: usize| {
        let head = r#"{"access_token":"a","token_type":"Bearer","pad":""#;
        let tail = r#""}"#;
        format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()))
    };
    let (exact, over) = (body_of(LIMIT), body_of(LIMIT + 1));
    let app = axum::Router::new()
        .route("/exact", axum::routing::post(move || async move { exact }))
        .route("/over", axum::routing::post(move || async move { over }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client_for = |path: &str| client_with(format!("http://{addr}{path}"), |config| config.max_body_bytes = LIMIT);
    let token = client_for("/exact")
        .request_token(&test_key(), &Grant::ClientCredentials)
        .await
        .expect("a body of exactly the limit");
    assert_eq!(token.access_token.expose_secret(), "a");
    let refused = client_for("/over")
        .request_token(&test_key(), &Grant::ClientCredentials)
        .await
        .unwrap_err();
    assert_eq!(
        refused.to_string(),
        format!("malformed token response (HTTP 200): response body exceeds {LIMIT} bytes")
    );
}

/// An HTTPS token endpoint on loopback with a certificate for `localhost`
/// from its own CA: answers each connection with one token. Returns its
/// port and the CA certificate (PEM).
async fn https_endpoint() -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    flute_token_broker::install_crypto_provider();
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ca.signing_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![ca.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = vec![0; 4096];
                let _ = tls.read(&mut request).await;
                let body = r#"{"access_token":"tls-token","token_type":"Bearer","expires_in":900}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, ca.cert.pem())
}

/// `oauth.tls_roots` is what the client trusts, exactly: a PEM file with
/// the endpoint's CA reaches it; the bundled roots (which lack that CA) do
/// not, and the failure names the certificate.
#[tokio::test]
async fn the_configured_tls_roots_are_the_ones_trusted() {
    use flute_token_broker::tls_roots::TlsRoots;
    let (port, ca_pem) = https_endpoint().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let url = format!("https://localhost:{port}/oauth2/token");

    let trusting = client_with(url.clone(), |c| {
        c.roots = TlsRoots::File(ca_file.clone()).load().unwrap()
    });
    let token = trusting
        .request_token(&test_key(), &Grant::ClientCredentials)
        .await
        .unwrap();
    assert_eq!(token.access_token.expose_secret(), "tls-token");

    let bundled = client_with(url, |c| c.roots = TlsRoots::Bundled.load().unwrap());
    let refused = bundled
        .request_token(&test_key(), &Grant::ClientCredentials)
        .await
        .unwrap_err();
    assert_eq!(refused.class(), ErrorClass::Transient, "{refused}");
    assert!(refused.to_string().contains("certificate"), "{refused}");
}
