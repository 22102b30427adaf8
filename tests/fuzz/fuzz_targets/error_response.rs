//! The error parser and the secret filter: any body and headers, any status.
//! Never a panic, and no 8-character piece of the secret ever reaches the
//! error's Display or Debug, however the body encodes it.
#![no_main]

use flute_token_broker::oauth::{SecretFilter, parse_error_response};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz:Secret%Value/42";

fuzz_target!(|data: &[u8]| {
    let status = 400 + u16::from(data.first().copied().unwrap_or(0) % 200);
    let rest = data.get(1..).unwrap_or_default();
    // body \0 WWW-Authenticate \0 Retry-After
    let mut parts = rest.splitn(3, |b| *b == 0);
    let body = parts.next().unwrap_or_default();
    let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
    let (www, retry) = (text(parts.next()), text(parts.next()));
    let filter = SecretFilter::new([SECRET.to_owned()]);
    let error = parse_error_response(status, body, www.as_deref(), retry.as_deref()).into_error(&filter);
    let shown = format!("{error} {error:?}");
    let chars: Vec<char> = SECRET.chars().collect();
    for window in chars.windows(8) {
        let piece: String = window.iter().collect();
        assert!(!shown.contains(&piece), "a piece of the secret leaked: {piece}");
    }
    let _ = (error.class(), error.label(), error.retry_after());
});
