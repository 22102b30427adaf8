//! The contract's types on the wire: the code generated from
//! `proto/flute/tokenbroker/v1/token_broker.proto` (messages, the gRPC
//! client and server traits, the descriptor set) and the conversions
//! between them and the broker's own values (environments, tokens,
//! durations, timestamps). Every face and the client speak through these;
//! a token's `Debug` here is redacted like the engine's.

use std::time::{Duration, SystemTime};

use crate::environment::Environment;
use crate::token::Token;

/// Generated protobuf and gRPC code.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("flute.tokenbroker.v1");

    /// The encoded descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/token_broker_descriptor.bin"));
}

impl From<Environment> for pb::Environment {
    fn from(env: Environment) -> Self {
        match env {
            Environment::Sandbox => pb::Environment::Sandbox,
            Environment::Production => pb::Environment::Production,
        }
    }
}

/// The environment a request names; `None` for unspecified or unknown values.
pub fn environment_from_pb(value: i32) -> Option<Environment> {
    match pb::Environment::try_from(value).ok()? {
        pb::Environment::Sandbox => Some(Environment::Sandbox),
        pb::Environment::Production => Some(Environment::Production),
        pb::Environment::Unspecified => None,
    }
}

/// A protobuf Timestamp of a time given since the Unix epoch.
pub fn unix_timestamp(since_epoch: Duration) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: since_epoch.as_secs() as i64,
        nanos: since_epoch.subsec_nanos() as i32,
    }
}

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// Wall-clock time of a monotonic instant (for replies only).
pub fn wall_time(at: tokio::time::Instant) -> SystemTime {
    let now = tokio::time::Instant::now();
    if at >= now {
        SystemTime::now() + (at - now)
    } else {
        SystemTime::now() - (now - at)
    }
}

impl std::fmt::Debug for pb::Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("access_token", &"[redacted]")
            .field("token_type", &self.token_type)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("environment", &self.environment)
            .field("token_id", &self.token_id)
            .field("serve_for", &self.serve_for)
            .finish()
    }
}

impl From<&Token> for pb::Token {
    fn from(t: &Token) -> Self {
        pb_token(t, tokio::time::Instant::now())
    }
}

/// A token on the wire, its `serve_for` measured at `now`.
pub fn pb_token(t: &Token, now: tokio::time::Instant) -> pb::Token {
    pb::Token {
        access_token: t.access_token().to_owned(),
        token_type: t.token_type.clone(),
        issued_at: Some(unix_timestamp(t.issued_at_unix)),
        expires_at: Some(unix_timestamp(t.expires_at_unix)),
        environment: pb::Environment::from(t.environment) as i32,
        token_id: t.token_id.clone(),
        serve_for: Some(pb_duration(t.serve_until.saturating_duration_since(now))),
    }
}

/// A std Duration as a protobuf Duration.
pub fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A protobuf Duration as a std Duration. `Err` unless it is normalised as
/// google.protobuf.Duration requires (`nanos` within ±999,999,999 and of
/// the same sign as `seconds`, `seconds` within ±10,000 years) and not negative.
pub fn duration_from_pb(d: &prost_types::Duration) -> Result<Duration, String> {
    const MAX_SECONDS: i64 = 315_576_000_000;
    let normalised = d.nanos.unsigned_abs() < 1_000_000_000
        && d.seconds.abs() <= MAX_SECONDS
        && !(d.seconds > 0 && d.nanos < 0 || d.seconds < 0 && d.nanos > 0);
    if !normalised {
        return Err("is not a normalised Duration (nanos must be below 1e9 and share the sign of seconds)".into());
    }
    if d.seconds < 0 || d.nanos < 0 {
        return Err("must be a non-negative duration".into());
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reply_token_debug_is_redacted() {
        let t = super::pb::Token {
            access_token: "the-bearer-value".into(),
            token_id: "0123456789ab".into(),
            ..Default::default()
        };
        let shown = format!("{t:?}");
        assert!(
            !shown.contains("the-bearer-value") && shown.contains("0123456789ab"),
            "{shown}"
        );
        let update = super::pb::WatchTokenResponse {
            update: Some(super::pb::watch_token_response::Update::Token(t)),
        };
        assert!(!format!("{update:?}").contains("the-bearer-value"));
    }
}
