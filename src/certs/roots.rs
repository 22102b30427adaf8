//! CA bundles from PEM files that rotate in place: the hubs' CA of an agent
//! (`[upstream] ca_file`, through [`super::client`]) and the token
//! endpoints' roots (`[oauth] tls_roots = "/path"`), verified through
//! [`RotatingRoots`], which every client built from them shares.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::material::{self, CertificateInfo, MaterialError};
use super::{InUse, Reloadable};
use crate::tls_roots::RotatingRoots;

/// A CA bundle file and the verifier its clients use.
pub struct Authority {
    path: PathBuf,
    roots: Arc<RotatingRoots>,
    /// The bundle's earliest expiry.
    earliest: RwLock<CertificateInfo>,
}

impl Authority {
    /// Reads and checks the bundle.
    pub fn load(path: &Path) -> Result<Self, MaterialError> {
        let (certs, earliest) = material::authorities(path)?;
        let roots = RotatingRoots::new(&certs).map_err(|reason| MaterialError {
            path: path.to_owned(),
            reason,
        })?;
        Ok(Self {
            path: path.to_owned(),
            roots,
            earliest: RwLock::new(earliest),
        })
    }

    /// Verifies an existing verifier's bundle from now on (token-endpoint
    /// roots are loaded with the rest of `[oauth]`).
    pub fn adopt(path: &Path, roots: Arc<RotatingRoots>) -> Result<Self, MaterialError> {
        let (_, earliest) = material::authorities(path)?;
        Ok(Self {
            path: path.to_owned(),
            roots,
            earliest: RwLock::new(earliest),
        })
    }

    pub fn verifier(&self) -> Arc<RotatingRoots> {
        self.roots.clone()
    }

    pub fn certificate(&self) -> CertificateInfo {
        self.earliest.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the file again and verifies with it from the next handshake.
    pub fn reload(&self) -> Result<(), MaterialError> {
        let (certs, earliest) = material::authorities(&self.path)?;
        self.roots.replace(&certs).map_err(|reason| MaterialError {
            path: self.path.clone(),
            reason,
        })?;
        *self.earliest.write().unwrap_or_else(|p| p.into_inner()) = earliest;
        Ok(())
    }
}

/// `[oauth] tls_roots = "/path"`: the token endpoints' (and the proxy's
/// API) roots, reloaded when the file changes.
pub struct TokenEndpointRoots(pub Authority);

impl Reloadable for TokenEndpointRoots {
    fn name(&self) -> &'static str {
        "token_endpoint_roots"
    }

    fn files(&self) -> Vec<PathBuf> {
        vec![self.0.path.clone()]
    }

    fn reload(&self) -> Result<Vec<InUse>, MaterialError> {
        self.0.reload()?;
        Ok(self.in_use())
    }

    fn in_use(&self) -> Vec<InUse> {
        vec![InUse {
            role: "token_endpoint_roots",
            certificate: self.0.certificate(),
        }]
    }
}
