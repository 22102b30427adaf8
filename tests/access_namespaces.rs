//! The per-environment allow-lists as the shipped systemd unit runs the
//! broker (an unprivileged dynamic user, no private user namespace), as a
//! container or sidecar runs it (its own pid namespace: callers invisible in
//! its /proc), and, to show why the unit sets no `PrivateUsers=`, inside a
//! private user namespace. Real processes: the broker started through
//! `unshare` and `setpriv`, callers are the CLI under other uids and groups.
//! The account database the broker sees is bind-mounted in its mount
//! namespace, so the host's is never touched. Needs root (CI runs as root).

mod support;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use support::{CLIENT_ID, CLIENT_SECRET, start_emulator};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_flute-token-broker");
const APP: u32 = 1500; // "app", a member of "flute-prod" in the database
const OTHER: u32 = 1501; // "other", in no extra group
const FLUTE_PROD: u32 = 1600;

struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new(token_url: &str) -> Self {
        Self::with_production(token_url, "allowed_unix_groups = [\"flute-prod\"]\n", "")
    }

    /// A sandbox whose production table ends with `production` and whose
    /// configuration ends with `extra` (named callers, say).
    fn with_production(token_url: &str, production: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // The socket's directory belongs to the service user, as systemd's
        // RuntimeDirectory= makes it.
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::os::unix::fs::chown(&run, Some(65534), Some(65534)).unwrap();
        // Sticky and world-writable too, for the broker that stays root in a
        // private user namespace (no power over files outside it).
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        std::fs::write(
            etc.join("passwd"),
            format!(
                "root:x:0:0::/root:/bin/sh\napp:x:{APP}:{APP}::/:/bin/false\nother:x:{OTHER}:{OTHER}::/:/bin/false\n\
                 nobody:x:65534:65534::/:/bin/false\n"
            ),
        )
        .unwrap();
        std::fs::write(
            etc.join("group"),
            format!("root:x:0:\napp:x:{APP}:\nother:x:{OTHER}:\nflute-prod:x:{FLUTE_PROD}:app\nnogroup:x:65534:\n"),
        )
        .unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, CLIENT_SECRET).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(
            dir.path().join("broker.toml"),
            format!(
                "[server]\nlisten = [\"unix:{sock}\"]\nunix_socket_mode = \"0666\"\n[admin]\nlisten = \"\"\n\
                 [oauth]\nallow_insecure_http = true\n\
                 [credentials]\nclient_id = \"{CLIENT_ID}\"\nclient_secret_file = \"{secret}\"\npoll_interval = \"0s\"\n\
                 [environments.sandbox]\ntoken_url = \"{token_url}\"\nallowed_unix_users = [\"app\"]\n\
                 [environments.production]\ntoken_url = \"{token_url}\"\n{production}{extra}",
                sock = dir.path().join("run/broker.sock").display(),
                secret = secret.display(),
            ),
        )
        .unwrap();
        Self { dir }
    }

    /// Puts the socket directory (`RUN`) and the API's base URL (`API`)
    /// into the configuration.
    fn fill_in(&self, api: &str) {
        let config = std::fs::read_to_string(self.path("broker.toml"))
            .unwrap()
            .replace("RUN", &self.path("run").display().to_string())
            .replace("API", api);
        std::fs::write(self.path("broker.toml"), config).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the broker: `namespaces` are unshare's options, `user` the
    /// uid it runs as (None: stays root in its namespaces).
    async fn start(&self, namespaces: &[&str], user: Option<u32>) -> Child {
        let drop_to = user
            .map(|uid| format!("setpriv --reuid {uid} --regid {uid} --clear-groups --pdeathsig TERM"))
            .unwrap_or_default();
        let script = format!(
            "mount --bind {etc}/passwd /etc/passwd && mount --bind {etc}/group /etc/group && \
             exec {drop_to} {BIN} serve --config {config}",
            etc = self.path("etc").display(),
            config = self.path("broker.toml").display(),
        );
        let child = Command::new("unshare")
            .args(namespaces)
            // --kill-child: with --fork the broker is unshare's child, and
            // ends when unshare does.
            .args([
                "--mount",
                "--propagation",
                "private",
                "--kill-child=TERM",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        support::connect_when_up(&format!("unix:{}", self.path("run/broker.sock").display())).await;
        child
    }

    /// `get` as a caller with this uid, primary group and supplementary groups.
    async fn get(&self, env: &str, uid: u32, groups: &[u32]) -> Output {
        let groups = groups.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let mut command = Command::new("setpriv");
        command.args(["--reuid", &uid.to_string(), "--regid", &uid.to_string()]);
        if groups.is_empty() {
            command.arg("--clear-groups");
        } else {
            command.args(["--groups", &groups]);
        }
        let addr = format!("unix:{}", self.path("run/broker.sock").display());
        command
            .args([BIN, "get", "--env", env, "--addr", &addr])
            .output()
            .await
            .unwrap()
    }
}

fn allowed(output: &Output) -> bool {
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        assert!(stderr.contains("may not get"), "refused for another reason: {stderr}");
        assert_eq!(output.status.code(), Some(77), "PERMISSION_DENIED exits 77 (EX_NOPERM)");
    }
    output.status.success()
}

/// Ends the broker: killing `unshare` ends its child too (`--kill-child`).
async fn stop(mut broker: Child) {
    broker.kill().await.unwrap();
}

fn runs_as_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipped: creating namespaces and switching uids needs root (CI runs as root)");
    }
    root
}

#[tokio::test]
async fn as_the_unit_runs_it_callers_are_told_apart_by_uid_and_kernel_groups() {
    if !runs_as_root() {
        return;
    }
    let emu = start_emulator(Duration::from_secs(900), false).await;
    let sandbox = Sandbox::new(&emu.token_url());
    // DynamicUser: an unprivileged uid; no private user namespace.
    let broker = sandbox.start(&[], Some(65534)).await;

    assert!(allowed(&sandbox.get("sandbox", APP, &[]).await), "listed user");
    assert!(!allowed(&sandbox.get("sandbox", OTHER, &[]).await), "unlisted user");
    // Supplementary groups as the kernel reports them (/proc/PID/status),
    // as a client unit's SupplementaryGroups= grants them.
    assert!(
        allowed(&sandbox.get("production", OTHER, &[FLUTE_PROD]).await),
        "listed group, kernel view"
    );
    assert!(
        !allowed(&sandbox.get("production", OTHER, &[]).await),
        "no listed group"
    );
    stop(broker).await;
}

#[tokio::test]
async fn in_its_own_pid_namespace_callers_groups_come_from_the_account_database() {
    if !runs_as_root() {
        return;
    }
    let emu = start_emulator(Duration::from_secs(900), false).await;
    let sandbox = Sandbox::new(&emu.token_url());
    // A container or sidecar: callers are not in the broker's /proc.
    let broker = sandbox.start(&["--pid", "--fork", "--mount-proc"], Some(65534)).await;

    // "app" is a member of flute-prod in the database: allowed without the
    // group in its process credentials.
    assert!(allowed(&sandbox.get("production", APP, &[]).await), "database member");
    // The kernel group alone is invisible from here: refused.
    assert!(
        !allowed(&sandbox.get("production", OTHER, &[FLUTE_PROD]).await),
        "not a database member"
    );
    assert!(allowed(&sandbox.get("sandbox", APP, &[]).await), "listed user");
    stop(broker).await;
}

#[tokio::test]
async fn in_a_private_user_namespace_every_caller_is_nobody_and_refused() {
    if !runs_as_root() {
        return;
    }
    let emu = start_emulator(Duration::from_secs(900), false).await;
    let sandbox = Sandbox::new(&emu.token_url());
    // What PrivateUsers=yes does: only the service's own uid is mapped, so
    // SO_PEERCRED reports every other caller as the overflow uid.
    let broker = sandbox.start(&["--user", "--map-root-user"], None).await;
    assert!(
        !allowed(&sandbox.get("sandbox", APP, &[]).await),
        "the listed user is unrecognisable"
    );
    assert!(!allowed(&sandbox.get("production", APP, &[FLUTE_PROD]).await));
    stop(broker).await;
}

/// Connects to `socket` as `uid` with `groups` and reads the production
/// token over HTTP/1.1 (so the broker has certainly seen the connection),
/// forks, lets the connecting process exit (and be reaped by this test),
/// then reads again on the same connection from the child: the two status
/// lines.
async fn read_after_the_connecting_process_exits(socket: &std::path::Path, uid: u32, groups: &[u32]) -> String {
    const SCRIPT: &str = r#"
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
buffered = b""
def read():
    global buffered
    s.sendall(b"GET /v1/environments/production/token HTTP/1.1\r\nHost: localhost\r\n"
              b"Flute-Broker: true\r\n\r\n")
    while b"\r\n\r\n" not in buffered:
        buffered += s.recv(65536)
    head, buffered = buffered.split(b"\r\n\r\n", 1)
    length = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0]
    while len(buffered) < length:
        buffered += s.recv(65536)
    buffered = buffered[length:]
    return head.split(b"\r\n", 1)[0].decode()
print(read(), flush=True)
connecting = os.getpid()
if os.fork() > 0:
    os._exit(0)
while os.path.exists("/proc/%d" % connecting):
    time.sleep(0.01)
print(read(), flush=True)
"#;
    let mut command = Command::new("setpriv");
    command.args(["--reuid", &uid.to_string(), "--regid", &uid.to_string()]);
    if groups.is_empty() {
        command.arg("--clear-groups");
    } else {
        let groups = groups.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        command.args(["--groups", &groups]);
    }
    let mut child = command
        // The system interpreter: one a user-level shim (pyenv) puts first
        // on PATH is not readable by the callers' uids.
        .args(["/usr/bin/python3", "-c", SCRIPT])
        .arg(socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    // The connecting process exits after its first read; waiting reaps it
    // (its PID is then free), and the forked child only asks after that.
    assert!(child.wait().await.unwrap().success());
    let mut answers = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut answers)
        .await
        .unwrap();
    answers.trim().replace('\n', " / ")
}

/// The caller's groups are those of the process that connected, taken when
/// it connected: a process that drops the allowed group (though the account
/// database lists the user in it), connects, forks and exits stays refused,
/// where reading the groups at request time fell back to the database and
/// let it through.
#[tokio::test]
async fn a_caller_keeps_the_groups_it_connected_with_after_its_connecting_process_exits() {
    if !runs_as_root() {
        return;
    }
    let emu = start_emulator(Duration::from_secs(900), false).await;
    let sandbox = Sandbox::new(&emu.token_url());
    let broker = sandbox.start(&[], Some(65534)).await;
    let socket = sandbox.path("run/broker.sock");

    // The kernel groups of the connecting process decide, before and after it exits.
    assert_eq!(
        read_after_the_connecting_process_exits(&socket, OTHER, &[FLUTE_PROD]).await,
        "HTTP/1.1 200 OK / HTTP/1.1 200 OK"
    );
    assert_eq!(
        read_after_the_connecting_process_exits(&socket, APP, &[]).await,
        "HTTP/1.1 403 Forbidden / HTTP/1.1 403 Forbidden",
        "a database member that dropped the group stays refused once its connecting process is gone"
    );
    stop(broker).await;
}

/// cgroups standing for systemd units, laid out as systemd lays them out
/// (a slice, a directory per unit) in every hierarchy that names units
/// here: the v1 `name=systemd` one, the unified one (hybrid or pure v2).
/// Removed when dropped (their processes have exited by then).
struct UnitCgroups {
    slices: Vec<PathBuf>,
}

impl UnitCgroups {
    /// `None` where no cgroup hierarchy can be written (not root, or a
    /// read-only cgroupfs).
    fn create(units: &[&str]) -> Option<Self> {
        let slice = format!("flute-test-{}.slice", std::process::id());
        let roots = ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"];
        let mut slices = Vec::new();
        for root in roots.map(std::path::Path::new) {
            // The v2 root only when it is the unified hierarchy itself.
            if root.join("cgroup.procs").exists() && !slices.iter().any(|s: &PathBuf| s.starts_with(root)) {
                let dir = root.join(&slice);
                if std::fs::create_dir(&dir).is_err() {
                    continue;
                }
                for unit in units {
                    std::fs::create_dir(dir.join(unit)).unwrap();
                }
                slices.push(dir);
            }
        }
        if slices.is_empty() {
            eprintln!("skipped: no writable cgroup hierarchy here");
            return None;
        }
        Some(Self { slices })
    }

    /// Shell commands that move the shell into `unit`'s cgroups.
    fn enter(&self, unit: &str) -> String {
        self.slices
            .iter()
            .map(|s| format!("echo $$ > {}/{unit}/cgroup.procs; ", s.display()))
            .collect()
    }
}

impl Drop for UnitCgroups {
    fn drop(&mut self) {
        for slice in &self.slices {
            for unit in std::fs::read_dir(slice).into_iter().flatten().flatten() {
                if unit.path().is_dir() {
                    let _ = std::fs::remove_dir(unit.path());
                }
            }
            let _ = std::fs::remove_dir(slice);
        }
    }
}

/// Two units running as the same user; the rules name one of them. It gets
/// the token (gRPC and the HTTP read) and may call its route through the
/// proxy; the other, same uid and groups, is refused on all three, and a
/// route outside the rule is refused to the named one.
#[tokio::test]
async fn two_units_of_one_user_are_told_apart_by_their_rules() {
    if !runs_as_root() {
        return;
    }
    let Some(cgroups) = UnitCgroups::create(&["billing.service", "other.service"]) else {
        return;
    };
    let emu = start_emulator(Duration::from_secs(900), false).await;
    let sandbox = Sandbox::with_production(
        &emu.token_url(),
        "[environments.production.proxy]\nlisten = [\"unix:RUN/prod-api.sock\"]\napi_url = \"API\"\n\
         [environments.production.access]\ntoken = [\"billing\"]\nproxy = { billing = [\"GET /v2/transactions\"] }\n",
        "[callers.billing]\nsystemd_units = [\"billing.service\"]\nunix_users = [\"app\"]\n",
    );
    sandbox.fill_in(&emu.base_url());
    let broker = sandbox.start(&[], Some(65534)).await;

    const READS: &str = r#"
import socket, sys
def get(path, socket_path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(socket_path)
    s.sendall(("GET %s HTTP/1.1\r\nHost: localhost\r\nFlute-Broker: true\r\nConnection: close\r\n\r\n" % path).encode())
    answer = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer.split(b"\r\n", 1)[0].decode().split(" ")[1] + ("/ROUTE_NOT_ALLOWED" if b"ROUTE_NOT_ALLOWED" in answer else "")
print(get("/v1/environments/production/token", sys.argv[1]),
      get("/v2/transactions", sys.argv[2]),
      get("/v2/payments", sys.argv[2]))
"#;
    let run_as = |unit: &str| {
        let script = format!(
            "{enter}exec setpriv --reuid {APP} --regid {APP} --clear-groups /usr/bin/python3 -c '{READS}' {api} {proxy} && \
             exit 0",
            enter = cgroups.enter(unit),
            api = sandbox.path("run/broker.sock").display(),
            proxy = sandbox.path("run/prod-api.sock").display(),
        );
        let grpc = format!(
            "{enter}exec setpriv --reuid {APP} --regid {APP} --clear-groups {BIN} get --env production --addr unix:{api}",
            enter = cgroups.enter(unit),
            api = sandbox.path("run/broker.sock").display(),
        );
        async move {
            let http = Command::new("sh").args(["-c", &script]).output().await.unwrap();
            let grpc = Command::new("sh").args(["-c", &grpc]).output().await.unwrap();
            (String::from_utf8_lossy(&http.stdout).trim().to_owned(), grpc)
        }
    };

    let (http, grpc) = run_as("billing.service").await;
    assert!(grpc.status.success(), "{}", String::from_utf8_lossy(&grpc.stderr));
    assert_eq!(
        http, "200 200 403/ROUTE_NOT_ALLOWED",
        "billing.service: HTTP read, its route, another route"
    );
    let (http, grpc) = run_as("other.service").await;
    assert!(!allowed(&grpc), "same user, another unit: PERMISSION_DENIED over gRPC");
    assert_eq!(
        http, "403 403 403",
        "another unit: refused on the HTTP read and the proxy"
    );
    stop(broker).await;
    drop(cgroups);
}

/// Per-caller rate limits: one caller's RefreshToken loop and proxy flood
/// are limited (429 `RATE_LIMITED`, with `Retry-After`) while another
/// caller's calls pass.
#[tokio::test]
async fn one_callers_loop_is_limited_and_another_caller_passes() {
    if !runs_as_root() {
        return;
    }
    let emu = start_emulator(Duration::from_secs(900), false).await;
    let sandbox = Sandbox::with_production(
        &emu.token_url(),
        "[environments.production.proxy]\nlisten = [\"unix:RUN/prod-api.sock\"]\napi_url = \"API\"\n\
         [environments.production.access]\ntoken = [\"app\", \"other\"]\n\
         proxy = { app = [\"GET /v2/**\"], other = [\"GET /v2/**\"] }\n\
         refresh_per_minute = 3\nproxy_per_second = 2\n",
        "[callers.app]\nunix_users = [\"app\"]\n[callers.other]\nunix_users = [\"other\"]\n\
         [refresh]\nearly_refresh_interval = \"0s\"\n",
    );
    sandbox.fill_in(&emu.base_url());
    // The admin listener, for the per-caller metrics.
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = std::fs::read_to_string(sandbox.path("broker.toml"))
        .unwrap()
        .replace("[admin]\nlisten = \"\"", &format!("[admin]\nlisten = \"{admin}\""));
    std::fs::write(sandbox.path("broker.toml"), config).unwrap();
    let broker = sandbox.start(&[], Some(65534)).await;

    const CALLS: &str = r#"
import json, socket, sys
def call(method, path, socket_path, body=b""):
    s = socket.socket(socket.AF_UNIX)
    s.connect(socket_path)
    head = "%s %s HTTP/1.1\r\nHost: localhost\r\nFlute-Broker: true\r\nConnection: close\r\nContent-Length: %d\r\n" % (method, path, len(body))
    if body:
        head += "Content-Type: application/json\r\n"
    s.sendall(head.encode() + b"\r\n" + body)
    answer = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    status = head.split(b" ")[1].decode()
    if status == "429":
        assert b"RATE_LIMITED" in rest and b"retry-after" in head.lower(), answer
    return status, rest
api, proxy, refreshes, floods = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = []
for _ in range(refreshes):
    _, body = call("GET", "/v1/environments/production/token", api)
    token_id = json.loads(body)["token"]["tokenId"]
    status, _ = call("POST", "/v1/environments/production/token:refresh", api, json.dumps({"rejectedTokenId": token_id}).encode())
    out.append(status)
print(" ".join(out))
print(" ".join(call("GET", "/v2/transactions", proxy)[0] for _ in range(floods)))
"#;
    let run_as = |uid: u32, refreshes: usize, floods: usize| {
        let api = sandbox.path("run/broker.sock");
        let proxy = sandbox.path("run/prod-api.sock");
        async move {
            let out = Command::new("setpriv")
                .args([
                    "--reuid",
                    &uid.to_string(),
                    "--regid",
                    &uid.to_string(),
                    "--clear-groups",
                ])
                .args(["/usr/bin/python3", "-c", CALLS])
                .arg(api)
                .arg(proxy)
                .args([refreshes.to_string(), floods.to_string()])
                .output()
                .await
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let mut lines = text.lines().map(str::to_owned);
            (lines.next().unwrap_or_default(), lines.next().unwrap_or_default())
        }
    };

    let (refreshes, flood) = run_as(APP, 5, 10).await;
    assert_eq!(refreshes, "200 200 200 429 429", "3 forced refreshes a minute");
    let flood: Vec<&str> = flood.split(' ').collect();
    assert_eq!(&flood[..4], ["200"; 4], "a burst of twice the rate: {flood:?}");
    assert!(
        flood.iter().filter(|s| **s == "429").count() >= 4,
        "the rest limited: {flood:?}"
    );
    // The other caller's budget is its own.
    let (refreshes, flood) = run_as(OTHER, 1, 2).await;
    assert_eq!(refreshes, "200");
    assert_eq!(flood, "200 200");
    // Per caller, by configured name: app's refusals, both callers' proxied requests.
    let limited = support::metric(
        admin,
        "flute_broker_caller_refusals_total{caller=\"app\",environment=\"production\",outcome=\"RATE_LIMITED\"}",
    )
    .await;
    assert!(
        limited >= 6.0,
        "2 refreshes and at least 4 proxied requests limited: {limited}"
    );
    let other = support::metric(
        admin,
        "flute_broker_caller_proxy_requests_total{caller=\"other\",environment=\"production\",outcome=\"2xx\"}",
    )
    .await;
    assert_eq!(other, 2.0);
    stop(broker).await;
}
