//! Serde helpers the settings types share, for values whose file form and
//! environment-override form differ: lists (a TOML array, or a
//! comma-separated string from `FLUTE_BROKER__…`) and octal file modes
//! (`"0660"` or TOML `0o660`). Durations are in [`crate::duration`].

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;

/// A list of strings: an array, or one comma-separated string.
pub fn strings<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct Strings;

    impl<'de> Visitor<'de> for Strings {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list, or a comma-separated string")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Vec<String>, E> {
            Ok(text
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                items.push(item);
            }
            Ok(items)
        }
    }

    deserializer.deserialize_any(Strings)
}

/// A list whose items are parsed by `parse`; the first bad item is the error.
pub fn parsed_list<'de, D, T>(deserializer: D, parse: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
{
    strings(deserializer)?
        .iter()
        .map(|item| parse(item).map_err(de::Error::custom))
        .collect()
}

/// Serializes a list as an array of its items' text.
pub fn write_list<S: Serializer, T: fmt::Display>(items: &[T], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(items.iter().map(ToString::to_string))
}

/// File permission bits, written as an octal string.
pub mod octal_mode {
    use super::*;

    struct Mode;

    impl Visitor<'_> for Mode {
        type Value = u32;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an octal mode such as \"0660\"")
        }

        fn visit_u64<E: de::Error>(self, mode: u64) -> Result<u32, E> {
            u32::try_from(mode)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| E::custom("expected an octal mode such as \"0660\""))
        }

        fn visit_i64<E: de::Error>(self, mode: i64) -> Result<u32, E> {
            self.visit_u64(u64::try_from(mode).map_err(|_| E::custom("expected an octal mode such as \"0660\""))?)
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<u32, E> {
            let digits = text.trim().trim_start_matches("0o");
            let mode =
                u32::from_str_radix(digits, 8).map_err(|_| E::custom("expected an octal mode such as \"0660\""))?;
            self.visit_u64(u64::from(mode))
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
        deserializer.deserialize_any(Mode)
    }

    pub fn serialize<S: Serializer>(mode: &u32, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{mode:04o}"))
    }
}

/// Gives a fieldless enum its names in the configuration: `as_str`,
/// `FromStr` and the conversions for `#[serde(try_from = "String", into =
/// "&'static str")]`, with an error that lists every accepted name.
#[macro_export]
macro_rules! named_choices {
    ($type:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $type {
            /// Every accepted name.
            pub const NAMES: &'static [&'static str] = &[$($name),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($type::$variant => $name),+
                }
            }
        }

        impl std::str::FromStr for $type {
            type Err = String;
            fn from_str(text: &str) -> Result<Self, String> {
                match text {
                    $($name => Ok($type::$variant),)+
                    other => Err(format!("{other:?}: expected {}", Self::NAMES.join(", "))),
                }
            }
        }

        impl TryFrom<String> for $type {
            type Error = String;
            fn try_from(text: String) -> Result<Self, String> {
                text.parse()
            }
        }

        impl From<$type> for &'static str {
            fn from(value: $type) -> &'static str {
                value.as_str()
            }
        }
    };
}
