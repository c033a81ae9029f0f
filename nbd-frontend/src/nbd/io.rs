//! Sockets (TCP or Unix) and a reader that notices server shutdown.
//!
//! The reader keeps its own buffer and never sleeps or polls on a timer.
//! It first reads without blocking; only when the socket is empty does it
//! call the caller's `before_wait` (the transmission phase flushes its
//! buffered replies there) and block in `poll` on the socket and, at a
//! message boundary, on the server's stop descriptor, which becomes
//! readable once and stays so. A stop is thus noticed at once, but only
//! between messages: inside a message the reader keeps waiting for the
//! rest, so our own shutdown never cuts a request in half. A client that
//! stalls mid-message during shutdown is cut by the server after its grace
//! period (it shuts the socket down, which ends the wait).

use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Bytes the reader buffers; a larger read goes straight to the caller's
/// buffer once this one is empty.
const READ_BUFFER: usize = 64 * 1024;

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
    pub fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(d),
            Stream::Unix(s) => s.set_write_timeout(d),
        }
    }
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }
    pub fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp:?".into()),
            Stream::Unix(_) => "unix".into(),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).write_vectored(bufs),
            Stream::Unix(s) => (&*s).write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// Why reading a message stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer closed cleanly between messages.
    #[error("peer closed the connection")]
    Closed,
    /// The server is shutting down and we were between messages.
    #[error("server shutting down")]
    Stopped,
    #[error("peer closed the connection in the middle of a message")]
    Truncated,
    #[error("peer sent nothing for {0:?}")]
    Idle(Duration),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// What the server's stop looks like to a reader: a flag, and a descriptor
/// that becomes readable when it is set and is never drained.
#[derive(Clone)]
pub struct StopSignal {
    pub flag: Arc<AtomicBool>,
    pub fd: RawFd,
}

/// Reads whole messages from a connection, watching the server's stop.
pub struct MsgReader {
    stream: Stream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    stop: StopSignal,
    /// Rung when someone else needs this thread to run `before_wait`.
    bell: Option<RawFd>,
    /// Give up if nothing arrives for this long (negotiation only).
    pub idle_limit: Option<Duration>,
}

/// What one attempt to receive gave.
enum Received {
    Bytes(usize),
    Eof,
    Empty,
}

impl MsgReader {
    /// The stream must be in blocking mode (writes rely on it); reads here
    /// never block in `recv` itself.
    pub fn new(stream: Stream, stop: StopSignal) -> Self {
        MsgReader {
            stream,
            buf: vec![0u8; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            stop,
            bell: None,
            idle_limit: None,
        }
    }

    /// Also wake up, and run `before_wait` again, when `fd` (an eventfd)
    /// becomes readable while waiting for the client.
    pub fn set_bell(&mut self, fd: RawFd) {
        self.bell = Some(fd);
    }

    /// Hand over the bytes read from the socket and not yet given out
    /// (after STARTTLS: maybe the start of the client's TLS handshake).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        let v = self.buf[self.start..self.end].to_vec();
        (self.start, self.end) = (0, 0);
        v
    }

    /// Read from `stream` from now on; returns the previous stream.
    pub fn replace_stream(&mut self, stream: Stream) -> Stream {
        std::mem::replace(&mut self.stream, stream)
    }

    pub fn stopping(&self) -> bool {
        self.stop.flag.load(Ordering::Relaxed)
    }

    /// Fill `buf`. `at_boundary` says `buf` starts a new message: only
    /// there do a clean EOF and a shutdown end the read quietly.
    pub fn read_msg(&mut self, buf: &mut [u8], at_boundary: bool) -> Result<(), ReadError> {
        self.read_msg_or(buf, at_boundary, &mut || Ok(()))
    }

    /// As [`read_msg`](Self::read_msg), calling `before_wait` each time the
    /// socket is empty, just before blocking on it.
    pub fn read_msg_or(
        &mut self,
        buf: &mut [u8],
        at_boundary: bool,
        before_wait: &mut dyn FnMut() -> io::Result<()>,
    ) -> Result<(), ReadError> {
        if at_boundary && self.stopping() {
            return Err(ReadError::Stopped);
        }
        let mut filled = 0;
        while filled < buf.len() {
            if self.start < self.end {
                let n = (self.end - self.start).min(buf.len() - filled);
                buf[filled..filled + n].copy_from_slice(&self.buf[self.start..self.start + n]);
                self.start += n;
                filled += n;
                continue;
            }
            let quiet = at_boundary && filled == 0;
            let want = buf.len() - filled;
            if want >= self.buf.len() {
                // A large payload: no point copying it through our buffer.
                filled += self.receive(&mut buf[filled..], quiet, before_wait)?;
            } else {
                let mut own = std::mem::take(&mut self.buf);
                let got = self.receive(&mut own, quiet, before_wait);
                self.buf = own;
                (self.start, self.end) = (0, got?);
            }
        }
        Ok(())
    }

    /// Receive at least one byte into `into`, waiting as long as it takes
    /// (or until a stop, when `quiet`, or the idle limit).
    fn receive(
        &mut self,
        into: &mut [u8],
        quiet: bool,
        before_wait: &mut dyn FnMut() -> io::Result<()>,
    ) -> Result<usize, ReadError> {
        loop {
            match self.try_receive(into)? {
                Received::Bytes(n) => return Ok(n),
                Received::Eof if quiet => return Err(ReadError::Closed),
                Received::Eof => return Err(ReadError::Truncated),
                Received::Empty => {
                    before_wait()?;
                    self.wait(quiet)?;
                }
            }
        }
    }

    fn try_receive(&mut self, into: &mut [u8]) -> Result<Received, ReadError> {
        loop {
            // SAFETY: `into` is a valid, exclusively borrowed buffer of
            // `into.len()` bytes, and the descriptor is owned by `stream`.
            let rc = unsafe {
                libc::recv(
                    self.stream.as_raw_fd(),
                    into.as_mut_ptr().cast(),
                    into.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if rc > 0 {
                return Ok(Received::Bytes(rc as usize));
            }
            if rc == 0 {
                return Ok(Received::Eof);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(Received::Empty),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(ReadError::Io(e)),
            }
        }
    }

    /// Block until the socket is readable (or closed), the server stops
    /// (only when `watch_stop`), the bell rings, or the idle limit passes.
    fn wait(&self, watch_stop: bool) -> Result<(), ReadError> {
        let poll_in = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // Slot 0 the socket, 1 the stop, 2 the bell; a slot with fd -1 is
        // ignored by poll.
        let mut fds = [
            poll_in(self.stream.as_raw_fd()),
            poll_in(if watch_stop { self.stop.fd } else { -1 }),
            poll_in(self.bell.unwrap_or(-1)),
        ];
        let timeout = match self.idle_limit {
            Some(d) => d.as_millis().min(i32::MAX as u128) as libc::c_int,
            None => -1,
        };
        loop {
            // SAFETY: `fds` is a valid array of 3 pollfd structs, borrowed
            // exclusively for the call; its descriptors are owned by
            // objects alive for as long as this reader (or are -1).
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 3, timeout) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ReadError::Io(e));
            }
            if rc == 0 {
                return Err(ReadError::Idle(self.idle_limit.unwrap_or_default()));
            }
            if fds[2].revents != 0 {
                super::outbox::silence(fds[2].fd);
            }
            if fds[1].revents != 0 && fds[0].revents == 0 {
                return Err(ReadError::Stopped);
            }
            return Ok(());
        }
    }

    /// Read and throw away `n` bytes (a refused write's payload) through a
    /// small buffer, so a huge length costs no memory.
    pub fn discard(&mut self, mut n: u64) -> Result<(), ReadError> {
        let mut scratch = [0u8; 16 * 1024];
        while n > 0 {
            let k = n.min(scratch.len() as u64) as usize;
            self.read_msg(&mut scratch[..k], false)?;
            n -= k as u64;
        }
        Ok(())
    }
}
