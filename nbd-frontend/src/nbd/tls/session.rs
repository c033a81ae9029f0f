//! One server-side TLS session, rustls (X.509) or OpenSSL (PSK), behind
//! one small trait the handshake and the pump drive without blocking: the
//! encrypted side goes through `read_tls`/`write_tls` (any `Read`/`Write`,
//! here the socket), the plain side through `read_plain`/`write_plain`.
//! Both kinds buffer a bounded amount: rustls by its own limits, the
//! OpenSSL one by `MemIo`'s caps below.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};

use openssl::ssl::{ErrorCode, Ssl, SslContext, SslStream};

use super::HandshakeError;
use crate::nbd::io::Stream;

/// Encrypted bytes rustls may hold for the socket before it refuses more
/// plain text (its default is 64 KiB; more keeps large replies flowing).
const SEND_BUFFER: usize = 256 * 1024;
/// The OpenSSL session's own caps: unread encrypted input, and encrypted
/// output not yet on the socket, beyond which it takes no more.
const MEM_IN_CAP: usize = 64 * 1024;
const MEM_OUT_CAP: usize = 256 * 1024;
/// Plain text handed to OpenSSL per call (four full records).
const OPENSSL_WRITE_CHUNK: usize = 64 * 1024;

/// A server TLS session, driven without blocking.
pub(crate) trait Session: Send {
    /// Take encrypted bytes from `rd` (one read). `Ok(0)`: end of stream.
    fn read_tls(&mut self, rd: &mut dyn Read) -> io::Result<usize>;
    /// Act on what `read_tls` took: handshake steps, decryption. An error
    /// is fatal (an alert for the peer may be queued for `write_tls`).
    fn process(&mut self) -> Result<(), String>;
    /// Give encrypted bytes to `wr`.
    fn write_tls(&mut self, wr: &mut dyn Write) -> io::Result<usize>;
    /// It can take more encrypted input now.
    fn wants_read(&self) -> bool;
    /// It has encrypted output waiting.
    fn wants_write(&self) -> bool;
    fn is_handshaking(&self) -> bool;
    /// Decrypted bytes: `Ok(0)` the peer closed cleanly, `UnexpectedEof`
    /// it closed without close_notify, `WouldBlock` nothing yet.
    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Encrypt some of `buf`; `Ok(0)` when its output buffer is full.
    fn write_plain(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Queue a close_notify alert.
    fn close_notify(&mut self);
    /// The authenticated client: its certificate's subject CN, or its PSK
    /// username; `None` without client authentication.
    fn identity(&self) -> Option<String>;
}

/// The client's socket as the TLS session sees it: first the bytes the
/// connection's reader had already read, then the socket, read and
/// written without blocking (and without SIGPIPE) whatever its mode.
///
/// Reads go through a buffer of `NET_READ` bytes: rustls asks for about
/// 4 KiB at a time (its deframer grows by that much), which read from the
/// socket directly would cost a system call, and a turn of the pump, per
/// 4 KiB of a large write. One `recv` now fills the buffer with whatever
/// the socket holds, and the session takes it from memory.
pub(crate) struct NetSocket {
    stream: Stream,
    /// Bytes read from the socket (or handed over before the handshake)
    /// that no session has taken yet: `inbuf[pos..]`.
    inbuf: Vec<u8>,
    pos: usize,
}

/// Encrypted bytes one `recv` may take from the client's socket.
const NET_READ: usize = 256 * 1024;

impl NetSocket {
    pub fn new(stream: Stream, early: Vec<u8>) -> NetSocket {
        NetSocket {
            stream,
            inbuf: early,
            pos: 0,
        }
    }

    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Bytes already read from the socket that no session has taken yet:
    /// readiness of the socket says nothing of them.
    pub fn has_buffered(&self) -> bool {
        self.pos < self.inbuf.len()
    }
}

fn check(rc: isize) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// `recv` without blocking (`WouldBlock` when empty), retrying EINTR.
pub(crate) fn recv_nb(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid, exclusively borrowed buffer of
        // `buf.len()` bytes; `fd` is owned by the caller for the call.
        let rc = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        match check(rc) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// `send` without blocking and without SIGPIPE, retrying EINTR.
pub(crate) fn send_nb(fd: std::os::fd::RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid buffer of `buf.len()` bytes; `fd` is
        // owned by the caller for the call.
        let rc = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        match check(rc) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

impl Read for NetSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.has_buffered() {
            self.inbuf.resize(NET_READ, 0);
            let got = recv_nb(self.stream.as_raw_fd(), &mut self.inbuf);
            let n = *got.as_ref().unwrap_or(&0);
            self.inbuf.truncate(n);
            self.pos = 0;
            if n == 0 {
                return got; // end of stream, WouldBlock or an error
            }
        }
        let n = (self.inbuf.len() - self.pos).min(buf.len());
        buf[..n].copy_from_slice(&self.inbuf[self.pos..self.pos + n]);
        self.pos += n;
        assert!(self.pos <= self.inbuf.len());
        Ok(n)
    }
}

impl Write for NetSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send_nb(self.stream.as_raw_fd(), buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = bufs.len().min(64);
        // SAFETY: a zeroed msghdr is valid (no name, no control data);
        // IoSlice is ABI-compatible with iovec, and `bufs` outlives the
        // call, which only reads through the pointers.
        let rc = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = n as _;
            loop {
                let rc = libc::sendmsg(
                    self.stream.as_raw_fd(),
                    &msg,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                );
                if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break rc;
            }
        };
        check(rc)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---- rustls (X.509) ----

struct Rustls(rustls::ServerConnection);

pub(super) fn rustls_session(
    config: Arc<rustls::ServerConfig>,
) -> Result<Box<dyn Session>, HandshakeError> {
    let mut c =
        rustls::ServerConnection::new(config).map_err(|e| HandshakeError::Tls(e.to_string()))?;
    c.set_buffer_limit(Some(SEND_BUFFER));
    Ok(Box::new(Rustls(c)))
}

impl Session for Rustls {
    fn read_tls(&mut self, rd: &mut dyn Read) -> io::Result<usize> {
        self.0.read_tls(rd)
    }
    fn process(&mut self) -> Result<(), String> {
        self.0
            .process_new_packets()
            .map(drop)
            .map_err(|e| e.to_string())
    }
    fn write_tls(&mut self, wr: &mut dyn Write) -> io::Result<usize> {
        self.0.write_tls(wr)
    }
    fn wants_read(&self) -> bool {
        self.0.wants_read()
    }
    fn wants_write(&self) -> bool {
        self.0.wants_write()
    }
    fn is_handshaking(&self) -> bool {
        self.0.is_handshaking()
    }
    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.reader().read(buf)
    }
    fn write_plain(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.writer().write(buf)
    }
    fn close_notify(&mut self) {
        self.0.send_close_notify();
    }
    fn identity(&self) -> Option<String> {
        let cert = self.0.peer_certificates()?.first()?;
        common_name(cert.as_ref())
    }
}

/// The subject CN of a DER certificate (rustls has verified it; OpenSSL,
/// which the PSK side links anyway, parses it).
fn common_name(der: &[u8]) -> Option<String> {
    let x = openssl::x509::X509::from_der(der).ok()?;
    let cn = x
        .subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()?;
    cn.data().to_string().ok()
}

// ---- OpenSSL (PSK) ----

/// The encrypted side of an OpenSSL session, in memory: `incoming` holds
/// what `read_tls` took from the socket, `outgoing` what OpenSSL wrote.
#[derive(Default)]
struct MemIo {
    incoming: Vec<u8>,
    pos: usize,
    eof: bool,
    outgoing: Vec<u8>,
}

impl MemIo {
    fn unread(&self) -> usize {
        self.incoming.len() - self.pos
    }
}

impl Read for MemIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.incoming.len() {
            let n = self.unread().min(buf.len());
            buf[..n].copy_from_slice(&self.incoming[self.pos..self.pos + n]);
            self.pos += n;
            if self.pos == self.incoming.len() {
                self.incoming.clear();
                self.pos = 0;
            }
            Ok(n)
        } else if self.eof {
            Ok(0)
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }
}

impl Write for MemIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outgoing.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct OpenSsl {
    s: SslStream<MemIo>,
    handshaking: bool,
}

/// What the PSK callback saw: `Ok(user)` it accepted, `Err(user)` a
/// username with no key (for the log).
pub(super) type PskSeen = Result<String, String>;

/// Where the PSK callback leaves what it saw, on the `Ssl`.
pub(super) fn psk_identity_index(
) -> Result<openssl::ex_data::Index<Ssl, PskSeen>, openssl::error::ErrorStack> {
    static INDEX: OnceLock<openssl::ex_data::Index<Ssl, PskSeen>> = OnceLock::new();
    if let Some(i) = INDEX.get() {
        return Ok(*i);
    }
    let i = Ssl::new_ex_index::<PskSeen>()?;
    Ok(*INDEX.get_or_init(|| i))
}

pub(super) fn openssl_session(ctx: &SslContext) -> Result<Box<dyn Session>, HandshakeError> {
    let tls = |e: openssl::error::ErrorStack| HandshakeError::Tls(e.to_string());
    let mut ssl = Ssl::new(ctx).map_err(tls)?;
    ssl.set_accept_state();
    let s = SslStream::new(ssl, MemIo::default()).map_err(tls)?;
    Ok(Box::new(OpenSsl {
        s,
        handshaking: true,
    }))
}

fn ssl_error_text(e: &openssl::ssl::Error) -> String {
    match e.ssl_error() {
        Some(stack) => stack.to_string(),
        None => e.to_string(),
    }
}

impl Session for OpenSsl {
    fn read_tls(&mut self, rd: &mut dyn Read) -> io::Result<usize> {
        let io = self.s.get_mut();
        if io.pos > 0 {
            io.incoming.drain(..io.pos);
            io.pos = 0;
        }
        let old = io.incoming.len();
        io.incoming.resize(old + 16 * 1024 + 512, 0);
        let r = rd.read(&mut io.incoming[old..]);
        io.incoming.truncate(old + *r.as_ref().unwrap_or(&0));
        if let Ok(0) = r {
            io.eof = true;
        }
        r
    }
    fn process(&mut self) -> Result<(), String> {
        if !self.handshaking {
            return Ok(());
        }
        match self.s.do_handshake() {
            Ok(()) => {
                self.handshaking = false;
                Ok(())
            }
            Err(e) if e.code() == ErrorCode::WANT_READ => {
                if self.s.get_ref().eof {
                    Err("client closed the connection during the TLS handshake".into())
                } else {
                    Ok(())
                }
            }
            Err(e) => {
                let seen = psk_identity_index()
                    .ok()
                    .and_then(|i| self.s.ssl().ex_data(i).cloned());
                match seen {
                    Some(Err(user)) => Err(format!("unknown PSK username {user:?}")),
                    _ => Err(ssl_error_text(&e)),
                }
            }
        }
    }
    fn write_tls(&mut self, wr: &mut dyn Write) -> io::Result<usize> {
        let io = self.s.get_mut();
        let n = wr.write(&io.outgoing)?;
        io.outgoing.drain(..n);
        Ok(n)
    }
    fn wants_read(&self) -> bool {
        let io = self.s.get_ref();
        !io.eof && io.unread() < MEM_IN_CAP
    }
    fn wants_write(&self) -> bool {
        !self.s.get_ref().outgoing.is_empty()
    }
    fn is_handshaking(&self) -> bool {
        self.handshaking
    }
    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.handshaking {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.s.ssl_read(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.code() == ErrorCode::ZERO_RETURN => Ok(0),
            Err(e) if e.code() == ErrorCode::WANT_READ && !self.s.get_ref().eof => {
                Err(io::ErrorKind::WouldBlock.into())
            }
            Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::SYSCALL => {
                Err(io::ErrorKind::UnexpectedEof.into())
            }
            Err(e) => Err(io::Error::other(ssl_error_text(&e))),
        }
    }
    fn write_plain(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.handshaking || self.s.get_ref().outgoing.len() >= MEM_OUT_CAP || buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min(OPENSSL_WRITE_CHUNK);
        self.s
            .ssl_write(&buf[..n])
            .map_err(|e| io::Error::other(ssl_error_text(&e)))
    }
    fn close_notify(&mut self) {
        let _ = self.s.shutdown();
    }
    fn identity(&self) -> Option<String> {
        let index = psk_identity_index().ok()?;
        self.s.ssl().ex_data(index)?.clone().ok()
    }
}
