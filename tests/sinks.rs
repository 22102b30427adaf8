//! Token file sinks as their readers see them: a real broker process with
//! `[[sinks]]`, the emulator as its token endpoint, and the files read the
//! way a program that can only read a file would.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use flute_token_broker::emulator::{Emulator, EmulatorConfig, FaultRequest, RunningEmulator};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_flute-token-broker");

async fn emulator(lifetime: Duration) -> RunningEmulator {
    Emulator::new(EmulatorConfig {
        client_id: "sink-client".into(),
        client_secret: "sink-secret".to_string().into(),
        token_lifetime: lifetime,
        issue_refresh_tokens: true,
    })
    .spawn("127.0.0.1:0".parse().unwrap())
    .await
    .unwrap()
}

/// A config for `emulator` with the given `[[sinks]]` text.
fn write_config(dir: &Path, emulator: &RunningEmulator, sinks: &str) -> PathBuf {
    let secret = dir.join("secret");
    std::fs::write(&secret, "sink-secret").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.join("broker.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = ["unix:{sock}"]
[admin]
listen = ""
[credentials]
client_id = "sink-client"
client_secret_file = "{secret}"
[oauth]
allow_insecure_http = true
[environments.sandbox]
token_url = "{url}"
[environments.production]
enabled = false
{sinks}"#,
            sock = dir.join("broker.sock").display(),
            secret = secret.display(),
            url = emulator.token_url(),
        ),
    )
    .unwrap();
    config
}

fn serve(config: &Path) -> Child {
    Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Polls `read` until it returns Some, for at most 30 s.
async fn wait_for<T>(what: &str, mut read: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(found) = read() {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within 30 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(serde::Deserialize)]
struct JsonSink {
    access_token: String,
    token_type: String,
    environment: String,
    token_id: String,
    expires_at: String,
}

fn read_json(path: &Path) -> Option<JsonSink> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("a torn or invalid JSON file {text:?}: {e}")))
}

#[tokio::test]
async fn sinks_hold_the_current_token_replace_it_atomically_and_vanish_in_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let emulator = emulator(Duration::from_secs(4)).await;
    let (token_path, json_path, env_path) = (
        dir.path().join("t"),
        dir.path().join("j.json"),
        dir.path().join("e.env"),
    );
    // A file left by an earlier run is not trusted.
    std::fs::write(&token_path, "stale-token-from-a-crash").unwrap();
    // As root any group works; otherwise our own.
    let gid = if nix::unistd::geteuid().is_root() {
        4242
    } else {
        nix::unistd::getegid().as_raw()
    };
    let config = write_config(
        dir.path(),
        &emulator,
        &format!(
            "[[sinks]]\nenvironment = \"sandbox\"\npath = \"{}\"\nmode = \"0640\"\ngroup = \"{gid}\"\n\
             [[sinks]]\nenvironment = \"sandbox\"\npath = \"{}\"\nformat = \"json\"\n\
             [[sinks]]\nenvironment = \"sandbox\"\npath = \"{}\"\nformat = \"env\"\n",
            token_path.display(),
            json_path.display(),
            env_path.display()
        ),
    );
    let mut broker = serve(&config);

    // Written once the broker holds a token; what `get` hands out.
    let first = wait_for("the first token file", || {
        std::fs::read_to_string(&token_path)
            .ok()
            .filter(|t| t != "stale-token-from-a-crash")
    })
    .await;
    let addr = format!("unix:{}", dir.path().join("broker.sock").display());
    let json = wait_for("the JSON file", || {
        read_json(&json_path).filter(|j| j.access_token == first)
    })
    .await;
    assert_eq!(
        (json.token_type.as_str(), json.environment.as_str()),
        ("Bearer", "sandbox")
    );
    assert_eq!(json.token_id.len(), 12);
    let env_file = wait_for("the env file", || {
        std::fs::read_to_string(&env_path).ok().filter(|t| t.contains(&first))
    })
    .await;
    assert_eq!(
        env_file,
        format!("FLUTE_ACCESS_TOKEN={first}\nFLUTE_TOKEN_EXPIRES_AT={}", json.expires_at)
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&token_path), mode(&json_path)), (0o640, 0o600));
    assert_eq!(std::fs::metadata(&token_path).unwrap().gid(), gid);

    // Rotation: every read sees a whole token, old or new, never a missing,
    // empty or partial file; the new one is a new inode (renamed into place).
    let first_inode = std::fs::metadata(&token_path).unwrap().ino();
    let second = wait_for("a rotation", || {
        let text = std::fs::read_to_string(&token_path).expect("the file is never missing during a rotation");
        assert_eq!(text.len(), first.len(), "a whole token: {text:?}");
        (text != first).then_some(text)
    })
    .await;
    assert_ne!(std::fs::metadata(&token_path).unwrap().ino(), first_inode);
    let out = Command::new(BIN)
        .args(["get", "--env", "sandbox", "--addr", &addr])
        .output()
        .await
        .unwrap();
    let served = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        served == second || std::fs::read_to_string(&token_path).unwrap() == served,
        "the file holds the token the broker serves"
    );

    // An outage: the file goes before its token expires, never holding an expired one.
    emulator.emulator.set_faults(FaultRequest {
        refuse_all: Some(true),
        ..Default::default()
    });
    wait_for("removal in the outage", || match read_json(&json_path) {
        Some(j) => {
            let expires = humantime::parse_rfc3339(&j.expires_at).unwrap();
            assert!(
                expires > SystemTime::now(),
                "an expired token in {}",
                json_path.display()
            );
            None
        }
        None => Some(()),
    })
    .await;
    wait_for("the token file removed too", || (!token_path.exists()).then_some(())).await;

    // Recovery: written again, with a new token.
    emulator.emulator.set_faults(FaultRequest {
        clear: true,
        ..Default::default()
    });
    let recovered = wait_for("the file after recovery", || std::fs::read_to_string(&token_path).ok()).await;
    assert_ne!(recovered, second);

    // Stopping removes the files: nobody would remove them at expiry.
    support::signal(broker.id().unwrap(), nix::sys::signal::Signal::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(30), broker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    for path in [&token_path, &json_path, &env_path] {
        assert!(!path.exists(), "{} left after shutdown", path.display());
    }
    // No temporary files left behind either.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[tokio::test]
async fn check_config_rejects_sinks_that_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let emulator = emulator(Duration::from_secs(900)).await;
    let missing = dir.path().join("no-such-dir/token");
    let twice = dir.path().join("token");
    let config = write_config(
        dir.path(),
        &emulator,
        &format!(
            "[[sinks]]\nenvironment = \"sandbox\"\npath = \"{}\"\n\
             [[sinks]]\nenvironment = \"production\"\npath = \"{}\"\n\
             [[sinks]]\nenvironment = \"sandbox\"\npath = \"{}\"\nformat = \"yaml\"\n\
             [[sinks]]\nenvironment = \"sandbox\"\npath = \"relative/token\"\n\
             [[sinks]]\nenvironment = \"sandbox\"\npath = \"{}\"\nmode = \"0644\"\n",
            missing.display(),
            twice.display(),
            twice.display(),
            dir.path().join("shared").display(),
        ),
    );
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    for needle in ["sinks[2].format", "yaml"] {
        assert!(err.contains(needle), "missing {needle:?}: {err}");
    }
    // Each table fixed but the rule under test, one at a time.
    let fixed = write_config(
        dir.path(),
        &emulator,
        &format!(
            "[[sinks]]\nenvironment = \"sandbox\"\npath = \"{}\"\n\
             [[sinks]]\nenvironment = \"production\"\npath = \"{}\"\n\
             [[sinks]]\nenvironment = \"sandbox\"\npath = \"{}\"\n\
             [[sinks]]\nenvironment = \"sandbox\"\npath = \"relative/token\"\n",
            missing.display(),
            twice.display(),
            twice.display(),
        ),
    );
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&fixed)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    for needle in [
        "sinks[0].path: directory",
        "does not exist",
        "sinks[1].environment: production is not enabled",
        "sinks[2].path:",
        "also sinks[1]'s path",
        "sinks[3].path: relative/token: must be an absolute path",
    ] {
        assert!(err.contains(needle), "missing {needle:?}: {err}");
    }

    // A world-readable token file works, with a warning.
    let readable = write_config(
        dir.path(),
        &emulator,
        &format!(
            "[[sinks]]\nenvironment = \"sandbox\"\npath = \"{}\"\nmode = \"0644\"\n",
            dir.path().join("shared").display()
        ),
    );
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&readable)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("sinks[0].mode: 0644 lets every local user read the token"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("[[sinks]]"));
}
