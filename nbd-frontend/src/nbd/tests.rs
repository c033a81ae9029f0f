//! Protocol tests against an in-memory backend, with a raw hand-rolled
//! client (so every byte on the wire is checked) and, when present,
//! libnbd's `nbdsh` (an independent implementation that validates replies).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::backend::mem::{MemBackend, MemCatalog};
use super::backend::Backend;
use super::proto::*;
use super::server::{Core, Stopper};
use super::tls::{TlsConfig, TlsCredentials, TlsMode};
use super::ServerConfig;

struct TestServer {
    addr: SocketAddr,
    stopper: Stopper,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    fn start(cat: Arc<MemCatalog>, cfg: ServerConfig) -> TestServer {
        let cfg = ServerConfig {
            tcp: Some("127.0.0.1:0".parse().unwrap()),
            ..cfg
        };
        let core = Core::bind(&cfg, cat).unwrap();
        let addr = core.local_addr().unwrap();
        let stopper = core.stopper();
        let thread = std::thread::spawn(move || core.run().unwrap());
        TestServer {
            addr,
            stopper,
            thread: Some(thread),
        }
    }
    fn stop(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn catalog() -> (Arc<MemCatalog>, MemBackend) {
    let cat = Arc::new(MemCatalog::default());
    let b = MemBackend::new(1 << 20);
    cat.add("o", b.clone(), false, "");
    cat.add("o@1", MemBackend::new(1 << 20), true, "first snapshot");
    (cat, b)
}

/// A raw NBD client, over TCP or (after STARTTLS) TLS.
struct Raw<S = TcpStream> {
    s: S,
}

type TlsStream = openssl::ssl::SslStream<TcpStream>;

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw { s };
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
        r.s.write_all(&3u32.to_be_bytes()).unwrap();
        r
    }

    /// Send STARTTLS; on ACK, run a PSK handshake as `user` with `key`
    /// (OpenSSL's client; the server's PSK side is OpenSSL too, so this
    /// checks the protocol, and nbd_tls checks GnuTLS clients). `None`
    /// with the reply type if it was not acknowledged; `Err` if the
    /// handshake failed.
    fn starttls(mut self, user: &str, key: &[u8]) -> Result<Raw<TlsStream>, u32> {
        self.opt(OPT_STARTTLS, &[]);
        let (o, ty, _) = self.opt_reply();
        assert_eq!(o, OPT_STARTTLS);
        if ty != REP_ACK {
            return Err(ty);
        }
        tls_client(self.s, user, key)
            .map(|s| Raw { s })
            .map_err(|_| 0)
    }
}

/// A TLS client on `s` with a pre-shared key.
fn tls_client(s: TcpStream, user: &str, key: &[u8]) -> Result<TlsStream, String> {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    let (user, key) = (user.to_string(), key.to_vec());
    b.set_psk_client_callback(move |_, _hint, id, psk| {
        id[..user.len()].copy_from_slice(user.as_bytes());
        id[user.len()] = 0;
        psk[..key.len()].copy_from_slice(&key);
        Ok(key.len())
    });
    let ssl = b
        .build()
        .configure()
        .unwrap()
        .verify_hostname(false)
        .use_server_name_indication(false)
        .into_ssl("localhost")
        .unwrap();
    ssl.connect(s).map_err(|e| e.to_string())
}

impl<S: Read + Write> Raw<S> {
    fn opt(&mut self, opt: u32, data: &[u8]) {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.s.write_all(&v).unwrap();
    }
    /// (option, reply type, data)
    fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (opt, ty, d)
    }
    fn go(&mut self, name: &str, infos: &[u16]) -> Vec<(u32, Vec<u8>)> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        self.opt(OPT_GO, &d);
        let mut out = Vec::new();
        loop {
            let (o, ty, data) = self.opt_reply();
            assert_eq!(o, OPT_GO);
            out.push((ty, data));
            if ty != REP_INFO {
                return out;
            }
        }
    }
    fn structured(&mut self) {
        self.opt(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(self.opt_reply().1, REP_ACK);
    }
    fn set_meta(&mut self, name: &str, queries: &[&str]) -> Vec<(u32, Vec<u8>)> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.opt(OPT_SET_META_CONTEXT, &d);
        let mut out = Vec::new();
        loop {
            let (_, ty, data) = self.opt_reply();
            out.push((ty, data));
            if ty != REP_META_CONTEXT {
                return out;
            }
        }
    }
    fn req(&mut self, flags: u16, cmd: u16, handle: u64, offset: u64, len: u32, data: &[u8]) {
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(data);
        self.s.write_all(&v).unwrap();
    }
    /// A simple reply: (errno, handle).
    fn simple(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }
    /// Any reply (structured replies are one chunk here): (handle, errno, data).
    fn reply(&mut self, read_len: Option<usize>) -> (u64, u32, Vec<u8>) {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).unwrap();
        match u32::from_be_bytes(m) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).unwrap();
                let errno = u32::from_be_bytes(h[..4].try_into().unwrap());
                let handle = u64::from_be_bytes(h[4..].try_into().unwrap());
                let mut d = vec![0u8; if errno == 0 { read_len.unwrap_or(0) } else { 0 }];
                self.s.read_exact(&mut d).unwrap();
                (handle, errno, d)
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h).unwrap();
                let flags = u16::from_be_bytes(h[..2].try_into().unwrap());
                assert_eq!(flags, REPLY_FLAG_DONE, "one chunk per reply");
                let ty = u16::from_be_bytes(h[2..4].try_into().unwrap());
                let handle = u64::from_be_bytes(h[4..12].try_into().unwrap());
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let mut d = vec![0u8; len as usize];
                self.s.read_exact(&mut d).unwrap();
                match ty {
                    REPLY_TYPE_ERROR => {
                        let errno = u32::from_be_bytes(d[..4].try_into().unwrap());
                        let ml = u16::from_be_bytes(d[4..6].try_into().unwrap()) as usize;
                        assert_eq!(6 + ml, d.len());
                        (handle, errno, Vec::new())
                    }
                    REPLY_TYPE_OFFSET_DATA => (handle, 0, d[8..].to_vec()),
                    _ => (handle, 0, d),
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }
    /// Negotiate extended headers (must be acknowledged).
    fn extended(&mut self) {
        self.opt(OPT_EXTENDED_HEADERS, &[]);
        assert_eq!(self.opt_reply(), (OPT_EXTENDED_HEADERS, REP_ACK, vec![]));
    }
    /// An extended (32-byte) request header, then `data` as its payload.
    fn ext_req(&mut self, flags: u16, cmd: u16, handle: u64, offset: u64, len: u64, data: &[u8]) {
        let mut v = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(data);
        self.s.write_all(&v).unwrap();
    }
    /// An extended WRITE: the payload flag set, `data` after the header.
    fn ext_write(&mut self, flags: u16, handle: u64, offset: u64, data: &[u8]) {
        let flags = flags | CMD_FLAG_PAYLOAD_LEN;
        self.ext_req(flags, CMD_WRITE, handle, offset, data.len() as u64, data);
    }
    /// One extended reply chunk; every reply must be one, final.
    fn ext_reply(&mut self) -> ExtReply {
        let mut h = [0u8; EXTENDED_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).unwrap();
        let magic = u32::from_be_bytes(h[..4].try_into().unwrap());
        assert_eq!(magic, EXTENDED_REPLY_MAGIC, "reply magic {magic:#x}");
        let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
        assert_eq!(flags, REPLY_FLAG_DONE, "one chunk per reply");
        let len = u64::from_be_bytes(h[24..32].try_into().unwrap());
        assert!(len < 1 << 28, "implausible reply length {len}");
        let mut payload = vec![0u8; len as usize];
        self.s.read_exact(&mut payload).unwrap();
        ExtReply {
            kind: u16::from_be_bytes(h[6..8].try_into().unwrap()),
            handle: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
            payload,
        }
    }
    /// OPT_LIST_META_CONTEXT: the names listed (each with id 0), or the
    /// error reply type.
    fn list_meta(&mut self, name: &str, queries: &[&str]) -> Result<Vec<String>, u32> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.opt(OPT_LIST_META_CONTEXT, &d);
        let mut names = Vec::new();
        loop {
            let (o, ty, data) = self.opt_reply();
            assert_eq!(o, OPT_LIST_META_CONTEXT);
            match ty {
                REP_ACK => return Ok(names),
                REP_META_CONTEXT => {
                    assert_eq!(data[..4], [0; 4], "LIST replies carry id 0");
                    names.push(String::from_utf8(data[4..].to_vec()).unwrap());
                }
                err => return Err(err),
            }
        }
    }
    /// A BLOCK_STATUS reply of several chunks (compact or extended): each
    /// chunk's (context id, descriptors), checking that only the last one
    /// is flagged done and that each names this request.
    fn status_chunks(&mut self, handle: u64, extended: bool) -> Vec<(u32, Vec<(u64, u32)>)> {
        let mut out = Vec::new();
        loop {
            let (flags, kind, h, p) = if extended {
                let mut hd = [0u8; EXTENDED_REPLY_HEADER_LEN];
                self.s.read_exact(&mut hd).unwrap();
                assert_eq!(hd[..4], EXTENDED_REPLY_MAGIC.to_be_bytes());
                let len = u64::from_be_bytes(hd[24..32].try_into().unwrap());
                let mut p = vec![0u8; len as usize];
                self.s.read_exact(&mut p).unwrap();
                let flags = u16::from_be_bytes([hd[4], hd[5]]);
                let kind = u16::from_be_bytes([hd[6], hd[7]]);
                (
                    flags,
                    kind,
                    u64::from_be_bytes(hd[8..16].try_into().unwrap()),
                    p,
                )
            } else {
                let mut hd = [0u8; 20];
                self.s.read_exact(&mut hd).unwrap();
                assert_eq!(hd[..4], STRUCTURED_REPLY_MAGIC.to_be_bytes());
                let len = u32::from_be_bytes(hd[16..20].try_into().unwrap());
                let mut p = vec![0u8; len as usize];
                self.s.read_exact(&mut p).unwrap();
                let flags = u16::from_be_bytes([hd[4], hd[5]]);
                let kind = u16::from_be_bytes([hd[6], hd[7]]);
                (
                    flags,
                    kind,
                    u64::from_be_bytes(hd[8..16].try_into().unwrap()),
                    p,
                )
            };
            assert_eq!(h, handle);
            let id = u32::from_be_bytes(p[..4].try_into().unwrap());
            let descs = if extended {
                assert_eq!(kind, REPLY_TYPE_BLOCK_STATUS_EXT, "{p:?}");
                p[8..]
                    .chunks_exact(16)
                    .map(|d| {
                        let l = u64::from_be_bytes(d[..8].try_into().unwrap());
                        (l, u32::from_be_bytes(d[12..16].try_into().unwrap()))
                    })
                    .collect()
            } else {
                assert_eq!(kind, REPLY_TYPE_BLOCK_STATUS, "{p:?}");
                p[4..]
                    .chunks_exact(8)
                    .map(|d| {
                        let l = u32::from_be_bytes(d[..4].try_into().unwrap());
                        (l.into(), u32::from_be_bytes(d[4..8].try_into().unwrap()))
                    })
                    .collect()
            };
            out.push((id, descs));
            if flags & REPLY_FLAG_DONE != 0 {
                return out;
            }
            assert_eq!(flags, 0);
        }
    }
    /// True once the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

/// One extended reply chunk, checked for magic and the DONE flag.
#[derive(Debug)]
struct ExtReply {
    kind: u16,
    handle: u64,
    offset: u64,
    payload: Vec<u8>,
}

impl ExtReply {
    /// The errno of an error chunk (its message checked for framing).
    fn errno(&self) -> u32 {
        assert_eq!(self.kind, REPLY_TYPE_ERROR, "{self:?}");
        let p = &self.payload;
        let message_len = u16::from_be_bytes([p[4], p[5]]) as usize;
        assert_eq!(6 + message_len, p.len(), "error message framing");
        u32::from_be_bytes(p[..4].try_into().unwrap())
    }
    /// BLOCK_STATUS_EXT: (context id, descriptors as (length, flags)).
    fn extents(&self) -> (u32, Vec<(u64, u32)>) {
        assert_eq!(self.kind, REPLY_TYPE_BLOCK_STATUS_EXT, "{self:?}");
        let p = &self.payload;
        let count = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
        assert_eq!(p.len(), 8 + 16 * count, "descriptor count matches length");
        let descs = p[8..]
            .chunks_exact(16)
            .map(|d| {
                assert_eq!(d[8..12], [0; 4], "padding");
                (
                    u64::from_be_bytes(d[..8].try_into().unwrap()),
                    u32::from_be_bytes(d[12..16].try_into().unwrap()),
                )
            })
            .collect();
        (u32::from_be_bytes(p[..4].try_into().unwrap()), descs)
    }
}

#[test]
fn negotiation_sequences() {
    let (cat, _) = catalog();
    let srv = TestServer::start(cat, ServerConfig::default());
    let mut c = Raw::connect(srv.addr);
    c.opt(77, b"whatever");
    assert_eq!(
        c.opt_reply(),
        (77, REP_ERR_UNSUP, b"option not supported".to_vec())
    );
    // TLS is not configured: a policy refusal (the spec's NOTLS mode).
    c.opt(OPT_STARTTLS, &[]);
    assert_eq!(c.opt_reply().1, REP_ERR_POLICY);
    // META before STRUCTURED_REPLY is invalid.
    assert_eq!(c.set_meta("o", &[BASE_ALLOCATION])[0].0, REP_ERR_INVALID);
    c.structured();
    c.opt(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (_, ty, d) = c.opt_reply();
        if ty == REP_ACK {
            break;
        }
        assert_eq!(ty, REP_SERVER);
        let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(d[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, ["o", "o@1"]);
    c.opt(OPT_LIST, b"x");
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    // Unknown export: UNKNOWN, and negotiation goes on.
    assert_eq!(c.go("nope", &[])[0].0, REP_ERR_UNKNOWN);
    // OPT_INFO with every info type.
    let mut d = 3u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"o@1");
    d.extend_from_slice(&3u16.to_be_bytes());
    for i in [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE] {
        d.extend_from_slice(&i.to_be_bytes());
    }
    c.opt(OPT_INFO, &d);
    let mut infos = Vec::new();
    loop {
        let (_, ty, d) = c.opt_reply();
        if ty == REP_ACK {
            break;
        }
        assert_eq!(ty, REP_INFO);
        infos.push(d);
    }
    let export = infos.iter().find(|d| d[..2] == [0, 0]).unwrap();
    assert_eq!(
        u64::from_be_bytes(export[2..10].try_into().unwrap()),
        1 << 20
    );
    let flags = u16::from_be_bytes(export[10..12].try_into().unwrap());
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert!(infos
        .iter()
        .any(|d| d[..2] == [0, 2] && &d[2..] == b"first snapshot"));
    assert!(infos.iter().any(|d| d[..2] == [0, 1] && &d[2..] == b"o@1"));
    assert!(infos.iter().any(|d| d == &info_block_size()));
    // Meta contexts, then GO.
    let m = c.set_meta("o", &[BASE_ALLOCATION, "qemu:dirty-bitmap:x", "base:"]);
    assert_eq!(m.len(), 2);
    assert_eq!(m[0].0, REP_META_CONTEXT);
    assert_eq!(&m[0].1[4..], BASE_ALLOCATION.as_bytes());
    let r = c.go("o", &[INFO_BLOCK_SIZE]);
    assert_eq!(r.last().unwrap().0, REP_ACK);
    let flags = r
        .iter()
        .find(|(_, d)| d[..2] == [0, 0])
        .map(|(_, d)| u16::from_be_bytes(d[10..12].try_into().unwrap()))
        .unwrap();
    for f in [
        TFLAG_HAS_FLAGS,
        TFLAG_SEND_FLUSH,
        TFLAG_SEND_FUA,
        TFLAG_SEND_TRIM,
        TFLAG_SEND_WRITE_ZEROES,
        TFLAG_SEND_FAST_ZERO,
        TFLAG_CAN_MULTI_CONN,
        TFLAG_SEND_DF,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x}");
    }
    assert_eq!(flags & TFLAG_READ_ONLY, 0);
    // Block status over a fresh (all-zero) export.
    c.req(0, CMD_BLOCK_STATUS, 9, 0, 8192, &[]);
    let (h, e, d) = c.reply(None);
    assert_eq!((h, e), (9, 0));
    assert_eq!(
        u32::from_be_bytes(d[..4].try_into().unwrap()),
        BASE_ALLOCATION_ID
    );
    assert_eq!(&d[4..], &[0, 0, 0x20, 0, 0, 0, 0, 3]);
    c.req(0, CMD_DISC, 10, 0, 0, &[]);
    assert!(c.closed());
}

#[test]
fn export_name_path_sends_zero_padding_unless_no_zeroes() {
    let (cat, _) = catalog();
    let srv = TestServer::start(cat, ServerConfig::default());
    for (cflags, tail) in [(1u32, 124usize), (3, 0)] {
        let mut s = TcpStream::connect(srv.addr).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        s.write_all(&cflags.to_be_bytes()).unwrap();
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        v.extend_from_slice(&1u32.to_be_bytes());
        v.push(b'o');
        s.write_all(&v).unwrap();
        let mut r = vec![0u8; 10 + tail];
        s.read_exact(&mut r).unwrap();
        assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 1 << 20);
        assert!(r[10..].iter().all(|&b| b == 0));
        let mut c = Raw { s };
        c.req(0, CMD_WRITE, 1, 0, 4, b"abcd");
        assert_eq!(c.simple(), (0, 1));
        c.req(0, CMD_READ, 2, 0, 4, &[]);
        assert_eq!(c.reply(Some(4)), (2, 0, b"abcd".to_vec()));
    }
    // Unknown export with OPT_EXPORT_NAME: the server must hang up.
    let mut c = Raw::connect(srv.addr);
    c.opt(OPT_EXPORT_NAME, b"missing");
    assert!(c.closed());
    // Unknown client flags: hang up.
    let mut s = TcpStream::connect(srv.addr).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0x80u32.to_be_bytes()).unwrap();
    assert!(Raw { s }.closed());
}

#[test]
fn request_errors_keep_the_connection() {
    let (cat, _) = catalog();
    let cfg = ServerConfig {
        max_request: 1 << 20,
        ..ServerConfig::default()
    };
    let srv = TestServer::start(cat, cfg);
    for structured in [false, true] {
        let mut c = Raw::connect(srv.addr);
        if structured {
            c.structured();
        }
        assert_eq!(c.go("o", &[]).last().unwrap().0, REP_ACK);
        let size = 1u64 << 20;
        c.req(0, CMD_READ, 1, size - 1, 2, &[]);
        assert_eq!(c.reply(None), (1, EINVAL, vec![]));
        c.req(0, CMD_WRITE, 2, size - 1, 2, b"xy");
        assert_eq!(c.reply(None), (2, ENOSPC, vec![]));
        // Over the server limit: refused, payload skipped, stream in step.
        let big = vec![7u8; (1 << 20) + 1];
        c.req(0, CMD_WRITE, 3, 0, big.len() as u32, &big);
        assert_eq!(c.reply(None), (3, EINVAL, vec![]));
        c.req(0, 42, 4, 0, 0, &[]);
        assert_eq!(c.reply(None), (4, EINVAL, vec![]));
        c.req(0x100, CMD_FLUSH, 5, 0, 0, &[]);
        assert_eq!(c.reply(None), (5, EINVAL, vec![]));
        c.req(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 6, 0, 4096, &[]);
        assert_eq!(c.reply(None), (6, ENOTSUP, vec![]));
        // The stand-in reports NoSpace for an all-0xEE write.
        c.req(0, CMD_WRITE, 7, 0, 512, &[0xEE; 512]);
        assert_eq!(c.reply(None), (7, ENOSPC, vec![]));
        c.req(0, CMD_BLOCK_STATUS, 8, 0, 512, &[]);
        assert_eq!(c.reply(None), (8, EINVAL, vec![]), "no meta context");
        c.req(CMD_FLAG_FUA, CMD_WRITE, 9, 100, 3, b"abc");
        assert_eq!(c.reply(None), (9, 0, vec![]));
        c.req(0, CMD_READ, 10, 99, 5, &[]);
        assert_eq!(c.reply(Some(5)), (10, 0, b"\0abc\0".to_vec()));
        c.req(0, CMD_READ, 11, 0, 0, &[]);
        assert_eq!(c.reply(Some(0)).1, 0);
        c.req(0, CMD_READ, 12, 0, (1 << 20) + 1, &[]);
        assert_eq!(c.reply(None), (12, EINVAL, vec![]));
        if structured {
            c.req(CMD_FLAG_DF, CMD_READ, 13, 0, (1 << 20) + 1, &[]);
            assert_eq!(c.reply(None), (13, EOVERFLOW, vec![]));
        }
        c.req(0, CMD_WRITE_ZEROES, 14, 100, 2, &[]);
        assert_eq!(c.reply(None), (14, 0, vec![]));
        c.req(0, CMD_TRIM, 15, 0, 4096, &[]);
        assert_eq!(c.reply(None), (15, 0, vec![]));
        c.req(0, CMD_READ, 16, 99, 5, &[]);
        assert_eq!(c.reply(Some(5)), (16, 0, b"\0\0\0c\0".to_vec()));
        // Bad magic ends the connection.
        c.s.write_all(&[0u8; 28]).unwrap();
        assert!(c.closed());
    }
    // Read-only export.
    let mut c = Raw::connect(srv.addr);
    assert_eq!(c.go("o@1", &[]).last().unwrap().0, REP_ACK);
    c.req(0, CMD_WRITE, 1, 0, 2, b"no");
    assert_eq!(c.simple(), (EPERM, 1));
    c.req(0, CMD_TRIM, 2, 0, 2, &[]);
    assert_eq!(c.simple(), (EPERM, 2));
    c.req(0, CMD_FLUSH, 3, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 3));
}

/// Extended headers take precedence over structured replies: allowed
/// after them, never downgraded, not negotiated twice, and they forbid
/// OPT_EXPORT_NAME (which cannot carry an error, so the server hangs up).
/// One connection negotiated directly, without the accept loop, for the
/// client `identity` under `policy`: the client sends STARTTLS first, and
/// a stand-in for TLS (no handshake) names it `identity`, as the real one
/// does with a certificate's CN or a PSK username. The handle yields the
/// export and flags negotiation ended on, `None` if the client left, or
/// the error that closed the connection.
type Negotiation = JoinHandle<Result<Option<(String, u16)>, String>>;

/// STARTTLS without TLS: the client is taken to be `.0`.
struct AssumeIdentity(Option<String>);

impl<W> super::negotiate::Starttls<W> for AssumeIdentity {
    fn mode(&self) -> TlsMode {
        TlsMode::On
    }
    fn start(
        &mut self,
        _: &mut super::io::MsgReader,
        _: &mut W,
    ) -> Result<Option<String>, super::tls::HandshakeError> {
        Ok(self.0.clone())
    }
}

fn negotiate_as(
    cat: Arc<MemCatalog>,
    policy: super::AccessPolicy,
    identity: Option<&str>,
) -> (Raw, Negotiation) {
    use super::io::{MsgReader, StopSignal, Stream};
    use super::negotiate::{negotiate, Outcome};
    use std::os::fd::AsRawFd;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let identified = identity.is_some();
    let mut tls = AssumeIdentity(identity.map(str::to_string));
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut w = std::io::BufWriter::new(s.try_clone().unwrap());
        // Never written to, so the stop never fires.
        let (stop_rx, _stop_tx) = std::os::unix::net::UnixStream::pair().unwrap();
        let stop = StopSignal {
            flag: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            fd: stop_rx.as_raw_fd(),
        };
        let mut rd = MsgReader::new(Stream::Tcp(s), stop);
        match negotiate(&mut rd, &mut w, cat.as_ref(), false, &policy, &mut tls) {
            Ok(Outcome::Transmission(n)) => Ok(Some((n.name, n.flags))),
            Ok(Outcome::Ended) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    });
    let mut c = Raw::connect(addr);
    if identified {
        c.opt(OPT_STARTTLS, &[]);
        assert_eq!(c.opt_reply(), (OPT_STARTTLS, REP_ACK, vec![]));
    }
    (c, server)
}

impl Raw {
    /// OPT_LIST: the export names.
    fn list(&mut self) -> Vec<String> {
        self.opt(OPT_LIST, &[]);
        let mut names = Vec::new();
        loop {
            let (o, ty, d) = self.opt_reply();
            assert_eq!(o, OPT_LIST);
            if ty == REP_ACK {
                return names;
            }
            assert_eq!(ty, REP_SERVER);
            let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
            names.push(String::from_utf8(d[4..4 + n].to_vec()).unwrap());
        }
    }
    /// OPT_INFO: the final reply (ACK or an error) and its data.
    fn info(&mut self, name: &str) -> (u32, Vec<u8>) {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.opt(OPT_INFO, &d);
        loop {
            let (o, ty, d) = self.opt_reply();
            assert_eq!(o, OPT_INFO);
            if ty != REP_INFO {
                return (ty, d);
            }
        }
    }
}

/// The flags a successful GO reported in its NBD_INFO_EXPORT.
fn go_flags(replies: &[(u32, Vec<u8>)]) -> u16 {
    assert_eq!(replies.last().unwrap().0, REP_ACK, "GO failed");
    let (_, d) = replies.iter().find(|(_, d)| d[..2] == [0, 0]).unwrap();
    u16::from_be_bytes(d[10..12].try_into().unwrap())
}

/// What the server answers for an export name it does not know.
fn unknown(name: &str) -> (u32, Vec<u8>) {
    let why = format!("no export named {name:?}");
    (REP_ERR_UNKNOWN, why.into_bytes())
}

/// INFO, LIST_META_CONTEXT and SET_META_CONTEXT on each of `all` are
/// answered for the `visible` ones, and for the others byte for byte as
/// for a name that exists nowhere.
fn assert_sees_only(c: &mut Raw, who: Option<&str>, all: &[&str], visible: &[&str]) {
    for name in all {
        let info = c.info(name);
        let meta_list = c.list_meta(name, &[BASE_ALLOCATION]);
        let meta_set = c.set_meta(name, &[BASE_ALLOCATION]);
        if visible.contains(name) {
            assert_eq!(info.0, REP_ACK, "{who:?} INFO {name}");
            assert_eq!(meta_list, Ok(vec![BASE_ALLOCATION.to_string()]));
            assert_eq!(meta_set.len(), 2, "{who:?} SET {name}: {meta_set:?}");
        } else {
            assert_eq!(info, unknown(name), "{who:?} INFO {name}");
            assert_eq!(meta_list, Err(REP_ERR_UNKNOWN), "{who:?} LIST_META {name}");
            assert_eq!(meta_set, [unknown(name)], "{who:?} SET {name}");
        }
    }
    assert_eq!(c.info("nope"), unknown("nope"));
}

/// `--allow o@*=alice --allow o@2=bob --allow p=alice`, default export
/// `p`: each client sees, lists, queries and opens exactly what the rules
/// give it.
#[test]
fn allow_rules_hide_exports_from_other_clients() {
    let cat = Arc::new(MemCatalog::default());
    let origin = MemBackend::new(1 << 20);
    cat.add("o", origin.clone(), false, "");
    cat.add("o@1", origin.snapshot(1), false, "first");
    cat.add("o@2", origin.snapshot(2), false, "second");
    cat.add("p", MemBackend::new(1 << 20), false, "");
    *cat.default.lock().unwrap() = Some("p".into());
    let rules = ["o@*=alice", "o@2=bob", "p=alice"];
    let policy = super::AccessPolicy::new(rules.map(|r| r.parse().unwrap()).to_vec(), vec![]);
    let all = ["o", "o@1", "o@2", "p"];
    let changed = |tags: &[&str]| -> Vec<String> {
        let tags = tags.iter().map(|t| format!("snapmv:changed-since:{t}"));
        tags.collect()
    };
    let cases: [(Option<&str>, &[&str], Vec<String>); 4] = [
        (Some("alice"), &all, changed(&["origin", "2", "1"])),
        (Some("bob"), &["o", "o@2"], changed(&["origin", "2"])),
        (Some("mallory"), &["o"], changed(&["origin"])),
        (None, &["o"], changed(&["origin"])),
    ];
    for (who, visible, contexts) in cases {
        let (mut c, server) = negotiate_as(cat.clone(), policy.clone(), who);
        assert_eq!(c.list(), visible, "{who:?}: OPT_LIST");
        c.structured();
        assert_sees_only(&mut c, who, &all, visible);
        // The default export is p: hidden where p is.
        let default = if visible.contains(&"p") {
            REP_ACK
        } else {
            REP_ERR_UNKNOWN
        };
        assert_eq!(c.info("").0, default, "{who:?}: the default export");
        // Changed-since names only the snapshots this client may open, and
        // selects no other.
        let listed = c.list_meta("o", &["snapmv:changed-since:"]).unwrap();
        assert_eq!(listed, contexts, "{who:?}");
        let set = c.set_meta("o", &["snapmv:changed-since:1"]);
        assert_eq!(set.len(), if who == Some("alice") { 2 } else { 1 });
        // A hidden export's GO fails and negotiation goes on; EXPORT_NAME
        // cannot fail softly, so it ends the connection.
        match all.iter().find(|n| !visible.contains(n)) {
            Some(name) => {
                assert_eq!(c.go(name, &[]), [unknown(name)], "{who:?} GO {name}");
                c.opt(OPT_EXPORT_NAME, name.as_bytes());
                assert!(c.closed(), "{who:?} EXPORT_NAME {name}");
                let end = server.join().unwrap().unwrap_err();
                assert!(end.contains("unknown or invalid export"), "{end}");
            }
            None => {
                let flags = go_flags(&c.go("o@1", &[]));
                assert_eq!(flags & TFLAG_READ_ONLY, 0);
                let end = server.join().unwrap();
                assert_eq!(end, Ok(Some(("o@1".to_string(), flags))));
            }
        }
    }
}

/// EXPORT_NAME of a hidden default export closes the connection; of a
/// visible one attaches.
#[test]
fn allow_rules_apply_to_the_default_export_by_its_real_name() {
    let (cat, _) = catalog();
    *cat.default.lock().unwrap() = Some("o@1".into());
    let policy = super::AccessPolicy::new(vec!["o@?=alice".parse().unwrap()], vec![]);
    for (who, attaches) in [(Some("alice"), true), (Some("bob"), false), (None, false)] {
        let (mut c, server) = negotiate_as(cat.clone(), policy.clone(), who);
        c.opt(OPT_EXPORT_NAME, b"");
        let end = server.join().unwrap();
        if attaches {
            let mut size = [0u8; 8];
            c.s.read_exact(&mut size).unwrap();
            assert_eq!(u64::from_be_bytes(size), 1 << 20);
            assert!(matches!(end, Ok(Some((ref n, _))) if n == "o@1"), "{end:?}");
        } else {
            assert!(c.closed(), "{who:?}");
            assert!(end.unwrap_err().contains("unknown or invalid export"));
        }
    }
}

/// `--read-only-export o@*` (through the server's config, as `serve`
/// passes it): snapshots advertise READ_ONLY and refuse writes with
/// EPERM, as the server-wide mode does, while reads work and the origin
/// stays writable. `--allow` through the same config hides o@1 from this
/// client, which has no identity.
#[test]
fn read_only_export_patterns_refuse_writes() {
    let cat = Arc::new(MemCatalog::default());
    let origin = MemBackend::new(1 << 20);
    cat.add("o", origin.clone(), false, "");
    cat.add("o@1", origin.snapshot(1), false, "");
    cat.add("o@2", origin.snapshot(2), false, "");
    let cfg = ServerConfig {
        access: super::AccessPolicy::new(
            vec!["o@1=alice".parse().unwrap()],
            vec!["o@*".parse().unwrap()],
        ),
        ..ServerConfig::default()
    };
    let srv = TestServer::start(cat, cfg);
    let mut c = Raw::connect(srv.addr);
    assert_eq!(c.list(), ["o", "o@2"]);
    assert_eq!(c.go("o@1", &[])[0].0, REP_ERR_UNKNOWN);
    for (name, read_only) in [("o@2", true), ("o", false)] {
        let mut c = Raw::connect(srv.addr);
        let flags = go_flags(&c.go(name, &[]));
        assert_eq!(flags & TFLAG_READ_ONLY != 0, read_only, "{name}");
        c.req(0, CMD_WRITE, 1, 0, 4096, &[0x5a; 4096]);
        let want = if read_only { EPERM } else { 0 };
        assert_eq!(c.simple(), (want, 1), "{name}: write");
        c.req(0, CMD_READ, 2, 0, 4096, &[]);
        let (handle, errno, data) = c.reply(Some(4096));
        assert_eq!((handle, errno), (2, 0), "{name}: read");
        let byte = if read_only { 0 } else { 0x5a };
        assert!(data.iter().all(|&b| b == byte), "{name}: read back");
    }
}

#[test]
fn extended_headers_negotiation() {
    let (cat, _) = catalog();
    let srv = TestServer::start(cat, ServerConfig::default());
    let mut c = Raw::connect(srv.addr);
    c.opt(OPT_EXTENDED_HEADERS, b"x");
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID, "no data allowed");
    c.extended();
    c.opt(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID, "already negotiated");
    c.opt(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.opt_reply().1, REP_ERR_EXT_HEADER_REQD, "no downgrade");
    // Meta contexts need only extended headers.
    let m = c.set_meta("o", &[BASE_ALLOCATION]);
    assert_eq!((m[0].0, m[1].0), (REP_META_CONTEXT, REP_ACK));
    let r = c.go("o", &[INFO_BLOCK_SIZE]);
    assert_eq!(r.last().unwrap().0, REP_ACK);
    let export = r.iter().find(|(_, d)| d[..2] == [0, 0]).unwrap();
    let flags = u16::from_be_bytes(export.1[10..12].try_into().unwrap());
    assert_ne!(flags & TFLAG_SEND_DF, 0, "extended headers imply chunks");
    // The block size still advertises a 32-bit maximum payload.
    assert!(r.iter().any(|(_, d)| d == &info_block_size()));
    c.ext_req(0, CMD_BLOCK_STATUS, 1, 0, 4096, &[]);
    let reply = c.ext_reply();
    assert_eq!(reply.extents(), (BASE_ALLOCATION_ID, vec![(4096, 3)]));

    // Structured replies first, then extended headers: both acknowledged,
    // and the meta context chosen in between stays selected.
    let mut c = Raw::connect(srv.addr);
    c.structured();
    assert_eq!(c.set_meta("o", &[BASE_ALLOCATION])[0].0, REP_META_CONTEXT);
    c.extended();
    assert_eq!(c.go("o", &[]).last().unwrap().0, REP_ACK);
    c.ext_req(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 2, 0, 8192, &[]);
    assert_eq!(c.ext_reply().extents().1, vec![(8192, 3)]);

    // OPT_EXPORT_NAME after extended headers: hang up.
    let mut c = Raw::connect(srv.addr);
    c.extended();
    c.opt(OPT_EXPORT_NAME, b"o");
    assert!(c.closed());
    // OPT_INFO works as usual.
    let mut c = Raw::connect(srv.addr);
    c.extended();
    let mut d = 3u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"o@1");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.opt(OPT_INFO, &d);
    let (_, ty, info) = c.opt_reply();
    assert_eq!((ty, &info[..2]), (REP_INFO, &[0u8, 0][..]));
}

/// Every reply on an extended connection is an extended chunk echoing the
/// request's handle and offset: data, successes without data, errors,
/// refusals (with a refused WRITE's payload drained) and block status.
#[test]
fn extended_requests_and_replies() {
    let (cat, b) = catalog();
    let cfg = ServerConfig {
        max_request: 1 << 19,
        ..ServerConfig::default()
    };
    let srv = TestServer::start(cat, cfg);
    let mut c = Raw::connect(srv.addr);
    c.extended();
    c.set_meta("o", &[BASE_ALLOCATION]);
    assert_eq!(c.go("o", &[]).last().unwrap().0, REP_ACK);
    let size = 1u64 << 20;

    c.ext_write(0, 1, 4096, &[0xAB; 4096]);
    let r = c.ext_reply();
    assert_eq!((r.kind, r.handle, r.offset), (REPLY_TYPE_NONE, 1, 4096));
    assert!(r.payload.is_empty());
    c.ext_req(0, CMD_READ, 2, 4000, 200, &[]);
    let r = c.ext_reply();
    assert_eq!(
        (r.kind, r.handle, r.offset),
        (REPLY_TYPE_OFFSET_DATA, 2, 4000)
    );
    assert_eq!(r.payload[..8], 4000u64.to_be_bytes(), "data offset");
    let mut want = vec![0u8; 96];
    want.extend_from_slice(&[0xAB; 104]);
    assert_eq!(r.payload[8..], want[..]);
    c.ext_req(0, CMD_READ, 3, 8, 0, &[]);
    let r = c.ext_reply();
    assert_eq!((r.kind, r.handle, r.offset), (REPLY_TYPE_NONE, 3, 8));
    // FLUSH and FUA writes run in the shared pool: same framing.
    c.ext_req(0, CMD_FLUSH, 4, 0, 0, &[]);
    assert_eq!(c.ext_reply().kind, REPLY_TYPE_NONE);
    c.ext_write(CMD_FLAG_FUA, 5, 0, b"fua");
    let r = c.ext_reply();
    assert_eq!((r.kind, r.handle, r.offset), (REPLY_TYPE_NONE, 5, 0));
    assert_eq!(b.flushes.load(Ordering::SeqCst), 1, "the FLUSH ran");
    // Block status: 64-bit descriptors with a count.
    c.ext_req(0, CMD_BLOCK_STATUS, 6, 0, 16384, &[]);
    let r = c.ext_reply();
    assert_eq!((r.handle, r.offset), (6, 0));
    let written_then_zero = vec![(8192, 0), (8192, STATE_HOLE | STATE_ZERO)];
    assert_eq!(r.extents(), (BASE_ALLOCATION_ID, written_then_zero));
    // Payload-free commands take 64-bit lengths (here the whole export).
    c.ext_req(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 7, 4096, 4096, &[]);
    assert_eq!(c.ext_reply().kind, REPLY_TYPE_NONE);
    c.ext_req(0, CMD_TRIM, 8, 0, size, &[]);
    assert_eq!(c.ext_reply().kind, REPLY_TYPE_NONE);
    c.ext_req(0, CMD_READ, 9, 4096, 8, &[]);
    assert_eq!(c.ext_reply().payload[8..], [0; 8], "zeroed");

    // Errors and refusals: extended error chunks, offset echoed.
    c.ext_req(0, CMD_READ, 10, size - 1, 2, &[]);
    let r = c.ext_reply();
    assert_eq!((r.handle, r.offset, r.errno()), (10, size - 1, EINVAL));
    c.ext_req(0, CMD_TRIM, 11, 0, 1 << 40, &[]);
    assert_eq!(c.ext_reply().errno(), EINVAL, "64-bit length past the end");
    c.ext_req(CMD_FLAG_DF, CMD_READ, 12, 0, 1 << 33, &[]);
    assert_eq!(c.ext_reply().errno(), EOVERFLOW);
    // Over max_request: refused, its payload drained, the stream in step.
    c.ext_write(0, 13, 0, &vec![7u8; (1 << 19) + 1]);
    assert_eq!(c.ext_reply().errno(), EINVAL);
    // A WRITE without the payload flag still carries its data (qemu's
    // client sends them so).
    c.ext_req(0, CMD_WRITE, 14, 8192, 4, b"bare");
    assert_eq!(c.ext_reply().kind, REPLY_TYPE_NONE);
    // A payload on BLOCK_STATUS: refused and drained.
    c.ext_req(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 15, 0, 12, &[9; 12]);
    let r = c.ext_reply();
    assert_eq!((r.handle, r.errno()), (15, EINVAL));
    c.ext_req(0, 42, 16, 77, 0, &[]);
    let r = c.ext_reply();
    assert_eq!((r.offset, r.errno()), (77, EINVAL));
    c.ext_req(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 17, 0, 4096, &[]);
    assert_eq!(c.ext_reply().errno(), ENOTSUP);
    // An engine error (the stand-in's "no space" pattern).
    c.ext_write(0, 18, 0, &[0xEE; 512]);
    assert_eq!(c.ext_reply().errno(), ENOSPC);
    // Still in step after all of that.
    c.ext_req(0, CMD_READ, 19, 0, 3, &[]);
    assert_eq!(c.ext_reply().payload[8..], *b"fua");
    c.ext_req(0, CMD_READ, 19, 8192, 4, &[]);
    assert_eq!(c.ext_reply().payload[8..], *b"bare");
    // A compact header on an extended connection ends it (padded to the
    // 32 bytes the server waits for).
    c.req(0, CMD_READ, 20, 0, 1, &[0; 4]);
    assert!(c.closed());

    // A payload no 32-bit block size allows: hang up, do not drain.
    let mut c = Raw::connect(srv.addr);
    c.extended();
    c.go("o", &[]);
    c.ext_req(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1, 0, 1 << 32, &[]);
    assert!(c.closed());
}

/// A deleted version answers ESHUTDOWN in an extended error chunk, and a
/// read-only export refuses writes the same way.
#[test]
fn extended_errors_for_deleted_and_read_only_exports() {
    let (cat, _) = catalog();
    let srv = TestServer::start(cat.clone(), ServerConfig::default());
    let mut ro = Raw::connect(srv.addr);
    ro.extended();
    ro.go("o@1", &[]);
    ro.ext_write(0, 1, 0, b"no");
    assert_eq!(ro.ext_reply().errno(), EPERM);
    ro.ext_req(0, CMD_TRIM, 2, 0, 1 << 20, &[]);
    assert_eq!(ro.ext_reply().errno(), EPERM);
    let gone = cat.exports.lock().unwrap().remove("o@1").unwrap();
    gone.backend.live.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(150));
    ro.ext_req(0, CMD_READ, 3, 512, 16, &[]);
    let r = ro.ext_reply();
    assert_eq!((r.handle, r.offset, r.errno()), (3, 512, ESHUTDOWN));
}

#[test]
fn replies_come_out_of_order_and_in_parallel() {
    let (cat, b) = catalog();
    b.delay_ms.store(400, Ordering::SeqCst);
    b.slow_offset.store(8192, Ordering::SeqCst);
    let srv = TestServer::start(cat, ServerConfig::default());
    let mut c = Raw::connect(srv.addr);
    c.structured();
    c.go("o", &[]);
    // A connection serves its first requests inline; one slow request
    // teaches it that its requests wait, and from then on they run in the
    // shared pool, in parallel.
    c.req(0, CMD_READ, 0, 8192, 512, &[]);
    assert_eq!(c.reply(None).0, 0);
    c.req(0, CMD_READ, 1, 8192, 512, &[]);
    c.req(0, CMD_READ, 2, 0, 512, &[]);
    assert_eq!(c.reply(None).0, 2, "the fast read overtakes the slow one");
    assert_eq!(c.reply(None).0, 1);
    // Eight slow reads on eight workers overlap: about one delay, not eight.
    let t = Instant::now();
    for h in 0..8 {
        c.req(0, CMD_READ, h, 8192, 512, &[]);
    }
    let mut seen: Vec<u64> = (0..8).map(|_| c.reply(None).0).collect();
    seen.sort();
    assert_eq!(seen, (0..8).collect::<Vec<_>>());
    assert!(
        t.elapsed() < Duration::from_millis(1600),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn deleted_export_gets_eshutdown_and_vanishes() {
    let (cat, _) = catalog();
    let srv = TestServer::start(cat.clone(), ServerConfig::default());
    let mut c = Raw::connect(srv.addr);
    c.go("o@1", &[]);
    c.req(0, CMD_READ, 1, 0, 16, &[]);
    assert_eq!(c.reply(Some(16)).1, 0);
    let gone = cat.exports.lock().unwrap().remove("o@1").unwrap();
    gone.backend.live.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(150));
    c.req(0, CMD_READ, 2, 0, 16, &[]);
    assert_eq!(c.reply(Some(16)), (2, ESHUTDOWN, vec![]));
    let mut d = Raw::connect(srv.addr);
    assert_eq!(d.go("o@1", &[])[0].0, REP_ERR_UNKNOWN);
}

/// From another thread, send 4,000 reads of 256 KiB on `hog`'s socket and
/// never read a reply: the sender blocks once the server stops reading.
fn send_reads_without_reading(hog: &Raw) -> std::thread::JoinHandle<()> {
    let mut s = hog.s.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut v = Vec::new();
        for h in 0..4000u64 {
            v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            v.extend_from_slice(&0u16.to_be_bytes());
            v.extend_from_slice(&CMD_READ.to_be_bytes());
            v.extend_from_slice(&h.to_be_bytes());
            v.extend_from_slice(&0u64.to_be_bytes());
            v.extend_from_slice(&(256u32 << 10).to_be_bytes());
        }
        let _ = s.write_all(&v);
    })
}

#[test]
fn slow_reply_reader_holds_back_only_itself() {
    let (cat, _) = catalog();
    let cfg = ServerConfig {
        max_request: 256 << 10,
        conn_buffer_bytes: 1 << 20,
        server_buffer_bytes: 4 << 20,
        ..ServerConfig::default()
    };
    let srv = TestServer::start(cat, cfg);
    // A client that sends many reads and never reads a reply.
    let mut hog = Raw::connect(srv.addr);
    hog.go("o", &[]);
    let sender = send_reads_without_reading(&hog);
    std::thread::sleep(Duration::from_millis(500));
    // Others are served promptly meanwhile.
    let t = Instant::now();
    for i in 0..3 {
        let mut c = Raw::connect(srv.addr);
        c.go("o", &[]);
        for h in 0..20 {
            c.req(0, CMD_READ, h, 0, 256 << 10, &[]);
            assert_eq!(c.reply(Some(256 << 10)).1, 0, "conn {i} req {h}");
        }
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Closing the hog frees everything it held.
    hog.s.shutdown(std::net::Shutdown::Both).unwrap();
    sender.join().unwrap();
}

/// A client that sends reads but never reads a reply fills its socket.
/// Its reads are slow (1 ms each here), so they run in the shared pool:
/// the pool threads must queue those replies and move on, not wait on
/// that client, or they would all be held (two threads here) and every
/// other connection's FLUSH would wait behind them
/// (planted bug `pool_blocks_on_client`).
#[test]
fn a_client_that_never_reads_holds_no_pool_thread() {
    let (cat, b) = catalog();
    b.delay_ms.store(1, Ordering::SeqCst);
    let cfg = ServerConfig {
        max_request: 256 << 10,
        conn_buffer_bytes: 1 << 20,
        server_buffer_bytes: 64 << 20,
        // More of the hog's requests may be in the pool than it has
        // threads, so its own thread only reads and hands off.
        pool_threads: 2,
        parallel_per_conn: 8,
        ..ServerConfig::default()
    };
    let srv = TestServer::start(cat, cfg);
    let mut hog = Raw::connect(srv.addr);
    hog.go("o", &[]);
    let sender = send_reads_without_reading(&hog);
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    for i in 0..3 {
        let mut c = Raw::connect(srv.addr);
        c.go("o", &[]);
        for h in 0..10 {
            c.req(0, CMD_FLUSH, h, 0, 0, &[]);
            assert_eq!(c.simple(), (0, h), "conn {i} flush {h}");
        }
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    hog.s.shutdown(std::net::Shutdown::Both).unwrap();
    sender.join().unwrap();
}

#[test]
fn shutdown_finishes_in_flight_requests() {
    let (cat, b) = catalog();
    b.delay_ms.store(300, Ordering::SeqCst);
    b.slow_offset.store(0, Ordering::SeqCst);
    let mut srv = TestServer::start(cat, ServerConfig::default());
    let mut c = Raw::connect(srv.addr);
    c.go("o", &[]);
    let mut idle = Raw::connect(srv.addr);
    idle.go("o", &[]);
    c.req(0, CMD_WRITE, 1, 0, 3, b"abc");
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    srv.stop();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(c.simple(), (0, 1), "the in-flight write was answered");
    assert!(c.closed());
    assert!(idle.closed());
    assert!(TcpStream::connect(srv.addr).is_err(), "no longer listening");
}

#[test]
fn shutdown_cuts_a_client_that_never_reads_replies() {
    let (cat, _) = catalog();
    let cfg = ServerConfig {
        max_request: 256 << 10,
        conn_buffer_bytes: 1 << 20,
        ..ServerConfig::default()
    };
    let mut srv = TestServer::start(cat, cfg);
    let mut hog = Raw::connect(srv.addr);
    hog.go("o", &[]);
    let sender = send_reads_without_reading(&hog);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    srv.stop();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    sender.join().unwrap();
}

#[test]
fn garbage_never_hurts_the_server() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("SNAPMV_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6172_6261);
    println!("seed {seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (cat, _) = catalog();
    let srv = TestServer::start(cat, ServerConfig::default());
    for _ in 0..200 {
        let mut s = TcpStream::connect(srv.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        let n = rng.gen_range(0..200);
        let mut junk = vec![0u8; n];
        rng.fill(&mut junk[..]);
        if rng.gen_bool(0.5) {
            // Valid flags and option magic so the option parser is reached.
            junk.splice(
                0..0,
                3u32.to_be_bytes().into_iter().chain(IHAVEOPT.to_be_bytes()),
            );
        }
        let _ = s.write_all(&junk);
        let mut sink = [0u8; 4096];
        let _ = s.read(&mut sink);
    }
    let mut c = Raw::connect(srv.addr);
    c.go("o", &[]);
    c.req(0, CMD_WRITE, 1, 0, 2, b"ok");
    assert_eq!(c.simple(), (0, 1));
}

/// libnbd checks every reply against the spec, so driving the server with
/// An origin "o" with 16 KiB written (the first 4 KiB with zeros), then
/// snapshot "o@1" of it, and "o@2" of the origin after block 1 changed.
fn catalog_with_history() -> (Arc<MemCatalog>, MemBackend) {
    let cat = Arc::new(MemCatalog::default());
    let o = MemBackend::new(1 << 20);
    o.write(4096, &[0x11; 12288], false).unwrap();
    cat.add("o@1", o.snapshot(1), false, "one");
    o.write(4096, &[0x22; 4096], false).unwrap();
    cat.add("o@2", o.snapshot(2), false, "two");
    cat.add("o", o.clone(), false, "");
    (cat, o)
}

#[test]
fn meta_context_list_queries() {
    let (cat, _) = catalog_with_history();
    let srv = TestServer::start(cat, ServerConfig::default());
    let mut c = Raw::connect(srv.addr);
    // Before structured replies: invalid.
    assert_eq!(c.list_meta("o", &[]), Err(REP_ERR_INVALID));
    c.structured();
    let all = [
        "base:allocation",
        "qemu:allocation-depth",
        "snapmv:changed-since:origin",
        "snapmv:changed-since:2",
        "snapmv:changed-since:1",
    ];
    // No query: everything we serve on this export.
    assert_eq!(c.list_meta("o@1", &[]).unwrap(), all);
    // Namespace wildcards and the changed-since leaf without a tag.
    assert_eq!(c.list_meta("o", &["base:"]).unwrap(), [all[0]]);
    assert_eq!(c.list_meta("o", &["qemu:"]).unwrap(), [all[1]]);
    assert_eq!(c.list_meta("o", &["snapmv:"]).unwrap(), all[2..]);
    let any = ["snapmv:changed-since:", "snapmv:"];
    assert_eq!(c.list_meta("o", &any).unwrap(), all[2..], "no repeats");
    // Exact names: listed only if selectable; unknown ones are ignored.
    let q = [
        "snapmv:changed-since:1",
        "snapmv:changed-since:9",
        "snapmv:changed-since:01",
        "snapmv:changed-since:-1",
        "snapmv:other",
        "qemu:dirty-bitmap:x",
        "x-foo:bar",
        "qemu:allocation-depth",
    ];
    assert_eq!(
        c.list_meta("o", &q).unwrap(),
        ["snapmv:changed-since:1", "qemu:allocation-depth"]
    );
    assert_eq!(c.list_meta("o", &["x-foo:"]).unwrap(), Vec::<String>::new());
    // A query without a namespace is a syntax error; an unknown export too.
    assert_eq!(c.list_meta("o", &["nocolon"]), Err(REP_ERR_INVALID));
    assert_eq!(c.list_meta("nope", &[]), Err(REP_ERR_UNKNOWN));
    // SET: wildcards select nothing, and neither does a tag that is not
    // a live snapshot of this origin.
    let m = c.set_meta(
        "o",
        &["snapmv:", "snapmv:changed-since:", "snapmv:changed-since:7"],
    );
    assert_eq!(m, [(REP_ACK, vec![])]);
    c.opt(OPT_ABORT, &[]);
}

/// Several contexts in one reply, each its own chunk with its own id; the
/// changed-since bits follow writes made after negotiation; the same over
/// extended headers.
#[test]
fn several_contexts_changed_since_and_live_writes() {
    for extended in [false, true] {
        let (cat, o) = catalog_with_history();
        let srv = TestServer::start(cat, ServerConfig::default());
        let mut c = Raw::connect(srv.addr);
        if extended {
            c.extended();
        } else {
            c.structured();
        }
        let q = [
            "snapmv:changed-since:1",
            "x-unknown:thing",
            "base:allocation",
            "snapmv:changed-since:origin",
            "qemu:allocation-depth",
            "snapmv:changed-since:1",
            "snapmv:changed-since:99",
        ];
        let m = c.set_meta("o@2", &q);
        let got: Vec<(u32, u32, String)> = m
            .iter()
            .map(|(ty, d)| {
                if *ty == REP_ACK {
                    return (*ty, 0, String::new());
                }
                let id = u32::from_be_bytes(d[..4].try_into().unwrap());
                (*ty, id, String::from_utf8(d[4..].to_vec()).unwrap())
            })
            .collect();
        let rmc = REP_META_CONTEXT;
        assert_eq!(
            got,
            [
                (rmc, CHANGED_SINCE_FIRST_ID, "snapmv:changed-since:1".into()),
                (rmc, BASE_ALLOCATION_ID, "base:allocation".into()),
                (
                    rmc,
                    CHANGED_SINCE_FIRST_ID + 1,
                    "snapmv:changed-since:origin".into()
                ),
                (rmc, ALLOCATION_DEPTH_ID, "qemu:allocation-depth".into()),
                (REP_ACK, 0, String::new()),
            ]
        );
        assert_eq!(c.go("o@2", &[]).last().unwrap().0, REP_ACK);
        let status = |c: &mut Raw, h: u64, off: u64, len: u64| {
            if extended {
                c.ext_req(0, CMD_BLOCK_STATUS, h, off, len, &[]);
            } else {
                c.req(0, CMD_BLOCK_STATUS, h, off, len as u32, &[]);
            }
            c.status_chunks(h, extended)
        };
        let k = 4096u64;
        // o@2 against o@1: block 1 (0x11 -> 0x22); against the origin:
        // nothing yet. The mem backend's allocation: block 0 zero.
        let cs1 = CHANGED_SINCE_FIRST_ID;
        let cso = CHANGED_SINCE_FIRST_ID + 1;
        assert_eq!(
            status(&mut c, 1, 0, 4 * k),
            [
                (cs1, vec![(k, 0), (k, STATE_CHANGED), (2 * k, 0)]),
                (BASE_ALLOCATION_ID, vec![(k, 3), (3 * k, 0)]),
                (cso, vec![(4 * k, 0)]),
                (ALLOCATION_DEPTH_ID, vec![(k, 0), (3 * k, 1)]),
            ]
        );
        // A write to the export after negotiation shows in the next reply;
        // so does a write to the origin (another version of the pair).
        if extended {
            c.ext_write(0, 2, 3 * k, &[0x33; 100]);
            assert_eq!(c.ext_reply().handle, 2);
        } else {
            c.req(0, CMD_WRITE, 2, 3 * k, 100, &[0x33; 100]);
            assert_eq!(c.reply(None), (2, 0, vec![]));
        }
        o.write(5 * k, &[0x44; 10], false).unwrap();
        let r = status(&mut c, 3, 0, 8 * k);
        assert_eq!(
            r[0],
            (cs1, vec![(k, 0), (k, 1), (k, 0), (k, 1), (4 * k, 0)])
        );
        assert_eq!(
            r[2],
            (cso, vec![(3 * k, 0), (k, 1), (k, 0), (k, 1), (2 * k, 0)])
        );
        // REQ_ONE: one descriptor per context.
        if extended {
            c.ext_req(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 4, k, 4 * k, &[]);
        } else {
            c.req(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 4, k, 4 * k as u32, &[]);
        }
        let r = c.status_chunks(4, extended);
        assert_eq!(r.len(), 4);
        assert!(r.iter().all(|(_, d)| d.len() == 1), "{r:?}");
        assert_eq!(r[0], (cs1, vec![(k, 1)]));
        // A range that starts mid-block is clipped to the request.
        let r = status(&mut c, 5, k + 100, 200);
        assert_eq!(r[0], (cs1, vec![(200, 1)]));
        assert_eq!(r[2], (cso, vec![(200, 0)]));
    }
}

/// it is a conformance check independent of our own client above.
#[test]
fn libnbd_conformance() {
    let Some(nbdsh) = tool("nbdsh") else {
        return;
    };
    let (cat, b) = catalog();
    b.write(0, &[0xAB; 4096], false).unwrap();
    let srv = TestServer::start(cat, ServerConfig::default());
    let uri = format!("nbd://{}", srv.addr);
    let script = format!(
        r#"
h.set_opt_mode(True)
h.set_request_structured_replies(True)
h.set_full_info(True)
h.connect_uri("{uri}")
names = []
h.opt_list(lambda n, d: names.append(n) or 0)
assert names == ["o", "o@1"], names
h.set_export_name("o@1")
h.opt_info()
assert h.get_size() == 1 << 20
assert h.get_export_description() == "first snapshot", h.get_export_description()
assert h.is_read_only()
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
ctx = []
h.set_export_name("o")
h.opt_list_meta_context(lambda c: ctx.append(c) or 0)
assert ctx == ["base:allocation", "qemu:allocation-depth",
               "snapmv:changed-since:origin", "snapmv:changed-since:1"], ctx
h.set_export_name("nope")
try:
    h.opt_go()
    assert False, "unknown export accepted"
except nbd.Error:
    pass
h.set_export_name("o")
h.add_meta_context("base:allocation")
h.opt_go()
assert h.can_multi_conn() and h.can_fua() and h.can_flush() and h.can_trim()
assert h.can_zero() and h.can_fast_zero() and h.can_meta_context("base:allocation")
assert h.pread(4096, 0) == b"\xab" * 4096
h.pwrite(b"\x01" * 512, 8192, nbd.CMD_FLAG_FUA)
assert h.pread(512, 8192) == b"\x01" * 512
ext = []
h.block_status(16384, 0, lambda m, o, e, err: ext.extend(e) or 0)
assert ext == [4096, 0, 4096, 3, 4096, 0, 4096, 3], ext
h.zero(4096, 0)
assert h.pread(4096, 0) == bytes(4096)
h.trim(4096, 0)
h.flush()
try:
    h.pread(2, (1 << 20) - 1)
    assert False
except nbd.Error as e:
    assert e.errno == "EINVAL", e.errno
h.shutdown()
print("ok")
"#
    );
    let out = std::process::Command::new(nbdsh)
        .env(
            "PATH",
            format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .args(["-c", &script])
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && so.contains("ok"),
        "stdout:\n{so}\nstderr:\n{se}"
    );
}

// ---- TLS (STARTTLS) ----
//
// PSK credentials made in memory, and OpenSSL's client: no files, no
// external tools. nbd_tls.rs drives real clients (GnuTLS) with X.509 and
// PSK.

const PSK_KEY: [u8; 32] = [7; 32];

fn tls_server(mode: TlsMode, cfg: ServerConfig) -> TestServer {
    let (cat, _) = catalog();
    let users = [("alice".to_string(), PSK_KEY.to_vec())].into();
    let creds = TlsCredentials::psk(users).unwrap();
    let tls = TlsConfig::new(mode, Some(creds)).unwrap();
    TestServer::start(cat, ServerConfig { tls, ..cfg })
}

/// The payload of OPT_INFO/OPT_GO for `name` asking for name and
/// description, and of OPT_{LIST,SET}_META_CONTEXT with one query.
fn info_payload(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&2u16.to_be_bytes());
    d.extend_from_slice(&INFO_NAME.to_be_bytes());
    d.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
    d
}

fn meta_payload(name: &str, query: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&(query.len() as u32).to_be_bytes());
    d.extend_from_slice(query.as_bytes());
    d
}

/// `--tls require` (FORCEDTLS): before STARTTLS every option but ABORT
/// gets ERR_TLS_REQD, and nothing about any export is sent.
#[test]
fn tls_required_refuses_every_option_before_starttls() {
    let srv = tls_server(TlsMode::Require, ServerConfig::default());
    let mut c = Raw::connect(srv.addr);
    let opts: Vec<(u32, Vec<u8>)> = vec![
        (OPT_LIST, vec![]),
        (OPT_INFO, info_payload("o@1")),
        (OPT_GO, info_payload("o")),
        (OPT_INFO, info_payload("nope")),
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_EXTENDED_HEADERS, vec![]),
        (OPT_LIST_META_CONTEXT, meta_payload("o", "")),
        (OPT_SET_META_CONTEXT, meta_payload("o", BASE_ALLOCATION)),
        (77, b"unknown".to_vec()),
        // Malformed ones too: TLS comes first.
        (OPT_LIST, b"junk".to_vec()),
        (OPT_GO, b"\xff".to_vec()),
    ];
    for (opt, data) in opts {
        c.opt(opt, &data);
        let (o, ty, d) = c.opt_reply();
        assert_eq!((o, ty), (opt, REP_ERR_TLS_REQD), "option {opt}");
        let text = String::from_utf8(d).unwrap();
        assert!(text.contains("STARTTLS"), "{text}");
        assert!(
            !text.contains("o@1") && !text.contains("snapshot"),
            "{text}"
        );
    }
    // STARTTLS with data is invalid, and changes nothing.
    c.opt(OPT_STARTTLS, b"x");
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    c.opt(OPT_LIST, &[]);
    assert_eq!(c.opt_reply().1, REP_ERR_TLS_REQD);
    // ABORT is acknowledged, then the server closes.
    c.opt(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply(), (OPT_ABORT, REP_ACK, vec![]));
    assert!(c.closed());
    // EXPORT_NAME cannot carry an error: the server hangs up, sending
    // nothing (no size, no flags).
    let mut c = Raw::connect(srv.addr);
    c.opt(OPT_EXPORT_NAME, b"o");
    assert!(c.closed());
    // A wrong key or an unknown user: the handshake fails.
    assert!(Raw::connect(srv.addr).starttls("alice", &[1; 32]).is_err());
    assert!(Raw::connect(srv.addr)
        .starttls("mallory", &PSK_KEY)
        .is_err());
    // The right one gets in, and sees the exports.
    let mut t = Raw::connect(srv.addr).starttls("alice", &PSK_KEY).unwrap();
    t.opt(OPT_LIST, &[]);
    assert_eq!(t.opt_reply().1, REP_SERVER);
}

/// After STARTTLS: a second one is invalid, and what was negotiated
/// before it is forgotten (the spec; nbdkit's CVE-2021-3716): reply
/// framing and meta contexts must be negotiated again. Then a whole
/// session runs through the pump.
#[test]
fn starttls_upgrades_and_forgets_what_came_before() {
    for mode in [TlsMode::On, TlsMode::Require] {
        let srv = tls_server(mode, ServerConfig::default());
        let mut c = Raw::connect(srv.addr);
        if mode == TlsMode::On {
            // Plain text is served in this mode.
            c.structured();
            assert_eq!(c.set_meta("o", &[BASE_ALLOCATION])[0].0, REP_META_CONTEXT);
            c.extended();
        }
        let mut t = c.starttls("alice", &PSK_KEY).unwrap();
        t.opt(OPT_STARTTLS, &[]);
        assert_eq!(t.opt_reply().1, REP_ERR_INVALID, "{mode}: STARTTLS twice");
        // Structured replies (and extended headers) are gone: META needs
        // them first.
        assert_eq!(t.set_meta("o", &[BASE_ALLOCATION])[0].0, REP_ERR_INVALID);
        t.opt(OPT_LIST, &[]);
        let mut names = Vec::new();
        loop {
            let (_, ty, d) = t.opt_reply();
            if ty == REP_ACK {
                break;
            }
            names.push(String::from_utf8_lossy(&d[4..]).into_owned());
        }
        assert_eq!(names.len(), 2, "{names:?}");
        // GO with nothing renegotiated: compact requests, simple replies.
        assert_eq!(t.go("o", &[]).last().unwrap().0, REP_ACK);
        t.req(0, CMD_WRITE, 1, 0, 4, b"abcd");
        assert_eq!(t.simple(), (0, 1));
        let data: Vec<u8> = (0..(512u32 << 10)).map(|i| ((i * 7) >> 3) as u8).collect();
        t.req(0, CMD_WRITE, 2, 4096, data.len() as u32, &data);
        assert_eq!(t.simple(), (0, 2));
        t.req(0, CMD_READ, 3, 4096, data.len() as u32, &[]);
        let (h, e, back) = t.reply(Some(data.len()));
        assert_eq!((h, e), (3, 0));
        assert!(back == data, "{mode}: 512 KiB read back differs");
        t.req(0, CMD_DISC, 4, 0, 0, &[]);
        assert!(t.closed());
    }
}

/// A client that sends STARTTLS and its ClientHello in one write, without
/// waiting for the ACK: the connection's reader has read the start of
/// the handshake ahead, and must hand it to TLS.
#[test]
fn starttls_with_the_client_hello_in_the_same_segment() {
    /// Sends `prefix` glued to the first write; reads and checks the
    /// STARTTLS ACK before anything else.
    #[derive(Debug)]
    struct Pipelined {
        s: TcpStream,
        prefix: Option<Vec<u8>>,
        ack_checked: bool,
    }
    impl Write for Pipelined {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            match self.prefix.take() {
                Some(mut p) => {
                    p.extend_from_slice(buf);
                    self.s.write_all(&p)?;
                    Ok(buf.len())
                }
                None => self.s.write(buf),
            }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.s.flush()
        }
    }
    impl Read for Pipelined {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if !self.ack_checked {
                let mut ack = [0u8; 20];
                self.s.read_exact(&mut ack)?;
                let mut want = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
                want.extend_from_slice(&OPT_STARTTLS.to_be_bytes());
                want.extend_from_slice(&REP_ACK.to_be_bytes());
                want.extend_from_slice(&0u32.to_be_bytes());
                assert_eq!(ack[..], want[..], "STARTTLS ACK");
                self.ack_checked = true;
            }
            self.s.read(buf)
        }
    }
    let srv = tls_server(TlsMode::Require, ServerConfig::default());
    let c = Raw::connect(srv.addr);
    let mut prefix = IHAVEOPT.to_be_bytes().to_vec();
    prefix.extend_from_slice(&OPT_STARTTLS.to_be_bytes());
    prefix.extend_from_slice(&0u32.to_be_bytes());
    let p = Pipelined {
        s: c.s,
        prefix: Some(prefix),
        ack_checked: false,
    };
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_psk_client_callback(|_, _, id, psk| {
        id[..6].copy_from_slice(b"alice\0");
        psk[..32].copy_from_slice(&PSK_KEY);
        Ok(32)
    });
    let ssl = b
        .build()
        .configure()
        .unwrap()
        .into_ssl("localhost")
        .unwrap();
    let mut t = Raw {
        s: ssl
            .connect(p)
            .map_err(|e| e.to_string())
            .expect("handshake after a pipelined STARTTLS"),
    };
    assert_eq!(t.go("o", &[]).last().unwrap().0, REP_ACK);
    t.req(0, CMD_READ, 1, 0, 512, &[]);
    assert_eq!(t.reply(Some(512)).1, 0);
}

/// Wait until the receive queue of `fd` is full: not empty, and the same
/// size over 20 checks 10 ms apart (the peer is blocked on a closed
/// window); for at most 60 s.
fn wait_queue_full(fd: std::os::fd::RawFd) {
    let (mut last, mut same) = (0, 0);
    for _ in 0..6000 {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer; `fd` is an
        // open socket owned by the test for the call.
        let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut queued) };
        assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
        same = if queued > 0 && queued == last {
            same + 1
        } else {
            0
        };
        if same == 20 {
            return;
        }
        last = queued;
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the server never filled the socket");
}

/// Shutdown with TLS connections open: an idle one ends at once; one
/// whose client never reads its replies (its pump cannot send, the
/// connection's thread is stuck writing to the pump) is cut after the
/// grace period, which ends its pump, then its thread.
#[test]
fn shutdown_cuts_a_tls_client_that_never_reads_replies() {
    let cfg = ServerConfig {
        max_request: 256 << 10,
        conn_buffer_bytes: 1 << 20,
        ..ServerConfig::default()
    };
    let mut srv = tls_server(TlsMode::Require, cfg);
    let mut idle = Raw::connect(srv.addr).starttls("alice", &PSK_KEY).unwrap();
    idle.go("o", &[]);
    let mut hog = Raw::connect(srv.addr).starttls("alice", &PSK_KEY).unwrap();
    hog.go("o", &[]);
    let hog_fd = hog.s.get_ref().as_raw_fd();
    let sender = std::thread::spawn(move || {
        let mut v = Vec::new();
        for h in 0..4000u64 {
            v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            v.extend_from_slice(&0u16.to_be_bytes());
            v.extend_from_slice(&CMD_READ.to_be_bytes());
            v.extend_from_slice(&h.to_be_bytes());
            v.extend_from_slice(&0u64.to_be_bytes());
            v.extend_from_slice(&(256u32 << 10).to_be_bytes());
        }
        let _ = hog.s.write_all(&v);
        hog
    });
    // 1 GB of replies that are never read: once the hog's receive queue
    // is full, the server's pump and then its connection thread are stuck.
    wait_queue_full(hog_fd);
    let t = Instant::now();
    srv.stop();
    println!("stopped in {:?} (the grace period is 1 s)", t.elapsed());
    assert!(idle.closed());
    // The hog's connection was cut: what was on its way ends, soon.
    let mut hog = sender.join().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    while let Ok(n @ 1..) = hog.s.read(&mut buf) {
        got += n;
        assert!(got < 256 << 20, "replies keep coming after shutdown");
    }
}

/// Find an external client in /usr/bin or on PATH. Missing: a failure
/// under SNAPMV_CI=1, otherwise a printed notice and a skip.
fn tool(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = std::iter::once("/usr/bin")
        .chain(path.split(':'))
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var("SNAPMV_CI").as_deref() != Ok("1"),
            "{name} is required under SNAPMV_CI=1 (apt-get install libnbd-bin python3-libnbd)"
        );
        println!("SKIP: {name} not installed");
    }
    found
}
