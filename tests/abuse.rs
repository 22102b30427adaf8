//! A local user trying to take the broker down: more idle TCP connections
//! than the process has file descriptors, and slowloris connections on the
//! admin port. The broker runs as a real process with its fd limit lowered
//! (`prlimit`), the way a systemd unit's `LimitNOFILE=` would set it.

mod support;

use std::process::Stdio;
use std::time::Duration;

use flute_token_broker::wire::pb;
use support::{CLIENT_ID, CLIENT_SECRET, start_emulator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_flute-token-broker");
const SANDBOX: i32 = pb::Environment::Sandbox as i32;
const FD_LIMIT: usize = 256;
const FLOOD: usize = 400;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn healthz(admin: &str) -> u16 {
    // A new client each time: a new connection must get through.
    support::http_client()
        .get(format!("http://{admin}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_flood_starves_neither_the_unix_socket_nor_the_admin_port() {
    let emu = start_emulator(Duration::from_secs(900), true).await;
    let dir = tempfile::tempdir().unwrap();
    let (secret, config, sock) = (
        dir.path().join("secret"),
        dir.path().join("broker.toml"),
        dir.path().join("broker.sock"),
    );
    let (tcp, admin) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    std::fs::write(&secret, CLIENT_SECRET).unwrap();
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"{tcp}\", \"unix:{}\"]\nhandshake_timeout = \"2s\"\n[admin]\nlisten = \"{admin}\"\n\
             [oauth]\nallow_insecure_http = true\n[credentials]\nclient_id = \"{CLIENT_ID}\"\nclient_secret_file = \"{}\"\n\
             [environments.sandbox]\ntoken_url = \"{}\"\n[environments.production]\nenabled = false\n",
            sock.display(),
            secret.display(),
            emu.token_url()
        ),
    )
    .unwrap();
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={FD_LIMIT}:{FD_LIMIT}"))
        .arg("--")
        .arg(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("FLUTE_BROKER__LOG__FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let logs = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let unix_addr = format!("unix:{}", sock.display());
    let mut unix = support::connect_when_up(&unix_addr).await;
    support::current_token(&mut unix, SANDBOX).await;

    // More idle TCP connections than the process has descriptors: none of
    // them ever sends the HTTP/2 preface.
    let mut flood = Vec::new();
    let attempts: Vec<_> = (0..FLOOD)
        .map(|_| {
            let tcp = tcp.clone();
            tokio::spawn(async move { tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(tcp)).await })
        })
        .collect();
    for attempt in attempts {
        if let Ok(Ok(Ok(stream))) = attempt.await {
            flood.push(stream);
        }
    }
    assert!(flood.len() > FD_LIMIT, "the flood holds {} connections", flood.len());

    // Throughout the flood: the Unix socket and /healthz answer.
    let grpc_label = format!("flute_broker_connection_limit_reached_total{{listener=\"grpc:{tcp}\"}}");
    for _ in 0..5 {
        support::current_token(&mut unix, SANDBOX).await;
        let mut fresh = support::connect_when_up(&unix_addr).await;
        support::current_token(&mut fresh, SANDBOX).await;
        assert_eq!(healthz(&admin).await, 200);
    }
    assert!(support::metric(&admin, &grpc_label).await >= 1.0, "the budget was hit");

    // Slowloris on the admin port: a request head that never ends is cut
    // off at the handshake deadline.
    let mut slow = TcpStream::connect(&admin).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf))
        .await
        .expect("the server closes the slow connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // TCP recovers once the idle connections time out, while the flood's
    // sockets are still held open by the client.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let recovered = loop {
        let attempt = async {
            let mut client = flute_token_broker::client::connect(&format!("http://{tcp}"), Duration::from_secs(2))
                .await
                .ok()?;
            client
                .get_token(pb::GetTokenRequest {
                    environment: SANDBOX,
                    min_remaining: None,
                })
                .await
                .ok()
        };
        if tokio::time::timeout(Duration::from_secs(3), attempt)
            .await
            .ok()
            .flatten()
            .is_some()
        {
            break true;
        }
        if tokio::time::Instant::now() > deadline {
            break false;
        }
    };
    assert!(recovered, "TCP answers again after the idle connections timed out");

    // The same deadline guards the HTTP/JSON face of the gRPC listener: an
    // HTTP/1.1 request head that never ends is cut off too.
    let mut slow = TcpStream::connect(&tcp).await.unwrap();
    slow.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nFlute-Broker: true\r\n")
        .await
        .unwrap();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf))
        .await
        .expect("the gRPC listener closes a slow HTTP/1.1 request");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let closed =
        format!("flute_broker_connections_closed_total{{listener=\"grpc:{tcp}\",reason=\"handshake_timeout\"}}");
    assert!(support::metric(&admin, &closed).await >= 1.0);
    drop(flood);

    support::signal(child.id().unwrap(), nix::sys::signal::Signal::SIGTERM);
    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    let logs = logs.await.unwrap();
    assert!(logs.contains("connection limit reached"), "the limit is logged");
    let warnings = logs.matches("connection limit reached").count();
    assert!(warnings <= 10, "the warning is rate-limited ({warnings} lines)");
    assert!(logs.contains("open-file limit"), "both fd limits are logged");
}
