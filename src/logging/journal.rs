//! Log events to the systemd journal through its native protocol
//! (<https://systemd.io/JOURNAL_NATIVE_PROTOCOL/>): one datagram per event
//! with the level as `PRIORITY` and every event and span field as a journal
//! field of its own (`ENVIRONMENT=production`), so `journalctl -p warning`
//! and `journalctl ENVIRONMENT=production` work.
//!
//! `MESSAGE` is the event's message followed by its fields as `key=value`,
//! as the text format writes them, because `journalctl`'s default view shows
//! `MESSAGE` alone (tracing-journald puts only the message there, and a
//! "token request failed" without its error tells an operator nothing).
//!
//! Like every log output here, a datagram the journal does not take is
//! dropped and counted, never fatal.

use std::fmt::{self, Write as _};
use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Where journald receives native-protocol datagrams.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// `SYSLOG_IDENTIFIER` of every entry (what `journalctl -t` selects).
const IDENTIFIER: &str = "flute-token-broker";

/// Whether `journal_stream` (the value of `$JOURNAL_STREAM`, `DEVICE:INODE`)
/// names the file that stderr is, as systemd documents for deciding to
/// switch to the native protocol.
pub fn is_journal_stream(journal_stream: &str, stderr_device: u64, stderr_inode: u64) -> bool {
    let Some((device, inode)) = journal_stream.split_once(':') else {
        return false;
    };
    device.parse() == Ok(stderr_device) && inode.parse() == Ok(stderr_inode)
}

/// Whether this process's stderr is connected to the journal.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    is_journal_stream(&value.to_string_lossy(), stat.st_dev, stat.st_ino)
}

/// A tracing layer that writes each event as one journal entry.
pub struct JournalLayer {
    socket: UnixDatagram,
}

impl JournalLayer {
    /// Connects to the journal's socket (normally [`JOURNAL_SOCKET`]).
    pub fn connect(path: impl AsRef<Path>) -> io::Result<Self> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(path)?;
        Ok(Self { socket })
    }
}

/// A span's fields, kept in its extensions, written into every event inside it.
struct SpanFields(Vec<(&'static str, String)>);

/// Collects an event's or span's fields as text.
struct FieldCollector<'a> {
    message: &'a mut String,
    fields: &'a mut Vec<(&'static str, String)>,
}

impl Visit for FieldCollector<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.fields.push((field.name(), value.to_owned()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.fields.push((field.name(), format!("{value:?}")));
        }
    }
}

impl<S> tracing_subscriber::Layer<S> for JournalLayer
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Vec::new();
        attrs.record(&mut FieldCollector {
            message: &mut String::new(),
            fields: &mut fields,
        });
        span.extensions_mut().insert(SpanFields(fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(SpanFields(fields)) = extensions.get_mut::<SpanFields>() {
            values.record(&mut FieldCollector {
                message: &mut String::new(),
                fields,
            });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut message = String::new();
        let mut fields = Vec::new();
        event.record(&mut FieldCollector {
            message: &mut message,
            fields: &mut fields,
        });
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(span_fields)) = span.extensions().get::<SpanFields>() {
                    fields.extend(span_fields.iter().cloned());
                }
            }
        }
        let entry = encode_entry(*event.metadata().level(), &message, &fields);
        if self.socket.send(&entry).is_err() {
            super::DROPPED_LOG_LINES.inc();
        }
    }
}

/// The journal priority of a level (syslog numbering).
pub fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// One entry in the native protocol: `MESSAGE` (the message and its fields
/// as text), `PRIORITY`, `SYSLOG_IDENTIFIER`, and each field as its own
/// journal field.
pub fn encode_entry(level: Level, message: &str, fields: &[(&'static str, String)]) -> Vec<u8> {
    let mut text = message.to_owned();
    for (name, value) in fields {
        let _ = write!(text, " {name}={}", quoted(value));
    }
    let mut entry = Vec::with_capacity(256);
    put_field(&mut entry, "MESSAGE", &text);
    put_field(&mut entry, "PRIORITY", &priority(level).to_string());
    put_field(&mut entry, "SYSLOG_IDENTIFIER", IDENTIFIER);
    for (name, value) in fields {
        if let Some(name) = field_name(name) {
            put_field(&mut entry, &name, value);
        }
    }
    entry
}

/// A value as the text format shows it: bare, or Debug-quoted when it has
/// spaces, quotes or control characters.
fn quoted(value: &str) -> String {
    if !value.is_empty() && !value.chars().any(|c| c.is_whitespace() || c == '"' || c.is_control()) {
        value.to_owned()
    } else {
        format!("{value:?}")
    }
}

/// Journal field names allowed for our fields: uppercase letters, digits and
/// `_`, not starting with `_` or a digit, at most 64 bytes, and none of the
/// names this module writes itself (such a field gets a `FIELD_` prefix).
fn field_name(name: &str) -> Option<String> {
    let mut upper: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    let reserved = [
        "MESSAGE",
        "PRIORITY",
        "SYSLOG_IDENTIFIER",
        "MESSAGE_ID",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "ERRNO",
    ];
    if upper.starts_with(|c: char| c == '_' || c.is_ascii_digit()) || reserved.contains(&upper.as_str()) {
        upper.insert_str(0, "FIELD_");
    }
    upper.truncate(64);
    (!upper.is_empty()).then_some(upper)
}

/// `NAME=value\n`, or the binary form (`NAME\n`, little-endian u64 length,
/// the bytes, `\n`) for a value with a newline.
fn put_field(entry: &mut Vec<u8>, name: &str, value: &str) {
    entry.extend_from_slice(name.as_bytes());
    if value.contains('\n') {
        entry.push(b'\n');
        entry.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        entry.push(b'=');
    }
    entry.extend_from_slice(value.as_bytes());
    entry.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    /// Parses a native-protocol datagram into its fields, in order.
    fn parse(mut datagram: &[u8]) -> Vec<(String, String)> {
        let mut fields = Vec::new();
        while !datagram.is_empty() {
            let end = datagram.iter().position(|b| *b == b'\n').unwrap();
            let line = &datagram[..end];
            if let Some(eq) = line.iter().position(|b| *b == b'=') {
                fields.push((
                    String::from_utf8(line[..eq].to_vec()).unwrap(),
                    String::from_utf8(line[eq + 1..].to_vec()).unwrap(),
                ));
                datagram = &datagram[end + 1..];
            } else {
                let name = String::from_utf8(line.to_vec()).unwrap();
                let rest = &datagram[end + 1..];
                let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
                fields.push((name, String::from_utf8(rest[8..8 + len].to_vec()).unwrap()));
                assert_eq!(rest[8 + len], b'\n');
                datagram = &rest[9 + len..];
            }
        }
        fields
    }

    fn get<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
        fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn journal_stream_must_name_stderr_itself() {
        assert!(is_journal_stream("8:1234", 8, 1234));
        assert!(!is_journal_stream("8:1234", 8, 1235));
        assert!(!is_journal_stream("9:1234", 8, 1234));
        assert!(!is_journal_stream("", 8, 1234));
        assert!(!is_journal_stream("8-1234", 8, 1234));
        assert!(!is_journal_stream("8:x", 8, 1234));
    }

    #[test]
    fn events_reach_the_journal_with_their_priority_and_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.socket");
        let journal = UnixDatagram::bind(&path).unwrap();
        let layer = JournalLayer::connect(&path).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("token_source", environment = "production");
            let _entered = span.enter();
            tracing::error!(error = "invalid_client: bad key", "token request failed");
            tracing::warn!(keys = "refresh.ratio", "these settings changed");
            tracing::info!(soft = 20000u64, "open-file limit");
            tracing::debug!(detail = "line one\nline two", "multi-line");
        });
        let mut buf = vec![0; 65536];
        let mut entries = Vec::new();
        for _ in 0..4 {
            let n = journal.recv(&mut buf).unwrap();
            entries.push(parse(&buf[..n]));
        }
        let error = &entries[0];
        assert_eq!(get(error, "PRIORITY"), Some("3"));
        assert_eq!(
            get(error, "MESSAGE"),
            Some("token request failed error=\"invalid_client: bad key\" environment=production")
        );
        assert_eq!(get(error, "ERROR"), Some("invalid_client: bad key"));
        assert_eq!(get(error, "ENVIRONMENT"), Some("production"));
        assert_eq!(get(error, "SYSLOG_IDENTIFIER"), Some("flute-token-broker"));
        assert_eq!(get(&entries[1], "PRIORITY"), Some("4"));
        assert_eq!(get(&entries[2], "PRIORITY"), Some("6"));
        assert_eq!(get(&entries[2], "SOFT"), Some("20000"));
        assert_eq!(get(&entries[3], "PRIORITY"), Some("7"));
        assert_eq!(get(&entries[3], "DETAIL"), Some("line one\nline two"));
    }

    #[test]
    fn field_names_are_valid_journal_names_and_never_ours() {
        assert_eq!(field_name("token_id").as_deref(), Some("TOKEN_ID"));
        assert_eq!(field_name("http.method").as_deref(), Some("HTTP_METHOD"));
        assert_eq!(field_name("priority").as_deref(), Some("FIELD_PRIORITY"));
        assert_eq!(field_name("_private").as_deref(), Some("FIELD__PRIVATE"));
        assert_eq!(field_name("2fa").as_deref(), Some("FIELD_2FA"));
        assert_eq!(field_name(&"x".repeat(80)).map(|n| n.len()), Some(64));
    }

    #[test]
    fn a_journal_that_is_gone_drops_the_line_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.socket");
        let journal = UnixDatagram::bind(&path).unwrap();
        let layer = JournalLayer::connect(&path).unwrap();
        drop(journal);
        let before = super::super::DROPPED_LOG_LINES.get();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || tracing::warn!("nobody reads this"));
        assert!(super::super::DROPPED_LOG_LINES.get() > before);
    }
}
