//! A token as text: the formats `get` prints, `exec` puts in a command's
//! environment and a `[[sinks]]` file holds. One definition for all three,
//! on the wire form of a token (`pb::Token`).

use crate::Environment;
use crate::wire::pb;

/// How `get` prints the token and a `[[sinks]]` file holds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum TokenFormat {
    /// The bare access token (for `$(...)` in shell scripts).
    #[default]
    Token,
    /// `Authorization: Bearer <token>`.
    Header,
    /// A JSON object with the token and its metadata.
    Json,
    /// `FLUTE_ACCESS_TOKEN=…` and `FLUTE_TOKEN_EXPIRES_AT=…` (RFC 3339), one
    /// per line: for `eval` or an env file.
    Env,
}

crate::named_choices!(TokenFormat {
    Token => "token",
    Header => "header",
    Json => "json",
    Env => "env",
});

/// A protobuf timestamp as RFC 3339, `-` when absent.
pub fn ts(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".into())
}

/// The variables `get --format env` prints and `exec` sets.
pub fn token_env(token: &pb::Token) -> [(&'static str, String); 2] {
    [
        ("FLUTE_ACCESS_TOKEN", token.access_token.clone()),
        ("FLUTE_TOKEN_EXPIRES_AT", ts(&token.expires_at)),
    ]
}

/// A token as `get` prints it and a token file sink holds it.
pub fn render(token: &pb::Token, env: Environment, format: TokenFormat) -> String {
    match format {
        TokenFormat::Token => token.access_token.clone(),
        TokenFormat::Header => format!("Authorization: {} {}", token.token_type, token.access_token),
        TokenFormat::Json => serde_json::json!({
            "access_token": token.access_token,
            "token_type": token.token_type,
            "environment": env.as_str(),
            "token_id": token.token_id,
            "issued_at": ts(&token.issued_at),
            "expires_at": ts(&token.expires_at),
        })
        .to_string(),
        TokenFormat::Env => token_env(token)
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}
