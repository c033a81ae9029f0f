//! Listeners, the accept loop, one thread per connection, and shutdown.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::backend::{Backend, Catalog};
use super::budget::Budget;
use super::io::{MsgReader, StopSignal, Stream};
use super::negotiate::{negotiate, Outcome, Starttls};
use super::pool::WorkerPool;
use super::tls::{self, pump::Pump, HandshakeError, TlsConfig, TlsMode};
use super::transmit::{self, Limits, OVERHEAD};
use super::{AccessPolicy, ServerConfig};

/// Negotiation must make progress at least this often.
const NEGOTIATION_IDLE: Duration = Duration::from_secs(60);
/// A client that takes no reply bytes for this long is dropped, so a
/// stalled reader cannot hold its buffers (and server budget) forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long shutdown waits for connections to finish by themselves.
#[cfg(not(test))]
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
#[cfg(test)]
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Connections beyond this are closed at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Requests the shared pool may hold queued beyond its busy threads;
/// connections run further ones inline.
const POOL_QUEUE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("no listener configured (neither tcp nor unix)")]
    NoListener,
    #[error("cannot bind {what}: {source}")]
    Bind {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unix socket {0} is in use by a running server")]
    SocketInUse(PathBuf),
    #[error("the server is already running or has run")]
    AlreadyRan,
    #[error("cannot create the shutdown channel: {0}")]
    Wake(std::io::Error),
}

struct Listeners {
    tcp: Option<TcpListener>,
    unix: Option<UnixListener>,
}

/// Settings and shared state every connection sees.
struct Shared<B> {
    catalog: Arc<dyn Catalog<B>>,
    stop: Arc<AtomicBool>,
    read_only: bool,
    access: AccessPolicy,
    max_request: u32,
    conn_buffer: usize,
    parallel: usize,
    server_budget: Arc<Budget>,
    pool: Arc<WorkerPool>,
    tls: TlsConfig,
    live_conns: AtomicUsize,
    /// The descriptor that becomes readable when the server stops.
    stop_fd: std::os::fd::RawFd,
    /// Connection threads still running, and a wake-up when one ends.
    running: Mutex<usize>,
    ended: Condvar,
    /// A clone of every open connection's socket, to cut stuck ones at
    /// shutdown.
    sockets: Mutex<HashMap<u64, Stream>>,
    next_id: AtomicU64,
}

/// The server, generic over the backend (the public `Server` uses
/// `Volume`; unit tests use an in-memory one).
pub struct Core<B> {
    shared: Arc<Shared<B>>,
    listeners: Mutex<Option<Listeners>>,
    local_addr: Option<SocketAddr>,
    unix_path: Option<PathBuf>,
    wake_rx: UnixStream,
    wake_tx: Arc<UnixStream>,
}

/// Stops a running server; cheap to clone and send to a signal thread.
#[derive(Clone)]
pub struct Stopper {
    stop: Arc<AtomicBool>,
    wake: Arc<UnixStream>,
}

impl Stopper {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop's poll. The socket is non-blocking: if its
        // buffer is full, a wake-up is already pending.
        let _ = (&*self.wake).write(&[1]);
    }
}

fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    if path.exists() {
        // A socket file left by a server that died is replaced; one that
        // still answers belongs to a live server and is refused.
        if UnixStream::connect(path).is_ok() {
            return Err(ServerError::SocketInUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| ServerError::Bind {
        what: path.display().to_string(),
        source,
    })
}

impl<B: Backend> Core<B> {
    pub fn bind(cfg: &ServerConfig, catalog: Arc<dyn Catalog<B>>) -> Result<Core<B>, ServerError> {
        if cfg.tcp.is_none() && cfg.unix.is_none() {
            return Err(ServerError::NoListener);
        }
        let tcp = match cfg.tcp {
            Some(addr) => {
                let l = TcpListener::bind(addr).map_err(|source| ServerError::Bind {
                    what: addr.to_string(),
                    source,
                })?;
                l.set_nonblocking(true)
                    .map_err(|source| ServerError::Bind {
                        what: addr.to_string(),
                        source,
                    })?;
                Some(l)
            }
            None => None,
        };
        let local_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());
        let unix = match &cfg.unix {
            Some(p) => {
                let l = bind_unix(p)?;
                l.set_nonblocking(true)
                    .map_err(|source| ServerError::Bind {
                        what: p.display().to_string(),
                        source,
                    })?;
                Some(l)
            }
            None => None,
        };
        let (wake_rx, wake_tx) = UnixStream::pair().map_err(ServerError::Wake)?;
        // Never read: once written, it stays readable, which is how every
        // connection blocked waiting for a request learns of the stop.
        wake_rx.set_nonblocking(true).map_err(ServerError::Wake)?;
        wake_tx.set_nonblocking(true).map_err(ServerError::Wake)?;

        // Sane limits whatever the caller passed: a request always fits in
        // a connection's budget, and a connection's in the server's.
        let max_request = cfg.max_request.clamp(4096, u32::MAX - 8);
        let conn_buffer = cfg.conn_buffer_bytes.max(max_request as usize + OVERHEAD);
        let server_budget = cfg.server_buffer_bytes.max(conn_buffer);
        info!(tcp = ?local_addr, unix = ?cfg.unix, read_only = cfg.read_only, max_request,
              conn_buffer, server_budget, access = %cfg.access, tls = %cfg.tls.describe(),
              "NBD server listening");
        Ok(Core {
            shared: Arc::new(Shared {
                catalog,
                stop: Arc::new(AtomicBool::new(false)),
                read_only: cfg.read_only,
                access: cfg.access.clone(),
                max_request,
                conn_buffer,
                parallel: cfg.parallel_per_conn.clamp(1, 256),
                server_budget: Budget::new(server_budget),
                pool: WorkerPool::new(cfg.pool_threads.clamp(1, 4096), POOL_QUEUE),
                tls: cfg.tls.clone(),
                live_conns: AtomicUsize::new(0),
                stop_fd: wake_rx.as_raw_fd(),
                running: Mutex::new(0),
                ended: Condvar::new(),
                sockets: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            }),
            listeners: Mutex::new(Some(Listeners { tcp, unix })),
            local_addr,
            unix_path: cfg.unix.clone(),
            wake_rx,
            wake_tx: Arc::new(wake_tx),
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    pub fn stopper(&self) -> Stopper {
        Stopper {
            stop: self.shared.stop.clone(),
            wake: self.wake_tx.clone(),
        }
    }

    pub fn run(&self) -> Result<(), ServerError> {
        let listeners = self
            .listeners
            .lock()
            .map_err(|_| ServerError::AlreadyRan)?
            .take()
            .ok_or(ServerError::AlreadyRan)?;
        let mut conns: Vec<JoinHandle<()>> = Vec::new();
        while !self.shared.stop.load(Ordering::SeqCst) {
            let mut fds = vec![libc::pollfd {
                fd: self.wake_rx.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            if let Some(l) = &listeners.tcp {
                fds.push(libc::pollfd {
                    fd: l.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            if let Some(l) = &listeners.unix {
                fds.push(libc::pollfd {
                    fd: l.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            // SAFETY: `fds` is a valid, exclusively borrowed array of
            // `fds.len()` pollfd structs for the duration of the call, and
            // every fd in it is owned by a listener or socket alive here.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    warn!("poll failed: {e}");
                    // Back-off after an error, so a persistent one cannot spin.
                    std::thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
            conns.retain(|t| !t.is_finished());
            if let Some(l) = &listeners.tcp {
                loop {
                    match l.accept() {
                        Ok((s, peer)) => {
                            let _ = s.set_nodelay(true);
                            let _ = s.set_nonblocking(false);
                            debug!(%peer, "accepted");
                            self.spawn_conn(Stream::Tcp(s), &mut conns);
                        }
                        Err(e) => {
                            accept_error(e);
                            break;
                        }
                    }
                }
            }
            if let Some(l) = &listeners.unix {
                loop {
                    match l.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            self.spawn_conn(Stream::Unix(s), &mut conns);
                        }
                        Err(e) => {
                            accept_error(e);
                            break;
                        }
                    }
                }
            }
        }
        info!(
            connections = conns.len(),
            "NBD server stopping: finishing in-flight requests"
        );
        // Closing the listeners refuses new clients at once.
        drop(listeners);
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
        // Connections stop at their next message boundary. One whose client
        // neither sends nor reads (a writer blocked on a full socket) would
        // hold us until its write timeout: after a grace period, cut it.
        self.wait_for_connections(Instant::now() + SHUTDOWN_GRACE);
        let stuck = self.shared.sockets.lock().map(|m| m.len()).unwrap_or(0);
        if stuck > 0 {
            warn!(
                stuck,
                "closing connections still open after the grace period"
            );
            if let Ok(m) = self.shared.sockets.lock() {
                for s in m.values() {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
        for t in conns {
            let _ = t.join();
        }
        self.shared.pool.close();
        info!("NBD server stopped");
        Ok(())
    }

    /// Wait until every connection thread has ended, or `deadline`.
    fn wait_for_connections(&self, deadline: Instant) {
        let shared = &self.shared;
        let mut running = shared.running.lock().unwrap_or_else(|p| p.into_inner());
        while *running > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            running = match shared.ended.wait_timeout(running, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    fn spawn_conn(&self, s: Stream, conns: &mut Vec<JoinHandle<()>>) {
        if self.shared.live_conns.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            warn!("too many connections; closing a new one");
            let _ = s.shutdown(Shutdown::Both);
            return;
        }
        self.shared.live_conns.fetch_add(1, Ordering::SeqCst);
        *self
            .shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner()) += 1;
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                if let (Ok(c), Ok(mut m)) = (s.try_clone(), shared.sockets.lock()) {
                    m.insert(id, c);
                }
                handle_conn(s, &shared);
                if let Ok(mut m) = shared.sockets.lock() {
                    m.remove(&id);
                }
                shared.live_conns.fetch_sub(1, Ordering::SeqCst);
                shared.connection_ended();
            });
        match spawned {
            Ok(t) => conns.push(t),
            Err(e) => {
                // The closure (and the socket in it) was dropped.
                self.shared.live_conns.fetch_sub(1, Ordering::SeqCst);
                self.shared.connection_ended();
                warn!("cannot start a connection thread: {e}");
            }
        }
    }
}

/// `WouldBlock` means the backlog is drained. Anything else (EMFILE when
/// out of descriptors, ECONNABORTED, ...) is logged, and a short pause keeps
/// a persistent error from spinning the loop.
fn accept_error(e: std::io::Error) {
    if e.kind() != std::io::ErrorKind::WouldBlock {
        warn!("accept failed: {e}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn handle_conn<B: Backend>(s: Stream, shared: &Shared<B>) {
    let peer = s.peer();
    let setup = || -> std::io::Result<Stream> {
        s.set_write_timeout(Some(WRITE_TIMEOUT))?;
        s.try_clone()
    };
    let ws = match setup() {
        Ok(ws) => ws,
        Err(e) => {
            warn!(%peer, "socket setup failed: {e}");
            return;
        }
    };
    let stop = StopSignal {
        flag: shared.stop.clone(),
        fd: shared.stop_fd,
    };
    let mut upgrade = Upgrade {
        tls: &shared.tls,
        stop: stop.clone(),
        peer: peer.clone(),
        pump: None,
    };
    let mut rd = MsgReader::new(s, stop);
    rd.idle_limit = Some(NEGOTIATION_IDLE);
    let mut w = BufWriter::new(ws);
    // The client's identity comes from TLS, if it upgrades (`upgrade`).
    let outcome = negotiate(
        &mut rd,
        &mut w,
        shared.catalog.as_ref(),
        shared.read_only,
        &shared.access,
        &mut upgrade,
    );
    let n = match outcome {
        Ok(Outcome::Transmission(n)) => n,
        Ok(Outcome::Ended) => {
            debug!(%peer, "client left during negotiation");
            return;
        }
        Err(e) => {
            info!(%peer, "negotiation ended: {e}");
            let _ = w.get_ref().shutdown(Shutdown::Both);
            return;
        }
    };
    let ws = match w.into_inner() {
        Ok(ws) => ws,
        Err(e) => {
            info!(%peer, "connection lost: {}", e.error());
            return;
        }
    };
    rd.idle_limit = None;
    let name = n.name.clone();
    let limits = Limits {
        max_request: shared.max_request,
        parallel: shared.parallel,
        conn_budget: Budget::new(shared.conn_buffer),
        server_budget: shared.server_budget.clone(),
        pool: shared.pool.clone(),
    };
    let closer = ws.try_clone();
    let end = transmit::serve(*n, &mut rd, ws, &limits);
    match &end {
        transmit::End::Error(e) => info!(%peer, export = %name, "connection ended: {e}"),
        other => info!(%peer, export = %name, "connection ended: {other:?}"),
    }
    if let Ok(c) = closer {
        let _ = c.shutdown(Shutdown::Both);
    }
    // Dropping `upgrade` lets a TLS pump send what it holds and waits for it.
    if let Some(p) = upgrade.pump.take() {
        p.finish();
    }
}

/// STARTTLS for one connection: the handshake on its socket, then the
/// pump; the connection's reader and writer move to the plain side.
struct Upgrade<'a> {
    tls: &'a TlsConfig,
    stop: StopSignal,
    peer: String,
    /// Joined (after the connection's end is shut) when the connection's
    /// thread ends, by `finish` or on drop.
    pump: Option<Pump>,
}

impl Starttls<BufWriter<Stream>> for Upgrade<'_> {
    fn mode(&self) -> TlsMode {
        self.tls.mode()
    }

    fn start(
        &mut self,
        rd: &mut MsgReader,
        w: &mut BufWriter<Stream>,
    ) -> Result<Option<String>, HandshakeError> {
        let (conn_end, pump_end) = std::os::unix::net::UnixStream::pair()?;
        conn_end.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let early = rd.take_buffered();
        let sock = rd.replace_stream(Stream::Unix(conn_end.try_clone()?));
        // The old writer's clone of the socket goes; nothing is buffered in
        // it (the ACK was flushed).
        *w = BufWriter::new(Stream::Unix(conn_end.try_clone()?));
        let (session, net) = tls::handshake(self.tls, sock, early, &self.stop, NEGOTIATION_IDLE)?;
        let identity = session.identity();
        self.pump = Some(Pump::spawn(
            session,
            net,
            pump_end,
            &conn_end,
            WRITE_TIMEOUT,
            self.peer.clone(),
        )?);
        Ok(identity)
    }
}

impl<B> Shared<B> {
    fn connection_ended(&self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        *running -= 1;
        drop(running);
        self.ended.notify_all();
    }
}
