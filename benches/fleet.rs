//! A fleet on one machine: two hub brokers (the only holders of the key)
//! and N agent brokers following them, each a real process on its own Unix
//! socket, each agent with a WatchToken watcher in this process. Tokens are
//! short so that rotations come every few seconds. Measures:
//! - token-endpoint calls per hub rotation (the goal: one per replica);
//! - whether every watcher saw every rotation of the hub its agent follows;
//! - propagation from a hub's rotation (as a watcher at the hub sees it) to
//!   each agent's watcher, p50/p99;
//! - RSS per agent process;
//! - GetToken failures at the agents (every agent called every 50 ms)
//!   while one hub is killed with SIGKILL, and how long until every agent
//!   follows the other one.
//!
//! Run: `FLEET_AGENTS=200 FLEET_LIFETIME_SECS=8 cargo bench --bench fleet`.
//! Exits non-zero when a goal is missed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flute_token_broker::client;
use flute_token_broker::emulator::{Emulator, EmulatorConfig};
use flute_token_broker::wire::pb;
use tokio::process::{Child, Command};
use tokio_stream::StreamExt;

const SECRET: &str = "fleet-secret";
const SANDBOX: i32 = pb::Environment::Sandbox as i32;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn start(dir: &Path, name: &str, config: String) -> Child {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    Command::new(env!("CARGO_BIN_EXE_flute-token-broker"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("FLEET_SECRET", SECRET)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the broker binary runs")
}

fn socket(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

async fn connect(path: &Path) -> client::Target {
    let target = client::Target::new(format!("unix:{}", path.display()), Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(60);
    while client::connect_to(&target).await.is_err() {
        assert!(Instant::now() < deadline, "{} never came up", path.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    target
}

/// Every token a watcher received, with when.
type Seen = Arc<Mutex<Vec<(String, Instant)>>>;

async fn watch(target: client::Target) -> Seen {
    let seen: Seen = Arc::default();
    let mut client = client::connect_to(&target).await.unwrap();
    let mut stream = client
        .watch_token(pb::WatchTokenRequest { environment: SANDBOX })
        .await
        .unwrap()
        .into_inner();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Some(Ok(update)) = stream.next().await {
            if let Some(pb::watch_token_response::Update::Token(t)) = update.update {
                record.lock().unwrap().push((t.token_id, Instant::now()));
            }
        }
    });
    seen
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .map(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            })
        })
        .flatten()
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let agents = env_number("FLEET_AGENTS", 200) as usize;
    let lifetime = Duration::from_secs(env_number("FLEET_LIFETIME_SECS", 8));
    let rotations_wanted = env_number("FLEET_ROTATIONS", 3) as usize;
    flute_token_broker::serve::guard::raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let emulator = Emulator::new(EmulatorConfig {
        client_id: "fleet".into(),
        client_secret: SECRET.to_owned().into(),
        token_lifetime: lifetime,
        issue_refresh_tokens: false,
    })
    .spawn("127.0.0.1:0".parse().unwrap())
    .await
    .unwrap();

    let hub_names = ["hub-a", "hub-b"];
    let mut hubs = Vec::new();
    for name in hub_names {
        let config = format!(
            "[server]\nlisten = [\"unix:{}\"]\n[admin]\nlisten = \"\"\n[log]\nlevel = \"warn\"\n\
             [oauth]\nallow_insecure_http = true\n[credentials]\nclient_id = \"fleet\"\nclient_secret_env = \"FLEET_SECRET\"\n\
             [environments.sandbox]\ntoken_url = \"{}\"\n[environments.production]\nenabled = false\n",
            socket(dir.path(), name).display(),
            emulator.token_url()
        );
        hubs.push(start(dir.path(), name, config));
    }
    let mut hub_seen = Vec::new();
    for name in hub_names {
        hub_seen.push(watch(connect(&socket(dir.path(), name)).await).await);
    }

    let upstream = hub_names
        .iter()
        .map(|n| format!("\"unix:{}\"", socket(dir.path(), n).display()))
        .collect::<Vec<_>>()
        .join(", ");
    let launch = Instant::now();
    let mut agent_procs = Vec::new();
    for i in 0..agents {
        let name = format!("agent-{i}");
        let config = format!(
            "[server]\nlisten = [\"unix:{}\"]\n[admin]\nlisten = \"\"\n[log]\nlevel = \"warn\"\n\
             [environments.sandbox]\nupstream = [{upstream}]\n[environments.production]\nenabled = false\n",
            socket(dir.path(), &name).display()
        );
        agent_procs.push(start(dir.path(), &name, config));
    }
    let mut targets = Vec::new();
    let mut agent_seen = Vec::new();
    for i in 0..agents {
        let target = connect(&socket(dir.path(), &format!("agent-{i}"))).await;
        agent_seen.push(watch(target.clone()).await);
        targets.push(target);
    }
    let all_watching = launch.elapsed();

    // Steady state: let each hub rotate `rotations_wanted` times more.
    let base_calls = emulator.emulator.stats().token_requests;
    let base_rotations: Vec<usize> = hub_seen.iter().map(|s| s.lock().unwrap().len()).collect();
    let steady_from = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let done = hub_seen
            .iter()
            .zip(&base_rotations)
            .all(|(s, base)| s.lock().unwrap().len() >= base + rotations_wanted);
        if done {
            break;
        }
        assert!(steady_from.elapsed() < lifetime * 10, "hubs stopped rotating");
    }
    // Let the last rotation reach every agent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = emulator.emulator.stats().token_requests - base_calls;
    let rotations: usize = hub_seen
        .iter()
        .zip(&base_rotations)
        .map(|(s, base)| s.lock().unwrap().len() - base)
        .sum();

    // Which hub issued which token, and when its watcher saw it.
    let mut issued: BTreeMap<String, (usize, Instant)> = BTreeMap::new();
    for (h, seen) in hub_seen.iter().enumerate() {
        for (id, at) in seen.lock().unwrap().iter() {
            issued.insert(id.clone(), (h, *at));
        }
    }
    let mut delays = Vec::new();
    let mut missed = 0usize;
    for seen in &agent_seen {
        let seen = seen.lock().unwrap();
        let ids: BTreeSet<&String> = seen.iter().map(|(id, _)| id).collect();
        let Some((first_id, first_at)) = seen.first() else {
            missed += 1;
            continue;
        };
        let hub = issued.get(first_id).map(|(h, _)| *h);
        // Every rotation of its hub after the agent's first token.
        for (id, (h, at)) in &issued {
            if Some(*h) == hub && at > first_at && !ids.contains(id) {
                missed += 1;
            }
        }
        for (id, at) in seen.iter().skip(1) {
            if let Some((_, hub_at)) = issued.get(id) {
                delays.push(at.saturating_duration_since(*hub_at));
            }
        }
    }
    delays.sort();
    let mut rss: Vec<u64> = agent_procs.iter().filter_map(|c| c.id()).map(rss_kib).collect();
    rss.sort();

    // Kill hub A while every agent is called every 50 ms.
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut callers = Vec::new();
    for target in &targets {
        let (target, ok, failed, stop) = (target.clone(), ok.clone(), failed.clone(), stop.clone());
        callers.push(tokio::spawn(async move {
            let mut client = client::connect_to(&target).await.unwrap();
            while !stop.is_cancelled() {
                let request = pb::GetTokenRequest {
                    environment: SANDBOX,
                    min_remaining: None,
                };
                match client.get_token(request).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed_at = Instant::now();
    hubs[0].start_kill().unwrap();
    hubs[0].wait().await.unwrap();
    // Until every agent's watcher holds a token of hub B.
    let mut all_moved = None;
    while killed_at.elapsed() < lifetime * 3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let b_tokens: BTreeSet<String> = hub_seen[1].lock().unwrap().iter().map(|(id, _)| id.clone()).collect();
        let moved = agent_seen
            .iter()
            .filter(|s| s.lock().unwrap().last().is_some_and(|(id, _)| b_tokens.contains(id)))
            .count();
        if moved == agents {
            all_moved = Some(killed_at.elapsed());
            break;
        }
    }
    // Past the killed hub's last token's window: agents must still serve.
    tokio::time::sleep(lifetime).await;
    stop.cancel();
    for caller in callers {
        caller.await.unwrap();
    }

    let per_rotation = calls as f64 / rotations.max(1) as f64;
    println!("fleet: 2 hubs, {agents} agents (processes), one watcher each, {lifetime:?} tokens");
    println!(
        "  {agents} agents started and watched after {:.1} s",
        all_watching.as_secs_f64()
    );
    println!(
        "  steady state: {rotations} hub rotations, {calls} token-endpoint calls ({per_rotation:.2} per rotation per hub replica)"
    );
    println!(
        "  rotations missed by a watcher: {missed} (of {} expected receipts)",
        delays.len() + missed
    );
    println!(
        "  propagation hub → agent watcher: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} receipts)",
        percentile(&delays, 0.5).as_secs_f64() * 1000.0,
        percentile(&delays, 0.99).as_secs_f64() * 1000.0,
        delays.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
        delays.len()
    );
    println!(
        "  RSS per agent: median {} KiB, max {} KiB",
        rss.get(rss.len() / 2).copied().unwrap_or(0),
        rss.last().copied().unwrap_or(0)
    );
    println!(
        "  hub A killed (SIGKILL): {} GetToken calls at the agents, {} failed; every agent following hub B after {}",
        ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        all_moved.map_or("never".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
    );
    let goals =
        (per_rotation - 1.0).abs() < 1e-9 && missed == 0 && failed.load(Ordering::Relaxed) == 0 && all_moved.is_some();
    if !goals {
        eprintln!("fleet: a goal was missed");
        std::process::exit(1);
    }
}
