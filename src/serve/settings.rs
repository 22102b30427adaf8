//! `[server]`: the gRPC listeners, their sockets, TLS, connection limits
//! and deadlines. Each default is defined here once.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::guard::ConnectionLimits;
use super::listen::{ListenAddr, UnixSocketOptions};
use super::tls::ServerTlsFiles;
use crate::duration::out_of_range;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// gRPC listen addresses (an array, or a comma-separated string).
    #[serde(serialize_with = "write_listen", deserialize_with = "read_listen")]
    pub listen: Vec<ListenAddr>,
    /// Permission bits of Unix socket files.
    #[serde(with = "crate::settings::octal_mode")]
    pub unix_socket_mode: u32,
    /// Group (name or numeric id) that owns Unix socket files; `""`: the process's.
    pub unix_socket_group: String,
    /// How long shutdown waits for in-flight calls.
    #[serde(with = "crate::duration::serde")]
    pub shutdown_grace: Duration,
    /// Longest a call waits for a token (first fetch, early refresh) when
    /// the caller set no shorter deadline.
    #[serde(with = "crate::duration::serde")]
    pub request_wait: Duration,
    /// Open connections per listener (the admin listener included).
    pub max_connections: usize,
    /// From accept to the first complete request (TLS handshake included).
    #[serde(with = "crate::duration::serde")]
    pub handshake_timeout: Duration,
    /// A connection with no call or stream open is closed after this.
    #[serde(with = "crate::duration::serde")]
    pub idle_timeout: Duration,
    /// Concurrent streams per HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// Share of each listener's `max_connections` that connections holding
    /// requests (long polls, WatchToken streams) may take, in percent. A
    /// connection counts once from its first held request to its last,
    /// however many it multiplexes; a held request that would make one
    /// more connection hold beyond the share is refused at once
    /// (RESOURCE_EXHAUSTED / 429), so a GetToken always finds room.
    pub held_requests_percent: u8,
    /// TLS (and optionally mTLS) for every TCP listener; `None`: plaintext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTlsFiles>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: vec![ListenAddr::Tcp(([127, 0, 0, 1], 50051).into())],
            unix_socket_mode: 0o660,
            unix_socket_group: String::new(),
            shutdown_grace: Duration::from_secs(10),
            request_wait: Duration::from_secs(30),
            max_connections: 16_384,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_concurrent_streams: 1024,
            held_requests_percent: 50,
            tls: None,
        }
    }
}

impl ServerConfig {
    /// Per-listener limits (the admin listener's too).
    pub fn limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
            max_concurrent_streams: self.max_concurrent_streams,
            held_requests_percent: self.held_requests_percent,
        }
    }

    pub fn unix_socket_options(&self) -> UnixSocketOptions {
        UnixSocketOptions {
            mode: self.unix_socket_mode,
            group: (!self.unix_socket_group.is_empty()).then(|| self.unix_socket_group.clone()),
        }
    }

    /// Problems with the values, each starting with its key.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.listen.is_empty() {
            out.push("listen: at least one listener is required".into());
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            out.push("max_connections: must be between 1 and 1000000".into());
        }
        if !(1..=100_000).contains(&self.max_concurrent_streams) {
            out.push("max_concurrent_streams: must be between 1 and 100000".into());
        }
        if !(1..=90).contains(&self.held_requests_percent) {
            out.push("held_requests_percent: must be between 1 and 90 (the rest of each listener's budget stays free for unary calls)".into());
        }
        let (ms, secs) = (Duration::from_millis, Duration::from_secs);
        for (key, value, min, max) in [
            ("shutdown_grace", self.shutdown_grace, Duration::ZERO, secs(600)),
            ("request_wait", self.request_wait, ms(100), secs(600)),
            ("handshake_timeout", self.handshake_timeout, ms(100), secs(600)),
            ("idle_timeout", self.idle_timeout, secs(1), secs(86_400)),
        ] {
            if let Some(problem) = out_of_range(value, min, max) {
                out.push(format!("{key}: {problem}"));
            }
        }
        if let Some(tls) = &self.tls {
            out.extend(tls.problems().into_iter().map(|p| format!("tls.{p}")));
        }
        out
    }
}

pub(crate) fn read_listen<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<ListenAddr>, D::Error> {
    crate::settings::parsed_list(deserializer, str::parse)
}

pub(crate) fn write_listen<S: Serializer>(listen: &[ListenAddr], serializer: S) -> Result<S::Ok, S::Error> {
    crate::settings::write_list(listen, serializer)
}
