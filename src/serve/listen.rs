//! The listeners of every face: taken from systemd (socket activation, matched to
//! the configured addresses), or bound here: TCP, and Unix sockets with a
//! configurable mode and group, moved into place with one `rename`. A stale
//! socket file left by a crashed run is replaced at once; a socket another
//! broker still serves is taken over when this one is ready (the handover
//! of a rolling update), and each broker removes the path at the end only
//! if it still names its own socket.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
    #[error("cannot listen on unix:{}: the path exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot set up unix:{}: {message}", path.display())]
    Setup { path: PathBuf, message: String },
    #[error("socket {index} passed by systemd (LISTEN_FDS{}): {message}", name.as_deref().map(|n| format!(", name {n}")).unwrap_or_default())]
    Inherited {
        index: usize,
        name: Option<String>,
        message: String,
    },
    #[error("systemd passed sockets that server.listen does not name: {}; add them to server.listen or remove them from the socket unit", .0.join(", "))]
    Unmatched(Vec<String>),
}

impl ListenError {
    /// Sockets that do not match the configuration are a configuration problem.
    pub fn is_configuration(&self) -> bool {
        matches!(self, ListenError::Unmatched(_) | ListenError::NotASocket(_))
    }
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
    Unix(UnixListener, Arc<SocketFile>),
}

impl Bound {
    /// The address actually bound (a TCP port of 0 resolved).
    pub fn addr(&self) -> ListenAddr {
        match self {
            Bound::Tcp(l) => ListenAddr::Tcp(l.local_addr().expect("bound socket has an address")),
            Bound::Unix(_, file) => ListenAddr::Unix(file.path.clone()),
        }
    }
}

/// The file a Unix listener is reached through, and what may be done to it.
///
/// A socket the broker bound itself is created under a temporary name in
/// the same directory, given its mode and group, and only then renamed over
/// the configured path, so a caller never finds a half-set-up socket. When
/// another broker still serves the path, the rename waits until this one is
/// ready ([`SocketFile::publish`]): that is the handover. At the end the
/// path is removed only if it still names this socket (device and inode),
/// never a successor's. A socket inherited from systemd is neither changed
/// nor removed: systemd owns it.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// `None` for an inherited socket.
    own: Option<OwnSocket>,
}

#[derive(Debug)]
struct OwnSocket {
    device: u64,
    inode: u64,
    /// The temporary name, until the socket is moved over `path`.
    pending: Mutex<Option<PathBuf>>,
}

impl SocketFile {
    /// The configured path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this socket waits for [`SocketFile::publish`] to take over the path.
    pub fn is_pending(&self) -> bool {
        self.own.as_ref().is_some_and(|own| lock(&own.pending).is_some())
    }

    /// Moves the socket over the configured path (one `rename`: a caller
    /// finds the old broker's socket or this one, never none). Does nothing
    /// if it is there already.
    pub fn publish(&self) -> io::Result<()> {
        let Some(own) = &self.own else { return Ok(()) };
        let mut pending = lock(&own.pending);
        if let Some(temporary) = pending.as_ref() {
            std::fs::rename(temporary, &self.path)?;
            *pending = None;
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Device and inode of the file at `path` (not following a symlink).
fn identity(path: &Path) -> io::Result<(u64, u64)> {
    let meta = std::fs::symlink_metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let Some(own) = &self.own else { return };
        if let Some(temporary) = lock(&own.pending).take() {
            let _ = std::fs::remove_file(temporary);
            return;
        }
        // A successor may have moved its own socket over the path: leave it.
        if identity(&self.path).is_ok_and(|id| id == (own.device, own.inode)) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Listening sockets passed by systemd (`LISTEN_FDS`, socket activation;
/// read by [`super::passed_fds`]), each matched to the configured address
/// it is bound to.
pub struct Inherited {
    sockets: Vec<(Option<String>, InheritedSocket)>,
}

pub(super) enum InheritedSocket {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

impl InheritedSocket {
    fn addr(&self) -> ListenAddr {
        match self {
            InheritedSocket::Tcp(l) => {
                ListenAddr::Tcp(l.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))))
            }
            InheritedSocket::Unix(_, path) => ListenAddr::Unix(path.clone()),
        }
    }
}

impl Inherited {
    pub(super) fn new(sockets: Vec<(Option<String>, InheritedSocket)>) -> Self {
        Self { sockets }
    }

    /// The inherited socket bound to `addr`, ready to serve. A configured
    /// `0.0.0.0:PORT` or `[::]:PORT` matches any unspecified address on
    /// that port (systemd's `ListenStream=PORT` binds `[::]`).
    pub fn take(&mut self, addr: &ListenAddr) -> Result<Option<Bound>, ListenError> {
        let matches = |socket: &InheritedSocket| match (addr, socket.addr()) {
            (ListenAddr::Unix(want), ListenAddr::Unix(have)) => *want == have,
            (ListenAddr::Tcp(want), ListenAddr::Tcp(have)) => {
                want == &have
                    || (want.port() == have.port() && want.ip().is_unspecified() && have.ip().is_unspecified())
            }
            _ => false,
        };
        let Some(at) = self.sockets.iter().position(|(_, s)| matches(s)) else {
            return Ok(None);
        };
        let (name, socket) = self.sockets.remove(at);
        let setup = |e: io::Error| ListenError::Inherited {
            index: at,
            name: name.clone(),
            message: e.to_string(),
        };
        Ok(Some(match socket {
            InheritedSocket::Tcp(l) => {
                l.set_nonblocking(true).map_err(setup)?;
                Bound::Tcp(TcpListener::from_std(l).map_err(setup)?)
            }
            InheritedSocket::Unix(l, path) => {
                l.set_nonblocking(true).map_err(setup)?;
                let file = SocketFile { path, own: None };
                Bound::Unix(UnixListener::from_std(l).map_err(setup)?, Arc::new(file))
            }
        }))
    }

    /// Fails if systemd passed a socket no configured address took: its
    /// callers would wait in its backlog forever.
    pub fn finish(self) -> Result<(), ListenError> {
        if self.sockets.is_empty() {
            return Ok(());
        }
        Err(ListenError::Unmatched(
            self.sockets.iter().map(|(_, s)| s.addr().to_string()).collect(),
        ))
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

/// Who has the configured path now.
enum PathState {
    Free,
    /// A socket file nobody accepts on (a crashed run's): replaced at once.
    Stale,
    /// A live broker: this one takes the path over once it is ready.
    Served,
}

fn path_state(path: &Path) -> Result<PathState, ListenError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(PathState::Free);
    };
    if !meta.file_type().is_socket() {
        return Err(ListenError::NotASocket(path.into()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Ok(PathState::Served),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(PathState::Stale),
        Err(e) => Err(ListenError::Setup {
            path: path.into(),
            message: format!("cannot probe the existing socket: {e}"),
        }),
    }
}

fn bind_unix(path: &Path, options: &UnixSocketOptions) -> Result<Bound, ListenError> {
    let setup = |message: String| ListenError::Setup {
        path: path.into(),
        message,
    };
    let state = path_state(path)?;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(setup("not a file path".into()));
    };
    let temporary = dir.join(format!(".{}.{}.new", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary).map_err(|source| ListenError::Bind {
        addr: format!("unix:{}", path.display()),
        source,
    })?;
    let file = |device, inode| SocketFile {
        path: path.into(),
        own: Some(OwnSocket {
            device,
            inode,
            pending: Mutex::new(Some(temporary.clone())),
        }),
    };
    // From here on the temporary name is removed again if anything fails.
    let (device, inode) = identity(&temporary).map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        setup(format!("stat: {e}"))
    })?;
    let file = Arc::new(file(device, inode));
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(options.mode))
        .map_err(|e| setup(format!("chmod {:o}: {e}", options.mode)))?;
    if let Some(group) = &options.group {
        let gid = crate::accounts::resolve_group(group).map_err(setup)?;
        std::os::unix::fs::chown(&temporary, None, Some(gid)).map_err(|e| setup(format!("chgrp {group}: {e}")))?;
    }
    match state {
        PathState::Served => {
            tracing::info!(path = %path.display(), "another broker serves this socket; this one takes the path over once it holds its tokens");
        }
        PathState::Stale | PathState::Free => {
            if matches!(state, PathState::Stale) {
                tracing::warn!(path = %path.display(), "replacing a stale socket file");
            }
            file.publish().map_err(|e| setup(format!("rename into place: {e}")))?;
        }
    }
    Ok(Bound::Unix(listener, file))
}
