//! Who is at the other end of a connection, as the transport can tell: a
//! [`Peer`], read once per connection when its serve task starts, and put
//! in every request's extensions with the connection's information
//! ([`super::guard::ConnectionInfo`]). Faces never see tonic's connect-info
//! types; [`crate::identity`] turns a peer into a caller.
//!
//! A Unix-socket peer is the kernel's record of the connecting process
//! (SO_PEERCRED: uid, gid and pid at `connect()`), and what that process
//! was at that moment: its supplementary groups (`/proc/PID/status`), its
//! cgroup (`/proc/PID/cgroup`, read as its systemd unit or Kubernetes pod
//! and container by [`crate::cgroup`]) and its executable. These are read once and
//! only kept when they provably belong to the process that connected: the
//! kernel's pidfd of the peer (SO_PEERPIDFD, Linux 6.5+) still names that
//! PID after the reads (a PID is not reused before its process is reaped,
//! and the pidfd sees the reaping); without a pidfd, the process's start
//! time is the same before and after the reads and not later than the
//! accept. A connecting process that exited, or a PID now used by another
//! process, leaves those facts [`ProcessFacts::Unknown`]: never read from
//! whoever holds the PID later, and never from the account database.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use tokio::net::{TcpStream, UnixStream};

use crate::cgroup::Workload;

/// The other end of one connection.
#[derive(Clone, Debug)]
pub enum Peer {
    /// A Unix-socket peer whose kernel credentials could be read.
    Unix(Arc<UnixPeer>),
    /// A TCP peer without TLS.
    Tcp { remote: Option<SocketAddr> },
    /// A TCP peer over TLS, with the client certificate chain it presented
    /// (verified by the TLS layer against `client_ca_file`), if any.
    Tls {
        remote: Option<SocketAddr>,
        certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
    },
    /// Nothing could be read (a Unix socket without credentials).
    Unknown,
}

/// A Unix-socket peer: the kernel's credentials for the connection, and
/// the connecting process's facts, read once at connection time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixPeer {
    pub uid: u32,
    pub gid: u32,
    /// The connecting process in this process's pid namespace (`None`:
    /// not visible here, as from another container).
    pub pid: Option<i32>,
    pub process: ProcessFacts,
}

/// What the connecting process was when it connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessFacts {
    /// Read from the connecting process itself, and proven to be its.
    Read {
        /// Supplementary groups (the kernel's view: systemd's
        /// `SupplementaryGroups=` included).
        groups: Vec<u32>,
        /// What its cgroup (`/proc/PID/cgroup`) says: its systemd unit, or
        /// its Kubernetes pod and container.
        workload: Workload,
        /// The executable, when this process may read it (ptrace rules).
        exe: Option<PathBuf>,
    },
    /// The process is in another pid namespace: nothing of it can be
    /// read here, and nothing stale either.
    NotVisible,
    /// The process could not be read, or was gone (or its PID taken by
    /// another process) before the reads were proven to be its.
    Unknown,
}

/// A socket that can say who is at its other end.
pub trait Peered {
    fn peer(&self) -> Peer;
}

impl Peered for UnixStream {
    fn peer(&self) -> Peer {
        UnixPeer::of(self).map_or(Peer::Unknown, |peer| Peer::Unix(Arc::new(peer)))
    }
}

impl Peered for TcpStream {
    fn peer(&self) -> Peer {
        Peer::Tcp {
            remote: self.peer_addr().ok(),
        }
    }
}

impl<IO: Peered> Peered for tokio_rustls::server::TlsStream<IO> {
    fn peer(&self) -> Peer {
        let (io, session) = self.get_ref();
        let remote = match io.peer() {
            Peer::Tcp { remote } | Peer::Tls { remote, .. } => remote,
            Peer::Unix(_) | Peer::Unknown => None,
        };
        let certificates = session
            .peer_certificates()
            .map(|chain| Arc::new(chain.iter().map(|c| c.clone().into_owned()).collect()));
        Peer::Tls { remote, certificates }
    }
}

impl UnixPeer {
    /// The peer of `stream`: its kernel credentials, and the connecting
    /// process's facts when they can be proven to be its. `None` when the
    /// kernel gives no credentials.
    pub fn of(stream: &UnixStream) -> Option<Self> {
        use nix::sys::socket::{getsockopt, sockopt};
        let credentials = getsockopt(stream, sockopt::PeerCredentials).ok()?;
        let pid = Some(credentials.pid()).filter(|pid| *pid > 0);
        let process = match pid {
            None => ProcessFacts::NotVisible,
            Some(pid) => {
                let pidfd = getsockopt(stream, sockopt::PeerPidfd).ok();
                read_process(pid, pidfd.as_ref(), boot_ticks_now())
            }
        };
        Some(Self {
            uid: credentials.uid(),
            gid: credentials.gid(),
            pid,
            process,
        })
    }
}

/// The facts of process `pid`, kept only if they are provably those of the
/// process `pidfd` names (or, without one, of a process that started no
/// later than `accepted`, in clock ticks since boot, and did not change
/// while being read).
fn read_process(pid: i32, pidfd: Option<&OwnedFd>, accepted: Option<u64>) -> ProcessFacts {
    // The start time proves the reads only where there is no pidfd.
    let started = if pidfd.is_none() { start_ticks(pid) } else { None };
    let (Some(status), Some(cgroup)) = (
        std::fs::read_to_string(format!("/proc/{pid}/status")).ok(),
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok(),
    ) else {
        return ProcessFacts::Unknown;
    };
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let proven = match pidfd {
        Some(pidfd) => pidfd_pid(pidfd) == Some(pid),
        None => {
            started.is_some()
                && start_ticks(pid) == started
                && matches!((started, accepted), (Some(s), Some(a)) if s <= a)
        }
    };
    match (proven, status_groups(&status)) {
        (true, Some(groups)) => ProcessFacts::Read {
            groups,
            workload: Workload::parse(&cgroup),
            exe,
        },
        _ => ProcessFacts::Unknown,
    }
}

/// The supplementary groups of a `/proc/PID/status` text.
fn status_groups(status: &str) -> Option<Vec<u32>> {
    let groups = status.lines().find_map(|line| line.strip_prefix("Groups:"))?;
    groups.split_whitespace().map(|g| g.parse().ok()).collect()
}

/// The PID a pidfd names now, in this pid namespace: `None` once its
/// process has been reaped (the kernel shows -1) or when it cannot be read.
fn pidfd_pid(pidfd: &OwnedFd) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    let pid: i32 = info.lines().find_map(|l| l.strip_prefix("Pid:"))?.trim().parse().ok()?;
    (pid > 0).then_some(pid)
}

/// When process `pid` started, in clock ticks since boot (`/proc/PID/stat`
/// field 22, after the command name, which may hold spaces and parentheses).
fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Now, in clock ticks since boot (the unit of a process's start time).
fn boot_ticks_now() -> Option<u64> {
    use nix::time::{ClockId, clock_gettime};
    let now = clock_gettime(ClockId::CLOCK_BOOTTIME).ok()?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    let per_second = u64::try_from(per_second).ok()?;
    let seconds = u64::try_from(now.tv_sec()).ok()?;
    let nanos = u64::try_from(now.tv_nsec()).ok()?;
    Some(seconds * per_second + nanos * per_second / 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_come_from_the_status_text() {
        let status = "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 1600 \nNgid:\t0\n";
        assert_eq!(status_groups(status), Some(vec![4, 24, 1600]));
        assert_eq!(status_groups("Groups:\t\n"), Some(vec![]));
        assert_eq!(status_groups("Name:\tx\n"), None, "no Groups line: unknown, not none");
        assert_eq!(status_groups("Groups:\t4 x\n"), None, "a malformed line: unknown");
    }

    /// This process's own peer, over a socket pair: its groups and cgroup
    /// as the kernel reports them, proven through its pidfd.
    #[tokio::test]
    async fn a_live_peer_is_read_and_proven() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let peer = UnixPeer::of(&ours).unwrap();
        assert_eq!(peer.uid, nix::unistd::getuid().as_raw());
        assert_eq!(peer.pid, Some(std::process::id() as i32));
        let ProcessFacts::Read {
            mut groups,
            workload,
            exe,
        } = peer.process
        else {
            panic!("this process's facts: {:?}", peer.process);
        };
        let mut expected: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        groups.sort_unstable();
        expected.sort_unstable();
        assert_eq!(groups, expected);
        assert_eq!(
            workload,
            Workload::parse(&std::fs::read_to_string("/proc/self/cgroup").unwrap())
        );
        assert_eq!(exe, std::env::current_exe().ok());
    }

    /// A connection whose connecting process exited and was reaped before
    /// the broker read it: nothing is kept, whoever holds the PID now; and
    /// its pidfd (where the kernel gives one) no longer proves anything,
    /// even for the files of a live process.
    #[tokio::test]
    async fn a_connecting_process_that_is_gone_is_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
            ])
            .arg(&path)
            .spawn()
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        child.wait().unwrap();
        let peer = UnixPeer::of(&stream).unwrap();
        assert_eq!(peer.pid, Some(child.id() as i32));
        assert_eq!(peer.process, ProcessFacts::Unknown);
        // The gone process's pidfd, against the files of a live process
        // (this one) read under a reused PID: not proven.
        use nix::sys::socket::{getsockopt, sockopt};
        if let Ok(pidfd) = getsockopt(&stream, sockopt::PeerPidfd) {
            let me = std::process::id() as i32;
            assert_eq!(read_process(me, Some(&pidfd), None), ProcessFacts::Unknown);
        }
    }

    #[test]
    fn without_a_pidfd_a_process_started_after_the_accept_is_refused() {
        let me = std::process::id() as i32;
        let started = start_ticks(me).unwrap();
        assert!(matches!(
            read_process(me, None, Some(started)),
            ProcessFacts::Read { .. }
        ));
        assert_eq!(read_process(me, None, Some(started - 1)), ProcessFacts::Unknown);
        assert_eq!(read_process(me, None, None), ProcessFacts::Unknown);
        assert_eq!(read_process(-1, None, Some(u64::MAX)), ProcessFacts::Unknown);
    }
}
