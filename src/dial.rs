//! Dialing a broker: the channel the CLI client and an agent's upstream
//! both use (a `unix:` path, or `http://` / `https://` with the client's
//! TLS files), so neither borrows the other's code.

use std::path::PathBuf;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::serve::tls::{TlsError, read};

/// Certificate files of a TLS client (the CLI).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// The CA that signed the broker's certificate (system roots are not used).
    pub ca_file: Option<PathBuf>,
    /// A client certificate and key, for a broker that requires mTLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// A DER certificate as PEM (what tonic's `Certificate` takes).
fn pem(der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|line| std::str::from_utf8(line).expect("base64 is ASCII"))
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// TLS for a client of the broker: the CA of `--ca-file`, or else the
/// roots `oauth.tls_roots = "auto"` would trust (the host's store, or the
/// bundled Mozilla roots where it has none).
pub fn client_config(files: &ClientTlsFiles) -> Result<ClientTlsConfig, TlsError> {
    crate::install_crypto_provider();
    let mut config = ClientTlsConfig::new();
    match &files.ca_file {
        Some(ca) => config = config.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => {
            let roots = crate::tls_roots::TlsRoots::Auto
                .load()
                .map_err(|e| TlsError::Invalid(e.to_string()))?;
            config = config.ca_certificates(roots.certificates.iter().map(|der| Certificate::from_pem(pem(der))));
        }
    }
    match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => config = config.identity(Identity::from_pem(read(cert)?, read(key)?)),
        (None, None) => {}
        _ => {
            return Err(TlsError::Invalid(
                "a client certificate needs both --cert-file and --key-file".into(),
            ));
        }
    }
    Ok(config)
}
