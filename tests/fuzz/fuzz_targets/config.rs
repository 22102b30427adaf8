//! The configuration loader: any TOML text (no environment overrides).
//! Never a panic; an invalid file gets at least one problem, each one line.
#![no_main]

use std::collections::HashMap;

use flute_token_broker::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match Config::from_toml_str(text, HashMap::new()) {
        Ok(loaded) => {
            let _ = loaded.config.to_toml();
        }
        Err(error) => {
            assert!(!error.problems.is_empty());
        }
    }
});
