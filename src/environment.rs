//! The two Flute environments. Tokens are not interchangeable between them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A Flute environment; each has its own token endpoint and its own tokens.
/// As a command-line value it completes in shells and takes `prod` too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Sandbox,
    #[value(alias = "prod")]
    Production,
}

impl Environment {
    pub const ALL: [Environment; 2] = [Environment::Sandbox, Environment::Production];

    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Sandbox => "sandbox",
            Environment::Production => "production",
        }
    }

    /// The name of this environment's proxy face in logs and metrics.
    pub fn proxy_face_name(self) -> &'static str {
        match self {
            Environment::Sandbox => "proxy-sandbox",
            Environment::Production => "proxy-production",
        }
    }

    /// Flute's API base for this environment (what the proxy forwards to).
    pub fn default_api_url(self) -> &'static str {
        match self {
            Environment::Sandbox => "https://sandbox.api.flute.com",
            Environment::Production => "https://api.flute.com",
        }
    }

    /// Flute's real token endpoint for this environment.
    pub fn default_token_url(self) -> &'static str {
        match self {
            Environment::Sandbox => "https://sandbox.oauth.api.flute.com/oauth2/token",
            Environment::Production => "https://oauth.api.flute.com/oauth2/token",
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Environment {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "sandbox" => Ok(Environment::Sandbox),
            "production" | "prod" => Ok(Environment::Production),
            _ => Err(format!("unknown environment {s:?} (expected sandbox or production)")),
        }
    }
}
