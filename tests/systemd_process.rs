//! The daemon as systemd runs it: a real process with a config file,
//! `NOTIFY_SOCKET` and `WATCHDOG_USEC` pointing at a socket this test owns.
//! Checks READY/STATUS/WATCHDOG, a SIGHUP reload that rotates the key while a
//! watch stream stays open, a SIGHUP with invalid configuration that changes
//! nothing, STOPPING on SIGTERM, and secret-free logs.

mod support;

use std::process::Stdio;
use std::time::Duration;

use flute_token_broker::wire::pb::{self, watch_token_response::Update};
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
    support::signal(pid, nix::sys::signal::Signal::SIGHUP);
    expect_notify(&notify, "RELOADING=1").await;
    let Ok(Some(Update::Token(t2))) = next_update(&mut watch).await else {
        panic!("the rotation arrives on the open stream")
    };
    assert_ne!(t2.token_id, t1.token_id);
    expect_notify(&notify, "READY=1").await;

    // An invalid configuration on SIGHUP changes nothing.
    std::fs::write(&config, "[server]\nlisten = 7\n").unwrap();
    support::signal(pid, nix::sys::signal::Signal::SIGHUP);
    expect_notify(&notify, "READY=1").await;
    let now = support::current_token(&mut client, SANDBOX).await;
    assert_eq!(now.token_id, t2.token_id);

    support::signal(pid, nix::sys::signal::Signal::SIGTERM);
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
    // Fields are values, not Rust Debug text (`"soft":"Some(20000)"` before).
    assert!(!logs.contains("Some("), "{logs}");
    let limits = logs
        .lines()
        .find(|l| l.contains("open-file limit"))
        .expect("the open-file limit is logged");
    let line: serde_json::Value = serde_json::from_str(limits).unwrap();
    assert!(line["soft"].is_u64() && line["hard"].is_u64(), "{limits}");
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

/// A stand-in for systemd's side of a service, in a few lines of Python:
/// it binds an activation socket once (`SOCKET_PATH`, or `-` for none;
/// mode 0666, so a broker that changed it would show) and keeps it open
/// across brokers, and holds a notify socket with a file
/// descriptor store (`NOTIFY_PATH`, or `-`) that keeps the descriptor a
/// broker hands over with `FDSTORE=1` (forgotten on `FDSTOREREMOVE=1`).
/// `start` runs a broker with them passed as systemd does (`LISTEN_FDS`,
/// `LISTEN_FDNAMES`, `LISTEN_PID`, `NOTIFY_SOCKET`) and answers
/// `started PID N`, N the stored descriptors passed; `wait` answers
/// `exited CODE`; a stored descriptor is announced as `stored N`.
const SYSTEMD_STAND_IN: &str = r#"
import os, socket, sys, threading
sock_path, notify_path, binary, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
listener = None
if sock_path != "-":
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    os.chmod(sock_path, 0o666)
    listener.listen(128)
stored = {}
lock = threading.Lock()
def receive(notify):
    while True:
        data, fds, _, _ = socket.recv_fds(notify, 65536, 8)
        fields = dict(l.split("=", 1) for l in data.decode().splitlines() if "=" in l)
        with lock:
            if fields.get("FDSTOREREMOVE") == "1":
                fd = stored.pop(fields.get("FDNAME"), None)
                if fd is not None:
                    os.close(fd)
            if fields.get("FDSTORE") == "1" and fds:
                stored[fields.get("FDNAME")] = fds[0]
                print("stored", len(fds), flush=True)
if notify_path != "-":
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    threading.Thread(target=receive, args=(notify,), daemon=True).start()
child = None
for line in sys.stdin:
    if line.strip() == "wait" and child:
        _, status = os.waitpid(child, 0)
        child = None
        print("exited", os.waitstatus_to_exitcode(status), flush=True)
    elif line.strip() == "start" and not child:
        with lock:
            passed = [(name, fd) for name, fd in stored.items()]
        child = os.fork()
        if child == 0:
            env = dict(os.environ)
            if notify_path != "-":
                env["NOTIFY_SOCKET"] = notify_path
            fds = ([("broker", listener.fileno())] if listener else []) + passed
            # Copied above every target first, then into 3, 4, ...
            high = [os.dup(fd) for _, fd in fds]
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i)
            if fds:
                env.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()),
                           LISTEN_FDNAMES=":".join(name for name, _ in fds))
            os.execve(binary, [binary] + args, env)
        print("started", child, len(passed), flush=True)
"#;

/// The running stand-in.
struct SystemdStandIn {
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl SystemdStandIn {
    /// Holds the activation socket `socket` and a notify socket at
    /// `notify`, for brokers running `serve --config config`.
    fn spawn(socket: Option<&std::path::Path>, notify: Option<&std::path::Path>, config: &std::path::Path) -> Self {
        let path_or_none = |p: Option<&std::path::Path>| p.map_or_else(|| "-".into(), |p| p.as_os_str().to_owned());
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(SYSTEMD_STAND_IN)
            .arg(path_or_none(socket))
            .arg(path_or_none(notify))
            .arg(BIN)
            .args(["serve", "--config"])
            .arg(config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        use tokio::io::AsyncBufReadExt;
        Self {
            stdin: child.stdin.take().unwrap(),
            lines: tokio::io::BufReader::new(child.stdout.take().unwrap()).lines(),
            _child: child,
        }
    }

    /// Sends `command` (none when empty) and returns the words of the next
    /// line the stand-in prints.
    async fn exchange(&mut self, command: &str) -> Vec<String> {
        use tokio::io::AsyncWriteExt;
        if !command.is_empty() {
            self.stdin.write_all(format!("{command}\n").as_bytes()).await.unwrap();
        }
        let line = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
            .await
            .expect("the stand-in answers")
            .unwrap()
            .expect("the stand-in runs");
        line.split(' ').map(str::to_owned).collect()
    }

    /// Starts a broker; its pid and the count of stored descriptors passed.
    async fn start(&mut self) -> (u32, usize) {
        let words = self.exchange("start").await;
        assert_eq!(words[0], "started", "{words:?}");
        (words[1].parse().unwrap(), words[2].parse().unwrap())
    }

    /// Waits for the broker to exit; its exit code (negative: the signal).
    async fn wait(&mut self) -> i64 {
        let words = self.exchange("wait").await;
        assert_eq!(words[0], "exited", "{words:?}");
        words[1].parse().unwrap()
    }
}

fn config_for(dir: &std::path::Path, token_url: &str, listen: &std::path::Path) -> std::path::PathBuf {
    let secret = dir.join("secret");
    std::fs::write(&secret, CLIENT_SECRET).unwrap();
    let config = dir.join(format!("broker-{}.toml", listen.file_name().unwrap().to_string_lossy()));
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"unix:{}\"]\n[admin]\nlisten = \"\"\n[oauth]\nallow_insecure_http = true\n\
             [credentials]\nclient_id = \"{CLIENT_ID}\"\nclient_secret_file = \"{}\"\n\
             [environments.sandbox]\ntoken_url = \"{token_url}\"\n[environments.production]\nenabled = false\n",
            listen.display(),
            secret.display(),
        ),
    )
    .unwrap();
    config
}

/// Socket activation: the broker serves the socket systemd passes and never
/// changes or removes it; a call made while no broker runs waits in the
/// socket's backlog and is answered by the next broker; a passed socket
/// that the configuration does not name is a configuration error (78).
#[tokio::test]
async fn socket_activation_serves_the_passed_socket_and_leaves_it_in_place() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let emu = start_emulator(Duration::from_secs(900), true).await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("activated.sock");
    let config = config_for(dir.path(), &emu.token_url(), &sock);
    let mut holder = SystemdStandIn::spawn(Some(&sock), None, &config);
    let (first, _) = holder.start().await;
    let addr = format!("unix:{}", sock.display());
    let token = |addr: String| async move {
        let mut client = flute_token_broker::client::connect(&addr, Duration::from_secs(30)).await?;
        let mut request = tonic::Request::new(pb::GetTokenRequest {
            environment: SANDBOX,
            min_remaining: None,
        });
        request.set_timeout(Duration::from_secs(30));
        client
            .get_token(request)
            .await
            .map(|r| r.into_inner().token.unwrap())
            .map_err(|s| flute_token_broker::client::ClientError::Usage(s.to_string()))
    };
    let t1 = token(addr.clone()).await.unwrap();
    let inode = std::fs::metadata(&sock).unwrap().ino();

    // The broker stops; a caller connects while none runs: it waits in the
    // backlog and the next broker answers it.
    support::signal(first, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(holder.wait().await, 0, "the first broker stopped cleanly");
    let waiting = tokio::spawn(token(addr.clone()));
    let (second, _) = holder.start().await;
    let t2 = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the waiting call is answered")
        .unwrap()
        .expect("by the next broker");
    assert_ne!(t2.token_id, t1.token_id, "the next broker's own token");
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.ino(), inode, "the socket was never replaced");
    assert_eq!(meta.permissions().mode() & 0o777, 0o666, "nor changed");
    support::signal(second, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(holder.wait().await, 0, "the second broker stopped cleanly");

    // A passed socket the configuration does not name.
    let other = config_for(dir.path(), &emu.token_url(), &dir.path().join("configured.sock"));
    let mut holder = SystemdStandIn::spawn(Some(&dir.path().join("unnamed.sock")), None, &other);
    holder.start().await;
    assert_eq!(holder.wait().await, 78, "an unmatched socket is a configuration error");
}

/// The tokens cross a restart in the fd store: the broker seals them into a
/// memfd at SIGTERM, the next broker reads the descriptor systemd passes
/// (named `tokens`) and serves the same token at once, with no token
/// request; and asks systemd to drop it, so a later start never sees it.
#[tokio::test]
async fn tokens_cross_a_restart_in_the_fd_store() {
    let emu = start_emulator(Duration::from_secs(900), true).await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("broker.sock");
    let config = config_for(dir.path(), &emu.token_url(), &sock);
    let mut systemd = SystemdStandIn::spawn(None, Some(&dir.path().join("notify")), &config);
    let addr = format!("unix:{}", sock.display());
    let (first, passed) = systemd.start().await;
    assert_eq!(passed, 0, "nothing stored yet");
    let mut client = support::connect_when_up(&addr).await;
    let before = support::current_token(&mut client, SANDBOX).await;
    let requests = emu.emulator.stats().token_requests;

    support::signal(first, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        systemd.exchange("").await,
        ["stored", "1"],
        "the broker handed its tokens over"
    );
    assert_eq!(systemd.wait().await, 0);

    let (second, passed) = systemd.start().await;
    assert_eq!(passed, 1, "the stored tokens are passed");
    let mut client = support::connect_when_up(&addr).await;
    let after = support::current_token(&mut client, SANDBOX).await;
    assert_eq!(after.token_id, before.token_id, "the same token, served at once");
    assert_eq!(emu.emulator.stats().token_requests, requests, "no token request for it");
    support::signal(second, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(systemd.exchange("").await, ["stored", "1"]);
    assert_eq!(systemd.wait().await, 0);
}
