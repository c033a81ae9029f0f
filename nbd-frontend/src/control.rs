//! The control socket: how `snapmv snapshot|delete|rollback|list` reach a
//! running `serve` that holds the COW device (see `lock` for the path rule).
//!
//! Protocol: line-delimited JSON over a Unix stream socket. The client
//! writes one [`Request`] object per line; the server answers each with one
//! [`Reply`] object per line, in order, and keeps the connection open for
//! more (so `rollback --wait` can poll on one connection). A request line is
//! at most [`MAX_LINE`] bytes; a longer or malformed line gets an `error`
//! reply (and, if too long, the connection is closed, since the rest of the
//! line cannot be skipped reliably). Only root and the server's own user may
//! connect (socket mode 0600 plus an SO_PEERCRED check).
//!
//! ```text
//! -> {"op":"hello"}
//! <- {"reply":"hello","pid":1234,"cow":"/srv/cow.img","version":"0.1.0"}
//! -> {"op":"snapshot","origin":"orig","of":null,"memo":"snap1"}
//! <- {"reply":"tag","tag":1}
//! -> {"op":"delete","origin":"orig","tag":9}
//! <- {"reply":"error","message":"delete snapshot 9 of origin orig: no snapshot with tag 9 on origin orig"}
//! ```

use crate::status::StatusWire;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use snapmv_engine::store::Store;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Largest request or reply line. Requests are tiny; replies carry a whole
/// status, which grows with the snapshot count, hence the larger bound on
/// the client side.
pub const MAX_LINE: usize = 64 * 1024;
const MAX_REPLY_LINE: usize = 256 << 20;
/// Concurrent control connections a server accepts; more are refused so a
/// misbehaving client cannot exhaust threads.
const MAX_CONNS: usize = 32;
/// An idle control connection is dropped after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a client waits for a reply (a snapshot flushes the device,
/// which can take a while under heavy write load).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Hello,
    List,
    Snapshot {
        origin: String,
        of: Option<u64>,
        memo: String,
    },
    Delete {
        origin: String,
        tag: u64,
    },
    Rollback {
        origin: String,
        tag: u64,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Hello {
        pid: u32,
        cow: String,
        version: String,
    },
    Status(StatusWire),
    Tag {
        tag: u64,
    },
    Ok,
    Error {
        message: String,
    },
}

/// Unix socket addresses hold at most 107 bytes of path. A longer path is
/// reached through `/proc/self/fd/<dir fd>/<name>`, which the kernel
/// resolves like the real directory; the returned descriptor must outlive
/// the bind/connect call.
fn short_addr(path: &Path) -> Result<(PathBuf, Option<OwnedFd>)> {
    if path.as_os_str().len() < 100 {
        return Ok((path.to_path_buf(), None));
    }
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(d), Some(n)) => (d, n),
        _ => bail!("bad control socket path {}", path.display()),
    };
    use std::os::unix::fs::OpenOptionsExt;
    let dirf = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_PATH)
        .open(dir)
        .with_context(|| format!("cannot open directory {}", dir.display()))?;
    let fd: OwnedFd = dirf.into();
    let p = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())).join(name);
    Ok((p, Some(fd)))
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

/// A connected client.
pub struct Client {
    reader: BufReader<UnixStream>,
    path: PathBuf,
}

impl Client {
    /// Wait at most `d` for each reply from now on (`None`: the default,
    /// long enough for a snapshot under heavy write load).
    pub fn set_timeout(&mut self, d: Option<Duration>) -> Result<()> {
        let d = d.unwrap_or(CLIENT_TIMEOUT);
        let s = self.reader.get_ref();
        s.set_read_timeout(Some(d))?;
        s.set_write_timeout(Some(d))?;
        Ok(())
    }

    /// The uid of the process serving this socket, if the kernel says.
    pub fn peer_uid(&self) -> Option<u32> {
        peer_uid(self.reader.get_ref())
    }

    pub fn connect(path: &Path) -> Result<Client> {
        let (addr, _dirfd) = short_addr(path)?;
        let s = UnixStream::connect(&addr)
            .with_context(|| format!("cannot connect to control socket {}", path.display()))?;
        s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
        Ok(Client {
            reader: BufReader::new(s),
            path: path.to_path_buf(),
        })
    }

    /// Send one request and wait for its reply. An `error` reply becomes an
    /// `Err` carrying the server's message.
    pub fn call(&mut self, req: &Request) -> Result<Reply> {
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        let p = self.path.display().to_string();
        self.reader
            .get_mut()
            .write_all(&line)
            .with_context(|| format!("cannot send to server at {p}"))?;
        let buf = read_line(&mut self.reader, MAX_REPLY_LINE)
            .with_context(|| format!("cannot read reply from server at {p}"))?;
        let buf = match buf {
            Line::Text(b) => b,
            Line::Eof => bail!("server at {p} closed the connection without replying"),
            Line::TooLong => bail!("server at {p} sent an oversized reply"),
        };
        let reply: Reply = serde_json::from_slice(&buf)
            .with_context(|| format!("malformed reply from server at {p}"))?;
        match reply {
            Reply::Error { message } => Err(anyhow!(message)),
            r => Ok(r),
        }
    }
}

enum Line {
    Text(Vec<u8>),
    Eof,
    TooLong,
}

/// Read one '\n'-terminated line of at most `max` bytes without ever
/// buffering more than `max + 1`.
fn read_line<R: BufRead>(r: &mut R, max: usize) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(max as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Line::Text(buf));
    }
    if buf.len() > max {
        return Ok(Line::TooLong);
    }
    // EOF in the middle of a line: treat the fragment as a line.
    Ok(Line::Text(buf))
}

/// One served COW device's control socket.
pub struct ControlServer {
    stop: Arc<AtomicBool>,
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
        let (addr, _dirfd) = short_addr(&path)?;
        let listener = UnixListener::bind(&addr)
            .with_context(|| format!("cannot bind control socket {}", path.display()))?;
        // From here on the socket file is ours: remove it on any failure.
        let ready = (|| -> Result<()> {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
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
        if let Err(e) = ready {
            drop(listener);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (wake, wake_rx) = match wake_pair() {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e).context("cannot create the control thread's wake-up socket");
            }
        };
        let st = stop.clone();
        let p = path.clone();
        let thread = std::thread::Builder::new()
            .name("snapmv-control".into())
            .spawn(move || accept_loop(listener, wake_rx, p, cow, store, st));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e).context("cannot start the control thread");
            }
        };
        Ok(ControlServer {
            stop,
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
        self.stop.store(true, Ordering::SeqCst);
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
fn accept_loop(
    listener: UnixListener,
    wake: UnixStream,
    path: PathBuf,
    cow: String,
    store: Store,
    stop: Arc<AtomicBool>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut conns: Vec<(JoinHandle<()>, UnixStream)> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        conns.retain(|(h, _)| !h.is_finished());
        if let Err(e) = wait_readable(&listener, &wake) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::warn!(error = %e, socket = %path.display(), "control poll failed");
                // Back-off after an error, not synchronisation.
                std::thread::sleep(Duration::from_millis(200));
            }
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Some(c) = admit(stream, &store, &cow, &stop, &active) {
                    conns.push(c);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!(error = %e, socket = %path.display(), "control accept failed");
                std::thread::sleep(Duration::from_millis(200));
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
    store: &Store,
    cow: &str,
    stop: &Arc<AtomicBool>,
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
        let mut s = stream;
        let message = "too many control connections; try again".into();
        let _ = send(&mut s, &Reply::Error { message });
        return None;
    }
    let handle = stream.try_clone().ok()?;
    active.fetch_add(1, Ordering::SeqCst);
    let (store, cow, stop, done) = (store.clone(), cow.to_string(), stop.clone(), active.clone());
    let spawned = std::thread::Builder::new()
        .name("snapmv-control-conn".into())
        .spawn(move || {
            serve_conn(stream, &store, &cow, &stop);
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

fn peer_uid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a live local
    // of exactly that size.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

fn send(s: &mut UnixStream, r: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    s.write_all(&line)
}

fn serve_conn(stream: UnixStream, store: &Store, cow: &str, stop: &AtomicBool) {
    // Reads block; the stop shuts the socket down, which ends them. The
    // read timeout is the idle policy only.
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    let mut pending: Vec<u8> = Vec::new();
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let room = (MAX_LINE + 1).saturating_sub(pending.len());
        match reader
            .by_ref()
            .take(room as u64)
            .read_until(b'\n', &mut pending)
        {
            Ok(0) => return,
            Ok(_) => {}
            // Idle for IDLE_TIMEOUT, shut down, or a broken connection.
            Err(_) => return,
        }
        if pending.last() != Some(&b'\n') {
            if pending.len() > MAX_LINE {
                let _ = send(
                    &mut writer,
                    &Reply::Error {
                        message: format!("request longer than {MAX_LINE} bytes"),
                    },
                );
                return;
            }
            continue;
        }
        let line = std::mem::take(&mut pending);
        let reply = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => handle(req, store, cow),
            Err(e) => Reply::Error {
                message: format!("malformed request: {e}"),
            },
        };
        if send(&mut writer, &reply).is_err() {
            return;
        }
    }
}

fn now() -> i64 {
    crate::admin::now()
}

/// Execute one request against the live store. Error messages match the
/// offline commands' so scripts see the same text either way.
pub fn handle(req: Request, store: &Store, cow: &str) -> Reply {
    let r: Result<Reply> = match req {
        Request::Hello => Ok(Reply::Hello {
            pid: std::process::id(),
            cow: cow.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }),
        Request::List => Ok(Reply::Status(StatusWire::from_status(
            cow.to_string(),
            store.status(),
        ))),
        Request::Snapshot { origin, of, memo } => {
            tracing::info!(%origin, ?of, %memo, "snapshot (control socket)");
            crate::admin::do_snapshot(store, &origin, of, &memo, now()).map(|tag| {
                tracing::info!(%origin, tag, "snapshot taken");
                Reply::Tag { tag }
            })
        }
        Request::Delete { origin, tag } => {
            tracing::info!(%origin, tag, "delete (control socket)");
            crate::admin::do_delete(store, &origin, tag).map(|()| Reply::Ok)
        }
        Request::Rollback { origin, tag } => {
            tracing::info!(%origin, tag, "rollback (control socket)");
            crate::admin::do_rollback(store, &origin, tag).map(|()| Reply::Ok)
        }
    };
    r.unwrap_or_else(|e| Reply::Error {
        message: format!("{e:#}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        let r: Request =
            serde_json::from_str(r#"{"op":"snapshot","origin":"o","of":3,"memo":"m"}"#).unwrap();
        assert_eq!(
            r,
            Request::Snapshot {
                origin: "o".into(),
                of: Some(3),
                memo: "m".into()
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"format"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"delete","origin":"o","tag":-1}"#).is_err()
        );
        assert_eq!(
            serde_json::to_string(&Reply::Ok).unwrap(),
            r#"{"reply":"ok"}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply::Tag { tag: 7 }).unwrap(),
            r#"{"reply":"tag","tag":7}"#
        );
    }

    #[test]
    fn bounded_line_reader() {
        let mut r = std::io::Cursor::new(b"abc\ndef".to_vec());
        assert!(matches!(read_line(&mut r, 10).unwrap(), Line::Text(b) if b == b"abc"));
        assert!(matches!(read_line(&mut r, 10).unwrap(), Line::Text(b) if b == b"def"));
        assert!(matches!(read_line(&mut r, 10).unwrap(), Line::Eof));
        let mut r = std::io::Cursor::new(vec![b'x'; 100]);
        assert!(matches!(read_line(&mut r, 10).unwrap(), Line::TooLong));
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

    #[test]
    fn long_socket_paths_go_through_proc() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("cow.img.snapmv.sock");
        let (addr, fd) = short_addr(&path).unwrap();
        assert!(fd.is_some());
        assert!(addr.as_os_str().len() < 100);
        let l = UnixListener::bind(&addr).unwrap();
        drop(fd);
        assert!(path.exists());
        let (addr2, _fd2) = short_addr(&path).unwrap();
        let _c = UnixStream::connect(&addr2).unwrap();
        let _ = l.accept().unwrap();
    }

    /// The accept loop blocks in `poll` and connections block in `read`:
    /// stopping must wake both. A client that answered a request and then
    /// sits idle sees its connection closed, and `stop` returns (with the
    /// old idle-tick design it also returned, but only after polling).
    #[test]
    fn stop_ends_blocked_accepts_and_idle_connections() {
        use snapmv_engine::store::{Dev, FormatOptions};
        let dir = tempfile::tempdir().unwrap();
        let cow = Arc::new(snapmv_engine::MemDev::new(8 << 20)) as Dev;
        let fo = FormatOptions {
            chunk_size: 4096,
            force: false,
        };
        let store = Store::format(cow, &fo).unwrap();
        let path = dir.path().join("c.sock");
        let server = ControlServer::start(path.clone(), "c".into(), store).unwrap();
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
}
