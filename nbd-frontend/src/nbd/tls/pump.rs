//! The TLS pump: one thread per TLS connection that moves bytes between
//! the client's socket (encrypted) and its end of a Unix socket pair
//! (plain), whose other end the connection's thread reads and writes as
//! if it were the client.
//!
//! Invariants:
//! - **Back-pressure, bounded memory.** Each direction holds at most one
//!   64 KiB buffer of plain text here, plus what the session buffers
//!   (bounded: see `session`). Decrypted bytes are taken from the session
//!   only when the previous ones are all on the pair, and encrypted bytes
//!   are read from the socket only when the session has no decrypted
//!   bytes left over; plain text is read from the pair only when the
//!   session took the previous piece. A side that stops taking bytes
//!   stops the other, never grows a buffer.
//! - **The two directions are independent**: a client that does not read
//!   replies does not stop its requests from flowing, and the other way
//!   round, as on a plain socket (libnbd writes requests while replies
//!   are outstanding).
//! - **Nothing blocks but `poll`**, over the fds whose readiness matters
//!   now (an fd is left out while none of its events is wanted, so a
//!   hang-up cannot spin the loop).
//! - **Ends**: the connection's thread closing its end (the pump queues
//!   close_notify, sends what is left, shuts the socket down); the client
//!   going away or a TLS error (the pump shuts its end of the pair down,
//!   so the connection's thread sees end-of-stream or EPIPE); or 120 s
//!   without the client taking any byte while output waits (as a plain
//!   connection's write timeout). The server's shutdown cuts the client's
//!   socket after its grace period, which ends the pump at once. The
//!   connection's thread joins the pump before it counts as ended, so no
//!   pump outlives the server.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::debug;

use super::session::{recv_nb, send_nb, NetSocket, Session};

/// Plain-text bytes moved per step, each way.
const CHUNK: usize = 64 * 1024;

/// A running pump; [`Pump::finish`] (or drop) ends the connection's side
/// and waits for the pump thread.
pub(crate) struct Pump {
    /// A clone of the connection's end of the pair, to shut down.
    conn_end: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl Pump {
    /// Start pumping between `net` (driven by `session`, its handshake
    /// done) and `pump_end` of the pair whose other end is `conn_end`.
    pub fn spawn(
        session: Box<dyn Session>,
        net: NetSocket,
        pump_end: UnixStream,
        conn_end: &UnixStream,
        write_timeout: Duration,
        peer: String,
    ) -> io::Result<Pump> {
        let conn_end = conn_end.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("nbd-tls".into())
            .spawn(move || {
                let mut flow = Flow::new(session, net, pump_end, write_timeout);
                match flow.run() {
                    Ok(()) => debug!(%peer, "TLS pump ended"),
                    Err(e) => debug!(%peer, "TLS pump ended: {e}"),
                }
                let _ = flow.net.stream().shutdown(Shutdown::Both);
                let _ = flow.plain.shutdown(Shutdown::Both);
            })?;
        Ok(Pump {
            conn_end,
            thread: Some(thread),
        })
    }

    /// The connection's thread is done with its end: let the pump flush
    /// what it holds and close, and wait for it.
    pub fn finish(mut self) {
        self.end();
    }

    fn end(&mut self) {
        let _ = self.conn_end.shutdown(Shutdown::Both);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("TLS pump thread panicked");
            }
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.end();
    }
}

/// A buffer with a pending range.
struct Buf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buf {
    fn new() -> Buf {
        Buf {
            data: vec![0u8; CHUNK].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }
    fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }
    fn clear(&mut self) {
        (self.start, self.end) = (0, 0);
    }
}

struct Flow {
    session: Box<dyn Session>,
    net: NetSocket,
    plain: UnixStream,
    write_timeout: Duration,
    /// Decrypted, not yet on the pair.
    to_conn: Buf,
    /// From the pair, not yet taken by the session.
    from_conn: Buf,
    /// The socket gave end-of-stream (or close_notify): read no more.
    net_eof: bool,
    /// The session has nothing more to decrypt.
    net_done: bool,
    /// The pair's write side was shut after `net_done`.
    told_conn: bool,
    /// The connection's thread closed its end: close_notify is queued.
    conn_done: bool,
    /// Writing to the pair failed: decrypted bytes are dropped.
    conn_gone: bool,
}

impl Flow {
    fn new(
        session: Box<dyn Session>,
        net: NetSocket,
        plain: UnixStream,
        write_timeout: Duration,
    ) -> Flow {
        Flow {
            session,
            net,
            plain,
            write_timeout,
            to_conn: Buf::new(),
            from_conn: Buf::new(),
            net_eof: false,
            net_done: false,
            told_conn: false,
            conn_done: false,
            conn_gone: false,
        }
    }

    /// Decrypted bytes to the connection's thread. True if anything moved.
    fn decrypted_to_conn(&mut self) -> io::Result<bool> {
        let mut moved = false;
        loop {
            if !self.to_conn.is_empty() {
                if self.conn_gone {
                    self.to_conn.clear();
                    continue;
                }
                match send_nb(self.plain.as_raw_fd(), self.to_conn.pending()) {
                    Ok(n) => {
                        self.to_conn.consume(n);
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        self.conn_gone = true;
                        moved = true;
                    }
                }
            } else if !self.net_done {
                match self.session.read_plain(&mut self.to_conn.data) {
                    Ok(0) => {
                        self.net_done = true;
                        moved = true;
                    }
                    Ok(n) => {
                        (self.to_conn.start, self.to_conn.end) = (0, n);
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        self.net_done = true;
                        moved = true;
                    }
                    Err(e) => return Err(e),
                }
            } else {
                break;
            }
        }
        if self.net_done {
            self.net_eof = true;
            if self.to_conn.is_empty() && !self.told_conn {
                // The client sends no more: the connection's thread sees
                // end-of-stream (its replies still go out).
                let _ = self.plain.shutdown(Shutdown::Write);
                self.told_conn = true;
            }
        }
        Ok(moved)
    }

    /// Plain text from the connection's thread into the session.
    fn conn_to_session(&mut self) -> io::Result<bool> {
        let mut moved = false;
        loop {
            if !self.from_conn.is_empty() {
                match self.session.write_plain(self.from_conn.pending())? {
                    0 => break,
                    n => {
                        self.from_conn.consume(n);
                        moved = true;
                    }
                }
            } else if !self.conn_done {
                match recv_nb(self.plain.as_raw_fd(), &mut self.from_conn.data) {
                    Ok(n) if n > 0 => {
                        (self.from_conn.start, self.from_conn.end) = (0, n);
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // End-of-stream, or the end is gone: the connection's
                    // thread is done. The client gets a close_notify after
                    // the bytes already taken.
                    _ => {
                        self.conn_done = true;
                        self.session.close_notify();
                        moved = true;
                    }
                }
            } else {
                break;
            }
        }
        Ok(moved)
    }

    fn run(&mut self) -> io::Result<()> {
        loop {
            let mut moved = self.decrypted_to_conn()?;
            moved |= self.conn_to_session()?;
            while self.session.wants_write() {
                match self.session.write_tls(&mut self.net) {
                    Ok(0) => break,
                    Ok(_) => moved = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            if self.conn_done && self.from_conn.is_empty() && !self.session.wants_write() {
                // All the connection's bytes and the close_notify are out.
                return Ok(());
            }
            if !self.net_eof && self.to_conn.is_empty() && self.session.wants_read() {
                match self.session.read_tls(&mut self.net) {
                    Ok(0) => {
                        self.net_eof = true;
                        moved = true;
                    }
                    Ok(_) => {
                        self.session.process().map_err(io::Error::other)?;
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if moved {
                continue;
            }
            self.wait()?;
        }
    }

    /// Block until a side can move, or fail after the write timeout with
    /// output waiting.
    fn wait(&self) -> io::Result<()> {
        let mut net_ev = 0;
        if !self.net_eof && self.to_conn.is_empty() && self.session.wants_read() {
            net_ev |= libc::POLLIN;
        }
        if self.session.wants_write() {
            net_ev |= libc::POLLOUT;
        }
        let mut plain_ev = 0;
        if !self.conn_done && self.from_conn.is_empty() {
            plain_ev |= libc::POLLIN;
        }
        if !self.to_conn.is_empty() && !self.conn_gone {
            plain_ev |= libc::POLLOUT;
        }
        if net_ev & libc::POLLIN != 0 && self.net.has_buffered() {
            // Bytes already read from the socket are still to be taken.
            return Ok(());
        }
        if net_ev == 0 && plain_ev == 0 {
            return Err(io::Error::other("TLS pump has nothing to wait for"));
        }
        // The socket is always watched, even for no event: its hang-up
        // (the server cutting it at shutdown) is always reported and ends
        // the pump. The pair is watched only for wanted events: its
        // hang-up with nothing to do would spin the loop.
        let mut fds = [
            libc::pollfd {
                fd: self.net.stream().as_raw_fd(),
                events: net_ev,
                revents: 0,
            },
            libc::pollfd {
                fd: if plain_ev != 0 {
                    self.plain.as_raw_fd()
                } else {
                    -1
                },
                events: plain_ev,
                revents: 0,
            },
        ];
        // Output waiting for the client bounds the wait; otherwise an idle
        // connection may stay idle.
        let timeout = if self.session.wants_write() {
            self.write_timeout.as_millis().min(i32::MAX as u128) as libc::c_int
        } else {
            -1
        };
        loop {
            // SAFETY: `fds` is a valid array of 2 pollfd structs borrowed
            // exclusively for the call; its descriptors are owned by
            // `self` (or are -1, which poll ignores).
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if rc == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("client took no bytes for {:?}", self.write_timeout),
                ));
            }
            if fds[0].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
                && fds[0].revents & libc::POLLIN == 0
            {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "client socket closed",
                ));
            }
            return Ok(());
        }
    }
}
