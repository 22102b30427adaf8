//! Who is calling: a request's connection (and, later, a credential it
//! presents) turned into a [`Caller`], from the peer the serving stack read
//! once per connection ([`crate::serve::peer`]). A Unix-socket peer is
//! known by the kernel's credentials for the connection (SO_PEERCRED) and
//! the connecting process's groups as they were when it connected; a TCP
//! peer with a verified client certificate by the certificate's URI and
//! DNS names; anyone else is anonymous, never a guess.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;

use crate::serve::guard::ConnectionInfo;
use crate::serve::peer::{Peer, ProcessFacts, UnixPeer};

/// What the broker knows about a caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A Unix-socket peer, with the kernel's view of its identity.
    Unix(Arc<UnixPeer>),
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

impl Caller {
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        Self::from_extensions(request.extensions())
    }

    /// The caller of a request, from the connection information the serve
    /// loop put in its extensions (anonymous without it).
    pub fn from_extensions(extensions: &http::Extensions) -> Self {
        match extensions.get::<ConnectionInfo>().map(|info| &info.peer) {
            Some(Peer::Unix(peer)) => Caller::Unix(peer.clone()),
            Some(Peer::Tls {
                certificates: Some(certificates),
                ..
            }) if !certificates.is_empty() => Caller::Tls {
                certificates: certificates.clone(),
            },
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

/// A Unix caller's supplementary groups: the connecting process's as it
/// connected (the kernel's view, which includes groups granted outside the
/// account database, such as systemd's `SupplementaryGroups=`); for a
/// process in another pid namespace (a container, a sidecar), which the
/// broker cannot read, the account database's (NSS `getgrouplist`); none
/// when the connecting process was gone before it could be read.
pub fn caller_groups(peer: &UnixPeer) -> std::borrow::Cow<'_, [u32]> {
    match &peer.process {
        ProcessFacts::Read { groups, .. } => std::borrow::Cow::Borrowed(groups),
        ProcessFacts::NotVisible => std::borrow::Cow::Owned(crate::accounts::account_groups(peer.uid, peer.gid)),
        ProcessFacts::Unknown => std::borrow::Cow::Borrowed(&[]),
    }
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

    fn unix(process: ProcessFacts) -> UnixPeer {
        UnixPeer {
            uid: 0,
            gid: 0,
            pid: Some(1),
            process,
        }
    }

    #[test]
    fn groups_are_the_connecting_process_s_or_the_database_s_or_none() {
        let read = unix(ProcessFacts::Read {
            groups: vec![7, 1600],
            workload: Default::default(),
            exe: None,
        });
        assert_eq!(caller_groups(&read).as_ref(), &[7, 1600]);
        // Another pid namespace: the account database's view.
        let hidden = unix(ProcessFacts::NotVisible);
        assert_eq!(
            caller_groups(&hidden).as_ref(),
            crate::accounts::account_groups(0, 0).as_slice()
        );
        assert!(!caller_groups(&hidden).is_empty(), "root's database groups hold root");
        // Gone before it was read: none, never the database's.
        assert!(caller_groups(&unix(ProcessFacts::Unknown)).is_empty());
    }

    #[test]
    fn a_request_without_connection_information_is_anonymous() {
        assert_eq!(Caller::from_extensions(&http::Extensions::new()), Caller::Anonymous);
    }
}
