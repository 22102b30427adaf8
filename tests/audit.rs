//! The audit trail, from outside: a scripted run of calls (gRPC, a watch,
//! a forced refresh, proxied calls answered and refused, a reload) leaves
//! each kind of record, attributed and with no token in it;
//! `flute-token-broker audit verify` passes the file and names the first
//! record edited, removed or reordered; a file logrotate moved is
//! continued in a new one, and the chain verifies across both.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use flute_token_broker::Environment;
use flute_token_broker::serve::listen::ListenAddr;
use flute_token_broker::wire::pb;
use support::start_broker_with;

const BIN: &str = env!("CARGO_BIN_EXE_flute-token-broker");
const SANDBOX: i32 = pb::Environment::Sandbox as i32;

/// The audit file's records (parsed), once `ready` holds of them (at most
/// 20 s: the writer aggregates every second in these tests).
async fn records_when(path: &Path, ready: impl Fn(&[serde_json::Value]) -> bool) -> Vec<serde_json::Value> {
    for _ in 0..400 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let records: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        if ready(&records) {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the audit file never held the expected records: {}",
        std::fs::read_to_string(path).unwrap_or_default()
    );
}

fn kinds(records: &[serde_json::Value]) -> Vec<&str> {
    records.iter().filter_map(|r| r["kind"].as_str()).collect()
}

fn verify(files: &[&PathBuf]) -> (i32, String) {
    let out = std::process::Command::new(BIN)
        .args(["audit", "verify"])
        .args(files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_is_recorded_in_a_chain_verify_checks() {
    let audit_dir = tempfile::tempdir().unwrap();
    let file = audit_dir.path().join("audit.jsonl");
    let audit_file = file.clone();
    let broker = start_broker_with(
        &[Environment::Sandbox],
        Duration::from_secs(900),
        |emulators, config| {
            config.audit.file = audit_file;
            config.audit.interval = Duration::from_secs(1);
            let proxy = &mut config.environments.get_mut(&Environment::Sandbox).unwrap().proxy;
            proxy.listen = vec![ListenAddr::Tcp("127.0.0.1:0".parse().unwrap())];
            proxy.api_url = emulators[&Environment::Sandbox].base_url();
        },
    )
    .await;
    let mut client = broker.client().await;
    let first = support::current_token(&mut client, SANDBOX).await;
    support::current_token(&mut client, SANDBOX).await;
    let mut watch = support::open_watch(&mut client, SANDBOX).await;
    support::next_token(&mut watch).await;
    let fresh = client
        .refresh_token(pb::RefreshTokenRequest {
            environment: SANDBOX,
            rejected_token_id: first.token_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    let proxy = broker
        .daemon
        .proxy_addrs
        .iter()
        .find_map(|(_, a)| matches!(a, ListenAddr::Tcp(_)).then(|| format!("http://{a}")))
        .unwrap();
    let http = support::http_client();
    assert_eq!(
        http.get(format!("{proxy}/v2/transactions?secret=q"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{proxy}/internal/admin"))
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    broker.daemon.reload().await;

    let records = records_when(&file, |r| {
        let k = kinds(r);
        ["tokens_served", "refresh_forced", "proxied", "reload"]
            .iter()
            .all(|want| k.contains(want))
            && r.iter().filter(|x| x["kind"] == "proxied").count() >= 2
    })
    .await;
    // Hand-outs aggregated per connection and token, GetToken and the watch alike.
    let served: u64 = records
        .iter()
        .filter(|r| r["kind"] == "tokens_served" && r["token_id"] == first.token_id.as_str())
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert!(served >= 3, "two GetTokens and the watch's first update: {records:#?}");
    let forced = records.iter().find(|r| r["kind"] == "refresh_forced").unwrap();
    assert_eq!(forced["rejected_token_id"], first.token_id.as_str());
    assert_eq!(forced["by"], "RefreshToken");
    assert_eq!(forced["caller"], "anonymous", "a TCP caller without a certificate");
    let proxied: Vec<_> = records.iter().filter(|r| r["kind"] == "proxied").collect();
    assert_eq!(proxied[0]["path"], "/v2/transactions", "the path, never the query");
    assert_eq!(proxied[0]["status"], 200);
    assert_eq!(proxied[0]["token_id"], fresh.token_id.as_str());
    assert_eq!(proxied[1]["path"], "/internal/admin");
    assert_eq!(proxied[1]["refusal"], "ROUTE_NOT_ALLOWED");
    // No token, secret or query anywhere.
    let text = std::fs::read_to_string(&file).unwrap();
    for secret in [
        first.access_token.as_str(),
        fresh.access_token.as_str(),
        support::CLIENT_SECRET,
        "secret=q",
    ] {
        assert!(!text.contains(secret), "{secret} in the audit file");
    }

    // Intact, then each kind of tampering found and placed.
    let (code, out) = verify(&[&file]);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = text.lines().collect();
    let tampered = audit_dir.path().join("tampered.jsonl");
    let write = |lines: &[String]| {
        std::fs::write(&tampered, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap()
    };
    let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    edited[1] = edited[1].replacen("\"kind\":\"", "\"kind\":\"x", 1);
    write(&edited);
    let (code, out) = verify(&[&tampered]);
    assert_eq!(code, 65, "{out}");
    assert!(out.contains("tampered.jsonl:2:") && out.contains("edited"), "{out}");
    let mut removed: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    removed.remove(1);
    write(&removed);
    let (code, out) = verify(&[&tampered]);
    assert_eq!(code, 65, "{out}");
    assert!(out.contains("tampered.jsonl:2:"), "{out}");
    let mut reordered: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    reordered.swap(1, 2);
    write(&reordered);
    assert_eq!(verify(&[&tampered]).0, 65);

    // logrotate moves the file: the next records go to a new one, and the
    // chain runs on across both.
    let rotated = audit_dir.path().join("audit.jsonl.1");
    std::fs::rename(&file, &rotated).unwrap();
    support::current_token(&mut client, SANDBOX).await;
    http.get(format!("{proxy}/v2/transactions")).send().await.unwrap();
    records_when(&file, |r| kinds(r).contains(&"proxied")).await;
    let (code, out) = verify(&[&rotated, &file]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(verify(&[&file, &rotated]).0, 65, "out of order");
    drop(watch);
}

/// At shutdown the interval's hand-outs are written, not lost: with an
/// hour's interval, a GetToken's record is in the file once the broker has
/// stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_interval_is_written_at_shutdown() {
    let audit_dir = tempfile::tempdir().unwrap();
    let file = audit_dir.path().join("audit.jsonl");
    let audit_file = file.clone();
    let broker = start_broker_with(&[Environment::Sandbox], Duration::from_secs(900), |_, config| {
        config.audit.file = audit_file;
        config.audit.interval = Duration::from_secs(3600);
    })
    .await;
    let mut client = broker.client().await;
    let token = support::current_token(&mut client, SANDBOX).await;
    assert!(!std::fs::read_to_string(&file).unwrap().contains("tokens_served"));
    broker.daemon.shutdown().await;
    let text = std::fs::read_to_string(&file).unwrap();
    let served: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "tokens_served")
        .collect();
    assert_eq!(served.len(), 1, "{text}");
    assert_eq!(served[0]["token_id"], token.token_id.as_str());
    assert_eq!(verify(&[&file]).0, 0);
}

/// A tmpfs of `size` mounted on a new directory (root only), unmounted
/// when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs");
        Some(Self { dir })
    }

    /// Fills the disk to the last byte (again: the broker frees what a
    /// failed write took, and the filler takes it).
    fn fill(&self) {
        use std::io::Write;
        let mut filler = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("filler"))
            .unwrap();
        let block = vec![0u8; 4096];
        while filler.write_all(&block).is_ok() {}
        while filler.write_all(&[0]).is_ok() {}
    }

    fn free(&self) {
        std::fs::remove_file(self.dir.path().join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

/// `status` of a GetToken on a fresh client.
async fn get_token_code(broker: &support::Broker) -> tonic::Code {
    let mut client = broker.client().await;
    match client
        .get_token(pb::GetTokenRequest {
            environment: SANDBOX,
            min_remaining: None,
        })
        .await
    {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

/// A full disk: with `refuse`, calls are answered UNAVAILABLE
/// `AUDIT_UNAVAILABLE` once a record cannot be written, and served again
/// (their records written) once there is room; with `continue`, served
/// throughout and the failures counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_or_continues_as_configured() {
    for on_failure in [
        flute_token_broker::audit::OnFailure::Refuse,
        flute_token_broker::audit::OnFailure::Continue,
    ] {
        let Some(disk) = SmallDisk::mount("64k") else { return };
        let file = disk.dir.path().join("audit.jsonl");
        let audit_file = file.clone();
        let broker = start_broker_with(&[Environment::Sandbox], Duration::from_secs(900), |_, config| {
            config.audit.file = audit_file;
            config.audit.interval = Duration::from_secs(1);
            config.audit.on_failure = on_failure;
        })
        .await;
        assert_eq!(get_token_code(&broker).await, tonic::Code::Ok);
        records_when(&file, |r| kinds(r).contains(&"tokens_served")).await;
        disk.fill();
        // The next records cannot be written: the writer finds out at its
        // next aggregation.
        let admin = broker.daemon.admin_addr.unwrap();
        let mut last = tonic::Code::Ok;
        for _ in 0..200 {
            disk.fill();
            last = get_token_code(&broker).await;
            if support::metric(admin, "flute_broker_audit_failures_total").await > 0.0 && last != tonic::Code::Ok {
                break;
            }
            if on_failure == flute_token_broker::audit::OnFailure::Continue
                && support::metric(admin, "flute_broker_audit_failures_total").await > 0.0
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(support::metric(admin, "flute_broker_audit_failures_total").await > 0.0);
        match on_failure {
            flute_token_broker::audit::OnFailure::Refuse => {
                assert_eq!(last, tonic::Code::Unavailable, "refused while nothing can be recorded");
                let mut client = broker.client().await;
                let status = client
                    .get_token(pb::GetTokenRequest {
                        environment: SANDBOX,
                        min_remaining: None,
                    })
                    .await
                    .unwrap_err();
                use tonic_types::StatusExt;
                assert_eq!(
                    status.get_error_details().error_info().unwrap().reason,
                    "AUDIT_UNAVAILABLE"
                );
            }
            flute_token_broker::audit::OnFailure::Continue => {
                assert_eq!(
                    get_token_code(&broker).await,
                    tonic::Code::Ok,
                    "served, failures counted"
                );
            }
        }
        // Room again: served, and the records kept meanwhile are written.
        disk.free();
        let mut code = tonic::Code::Unavailable;
        for _ in 0..200 {
            code = get_token_code(&broker).await;
            if code == tonic::Code::Ok {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(code, tonic::Code::Ok);
        if on_failure == flute_token_broker::audit::OnFailure::Refuse {
            let (code, out) = verify(&[&file]);
            assert_eq!(code, 0, "nothing lost: {out}");
        }
        broker.daemon.shutdown().await;
    }
}
