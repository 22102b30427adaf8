//! The API key (client ID + client secret): where it comes from, how it is
//! kept (redacted in every Debug/Display, zeroized on drop) and how a change
//! of the key on disk is noticed.

use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// Name of the environment variable systemd sets for `LoadCredential=`.
pub const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// A Flute API key. The secret is only reachable through
/// [`ApiKey::expose_secret`], which the OAuth client alone calls.
#[derive(Clone)]
pub struct ApiKey {
    client_id: String,
    client_secret: SecretString,
}

impl ApiKey {
    pub fn new(client_id: impl Into<String>, client_secret: impl Into<String>) -> Result<Self, CredentialsError> {
        let client_id = client_id.into();
        let client_secret: String = client_secret.into();
        if client_id.trim().is_empty() {
            return Err(CredentialsError::Empty("client id"));
        }
        if client_secret.is_empty() {
            return Err(CredentialsError::Empty("client secret"));
        }
        Ok(Self {
            client_id,
            client_secret: SecretString::from(client_secret),
        })
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The client secret, for a [`crate::oauth::TokenEndpoint`] to send.
    /// Nothing else should call this.
    pub fn expose_secret(&self) -> &str {
        self.client_secret.expose_secret()
    }

    /// A digest of id and secret, to tell whether a reloaded key differs.
    /// Never displayed: it would allow offline guessing of weak secrets.
    pub(crate) fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.client_id.as_bytes());
        h.update([0]);
        h.update(self.client_secret.expose_secret().as_bytes());
        h.finalize().into()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .finish()
    }
}

/// Where a value (the client id or the secret) is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueSource {
    /// Given inline in the configuration (allowed for the client id only).
    Inline(String),
    /// A file; surrounding whitespace and a trailing newline are removed.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/NAME`.
    SystemdCredential(String),
}

impl ValueSource {
    fn read(&self, what: &'static str) -> Result<String, CredentialsError> {
        let value = match self {
            ValueSource::Inline(v) => v.clone(),
            ValueSource::File(path) => read_file(what, path)?,
            ValueSource::Env(name) => std::env::var(name).map_err(|_| CredentialsError::EnvMissing {
                what,
                name: name.clone(),
            })?,
            ValueSource::SystemdCredential(name) => {
                let dir = std::env::var_os(CREDENTIALS_DIRECTORY).ok_or(CredentialsError::NoCredentialsDirectory {
                    what,
                    name: name.clone(),
                })?;
                read_file(what, &Path::new(&dir).join(name))?
            }
        };
        let value = value.trim().to_owned();
        if value.is_empty() {
            return Err(CredentialsError::Empty(what));
        }
        Ok(value)
    }

    /// The file this source reads, if any: watched for changes.
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            ValueSource::File(p) => Some(p.clone()),
            ValueSource::SystemdCredential(name) => {
                std::env::var_os(CREDENTIALS_DIRECTORY).map(|d| Path::new(&d).join(name))
            }
            _ => None,
        }
    }
}

/// The largest secret file read: client ids and secrets are short, and a
/// path such as /dev/zero must not exhaust memory.
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Reads a regular file of at most [`MAX_SECRET_FILE_BYTES`] (a FIFO or a
/// device is refused rather than read).
fn read_file(what: &'static str, path: &Path) -> Result<String, CredentialsError> {
    use std::io::Read;
    let fail = |source: std::io::Error| CredentialsError::Read {
        what,
        path: path.to_owned(),
        source,
    };
    let invalid = |message: String| fail(std::io::Error::new(std::io::ErrorKind::InvalidData, message));
    if !std::fs::metadata(path).map_err(fail)?.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(fail)?
        .take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(fail)?;
    if text.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(invalid(format!("larger than {MAX_SECRET_FILE_BYTES} bytes")));
    }
    Ok(text)
}

/// How to obtain one API key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySource {
    pub client_id: ValueSource,
    pub client_secret: ValueSource,
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret: &dyn fmt::Debug = match &self.client_secret {
            ValueSource::Inline(_) => &"Inline([redacted])",
            other => other,
        };
        f.debug_struct("KeySource")
            .field("client_id", &self.client_id)
            .field("client_secret", secret)
            .finish()
    }
}

impl KeySource {
    pub fn load(&self) -> Result<ApiKey, CredentialsError> {
        ApiKey::new(
            self.client_id.read("client id")?,
            self.client_secret.read("client secret")?,
        )
    }

    /// Files whose change means the key may have changed.
    pub fn watched_paths(&self) -> Vec<PathBuf> {
        [&self.client_id, &self.client_secret]
            .into_iter()
            .filter_map(ValueSource::path)
            .collect()
    }

    /// A warning when a secret file can be read by group or others.
    pub fn permission_warnings(&self) -> Vec<String> {
        let Some(path) = self.client_secret.path() else {
            return Vec::new();
        };
        match std::fs::metadata(&path) {
            Ok(meta) => secret_file_exposure(&meta, &process_groups())
                .map(|why| format!("secret file {} {why}", path.display()))
                .into_iter()
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// The groups of this process: its primary and supplementary groups.
fn process_groups() -> Vec<u32> {
    let mut groups: Vec<u32> = nix::unistd::getgroups()
        .unwrap_or_default()
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    groups.push(nix::unistd::getegid().as_raw());
    groups
}

/// Why a secret file is exposed, if it is: readable by others, or by a
/// group this process is not in. A file readable by a group the process
/// belongs to is how Kubernetes (a Secret volume with `fsGroup`, mode 0440)
/// and systemd (`LoadCredential=`) hand over secrets, and is accepted.
pub fn secret_file_exposure(meta: &std::fs::Metadata, process_groups: &[u32]) -> Option<String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return Some(format!(
            "is accessible by group or others (mode {mode:o}: every user can read it); use chmod 600"
        ));
    }
    if mode & 0o070 != 0 && !process_groups.contains(&meta.gid()) {
        return Some(format!(
            "is accessible by group or others (mode {mode:o}, group {}, which the broker is not in); use chmod 600",
            meta.gid()
        ));
    }
    None
}

/// A credentials table as written: `[credentials]` (shared by every
/// environment) or `[environments.NAME.credentials]`. Exactly one source
/// each for the client id and the client secret; [`CredentialTable::key_source`]
/// checks that and builds the [`KeySource`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CredentialTable {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id_credential: Option<String>,
    /// Refused when read from a file; set in memory by dev mode only.
    #[serde(skip_serializing_if = "InlineSecret::is_absent")]
    pub client_secret: InlineSecret,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_credential: Option<String>,
    /// `[credentials]` only: how often credential files are checked for
    /// changes (default [`DEFAULT_POLL_INTERVAL`]; 0 disables).
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::duration::serde::deserialize_some",
        serialize_with = "crate::duration::serde::serialize_some"
    )]
    pub poll_interval: Option<std::time::Duration>,
}

/// How often credential files are checked when `poll_interval` is not set.
pub const DEFAULT_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// A client secret written inline in a credentials table.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum InlineSecret {
    #[default]
    Absent,
    /// The file had one: refused, and its value dropped unread.
    Refused,
    /// A secret generated in memory (dev mode).
    Generated(String),
}

impl InlineSecret {
    fn is_absent(&self) -> bool {
        *self == InlineSecret::Absent
    }
}

impl fmt::Debug for InlineSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InlineSecret::Absent => "Absent",
            InlineSecret::Refused => "Refused",
            InlineSecret::Generated(_) => "Generated([redacted])",
        })
    }
}

impl<'de> serde::Deserialize<'de> for InlineSecret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer)?;
        Ok(InlineSecret::Refused)
    }
}

impl serde::Serialize for InlineSecret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
}

impl CredentialTable {
    /// A table with an inline client id and an in-memory secret (dev mode).
    pub fn generated(client_id: &str, secret: String) -> Self {
        Self {
            client_id: Some(client_id.into()),
            client_secret: InlineSecret::Generated(secret),
            ..Self::default()
        }
    }

    /// The key source this table names: `Ok(None)` when it names none,
    /// otherwise every problem, each starting with its key.
    pub fn key_source(&self) -> Result<Option<KeySource>, Vec<String>> {
        let mut problems = Vec::new();
        let mut one = |what: &str, found: Vec<ValueSource>| -> Option<ValueSource> {
            if found.len() > 1 {
                problems.push(format!(
                    "{what}: give exactly one source (inline, _file, _env or _credential)"
                ));
            }
            found.into_iter().next()
        };
        let client_id = one(
            "client_id",
            [
                self.client_id.clone().map(ValueSource::Inline),
                self.client_id_file.clone().map(ValueSource::File),
                self.client_id_env.clone().map(ValueSource::Env),
                self.client_id_credential.clone().map(ValueSource::SystemdCredential),
            ]
            .into_iter()
            .flatten()
            .collect(),
        );
        let generated = match &self.client_secret {
            InlineSecret::Generated(secret) => Some(ValueSource::Inline(secret.clone())),
            _ => None,
        };
        let client_secret = one(
            "client_secret",
            [
                generated,
                self.client_secret_file.clone().map(ValueSource::File),
                self.client_secret_env.clone().map(ValueSource::Env),
                self.client_secret_credential
                    .clone()
                    .map(ValueSource::SystemdCredential),
            ]
            .into_iter()
            .flatten()
            .collect(),
        );
        if self.client_secret == InlineSecret::Refused {
            problems.push("client_secret: secrets are never written in the configuration: use client_secret_file, client_secret_env or client_secret_credential".into());
        }
        let source = match (client_id, client_secret) {
            (Some(client_id), Some(client_secret)) => Some(KeySource {
                client_id,
                client_secret,
            }),
            (None, None) => None,
            (Some(_), None) => {
                problems.push("client_id: set, but no client secret source is set: add client_secret_file, client_secret_env or client_secret_credential".into());
                None
            }
            (None, Some(_)) => {
                problems.push("client_id: a client secret source is set but no client_id".into());
                None
            }
        };
        if problems.is_empty() { Ok(source) } else { Err(problems) }
    }
}

/// Why a key could not be loaded. Never contains the secret itself.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{0} is empty")]
    Empty(&'static str),
    #[error("cannot read {what} from {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: environment variable {name} is not set")]
    EnvMissing { what: &'static str, name: String },
    #[error("{what}: systemd credential {name:?} requested but ${CREDENTIALS_DIRECTORY} is not set")]
    NoCredentialsDirectory { what: &'static str, name: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_secret() {
        let key = ApiKey::new("client-1", "s3cr3t-value").unwrap();
        let shown = format!("{key:?}");
        assert!(shown.contains("client-1"));
        assert!(!shown.contains("s3cr3t-value"));
    }

    #[test]
    fn inline_secret_sources_are_redacted_in_debug() {
        let src = KeySource {
            client_id: ValueSource::Inline("id".into()),
            client_secret: ValueSource::Inline("dev-secret-xyz".into()),
        };
        assert!(!format!("{src:?}").contains("dev-secret-xyz"));
    }

    #[test]
    fn file_source_trims_newline_and_rejects_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "abc:def\n").unwrap();
        let src = KeySource {
            client_id: ValueSource::Inline("id".into()),
            client_secret: ValueSource::File(path.clone()),
        };
        assert_eq!(src.load().unwrap().expose_secret(), "abc:def");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(src.load(), Err(CredentialsError::Empty("client secret"))));
    }

    #[test]
    fn missing_env_names_the_variable_not_a_value() {
        let src = KeySource {
            client_id: ValueSource::Inline("id".into()),
            client_secret: ValueSource::Env("FLUTE_TEST_SURELY_UNSET_VAR".into()),
        };
        let err = src.load().unwrap_err().to_string();
        assert!(err.contains("FLUTE_TEST_SURELY_UNSET_VAR"), "{err}");
    }

    #[test]
    fn digest_changes_with_the_secret() {
        let a = ApiKey::new("id", "one").unwrap();
        let b = ApiKey::new("id", "two").unwrap();
        assert_ne!(a.digest(), b.digest());
        assert_eq!(a.digest(), a.clone().digest());
    }
}
