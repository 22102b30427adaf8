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
//! - [`cli`]: the command line (clap definitions in `cli::args`, one function per subcommand).
//! - [`client`]: the gRPC client of the broker behind the `get`, `watch` and `status` commands.
//! - [`systemd`], [`logging`], [`metrics`]: operations.
//! - [`duration`]: human-readable durations; [`exit`]: every exit code.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod client;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod dial;
pub mod duration;
pub mod emulator;
pub mod environment;
pub mod exit;
pub mod grpc;
pub mod logging;
pub mod metrics;
pub mod oauth;
pub mod serve;
pub mod settings;
pub mod sinks;
pub mod systemd;
pub mod tls_roots;
pub mod token;
pub mod token_text;
pub mod upstream;

pub use environment::Environment;

/// Installs ring as the process-wide rustls provider, for the token
/// endpoint client and the gRPC TLS listeners alike (one crypto stack).
/// Later calls do nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An error and its sources on one line (`a: b: c`). A source whose text the
/// line already holds is skipped: many libraries repeat their cause.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_chain_skips_repeated_causes() {
        let inner = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let outer = std::io::Error::other(inner);
        // io::Error's Display already shows the wrapped error's text.
        assert_eq!(super::error_chain(&outer), "Connection refused (os error 111)");
    }
}
