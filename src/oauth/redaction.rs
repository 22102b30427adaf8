//! The one gate between text a token endpoint sent and anything the broker
//! shows (logs, Status messages, GetStatus, the CLI). An endpoint, proxy or
//! WAF may echo the request it got, and the request carries the client
//! secret (raw, form-urlencoded, or inside the base64 of a Basic header) and
//! possibly a refresh token. Rather than trying to clean such text, the
//! filter drops it whole: a description that contains any form of any secret
//! of the request is withheld. The check runs on the full text, before any
//! truncation, so a cut cannot split a secret into pieces that survive.

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use secrecy::ExposeSecret;

use super::Grant;
use crate::credentials::ApiKey;

/// Secret substrings at least this long are treated as the secret itself.
const WINDOW: usize = 8;

/// The shortest run of base64 characters worth decoding (one 8-character
/// window of a secret encodes to at least 11 characters).
const MIN_BASE64_RUN: usize = 11;

/// Decides whether text from the token endpoint may be shown.
pub struct SecretFilter {
    secrets: Vec<String>,
}

impl SecretFilter {
    /// A filter for the secrets one request carried: the client secret and,
    /// for a refresh grant, the refresh token.
    pub fn for_request(key: &ApiKey, grant: &Grant) -> Self {
        let mut secrets = vec![key.expose_secret().to_owned()];
        if let Grant::RefreshToken(refresh) = grant {
            secrets.push(refresh.expose_secret().to_owned());
        }
        Self::new(secrets)
    }

    /// A filter for arbitrary secrets (empty ones are ignored).
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        Self {
            secrets: secrets.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    /// `text` if it quotes no secret in any form; `None` otherwise.
    pub fn admit(&self, text: String) -> Option<String> {
        (!self.leaks(&text)).then_some(text)
    }

    /// Whether `text` contains, in any encoding the broker could have sent or
    /// a server could have echoed, a secret or an 8-character piece of one.
    pub fn leaks(&self, text: &str) -> bool {
        if self.secrets.is_empty() {
            return false;
        }
        let mut readings = decoded_readings(text);
        let base64_readings: Vec<String> = readings
            .iter()
            .flat_map(|reading| base64_runs(reading))
            .flat_map(|decoded| decoded_readings(&decoded))
            .collect();
        readings.extend(base64_readings);
        readings
            .iter()
            .any(|reading| self.secrets.iter().any(|s| quotes(reading, s)))
    }
}

/// Whether `text` holds `secret`, or any `WINDOW`-character piece of it.
fn quotes(text: &str, secret: &str) -> bool {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() <= WINDOW {
        return text.contains(secret);
    }
    chars
        .windows(WINDOW)
        .any(|window| text.contains(window.iter().collect::<String>().as_str()))
}

/// The text as written, percent-decoded, form-decoded (`+` is a space), and
/// with backslashes (JSON or shell escaping) removed.
fn decoded_readings(text: &str) -> Vec<String> {
    let percent = percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned();
    let form = percent_encoding::percent_decode_str(&text.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned();
    let unescaped = text.replace('\\', "");
    vec![text.to_owned(), percent, form, unescaped]
}

/// Every maximal run of base64 (standard or URL-safe) characters, decoded at
/// each of the four possible alignments, so that a secret encoded inside a
/// longer value (`id:secret`) or a cut-off encoding is still found.
fn base64_runs(text: &str) -> Vec<String> {
    let engine = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::RequireNone),
    );
    let is_b64 = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '-' | '_');
    let mut decoded = Vec::new();
    for run in text.split(|c: char| !is_b64(c)).filter(|r| r.len() >= MIN_BASE64_RUN) {
        let normalised: String = run
            .chars()
            .map(|c| match c {
                '-' => '+',
                '_' => '/',
                c => c,
            })
            .collect();
        for skip in 0..4 {
            let aligned = &normalised[skip..];
            let usable = aligned.len() - aligned.len() % 4;
            if let Ok(bytes) = engine.decode(&aligned[..usable]) {
                decoded.push(String::from_utf8_lossy(&bytes).into_owned());
            }
        }
    }
    decoded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::basic_authorization;

    const SECRET: &str = "s3cr:et%+/=value-that-is-long";
    const REFRESH: &str = "def50200refreshtokenABCDEFGHIJKLMNOPQRSTUVWXYZ";

    fn filter() -> SecretFilter {
        SecretFilter::new([SECRET.to_owned(), REFRESH.to_owned()])
    }

    fn b64(engine: &impl Engine, s: &str) -> String {
        engine.encode(s)
    }

    #[test]
    fn every_form_of_a_secret_is_caught() {
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
        let form = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let percent =
            |s: &str| percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string();
        let basic = basic_authorization("the-client", SECRET);
        let id_secret = format!("the-client:{SECRET}");
        let forms = [
            SECRET.to_owned(),
            form(SECRET),
            percent(SECRET),
            percent(SECRET).to_lowercase(),
            basic.clone(),
            basic.trim_start_matches("Basic ").to_owned(),
            b64(&STANDARD, &id_secret),
            b64(&URL_SAFE, &id_secret),
            b64(&URL_SAFE_NO_PAD, &id_secret),
            b64(&STANDARD, SECRET),
            b64(&STANDARD_NO_PAD, SECRET),
            b64(&URL_SAFE_NO_PAD, SECRET),
            // A piece of the secret, as a 160-character cut leaves it.
            SECRET[..10].to_owned(),
            SECRET[SECRET.len() - 9..].to_owned(),
            REFRESH.to_owned(),
            form(REFRESH),
            REFRESH[..12].to_owned(),
            b64(&STANDARD, &REFRESH[5..30]),
            // JSON-escaped slashes.
            SECRET.replace('/', "\\/"),
        ];
        for f in &forms {
            let text = format!("request was: grant_type=client_credentials&x={f}&y=1");
            assert!(filter().leaks(&text), "not caught: {f}");
            assert_eq!(filter().admit(text), None);
        }
        // Each form at every offset inside a longer base64 value.
        for prefix in ["", "a", "ab", "abc"] {
            let text = b64(&STANDARD, &format!("{prefix}headers: authorization={SECRET}"));
            assert!(filter().leaks(&text), "offset {prefix:?}");
        }
    }

    #[test]
    fn ordinary_descriptions_pass() {
        for text in [
            "The mandatory 'client_id' parameter is missing.",
            "Client authentication failed",
            "grant_type: The grant_type field is required.",
            "",
            "see https://docs.example/errors/invalid_client",
        ] {
            assert_eq!(filter().admit(text.to_owned()).as_deref(), Some(text));
        }
    }

    #[test]
    fn short_secrets_match_whole() {
        let f = SecretFilter::new(["abc".to_owned(), String::new()]);
        assert!(f.leaks("xxabcxx"));
        assert!(!f.leaks("ab c"));
    }
}
