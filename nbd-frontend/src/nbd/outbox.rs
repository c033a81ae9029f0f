//! The sending side of one connection: replies waiting for the socket.
//!
//! Two kinds of writer share it. The connection's own thread queues its
//! inline replies and sends them with blocking writes, outside the lock:
//! if the client does not read, only that connection waits. Pool threads
//! serve every connection, so they must never wait on one client: they
//! queue their reply, send what the socket takes at once without blocking
//! (unless the connection's thread is sending, which would interleave),
//! and if bytes are left, ring the connection's bell: an eventfd its
//! thread polls while it waits for requests, and answers by sending.
//!
//! A FLUSH's hold stays queued with its reply and is dropped only once the
//! bytes up to the end of that reply are on the socket.

use std::io::{self, IoSlice, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use snapmv_engine::planted::{self, Bug};

use super::backend::FlushHold;
use super::io::Stream;

/// Replies this large, with nothing queued before them, are written
/// straight from the caller's buffer instead of being copied.
pub const DIRECT_MIN: usize = 64 * 1024;
/// Queue capacity kept between bursts.
const KEEP_CAPACITY: usize = 4 << 20;

pub struct Outbox {
    queue: Mutex<Queue>,
    /// Written only by whoever is sending: the connection's thread with
    /// `sending` set (outside the lock), or a pool thread under the lock.
    stream: Stream,
    bell: OwnedFd,
}

struct Queue {
    buf: Vec<u8>,
    /// Bytes of `buf` already sent.
    sent: usize,
    /// FLUSH holds, each with the offset in `buf` where its reply ends.
    holds: Vec<(usize, FlushHold)>,
    /// The connection's thread is writing outside the lock.
    sending: bool,
    broken: bool,
}

impl Queue {
    fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }

    fn advance(&mut self, n: usize) {
        self.sent += n;
        // Holds whose reply is out may go now.
        let sent = self.sent;
        self.holds.retain(|(end, _)| *end > sent);
        if self.pending() == 0 {
            self.buf.clear();
            self.sent = 0;
            if self.buf.capacity() > KEEP_CAPACITY {
                self.buf = Vec::new();
            }
        }
    }
}

impl Outbox {
    pub fn new(stream: Stream) -> io::Result<Outbox> {
        // SAFETY: eventfd takes no pointers; a negative result is an error.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let bell = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Outbox {
            queue: Mutex::new(Queue {
                buf: Vec::new(),
                sent: 0,
                holds: Vec::new(),
                sending: false,
                broken: false,
            }),
            stream,
            bell,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing under this lock panics between updates of the queue.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The descriptor that becomes readable when a pool thread left bytes
    /// for the connection's thread to send.
    pub fn bell_fd(&self) -> RawFd {
        self.bell.as_raw_fd()
    }

    pub fn is_broken(&self) -> bool {
        self.lock().broken
    }

    /// Whether the connection's thread should send before it reads on:
    /// `flush_at` bytes are queued, or a FLUSH's reply (whose hold makes
    /// every completing write durable on its own until it is out).
    pub fn needs_push(&self, flush_at: usize) -> bool {
        let q = self.lock();
        q.pending() >= flush_at || !q.holds.is_empty()
    }

    /// Queue one inline reply; send the queue once it passes `flush_at`
    /// bytes, or at once when it carries a hold. The connection's thread.
    pub fn reply_inline(&self, head: &[u8], data: &[u8], hold: Option<FlushHold>, flush_at: usize) {
        let mut q = self.lock();
        if q.broken {
            return;
        }
        if q.pending() == 0 && data.len() >= DIRECT_MIN {
            // Nobody else sends while we do: pool threads see `sending`.
            q.sending = true;
            drop(q);
            let ok =
                write_all_vectored(&self.stream, &mut [IoSlice::new(head), IoSlice::new(data)]);
            drop(hold);
            self.sent_outside(ok);
            // A pool thread may have queued a FLUSH reply meanwhile: its
            // hold makes every write completing before it goes out durable
            // on its own, so it must not wait for our next pause.
            if self.lock().holds.is_empty() {
                return;
            }
            return self.send_blocking();
        }
        q.buf.extend_from_slice(head);
        q.buf.extend_from_slice(data);
        // Queued holds (ours or a pool thread's FLUSH) go out at once: while
        // one waits here, every completing write is made durable alone.
        let push = hold.is_some() || !q.holds.is_empty() || q.pending() >= flush_at;
        if let Some(h) = hold {
            let end = q.buf.len();
            q.holds.push((end, h));
        }
        drop(q);
        if push {
            self.send_blocking();
        }
    }

    /// Send everything queued, waiting for the socket as long as its write
    /// timeout allows. The connection's thread only.
    pub fn send_blocking(&self) {
        loop {
            let mut q = self.lock();
            if q.broken || q.pending() == 0 {
                return;
            }
            assert!(
                !q.sending,
                "only the connection's thread sends outside the lock"
            );
            q.sending = true;
            let mut batch = std::mem::take(&mut q.buf);
            let from = std::mem::replace(&mut q.sent, 0);
            let holds = std::mem::take(&mut q.holds);
            drop(q);
            let ok = write_all_vectored(&self.stream, &mut [IoSlice::new(&batch[from..])]);
            // Every hold taken belonged to a reply in the batch.
            drop(holds);
            batch.clear();
            let mut q = self.lock();
            if q.buf.is_empty() && batch.capacity() <= KEEP_CAPACITY {
                q.buf = batch;
            }
            drop(q);
            self.sent_outside(ok);
        }
    }

    /// Queue a pool thread's reply and send what the socket takes now;
    /// ring the bell for the rest.
    pub fn reply_from_pool(&self, head: &[u8], data: &[u8], hold: Option<FlushHold>) {
        let mut q = self.lock();
        if q.broken {
            return;
        }
        q.buf.extend_from_slice(head);
        q.buf.extend_from_slice(data);
        if let Some(h) = hold {
            let end = q.buf.len();
            q.holds.push((end, h));
        }
        if q.sending {
            // The connection's thread is mid-write; it looks again after.
            return self.ring();
        }
        if planted::on(Bug::PoolBlocksOnClient) {
            // Planted: wait on the client's socket from a pool thread.
            let from = q.sent;
            let ok = write_all_vectored(&self.stream, &mut [IoSlice::new(&q.buf[from..])]);
            let n = q.pending();
            q.advance(n);
            if !ok {
                self.fail(&mut q);
            }
            return;
        }
        while q.pending() > 0 {
            match self.send_now(&q.buf[q.sent..]) {
                Ok(Some(n)) => q.advance(n),
                Ok(None) => return self.ring(),
                Err(_) => return self.fail(&mut q),
            }
        }
    }

    /// One non-blocking send: `None` when the socket is full.
    fn send_now(&self, bytes: &[u8]) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: `bytes` is a valid buffer of `bytes.len()` bytes, and
            // the descriptor is owned by `stream`.
            let rc = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if rc > 0 {
                return Ok(Some(rc as usize));
            }
            let e = if rc == 0 {
                io::Error::from(io::ErrorKind::WriteZero)
            } else {
                io::Error::last_os_error()
            };
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(e),
            }
        }
    }

    fn sent_outside(&self, ok: bool) {
        let mut q = self.lock();
        q.sending = false;
        if !ok {
            self.fail(&mut q);
        }
    }

    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an owned eventfd. A
        // full counter (EAGAIN) means the bell is already ringing.
        let _ = unsafe { libc::write(self.bell.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Nothing more can be sent: drop what is queued (holds with it) and
    /// shut the socket, which also wakes the connection's reader.
    fn fail(&self, q: &mut Queue) {
        q.broken = true;
        q.buf = Vec::new();
        q.sent = 0;
        q.holds.clear();
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Blocking vectored write of every slice; false on any failure.
fn write_all_vectored(stream: &Stream, mut slices: &mut [IoSlice<'_>]) -> bool {
    let mut w = stream;
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return false,
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// Quiet a rung bell (the connection's thread, before it sends).
pub fn silence(bell: RawFd) {
    let mut count: u64 = 0;
    // SAFETY: reads 8 bytes into a valid u64 from a non-blocking eventfd;
    // EAGAIN (not rung) is fine.
    let _ = unsafe { libc::read(bell, (&mut count as *mut u64).cast(), 8) };
}
