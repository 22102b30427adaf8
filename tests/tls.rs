//! TLS and mutual TLS on the TCP listener, with certificates made here.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use flute_token_broker::Environment;
use flute_token_broker::client::{self, Target};
use flute_token_broker::dial::ClientTlsFiles;
use flute_token_broker::serve::listen::ListenAddr;
use flute_token_broker::serve::tls::ServerTlsFiles;
use flute_token_broker::wire::pb;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use support::start_broker_with;

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, a server certificate for localhost/127.0.0.1, a client
    /// certificate from the same CA, and one from an unrelated CA.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();
        let ca_params = || {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p
        };
        let ca = CertifiedIssuer::self_signed(ca_params(), KeyPair::generate().unwrap()).unwrap();
        let rogue = CertifiedIssuer::self_signed(ca_params(), KeyPair::generate().unwrap()).unwrap();
        write("ca.pem", ca.pem());
        for (name, sans, issuer) in [
            ("server", vec!["localhost".to_owned(), "127.0.0.1".to_owned()], &ca),
            ("client", vec!["payments-service".to_owned()], &ca),
            ("rogue", vec!["intruder".to_owned()], &rogue),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(sans).unwrap().signed_by(&key, issuer).unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        // A fleet agent's certificate: a SPIFFE ID as its URI SAN.
        let mut agent = CertificateParams::new(Vec::<String>::new()).unwrap();
        agent
            .subject_alt_names
            .push(rcgen::SanType::URI("spiffe://fleet.example/agent".try_into().unwrap()));
        let key = KeyPair::generate().unwrap();
        write("agent.pem", agent.signed_by(&key, &ca).unwrap().pem());
        write("agent.key", key.serialize_pem());
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn client(&self, addr: &str, identity: Option<&str>) -> Target {
        let mut target = Target::new(addr, Duration::from_secs(5));
        target.tls = ClientTlsFiles {
            ca_file: Some(self.path("ca.pem")),
            cert_file: identity.map(|n| self.path(&format!("{n}.pem"))),
            key_file: identity.map(|n| self.path(&format!("{n}.key"))),
        };
        target
    }
}

fn server_files(pki: &Pki, mtls: bool) -> ServerTlsFiles {
    ServerTlsFiles {
        cert_file: pki.path("server.pem"),
        key_file: pki.path("server.key"),
        client_ca_file: mtls.then(|| pki.path("ca.pem")),
    }
}

async fn get_token(target: &Target) -> Result<pb::Token, String> {
    let mut client = client::connect_to(target).await.map_err(|e| e.to_string())?;
    let request = pb::GetTokenRequest {
        environment: pb::Environment::Sandbox as i32,
        min_remaining: None,
    };
    client
        .get_token(request)
        .await
        .map(|r| r.into_inner().token.unwrap())
        .map_err(|s| s.to_string())
}

fn https(addrs: &[ListenAddr]) -> String {
    addrs
        .iter()
        .find_map(|a| matches!(a, ListenAddr::Tcp(_)).then(|| format!("https://{a}")))
        .unwrap()
}

/// A broker serving the sandbox with TLS on its TCP listener (mutual TLS
/// when `mtls`), and its `https://` address.
async fn sandbox_over_tls(pki: &Pki, mtls: bool) -> (support::Broker, String) {
    let broker = start_broker_with(&[Environment::Sandbox], Duration::from_secs(900), |_, config| {
        config.server.tls = Some(server_files(pki, mtls));
    })
    .await;
    let addr = https(&broker.daemon.grpc_addrs);
    (broker, addr)
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_ca() {
    let pki = Pki::new();
    let (broker, addr) = sandbox_over_tls(&pki, true).await;

    let token = get_token(&pki.client(&addr, Some("client")))
        .await
        .expect("a client with a CA-signed certificate");
    assert_eq!(token.token_id.len(), 12);
    assert!(
        get_token(&pki.client(&addr, None)).await.is_err(),
        "no client certificate"
    );
    assert!(
        get_token(&pki.client(&addr, Some("rogue"))).await.is_err(),
        "a certificate from another CA"
    );
    assert!(
        get_token(&Target::new(addr.replace("https", "http"), Duration::from_secs(2)))
            .await
            .is_err(),
        "plaintext"
    );
    let mut no_ca = pki.client(&addr, Some("client"));
    no_ca.tls.ca_file = None;
    assert!(
        get_token(&no_ca).await.is_err(),
        "the server certificate is not trusted without the CA"
    );

    // The Unix socket stays plaintext, guarded by file permissions.
    assert!(
        get_token(&Target::new(broker.unix.clone(), Duration::from_secs(5)))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn server_only_tls() {
    let pki = Pki::new();
    let (_broker, addr) = sandbox_over_tls(&pki, false).await;
    assert!(get_token(&pki.client(&addr, None)).await.is_ok());
}

#[tokio::test]
async fn bad_certificates_fail_at_start_with_a_clear_error() {
    let pki = Pki::new();
    std::fs::write(
        pki.path("broken.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let emulators = std::collections::BTreeMap::from([(
        Environment::Sandbox,
        support::start_emulator(Duration::from_secs(900), false).await,
    )]);
    let mut config = support::broker_config(&emulators, pki.dir.path());
    config.server.tls = Some(ServerTlsFiles {
        cert_file: pki.path("broken.pem"),
        key_file: pki.path("server.key"),
        client_ca_file: None,
    });
    let err = flute_token_broker::daemon::Broker::build(config, None)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().starts_with("TLS"), "{err}");
    assert_eq!(err.exit_code(), 78);
}

#[test]
fn tls_configuration_is_validated() {
    let pki = Pki::new();
    let secret = pki.path("secret");
    std::fs::write(&secret, "s").unwrap();
    let load = |tls: &str| {
        let path = pki.path("broker.toml");
        let text = format!(
            "[credentials]\nclient_id = \"id\"\nclient_secret_file = \"{}\"\n[server.tls]\n{tls}\n",
            secret.display()
        );
        std::fs::write(&path, text).unwrap();
        flute_token_broker::config::Config::load_with_env(Some(Path::new(&path)), Some(Default::default()))
    };
    let ok = load(&format!(
        "cert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"",
        pki.path("server.pem").display(),
        pki.path("server.key").display(),
        pki.path("ca.pem").display()
    ));
    assert_eq!(
        ok.unwrap().config.server.tls.unwrap().client_ca_file,
        Some(pki.path("ca.pem"))
    );
    let only_cert = load(&format!("cert_file = \"{}\"", pki.path("server.pem").display())).unwrap_err();
    assert!(
        only_cert
            .problems
            .iter()
            .any(|p| p.contains("server.tls.cert_file: TLS needs both")),
        "{only_cert}"
    );
    let missing = load("cert_file = \"/nonexistent/c.pem\"\nkey_file = \"/nonexistent/k.pem\"").unwrap_err();
    assert!(
        missing.problems.iter().any(|p| p.contains("/nonexistent/c.pem")),
        "{missing}"
    );
}

/// Without --ca-file the CLI trusts what `oauth.tls_roots = "auto"` trusts:
/// the host's store (here `SSL_CERT_FILE`, which rustls-native-certs reads),
/// not nothing.
#[tokio::test]
async fn the_cli_trusts_the_host_store_without_a_ca_file() {
    let pki = Pki::new();
    let (_broker, addr) = sandbox_over_tls(&pki, false).await;
    let addr = addr.replace("127.0.0.1", "localhost");
    let get = |store: PathBuf| {
        let addr = addr.clone();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_flute-token-broker"))
                .args(["get", "--env", "sandbox", "--addr", &addr])
                .env("SSL_CERT_FILE", store)
                .env("SSL_CERT_DIR", "/nonexistent")
                .output()
                .await
                .unwrap()
        }
    };
    let trusted = get(pki.path("ca.pem")).await;
    assert!(trusted.status.success(), "{}", String::from_utf8_lossy(&trusted.stderr));
    assert!(!trusted.stdout.is_empty());
    let other = get(pki.path("rogue.pem")).await;
    assert!(!other.status.success(), "a store without the broker's CA is refused");
}

/// A broker over mutual TLS serving `envs`, production only to the
/// certificate with the fleet agent's SPIFFE ID.
async fn production_for_the_agent_only(pki: &Pki, envs: &[Environment]) -> support::Broker {
    start_broker_with(envs, Duration::from_secs(900), |_, config| {
        config.server.tls = Some(server_files(pki, true));
        config
            .environments
            .get_mut(&Environment::Production)
            .unwrap()
            .allowed_tls_clients = vec!["spiffe://fleet.example/agent".into()];
    })
    .await
}

/// `allowed_tls_clients`: over mutual TLS an environment serves only the
/// client certificates it lists, by URI SAN (here a SPIFFE ID) or DNS SAN;
/// others get PERMISSION_DENIED with the reason and see it RESTRICTED.
#[tokio::test]
async fn allowed_tls_clients_gate_environments_by_certificate_identity() {
    let pki = Pki::new();
    let broker = production_for_the_agent_only(&pki, &Environment::ALL).await;
    let addr = https(&broker.daemon.grpc_addrs);
    let production = |target: Target| async move {
        let mut client = client::connect_to(&target).await.unwrap();
        client
            .get_token(pb::GetTokenRequest {
                environment: pb::Environment::Production as i32,
                min_remaining: None,
            })
            .await
    };
    assert!(
        production(pki.client(&addr, Some("agent"))).await.is_ok(),
        "the listed SPIFFE ID"
    );
    let refused = production(pki.client(&addr, Some("client"))).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("production"), "{refused:?}");
    assert!(
        get_token(&pki.client(&addr, Some("client"))).await.is_ok(),
        "sandbox has no allow-list"
    );
    let status = client::status(&pki.client(&addr, Some("client")), false, None)
        .await
        .unwrap();
    assert!(
        status.text.contains("RESTRICTED") && status.without_token.is_empty(),
        "{}",
        status.text
    );
    let status = client::status(&pki.client(&addr, Some("agent")), false, None)
        .await
        .unwrap();
    assert!(!status.text.contains("RESTRICTED"), "{}", status.text);
}

/// Who may follow a hub over TCP: the agent whose certificate carries the
/// listed SPIFFE ID follows production (through a DNS name, `localhost`,
/// that the server certificate names); an agent with another certificate
/// from the same CA is refused with the reason.
#[tokio::test]
async fn agents_follow_a_hub_over_mutual_tls_only_with_a_listed_identity() {
    use flute_token_broker::config::Config;
    use flute_token_broker::daemon;
    let pki = Pki::new();
    let hub = production_for_the_agent_only(&pki, &[Environment::Production]).await;
    let port = hub
        .daemon
        .grpc_addrs
        .iter()
        .find_map(|a| match a {
            ListenAddr::Tcp(socket) => Some(socket.port()),
            _ => None,
        })
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = |identity: &str| {
        let mut config = Config::default();
        let socket = dir.path().join(format!("{identity}.sock"));
        config.server.listen = vec![ListenAddr::Unix(socket.clone())];
        config.admin.listen = None;
        config.upstream.ca_file = Some(pki.path("ca.pem"));
        config.upstream.cert_file = Some(pki.path(&format!("{identity}.pem")));
        config.upstream.key_file = Some(pki.path(&format!("{identity}.key")));
        config.environments.get_mut(&Environment::Sandbox).unwrap().enabled = false;
        let production = config.environments.get_mut(&Environment::Production).unwrap();
        production.token_url = String::new();
        production.upstream = vec![format!("https://localhost:{port}")];
        config.validate().expect("valid agent configuration");
        (config, format!("unix:{}", socket.display()))
    };
    let production = pb::Environment::Production as i32;

    let (config, addr) = agent("agent");
    let _listed = daemon::Broker::build(config, None).await.unwrap();
    let mut client = support::connect_when_up(&addr).await;
    let token = support::current_token(&mut client, production).await;
    let hub_addr = https(&hub.daemon.grpc_addrs);
    let mut at_hub = client::connect_to(&pki.client(&hub_addr, Some("agent"))).await.unwrap();
    assert_eq!(
        token.token_id,
        support::current_token(&mut at_hub, production).await.token_id
    );

    let (config, addr) = agent("client");
    let _unlisted = daemon::Broker::build(config, None).await.unwrap();
    let mut client = support::connect_when_up(&addr).await;
    let mut watch = support::open_watch(&mut client, production).await;
    let outage = support::next_outage(&mut watch).await;
    assert!(
        outage.reason.contains("PermissionDenied") && outage.reason.contains("production"),
        "{}",
        outage.reason
    );
}

/// The API proxy over mutual TLS: the environment's `allowed_tls_clients`
/// apply per request; a certificate from the CA that is not listed gets
/// 403 CALLER_NOT_ALLOWED and the API is never contacted.
#[tokio::test]
async fn the_api_proxy_refuses_an_unlisted_certificate_identity() {
    let pki = Pki::new();
    let broker = start_broker_with(
        &[Environment::Sandbox],
        Duration::from_secs(900),
        |emulators, config| {
            config.server.tls = Some(server_files(&pki, true));
            let sandbox = config.environments.get_mut(&Environment::Sandbox).unwrap();
            sandbox.allowed_tls_clients = vec!["payments-service".into()];
            sandbox.proxy.listen = vec![ListenAddr::Tcp("127.0.0.1:0".parse().unwrap())];
            sandbox.proxy.api_url = emulators[&Environment::Sandbox].base_url();
        },
    )
    .await;
    let addr = https(
        &broker
            .daemon
            .proxy_addrs
            .iter()
            .map(|(_, a)| a.clone())
            .collect::<Vec<_>>(),
    );
    let client = |identity: &str| {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_file(pki.path("ca.pem")).unwrap())
            .unwrap();
        let chain =
            vec![rustls::pki_types::CertificateDer::from_pem_file(pki.path(&format!("{identity}.pem"))).unwrap()];
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(pki.path(&format!("{identity}.key"))).unwrap();
        let tls =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .unwrap();
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .build()
            .unwrap()
    };
    let refused = client("agent")
        .get(format!("{addr}/v2/transactions"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    assert!(refused.text().await.unwrap().contains("CALLER_NOT_ALLOWED"));
    assert_eq!(broker.emulator(Environment::Sandbox).stats().api_requests, 0);
    let allowed = client("client")
        .get(format!("{addr}/v2/transactions"))
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
    assert_eq!(broker.emulator(Environment::Sandbox).stats().api_requests, 1);
}
