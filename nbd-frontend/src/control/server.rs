//! The control server of one served COW device: an accept thread blocked
//! in `poll` over the listener and a wake-up socket, and one thread per
//! connection blocked in `read`. Nothing here polls or sleeps to
//! synchronise; the stop wakes every blocked thread.

use super::wire::{self, Line, Reply, Request, MAX_LINE};
use super::{peer_uid, short_addr};
use crate::operations;
use crate::status::{RollbackWire, StatusWire};
use anyhow::{bail, Context, Result};
use snapmv_engine::store::Store;
use std::io::{BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Concurrent control connections a server accepts; more are refused so a
/// misbehaving client cannot exhaust threads.
const MAX_CONNS: usize = 32;
/// An idle control connection is dropped after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a reply may take to leave before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a `rollback_progress` request waits, whatever it asks: a
/// client learns at least this often that the server is alive.
const MAX_PROGRESS_WAIT: Duration = Duration::from_secs(10);
/// Back-off after a failed `poll` or `accept` (fd exhaustion, say), so a
/// persistent error is not spun on. Not synchronisation.
const ERROR_BACKOFF: Duration = Duration::from_millis(200);

/// What every connection of one server shares.
struct Shared {
    store: Store,
    cow: String,
    stop: AtomicBool,
    progress: Progress,
}

/// Background steps taken, as the store's progress waker reports them;
/// `rollback_progress` requests wait on it.
#[derive(Default)]
struct Progress {
    state: Mutex<ProgressState>,
    cv: Condvar,
}

#[derive(Default)]
struct ProgressState {
    steps: u64,
    stopped: bool,
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, ProgressState> {
        // A counter and a flag, consistent at every instant.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn step(&self) {
        self.lock().steps += 1;
        self.cv.notify_all();
    }

    fn stop(&self) {
        self.lock().stopped = true;
        self.cv.notify_all();
    }

    fn steps(&self) -> u64 {
        self.lock().steps
    }

    /// Wait until a step after `steps` was taken; `None` at `deadline` or
    /// at the stop.
    fn wait_past(&self, steps: u64, deadline: Instant) -> Option<u64> {
        let mut st = self.lock();
        while st.steps == steps && !st.stopped {
            let left = deadline.checked_duration_since(Instant::now())?;
            st = match self.cv.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        (!st.stopped).then_some(st.steps)
    }
}

/// One served COW device's control socket.
pub struct ControlServer {
    shared: Arc<Shared>,
    /// Written to at stop: wakes the accept loop's `poll`.
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl ControlServer {
    /// Bind `path` and serve `store` on it. Its directory must exist. A
    /// stale socket there is replaced (the caller holds the COW lock, so no
    /// server of this COW device can own it), but nothing else is: not a
    /// directory or file in the way, and not a socket some live process
    /// still answers on. The new socket is tested by connecting to it, since
    /// some filesystems (FUSE) accept the bind but cannot pass connections.
    pub fn start(path: PathBuf, cow: String, store: Store) -> Result<ControlServer> {
        clear_stale(&path)?;
        let listener = bind(&path)?;
        // From here on the socket file is ours: remove it on any failure.
        let (wake, wake_rx) = match wake_pair() {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e).context("cannot create the control thread's wake-up socket");
            }
        };
        let shared = Arc::new(Shared {
            store,
            cow,
            stop: AtomicBool::new(false),
            progress: Progress::default(),
        });
        let (sh, p) = (shared.clone(), path.clone());
        let thread = std::thread::Builder::new()
            .name("snapmv-control".into())
            .spawn(move || accept_loop(listener, wake_rx, p, sh));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e).context("cannot start the control thread");
            }
        };
        // Weak: the store (and so its waker) must not keep the server's
        // state alive after the server is gone.
        let progress = Arc::downgrade(&shared);
        shared.store.set_progress_waker(move || {
            if let Some(s) = progress.upgrade() {
                s.progress.step();
            }
        });
        Ok(ControlServer {
            shared,
            wake,
            thread: Some(thread),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop accepting, wait for open connections to finish their current
    /// request, and remove the socket file.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.progress.stop();
        // Non-blocking: if the buffer is full, a wake-up is pending anyway.
        let _ = (&self.wake).write(&[1]);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("control thread panicked");
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Bind the socket at `path`, restrict it to its owner, and check that it
/// takes connections; on failure the socket file is removed.
fn bind(path: &Path) -> Result<UnixListener> {
    let (addr, _dirfd) = short_addr(path)?;
    let listener = UnixListener::bind(&addr)
        .with_context(|| format!("cannot bind control socket {}", path.display()))?;
    let ready = (|| -> Result<()> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict control socket {}", path.display()))?;
        // The test connection waits in the backlog; the accept loop
        // takes it and sees it close at once.
        UnixStream::connect(&addr).with_context(|| {
            format!(
                "control socket {} was bound but does not take connections",
                path.display()
            )
        })?;
        // The accept loop blocks in `poll` over the listener and a
        // wake-up socket; accept itself must not block on a connection
        // that went away between the two.
        listener.set_nonblocking(true)?;
        Ok(())
    })();
    match ready {
        Ok(()) => Ok(listener),
        Err(e) => {
            drop(listener);
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

/// Make way for a new socket at `path`: remove a dead socket left by a
/// crashed server; refuse (and leave alone) anything else.
fn clear_stale(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let p = path.display();
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {p}")),
    };
    let ft = m.file_type();
    if !ft.is_socket() {
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_symlink() {
            "a symlink"
        } else if ft.is_file() {
            "a regular file"
        } else {
            "not a socket"
        };
        bail!("{p} exists and is {what}; not removing it");
    }
    let (addr, _dirfd) = short_addr(path)?;
    if UnixStream::connect(&addr).is_ok() {
        bail!("{p} is a socket another live process answers on; not replacing it");
    }
    std::fs::remove_file(path)
        .with_context(|| format!("cannot remove stale control socket {p}"))?;
    tracing::info!(path = %p, "removed stale control socket");
    Ok(())
}

/// A connected pair of non-blocking sockets: (writer, reader).
fn wake_pair() -> std::io::Result<(UnixStream, UnixStream)> {
    let (tx, rx) = UnixStream::pair()?;
    tx.set_nonblocking(true)?;
    rx.set_nonblocking(true)?;
    Ok((tx, rx))
}

/// Block until `listener` or `wake` is readable.
fn wait_readable(listener: &UnixListener, wake: &UnixStream) -> std::io::Result<()> {
    let mut fds = [listener.as_raw_fd(), wake.as_raw_fd()].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: `fds` is a live local array of two pollfd structs, and both
    // fds belong to sockets borrowed for the duration of the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
    match rc {
        -1 => Err(std::io::Error::last_os_error()),
        _ => Ok(()),
    }
}

/// Accept connections until stopped, each served on its own thread. Blocks
/// in `poll`; the stop wakes it through `wake`. At the end the open
/// connections are shut down (their blocking reads return) and joined.
fn accept_loop(listener: UnixListener, wake: UnixStream, path: PathBuf, shared: Arc<Shared>) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut conns: Vec<(JoinHandle<()>, UnixStream)> = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        conns.retain(|(h, _)| !h.is_finished());
        if let Err(e) = wait_readable(&listener, &wake) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::warn!(error = %e, socket = %path.display(), "control poll failed");
                std::thread::sleep(ERROR_BACKOFF);
            }
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Some(c) = admit(stream, &shared, &active) {
                    conns.push(c);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!(error = %e, socket = %path.display(), "control accept failed");
                std::thread::sleep(ERROR_BACKOFF);
            }
        }
    }
    // Connection threads hold store clones; end and join them so the
    // caller can close the store as its sole owner.
    for (h, s) in conns {
        let _ = s.shutdown(std::net::Shutdown::Both);
        let _ = h.join();
    }
}

/// Check a new connection's peer and the connection limit, and start its
/// thread. Returns the thread and a handle to shut the socket down.
fn admit(
    stream: UnixStream,
    shared: &Arc<Shared>,
    active: &Arc<AtomicUsize>,
) -> Option<(JoinHandle<()>, UnixStream)> {
    let _ = stream.set_nonblocking(false);
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    match peer_uid(&stream) {
        Some(uid) if uid == 0 || uid == me => {}
        other => {
            tracing::warn!(?other, "control connection from a foreign user refused");
            return None;
        }
    }
    if active.load(Ordering::SeqCst) >= MAX_CONNS {
        let message = "too many control connections; try again".into();
        let _ = wire::write_line(&mut &stream, &Reply::Error { message }, &mut Vec::new());
        return None;
    }
    let handle = stream.try_clone().ok()?;
    active.fetch_add(1, Ordering::SeqCst);
    let (shared, done) = (shared.clone(), active.clone());
    let spawned = std::thread::Builder::new()
        .name("snapmv-control-conn".into())
        .spawn(move || {
            serve_conn(stream, &shared);
            done.fetch_sub(1, Ordering::SeqCst);
        });
    match spawned {
        Ok(h) => Some((h, handle)),
        Err(e) => {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::error!(error = %e, "cannot spawn control connection thread");
            None
        }
    }
}

/// Answer requests in order until the client hangs up, idles out, sends
/// an oversized line, or the server stops (which shuts the socket down, so
/// the blocking read returns). The line buffers live as long as the
/// connection: a request allocates only what its own fields need.
fn serve_conn(stream: UnixStream, shared: &Shared) {
    // The read timeout is the idle policy only.
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut writer = &stream;
    let mut reader = BufReader::new(&stream);
    let (mut request, mut reply) = (Vec::new(), Vec::new());
    while !shared.stop.load(Ordering::SeqCst) {
        let answer = match wire::read_line(&mut reader, MAX_LINE, &mut request) {
            Ok(Line::Text) => match serde_json::from_slice::<Request>(&request) {
                Ok(req) => handle(req, shared),
                Err(e) => Reply::Error {
                    message: format!("malformed request: {e}"),
                },
            },
            Ok(Line::TooLong) => {
                let message = format!("request longer than {MAX_LINE} bytes");
                let _ = wire::write_line(&mut writer, &Reply::Error { message }, &mut reply);
                return;
            }
            // The end, idle for IDLE_TIMEOUT, shut down, or broken.
            Ok(Line::Eof) | Err(_) => return,
        };
        if wire::write_line(&mut writer, &answer, &mut reply).is_err() {
            return;
        }
    }
}

/// Execute one request against `store` outside any connection, without
/// waiting: a `rollback_progress` request answers at once. The control
/// fuzz target drives the handler through this.
#[allow(dead_code)]
pub fn handle_request(req: Request, store: &Store, cow: &str) -> Reply {
    let req = match req {
        Request::RollbackProgress { seen, .. } => Request::RollbackProgress { seen, wait_ms: 0 },
        other => other,
    };
    let shared = Shared {
        store: store.clone(),
        cow: cow.to_string(),
        stop: AtomicBool::new(false),
        progress: Progress::default(),
    };
    handle(req, &shared)
}

/// Execute one request against the live store. Error messages are the
/// offline commands' (`operations`), so scripts see the same text either
/// way.
fn handle(req: Request, shared: &Shared) -> Reply {
    let store = &shared.store;
    let r: Result<Reply> = match req {
        Request::Hello => Ok(Reply::Hello {
            pid: std::process::id(),
            cow: shared.cow.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }),
        Request::List => Ok(Reply::Status(StatusWire::from_status(
            shared.cow.clone(),
            store.status(),
        ))),
        Request::Snapshot { origin, of, memo } => {
            let r = operations::snapshot(store, &origin, of, &memo);
            if let Ok(tag) = r {
                tracing::info!(%origin, ?of, %memo, tag, "snapshot taken (control socket)");
            }
            r.map(|tag| Reply::Tag { tag })
        }
        Request::Delete { origin, tag } => {
            let r = operations::delete(store, &origin, tag);
            if r.is_ok() {
                tracing::info!(%origin, tag, "snapshot deleted (control socket)");
            }
            r.map(|()| Reply::Ok)
        }
        Request::Rollback { origin, tag } => {
            let r = operations::rollback(store, &origin, tag);
            if r.is_ok() {
                tracing::info!(%origin, tag, "rollback started (control socket)");
            }
            r.map(|()| Reply::Ok)
        }
        Request::Diff {
            origin,
            from,
            to,
            offset,
        } => operations::diff_page(store, &origin, (from, to), offset, operations::DIFF_PAGE)
            .map(Reply::Diff),
        Request::RollbackProgress { seen, wait_ms } => Ok(Reply::RollbackProgress {
            rollback: rollback_progress(shared, seen, Duration::from_millis(wait_ms)),
        }),
    };
    r.unwrap_or_else(|e| {
        let message = format!("{e:#}");
        tracing::warn!(%message, "control request failed");
        Reply::Error { message }
    })
}

/// The rollback in progress, once it is no longer `seen` (at once without
/// `seen`), or after `wait` (at most `MAX_PROGRESS_WAIT`), or at the stop.
/// Woken by the store's progress waker after each background step, never
/// by polling; each wake-up costs one cheap look at the rollback's state.
fn rollback_progress(
    shared: &Shared,
    seen: Option<RollbackWire>,
    wait: Duration,
) -> Option<RollbackWire> {
    let current = || shared.store.rollback_status().map(RollbackWire::from);
    let Some(seen) = seen else {
        return current();
    };
    let deadline = Instant::now() + wait.min(MAX_PROGRESS_WAIT);
    // Read the step count before looking: a step taken after the look
    // then ends the wait instead of being missed.
    let mut steps = shared.progress.steps();
    loop {
        let now = current();
        if now.as_ref() != Some(&seen) {
            return now;
        }
        match shared.progress.wait_past(steps, deadline) {
            Some(s) => steps = s,
            None => return now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Client;
    use super::*;
    use snapmv_engine::store::{Dev, FormatOptions};
    use std::io::Read;

    fn mem_store() -> Store {
        let cow = Arc::new(snapmv_engine::MemDev::new(8 << 20)) as Dev;
        let fo = FormatOptions {
            chunk_size: 4096,
            force: false,
        };
        Store::format(cow, &fo).unwrap()
    }

    #[test]
    fn stale_socket_is_removed_but_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        // Nothing there: fine.
        clear_stale(&dir.path().join("none.sock")).unwrap();
        // A dead socket (its listener gone): removed.
        let dead = dir.path().join("dead.sock");
        drop(UnixListener::bind(&dead).unwrap());
        assert!(dead.exists());
        clear_stale(&dead).unwrap();
        assert!(!dead.exists());
        // A live socket: left alone.
        let live = dir.path().join("live.sock");
        let _l = UnixListener::bind(&live).unwrap();
        let e = format!("{:#}", clear_stale(&live).unwrap_err());
        assert!(e.contains("live process"), "{e}");
        assert!(live.exists());
        // A directory (with something in it), a file, a symlink: refused and kept.
        let d = dir.path().join("cow.img.snapmv.sock");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("keep"), b"x").unwrap();
        let e = format!("{:#}", clear_stale(&d).unwrap_err());
        assert!(e.contains("is a directory; not removing it"), "{e}");
        assert!(d.join("keep").exists());
        let f = dir.path().join("file.sock");
        std::fs::write(&f, b"x").unwrap();
        assert!(format!("{:#}", clear_stale(&f).unwrap_err()).contains("regular file"));
        assert!(f.exists());
        let l = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&dead, &l).unwrap();
        assert!(format!("{:#}", clear_stale(&l).unwrap_err()).contains("symlink"));
        assert!(std::fs::symlink_metadata(&l).is_ok());
    }

    /// The accept loop blocks in `poll` and connections block in `read`:
    /// stopping must wake both. A client that answered a request and then
    /// sits idle sees its connection closed, and `stop` returns (with the
    /// old idle-tick design it also returned, but only after polling).
    #[test]
    fn stop_ends_blocked_accepts_and_idle_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let server = ControlServer::start(path.clone(), "c".into(), mem_store()).unwrap();
        let mut client = Client::connect(&path).unwrap();
        assert!(matches!(
            client.call(&Request::Hello),
            Ok(Reply::Hello { .. })
        ));
        let mut idle = UnixStream::connect(&path).unwrap();
        server.stop();
        assert!(!path.exists(), "socket file left behind");
        let mut buf = [0u8; 1];
        assert_eq!(
            idle.read(&mut buf).unwrap_or(0),
            0,
            "idle connection still open"
        );
        assert!(client.call(&Request::Hello).is_err(), "served after stop");
    }

    /// A `rollback_progress` wait ends when a background step moves the
    /// rollback on (the progress waker, not a timeout), and the stop ends
    /// a wait at once.
    #[test]
    fn rollback_progress_waits_for_a_step() {
        let dir = tempfile::tempdir().unwrap();
        let store = mem_store();
        let origin = Arc::new(snapmv_engine::MemDev::new(1 << 20)) as Dev;
        store.bind("o", "/dev/o", origin, 0).unwrap();
        let tag = store.snapshot("o", None, "", 0).unwrap();
        let path = dir.path().join("c.sock");
        let server = ControlServer::start(path.clone(), "c".into(), store.clone()).unwrap();
        let mut client = Client::connect(&path).unwrap();
        let long = Duration::from_secs(10);
        assert_eq!(client.rollback_progress(None, long).unwrap(), None);
        store.rollback("o", tag).unwrap();
        let seen = client.rollback_progress(None, long).unwrap().unwrap();
        assert_eq!(
            (seen.tag, seen.done_chunks, seen.total_chunks),
            (tag, 0, 256)
        );
        let stepper = {
            let store = store.clone();
            std::thread::spawn(move || while store.step_background(64).unwrap().more {})
        };
        let started = Instant::now();
        let next = client.rollback_progress(Some(seen.clone()), long).unwrap();
        assert_ne!(next, Some(seen), "answered without progress");
        assert!(started.elapsed() < long / 2, "woken by the timeout");
        stepper.join().unwrap();
        let last = client.rollback_progress(next, long).unwrap();
        assert_eq!(last, None, "rollback not over");
        // A rollback nobody steps: only the stop ends a wait on it.
        store.rollback("o", tag).unwrap();
        let seen = client.rollback_progress(None, long).unwrap();
        let waiter = std::thread::spawn(move || {
            let t = Instant::now();
            let _ = client.rollback_progress(seen, long);
            t.elapsed()
        });
        // Let the request reach its wait (had it not, the stop would end
        // the connection instead: quick too).
        std::thread::sleep(Duration::from_millis(100));
        server.stop();
        assert!(
            waiter.join().unwrap() < long / 2,
            "the stop did not end the wait"
        );
    }
}
