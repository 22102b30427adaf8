//! flute-token-broker: a daemon that holds a Flute API key and hands fresh
//! OAuth 2.0 access tokens to internal services over gRPC.
//!
//! Module map:
//! - [`environment`]: sandbox and production.
//! - [`credentials`]: the API key, its sources, redaction.
//! - [`oauth`]: the token endpoint client, response parsing, error classes.
//! - [`token`]: the Token value, the refresh policy, the per-environment TokenSource task.
//! - [`emulator`]: a local Flute token endpoint with fault injection.
//! - [`config`]: the configuration schema, loading and validation.
//! - [`grpc`]: the TokenBroker service, status mapping, health, listeners, TLS, caller access.
//! - [`connections`]: per-listener connection budgets, handshake and idle deadlines, the fd limit.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`daemon`]: wiring, credential reload, graceful shutdown, dev mode.
//! - [`cli`]: the `get`, `watch` and `status` client commands.
//! - [`systemd`], [`logging`], [`metrics`]: operations.
//! - [`duration`]: human-readable durations.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod connections;
pub mod credentials;
pub mod daemon;
pub mod duration;
pub mod emulator;
pub mod environment;
pub mod grpc;
pub mod logging;
pub mod metrics;
pub mod oauth;
pub mod systemd;
pub mod token;

pub use environment::Environment;
