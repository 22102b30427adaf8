//! Load and fan-out measurements of a whole broker (in-process, with the
//! built-in emulator as token endpoint). Run: `cargo bench --bench broker`.
//! Client and server share the machine, so figures are for both together.
//!
//! `cargo bench --bench broker -- cpu` measures only the server's CPU time
//! per GetToken at one sequential caller: the broker's release binary
//! (`serve --dev`) against a no-op tonic server of the same proto (this
//! bench re-run as `--noop-server`: tonic's defaults, a fixed token), each
//! a process of its own, on TCP and on a Unix socket, alternating rounds.
//!
//! `cargo bench --bench broker -- hub [AGENTS]` measures a hub with default
//! settings under AGENTS (5,000) followers shaped as agents: one connection
//! each, one WatchToken stream per environment; its RSS and how fast a
//! rotation reaches them all. `-- peer [CONNECTIONS]` measures what
//! reading a Unix-socket peer (credentials, groups, cgroup, executable,
//! the pidfd check) costs per connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flute_token_broker::client;
use flute_token_broker::config::Config;
use flute_token_broker::daemon;
use flute_token_broker::serve::listen::ListenAddr;
use flute_token_broker::wire::pb::{self, watch_token_response::Update};
use tokio_stream::StreamExt;

const SANDBOX: i32 = pb::Environment::Sandbox as i32;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn request() -> pb::GetTokenRequest {
    pb::GetTokenRequest {
        environment: SANDBOX,
        min_remaining: None,
    }
}

async fn latency(addr: &str, calls: usize) {
    let mut client = client::connect(addr, Duration::from_secs(5)).await.unwrap();
    for _ in 0..1000 {
        client.get_token(request()).await.unwrap();
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        client.get_token(request()).await.unwrap();
        samples.push(start.elapsed());
    }
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / calls as u32;
    println!(
        "GetToken latency, 1 client, {addr}: mean {:.1} µs, p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs ({calls} calls)",
        mean.as_secs_f64() * 1e6,
        percentile(&samples, 0.5).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        percentile(&samples, 0.999).as_secs_f64() * 1e6,
        samples.last().unwrap().as_secs_f64() * 1e6
    );
}

async fn throughput(addr: &str, channels: usize, tasks: usize, calls_per_task: usize) -> f64 {
    let mut clients = Vec::new();
    for _ in 0..channels {
        clients.push(client::connect(addr, Duration::from_secs(5)).await.unwrap());
    }
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            let mut c = clients[i % channels].clone();
            tokio::spawn(async move {
                for _ in 0..calls_per_task {
                    c.get_token(request()).await.unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    let total = tasks * calls_per_task;
    let took = start.elapsed();
    let rate = total as f64 / took.as_secs_f64();
    println!(
        "GetToken throughput, {tasks} concurrent callers on {channels} connections, {addr}: {rate:.0} calls/s ({total} calls in {:.2} s)",
        took.as_secs_f64()
    );
    rate
}

/// The TokenBroker service alone on a Unix socket, with or without the
/// `:authority` adapter the daemon puts on its Unix sockets.
async fn unix_server(
    path: std::path::PathBuf,
    broker: &daemon::RunningBroker,
    adapter: bool,
) -> tokio::task::JoinHandle<()> {
    use flute_token_broker::broker::Core;
    use flute_token_broker::grpc::TokenBrokerService;
    use flute_token_broker::serve::guard::{ConnectionLimits, ListenerGuard, incoming};
    use flute_token_broker::serve::unix_authority::UnixAuthorityListener;
    use flute_token_broker::wire::pb::token_broker_server::TokenBrokerServer;
    let service = TokenBrokerService::new(Core::new(
        broker.sources.clone(),
        tokio_util::sync::CancellationToken::new(),
        tokio_util::task::TaskTracker::new(),
        broker.metrics.clone(),
        Duration::from_secs(30),
        Default::default(),
    ));
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let guard = ListenerGuard::new(
        path.display().to_string(),
        ConnectionLimits::default(),
        broker.metrics.clone(),
    );
    let router = tonic::transport::Server::builder().add_service(TokenBrokerServer::new(service));
    tokio::spawn(async move {
        let served = if adapter {
            router
                .serve_with_incoming(incoming(UnixAuthorityListener(listener), guard, Default::default()))
                .await
        } else {
            router
                .serve_with_incoming(incoming(listener, guard, Default::default()))
                .await
        };
        served.unwrap();
    })
}

/// GetToken throughput over a Unix socket with and without the adapter,
/// alternating rounds in one run.
async fn adapter_cost(broker: &daemon::RunningBroker, dir: &std::path::Path, rounds: usize) {
    let plain = unix_server(dir.join("plain.sock"), broker, false).await;
    let adapted = unix_server(dir.join("adapted.sock"), broker, true).await;
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        without.push(throughput(&format!("unix:{}", dir.join("plain.sock").display()), 4, 64, 2_000).await);
        with.push(throughput(&format!("unix:{}", dir.join("adapted.sock").display()), 4, 64, 2_000).await);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "Unix socket :authority adapter, {rounds} alternating rounds: without {:.0} calls/s, with {:.0} calls/s ({:+.1} %)",
        mean(&without),
        mean(&with),
        (mean(&with) / mean(&without) - 1.0) * 100.0
    );
    plain.abort();
    adapted.abort();
}

async fn fan_out(addr: &str, watchers: usize, rounds: usize) {
    let mut client = client::connect(addr, Duration::from_secs(5)).await.unwrap();
    let mut streams = Vec::new();
    for i in 0..watchers {
        // 100 streams per connection, well inside server.max_concurrent_streams.
        if i % 100 == 0 {
            client = client::connect(addr, Duration::from_secs(5)).await.unwrap();
        }
        let mut c = client.clone();
        let mut s = c
            .watch_token(pb::WatchTokenRequest { environment: SANDBOX })
            .await
            .unwrap()
            .into_inner();
        s.next().await.unwrap().unwrap();
        streams.push(s);
    }
    let mut delays = Vec::new();
    for _ in 0..rounds {
        let current = client.get_token(request()).await.unwrap().into_inner().token.unwrap();
        let start = Instant::now();
        let waiting: Vec<_> = streams
            .drain(..)
            .map(|mut s| {
                tokio::spawn(async move {
                    loop {
                        if let Some(Update::Token(t)) = s.next().await.unwrap().unwrap().update {
                            return (s, t.token_id);
                        }
                    }
                })
            })
            .collect();
        let fresh = client
            .refresh_token(pb::RefreshTokenRequest {
                environment: SANDBOX,
                rejected_token_id: current.token_id,
            })
            .await
            .unwrap()
            .into_inner()
            .token
            .unwrap();
        for w in waiting {
            let (s, id) = w.await.unwrap();
            assert_eq!(id, fresh.token_id);
            streams.push(s);
        }
        delays.push(start.elapsed());
    }
    delays.sort();
    println!(
        "WatchToken fan-out: a rotation reaches all {watchers} watchers in median {:.1} ms, max {:.1} ms ({rounds} rotations)",
        percentile(&delays, 0.5).as_secs_f64() * 1e3,
        delays.last().unwrap().as_secs_f64() * 1e3
    );
}

fn hot_path(sources: &Arc<flute_token_broker::token::TokenSources>, threads: usize, calls: usize) {
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let sources = sources.clone();
            scope.spawn(move || {
                let source = sources.get(flute_token_broker::Environment::Sandbox).unwrap();
                for _ in 0..calls {
                    std::hint::black_box(source.current());
                }
            });
        }
    });
    let per_call = start.elapsed() / (calls * threads) as u32;
    println!(
        "TokenSourceHandle::current() (the GetToken hot path, in-process), {threads} thread(s): {:.0} ns/call",
        per_call.as_secs_f64() * 1e9
    );
}

/// The no-op server: the TokenBroker service of the same proto with
/// nothing behind it, on tonic's defaults.
#[derive(Clone)]
struct Noop(pb::Token);

#[tonic::async_trait]
impl pb::token_broker_server::TokenBroker for Noop {
    async fn get_token(
        &self,
        _: tonic::Request<pb::GetTokenRequest>,
    ) -> Result<tonic::Response<pb::GetTokenResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::GetTokenResponse {
            token: Some(self.0.clone()),
        }))
    }
    type WatchTokenStream = tokio_stream::Empty<Result<pb::WatchTokenResponse, tonic::Status>>;
    async fn watch_token(
        &self,
        _: tonic::Request<pb::WatchTokenRequest>,
    ) -> Result<tonic::Response<Self::WatchTokenStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn refresh_token(
        &self,
        _: tonic::Request<pb::RefreshTokenRequest>,
    ) -> Result<tonic::Response<pb::RefreshTokenResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn get_status(
        &self,
        _: tonic::Request<pb::GetStatusRequest>,
    ) -> Result<tonic::Response<pb::GetStatusResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
}

/// `--noop-server TCP_PORT UNIX_PATH`: serves [`Noop`] on both until killed.
fn noop_server(port: u16, unix: std::path::PathBuf) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let token = pb::Token {
            access_token: "x".repeat(43),
            token_type: "Bearer".into(),
            issued_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            expires_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            environment: SANDBOX,
            token_id: "0123456789ab".into(),
            serve_for: Some(prost_types::Duration { seconds: 880, nanos: 1 }),
        };
        let service = pb::token_broker_server::TokenBrokerServer::new(Noop(token));
        let tcp = tonic::transport::server::TcpIncoming::bind(([127, 0, 0, 1], port).into())
            .unwrap()
            .with_nodelay(Some(true));
        let unix = tokio_stream::wrappers::UnixListenerStream::new(tokio::net::UnixListener::bind(unix).unwrap());
        let router = tonic::transport::Server::builder().add_service(service);
        let other = router.clone();
        tokio::join!(async { router.serve_with_incoming(tcp).await.unwrap() }, async {
            other.serve_with_incoming(unix).await.unwrap()
        },);
    });
}

/// `--calls N ADDR`: N sequential GetToken calls on one connection, as a
/// tonic client makes them (the caller of `benches/instructions.sh`);
/// panics on any failure.
fn sequential_calls(calls: usize, addr: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = client::connect(addr, Duration::from_secs(30)).await.unwrap();
        for _ in 0..calls {
            client.get_token(request()).await.unwrap();
        }
    });
    println!("{calls} calls succeeded");
}

/// User plus system CPU time of process `pid` so far (clock ticks of 10 ms).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `addr` answers a GetToken.
async fn await_server(addr: &str) {
    for _ in 0..500 {
        if let Ok(mut c) = client::connect(addr, Duration::from_secs(1)).await
            && c.get_token(request()).await.is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{addr} never answered");
}

/// The server's CPU per call over `calls` sequential GetTokens on one connection.
async fn cpu_per_call(pid: u32, addr: &str, calls: usize) -> Duration {
    let mut client = client::connect(addr, Duration::from_secs(5)).await.unwrap();
    for _ in 0..2_000 {
        client.get_token(request()).await.unwrap();
    }
    let before = cpu_time(pid);
    for _ in 0..calls {
        client.get_token(request()).await.unwrap();
    }
    (cpu_time(pid) - before) / calls as u32
}

/// The broker's CPU per GetToken against the no-op server's, same run.
async fn cpu_comparison(rounds: usize, calls: usize) {
    let dir = std::env::temp_dir().join(format!("flute-broker-cpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (broker_port, noop_port) = (free_port(), free_port());
    let (broker_sock, noop_sock) = (dir.join("broker.sock"), dir.join("noop.sock"));
    let mut broker = std::process::Command::new(env!("CARGO_BIN_EXE_flute-token-broker"))
        .args(["serve", "--dev", "--admin-listen", ""])
        .env("RUST_LOG", "warn")
        .arg("--listen")
        .arg(format!("127.0.0.1:{broker_port}"))
        .arg("--listen")
        .arg(format!("unix:{}", broker_sock.display()))
        .spawn()
        .unwrap();
    let mut noop = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--noop-server")
        .arg(noop_port.to_string())
        .arg(&noop_sock)
        .spawn()
        .unwrap();
    let targets = [
        (
            "TCP",
            format!("http://127.0.0.1:{broker_port}"),
            format!("http://127.0.0.1:{noop_port}"),
        ),
        (
            "Unix socket",
            format!("unix:{}", broker_sock.display()),
            format!("unix:{}", noop_sock.display()),
        ),
    ];
    for (_, b, n) in &targets {
        await_server(b).await;
        await_server(n).await;
    }
    for (name, b, n) in &targets {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            ours.push(cpu_per_call(broker.id(), b, calls).await);
            theirs.push(cpu_per_call(noop.id(), n, calls).await);
        }
        let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len() as u32;
        let ratios: Vec<String> = ours
            .iter()
            .zip(&theirs)
            .map(|(o, t)| format!("{:.2}", o.as_secs_f64() / t.as_secs_f64()))
            .collect();
        println!(
            "GetToken server CPU per call, 1 sequential caller, {name}: broker {:.1} µs, no-op tonic server {:.1} µs, \
             ratio {:.2} (rounds: {}; {calls} calls each)",
            mean(&ours).as_secs_f64() * 1e6,
            mean(&theirs).as_secs_f64() * 1e6,
            mean(&ours).as_secs_f64() / mean(&theirs).as_secs_f64(),
            ratios.join(", ")
        );
    }
    let _ = broker.kill();
    let _ = noop.kill();
    let _ = broker.wait();
    let _ = noop.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib * 1024
}

/// `hub [AGENTS]`: the release binary as a hub with default settings
/// (`serve --dev`, one TCP listener) and AGENTS (5,000) agent-shaped
/// followers, each its own connection with one WatchToken stream per
/// environment, as `token::follow` holds them. Reports whether all opened,
/// whether every sandbox stream received the next rotation and how fast,
/// and the hub's RSS before and with them.
async fn hub_capacity(agents: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let port = free_port();
    let addr = format!("http://127.0.0.1:{port}");
    let mut hub = std::process::Command::new(env!("CARGO_BIN_EXE_flute-token-broker"))
        .args(["serve", "--dev", "--admin-listen", ""])
        .env("RUST_LOG", "warn")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .spawn()
        .unwrap();
    await_server(&addr).await;
    let before = rss(hub.id());
    let started = Instant::now();
    let mut streams = Vec::with_capacity(agents);
    let mut refused = 0;
    for _ in 0..agents {
        let agent = client::connect(&addr, Duration::from_secs(10)).await.unwrap();
        let follow = |environment: pb::Environment| {
            let mut agent = agent.clone();
            async move {
                agent
                    .watch_token(pb::WatchTokenRequest {
                        environment: environment as i32,
                    })
                    .await
            }
        };
        match (
            follow(pb::Environment::Sandbox).await,
            follow(pb::Environment::Production).await,
        ) {
            (Ok(sandbox), Ok(production)) => {
                let (mut sandbox, mut production) = (sandbox.into_inner(), production.into_inner());
                sandbox.next().await.unwrap().unwrap();
                production.next().await.unwrap().unwrap();
                streams.push((sandbox, production, agent));
            }
            _ => refused += 1,
        }
    }
    let opened_in = started.elapsed();
    let with = rss(hub.id());
    let mut caller = client::connect(&addr, Duration::from_secs(5)).await.unwrap();
    let current = caller.get_token(request()).await.unwrap().into_inner().token.unwrap();
    let rotated = Instant::now();
    let waiting: Vec<_> = streams
        .drain(..)
        .map(|(mut sandbox, production, agent)| {
            tokio::spawn(async move {
                loop {
                    if let Some(Update::Token(t)) = sandbox.next().await.unwrap().unwrap().update {
                        return (t.token_id, rotated.elapsed(), (sandbox, production, agent));
                    }
                }
            })
        })
        .collect();
    let fresh = caller
        .refresh_token(pb::RefreshTokenRequest {
            environment: SANDBOX,
            rejected_token_id: current.token_id,
        })
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    let mut delays = Vec::new();
    for w in waiting {
        let (id, delay, kept) = w.await.unwrap();
        assert_eq!(id, fresh.token_id);
        delays.push(delay);
        streams.push(kept);
    }
    delays.sort();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "hub with default settings: {} of {agents} agents following (2 WatchToken streams each, {refused} refused), \
         opened in {:.1} s; a rotation reached all {} in p50 {:.1} ms, max {:.1} ms; hub RSS {:.1} MiB idle, \
         {:.1} MiB with them ({:.1} KiB per agent)",
        streams.len(),
        opened_in.as_secs_f64(),
        delays.len(),
        percentile(&delays, 0.5).as_secs_f64() * 1e3,
        delays.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        mib(before),
        mib(with),
        with.saturating_sub(before) as f64 / 1024.0 / agents.max(1) as f64,
    );
    let _ = hub.kill();
    let _ = hub.wait();
}

/// `peer [CONNECTIONS]`: what reading a Unix peer costs per connection
/// (SO_PEERCRED, SO_PEERPIDFD, the connecting process's status, cgroup and
/// executable, the pidfd check), over CONNECTIONS (2,000) connections from
/// this process.
async fn peer_cost(connections: usize) {
    use flute_token_broker::serve::peer::UnixPeer;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("peer.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let mut took = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (_client, accepted) = tokio::join!(tokio::net::UnixStream::connect(&path), listener.accept());
        let (stream, _) = accepted.unwrap();
        let started = Instant::now();
        let peer = UnixPeer::of(&stream);
        took.push(started.elapsed());
        assert!(peer.is_some());
    }
    took.sort();
    println!(
        "Unix peer read once per connection: p50 {:.1} µs, p99 {:.1} µs ({connections} connections)",
        percentile(&took, 0.5).as_secs_f64() * 1e6,
        percentile(&took, 0.99).as_secs_f64() * 1e6
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--noop-server") {
        return noop_server(args[at + 1].parse().unwrap(), args[at + 2].clone().into());
    }
    if let Some(at) = args.iter().position(|a| a == "--calls") {
        return sequential_calls(args[at + 1].parse().unwrap(), &args[at + 2]);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if args.iter().any(|a| a == "cpu") {
        return runtime.block_on(cpu_comparison(3, 100_000));
    }
    if let Some(at) = args.iter().position(|a| a == "peer") {
        let connections = args.get(at + 1).and_then(|n| n.parse().ok()).unwrap_or(2_000);
        return runtime.block_on(peer_cost(connections));
    }
    if let Some(at) = args.iter().position(|a| a == "hub") {
        let agents = args.get(at + 1).and_then(|n| n.parse().ok()).unwrap_or(5_000);
        return runtime.block_on(hub_capacity(agents));
    }
    runtime.block_on(async {
        let dir = std::env::temp_dir().join(format!("flute-broker-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = Config::default();
        config.server.listen = vec![
            ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
            ListenAddr::Unix(dir.join("broker.sock")),
        ];
        config.admin.listen = None;
        // Each fan-out round forces a refresh: no rate limit between them.
        config.refresh.early_refresh_interval = Duration::ZERO;
        let (config, _emulator) = daemon::dev_setup(config, Duration::from_secs(900)).await.unwrap();
        let broker = daemon::Broker::build(config, None).await.unwrap();
        for s in broker.sources.iter() {
            s.started().await;
        }
        let addrs: Vec<String> = broker
            .grpc_addrs
            .iter()
            .map(|a| match a {
                ListenAddr::Tcp(t) => format!("http://{t}"),
                ListenAddr::Unix(_) => a.to_string(),
            })
            .collect();
        println!(
            "machine: {} cores",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        );
        let sources = broker.sources.clone();
        tokio::task::spawn_blocking(move || {
            hot_path(&sources, 1, 2_000_000);
            hot_path(&sources, 2, 2_000_000);
        })
        .await
        .unwrap();
        for addr in &addrs {
            latency(addr, 20_000).await;
        }
        for addr in &addrs {
            throughput(addr, 4, 64, 2_000).await;
        }
        fan_out(&addrs[0], 1000, 5).await;
        adapter_cost(&broker, &dir, 5).await;
        broker.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}
