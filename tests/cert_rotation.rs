//! TLS material that rotates in place, from outside: certificate files
//! rewritten, swapped the kubelet's way (`..data`), or broken, while
//! callers keep calling; new handshakes are checked from the client side.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flute_token_broker::Environment;
use flute_token_broker::certs::CertificateInfo;
use flute_token_broker::config::Config;
use flute_token_broker::serve::listen::ListenAddr;
use flute_token_broker::serve::tls::ServerTlsFiles;
use flute_token_broker::wire::pb;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SerialNumber};
use support::start_broker_with;

/// A certificate authority made here.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name.to_owned());
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `sans` with this serial, and its key (PEM).
    fn issue(&self, sans: &[&str], serial: u64) -> Leaf {
        self.issue_for(sans, serial, None)
    }

    /// As [`Ca::issue`], valid for `life` from a second ago when given.
    fn issue_for(&self, sans: &[&str], serial: u64, life: Option<Duration>) -> Leaf {
        let window = life.map(|life| (-time::Duration::seconds(1), time::Duration::try_from(life).unwrap()));
        self.issue_window(sans, serial, window)
    }

    /// A certificate valid from `after` from now, for a day.
    fn issue_later(&self, sans: &[&str], serial: u64, after: Duration) -> Leaf {
        let window = (time::Duration::try_from(after).unwrap(), time::Duration::days(1));
        self.issue_window(sans, serial, Some(window))
    }

    /// A certificate that expired yesterday.
    fn issue_expired(&self, sans: &[&str], serial: u64) -> Leaf {
        self.issue_window(
            sans,
            serial,
            Some((-time::Duration::days(30), -time::Duration::days(1))),
        )
    }

    /// A certificate valid from `now + window.0` to `now + window.1`
    /// (rcgen's default validity without a window).
    fn issue_window(&self, sans: &[&str], serial: u64, window: Option<(time::Duration, time::Duration)>) -> Leaf {
        let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.serial_number = Some(SerialNumber::from(serial));
        if let Some((from, until)) = window {
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now + from;
            params.not_after = now + until;
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            serial: CertificateInfo::of(cert.der()).unwrap().serial,
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

struct Leaf {
    cert: String,
    key: String,
    serial: String,
}

/// The files of one TLS directory, written the way the test asks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Writes {
    /// Each file written to a temporary name and renamed over the old one.
    Renamed,
    /// The kubelet's atomic writer: a new timestamped directory, a `..data`
    /// symlink swapped to it by rename; the visible names are symlinks
    /// into `..data` and are never rewritten.
    Kubelet,
}

struct TlsDir {
    dir: PathBuf,
    writes: Writes,
    generation: u32,
}

impl TlsDir {
    fn new(dir: PathBuf, writes: Writes, files: &[(&str, &str)]) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let mut tls = Self {
            dir,
            writes,
            generation: 0,
        };
        tls.write(files);
        if writes == Writes::Kubelet {
            for (name, _) in files {
                std::os::unix::fs::symlink(format!("..data/{name}"), tls.dir.join(name)).unwrap();
            }
        }
        tls
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Replaces the contents of `files` (every file, for the kubelet).
    fn write(&mut self, files: &[(&str, &str)]) {
        self.generation += 1;
        match self.writes {
            Writes::Renamed => {
                for (name, content) in files {
                    let temporary = self.dir.join(format!(".{name}.tmp"));
                    std::fs::write(&temporary, content).unwrap();
                    std::fs::rename(&temporary, self.dir.join(name)).unwrap();
                }
            }
            Writes::Kubelet => {
                let generation = self.dir.join(format!("..2026_12_06_{:02}", self.generation));
                std::fs::create_dir(&generation).unwrap();
                for (name, content) in files {
                    std::fs::write(generation.join(name), content).unwrap();
                }
                let link = self.dir.join("..data_tmp");
                std::os::unix::fs::symlink(generation.file_name().unwrap(), &link).unwrap();
                std::fs::rename(&link, self.dir.join("..data")).unwrap();
            }
        }
    }
}

/// A broker serving the sandbox with TLS from `tls` (`tls.crt`,
/// `tls.key`, and `ca.crt` as the client CA when `mutual`), `adjust`ed.
async fn broker_on(tls: &TlsDir, mutual: bool, adjust: impl FnOnce(&mut Config)) -> support::Broker {
    start_broker_with(&[Environment::Sandbox], Duration::from_secs(900), |_, config| {
        config.server.tls = Some(ServerTlsFiles {
            cert_file: tls.path("tls.crt"),
            key_file: tls.path("tls.key"),
            client_ca_file: mutual.then(|| tls.path("ca.crt")),
        });
        adjust(config);
    })
    .await
}

/// The serial of the certificate a new TLS handshake with `addr` shows,
/// as a client trusting `ca_pem` and presenting `client` (mutual TLS).
async fn serial_seen(addr: std::net::SocketAddr, ca_pem: &str, client: &Leaf) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain = vec![CertificateDer::from_pem_slice(client.cert.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(client.key.as_bytes()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    Ok(CertificateInfo::of(&der).unwrap().serial)
}

/// Waits (at most 10 s) until a new handshake shows `serial`.
async fn await_serial(addr: std::net::SocketAddr, ca_pem: &str, client: &Leaf, serial: &str) {
    let wait = async {
        loop {
            if serial_seen(addr, ca_pem, client).await.as_deref() == Ok(serial) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("new handshakes show serial {serial} within 10 s"));
}

fn tcp_addr(broker: &flute_token_broker::daemon::RunningBroker) -> std::net::SocketAddr {
    broker
        .grpc_addrs
        .iter()
        .find_map(|a| match a {
            ListenAddr::Tcp(socket) => Some(*socket),
            _ => None,
        })
        .unwrap()
}

/// An agent following the sandbox on `hub` over mutual TLS, trusting
/// `ca_file` and presenting `cert`/`key`.
async fn start_agent(
    hub: &str,
    dir: &Path,
    ca_file: PathBuf,
    cert: PathBuf,
    key: PathBuf,
) -> (flute_token_broker::daemon::RunningBroker, String) {
    let mut config = Config::default();
    let socket = dir.join("agent.sock");
    config.server.listen = vec![ListenAddr::Unix(socket.clone())];
    config.admin.listen = None;
    config.refresh.backoff_initial = Duration::from_millis(100);
    config.refresh.backoff_max = Duration::from_millis(500);
    config.upstream.ca_file = Some(ca_file);
    config.upstream.cert_file = Some(cert);
    config.upstream.key_file = Some(key);
    let sandbox = config.environments.get_mut(&Environment::Sandbox).unwrap();
    sandbox.token_url = String::new();
    sandbox.upstream = vec![hub.to_owned()];
    config.environments.get_mut(&Environment::Production).unwrap().enabled = false;
    config.validate().expect("a valid agent configuration");
    let agent = flute_token_broker::daemon::Broker::build(config, None)
        .await
        .expect("agent starts");
    (agent, format!("unix:{}", socket.display()))
}

/// GetToken at an address every 2 ms, counted, until stopped.
struct Calls {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Calls {
    fn start(addr: String) -> Self {
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (o, f, s) = (ok.clone(), failed.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut client = support::connect_when_up(&addr).await;
            while !s.load(Ordering::Relaxed) {
                let request = pb::GetTokenRequest {
                    environment: pb::Environment::Sandbox as i32,
                    min_remaining: None,
                };
                match client.get_token(request).await {
                    Ok(_) => o.fetch_add(1, Ordering::Relaxed),
                    Err(_) => f.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        Self { ok, failed, stop, task }
    }

    /// Waits until `more` further calls have been answered.
    async fn answered(&self, more: u64) {
        let target = self.ok.load(Ordering::Relaxed) + more;
        while self.ok.load(Ordering::Relaxed) < target {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

/// A hub's server certificate and its client CA bundle rotated while an
/// agent keeps answering GetToken over a mutual-TLS follow of that hub:
/// no call fails, new handshakes show the new serial, the agent's existing
/// connection is not cut, and a new agent gets through the new CA bundle.
async fn hub_rotation_under_load(writes: Writes) {
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let bundle = format!("{}{}", old_ca.pem(), new_ca.pem());
    let (old_server, new_server) = (old_ca.issue(&["localhost"], 1001), new_ca.issue(&["localhost"], 2002));
    let agent_leaf = old_ca.issue(&["agent.fleet.example"], 3003);

    let work = tempfile::tempdir().unwrap();
    let mut hub_tls = TlsDir::new(
        work.path().join("hub-tls"),
        writes,
        &[
            ("tls.crt", &old_server.cert),
            ("tls.key", &old_server.key),
            ("ca.crt", &old_ca.pem()),
        ],
    );
    let hub = broker_on(&hub_tls, true, |_| {}).await;
    let hub_addr = tcp_addr(&hub.daemon);
    assert_eq!(
        serial_seen(hub_addr, &bundle, &agent_leaf).await.unwrap(),
        old_server.serial
    );

    // The agent trusts both CAs (distributed ahead of the rotation).
    let agent_files = work.path().join("agent");
    std::fs::create_dir(&agent_files).unwrap();
    for (name, content) in [
        ("ca.crt", bundle.as_str()),
        ("tls.crt", &agent_leaf.cert),
        ("tls.key", &agent_leaf.key),
    ] {
        std::fs::write(agent_files.join(name), content).unwrap();
    }
    let hub_url = format!("https://localhost:{}", hub_addr.port());
    let (agent, agent_addr) = start_agent(
        &hub_url,
        &agent_files,
        agent_files.join("ca.crt"),
        agent_files.join("tls.crt"),
        agent_files.join("tls.key"),
    )
    .await;
    agent.sources.get(Environment::Sandbox).unwrap().holding_token().await;
    let calls = Calls::start(agent_addr);
    calls.answered(100).await;

    hub_tls.write(&[
        ("tls.crt", &new_server.cert),
        ("tls.key", &new_server.key),
        ("ca.crt", &bundle),
    ]);
    await_serial(hub_addr, &bundle, &agent_leaf, &new_server.serial).await;

    // A RefreshToken at the agent is forwarded on its existing connection.
    let mut client = support::connect_when_up(&format!("unix:{}", agent_files.join("agent.sock").display())).await;
    let current = support::current_token(&mut client, pb::Environment::Sandbox as i32).await;
    client
        .refresh_token(pb::RefreshTokenRequest {
            environment: pb::Environment::Sandbox as i32,
            rejected_token_id: current.token_id,
        })
        .await
        .expect("the agent's connection to the hub survived the rotation");
    // A new agent (a new handshake) is admitted through the new bundle.
    let second = work.path().join("second-agent");
    std::fs::create_dir(&second).unwrap();
    let (late, _) = start_agent(
        &hub_url,
        &second,
        agent_files.join("ca.crt"),
        agent_files.join("tls.crt"),
        agent_files.join("tls.key"),
    )
    .await;
    tokio::time::timeout(
        Duration::from_secs(10),
        late.sources.get(Environment::Sandbox).unwrap().holding_token(),
    )
    .await
    .expect("a new agent follows the rotated hub");

    calls.answered(100).await;
    let (ok, failed) = calls.finish().await;
    eprintln!(
        "{writes:?}: {ok} calls, {failed} failed; serials {} then {}",
        old_server.serial, new_server.serial
    );
    assert_eq!(failed, 0, "{ok} answered");
    assert!(ok > 0);
    let admin = hub.daemon.admin_addr.unwrap();
    let reloaded = support::metric(
        admin,
        "flute_broker_tls_reloads_total{material=\"server\",result=\"ok\"}",
    )
    .await;
    assert!(reloaded >= 1.0, "{reloaded}");
}

#[tokio::test]
async fn a_hubs_certificate_and_ca_bundle_rotate_under_load_renamed_in_place() {
    hub_rotation_under_load(Writes::Renamed).await;
}

#[tokio::test]
async fn a_hubs_certificate_and_ca_bundle_rotate_under_load_the_kubelets_way() {
    hub_rotation_under_load(Writes::Kubelet).await;
}

/// Bad material never serves: a key of another certificate, then an empty
/// certificate file, each counted once as a failure while the old
/// certificate keeps serving; then a good pair is taken.
#[tokio::test]
async fn broken_material_keeps_the_last_good_one_until_a_good_pair_arrives() {
    let ca = Ca::new("CA");
    let (first, second, stranger) = (
        ca.issue(&["localhost"], 11),
        ca.issue(&["localhost"], 22),
        ca.issue(&["localhost"], 33),
    );
    let client = ca.issue(&["client"], 44);
    let work = tempfile::tempdir().unwrap();
    let mut tls = TlsDir::new(
        work.path().join("tls"),
        Writes::Kubelet,
        &[("tls.crt", &first.cert), ("tls.key", &first.key)],
    );
    let broker = broker_on(&tls, false, |_| {}).await;
    let (addr, admin) = (tcp_addr(&broker.daemon), broker.daemon.admin_addr.unwrap());
    let failed = "flute_broker_tls_reloads_total{material=\"server\",result=\"failed\"}";
    let taken = "flute_broker_tls_reloads_total{material=\"server\",result=\"ok\"}";

    tls.write(&[("tls.crt", &second.cert), ("tls.key", &stranger.key)]);
    support::await_metric(admin, failed, 1.0).await;
    assert_eq!(serial_seen(addr, &ca.pem(), &client).await.unwrap(), first.serial);

    tls.write(&[("tls.crt", ""), ("tls.key", &second.key)]);
    support::await_metric(admin, failed, 2.0).await;
    assert_eq!(serial_seen(addr, &ca.pem(), &client).await.unwrap(), first.serial);

    tls.write(&[("tls.crt", &second.cert), ("tls.key", &second.key)]);
    support::await_metric(admin, taken, 1.0).await;
    assert_eq!(serial_seen(addr, &ca.pem(), &client).await.unwrap(), second.serial);
    assert_eq!(support::metric(admin, failed).await, 2.0);
    let expiry = support::metric(
        admin,
        "flute_broker_tls_certificate_expiry_timestamp_seconds{role=\"server\"}",
    )
    .await;
    assert!(expiry > 4.0e9, "rcgen's default validity runs to 4096: {expiry}");
    // `status` shows the certificate now in use.
    let target = flute_token_broker::client::Target::new(broker.unix.clone(), Duration::from_secs(5));
    let status = flute_token_broker::client::status(&target, false, None).await.unwrap();
    let shown = format!(
        "certificate: server (CN=rcgen self signed cert): serial {}, expires 4096-01-01T00:00:00Z",
        second.serial
    );
    assert!(status.text.contains(&shown), "{}", status.text);
}

/// An agent's client certificate with a compressed life (3 s, standing in
/// for one-hour SVIDs) is reissued on disk every 1.5 s, as SPIRE does at
/// half-life, while the agent follows a hub that requires client
/// certificates. Before the certificate its connection was opened with
/// expires, the agent opens a new connection with the newest one and only
/// then lets the old one go: five renewals, none failed (a renewal with
/// a stale certificate would be refused by the hub), no failed call, the
/// stream never lost.
#[tokio::test]
async fn an_agents_short_lived_client_certificate_rotates_five_times_without_a_failed_call() {
    use flute_token_broker::metrics::{EnvLabels, ResultEnvLabels};
    const LIFE: Duration = Duration::from_secs(3);
    let ca = Ca::new("fleet CA");
    let server = ca.issue(&["localhost"], 1);
    let work = tempfile::tempdir().unwrap();
    let hub_tls = TlsDir::new(
        work.path().join("hub-tls"),
        Writes::Renamed,
        &[
            ("tls.crt", &server.cert),
            ("tls.key", &server.key),
            ("ca.crt", &ca.pem()),
        ],
    );
    let hub = broker_on(&hub_tls, true, |_| {}).await;
    let first = ca.issue_for(&["agent.fleet.example"], 100, Some(LIFE));
    let mut agent_tls = TlsDir::new(
        work.path().join("agent-tls"),
        Writes::Renamed,
        &[("tls.crt", &first.cert), ("tls.key", &first.key), ("ca.crt", &ca.pem())],
    );
    let hub_url = format!("https://localhost:{}", tcp_addr(&hub.daemon).port());
    let (agent, agent_addr) = start_agent(
        &hub_url,
        &agent_tls.dir.clone(),
        agent_tls.path("ca.crt"),
        agent_tls.path("tls.crt"),
        agent_tls.path("tls.key"),
    )
    .await;
    agent.sources.get(Environment::Sandbox).unwrap().holding_token().await;
    let renewals = |result| {
        let labels = ResultEnvLabels {
            environment: "sandbox",
            result,
        };
        agent.metrics.upstream_renewals.get_or_create(&labels).get()
    };
    let calls = Calls::start(agent_addr);
    // The issuer: a new certificate at each half-life, until five renewals.
    let mut issued = vec![first.serial.clone()];
    let mut reissue = tokio::time::interval_at(tokio::time::Instant::now() + LIFE / 2, LIFE / 2);
    let done = async {
        while renewals("ok") < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::pin!(done);
    let deadline = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut done => break,
            () = &mut deadline => panic!("five renewals within 30 s: {} ok, {} failed", renewals("ok"), renewals("failed")),
            _ = reissue.tick() => {
                let next = ca.issue_for(&["agent.fleet.example"], 100 + issued.len() as u64, Some(LIFE));
                agent_tls.write(&[("tls.crt", &next.cert), ("tls.key", &next.key)]);
                issued.push(next.serial);
            }
        }
    }
    let (ok, failed) = calls.finish().await;
    eprintln!(
        "{} client certificates issued: {} renewals ok, {} failed; {ok} calls, {failed} failed",
        issued.len(),
        renewals("ok"),
        renewals("failed")
    );
    assert_eq!(failed, 0, "{ok} answered");
    assert_eq!(renewals("failed"), 0, "no renewal missed its certificate");
    let sandbox = EnvLabels { environment: "sandbox" };
    let failures = agent.metrics.consecutive_failures.get_or_create(&sandbox).get();
    assert_eq!(failures, 0, "the follow was never lost");
}

/// `check-config` shows each certificate in use with its expiry, warns
/// when one expires within `[certificates] expiry_warning` (7 days), and
/// refuses one already expired (exit 78, naming the file).
#[tokio::test]
async fn check_config_shows_each_certificates_expiry_and_warns_before_it() {
    let ca = Ca::new("CA");
    let work = tempfile::tempdir().unwrap();
    let secret = work.path().join("secret");
    std::fs::write(&secret, "s").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let check = |leaf: &Leaf| {
        std::fs::write(work.path().join("tls.crt"), &leaf.cert).unwrap();
        std::fs::write(work.path().join("tls.key"), &leaf.key).unwrap();
        std::fs::write(work.path().join("ca.crt"), ca.pem()).unwrap();
        let config = work.path().join("broker.toml");
        std::fs::write(
            &config,
            format!(
                "[credentials]\nclient_id = \"id\"\nclient_secret_file = \"{}\"\n[server.tls]\ncert_file = \"{d}/tls.crt\"\nkey_file = \"{d}/tls.key\"\nclient_ca_file = \"{d}/ca.crt\"\n",
                secret.display(),
                d = work.path().display()
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_flute-token-broker"))
            .args(["check-config", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = check(&ca.issue_for(&["localhost"], 7, Some(Duration::from_secs(90 * 86_400))));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("certificate: server (") && stderr.contains("serial 07"),
        "{stderr}"
    );
    assert!(stderr.contains("certificate: client_ca (CN=CA)"), "{stderr}");
    assert!(!stderr.contains("warning:"), "{stderr}");

    let (code, stderr) = check(&ca.issue_for(&["localhost"], 8, Some(Duration::from_secs(3 * 86_400))));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("warning: the server certificate"), "{stderr}");
    assert!(
        stderr.contains("(in 2 days)") || stderr.contains("(in 3 days)"),
        "{stderr}"
    );

    let (code, stderr) = check(&ca.issue_expired(&["localhost"], 9));
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("server.tls:") && stderr.contains("tls.crt: the certificate expired at"),
        "{stderr}"
    );
}

/// `[oauth] tls_roots = "/path"` rotates in place too: with a bundle that
/// does not hold the token endpoint's CA, no token can be had (the TLS
/// handshake fails); once the right bundle is written, the next attempt
/// gets one, with no restart.
#[tokio::test]
async fn token_endpoint_roots_from_a_file_rotate_in_place() {
    let (right, wrong) = (Ca::new("Flute's CA"), Ca::new("another CA"));
    let endpoint = right.issue(&["127.0.0.1", "localhost"], 5);
    let work = tempfile::tempdir().unwrap();
    let mut bundle = TlsDir::new(work.path().join("roots"), Writes::Kubelet, &[("ca.pem", &wrong.pem())]);
    let mut https = None;
    let broker = start_broker_with(
        &[Environment::Sandbox],
        Duration::from_secs(900),
        |emulators, config| {
            use rustls::pki_types::pem::PemObject;
            let chain = vec![rustls::pki_types::CertificateDer::from_pem_slice(endpoint.cert.as_bytes()).unwrap()];
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(endpoint.key.as_bytes()).unwrap();
            let tls = emulators[&Environment::Sandbox]
                .emulator
                .spawn_tls("127.0.0.1:0".parse().unwrap(), chain, key)
                .unwrap();
            config.environments.get_mut(&Environment::Sandbox).unwrap().token_url = tls.token_url();
            config.oauth.tls_roots = flute_token_broker::tls_roots::TlsRoots::File(bundle.path("ca.pem"));
            https = Some(tls);
        },
    )
    .await;
    let source = broker.daemon.sources.get(Environment::Sandbox).unwrap();
    let admin = broker.daemon.admin_addr.unwrap();
    // The first attempt fails: the endpoint's certificate is not trusted.
    let mut snapshots = source.subscribe();
    let failed = tokio::time::timeout(Duration::from_secs(10), snapshots.wait_for(|s| s.last_error.is_some()))
        .await
        .expect("the first attempt fails within 10 s")
        .unwrap()
        .clone();
    assert!(
        failed.token.is_none(),
        "no token through a bundle without the endpoint's CA"
    );
    eprintln!("with the wrong bundle: {}", failed.last_error.as_ref().unwrap().message);

    bundle.write(&[("ca.pem", &right.pem())]);
    tokio::time::timeout(Duration::from_secs(10), source.holding_token())
        .await
        .expect("a token once the right bundle is in place");
    let reloaded = "flute_broker_tls_reloads_total{material=\"token_endpoint_roots\",result=\"ok\"}";
    assert_eq!(support::metric(admin, reloaded).await, 1.0);
    assert!(https.is_some());
}

/// A certificate written before its validity begins (an issuer whose clock
/// runs ahead) is refused once, then taken by the periodic check once it is
/// valid, with no new write.
#[tokio::test]
async fn a_certificate_not_valid_yet_is_taken_when_it_becomes_valid() {
    let ca = Ca::new("CA");
    let (first, early) = (
        ca.issue(&["localhost"], 61),
        ca.issue_later(&["localhost"], 62, Duration::from_secs(2)),
    );
    let client = ca.issue(&["client"], 63);
    let work = tempfile::tempdir().unwrap();
    let mut tls = TlsDir::new(
        work.path().join("tls"),
        Writes::Kubelet,
        &[("tls.crt", &first.cert), ("tls.key", &first.key)],
    );
    let broker = broker_on(&tls, false, |config| {
        config.certificates.poll_interval = Duration::from_secs(1)
    })
    .await;
    let (addr, admin) = (tcp_addr(&broker.daemon), broker.daemon.admin_addr.unwrap());
    tls.write(&[("tls.crt", &early.cert), ("tls.key", &early.key)]);
    support::await_metric(
        admin,
        "flute_broker_tls_reloads_total{material=\"server\",result=\"ok\"}",
        1.0,
    )
    .await;
    assert_eq!(serial_seen(addr, &ca.pem(), &client).await.unwrap(), early.serial);
    let refused = support::metric(
        admin,
        "flute_broker_tls_reloads_total{material=\"server\",result=\"failed\"}",
    )
    .await;
    assert!(refused >= 1.0, "refused while not valid yet: {refused}");
}
