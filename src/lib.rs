//! flute-token-broker: a daemon that holds a Flute API key and hands fresh
//! OAuth 2.0 access tokens to internal services over gRPC.
//!
//! Module map:
//! - [`environment`]: sandbox and production.
//! - [`credentials`]: the API key, its sources, redaction.
//! - [`oauth`]: the token endpoint client, response parsing, error classes.
//! - [`token`]: the Token value, the refresh policy, the per-environment TokenSource task.
//! - [`emulator`]: a local Flute token endpoint with fault injection.
//! - [`metrics`]: Prometheus metrics.
//! - [`duration`]: human-readable durations.
#![forbid(unsafe_code)]

pub mod credentials;
pub mod duration;
pub mod emulator;
pub mod environment;
pub mod metrics;
pub mod oauth;
pub mod token;

pub use environment::Environment;
