//! The transmission phase of one connection.
//!
//! Three roles, each on its own thread(s):
//! - the **reader** (the connection's thread) parses request headers,
//!   checks them, takes a byte permit for the payload and the reply, reads
//!   WRITE payloads, and queues jobs on a bounded channel;
//! - **workers** (`workers_per_conn` threads) run jobs against the backend
//!   in parallel, so replies go out in completion order, not request order;
//! - the **writer** serialises replies onto the socket and drops each
//!   reply's permit once it is written.
//!
//! Memory is bounded by the permits: a request holds `payload + OVERHEAD`
//! bytes of the connection's budget and of the server's from the moment
//! its header is read until its reply is on the wire. When a client stops
//! reading replies, its writer blocks, its permits are not returned, and
//! its reader stops at the next permit: only that connection stalls.

use std::io::{BufWriter, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tracing::{debug, warn};

use super::backend::{allocation_flags, BResult, Backend, FlushHold};
use super::budget::{Budget, Permit};
use super::io::{MsgReader, ReadError, Stream};
use super::negotiate::Negotiated;
use super::proto::*;

/// Bytes charged per request on top of its payload, so that requests
/// without payload (FLUSH, TRIM, ...) are bounded in number too.
pub const OVERHEAD: usize = 4096;
/// How often (at most) a connection asks the engine whether its version
/// still exists, besides asking after every failed operation.
const LIVE_CHECK_MS: u64 = 100;
/// The engine is asked about at most this much per BLOCK_STATUS; the reply
/// may cover less than asked, and clients continue from where it ends.
/// This bounds the work one request costs (a 4 GiB query of 4 KiB chunks
/// would otherwise be a million extents).
const BLOCK_STATUS_SPAN: u32 = 512 << 20;

pub struct Limits {
    pub max_request: u32,
    pub workers: usize,
    pub conn_budget: Arc<Budget>,
    pub server_budget: Arc<Budget>,
}

struct Job {
    handle: u64,
    cmd: Command,
    payload: Vec<u8>,
    permit: Permit,
}

/// One reply, written as `head` then `data`.
struct Reply {
    head: Vec<u8>,
    data: Vec<u8>,
    /// A FLUSH's hold: dropped only once this reply is on the socket.
    hold: Option<FlushHold>,
    _permit: Permit,
}

/// What running a job gives: the reply's head and data, and a FLUSH's hold.
type Answer = (Vec<u8>, Vec<u8>, Option<FlushHold>);

/// Per-connection view of whether the exported version still exists.
struct Liveness {
    dead: AtomicBool,
    last_check_ms: AtomicU64,
    epoch: Instant,
}

impl Liveness {
    fn is_dead<B: Backend>(&self, b: &B, force: bool) -> bool {
        if self.dead.load(Ordering::Relaxed) {
            return true;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_check_ms.load(Ordering::Relaxed);
        if force || now.saturating_sub(last) >= LIVE_CHECK_MS {
            self.last_check_ms.store(now, Ordering::Relaxed);
            if !b.is_live() {
                self.dead.store(true, Ordering::Relaxed);
                return true;
            }
        }
        false
    }
}

fn error_reply(structured: bool, handle: u64, errno: u32, msg: &str) -> Vec<u8> {
    if structured {
        structured_error(handle, errno, msg)
    } else {
        simple_reply_header(errno, handle).to_vec()
    }
}

fn ok_reply(handle: u64) -> Vec<u8> {
    // Allowed even with structured replies: the reply has no payload.
    simple_reply_header(0, handle).to_vec()
}

struct Exec<B> {
    backend: B,
    structured: bool,
    live: Liveness,
    name: String,
}

impl<B: Backend> Exec<B> {
    fn fail(&self, handle: u64, e: snapmv_engine::Error) -> Vec<u8> {
        let errno = if self.live.is_dead(&self.backend, true) {
            ESHUTDOWN
        } else {
            wire_errno(e.errno())
        };
        if errno == EIO {
            warn!(export = %self.name, error = %e, "request failed");
        } else {
            debug!(export = %self.name, error = %e, errno, "request failed");
        }
        error_reply(self.structured, handle, errno, &e.to_string())
    }

    fn done(&self, handle: u64, r: BResult<()>) -> Vec<u8> {
        match r {
            Ok(()) => ok_reply(handle),
            Err(e) => self.fail(handle, e),
        }
    }

    /// Run one job: the reply's head and data, and a FLUSH's hold.
    fn run(&self, job: &mut Job) -> Answer {
        match job.cmd {
            Command::Flush => match self.backend.flush() {
                Ok(hold) => (ok_reply(job.handle), Vec::new(), Some(hold)),
                Err(e) => (self.fail(job.handle, e), Vec::new(), None),
            },
            _ => {
                let (head, data) = self.run_other(job);
                (head, data, None)
            }
        }
    }

    fn run_other(&self, job: &mut Job) -> (Vec<u8>, Vec<u8>) {
        let h = job.handle;
        let b = &self.backend;
        if self.live.is_dead(b, false) {
            let msg = "the exported version was deleted";
            return (error_reply(self.structured, h, ESHUTDOWN, msg), Vec::new());
        }
        match job.cmd {
            Command::Read { offset, len } => {
                let mut buf = vec![0u8; len as usize];
                if len > 0 {
                    if let Err(e) = b.read(offset, &mut buf) {
                        return (self.fail(h, e), Vec::new());
                    }
                }
                let head = match (self.structured, len) {
                    (true, 0) => structured_none(h).to_vec(),
                    (true, _) => offset_data_header(h, offset, len).to_vec(),
                    (false, _) => simple_reply_header(0, h).to_vec(),
                };
                (head, buf)
            }
            Command::Write { offset, len, fua } => {
                let r = if len == 0 {
                    Ok(())
                } else {
                    b.write(offset, &job.payload, fua)
                };
                // Free the payload now rather than when the reply is written.
                job.payload = Vec::new();
                (self.done(h, r), Vec::new())
            }
            // `run` answers FLUSH itself, keeping the hold with the reply.
            Command::Flush => (self.done(h, b.flush().map(drop)), Vec::new()),
            Command::Trim { offset, len, fua } => {
                let mut r = if len == 0 {
                    Ok(())
                } else {
                    b.trim(offset, u64::from(len))
                };
                if fua && r.is_ok() {
                    // The trim itself is durable once this returns; its own
                    // reply needs no hold.
                    r = b.flush().map(drop);
                }
                (self.done(h, r), Vec::new())
            }
            Command::WriteZeroes { offset, len, fua } => {
                let r = if len == 0 {
                    Ok(())
                } else {
                    b.write_zeroes(offset, u64::from(len), fua)
                };
                (self.done(h, r), Vec::new())
            }
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => match b.block_status(offset, u64::from(len.min(BLOCK_STATUS_SPAN))) {
                Ok(extents) => {
                    let ex: Vec<(u64, u64, u32)> = extents
                        .iter()
                        .map(|e| (e.offset, e.len, allocation_flags(e.kind)))
                        .collect();
                    let span = len.min(BLOCK_STATUS_SPAN);
                    let descs = extents_to_descriptors(offset, span, &ex, req_one);
                    (
                        block_status_chunk(h, BASE_ALLOCATION_ID, &descs),
                        Vec::new(),
                    )
                }
                Err(e) => (self.fail(h, e), Vec::new()),
            },
            // The reader never queues a disconnect.
            Command::Disconnect => (Vec::new(), Vec::new()),
        }
    }
}

fn worker<B: Backend>(
    exec: Arc<Exec<B>>,
    jobs: Arc<Mutex<Receiver<Job>>>,
    replies: Sender<Reply>,
    inflight: Arc<AtomicUsize>,
) {
    loop {
        // Hold the lock only to take one job, not while running it.
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(mut job) = job else { return };
        // A bug below us must not leave the client waiting forever, nor
        // take the connection down: a panic becomes an EIO reply.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exec.run(&mut job)));
        let (head, data, hold) = ran.unwrap_or_else(|_| {
            warn!(export = %exec.name, "request handler panicked");
            let msg = "internal error";
            (
                error_reply(exec.structured, job.handle, EIO, msg),
                Vec::new(),
                None,
            )
        });
        let sent = replies.send(Reply {
            head,
            data,
            hold,
            _permit: job.permit,
        });
        inflight.fetch_sub(1, Ordering::SeqCst);
        if sent.is_err() {
            return;
        }
    }
}

/// The connection's workers, started on demand: one at first, another
/// whenever more jobs are in flight than there are workers, up to the
/// limit. An idle connection thus costs three threads, not 2 + limit.
struct Pool<B> {
    exec: Arc<Exec<B>>,
    jobs_tx: mpsc::SyncSender<Job>,
    jobs_rx: Arc<Mutex<Receiver<Job>>>,
    replies: Sender<Reply>,
    inflight: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
    max: usize,
}

impl<B: Backend> Pool<B> {
    fn new(exec: Arc<Exec<B>>, replies: Sender<Reply>, max: usize) -> Self {
        let max = max.max(1);
        // Bounded: the reader waits here once every worker is busy and a
        // few jobs are queued, on top of the byte budget.
        let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job>(max * 2);
        Pool {
            exec,
            jobs_tx,
            jobs_rx: Arc::new(Mutex::new(jobs_rx)),
            replies,
            inflight: Arc::new(AtomicUsize::new(0)),
            threads: Vec::new(),
            max,
        }
    }

    fn grow_if_busy(&mut self) {
        let busy = self.inflight.load(Ordering::SeqCst);
        if busy < self.threads.len() || self.threads.len() >= self.max {
            return;
        }
        let (exec, jobs, replies, inflight) = (
            self.exec.clone(),
            self.jobs_rx.clone(),
            self.replies.clone(),
            self.inflight.clone(),
        );
        match std::thread::Builder::new()
            .name(format!("nbd-worker-{}", self.threads.len()))
            .spawn(move || worker(exec, jobs, replies, inflight))
        {
            Ok(t) => self.threads.push(t),
            // With no worker at all, `submit` runs jobs inline instead.
            Err(e) => warn!("cannot start a worker thread: {e}"),
        }
    }

    fn submit(&mut self, job: Job) -> Result<(), &'static str> {
        self.grow_if_busy();
        if self.threads.is_empty() {
            let mut job = job;
            let (head, data, hold) = self.exec.run(&mut job);
            let _ = self.replies.send(Reply {
                head,
                data,
                hold,
                _permit: job.permit,
            });
            return Ok(());
        }
        self.inflight.fetch_add(1, Ordering::SeqCst);
        self.jobs_tx.send(job).map_err(|_| "workers are gone")
    }

    /// Let the workers finish what is queued, and wait for them.
    fn finish(self) {
        drop(self.jobs_tx);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn writer(stream: Stream, replies: Receiver<Reply>, broken: Arc<AtomicBool>) {
    let mut w = BufWriter::with_capacity(256 * 1024, stream);
    let mut ok = true;
    loop {
        let r = match replies.try_recv() {
            Ok(r) => r,
            Err(TryRecvError::Empty) => {
                // Nothing more queued: push out what is buffered, then wait.
                if ok && w.flush().is_err() {
                    ok = false;
                }
                match replies.recv() {
                    Ok(r) => r,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        if ok && (w.write_all(&r.head).is_err() || w.write_all(&r.data).is_err()) {
            ok = false;
        }
        if r.hold.is_some() && ok && w.flush().is_err() {
            // A FLUSH reply goes out now: its hold is dropped (below) only
            // once the reply is on the socket, not in our buffer.
            ok = false;
        }
        drop(r);
        if !ok && !broken.swap(true, Ordering::SeqCst) {
            // Wake the reader: nothing more can be answered. Later replies
            // are still received and dropped, which frees their permits.
            let _ = w.get_ref().shutdown(Shutdown::Both);
        }
    }
    if ok {
        let _ = w.flush();
    }
}

/// Why a connection ended, for the log.
#[derive(Debug)]
pub enum End {
    Disconnect,
    Closed,
    Stopped,
    WriterFailed,
    Error(String),
}

/// Serve requests until the client disconnects, the connection breaks, or
/// the server stops. In-flight requests are always finished and answered
/// (if the socket still works) before this returns.
pub fn serve<B: Backend, R: Read>(
    n: Negotiated<B>,
    rd: &mut MsgReader<R>,
    wstream: Stream,
    limits: &Limits,
) -> End {
    let cx = TransmissionContext {
        size: n.size,
        read_only: n.flags & TFLAG_READ_ONLY != 0,
        structured: n.structured,
        meta_context: n.meta_context,
        max_request: limits.max_request,
    };
    let exec = Arc::new(Exec {
        backend: n.export.backend.clone(),
        structured: n.structured,
        live: Liveness {
            dead: AtomicBool::new(false),
            last_check_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        },
        name: n.name.clone(),
    });
    let broken = Arc::new(AtomicBool::new(false));
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>();
    let writer_thread = {
        let broken = broken.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-writer".into())
            .spawn(move || writer(wstream, reply_rx, broken));
        match spawned {
            Ok(t) => t,
            Err(e) => return End::Error(format!("cannot start writer thread: {e}")),
        }
    };
    let mut pool = Pool::new(exec, reply_tx.clone(), limits.workers);
    let end = read_loop(rd, &cx, limits, &mut pool, &reply_tx, &broken);
    // Workers finish what is queued; then, with every sender gone, the
    // writer drains the replies and stops.
    pool.finish();
    drop(reply_tx);
    let _ = writer_thread.join();
    end
}

fn read_loop<B: Backend, R: Read>(
    rd: &mut MsgReader<R>,
    cx: &TransmissionContext,
    limits: &Limits,
    pool: &mut Pool<B>,
    reply_tx: &Sender<Reply>,
    broken: &AtomicBool,
) -> End {
    let mut hb = [0u8; REQUEST_HEADER_LEN];
    loop {
        if broken.load(Ordering::SeqCst) {
            return End::WriterFailed;
        }
        match rd.read_msg(&mut hb, true) {
            Ok(()) => {}
            Err(ReadError::Closed) => return End::Closed,
            Err(ReadError::Stopped) => return End::Stopped,
            Err(_) if broken.load(Ordering::SeqCst) => return End::WriterFailed,
            Err(e) => return End::Error(e.to_string()),
        }
        let h = match parse_request_header(&hb) {
            Ok(h) => h,
            Err(e) => return End::Error(format!("bad request header: {e}")),
        };
        match check_request(&h, cx) {
            Ok(Command::Disconnect) => return End::Disconnect,
            Ok(cmd) => {
                let (payload_len, reply_len) = match cmd {
                    Command::Write { len, .. } => (len as usize, 0),
                    Command::Read { len, .. } => (0, len as usize),
                    _ => (0, 0),
                };
                let permit = Permit::acquire(
                    &limits.conn_budget,
                    &limits.server_budget,
                    payload_len + reply_len + OVERHEAD,
                );
                let mut payload = Vec::new();
                if payload_len > 0 {
                    payload = vec![0u8; payload_len];
                    if let Err(e) = rd.read_msg(&mut payload, false) {
                        return End::Error(format!("reading write payload: {e}"));
                    }
                }
                let job = Job {
                    handle: h.handle,
                    cmd,
                    payload,
                    permit,
                };
                if let Err(e) = pool.submit(job) {
                    return End::Error(e.into());
                }
            }
            Err(rej) => {
                debug!(
                    cmd = h.cmd,
                    offset = h.offset,
                    len = h.len,
                    why = rej.why,
                    errno = rej.errno,
                    "request refused"
                );
                if rej.drain > 0 {
                    if let Err(e) = rd.discard(u64::from(rej.drain)) {
                        return End::Error(format!("skipping refused write payload: {e}"));
                    }
                }
                let permit = Permit::acquire(&limits.conn_budget, &limits.server_budget, OVERHEAD);
                let head = error_reply(cx.structured, h.handle, rej.errno, rej.why);
                let _ = reply_tx.send(Reply {
                    head,
                    data: Vec::new(),
                    hold: None,
                    _permit: permit,
                });
            }
        }
    }
}
