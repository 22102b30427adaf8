//! The success-body parser: any bytes, any status; never a panic, and an
//! error never quotes the body (it may hold a token).
#![no_main]

use flute_token_broker::oauth::{LifetimeBounds, parse_token_response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let status = 200 + u16::from(data.first().copied().unwrap_or(0) % 100);
    let body = data.get(1..).unwrap_or_default();
    match parse_token_response(status, body, &LifetimeBounds::default()) {
        Ok(response) => {
            let bounds = LifetimeBounds::default();
            assert!(response.lifetime >= bounds.min && response.lifetime <= bounds.max);
            assert_eq!(response.token_type, "Bearer");
        }
        Err(error) => {
            let shown = format!("{error} {error:?}");
            // A long body never reaches the message.
            assert!(shown.len() < 400, "{} bytes of message", shown.len());
        }
    }
});
