//! What a caller may do: each environment's allow-lists
//! ([`AccessPolicy`]: Unix users and groups, client certificate names)
//! checked against a [`Caller`] from [`crate::identity`]. By default anyone
//! who can reach a listener (guarded by socket permissions, network policy
//! or mutual TLS); an environment with allow-lists serves only callers they
//! name, and never an anonymous one.

use crate::identity::{Caller, caller_groups, certificate_names};

/// The allow-lists of one environment; empty lists mean "open".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    /// URI or DNS subject alternative names of allowed client certificates.
    pub tls_clients: Vec<String>,
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
            Caller::Unix(peer) => {
                self.uids.contains(&peer.uid)
                    || self.gids.contains(&peer.gid)
                    || (!self.gids.is_empty() && caller_groups(peer).iter().any(|g| self.gids.contains(g)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn policy_table() {
        let me = Caller::Unix(Arc::new(crate::serve::peer::UnixPeer {
            uid: 1000,
            gid: 100,
            pid: Some(4242),
            process: crate::serve::peer::ProcessFacts::Read {
                groups: vec![100, 2000],
                workload: Default::default(),
                exe: None,
            },
        }));
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
            (policy(&[], &[2000], &[]), &me, true),
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
}
