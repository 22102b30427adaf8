//! The `flute-token-broker` binary: parses the command line and runs it on
//! a tokio runtime. Everything else lives in the library (`cli` for the
//! commands, `exit` for the exit codes).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use flute_token_broker::{cli, logging};

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            logging::to_stderr(format_args!("error: cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    ExitCode::from(runtime.block_on(cli::run(args.command)))
}
