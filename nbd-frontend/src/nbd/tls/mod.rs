//! TLS for NBD (`NBD_OPT_STARTTLS`): credentials, the handshake, and the
//! per-connection pump that carries the encrypted stream.
//!
//! The transmission path works on raw descriptors (`MsgReader` polls the
//! socket, `Outbox` sends from pool threads without blocking), so TLS is
//! not threaded through it. Instead, after STARTTLS is acknowledged, the
//! connection's thread runs the handshake on the socket (blocking,
//! bounded by the negotiation's idle limit and the server's stop), then
//! hands the TLS session and the socket to a **pump** thread and goes on
//! over one end of a `UnixStream::pair()`, in plain text, as if it were
//! the client's socket. The pump moves bytes both ways between the socket
//! (encrypted) and the other end of the pair (plain); see [`pump`].
//!
//! Two kinds of credentials, one per server:
//! - **X.509** with rustls (ring provider): a certificate chain and key,
//!   and optionally a CA. With a CA every client must present a
//!   certificate that chains to it and is valid now; its subject CN is the
//!   client's identity.
//! - **PSK** (`username:hexkey` lines, nbdkit's `psktool` format) with
//!   OpenSSL, as rustls has no external PSK; the PSK username is the
//!   client's identity. TLS 1.3 (SHA-256 PSK, what GnuTLS clients offer)
//!   and TLS 1.2 (ECDHE-PSK and PSK suites).
//!
//! A server takes one kind, not both, as nbdkit does: a client cannot say
//! which it wants before the handshake, and one policy is easier to
//! reason about.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openssl::ssl::{SslContext, SslContextBuilder, SslMethod, SslOptions, SslVersion};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::io::{StopSignal, Stream};

pub(crate) mod pump;
mod session;

pub(crate) use session::{NetSocket, Session};

/// Whether and how a server uses TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// TLS for clients that ask (STARTTLS); plain clients are served too
    /// (the spec's SELECTIVETLS with no TLS-only export).
    On,
    /// Every option before STARTTLS but `NBD_OPT_ABORT` gets
    /// `NBD_REP_ERR_TLS_REQD`, and `NBD_OPT_EXPORT_NAME` ends the
    /// connection (the spec's FORCEDTLS).
    Require,
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        })
    }
}

/// Most bytes of one pre-shared key (OpenSSL's `PSK_MAX_PSK_LEN`).
pub const MAX_PSK_BYTES: usize = 512;

/// Why TLS credentials could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: no PEM certificate in it", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: malformed PEM: {why}", path.display())]
    Pem { path: PathBuf, why: String },
    #[error("{}: no PEM private key in it", path.display())]
    NoKey { path: PathBuf },
    #[error("the private key in {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("certificate {} with key {}: {why}", cert.display(), key.display())]
    Unusable {
        cert: PathBuf,
        key: PathBuf,
        why: String,
    },
    #[error("CA certificates {}: {why}", path.display())]
    Ca { path: PathBuf, why: String },
    #[error("{}: no {file} in it (a TLS directory holds server-cert.pem and server-key.pem, and optionally ca-cert.pem)", dir.display())]
    DirMissing { dir: PathBuf, file: &'static str },
    #[error("PSK file {} line {line}: {why}", path.display())]
    PskLine {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("PSK file {}: no keys in it", path.display())]
    PskEmpty { path: PathBuf },
    #[error("TLS {0} needs credentials: a certificate and key, or a PSK file")]
    NoCredentials(TlsMode),
    #[error("OpenSSL: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
}

/// Why a TLS handshake (or setting one up) failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("client closed the connection during the TLS handshake")]
    Closed,
    #[error("no TLS handshake progress for {0:?}")]
    Idle(Duration),
    #[error("server shutting down during the TLS handshake")]
    Stopped,
    #[error("I/O during the TLS handshake: {0}")]
    Io(#[from] io::Error),
}

/// Loaded credentials: an X.509 certificate (and maybe a client CA), or
/// pre-shared keys. Cheap to clone.
#[derive(Clone)]
pub struct TlsCredentials(Creds);

#[derive(Clone)]
enum Creds {
    X509 {
        config: Arc<rustls::ServerConfig>,
        verify_clients: bool,
    },
    Psk {
        ctx: SslContext,
        users: usize,
    },
}

/// The TLS part of a [`super::ServerConfig`].
#[derive(Clone, Default)]
pub struct TlsConfig {
    mode: TlsMode,
    creds: Option<TlsCredentials>,
}

impl fmt::Debug for TlsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsCredentials({})", self.describe())
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsConfig({}", self.mode)?;
        if let Some(c) = &self.creds {
            write!(f, ", {}", c.describe())?;
        }
        f.write_str(")")
    }
}

impl TlsConfig {
    /// TLS `mode` with `creds`. `On` and `Require` need credentials; `Off`
    /// ignores any.
    pub fn new(mode: TlsMode, creds: Option<TlsCredentials>) -> Result<TlsConfig, TlsError> {
        match (mode, creds) {
            (TlsMode::Off, _) => Ok(TlsConfig::default()),
            (m, None) => Err(TlsError::NoCredentials(m)),
            (mode, Some(c)) => Ok(TlsConfig {
                mode,
                creds: Some(c),
            }),
        }
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// What the server offers, for the log: "off", or the mode and the
    /// credentials.
    pub fn describe(&self) -> String {
        match &self.creds {
            None => "off".into(),
            Some(c) => format!("{} ({})", self.mode, c.describe()),
        }
    }

    /// A fresh server session for one connection. Only with credentials.
    fn new_session(&self) -> Result<Box<dyn Session>, HandshakeError> {
        let Some(TlsCredentials(c)) = &self.creds else {
            return Err(HandshakeError::Tls("TLS is not configured".into()));
        };
        match c {
            Creds::X509 { config, .. } => session::rustls_session(config.clone()),
            Creds::Psk { ctx, .. } => session::openssl_session(ctx),
        }
    }
}

impl TlsCredentials {
    /// What these credentials are, for the log.
    pub fn describe(&self) -> String {
        match &self.0 {
            Creds::X509 {
                verify_clients: true,
                ..
            } => "X.509, client certificates required and verified".into(),
            Creds::X509 { .. } => "X.509, no client certificates".into(),
            Creds::Psk { users, .. } => format!("PSK, {users} user(s)"),
        }
    }

    /// A certificate chain and its key (PEM files), and optionally the CA
    /// (PEM, one or more certificates) that client certificates must
    /// chain to; with a CA, clients without a valid certificate are
    /// refused in the handshake.
    pub fn x509_files(
        cert: &Path,
        key: &Path,
        ca: Option<&Path>,
    ) -> Result<TlsCredentials, TlsError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let ca_pem = ca.map(|p| read(p).map(|b| (p, b))).transpose()?;
        x509(
            (cert, &read(cert)?),
            (key, &read(key)?),
            ca_pem.as_ref().map(|(p, b)| (*p, &b[..])),
        )
    }

    /// The layout qemu and nbdkit use: `server-cert.pem`, `server-key.pem`
    /// and, if present, `ca-cert.pem` in `dir`.
    pub fn x509_dir(dir: &Path) -> Result<TlsCredentials, TlsError> {
        let need = |file: &'static str| {
            let p = dir.join(file);
            if p.exists() {
                Ok(p)
            } else {
                Err(TlsError::DirMissing {
                    dir: dir.to_path_buf(),
                    file,
                })
            }
        };
        if !dir.is_dir() {
            return Err(TlsError::Read {
                path: dir.to_path_buf(),
                source: io::Error::new(io::ErrorKind::NotFound, "not a directory"),
            });
        }
        let (cert, key) = (need("server-cert.pem")?, need("server-key.pem")?);
        let ca = dir.join("ca-cert.pem");
        TlsCredentials::x509_files(&cert, &key, ca.exists().then_some(ca.as_path()))
    }

    /// As [`x509_files`](Self::x509_files), from PEM bytes (names in
    /// errors are "cert", "key" and "ca").
    pub fn x509_pem(
        cert: &[u8],
        key: &[u8],
        ca: Option<&[u8]>,
    ) -> Result<TlsCredentials, TlsError> {
        x509(
            (Path::new("cert"), cert),
            (Path::new("key"), key),
            ca.map(|b| (Path::new("ca"), b)),
        )
    }

    /// Pre-shared keys from a file of `username:hexkey` lines (nbdkit's
    /// `psktool` format; blank lines are skipped).
    pub fn psk_file(path: &Path) -> Result<TlsCredentials, TlsError> {
        let text = std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let users = parse_psk(&text).map_err(|(line, why)| TlsError::PskLine {
            path: path.to_path_buf(),
            line,
            why,
        })?;
        if users.is_empty() {
            return Err(TlsError::PskEmpty {
                path: path.to_path_buf(),
            });
        }
        TlsCredentials::psk(users)
    }

    /// Pre-shared keys, username to key.
    pub fn psk(users: HashMap<String, Vec<u8>>) -> Result<TlsCredentials, TlsError> {
        let n = users.len();
        Ok(TlsCredentials(Creds::Psk {
            ctx: psk_context(Arc::new(users))?,
            users: n,
        }))
    }
}

/// Parse a PSK file: `username:hexkey` per line. Returns the users, or
/// the first bad line (1-based) and why.
pub fn parse_psk(text: &[u8]) -> Result<HashMap<String, Vec<u8>>, (usize, String)> {
    let mut users = HashMap::new();
    for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let bad = |why: &str| Err((line_no, why.to_string()));
        let Ok(line) = std::str::from_utf8(raw) else {
            return bad("not UTF-8");
        };
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let Some((user, hex)) = line.split_once(':') else {
            return bad("expected username:hexkey");
        };
        if user.is_empty() {
            return bad("empty username");
        }
        if user.contains(|c: char| c.is_control()) {
            return bad("username has control characters");
        }
        let hex = hex.trim();
        if hex.is_empty() {
            return bad("empty key");
        }
        if hex.len() % 2 != 0 {
            return bad("the key has an odd number of hex digits");
        }
        let mut key = Vec::with_capacity(hex.len() / 2);
        for pair in hex.as_bytes().chunks_exact(2) {
            let digit = |c: u8| (c as char).to_digit(16);
            match (digit(pair[0]), digit(pair[1])) {
                (Some(h), Some(l)) => key.push((h * 16 + l) as u8),
                _ => return bad("the key is not hexadecimal"),
            }
        }
        if key.len() > MAX_PSK_BYTES {
            return Err((
                line_no,
                format!("the key is over {MAX_PSK_BYTES} bytes ({})", key.len()),
            ));
        }
        if users.insert(user.to_string(), key).is_some() {
            return Err((line_no, format!("user {user:?} appears twice")));
        }
    }
    Ok(users)
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::Pem {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

/// The certificates in a PEM file (none is an error).
fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    match PrivateKeyDer::from_pem_slice(pem) {
        Ok(k) => Ok(k),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => Err(TlsError::NoKey {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(pem_error(path, e)),
    }
}

/// A verifier that requires a client certificate chaining to the CA
/// certificates in `pem` and valid now.
fn client_verifier(
    path: &Path,
    pem: &[u8],
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let ca_err = |why: String| TlsError::Ca {
        path: path.to_path_buf(),
        why,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| pem_error(path, e))?;
        roots
            .add(cert)
            .map_err(|e| ca_err(format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ca_err("no PEM certificate in it".into()));
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| ca_err(e.to_string()))
}

fn x509(
    (cert_path, cert): (&Path, &[u8]),
    (key_path, key): (&Path, &[u8]),
    ca: Option<(&Path, &[u8])>,
) -> Result<TlsCredentials, TlsError> {
    let certs = parse_certs(cert_path, cert)?;
    let key = parse_key(key_path, key)?;
    let unusable = |why: String| TlsError::Unusable {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
        why,
    };
    let provider = Arc::new(fast_first(rustls::crypto::ring::default_provider()));
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| unusable(e.to_string()))?;
    let verify_clients = ca.is_some();
    let builder = match ca {
        None => builder.with_no_client_auth(),
        Some((path, pem)) => {
            builder.with_client_cert_verifier(client_verifier(path, pem, provider)?)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TlsError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            }
        }
        e => unusable(e.to_string()),
    })?;
    // The server's order of suites decides (`fast_first`).
    config.ignore_client_order = true;
    // No resumption: every connection proves its certificate afresh.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(TlsCredentials(Creds::X509 {
        config: Arc::new(config),
        verify_clients,
    }))
}

/// The provider's suites with AES-128-GCM first. Block traffic is bulk
/// data: AES-128 runs 10 rounds to AES-256's 14 on both ends (the client
/// pays too), and it is the suite TLS 1.3 makes every implementation
/// support. GnuTLS clients (libnbd, qemu) list AES-256-GCM first, so the
/// server's order must decide.
fn fast_first(mut provider: rustls::crypto::CryptoProvider) -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256};
    let rank = |s: &rustls::SupportedCipherSuite| match s.suite() {
        TLS13_AES_128_GCM_SHA256 | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        _ => 1,
    };
    provider.cipher_suites.sort_by_key(rank);
    provider
}

/// TLS 1.3 suites for PSK sessions, in the server's order: a PSK from the
/// callback is bound to SHA-256, which leaves AES-128-GCM and
/// ChaCha20-Poly1305; GnuTLS would pick ChaCha20, several times slower
/// than AES with the instructions every x86 server has.
const PSK_TLS13_SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";

fn psk_context(users: Arc<HashMap<String, Vec<u8>>>) -> Result<SslContext, TlsError> {
    let mut builder = SslContextBuilder::new(SslMethod::tls_server())?;
    builder.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    // TLS 1.2: the PSK suites without a certificate (ECDHE-PSK first, for
    // forward secrecy). TLS 1.3 takes a PSK through the same callback,
    // with SHA-256 suites (what GnuTLS, so libnbd and qemu, offers).
    builder.set_cipher_list("ECDHE-PSK:PSK:!NULL:!aRSA")?;
    builder.set_ciphersuites(PSK_TLS13_SUITES)?;
    builder.set_options(
        SslOptions::NO_TICKET | SslOptions::NO_RENEGOTIATION | SslOptions::CIPHER_SERVER_PREFERENCE,
    );
    builder.set_num_tickets(0)?;
    builder.set_session_cache_mode(openssl::ssl::SslSessionCacheMode::OFF);
    let index = session::psk_identity_index()?;
    builder.set_psk_server_callback(move |ssl, identity, out| {
        let raw = identity.unwrap_or_default();
        let name = String::from_utf8_lossy(raw).into_owned();
        let key = std::str::from_utf8(raw).ok().and_then(|n| users.get(n));
        match key {
            Some(key) if key.len() <= out.len() => {
                out[..key.len()].copy_from_slice(key);
                ssl.set_ex_data(index, Ok(name));
                Ok(key.len())
            }
            // Unknown user: 0 bytes makes OpenSSL refuse the handshake.
            _ => {
                ssl.set_ex_data(index, Err(name));
                Ok(0)
            }
        }
    });
    Ok(builder.build())
}

/// Run the server side of a TLS handshake on `sock`, after STARTTLS was
/// acknowledged. `early` is what the connection's reader had already
/// read past the option (the start of the ClientHello, maybe); it is fed
/// to the session first. Waits at most `idle` for each step of the
/// client, and gives up when the server stops. On success, the session
/// and the socket (with any bytes of `early` not yet consumed) go to the
/// pump.
pub(crate) fn handshake(
    cfg: &TlsConfig,
    sock: Stream,
    early: Vec<u8>,
    stop: &StopSignal,
    idle: Duration,
) -> Result<(Box<dyn Session>, NetSocket), HandshakeError> {
    let mut s = cfg.new_session()?;
    let mut net = NetSocket::new(sock, early);
    let result = drive_handshake(&mut *s, &mut net, stop, idle);
    if result.is_err() {
        // Tell the client why (an alert may be queued), without waiting.
        while s.wants_write() {
            if !matches!(s.write_tls(&mut net), Ok(n) if n > 0) {
                break;
            }
        }
        let _ = net.stream().shutdown(std::net::Shutdown::Both);
    }
    result.map(|()| (s, net))
}

fn drive_handshake(
    s: &mut dyn Session,
    net: &mut NetSocket,
    stop: &StopSignal,
    idle: Duration,
) -> Result<(), HandshakeError> {
    loop {
        while s.wants_write() {
            match s.write_tls(net) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        if !s.is_handshaking() && !s.wants_write() {
            return Ok(());
        }
        let mut read_any = false;
        if s.wants_read() {
            match s.read_tls(net) {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(_) => {
                    read_any = true;
                    s.process().map_err(HandshakeError::Tls)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        if read_any {
            continue;
        }
        let mut events = 0;
        if s.wants_read() {
            events |= libc::POLLIN;
        }
        if s.wants_write() {
            events |= libc::POLLOUT;
        }
        let mut fds = [
            libc::pollfd {
                fd: net.stream().as_raw_fd(),
                events,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout = idle.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is a valid array of 2 pollfd structs borrowed
        // exclusively for the call; the descriptors are owned by `net` and
        // the server, both alive here.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if rc == 0 {
            return Err(HandshakeError::Idle(idle));
        }
        if fds[1].revents != 0 && fds[0].revents == 0 {
            return Err(HandshakeError::Stopped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_lines() {
        let u = parse_psk(b"alice:00ff10\n\nbob:ABCDEF\r\n").unwrap();
        assert_eq!(u["alice"], vec![0, 0xff, 0x10]);
        assert_eq!(u["bob"], vec![0xab, 0xcd, 0xef]);
        assert_eq!(u.len(), 2);
        // A colon in the key part is not allowed, in the name it splits.
        assert!(parse_psk(b"carol:12:34\n").is_err());
        for (text, line, why) in [
            (&b"alice:00\nnocolon\n"[..], 2, "username:hexkey"),
            (b":00", 1, "empty username"),
            (b"a:", 1, "empty key"),
            (b"a:0", 1, "odd"),
            (b"a:zz", 1, "hexadecimal"),
            (b"a:00\n\na:11", 3, "twice"),
            (b"a\x01b:00", 1, "control"),
            (b"a:\xff", 1, "UTF-8"),
        ] {
            let (l, w) = parse_psk(text).unwrap_err();
            assert_eq!(l, line, "{text:?}: {w}");
            assert!(w.contains(why), "{text:?}: {w}");
        }
        let long = format!("a:{}", "00".repeat(MAX_PSK_BYTES + 1));
        assert!(parse_psk(long.as_bytes()).unwrap_err().1.contains("over"));
        assert!(parse_psk(b"").unwrap().is_empty());
    }

    #[test]
    fn modes_need_credentials() {
        assert!(TlsConfig::new(TlsMode::Off, None).is_ok());
        for m in [TlsMode::On, TlsMode::Require] {
            let e = TlsConfig::new(m, None).unwrap_err();
            assert!(e.to_string().contains("needs credentials"), "{e}");
        }
        let psk = TlsCredentials::psk([("a".to_string(), vec![1; 32])].into()).unwrap();
        let c = TlsConfig::new(TlsMode::Require, Some(psk)).unwrap();
        assert_eq!(c.describe(), "require (PSK, 1 user(s))");
    }

    #[test]
    fn malformed_pem_is_refused() {
        let e = TlsCredentials::x509_pem(b"nothing here", b"", None).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        let bad = b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let e = TlsCredentials::x509_pem(bad, b"", None).unwrap_err();
        assert!(matches!(e, TlsError::Pem { .. }), "{e}");
    }
}
