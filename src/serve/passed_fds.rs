//! The file descriptors systemd passed to this process (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`), read once and handed out by kind: listening sockets
//! to the listeners ([`Inherited`]), the `tokens` memfd to the token store.
//! Nothing else reads those variables, so no reader depends on running
//! before another.

use std::os::fd::RawFd;
use std::path::Path;

use super::listen::{Inherited, InheritedSocket, ListenError};

/// `FileDescriptorName=` (or `FDNAME=` at `FDSTORE=1`) of the tokens kept
/// across a restart: not a socket.
pub const TOKEN_STORE_NAME: &str = "tokens";

/// Everything systemd passed, sorted by kind.
pub struct PassedFds {
    /// Listening sockets, matched later to the configured addresses.
    pub sockets: Inherited,
    /// The memfd of the tokens kept across a restart, if systemd kept one.
    pub token_store: Option<PassedFile>,
}

/// A passed descriptor that is a plain file, opened by number.
#[derive(Clone, Copy, Debug)]
pub struct PassedFile {
    fd: RawFd,
}

impl PassedFile {
    /// A new open file description of the same file, through
    /// `/proc/self/fd` (safe code; the inherited descriptor stays unused).
    pub fn open(&self) -> std::io::Result<std::fs::File> {
        std::fs::File::open(format!("/proc/self/fd/{}", self.fd))
    }
}

impl PassedFds {
    /// Reads what systemd passed to this process, if anything (`LISTEN_PID`
    /// must name it); the variables are consumed, so a child never sees them.
    pub fn from_env() -> Result<Self, ListenError> {
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .map(|n| n.split(':').map(str::to_owned).collect())
            .unwrap_or_default();
        let mut fds = listenfd::ListenFd::from_env();
        let mut sockets = Vec::new();
        let mut token_store = None;
        for index in 0..fds.len() {
            let name = names.get(index).cloned();
            let problem = |message: String| ListenError::Inherited {
                index,
                name: name.clone(),
                message,
            };
            if name.as_deref() == Some(TOKEN_STORE_NAME) {
                if let Ok(Some(fd)) = fds.take_raw_fd(index) {
                    token_store = Some(PassedFile { fd });
                }
                continue;
            }
            let socket = if let Ok(Some(tcp)) = fds.take_tcp_listener(index) {
                InheritedSocket::Tcp(tcp)
            } else {
                match fds.take_unix_listener(index) {
                    Ok(Some(unix)) => {
                        let path = unix
                            .local_addr()
                            .ok()
                            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
                            .ok_or_else(|| problem("a Unix socket without a path (abstract or unnamed)".into()))?;
                        InheritedSocket::Unix(unix, path)
                    }
                    Ok(None) => continue,
                    Err(e) => return Err(problem(format!("not a listening stream socket: {e}"))),
                }
            };
            sockets.push((name, socket));
        }
        Ok(Self {
            sockets: Inherited::new(sockets),
            token_store,
        })
    }

    /// Nothing passed (tests, or a start without systemd).
    pub fn none() -> Self {
        Self {
            sockets: Inherited::new(Vec::new()),
            token_store: None,
        }
    }
}
