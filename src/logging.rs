//! Log output: tracing to stderr, text on a terminal and JSON otherwise
//! (or as configured), level from RUST_LOG or the configuration. Nothing
//! secret is ever logged: events carry token_id, never a token.
//!
//! Output is never fatal: a log line that cannot be written (stderr on a
//! full disk, a log pipe whose reader went away) is dropped and counted in
//! [`DROPPED_LOG_LINES`]; Rust already ignores SIGPIPE, so a closed pipe is
//! an error we see, not a signal that ends the process.

use std::fmt::Display;
use std::io::{IsTerminal, Write};
use std::sync::LazyLock;

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    #[default]
    Auto,
    Text,
    Json,
}

crate::named_choices!(LogFormat {
    Auto => "auto",
    Text => "text",
    Json => "json",
});

/// `[log]`: the log settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter (`info`, `flute_token_broker=debug`); RUST_LOG wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            level: "info".into(),
        }
    }
}

impl LogConfig {
    /// Problems with the values, each starting with its key.
    pub fn problems(&self) -> Vec<String> {
        match EnvFilter::try_new(&self.level) {
            Ok(_) => Vec::new(),
            Err(e) => vec![format!("level: {:?}: {e}", self.level)],
        }
    }
}

/// Log lines dropped because stderr could not take them (exported as
/// `flute_broker_log_lines_dropped_total`).
pub static DROPPED_LOG_LINES: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Installs the global subscriber; later calls are ignored.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let json = match config.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LossyStderr)
        // Its fallback for a failed write is eprintln!, which panics.
        .log_internal_errors(false);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).try_init()
    };
}

/// stderr for log lines: a failed write drops the line and counts it.
struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::io::stderr().lock().write_all(buf).is_err() {
            DROPPED_LOG_LINES.inc();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LossyStderr {
    type Writer = LossyStderr;
    fn make_writer(&'a self) -> Self::Writer {
        LossyStderr
    }
}

/// Prints a message for people to stderr; a failed write is ignored
/// (unlike `eprintln!`, which panics).
pub fn to_stderr(text: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Prints to stdout without a trailing newline; `Err` when it cannot be
/// written (unlike `print!`, which panics).
pub fn to_stdout(text: impl Display) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    write!(out, "{text}")?;
    out.flush()
}
