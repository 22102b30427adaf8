//! The one name a token has outside the daemon's memory: `token_id`, the
//! first 6 bytes of the access token's SHA-256 in hex. Logs, replies,
//! metrics-free status and the emulator's API echo all use it; the token
//! itself never leaves the request that carries it.

use sha2::{Digest, Sha256};

/// The non-secret fingerprint of an access token.
pub fn token_id(access_token: &str) -> String {
    let digest = Sha256::digest(access_token.as_bytes());
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}
