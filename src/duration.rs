//! Human-readable durations (`500ms`, `30s`, `15m`, `1h30m`, or bare
//! seconds) for the command line and the configuration file. Parsing and
//! formatting are humantime's; this module adds bare seconds (a TOML
//! integer, or `"30"` from an environment override) and the serde adaptor
//! the settings types use.

use std::time::Duration;

/// Parses `900s`, `15m`, `1h30m`, `250ms` or a bare number of seconds.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration {text:?}: {e} (expected e.g. \"30s\", \"5m\")"))
}

/// Formats a duration the way [`parse`] reads it back (`1m30s`, `250ms`).
pub fn format(duration: Duration) -> String {
    humantime::format_duration(duration).to_string().replace(' ', "")
}

/// `None` when `value` is within `min..=max`, else the problem.
pub fn out_of_range(value: Duration, min: Duration, max: Duration) -> Option<String> {
    (value < min || value > max)
        .then(|| format!("{} is out of range ({}..{})", format(value), format(min), format(max)))
}

/// Serde adaptor (`#[serde(with = "crate::duration::serde")]`): reads a
/// string through [`parse`] or an integer as seconds, writes [`format`].
pub mod serde {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Deserializer, Visitor};
    use serde::ser::Serializer;

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"30s\" or a number of seconds")
        }

        fn visit_u64<E: de::Error>(self, secs: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(secs))
        }

        fn visit_i64<E: de::Error>(self, secs: i64) -> Result<Duration, E> {
            u64::try_from(secs)
                .map(Duration::from_secs)
                .map_err(|_| E::custom(format!("invalid duration {secs}: must not be negative")))
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            super::parse(text).map_err(E::custom)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format(*duration))
    }

    /// For an `Option<Duration>` field with `#[serde(default)]`: present means `Some`.
    pub fn deserialize_some<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
        deserialize(deserializer).map(Some)
    }

    /// For an `Option<Duration>` field skipped when `None`.
    pub fn serialize_some<S: Serializer>(duration: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
        match duration {
            Some(duration) => serialize(duration, serializer),
            None => serializer.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let cases = [
            ("900", 900_000),
            ("900s", 900_000),
            ("15m", 900_000),
            ("1h30m", 5_400_000),
            ("1h 30m", 5_400_000),
            ("250ms", 250),
            ("1.5s", 1_500),
            ("1d", 86_400_000),
            (" 2s ", 2_000),
        ];
        for (text, millis) in cases {
            assert_eq!(parse(text).unwrap(), Duration::from_millis(millis), "{text}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for text in ["", "s", "10x", "-3s", "soon", "1.5"] {
            assert!(parse(text).is_err(), "{text} should be rejected");
        }
    }

    #[test]
    fn format_round_trips() {
        for millis in [0, 250, 1_000, 61_000, 5_400_000, 3_601_000, 90_500] {
            let d = Duration::from_millis(millis);
            assert_eq!(parse(&format(d)).unwrap(), d);
        }
        assert_eq!(format(Duration::from_secs(90)), "1m30s");
        assert_eq!(format(Duration::ZERO), "0s");
    }

    #[test]
    fn ranges() {
        let s = Duration::from_secs;
        assert_eq!(out_of_range(s(5), s(1), s(10)), None);
        assert_eq!(out_of_range(s(1), s(1), s(10)), None);
        assert_eq!(
            out_of_range(s(600), s(1), s(300)).unwrap(),
            "10m is out of range (1s..5m)"
        );
    }
}
