//! flute-token-broker: a daemon that holds a Flute API key and hands fresh
//! OAuth 2.0 access tokens to internal services over gRPC.
//!
//! ARCHITECTURE.md has the module map (layers, what each module owns and
//! may not import; `tests/architecture.rs` checks it against the code) and
//! the invariants every change keeps.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod admin;
pub mod audit;
pub mod broker;
pub mod certs;
pub mod cgroup;
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
pub mod fingerprint;
pub mod grpc;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod oauth;
pub mod policy;
pub mod proxy;
pub mod rpc_status;
pub mod serve;
pub mod settings;
pub mod sinks;
pub mod systemd;
pub mod telemetry;
pub mod tls_roots;
pub mod token;
pub mod token_text;
pub mod upstream;
pub mod wire;

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
