//! Binding the gRPC listeners: TCP, and Unix sockets with a configurable
//! mode and group. A stale socket file left by a crashed run is replaced; a
//! socket another process still serves is refused.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, UnixListener};

/// Where the gRPC service listens: `HOST:PORT` or `unix:/PATH`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() || !Path::new(path).is_absolute() {
                return Err(format!("{s:?}: a Unix socket path must be absolute (unix:/run/...)"));
            }
            return Ok(ListenAddr::Unix(path.into()));
        }
        let s = s.strip_prefix("http://").unwrap_or(s);
        if let Some(port) = s.strip_prefix("localhost:") {
            let port: u16 = port.parse().map_err(|_| format!("{s:?}: invalid port"))?;
            return Ok(ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        s.parse()
            .map(ListenAddr::Tcp)
            .map_err(|_| format!("{s:?}: expected HOST:PORT (an IP address) or unix:/PATH"))
    }
}

impl TryFrom<String> for ListenAddr {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<ListenAddr> for String {
    fn from(addr: ListenAddr) -> String {
        addr.to_string()
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}{}", if source.kind() == io::ErrorKind::AddrInUse { "; another broker running? choose another --listen" } else { "" })]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on unix:{}: another process is serving on this socket", .0.display())]
    InUse(PathBuf),
    #[error("cannot listen on unix:{}: the path exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot set up unix:{}: {message}", path.display())]
    Setup { path: PathBuf, message: String },
}

/// Ownership and permissions of Unix socket files.
#[derive(Clone, Debug)]
pub struct UnixSocketOptions {
    pub mode: u32,
    pub group: Option<String>,
}

/// A bound listener, ready to serve.
pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, SocketFile),
}

impl Bound {
    /// The address actually bound (a TCP port of 0 resolved).
    pub fn addr(&self) -> ListenAddr {
        match self {
            Bound::Tcp(l) => ListenAddr::Tcp(l.local_addr().expect("bound socket has an address")),
            Bound::Unix(_, file) => ListenAddr::Unix(file.0.clone()),
        }
    }
}

/// Removes the socket file when the listener is done with it.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub async fn bind(addr: &ListenAddr, unix: &UnixSocketOptions) -> Result<Bound, ListenError> {
    match addr {
        ListenAddr::Tcp(a) => {
            let listener = TcpListener::bind(a).await.map_err(|source| ListenError::Bind {
                addr: a.to_string(),
                source,
            })?;
            Ok(Bound::Tcp(listener))
        }
        ListenAddr::Unix(path) => bind_unix(path, unix),
    }
}

fn bind_unix(path: &Path, options: &UnixSocketOptions) -> Result<Bound, ListenError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ListenError::NotASocket(path.into()));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ListenError::InUse(path.into())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::warn!(path = %path.display(), "replacing a stale socket file");
                std::fs::remove_file(path).map_err(|e| ListenError::Setup {
                    path: path.into(),
                    message: format!("cannot remove stale socket: {e}"),
                })?;
            }
            Err(e) => {
                return Err(ListenError::Setup {
                    path: path.into(),
                    message: format!("cannot probe existing socket: {e}"),
                });
            }
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| ListenError::Bind {
        addr: format!("unix:{}", path.display()),
        source,
    })?;
    let file = SocketFile(path.into());
    let setup = |message: String| ListenError::Setup {
        path: path.into(),
        message,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(options.mode))
        .map_err(|e| setup(format!("chmod {:o}: {e}", options.mode)))?;
    if let Some(group) = &options.group {
        let gid = super::access::resolve_group(group).map_err(setup)?;
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| setup(format!("chgrp {group}: {e}")))?;
    }
    Ok(Bound::Unix(listener, file))
}
