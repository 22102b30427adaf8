//! Who may get tokens for which environment. By default anyone who can
//! reach a listener (guarded by socket permissions, network policy or mutual
//! TLS). An environment with allow-lists serves only Unix-socket callers
//! whose user, primary group or supplementary group is listed: user and
//! primary group as the kernel reports them for the connection (SO_PEERCRED),
//! supplementary groups from `/proc/PID/status` when the caller is visible
//! there, else from the account database (NSS `getgrouplist`). On TCP with
//! mutual TLS, `allowed_tls_clients` lists the client certificates allowed,
//! by URI SAN (a SPIFFE ID, for example) or DNS SAN. A caller with neither
//! kind of identity is refused for an environment with allow-lists.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use tonic::Request;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};

use crate::serve::guard::GuardedInfo;

/// The allow-lists of one environment; empty lists mean "open".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    /// URI or DNS subject alternative names of allowed client certificates.
    pub tls_clients: Vec<String>,
}

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

impl AccessPolicy {
    pub fn is_open(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty() && self.tls_clients.is_empty()
    }

    pub fn allows(&self, caller: &Caller) -> bool {
        if self.is_open() {
            return true;
        }
        match caller {
            Caller::Anonymous => false,
            Caller::Tls { certificates } => {
                let leaf = certificates.first().map(|c| certificate_names(c)).unwrap_or_default();
                leaf.iter().any(|name| {
                    self.tls_clients.iter().any(|allowed| {
                        allowed == name || (!allowed.contains("://") && allowed.eq_ignore_ascii_case(name))
                    })
                })
            }
            Caller::Unix { uid, gid, pid } => {
                self.uids.contains(uid)
                    || self.gids.contains(gid)
                    || (!self.gids.is_empty() && caller_groups(*uid, *gid, *pid).iter().any(|g| self.gids.contains(g)))
            }
        }
    }
}

/// A caller's groups: the kernel's view (`/proc/PID/status`) when this
/// process can see the caller, which includes groups granted outside the
/// account database (systemd's `SupplementaryGroups=`); otherwise the account
/// database's, through NSS (`getgrouplist`), as when the caller lives in
/// another pid namespace (a container, a sidecar) or `/proc` hides it.
fn caller_groups(uid: u32, gid: u32, pid: Option<i32>) -> Vec<u32> {
    pid.filter(|p| *p > 0)
        .and_then(process_groups)
        .unwrap_or_else(|| account_groups(uid, gid))
}

/// The supplementary groups of a process, from `/proc/PID/status`; `None`
/// when the file cannot be read.
fn process_groups(pid: i32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let groups = status.lines().find_map(|line| line.strip_prefix("Groups:"))?;
    Some(groups.split_whitespace().filter_map(|g| g.parse().ok()).collect())
}

/// How long an account's groups are remembered.
const ACCOUNT_GROUPS_TTL: Duration = Duration::from_secs(60);

/// The groups the account database gives `uid` (with `gid`), cached for
/// [`ACCOUNT_GROUPS_TTL`] so that a busy caller costs one NSS lookup a minute.
fn account_groups(uid: u32, gid: u32) -> Vec<u32> {
    type Cache = HashMap<(u32, u32), (Instant, Vec<u32>)>;
    static CACHE: LazyLock<Mutex<Cache>> = LazyLock::new(Mutex::default);
    let now = Instant::now();
    if let Some((at, groups)) = CACHE.lock().unwrap_or_else(|e| e.into_inner()).get(&(uid, gid))
        && now.duration_since(*at) < ACCOUNT_GROUPS_TTL
    {
        return groups.clone();
    }
    let groups = lookup_account_groups(uid, gid);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= 1024 {
        cache.retain(|_, (at, _)| now.duration_since(*at) < ACCOUNT_GROUPS_TTL);
    }
    cache.insert((uid, gid), (now, groups.clone()));
    groups
}

fn lookup_account_groups(uid: u32, gid: u32) -> Vec<u32> {
    use nix::unistd::{Gid, Uid, User, getgrouplist};
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return Vec::new();
    };
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return Vec::new();
    };
    getgrouplist(&name, Gid::from_raw(gid))
        .map(|groups| groups.into_iter().map(Gid::as_raw).collect())
        .unwrap_or_default()
}

/// A user name or a numeric uid. Names are resolved through NSS
/// (`getpwnam_r`): local files, LDAP, sssd, systemd's dynamic users alike.
pub fn resolve_user(user: &str) -> Result<u32, String> {
    if let Ok(uid) = user.parse() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(user) {
        Ok(Some(entry)) => Ok(entry.uid.as_raw()),
        Ok(None) => Err(format!("unknown user {user:?}")),
        Err(e) => Err(format!("cannot look up user {user:?}: {e}")),
    }
}

/// A group name or a numeric gid, resolved as the socket group is.
pub use crate::serve::listen::resolve_group;

/// Serde for `allowed_unix_users`: names or numeric ids, resolved when
/// read (an unknown name is an error), written back as ids.
pub mod user_ids {
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
        crate::settings::parsed_list(deserializer, super::resolve_user)
    }

    pub fn serialize<S: serde::Serializer>(ids: &[u32], serializer: S) -> Result<S::Ok, S::Error> {
        crate::settings::write_list(ids, serializer)
    }
}

/// Serde for `allowed_unix_groups`, as [`user_ids`].
pub mod group_ids {
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
        crate::settings::parsed_list(deserializer, super::resolve_group)
    }

    pub fn serialize<S: serde::Serializer>(ids: &[u32], serializer: S) -> Result<S::Ok, S::Error> {
        crate::settings::write_list(ids, serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_resolve() {
        assert_eq!(resolve_user("0"), Ok(0));
        assert_eq!(resolve_user("root"), Ok(0));
        assert_eq!(resolve_group("root"), Ok(0));
        assert!(resolve_group("no-such-group-here").is_err());
        assert!(resolve_user("no-such-user-here").is_err());
    }

    #[test]
    fn policy_table() {
        let me = Caller::Unix {
            uid: 1000,
            gid: 100,
            pid: None,
        };
        let mut params = rcgen::CertificateParams::new(vec!["agent.fleet.svc".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::URI("spiffe://fleet.example/agent".try_into().unwrap()));
        let cert = params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
        let agent = Caller::Tls {
            certificates: Arc::new(vec![cert.der().clone()]),
        };
        let policy = |uids: &[u32], gids: &[u32], tls: &[&str]| AccessPolicy {
            uids: uids.to_vec(),
            gids: gids.to_vec(),
            tls_clients: tls.iter().map(|s| s.to_string()).collect(),
        };
        let cases = [
            (policy(&[], &[], &[]), &me, true),
            (policy(&[], &[], &[]), &Caller::Anonymous, true),
            (policy(&[], &[], &[]), &agent, true),
            (policy(&[1000], &[], &[]), &me, true),
            (policy(&[1001], &[], &[]), &me, false),
            (policy(&[], &[100], &[]), &me, true),
            (policy(&[], &[7], &[]), &me, false),
            (policy(&[1000], &[], &[]), &Caller::Anonymous, false),
            (policy(&[1000], &[], &[]), &agent, false),
            (policy(&[], &[], &["spiffe://fleet.example/agent"]), &agent, true),
            (policy(&[], &[], &["AGENT.fleet.svc"]), &agent, true),
            (policy(&[], &[], &["spiffe://fleet.example/other"]), &agent, false),
            (policy(&[], &[], &["SPIFFE://fleet.example/agent"]), &agent, false),
            (policy(&[], &[], &["spiffe://fleet.example/agent"]), &me, false),
            (
                policy(&[], &[], &["spiffe://fleet.example/agent"]),
                &Caller::Anonymous,
                false,
            ),
        ];
        for (policy, caller, allowed) in cases {
            assert_eq!(policy.allows(caller), allowed, "{policy:?} {caller:?}");
        }
    }

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
    fn account_groups_come_from_the_account_database() {
        // root's primary group is in its list; an unknown uid has none.
        assert!(account_groups(0, 0).contains(&0));
        assert!(lookup_account_groups(4_000_000_000, 4_000_000_000).is_empty());
        // A caller this process cannot see (pid 0: another pid namespace)
        // gets the database's view.
        assert_eq!(caller_groups(0, 0, Some(0)), account_groups(0, 0));
    }
}
