//! Whole NBD connections: fuzzer bytes are the client's side of the stream.
//!
//! The negotiation and transmission drivers (`nbd::negotiate`,
//! `nbd::transmit`) are private to `snapmv-nbd`, so this goes through the
//! nearest public entry point: the real `nbd::Server`, bound once on a Unix
//! socket, with `exports::StoreExports` over a store on MemDev. Every input
//! gets a fresh copy of the same small store (origin `o`, snapshot `o@1`,
//! snapshot-of-snapshot `o@2`), so a case replays the same way.
//!
//! Byte 0 is a mode: bit 0 serves the catalogue read-only; bit 1 prepends a
//! valid handshake (client flags, STRUCTURED_REPLY, SET_META_CONTEXT
//! base:allocation, GO) for the export picked by bits 2-3, so the rest of
//! the input lands straight in the transmission phase; bit 4 makes that
//! handshake ask for EXTENDED_HEADERS instead of STRUCTURED_REPLY, so the
//! rest is read as 32-byte extended requests; bit 5 makes it select, besides
//! base:allocation, `snapmv:changed-since:1`, `snapmv:changed-since:origin`
//! and `qemu:allocation-depth` (one BLOCK_STATUS chunk each, diffs run by
//! the engine on every request). Bit 6 connects to a server with TLS:
//! bit 7 makes it `require` (every option before STARTTLS refused), else
//! `on`; bit 2 picks PSK credentials (OpenSSL), else X.509 (rustls, the
//! test certificate in fuzz/tls/). With bit 6, bit 1 prepends client flags
//! and NBD_OPT_STARTTLS instead of the handshake, so the rest of the input
//! is the client's side of the TLS handshake (garbage, truncated, or a
//! seed's real ClientHello); without bit 1 the input covers the options
//! before STARTTLS, STARTTLS itself and whatever follows. The target writes
//! the stream, half-closes, and reads replies until the server closes the
//! connection: a server that does not close within 20 s is a hang.
//! A panic on any server thread aborts the process (libFuzzer's hook).
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapmv_engine::store::{Dev, Store};
use snapmv_fuzz::*;
use snapmv_nbd::exports::StoreExports;
use snapmv_nbd::nbd::proto::*;
use snapmv_nbd::nbd::{Export, Exports, Server, ServerConfig, TlsConfig, TlsCredentials, TlsMode};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use snapmv_engine::dev::BlockDev;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const ORIGIN_SIZE: usize = 64 * 4096 + 1000;
const EXPORTS: [&str; 4] = ["o", "o@1", "o@2", ""];

/// The COW device of one case. Once the client has seen the server close
/// the connection and the store is closed, nothing may write to it: a late
/// write means a server thread still runs requests of a finished session.
struct Cow {
    dev: Arc<snapmv_engine::MemDev>,
    sealed: AtomicBool,
    /// The case's input and how the client saw the session end, for the
    /// report of a late write (which fires during a later case).
    info: Mutex<String>,
}

impl BlockDev for Cow {
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> snapmv_engine::Result<()> {
        self.dev.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> snapmv_engine::Result<()> {
        assert!(
            !self.sealed.load(Ordering::SeqCst),
            "write of {} bytes at {offset} after the session ended and the store was closed; \
             that session: {}",
            buf.len(),
            self.info.lock().unwrap()
        );
        self.dev.write_at(offset, buf)
    }
    fn flush(&self) -> snapmv_engine::Result<()> {
        self.dev.flush()
    }
}

/// The catalogue the server sees: whatever store the current case installed.
#[derive(Default)]
struct Current(Mutex<Option<StoreExports>>);

impl Exports for Current {
    fn list(&self) -> Vec<String> {
        self.0.lock().unwrap().as_ref().map(|e| e.list()).unwrap_or_default()
    }
    fn open(&self, name: &str) -> Option<Export> {
        self.0.lock().unwrap().as_ref().and_then(|e| e.open(name))
    }
    fn default_name(&self) -> Option<String> {
        self.0.lock().unwrap().as_ref().and_then(|e| e.default_name())
    }
}

struct Fixture {
    /// Plain; then TLS on and require with X.509; then with PSK.
    path: PathBuf,
    tls_paths: [PathBuf; 4],
    current: Arc<Current>,
    cow: Vec<u8>,
    origin: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // The base store image.
        let (cow, s) = fresh_store(4 << 20);
        let o = origin_dev(ORIGIN_SIZE, 3);
        s.bind("o", "/dev/o", o.clone(), 1).unwrap();
        let t1 = s.snapshot("o", None, "one", 2).unwrap();
        s.volume("o", None).unwrap().write(4096, &pattern(9000, 1), false).unwrap();
        s.snapshot("o", Some(t1), "two", 3).unwrap();
        s.volume("o", Some(t1)).unwrap().write(20000, &pattern(5000, 2), false).unwrap();
        s.close().unwrap();
        let (cow_img, origin_img) = (image_of(&*cow), image_of(&*o));

        let sock = |tag: &str| std::env::temp_dir().join(format!("snapmv-fuzz-nbd-{}{tag}.sock", std::process::id()));
        let current = Arc::new(Current::default());
        let start = |path: &PathBuf, tls: TlsConfig| {
            let cfg = ServerConfig {
                tcp: None,
                unix: Some(path.clone()),
                read_only: false,
                max_request: 128 << 10,
                conn_buffer_bytes: 512 << 10,
                server_buffer_bytes: 2 << 20,
                parallel_per_conn: 2,
                pool_threads: 4,
                access: Default::default(),
                tls,
            };
            let server = Server::bind(cfg, current.clone() as Arc<dyn Exports>).expect("bind NBD server");
            std::thread::spawn(move || server.run().expect("server run"));
        };
        let path = sock("");
        start(&path, TlsConfig::default());
        let x509 = TlsCredentials::x509_pem(
            include_bytes!("../tls/server-cert.pem"),
            include_bytes!("../tls/server-key.pem"),
            None,
        )
        .expect("fuzz/tls credentials");
        let psk = TlsCredentials::psk([("alice".to_string(), vec![7u8; 32])].into()).expect("PSK");
        let tls_paths = [sock("-x509-on"), sock("-x509-req"), sock("-psk-on"), sock("-psk-req")];
        for (i, p) in tls_paths.iter().enumerate() {
            let creds = if i < 2 { x509.clone() } else { psk.clone() };
            let mode = if i % 2 == 0 { TlsMode::On } else { TlsMode::Require };
            start(p, TlsConfig::new(mode, Some(creds)).expect("TLS config"));
        }
        Fixture {
            path,
            tls_paths,
            current,
            cow: cow_img,
            origin: origin_img,
        }
    })
}

fn opt(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn lp(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// A valid handshake ending in OPT_GO for `name`, with structured replies
/// or extended headers.
fn handshake(name: &str, extended: bool, contexts: bool) -> Vec<u8> {
    let mut s = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
    let replies = if extended { OPT_EXTENDED_HEADERS } else { OPT_STRUCTURED_REPLY };
    s.extend(opt(replies, &[]));
    let mut mc = lp(name);
    let mut queries = vec![BASE_ALLOCATION];
    if contexts {
        queries.extend(["snapmv:changed-since:1", "snapmv:changed-since:origin", ALLOCATION_DEPTH]);
    }
    mc.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        mc.extend(lp(q));
    }
    s.extend(opt(OPT_SET_META_CONTEXT, &mc));
    let mut go = lp(name);
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    s.extend(opt(OPT_GO, &go));
    s
}

fuzz_target!(|data: &[u8]| {
    // A session runs on several server threads, so a finding can depend on
    // timing: SNAPMV_FUZZ_REPEAT=N replays each input N times in-process.
    let repeat = std::env::var("SNAPMV_FUZZ_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1usize);
    for _ in 0..repeat {
        session(data);
    }
});

fn session(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let cow = Arc::new(Cow {
        dev: dev_from_image(&f.cow),
        sealed: AtomicBool::new(false),
        info: Mutex::new(String::new()),
    });
    let origins = vec![("o".to_string(), dev_from_image(&f.origin))];
    let store = Store::open(cow.clone() as Dev, &mut resolver(&origins, false)).expect("open fixture");
    *f.current.0.lock().unwrap() = Some(StoreExports::new(vec![store.clone()], mode & 1 != 0));

    let tls = mode & 0x40 != 0;
    let mut stream = Vec::with_capacity(rest.len() + 128);
    if mode & 2 != 0 {
        if tls {
            stream.extend((FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
            stream.extend(opt(OPT_STARTTLS, &[]));
        } else {
            stream.extend(handshake(EXPORTS[(mode as usize >> 2) % 4], mode & 0x10 != 0, mode & 0x20 != 0));
        }
    }
    stream.extend_from_slice(rest);

    let path = if tls {
        let psk = mode & 4 != 0;
        let require = mode & 0x80 != 0;
        &f.tls_paths[2 * psk as usize + require as usize]
    } else {
        &f.path
    };
    let sock = UnixStream::connect(path).expect("connect to the NBD server");
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut wr = sock.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        // The server may close early (bad magic...): a failed write is fine.
        let _ = wr.write_all(&stream);
        let _ = wr.shutdown(Shutdown::Write);
    });
    let mut rd = &sock;
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0usize;
    let end = loop {
        match rd.read(&mut buf) {
            Ok(0) => break "EOF".to_string(),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                panic!("NBD server did not close the connection within 20 s after the client half-closed")
            }
            // libFuzzer's SIGALRM (the -timeout watchdog) interrupts reads.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break format!("read error {e}"), // reset by the server: fine
        }
    };
    writer.join().unwrap();
    *cow.info.lock().unwrap() = format!(
        "ended by {end} after {got} reply bytes; input {}",
        data.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    drop(sock);
    *f.current.0.lock().unwrap() = None;
    // Whatever the client sent, the store it wrote through stays consistent.
    store.close().expect("close the store after a session");
    cow.sealed.store(true, Ordering::SeqCst);
    let rep = snapmv_engine::store::check(cow.dev.clone() as Dev).expect("check");
    assert!(rep.errors.is_empty(), "store damaged by an NBD session: {:?}", rep.errors);
}
