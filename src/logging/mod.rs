//! Log output: tracing to the systemd journal when stderr is the journal
//! (native protocol, [`journal`]), else to stderr as text on a terminal and
//! JSON otherwise (or as configured), level from RUST_LOG or the
//! configuration. Nothing secret is ever logged: events carry token_id,
//! never a token.
//!
//! Output is never fatal: a log line that cannot be written (stderr on a
//! full disk, a log pipe whose reader went away) is dropped and counted in
//! [`DROPPED_LOG_LINES`]; Rust already ignores SIGPIPE, so a closed pipe is
//! an error we see, not a signal that ends the process.

use std::fmt::Display;
use std::io::{IsTerminal, Write};

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub mod journal;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum LogFormat {
    /// The journal when stderr is the journal (`$JOURNAL_STREAM` names
    /// it), else text on a terminal and JSON otherwise.
    #[default]
    Auto,
    Text,
    Json,
    /// The journal's native protocol, level as `PRIORITY`, fields as
    /// journal fields.
    Journal,
}

crate::named_choices!(LogFormat {
    Auto => "auto",
    Text => "text",
    Json => "json",
    Journal => "journal",
});

impl LogFormat {
    /// What `auto` stands for in this process.
    fn resolve(self) -> LogFormat {
        match self {
            LogFormat::Auto if journal::stderr_is_journal() => LogFormat::Journal,
            LogFormat::Auto if std::io::stderr().is_terminal() => LogFormat::Text,
            LogFormat::Auto => LogFormat::Json,
            other => other,
        }
    }
}

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

pub use crate::metrics::DROPPED_LOG_LINES;

/// Installs the global subscriber; later calls are ignored. A journal that
/// cannot be reached falls back to JSON on stderr, and says so.
pub fn init(config: &LogConfig) {
    let _ = init_with_traces(config, None);
}

/// [`init`], with spans exported over OTLP when `telemetry` is on; what
/// keeps the exporter running, or why it cannot start.
pub fn init_with_traces(
    config: &LogConfig,
    telemetry: Option<&crate::telemetry::TelemetryConfig>,
) -> Result<Option<crate::telemetry::Tracing>, String> {
    use tracing_subscriber::Layer;
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    // The broker's own spans go to the exporter whatever the log level.
    let (traces, tracing) = match telemetry.filter(|t| t.is_enabled()) {
        Some(t) => {
            let (layer, tracing) = crate::telemetry::layer::<tracing_subscriber::Registry>(t)?;
            let ours =
                tracing_subscriber::filter::Targets::new().with_target("flute_token_broker", tracing::Level::INFO);
            (Some(layer.with_filter(ours)), Some(tracing))
        }
        None => (None, None),
    };
    let mut format = config.format.resolve();
    let mut journal_problem = None;
    if format == LogFormat::Journal {
        match journal::JournalLayer::connect(journal::JOURNAL_SOCKET) {
            Ok(layer) => {
                let _ = tracing_subscriber::registry()
                    .with(traces)
                    .with(layer.with_filter(filter()))
                    .try_init();
                return Ok(tracing);
            }
            Err(e) => {
                journal_problem = Some(e);
                format = LogFormat::Json;
            }
        }
    }
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(LossyStderr)
        // Its fallback for a failed write is eprintln!, which panics.
        .log_internal_errors(false);
    let registry = tracing_subscriber::registry().with(traces);
    let _ = if format == LogFormat::Json {
        registry
            .with(
                lines
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_filter(filter()),
            )
            .try_init()
    } else {
        registry
            .with(lines.with_ansi(std::io::stderr().is_terminal()).with_filter(filter()))
            .try_init()
    };
    if let Some(e) = journal_problem {
        tracing::warn!(socket = journal::JOURNAL_SOCKET, error = %e, "cannot write to the journal; logging JSON to stderr");
    }
    Ok(tracing)
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

/// Prints a problem for people to stderr as `error: TEXT`. When stderr is
/// the journal, each line starts with the syslog priority prefix `<3>`,
/// which journald turns into the entry's priority (`SyslogLevelPrefix=`, on
/// by default), so `journalctl -p err` shows why a start or reload failed.
pub fn error_to_stderr(text: impl Display) {
    let text = format!("error: {text}");
    if journal::stderr_is_journal() {
        to_stderr(with_priority_prefix(3, &text));
    } else {
        to_stderr(text);
    }
}

/// Every line of `text` prefixed with `<PRIORITY>`.
fn with_priority_prefix(priority: u8, text: &str) -> String {
    text.lines()
        .map(|line| format!("<{priority}>{line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Prints to stdout without a trailing newline; `Err` when it cannot be
/// written (unlike `print!`, which panics).
pub fn to_stdout(text: impl Display) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    write!(out, "{text}")?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_of_a_problem_carries_its_priority() {
        assert_eq!(
            with_priority_prefix(3, "error: invalid configuration:\n  - refresh.ratio: out of range"),
            "<3>error: invalid configuration:\n<3>  - refresh.ratio: out of range"
        );
    }

    #[test]
    fn log_formats_have_names() {
        for (name, format) in [
            ("auto", LogFormat::Auto),
            ("text", LogFormat::Text),
            ("json", LogFormat::Json),
            ("journal", LogFormat::Journal),
        ] {
            assert_eq!(LogFormat::try_from(name.to_owned()), Ok(format));
        }
    }
}
