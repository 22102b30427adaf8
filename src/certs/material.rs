//! Reading and checking TLS material before it is used: a certificate
//! chain with its key (they must match, and the leaf must be valid now),
//! and CA bundles. Every error names the file and the reason, never the
//! content.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// Why material was not taken: the file and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct MaterialError {
    pub path: PathBuf,
    pub reason: String,
}

impl MaterialError {
    fn new(path: &Path, reason: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }
}

/// What is shown of a certificate in use: never its key, only what an
/// operator checks (logs, metrics, `status`, `check-config`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The serial number, colon-separated hex.
    pub serial: String,
    /// The subject, as the certificate writes it.
    pub subject: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertificateInfo {
    /// Parses a DER certificate's validity and names.
    pub fn of(der: &[u8]) -> Result<Self, String> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
        let at = |t: x509_parser::time::ASN1Time| {
            let seconds = t.timestamp();
            if seconds >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(seconds as u64)
            } else {
                SystemTime::UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs())
            }
        };
        Ok(Self {
            serial: cert.raw_serial_as_string(),
            subject: cert.subject().to_string(),
            not_before: at(cert.validity().not_before),
            not_after: at(cert.validity().not_after),
        })
    }

    /// Seconds since the epoch at which it expires (for metrics).
    pub fn expires_at_unix(&self) -> f64 {
        self.not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    }

    /// `serial 3a:…, expires 2027-03-01T00:00:00Z (in 84 days)`.
    pub fn describe(&self, now: SystemTime) -> String {
        let when = humantime::format_rfc3339_seconds(self.not_after);
        let left = match self.not_after.duration_since(now) {
            Ok(d) => format!("in {}", roughly(d)),
            Err(e) => format!("{} ago", roughly(e.duration())),
        };
        format!("serial {}, expires {when} ({left})", self.serial)
    }
}

/// A span as an operator reads an expiry: whole days from two days on,
/// else hours and minutes, else seconds.
fn roughly(span: Duration) -> String {
    match span.as_secs() {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 3_600 => format!("{}h{:02}m", s / 3_600, s % 3_600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, MaterialError> {
    std::fs::read(path).map_err(|e| MaterialError::new(path, format!("cannot read: {e}")))
}

/// Every certificate of a PEM file; at least one.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| MaterialError::new(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(MaterialError::new(path, "holds no certificate"));
    }
    Ok(certs)
}

/// The leaf's validity must hold at `now`.
fn valid_now(path: &Path, info: &CertificateInfo, now: SystemTime) -> Result<(), MaterialError> {
    if now > info.not_after {
        let when = humantime::format_rfc3339_seconds(info.not_after);
        return Err(MaterialError::new(path, format!("the certificate expired at {when}")));
    }
    if now < info.not_before {
        let when = humantime::format_rfc3339_seconds(info.not_before);
        return Err(MaterialError::new(
            path,
            format!("the certificate is not valid before {when}"),
        ));
    }
    Ok(())
}

/// A certificate chain and its key, checked: both parse, the key is the
/// leaf's, and the leaf is valid at `now`.
pub fn identity(
    cert: &Path,
    key: &Path,
    now: SystemTime,
) -> Result<(Arc<CertifiedKey>, CertificateInfo), MaterialError> {
    let chain = certificates(cert)?;
    let info = CertificateInfo::of(&chain[0]).map_err(|reason| MaterialError::new(cert, reason))?;
    valid_now(cert, &info, now)?;
    let pem = read(key)?;
    if pem.iter().all(u8::is_ascii_whitespace) {
        return Err(MaterialError::new(key, "is empty"));
    }
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| MaterialError::new(key, format!("no private key in the file: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| MaterialError::new(key, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| {
        MaterialError::new(
            key,
            format!("the key does not match the certificate in {}", cert.display()),
        )
    })?;
    Ok((Arc::new(certified), info))
}

/// A CA bundle, checked: at least one certificate, each parses, and the
/// earliest expiry among them (what the bundle is good until).
pub fn authorities(path: &Path) -> Result<(Vec<CertificateDer<'static>>, CertificateInfo), MaterialError> {
    let certs = certificates(path)?;
    let mut earliest: Option<CertificateInfo> = None;
    for der in &certs {
        let info = CertificateInfo::of(der).map_err(|reason| MaterialError::new(path, reason))?;
        if earliest.as_ref().is_none_or(|e| info.not_after < e.not_after) {
            earliest = Some(info);
        }
    }
    let earliest = earliest.expect("at least one certificate");
    Ok((certs, earliest))
}

/// A root store of `certs` (a CA that webpki refuses is named).
pub fn root_store(path: &Path, certs: &[CertificateDer<'static>]) -> Result<rustls::RootCertStore, MaterialError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in certs {
        store
            .add(cert.clone())
            .map_err(|e| MaterialError::new(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(store)
}
