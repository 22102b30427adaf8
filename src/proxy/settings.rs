//! `[environments.<env>.proxy]`: where the authorizing proxy of one
//! environment listens and what it forwards to. Off while `listen` is empty.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::environment::Environment;
use crate::serve::listen::ListenAddr;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Proxy listeners (an array, or a comma-separated string): loopback
    /// TCP addresses or `unix:` paths.
    #[serde(
        serialize_with = "crate::serve::settings::write_listen",
        deserialize_with = "crate::serve::settings::read_listen",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub listen: Vec<ListenAddr>,
    /// The Flute API base; `""`: the environment's
    /// (`https://sandbox.api.flute.com`, `https://api.flute.com`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub api_url: String,
    /// A request body up to this size is kept to send again after an API
    /// 401 (larger ones stream through once, and such a 401 passes through).
    pub replay_limit_bytes: usize,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Longest wait for the API's response head (504 after it).
    #[serde(with = "crate::duration::serde")]
    pub request_timeout: Duration,
    /// Longest pause within a request or response body before it is cut off.
    #[serde(with = "crate::duration::serde")]
    pub idle_timeout: Duration,
    /// For this long after a refresh an API 401 showed not to help (the
    /// new token refused too), 401s for that token or on that route pass
    /// through (`TOKEN_FRESH`) and force no refresh ([`super::rotation`]).
    #[serde(with = "crate::duration::serde")]
    pub fresh_token_age: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            api_url: String::new(),
            replay_limit_bytes: 1024 * 1024,
            max_body_bytes: 16 * 1024 * 1024,
            request_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            fresh_token_age: Duration::from_secs(30),
        }
    }
}

impl ProxyConfig {
    pub fn is_enabled(&self) -> bool {
        !self.listen.is_empty()
    }

    /// The API base this environment's proxy forwards to.
    pub fn api_url(&self, env: Environment) -> &str {
        if self.api_url.is_empty() {
            env.default_api_url()
        } else {
            &self.api_url
        }
    }

    /// Problems with the values, each starting with its key.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(1..=1 << 30).contains(&self.max_body_bytes) {
            out.push("max_body_bytes: must be between 1 and 1073741824".into());
        }
        if self.replay_limit_bytes > self.max_body_bytes {
            out.push("replay_limit_bytes: must not exceed max_body_bytes".into());
        }
        if self.replay_limit_bytes > 64 * 1024 * 1024 {
            out.push("replay_limit_bytes: at most 67108864 (each request in flight may hold this much)".into());
        }
        let secs = Duration::from_secs;
        for (key, value) in [
            ("request_timeout", self.request_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if let Some(p) = crate::duration::out_of_range(value, secs(1), secs(3600)) {
                out.push(format!("{key}: {p}"));
            }
        }
        if let Some(p) = crate::duration::out_of_range(self.fresh_token_age, Duration::ZERO, secs(3600)) {
            out.push(format!("fresh_token_age: {p}"));
        }
        out
    }
}
