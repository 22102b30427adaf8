//! Who is calling: a request's connection (and, later, a credential it
//! presents) turned into a [`Caller`]. A Unix-socket peer is known by the
//! kernel's credentials for the connection (SO_PEERCRED) and its groups; a
//! TCP peer with a verified client certificate by the certificate's URI and
//! DNS names; anyone else is anonymous, never a guess.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use tonic::Request;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};

use crate::serve::guard::GuardedInfo;

/// What the broker knows about a caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A Unix-socket peer, with the kernel's view of its identity.
    Unix { uid: u32, gid: u32, pid: Option<i32> },
    /// A TCP peer that presented a client certificate chain (mutual TLS,
    /// verified by the TLS layer against `client_ca_file`). Its names are
    /// read only when an allow-list asks (not on every call).
    Tls {
        certificates: Arc<Vec<CertificateDer<'static>>>,
    },
    /// A TCP peer without a certificate (or a Unix peer whose credentials
    /// could not be read).
    Anonymous,
}

/// Reads a connection's information from a request's extensions, where the
/// server put it: tonic's (a gRPC call) or http's (an HTTP request on the
/// same listener) hold the same values.
macro_rules! caller_from {
    ($extensions:expr) => {{
        let extensions = $extensions;
        let unix = extensions
            .get::<GuardedInfo<UdsConnectInfo>>()
            .map(|info| &info.inner)
            .or_else(|| extensions.get::<UdsConnectInfo>());
        let tls = extensions.get::<TlsConnectInfo<GuardedInfo<TcpConnectInfo>>>();
        Caller::from_connection(unix, tls)
    }};
}

impl Caller {
    pub fn of<T>(request: &Request<T>) -> Self {
        caller_from!(request.extensions())
    }

    /// The caller of an HTTP request served on a gRPC listener.
    pub fn from_extensions(extensions: &http::Extensions) -> Self {
        caller_from!(extensions)
    }

    fn from_connection(
        unix: Option<&UdsConnectInfo>,
        tls: Option<&TlsConnectInfo<GuardedInfo<TcpConnectInfo>>>,
    ) -> Self {
        if let Some(cred) = unix.and_then(|info| info.peer_cred) {
            return Caller::Unix {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
            };
        }
        match tls.and_then(|info| info.peer_certs()) {
            Some(certificates) if !certificates.is_empty() => Caller::Tls { certificates },
            _ => Caller::Anonymous,
        }
    }
}

/// The URI and DNS subject alternative names of a DER certificate (none
/// when it cannot be parsed: the TLS layer has verified it already).
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// A caller's groups: the kernel's view (`/proc/PID/status`) when this
/// process can see the caller, which includes groups granted outside the
/// account database (systemd's `SupplementaryGroups=`); otherwise the account
/// database's, through NSS (`getgrouplist`), as when the caller lives in
/// another pid namespace (a container, a sidecar) or `/proc` hides it.
pub fn caller_groups(uid: u32, gid: u32, pid: Option<i32>) -> Vec<u32> {
    pid.filter(|p| *p > 0)
        .and_then(process_groups)
        .unwrap_or_else(|| crate::accounts::account_groups(uid, gid))
}

/// The supplementary groups of a process, from `/proc/PID/status`; `None`
/// when the file cannot be read.
fn process_groups(pid: i32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let groups = status.lines().find_map(|line| line.strip_prefix("Groups:"))?;
    Some(groups.split_whitespace().filter_map(|g| g.parse().ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_shows_its_uri_and_dns_names() {
        let mut params = rcgen::CertificateParams::new(vec!["Agent.Fleet.svc".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::URI("spiffe://fleet.example/agent".try_into().unwrap()));
        let cert = params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
        assert_eq!(
            certificate_names(cert.der()),
            vec!["agent.fleet.svc".to_owned(), "spiffe://fleet.example/agent".to_owned()]
        );
        assert!(certificate_names(b"not a certificate").is_empty());
    }

    #[test]
    fn supplementary_groups_of_this_process() {
        // What the kernel says this process's supplementary groups are.
        let mut expected: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        let mut groups = process_groups(std::process::id() as i32).unwrap();
        expected.sort_unstable();
        groups.sort_unstable();
        assert_eq!(groups, expected);
        assert_eq!(process_groups(-1), None, "no such process");
    }

    #[test]
    fn a_caller_this_process_cannot_see_gets_the_account_database_groups() {
        // pid 0: another pid namespace.
        assert_eq!(caller_groups(0, 0, Some(0)), crate::accounts::account_groups(0, 0));
    }
}
