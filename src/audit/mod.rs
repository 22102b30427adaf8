//! The audit trail: what the core decided, attributed to the caller's
//! identity, as JSON lines in a hash chain ([`chain`]) nobody can quietly
//! edit (`flute-token-broker audit verify FILE…` finds an edited, removed
//! or reordered record, across rotated files).
//!
//! Recorded: tokens handed out, aggregated per (connection, environment,
//! token_id) with a count and first/last time per `interval`, so the hot
//! path writes nothing per call (one map update under a mutex); refused
//! token requests, aggregated per caller and reason; every refresh a caller
//! forced and by whom; every proxied call, one record each, refused ones
//! included (method, path without query, status or refusal reason,
//! duration, `token_id`, retried or not, the API's request id).
//! Never a token, a secret, a query string or a body.
//!
//! A writer task owns the file: it appends each record as it comes (through
//! a bounded queue), the aggregates every `interval`, reopens the file when
//! logrotate moved it (the path's inode changed) or on SIGHUP. With
//! `on_failure = "refuse"` the core refuses calls (503 /
//! UNAVAILABLE, `AUDIT_UNAVAILABLE`) while a record cannot be written or the
//! queue is full, so nothing is served unrecorded; with `"continue"` it
//! serves, and failures are counted and logged.

pub mod chain;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::environment::Environment;
use crate::identity::Caller;
use crate::token::Token;

/// `[audit]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The audit file (JSON lines, appended); empty: no audit trail.
    pub file: PathBuf,
    /// Also to the journal (not built yet: refused).
    pub journal: bool,
    /// What to do while no record can be written.
    pub on_failure: OnFailure,
    /// How long hand-outs and refusals are aggregated before a record.
    #[serde(with = "crate::duration::serde")]
    pub interval: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            file: PathBuf::new(),
            journal: false,
            on_failure: OnFailure::Refuse,
            interval: Duration::from_secs(60),
        }
    }
}

impl AuditConfig {
    pub fn is_enabled(&self) -> bool {
        !self.file.as_os_str().is_empty()
    }

    /// Problems with the values, each starting with its key.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.journal {
            out.push("journal: the journal sink is not built yet; use file".into());
        }
        if self.is_enabled() && !self.file.is_absolute() {
            out.push("file: must be an absolute path".into());
        }
        if let Some(p) = crate::duration::out_of_range(self.interval, Duration::from_secs(1), Duration::from_secs(3600))
        {
            out.push(format!("interval: {p}"));
        }
        out
    }
}

/// `on_failure`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum OnFailure {
    /// Refuse calls while records cannot be written (as Vault does).
    #[default]
    Refuse,
    /// Serve anyway; count and log the failures.
    Continue,
}

crate::named_choices!(OnFailure {
    Refuse => "refuse",
    Continue => "continue",
});

/// Records waiting for the writer at most (beyond: refused or counted).
const QUEUE: usize = 8192;

/// The handle the core and the faces record through; a no-op when off.
#[derive(Clone, Debug, Default)]
pub struct Audit {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    refuse: bool,
    /// False while the file cannot be written (or the queue is full).
    healthy: AtomicBool,
    queue: mpsc::Sender<Entry>,
    aggregates: Mutex<Aggregates>,
    /// `flute_broker_audit_failures_total`.
    failures: prometheus_client::metrics::counter::Counter,
}

#[derive(Debug, Default)]
struct Aggregates {
    served: HashMap<ServedKey, Count>,
    refused: HashMap<(String, Environment, &'static str), Count>,
}

/// One connection's hand-outs of one token: the connection's peer is one
/// `Arc`, so its address stands for it (the caller is kept with the count).
#[derive(Debug, Hash, PartialEq, Eq)]
struct ServedKey {
    connection: usize,
    environment: Environment,
    token: usize,
}

#[derive(Debug)]
struct Count {
    caller: Caller,
    /// The token handed out (hand-outs only; its `Debug` is redacted).
    token: Option<Arc<Token>>,
    count: u64,
    first: SystemTime,
    last: SystemTime,
}

/// One more under `key`: counted, its last time moved on.
fn tally<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Count>,
    key: K,
    caller: &Caller,
    token: impl FnOnce() -> Option<Arc<Token>>,
) {
    let now = SystemTime::now();
    map.entry(key)
        .and_modify(|c| {
            c.count += 1;
            c.last = now;
        })
        .or_insert_with(|| Count {
            caller: caller.clone(),
            token: token(),
            count: 1,
            first: now,
            last: now,
        });
}

/// What the writer receives.
#[derive(Debug)]
enum Entry {
    Record(serde_json::Value),
    Reopen,
    /// Write the aggregates and everything pending now, then answer.
    Flush(tokio::sync::oneshot::Sender<()>),
}

impl Audit {
    /// Starts the writer for `config` (off when no file is set). The file
    /// is opened (created) now, so a path that cannot be written is an
    /// error at start.
    pub fn start(config: &AuditConfig, metrics: Arc<crate::metrics::Metrics>) -> std::io::Result<Self> {
        if !config.is_enabled() {
            return Ok(Self::default());
        }
        let (state, last) = Writer::open(&config.file)?;
        let (queue, entries) = mpsc::channel(QUEUE);
        let inner = Arc::new(Inner {
            refuse: config.on_failure == OnFailure::Refuse,
            healthy: AtomicBool::new(true),
            queue,
            aggregates: Mutex::new(Aggregates::default()),
            failures: metrics.audit_failures.clone(),
        });
        let writer = Writer {
            path: config.file.clone(),
            file: state,
            seq: last.last_seq.map_or(0, |s| s + 1),
            prev: last.last_hash,
            pending: Vec::new(),
            inner: inner.clone(),
        };
        tokio::spawn(writer.run(entries, config.interval));
        info!(file = %config.file.display(), on_failure = config.on_failure.as_str(), "audit trail");
        Ok(Self { inner: Some(inner) })
    }

    /// Whether calls may be served: false when `on_failure = "refuse"`
    /// and the trail cannot take records now. One atomic load.
    pub fn admits(&self) -> bool {
        match &self.inner {
            Some(inner) => !inner.refuse || inner.healthy.load(Ordering::Acquire),
            None => true,
        }
    }

    /// A token handed out (aggregated). The hot path: one lock and one
    /// map update, no allocation once the connection's entry exists.
    pub fn served(&self, caller: &Caller, environment: Environment, token: &Arc<Token>) {
        let Some(inner) = &self.inner else { return };
        let connection = match caller {
            Caller::Unix(peer) => Arc::as_ptr(peer) as usize,
            Caller::Tls { certificates } => Arc::as_ptr(certificates) as usize,
            Caller::Anonymous => 0,
        };
        // The token's address stands for it: the entry holds the token, so
        // the address is not reused while the entry lives.
        let key = ServedKey {
            connection,
            environment,
            token: Arc::as_ptr(token) as usize,
        };
        let mut aggregates = inner.aggregates.lock().unwrap_or_else(|p| p.into_inner());
        tally(&mut aggregates.served, key, caller, || Some(token.clone()));
    }

    /// A token request refused (aggregated per caller identity and reason).
    pub fn refused(&self, caller: &Caller, environment: Environment, reason: &'static str) {
        let Some(inner) = &self.inner else { return };
        let who = identity(caller).to_string();
        let mut aggregates = inner.aggregates.lock().unwrap_or_else(|p| p.into_inner());
        tally(&mut aggregates.refused, (who, environment, reason), caller, || None);
    }

    /// A refresh a caller forced (RefreshToken, `min_remaining`, a proxied 401).
    pub fn refresh_forced(&self, caller: &Caller, environment: Environment, rejected: Option<&str>, by: &str) {
        self.record(json!({
            "kind": "refresh_forced",
            "environment": environment.as_str(),
            "caller": identity(caller),
            "rejected_token_id": rejected,
            "by": by,
        }));
    }

    /// One proxied call, refused or answered.
    pub fn proxied(&self, call: ProxiedCall<'_>) {
        self.record(json!({
            "kind": "proxied",
            "environment": call.environment.as_str(),
            "caller": identity(call.caller),
            "method": call.method,
            "path": call.path,
            "status": call.status,
            "refusal": call.refusal,
            "duration_ms": call.duration.as_millis() as u64,
            "token_id": call.token_id,
            "retried": call.retried,
            "request_id": call.request_id,
        }));
    }

    /// An event of the broker's own (a key adopted, a reload).
    pub fn event(&self, kind: &'static str, detail: serde_json::Value) {
        self.record(json!({"kind": kind, "detail": detail}));
    }

    /// Writes the aggregates and every pending record now (at shutdown:
    /// the last interval's hand-outs are not lost), waiting at most `limit`.
    pub async fn flush(&self, limit: Duration) {
        let Some(inner) = &self.inner else { return };
        let (done, written) = tokio::sync::oneshot::channel();
        if inner.queue.send(Entry::Flush(done)).await.is_ok() {
            let _ = tokio::time::timeout(limit, written).await;
        }
    }

    /// Reopens the file (SIGHUP).
    pub fn reopen(&self) {
        if let Some(inner) = &self.inner {
            let _ = inner.queue.try_send(Entry::Reopen);
        }
    }

    fn record(&self, record: serde_json::Value) {
        let Some(inner) = &self.inner else { return };
        if inner.queue.try_send(Entry::Record(record)).is_err() {
            // Full: with refuse, calls are refused until it drains.
            inner.healthy.store(false, Ordering::Release);
            inner.failures.inc();
            warn!("the audit queue is full: a record was not written");
        }
    }
}

/// What [`Audit::proxied`] records of one call.
pub struct ProxiedCall<'a> {
    pub caller: &'a Caller,
    pub environment: Environment,
    pub method: &'a str,
    pub path: &'a str,
    pub status: Option<u16>,
    pub refusal: Option<&'a str>,
    pub duration: Duration,
    pub token_id: Option<&'a str>,
    pub retried: bool,
    pub request_id: Option<&'a str>,
}

/// A caller's identity as a record shows it: what is known, nothing else.
fn identity(caller: &Caller) -> serde_json::Value {
    match caller {
        Caller::Unix(peer) => {
            let (unit, pod, container, exe) = match &peer.process {
                crate::serve::peer::ProcessFacts::Read { workload, exe, .. } => (
                    workload.unit.clone(),
                    workload.pod_uid.clone(),
                    workload.container_id.clone(),
                    exe.as_ref().map(|e| e.display().to_string()),
                ),
                _ => (None, None, None, None),
            };
            json!({"uid": peer.uid, "gid": peer.gid, "pid": peer.pid, "unit": unit,
                   "pod_uid": pod, "container_id": container, "exe": exe})
        }
        Caller::Tls { certificates } => {
            let names = certificates
                .first()
                .map(|c| crate::identity::certificate_names(c))
                .unwrap_or_default();
            json!({"tls_names": names})
        }
        Caller::Anonymous => json!("anonymous"),
    }
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The task that owns the file.
struct Writer {
    path: PathBuf,
    file: Option<std::fs::File>,
    seq: u64,
    prev: String,
    /// Sealed lines not yet written (the file failed); written first.
    pending: Vec<String>,
    inner: Arc<Inner>,
}

impl Writer {
    /// Opens (creates) `path` for appending, and reads the chain's end
    /// from it so that a restart continues the chain.
    fn open(path: &Path) -> std::io::Result<(Option<std::fs::File>, chain::Verified)> {
        let last = last_line(path)
            .as_deref()
            .map(|line| chain::verify([("", line)]))
            .and_then(Result::ok)
            .unwrap_or(chain::Verified {
                records: 0,
                last_seq: None,
                last_hash: chain::GENESIS.to_owned(),
            });
        let file = open_append(path)?;
        Ok((Some(file), last))
    }

    async fn run(mut self, mut entries: mpsc::Receiver<Entry>, interval: Duration) {
        let mut tick = tokio::time::interval(interval.min(Duration::from_secs(1)));
        let mut since_aggregate = tokio::time::Instant::now();
        loop {
            tokio::select! {
                entry = entries.recv() => match entry {
                    Some(Entry::Record(record)) => self.append(record),
                    Some(Entry::Reopen) => self.reopen(),
                    Some(Entry::Flush(done)) => {
                        self.aggregate();
                        self.flush();
                        let _ = done.send(());
                    }
                    None => {
                        self.aggregate();
                        self.flush();
                        return;
                    }
                },
                _ = tick.tick() => {
                    if since_aggregate.elapsed() >= interval {
                        since_aggregate = tokio::time::Instant::now();
                        self.aggregate();
                    }
                    self.flush();
                }
            }
        }
    }

    /// The aggregates as records, the maps emptied.
    fn aggregate(&mut self) {
        let (served, refused) = {
            let mut aggregates = self.inner.aggregates.lock().unwrap_or_else(|p| p.into_inner());
            (
                std::mem::take(&mut aggregates.served),
                std::mem::take(&mut aggregates.refused),
            )
        };
        for (key, count) in served {
            self.append(json!({
                "kind": "tokens_served",
                "environment": key.environment.as_str(),
                "caller": identity(&count.caller),
                "token_id": count.token.as_ref().map(|t| t.token_id.as_str()),
                "count": count.count,
                "first": unix_seconds(count.first),
                "last": unix_seconds(count.last),
            }));
        }
        for ((_, environment, reason), count) in refused {
            self.append(json!({
                "kind": "token_refused",
                "environment": environment.as_str(),
                "caller": identity(&count.caller),
                "reason": reason,
                "count": count.count,
                "first": unix_seconds(count.first),
                "last": unix_seconds(count.last),
            }));
        }
    }

    /// Seals one record into the chain and writes it (or keeps it pending).
    fn append(&mut self, mut record: serde_json::Value) {
        let mut body = serde_json::Map::new();
        body.insert("seq".into(), self.seq.into());
        body.insert("prev".into(), self.prev.clone().into());
        body.insert("time".into(), unix_seconds(SystemTime::now()).into());
        if let Some(fields) = record.as_object_mut() {
            body.append(fields);
        }
        let text = serde_json::Value::Object(body).to_string();
        let (line, hash) = chain::seal(&self.prev, &text);
        self.seq += 1;
        self.prev = hash;
        self.pending.push(line);
        self.flush();
    }

    /// Writes what is pending; marks the trail healthy or not.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        if self.moved() {
            self.reopen();
        }
        let Some(file) = self.file.as_mut() else {
            self.failed("the audit file is not open");
            return;
        };
        let mut text = String::new();
        for line in &self.pending {
            text.push_str(line);
            text.push('\n');
        }
        // Where the batch begins: a batch that fails part-way (a full disk)
        // is cut back to here, so no partial record stays in the file.
        let before = file.metadata().map(|m| m.len()).ok();
        match file.write_all(text.as_bytes()).and_then(|()| file.flush()) {
            Ok(()) => {
                self.pending.clear();
                if !self.inner.healthy.swap(true, Ordering::AcqRel) {
                    info!("the audit trail is written again");
                }
            }
            Err(e) => {
                if let Some(before) = before
                    && file.set_len(before).is_err()
                {
                    // Cannot cut it back: the next batch starts on a new
                    // line, and `audit verify` names the broken record.
                    let _ = file.write_all(b"\n");
                }
                self.failed(&e.to_string());
            }
        }
    }

    fn failed(&mut self, why: &str) {
        self.inner.failures.inc();
        if self.inner.healthy.swap(false, Ordering::AcqRel) {
            error!(
                error = why,
                pending = self.pending.len(),
                "cannot write the audit trail"
            );
        }
        if self.pending.len() > QUEUE {
            // Kept in memory no further: with refuse nothing is served
            // meanwhile; with continue the loss is counted, and `audit
            // verify` shows the gap in the chain.
            let dropped = self.pending.len() - QUEUE;
            self.pending.drain(..dropped);
            self.inner.failures.inc_by(dropped as u64);
            warn!(dropped, "audit records dropped while the file cannot be written");
        }
    }

    /// Whether the path no longer names the open file (logrotate moved it).
    fn moved(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Some(file) = &self.file else { return true };
        match (std::fs::metadata(&self.path), file.metadata()) {
            (Ok(at_path), Ok(open)) => at_path.ino() != open.ino() || at_path.dev() != open.dev(),
            _ => true,
        }
    }

    fn reopen(&mut self) {
        match open_append(&self.path) {
            Ok(file) => self.file = Some(file),
            Err(e) => {
                self.file = None;
                self.failed(&format!("cannot reopen {}: {e}", self.path.display()));
            }
        }
    }
}

/// The last line of `path` (its last 64 KiB read, not the whole file).
fn last_line(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let length = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(length.saturating_sub(64 * 1024))).ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    text.lines().rev().find(|l| !l.trim().is_empty()).map(str::to_owned)
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}
