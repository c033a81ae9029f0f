//! Sockets (TCP or Unix) and a reader that notices server shutdown.
//!
//! The reader runs with a short socket read timeout. A timeout at a message
//! boundary is where a shutting-down server stops reading a connection;
//! inside a message it keeps reading, so a request is never cut in half by
//! our own shutdown (only by a client that stalls for `STALL_LIMIT`).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a blocked reader looks at the shutdown flag.
pub const TICK: Duration = Duration::from_millis(200);
/// During shutdown, how long a half-sent message may stall before the
/// connection is dropped anyway.
pub const STALL_LIMIT: Duration = Duration::from_secs(5);

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
    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(d),
            Stream::Unix(s) => s.set_read_timeout(d),
        }
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

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
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
    #[error("peer stalled in the middle of a message during shutdown")]
    Stalled,
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Reads whole messages from a connection, watching a stop flag.
pub struct MsgReader<R> {
    inner: R,
    stop: Arc<AtomicBool>,
    /// Give up if nothing arrives for this long (negotiation only).
    pub idle_limit: Option<Duration>,
}

impl<R: Read> MsgReader<R> {
    /// `inner` must have a read timeout of about [`TICK`] set.
    pub fn new(inner: R, stop: Arc<AtomicBool>) -> Self {
        MsgReader {
            inner,
            stop,
            idle_limit: None,
        }
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Fill `buf`. `at_boundary` says `buf` starts a new message: only
    /// there do a clean EOF and a shutdown end the read quietly.
    pub fn read_msg(&mut self, buf: &mut [u8], at_boundary: bool) -> Result<(), ReadError> {
        let mut filled = 0;
        let mut last_progress = Instant::now();
        while filled < buf.len() {
            if at_boundary && filled == 0 && self.stopping() {
                return Err(ReadError::Stopped);
            }
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) if at_boundary && filled == 0 => return Err(ReadError::Closed),
                Ok(0) => return Err(ReadError::Truncated),
                Ok(n) => {
                    filled += n;
                    last_progress = Instant::now();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    let idle = last_progress.elapsed();
                    if self.stopping() && idle >= STALL_LIMIT {
                        return Err(ReadError::Stalled);
                    }
                    if let Some(limit) = self.idle_limit {
                        if idle >= limit {
                            return Err(ReadError::Idle(limit));
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        Ok(())
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
