//! The daemon as systemd runs it: a real process with a config file,
//! `NOTIFY_SOCKET` and `WATCHDOG_USEC` pointing at a socket this test owns.
//! Checks READY/STATUS/WATCHDOG, a SIGHUP reload that rotates the key while a
//! watch stream stays open, a SIGHUP with invalid configuration that changes
//! nothing, STOPPING on SIGTERM, and secret-free logs.

mod support;

use std::process::Stdio;
use std::time::Duration;

use flute_token_broker::grpc::pb::{self, watch_token_response::Update};
use support::{CLIENT_ID, CLIENT_SECRET, start_emulator};
use tokio::io::AsyncReadExt;
use tokio::net::UnixDatagram;
use tokio::process::Command;
use tokio_stream::StreamExt;

const BIN: &str = env!("CARGO_BIN_EXE_flute-token-broker");
const SANDBOX: i32 = pb::Environment::Sandbox as i32;

/// Waits for a notification containing `needle`; returns it.
async fn expect_notify(socket: &UnixDatagram, needle: &str) -> String {
    let mut buf = vec![0u8; 4096];
    let wait = async {
        loop {
            let n = socket.recv(&mut buf).await.unwrap();
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            if message.contains(needle) {
                return message;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), wait)
        .await
        .unwrap_or_else(|_| panic!("no {needle:?} notification"))
}

async fn next_update(stream: &mut tonic::Streaming<pb::WatchTokenResponse>) -> Result<Option<Update>, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an update within 10 s")
        .expect("stream open")
        .map(|u| u.update)
}

#[tokio::test]
async fn notify_reload_and_stop_under_systemd() {
    let emu = start_emulator(Duration::from_secs(900), true).await;
    let dir = tempfile::tempdir().unwrap();
    let (secret, config, sock) = (
        dir.path().join("secret"),
        dir.path().join("broker.toml"),
        dir.path().join("broker.sock"),
    );
    std::fs::write(&secret, CLIENT_SECRET).unwrap();
    let valid = format!(
        "[server]\nlisten = [\"unix:{}\"]\n[admin]\nlisten = \"\"\n[oauth]\nallow_insecure_http = true\n\
         [credentials]\nclient_id = \"{CLIENT_ID}\"\nclient_secret_file = \"{}\"\npoll_interval = \"0s\"\n\
         [environments.sandbox]\ntoken_url = \"{}\"\n[environments.production]\nenabled = false\n",
        sock.display(),
        secret.display(),
        emu.token_url()
    );
    std::fs::write(&config, &valid).unwrap();
    let notify = UnixDatagram::bind(dir.path().join("notify.sock")).unwrap();

    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", dir.path().join("notify.sock"))
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let logs = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });

    let ready = expect_notify(&notify, "READY=1").await;
    assert!(ready.contains("STATUS=sandbox: Ready"), "{ready}");
    expect_notify(&notify, "WATCHDOG=1").await;

    let mut client = flute_token_broker::client::connect(&format!("unix:{}", sock.display()), Duration::from_secs(5))
        .await
        .unwrap();
    let mut watch = support::open_watch(&mut client, SANDBOX).await;
    let Ok(Some(Update::Token(t1))) = next_update(&mut watch).await else {
        panic!("first update is a token")
    };

    // Rotate the key: Flute accepts only the new secret; the file is updated; SIGHUP.
    emu.emulator.set_client(CLIENT_ID, "after-rotation-secret");
    std::fs::write(&secret, "after-rotation-secret\n").unwrap();
    support::signal(pid, rustix::process::Signal::HUP);
    expect_notify(&notify, "RELOADING=1").await;
    let Ok(Some(Update::Token(t2))) = next_update(&mut watch).await else {
        panic!("the rotation arrives on the open stream")
    };
    assert_ne!(t2.token_id, t1.token_id);
    expect_notify(&notify, "READY=1").await;

    // An invalid configuration on SIGHUP changes nothing.
    std::fs::write(&config, "[server]\nlisten = 7\n").unwrap();
    support::signal(pid, rustix::process::Signal::HUP);
    expect_notify(&notify, "READY=1").await;
    let now = support::current_token(&mut client, SANDBOX).await;
    assert_eq!(now.token_id, t2.token_id);

    support::signal(pid, rustix::process::Signal::TERM);
    expect_notify(&notify, "STOPPING=1").await;
    let end = next_update(&mut watch).await.unwrap_err();
    assert_eq!(end.code(), tonic::Code::Unavailable);
    let status = tokio::time::timeout(Duration::from_secs(12), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");

    let logs = logs.await.unwrap();
    assert!(
        logs.contains("\"level\":\"INFO\""),
        "logs are JSON when not on a terminal: {logs}"
    );
    assert!(logs.contains("API key replaced"));
    assert!(logs.contains("reload rejected"));
    for secret in [
        CLIENT_SECRET,
        "after-rotation-secret",
        &t1.access_token,
        &t2.access_token,
    ] {
        assert!(
            !logs.contains(secret),
            "a secret or token ({} chars) reached the logs",
            secret.len()
        );
    }
}
