//! The transmission phase of one connection.
//!
//! The connection's thread reads each request, checks it, and serves it
//! **inline**: it runs the request against the backend and appends the
//! reply to the connection's reply buffer, which goes out whenever the
//! thread is about to wait for the client (and when it fills). A pipeline
//! of small requests thus costs no thread hand-off at all, and one `recv`
//! and one `send` for many requests.
//!
//! A request that must wait is **handed off** to the server's shared
//! [`WorkerPool`], so it does not hold up the requests behind it: FLUSH and
//! FUA requests (they wait for a commit), and, while this connection's
//! requests are slow (they spend, on average, longer off the CPU after
//! blocking than a page-cache request takes in all: the disk), every
//! request. A request that is long but never blocks (busy copying), or
//! blocks only briefly (a lock), is not slow: on more threads it would
//! only contend for the same cores and locks. The
//! pool writes the reply itself, under the reply buffer's lock. A
//! connection has at most `parallel` requests in the pool; beyond that,
//! or when the pool's queue is full, it runs them inline.
//!
//! Framing is whatever negotiation chose ([`ReplyStyle`]): with extended
//! headers each request header is 32 bytes (64-bit length) and every
//! reply, errors and refusals included, starts with a 32-byte extended
//! chunk header; BLOCK_STATUS answers with BLOCK_STATUS_EXT. Only the
//! encodings differ: the path above is the same for every style.
//!
//! Memory is bounded by the permits: a request holds `payload + OVERHEAD`
//! bytes of the connection's budget and of the server's from the moment
//! its header is read until its reply is written. A client that stops
//! reading replies blocks the thread writing to it, until the socket's
//! write timeout: only that connection stalls, and it has at most
//! `parallel` pool threads with it.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use tracing::{debug, warn};

use super::backend::{allocation_flags, BResult, Backend, FlushHold};
use super::budget::{Budget, Permit};
use super::io::{MsgReader, ReadError, Stream};
use super::negotiate::Negotiated;
use super::outbox::Outbox;
use super::pool::WorkerPool;
use super::proto::*;

/// Bytes charged per request on top of its payload, so that requests
/// without payload (FLUSH, TRIM, ...) are bounded in number too.
pub const OVERHEAD: usize = 4096;
/// How often (at most) a connection asks the engine whether its version
/// still exists, besides asking after every failed operation.
const LIVE_CHECK_MS: u64 = 100;
/// The engine is asked about at most this much per compact BLOCK_STATUS;
/// the reply may cover less than asked, and clients continue from where it
/// ends. With extended headers the whole request goes to the engine, which
/// bounds its own work (65536 chunks a call, answering less than asked), so
/// a BLOCK_STATUS_EXT reply may cover more than 4 GiB (all of an origin,
/// which the engine describes in one extent).
const BLOCK_STATUS_SPAN: u64 = 512 << 20;
/// A connection whose requests take longer than this on average (beyond
/// the time to copy their bytes) is "slow": its requests are waiting on
/// the disk or a lock, so running them one by one would serialise waits
/// that the device could overlap. Page-cache requests take a few µs.
const SLOW_REQUEST_NS: u64 = 40_000;
/// Bytes per µs assumed for copying a request's data (about 2 GB/s, well
/// under memory bandwidth), so that large requests are not called slow.
const COPY_BYTES_PER_US: u64 = 2048;
/// Bytes kept in a connection's reusable buffers between requests.
const KEEP_SCRATCH: usize = 4 << 20;
/// Replies buffered before they are pushed out even if more requests are
/// queued behind.
const REPLY_BUFFER: usize = 256 * 1024;

pub struct Limits {
    pub max_request: u32,
    /// Requests of one connection that may be in the pool at once.
    pub parallel: usize,
    pub conn_budget: Arc<Budget>,
    pub server_budget: Arc<Budget>,
    pub pool: Arc<WorkerPool>,
}

/// A reply's head (and a READ's data), reused from request to request.
#[derive(Default)]
struct ReplyBuf {
    head: Vec<u8>,
    data: Vec<u8>,
}

impl ReplyBuf {
    fn trim(&mut self) {
        for v in [&mut self.head, &mut self.data] {
            if v.capacity() > KEEP_SCRATCH {
                *v = Vec::new();
            }
        }
    }
}

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

fn error_reply(out: &mut Vec<u8>, style: ReplyStyle, to: ReplyTo, errno: u32, msg: &str) {
    out.clear();
    encode_error(out, style, to, errno, msg);
}

struct Exec<B> {
    backend: B,
    replies: ReplyStyle,
    live: Liveness,
    name: String,
    /// The metadata contexts selected at negotiation, in reply order. Only
    /// names and ids: every BLOCK_STATUS asks the engine afresh, so a write
    /// shows in the next reply.
    contexts: Vec<(u32, MetaContext)>,
}

impl<B: Backend> Exec<B> {
    fn fail(&self, out: &mut ReplyBuf, to: ReplyTo, e: snapmv_engine::Error) {
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
        out.data.clear();
        error_reply(&mut out.head, self.replies, to, errno, &e.to_string());
    }

    fn done(&self, out: &mut ReplyBuf, to: ReplyTo, r: BResult<()>) {
        out.data.clear();
        match r {
            Ok(()) => {
                out.head.clear();
                encode_done(&mut out.head, self.replies, to);
            }
            Err(e) => self.fail(out, to, e),
        }
    }

    /// Run one request into `out`; a FLUSH also gives its hold, which must
    /// live until the reply is on the socket. A panic below us becomes an
    /// EIO reply: it must neither leave the client waiting forever nor take
    /// the connection down.
    fn run(
        &self,
        to: ReplyTo,
        cmd: Command,
        payload: &[u8],
        out: &mut ReplyBuf,
    ) -> Option<FlushHold> {
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run_unguarded(to, cmd, payload, out)
        }));
        ran.unwrap_or_else(|_| {
            warn!(export = %self.name, "request handler panicked");
            out.data.clear();
            error_reply(&mut out.head, self.replies, to, EIO, "internal error");
            None
        })
    }

    fn run_unguarded(
        &self,
        to: ReplyTo,
        cmd: Command,
        payload: &[u8],
        out: &mut ReplyBuf,
    ) -> Option<FlushHold> {
        let b = &self.backend;
        if self.live.is_dead(b, false) {
            out.data.clear();
            let msg = "the exported version was deleted";
            error_reply(&mut out.head, self.replies, to, ESHUTDOWN, msg);
            return None;
        }
        match cmd {
            Command::Read { offset, len } => self.read(to, offset, len, out),
            Command::Write { offset, len, fua } => {
                let r = if len == 0 {
                    Ok(())
                } else {
                    b.write(offset, payload, fua)
                };
                self.done(out, to, r);
            }
            Command::Flush => match b.flush() {
                Ok(hold) => {
                    self.done(out, to, Ok(()));
                    return Some(hold);
                }
                Err(e) => self.fail(out, to, e),
            },
            Command::Trim { offset, len, fua } => {
                let mut r = if len == 0 {
                    Ok(())
                } else {
                    b.trim(offset, len)
                };
                if fua && r.is_ok() {
                    // The trim itself is durable once this returns; its own
                    // reply needs no hold.
                    r = b.flush().map(drop);
                }
                self.done(out, to, r);
            }
            Command::WriteZeroes { offset, len, fua } => {
                let r = if len == 0 {
                    Ok(())
                } else {
                    b.write_zeroes(offset, len, fua)
                };
                self.done(out, to, r);
            }
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => self.block_status(to, offset, len, req_one, out),
            // The reader never runs a disconnect.
            Command::Disconnect => unreachable!("a disconnect is not a request to run"),
        }
        None
    }

    fn read(&self, to: ReplyTo, offset: u64, len: u32, out: &mut ReplyBuf) {
        // Reused: the engine overwrites every byte, so stale contents from
        // an earlier request never leak (only growth is zero-filled).
        out.data.resize(len as usize, 0);
        if len > 0 {
            if let Err(e) = self.backend.read(offset, &mut out.data) {
                return self.fail(out, to, e);
            }
        }
        out.head.clear();
        encode_read_head(&mut out.head, self.replies, to, len);
    }

    /// One chunk per selected context, each from the engine's current
    /// metadata, the last one flagged done. Any failure answers the whole
    /// request with one error.
    fn block_status(&self, to: ReplyTo, offset: u64, len: u64, req_one: bool, out: &mut ReplyBuf) {
        let span = match self.replies {
            ReplyStyle::Extended => len,
            _ => len.min(BLOCK_STATUS_SPAN),
        };
        out.data.clear();
        out.head.clear();
        let n = self.contexts.len();
        for (i, &(id, ctx)) in self.contexts.iter().enumerate() {
            let descs = match ctx {
                MetaContext::BaseAllocation | MetaContext::AllocationDepth => {
                    let runs = match ctx {
                        MetaContext::BaseAllocation => {
                            self.backend.block_status(offset, span).map(|e| {
                                let flags = e
                                    .iter()
                                    .map(|e| (e.offset, e.len, allocation_flags(e.kind)));
                                flags.collect::<Vec<_>>()
                            })
                        }
                        _ => self.backend.allocation_depth(offset, span),
                    };
                    let ex = match runs {
                        Ok(ex) if !ex.is_empty() => ex,
                        // Nothing described: say nothing (a context's
                        // default is not always the safe answer).
                        Ok(_) => return self.fail(out, to, no_extents()),
                        Err(e) => return self.fail(out, to, e),
                    };
                    let described = ex
                        .last()
                        .map_or(span, |&(o, l, _)| o.saturating_add(l).min(offset + span));
                    extents_to_descriptors(offset, described - offset, &ex, req_one)
                }
                MetaContext::ChangedSince(other) => {
                    match self.backend.diff_from(other, offset, span) {
                        Ok((changed, end)) => {
                            let end = end.min(offset + span);
                            if end <= offset {
                                // Nothing decided: all of it may differ.
                                vec![(span, STATE_CHANGED)]
                            } else {
                                let ex = changed_triples(offset, end, &changed);
                                extents_to_descriptors(offset, end - offset, &ex, req_one)
                            }
                        }
                        Err(e) => return self.fail(out, to, e),
                    }
                }
            };
            encode_block_status_chunk(&mut out.head, self.replies, to, id, &descs, i + 1 == n);
        }
    }
}

fn no_extents() -> snapmv_engine::Error {
    snapmv_engine::Error::Invalid("the engine described no extent".into())
}

/// What one connection's thread and its requests in the pool share.
struct Connection<B> {
    exec: Exec<B>,
    outbox: Outbox,
    /// Requests of this connection in the pool, and a wake-up when one ends.
    in_pool: Mutex<usize>,
    pool_done: Condvar,
    /// Moving average of recent requests' time beyond copying their bytes.
    slowness_ns: AtomicU64,
}

impl<B: Backend> Connection<B> {
    /// Send what is queued (before the thread waits for the client).
    fn push(&self) -> io::Result<()> {
        self.outbox.send_blocking();
        Ok(())
    }

    /// Start timing a request. While the connection's requests cost more
    /// than a quarter of the slow mark, also read the thread's usage (a
    /// `getrusage`, cheap next to such a request): then only time spent
    /// off the CPU after blocking counts. A request that never blocked was
    /// busy on the CPU, and one that blocked only briefly met a lock: on
    /// more threads either would only contend for the same cores and
    /// locks. Reads from the disk are what overlapping pays for.
    fn start_timing(&self, cmd: &Command) -> Option<Timing> {
        if waits_for_commit(cmd) {
            // A commit's wait says nothing about the data path.
            return None;
        }
        let suspect = self.slowness_ns.load(Ordering::Relaxed) > SLOW_REQUEST_NS / 4;
        Some(Timing {
            started: Instant::now(),
            usage: suspect.then(ThreadUsage::now).flatten(),
        })
    }

    fn note_time(&self, timing: Option<Timing>, bytes: usize) {
        let Some(t) = timing else { return };
        let spent = t.started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        let sample = match (t.usage, ThreadUsage::now()) {
            (Some(before), Some(after)) if after.blocks == before.blocks => 0,
            (Some(before), Some(after)) => {
                spent.saturating_sub(after.cpu_ns.saturating_sub(before.cpu_ns))
            }
            _ => spent.saturating_sub((bytes as u64 / COPY_BYTES_PER_US).saturating_mul(1000)),
        };
        let avg = self.slowness_ns.load(Ordering::Relaxed);
        // A moving average over about eight requests.
        let next = avg - avg / 8 + sample / 8;
        self.slowness_ns.store(next, Ordering::Relaxed);
    }

    fn slow(&self) -> bool {
        self.slowness_ns.load(Ordering::Relaxed) > SLOW_REQUEST_NS
    }

    fn in_pool(&self) -> MutexGuard<'_, usize> {
        self.in_pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait until none of this connection's requests is in the pool.
    fn wait_for_pool(&self) {
        let mut n = self.in_pool();
        while *n > 0 {
            n = self.pool_done.wait(n).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// When a request started, and the thread's usage then (when watched).
struct Timing {
    started: Instant,
    usage: Option<ThreadUsage>,
}

/// The calling thread's voluntary context switches (it waited on I/O, a
/// lock or a condition that many times) and CPU time so far.
#[derive(Clone, Copy)]
struct ThreadUsage {
    blocks: u64,
    cpu_ns: u64,
}

impl ThreadUsage {
    fn now() -> Option<ThreadUsage> {
        // SAFETY: getrusage writes one rusage struct into the zeroed one
        // we own; RUSAGE_THREAD asks about the calling thread only.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
        let micros = |t: libc::timeval| (t.tv_sec as u64) * 1_000_000 + t.tv_usec as u64;
        (rc == 0).then(|| ThreadUsage {
            blocks: usage.ru_nvcsw as u64,
            cpu_ns: (micros(usage.ru_utime) + micros(usage.ru_stime)) * 1000,
        })
    }
}

/// One request, with what it holds until its reply is written.
struct Request {
    to: ReplyTo,
    cmd: Command,
    permit: Permit,
}

fn payload_bytes(cmd: &Command) -> usize {
    match *cmd {
        Command::Write { len, .. } | Command::Read { len, .. } => len as usize,
        _ => 0,
    }
}

/// Whether a request waits for the disk whatever the cache holds.
fn waits_for_commit(cmd: &Command) -> bool {
    match *cmd {
        Command::Flush => true,
        Command::Write { fua, .. }
        | Command::Trim { fua, .. }
        | Command::WriteZeroes { fua, .. } => fua,
        _ => false,
    }
}

/// Try to run `req` in the pool; give its payload back if it must run
/// inline (the connection's share of the pool is used up, or the pool's
/// queue is full).
fn hand_off<B: Backend>(
    conn: &Arc<Connection<B>>,
    req: Request,
    payload: Vec<u8>,
    limits: &Limits,
) -> Result<(), (Request, Vec<u8>)> {
    {
        let mut n = conn.in_pool();
        if *n >= limits.parallel {
            return Err((req, payload));
        }
        *n += 1;
    }
    // The task owns everything it needs, and hands both back if refused.
    let shared = Arc::new(Mutex::new(Some((req, payload))));
    let task = {
        let (conn, shared) = (conn.clone(), shared.clone());
        Box::new(move || {
            let taken = shared.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some((req, payload)) = taken {
                run_in_pool(&conn, req, payload);
            }
        })
    };
    if limits.pool.try_submit(task).is_ok() {
        return Ok(());
    }
    *conn.in_pool() -= 1;
    let back = shared.lock().unwrap_or_else(|p| p.into_inner()).take();
    Err(back.expect("a refused task was never run"))
}

fn run_in_pool<B: Backend>(conn: &Connection<B>, req: Request, payload: Vec<u8>) {
    let mut reply = ReplyBuf::default();
    let timing = conn.start_timing(&req.cmd);
    let hold = conn.exec.run(req.to, req.cmd, &payload, &mut reply);
    conn.note_time(timing, payload.len().max(reply.data.len()));
    drop(payload);
    // The outbox keeps a FLUSH's hold until its reply is out.
    conn.outbox.reply_from_pool(&reply.head, &reply.data, hold);
    drop(req.permit);
    let mut n = conn.in_pool();
    *n -= 1;
    drop(n);
    conn.pool_done.notify_all();
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
/// the server stops. Requests in the pool are always finished and answered
/// (if the socket still works) before this returns.
pub fn serve<B: Backend>(
    n: Negotiated<B>,
    rd: &mut MsgReader,
    wstream: Stream,
    limits: &Limits,
) -> End {
    let cx = TransmissionContext {
        size: n.size,
        read_only: n.flags & TFLAG_READ_ONLY != 0,
        replies: n.replies,
        meta_context: !n.contexts.is_empty(),
        max_request: limits.max_request,
    };
    let outbox = match Outbox::new(wstream) {
        Ok(o) => o,
        Err(e) => return End::Error(format!("cannot create the reply bell: {e}")),
    };
    rd.set_bell(outbox.bell_fd());
    let conn = Arc::new(Connection {
        exec: Exec {
            backend: n.export.backend.clone(),
            replies: n.replies,
            live: Liveness {
                dead: AtomicBool::new(false),
                last_check_ms: AtomicU64::new(0),
                epoch: Instant::now(),
            },
            name: n.name.clone(),
            contexts: n.contexts.clone(),
        },
        outbox,
        in_pool: Mutex::new(0),
        pool_done: Condvar::new(),
        slowness_ns: AtomicU64::new(0),
    });
    let end = read_loop(rd, &cx, limits, &conn);
    conn.wait_for_pool();
    let _ = conn.push();
    end
}

fn read_loop<B: Backend>(
    rd: &mut MsgReader,
    cx: &TransmissionContext,
    limits: &Limits,
    conn: &Arc<Connection<B>>,
) -> End {
    let mut payload = Vec::new();
    let mut reply = ReplyBuf::default();
    loop {
        if conn.outbox.is_broken() {
            return End::WriterFailed;
        }
        if conn.outbox.needs_push(REPLY_BUFFER) {
            // Pool replies the client has not taken yet: no more requests
            // until they are out, so a client that does not read cannot
            // make the queue grow (and a FLUSH's reply waits for nobody).
            conn.outbox.send_blocking();
        }
        let h = match next_header(rd, cx.replies, conn) {
            Ok(h) => h,
            Err(end) => return end,
        };
        let cmd = match check_request(&h, cx) {
            Ok(Command::Disconnect) => return End::Disconnect,
            Ok(cmd) => cmd,
            Err(rej) => {
                if let Err(e) = refuse(rd, cx, limits, conn, &h, rej, &mut reply) {
                    return e;
                }
                continue;
            }
        };
        let permit = Permit::acquire(
            &limits.conn_budget,
            &limits.server_budget,
            payload_bytes(&cmd) + OVERHEAD,
        );
        payload.clear();
        if let Command::Write { len, .. } = cmd {
            payload.resize(len as usize, 0);
            if let Err(e) = rd.read_msg_or(&mut payload, false, &mut || conn.push()) {
                return End::Error(format!("reading write payload: {e}"));
            }
        }
        let req = Request {
            to: ReplyTo {
                handle: h.handle,
                offset: h.offset,
            },
            cmd,
            permit,
        };
        // A slow connection hands off everything: a thread wake-up is
        // cheap next to a request that waits on the disk.
        let wants_pool = waits_for_commit(&cmd) || conn.slow();
        let req = if wants_pool {
            match hand_off(conn, req, std::mem::take(&mut payload), limits) {
                Ok(()) => continue,
                Err((req, back)) => {
                    payload = back;
                    req
                }
            }
        } else {
            req
        };
        run_inline(conn, req, &payload, &mut reply);
        if payload.capacity() > KEEP_SCRATCH {
            payload = Vec::new();
        }
        reply.trim();
    }
}

/// Wait for the next request header (sending queued replies first) and
/// parse it: 32 bytes once extended headers are on, 28 otherwise.
fn next_header<B: Backend>(
    rd: &mut MsgReader,
    style: ReplyStyle,
    conn: &Connection<B>,
) -> Result<RequestHeader, End> {
    let mut buf = [0u8; EXTENDED_REQUEST_HEADER_LEN];
    let header = match style {
        ReplyStyle::Extended => &mut buf[..],
        _ => &mut buf[..REQUEST_HEADER_LEN],
    };
    match rd.read_msg_or(header, true, &mut || conn.push()) {
        Ok(()) => {}
        Err(ReadError::Closed) => return Err(End::Closed),
        Err(ReadError::Stopped) => return Err(End::Stopped),
        Err(_) if conn.outbox.is_broken() => return Err(End::WriterFailed),
        Err(e) => return Err(End::Error(e.to_string())),
    }
    let parsed = match style {
        ReplyStyle::Extended => parse_extended_request_header(header),
        _ => parse_request_header(header),
    };
    parsed.map_err(|e| End::Error(format!("bad request header: {e}")))
}

fn run_inline<B: Backend>(
    conn: &Connection<B>,
    req: Request,
    payload: &[u8],
    reply: &mut ReplyBuf,
) {
    let timing = conn.start_timing(&req.cmd);
    let hold = conn.exec.run(req.to, req.cmd, payload, reply);
    conn.note_time(timing, payload.len().max(reply.data.len()));
    // A FLUSH run inline (its share of the pool used up) still pushes its
    // reply out before its hold goes.
    conn.outbox
        .reply_inline(&reply.head, &reply.data, hold, REPLY_BUFFER);
    drop(req.permit);
}

/// Answer a refused request with its error, skipping a WRITE's payload.
fn refuse<B: Backend>(
    rd: &mut MsgReader,
    cx: &TransmissionContext,
    limits: &Limits,
    conn: &Connection<B>,
    h: &RequestHeader,
    rej: Rejection,
    reply: &mut ReplyBuf,
) -> Result<(), End> {
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
            return Err(End::Error(format!("skipping refused write payload: {e}")));
        }
    }
    let permit = Permit::acquire(&limits.conn_budget, &limits.server_budget, OVERHEAD);
    reply.data.clear();
    let to = ReplyTo {
        handle: h.handle,
        offset: h.offset,
    };
    error_reply(&mut reply.head, cx.replies, to, rej.errno, rej.why);
    conn.outbox
        .reply_inline(&reply.head, &reply.data, None, REPLY_BUFFER);
    drop(permit);
    Ok(())
}
