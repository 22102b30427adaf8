//! Noticing changed files: inotify on each file's directory (and on the
//! directory of what a symlinked file points to), so a file rewritten in
//! place, renamed over, or swapped by the kubelet's `..data` symlink
//! rename is seen at once; a periodic digest check catches the rest
//! (network filesystems, a directory that did not exist at start).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tracing::warn;

use super::Rotation;

/// Events arriving this close together are one change (a pair of files
/// written one after the other, a kubelet swap's several renames).
const SETTLE: Duration = Duration::from_millis(100);

/// Starts watching the files' directories now (so a change made once this
/// returns is seen), looks once for a change made since the material was
/// read, and returns the loop that reacts to changes and checks every
/// `poll` (zero: never) until `stopping`.
pub(super) fn start(
    rotation: Arc<Rotation>,
    poll: Duration,
    stopping: tokio_util::sync::CancellationToken,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let watcher = match watch(&directories(&rotation.files())) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, "cannot watch the TLS files' directories; changes are noticed by the periodic check only");
            None
        }
    };
    rotation.check("watch");
    run(rotation, watcher, poll, stopping)
}

async fn run(
    rotation: Arc<Rotation>,
    watcher: Option<AsyncFd<Events>>,
    poll: Duration,
    stopping: tokio_util::sync::CancellationToken,
) {
    let mut ticker = (!poll.is_zero()).then(|| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + poll, poll);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        tokio::select! {
            _ = stopping.cancelled() => return,
            _ = async { ticker.as_mut().unwrap().tick().await }, if ticker.is_some() => rotation.check("poll"),
            () = changed(watcher.as_ref()) => {
                tokio::time::sleep(SETTLE).await;
                if let Some(w) = &watcher {
                    drain(w);
                }
                rotation.check("watch");
            }
        }
    }
}

/// The directories to watch: each file's, and that of its final target
/// when it is a symlink.
fn directories(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut dirs = BTreeSet::new();
    for file in files {
        dirs.extend(file.parent().map(|p| p.to_path_buf()));
        if let Ok(target) = std::fs::canonicalize(file) {
            dirs.extend(target.parent().map(|p| p.to_path_buf()));
        }
    }
    dirs
}

fn watch(dirs: &BTreeSet<PathBuf>) -> std::io::Result<AsyncFd<Events>> {
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    let mask = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB;
    for dir in dirs {
        if let Err(e) = inotify.add_watch(dir, mask) {
            warn!(directory = %dir.display(), error = %e, "cannot watch this directory; its changes are noticed by the periodic check");
        }
    }
    // Sound (the reason `new` is deprecated does not apply): `Events` owns
    // the inotify descriptor for the whole life of the AsyncFd and always
    // returns that same descriptor. `register` is the unsafe spelling of
    // the same promise, which this crate's `forbid(unsafe_code)` keeps out.
    #[allow(deprecated)]
    AsyncFd::new(Events(inotify))
}

/// The inotify instance, as tokio's reactor needs it.
struct Events(Inotify);

impl std::os::fd::AsRawFd for Events {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// Waits until a file event arrives (forever when there is no watcher,
/// or it failed: then only the periodic check runs).
async fn changed(watcher: Option<&AsyncFd<Events>>) {
    let Some(watcher) = watcher else {
        return std::future::pending().await;
    };
    loop {
        let Ok(mut ready) = watcher.readable().await else {
            return std::future::pending().await;
        };
        match watcher.get_ref().0.read_events() {
            Ok(events) if !events.is_empty() => return,
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
            Err(e) => {
                warn!(error = %e, "reading file events failed; changes are noticed by the periodic check only");
                return std::future::pending().await;
            }
        }
    }
}

/// Discards the events already queued (they are covered by the check).
fn drain(watcher: &AsyncFd<Events>) {
    while let Ok(events) = watcher.get_ref().0.read_events() {
        if events.is_empty() {
            break;
        }
    }
}
