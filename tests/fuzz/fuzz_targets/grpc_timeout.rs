//! The `grpc-timeout` header parser: never a panic, never more than
//! 99,999,999 hours.
#![no_main]

use std::time::Duration;

use flute_token_broker::grpc::parse_grpc_timeout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Some(d) = parse_grpc_timeout(text) {
        assert!(d <= Duration::from_secs(99_999_999 * 3600));
    }
});
