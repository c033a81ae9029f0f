//! Shared helpers for the NBD interop tests: a real engine store on memory
//! devices behind a real server on a free port, and external-client helpers.
#![allow(dead_code)]

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use snapmv_engine::store::{Dev, FormatOptions, Store};
use snapmv_engine::MemDev;
use snapmv_nbd::nbd::{Export, Exports, Server, ServerConfig, ShutdownHandle, TlsConfig};

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Find an external client in /usr/bin or on PATH. When it is missing, the
/// test fails under SNAPMV_CI=1 and is skipped (with a notice) otherwise.
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = std::iter::once("/usr/bin")
        .chain(path.split(':'))
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var("SNAPMV_CI").as_deref() != Ok("1"),
            "{name} is required under SNAPMV_CI=1 \
             (apt-get install libnbd-bin python3-libnbd fio qemu-utils)"
        );
        println!("SKIP: {name} is not installed");
    }
    found
}

pub struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ok={}\n--- stdout\n{}\n--- stderr\n{}",
            self.ok, self.stdout, self.stderr
        )
    }
}

/// Run a client with /usr/bin first on PATH (nbdsh must be Debian's), and
/// kill it if it outlives `limit`.
pub fn run(prog: &Path, args: &[&str], limit: Duration) -> Out {
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let mut child = Command::new(prog)
        .args(args)
        .env("PATH", path)
        .env("LIBNBD_DEBUG", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", prog.display()));
    // Drain the pipes on threads so a chatty child cannot block on them.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Out {
        ok: status.is_some_and(|s| s.success()),
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    };
    assert!(
        status.is_some(),
        "{} {:?} timed out after {limit:?}\n{out}",
        prog.display(),
        args
    );
    out
}

/// Origins "o" (and optionally "g") as `id`, snapshots as `id@tag`.
pub struct StoreCatalog {
    pub store: Store,
}

impl Exports for StoreCatalog {
    fn list(&self) -> Vec<String> {
        self.store
            .versions()
            .into_iter()
            .map(|v| match v.tag {
                None => v.origin,
                Some(t) => format!("{}@{t}", v.origin),
            })
            .collect()
    }
    fn open(&self, name: &str) -> Option<Export> {
        let (id, tag) = match name.split_once('@') {
            None => (name, None),
            Some((id, t)) => (id, Some(t.parse().ok()?)),
        };
        let volume = self.store.volume(id, tag).ok()?;
        if !volume.is_live() {
            return None;
        }
        Some(Export {
            description: volume.memo(),
            volume,
            read_only: false,
        })
    }
    fn default_name(&self) -> Option<String> {
        Some("o".into())
    }
}

pub struct Opts {
    pub origin_size: u64,
    pub cow_size: u64,
    pub chunk_size: u32,
    pub origins: &'static [&'static str],
    pub read_only: bool,
    pub unix: bool,
    pub parallel_per_conn: usize,
    pub tls: TlsConfig,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            origin_size: 16 << 20,
            cow_size: 256 << 20,
            chunk_size: 64 << 10,
            origins: &["o"],
            read_only: false,
            unix: false,
            parallel_per_conn: 8,
            tls: TlsConfig::default(),
        }
    }
}

pub struct Harness {
    pub store: Store,
    pub addr: SocketAddr,
    pub unix: Option<PathBuf>,
    pub dir: tempfile::TempDir,
    shutdown: ShutdownHandle,
    server: Option<JoinHandle<()>>,
    bg_stop: Arc<AtomicBool>,
    bg: Option<JoinHandle<()>>,
}

impl Harness {
    pub fn new(opts: Opts) -> Harness {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("SNAPMV_LOG")
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let cow: Dev = Arc::new(MemDev::new(opts.cow_size));
        let store = Store::format(
            cow,
            &FormatOptions {
                chunk_size: opts.chunk_size,
                ..FormatOptions::default()
            },
        )
        .expect("format");
        for id in opts.origins {
            let dev: Dev = Arc::new(MemDev::new(opts.origin_size));
            store
                .bind(id, &format!("mem:{id}"), dev, now())
                .expect("bind");
        }
        let unix = opts.unix.then(|| dir.path().join("nbd.sock"));
        let cfg = ServerConfig {
            tcp: Some("127.0.0.1:0".parse().unwrap()),
            unix: unix.clone(),
            read_only: opts.read_only,
            parallel_per_conn: opts.parallel_per_conn,
            tls: opts.tls,
            ..ServerConfig::default()
        };
        let server = Server::bind(
            cfg,
            Arc::new(StoreCatalog {
                store: store.clone(),
            }),
        )
        .expect("bind server");
        let addr = server.local_addr().unwrap();
        let shutdown = server.shutdown_handle();
        let server = std::thread::spawn(move || server.run().expect("server run"));
        // The background driver production runs: cleaner and copier.
        let bg_stop = Arc::new(AtomicBool::new(false));
        let bg = {
            let (store, stop) = (store.clone(), bg_stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let more = store.step_background(64).map(|r| r.more).unwrap_or(false);
                    if !more {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            })
        };
        Harness {
            store,
            addr,
            unix,
            dir,
            shutdown,
            server: Some(server),
            bg_stop,
            bg: Some(bg),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    pub fn snapshot(&self, memo: &str) -> u64 {
        self.store
            .snapshot("o", None, memo, now())
            .expect("snapshot")
    }

    /// Read a version directly through the engine.
    pub fn read(&self, export: &str, offset: u64, len: usize) -> Vec<u8> {
        let (id, tag) = match export.split_once('@') {
            None => (export, None),
            Some((id, t)) => (id, Some(t.parse().unwrap())),
        };
        let v = self.store.volume(id, tag).unwrap();
        let mut buf = vec![0u8; len];
        v.read(offset, &mut buf).unwrap();
        buf
    }

    pub fn stop(&mut self) {
        self.shutdown.shutdown();
        if let Some(t) = self.server.take() {
            t.join().expect("server thread");
        }
        self.bg_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.bg.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP connection with Nagle off: the `nbd` crate writes each header
/// field separately, which with Nagle and delayed ACKs costs 40 ms a request.
pub fn connect(addr: SocketAddr) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// A test set of TLS credentials made once per test process by
/// `scripts/tls-certs.sh` (certtool, psktool): `server/`, `alice/`,
/// `bob/`, `expired/`, `otherca/`, `selfsigned/`, `nocert/`,
/// `psk/keys.psk`. `None` (skip) when certtool is missing outside CI.
pub fn tls_certs() -> Option<&'static Path> {
    static DIR: std::sync::OnceLock<Option<tempfile::TempDir>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        tool("certtool")?;
        tool("psktool")?;
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/tls-certs.sh");
        let out = run(
            &script,
            &[dir.path().to_str().unwrap()],
            Duration::from_secs(60),
        );
        assert!(out.ok, "tls-certs.sh failed\n{out}");
        Some(dir)
    })
    .as_ref()
    .map(|d| d.path())
}

/// The big-request integrity check, through libnbd's Python binding:
/// `count` requests of `req` bytes each, all in flight at once, written
/// then read back (reads of one half in flight with writes of new data
/// to the other), every byte compared. `uri` says how to connect
/// (`nbd://`, `nbds://...?tls-certificates=...`); the export must hold
/// `count * req` bytes.
pub fn big_requests_integrity(nbdsh: &Path, uri: &str, req: usize, count: usize) -> Out {
    let script = format!(
        r#"
import nbd, os
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri("{uri}")
REQ, N = {req}, {count}
assert h.get_size() >= REQ * N, h.get_size()
def run(cmds):
    # Issue every command at once, then wait for them all.
    cookies = [issue() for issue in cmds]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c), c
data = [bytearray(os.urandom(REQ)) for _ in range(N)]
wbufs = [nbd.Buffer.from_bytearray(d) for d in data]
run([lambda i=i: h.aio_pwrite(wbufs[i], i * REQ) for i in range(N)])
rbufs = [nbd.Buffer(REQ) for _ in range(N)]
half = N // 2
new = [bytearray(os.urandom(REQ)) for _ in range(half, N)]
nbufs = [nbd.Buffer.from_bytearray(d) for d in new]
run([lambda i=i: h.aio_pread(rbufs[i], i * REQ) for i in range(half)] +
    [lambda i=i: h.aio_pwrite(nbufs[i - half], i * REQ) for i in range(half, N)])
for i in range(half):
    assert rbufs[i].to_bytearray() == data[i], ("read back differs", i)
data[half:] = new
rbufs = [nbd.Buffer(REQ) for _ in range(N)]
run([lambda i=i: h.aio_pread(rbufs[i], i * REQ) for i in range(N)])
for i in range(N):
    assert rbufs[i].to_bytearray() == data[i], ("read back differs", i)
tls = h.get_tls_negotiated()
h.flush()
h.shutdown()
print("ok tls=%s" % tls)
"#
    );
    let out = run(nbdsh, &["-c", &script], Duration::from_secs(240));
    assert!(out.ok && out.stdout.contains("ok"), "{out}");
    out
}
