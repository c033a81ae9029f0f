//! `snapmv serve`: open the COW devices, export every version over NBD,
//! drive the engine's background work, answer the control sockets, and
//! shut down cleanly on SIGINT/SIGTERM.

use crate::control::ControlServer;
use crate::driver::{self, DriverConfig, Signal};
use crate::lock::{self, CowLock, LockMode};
use anyhow::{anyhow, bail, Context, Result};
use snapmv_engine::dev::OpenOptions;
use snapmv_engine::store::{Dev, FormatOptions, Store};
use snapmv_engine::FileDev;
use snapmv_nbd::exports::StoreExports;
use snapmv_nbd::nbd::{
    AccessPolicy, Server, ServerConfig, ShutdownHandle, TlsConfig, TlsCredentials, TlsMode,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub const DEFAULT_DIR: &str = "snapmv-data";
const DEFAULT_COW_SIZE: u64 = 4 << 30;
const DEFAULT_ORIGIN_SIZE: u64 = 1 << 30;
const DEFAULT_ORIGIN_ID: &str = "origin";
const DEFAULT_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 10809);

pub struct ServeArgs {
    pub cows: Vec<PathBuf>,
    pub origins: Vec<(String, PathBuf)>,
    pub listen: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    pub read_only: bool,
    /// `--allow` and `--read-only-export`.
    pub access: AccessPolicy,
    /// Byte budget of each store's metadata page cache.
    pub cache_budget: u64,
    /// Byte budget of each store's staged first writes.
    pub staging_budget: u64,
    /// How long staged first writes wait for others to share their commit.
    pub commit_delay: Duration,
    pub tls: crate::cli::TlsArgs,
}

/// One served COW device.
struct Served {
    cow: PathBuf,
    canon: String,
    store: Store,
    _lock: CowLock,
}

pub fn serve(args: ServeArgs) -> Result<ExitCode> {
    // Bad TLS options fail before any device is touched.
    let tls = tls_config(&args.tls)?;
    // Block the termination signals before any thread exists so every
    // thread inherits the mask and only the signal thread receives them.
    let sigs = block_term_signals()?;

    let served = if args.cows.is_empty() {
        vec![open_default(&args.origins)?]
    } else {
        open_all(&args.cows, &args.origins)?
    };
    for s in &served {
        s.store.set_cache_budget(args.cache_budget);
        s.store.set_staging_budget(args.staging_budget);
    }
    tracing::info!(bytes = args.cache_budget, "metadata page cache budget");
    tracing::info!(
        bytes = args.staging_budget,
        commit_delay_us = args.commit_delay.as_micros() as u64,
        "first-write staging"
    );
    let result = run(&served, &args, tls, sigs);
    // Close every store whatever happened: flush, checkpoint, release locks.
    let mut ok = result.is_ok();
    for s in served {
        let c = s.store.cache_stats();
        tracing::info!(
            cow = %s.cow.display(),
            pages = c.pages,
            bytes = c.bytes,
            pinned = c.pinned,
            hits = c.hits,
            misses = c.misses,
            evictions = c.evictions,
            over_budget = c.over_budget,
            "metadata page cache"
        );
        let st = s.store.staging_stats();
        tracing::info!(
            cow = %s.cow.display(),
            staged = st.staged,
            destaged = st.destaged,
            commits = s.store.commits(),
            "first-write staging"
        );
        tracing::info!(cow = %s.cow.display(), "closing");
        if let Err(e) = s.store.flush() {
            tracing::error!(cow = %s.cow.display(), error = %e, "flush at shutdown failed");
            ok = false;
        }
        if let Err(e) = s.store.close() {
            tracing::error!(cow = %s.cow.display(), error = %e, "close failed");
            ok = false;
        }
    }
    result?;
    if !ok {
        bail!("shut down with errors (see the log above)");
    }
    tracing::info!("stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

fn run(served: &[Served], args: &ServeArgs, tls: TlsConfig, sigs: libc::sigset_t) -> Result<()> {
    let tcp = match (args.listen, &args.unix) {
        (Some(a), _) => Some(a),
        (None, Some(_)) => None,
        (None, None) => Some(SocketAddr::from(DEFAULT_LISTEN)),
    };
    if let Some(a) = tcp.filter(|a| !a.ip().is_loopback()) {
        warn_if_exposed(a, tls.mode());
    }
    if args.access.restricts() && tls.mode() == TlsMode::Off {
        // Names come from TLS alone: no plain-text client has one.
        tracing::warn!(
            "--allow without TLS: the exports it matches are open to no client (a client's \
             name is its certificate CN or PSK username); use --tls require"
        );
    }
    let cfg = ServerConfig {
        tcp,
        unix: args.unix.clone(),
        read_only: args.read_only,
        access: args.access.clone(),
        tls,
        ..ServerConfig::default()
    };
    let exports = Arc::new(StoreExports::new(
        served.iter().map(|s| s.store.clone()).collect(),
        args.read_only,
    ));
    let server = Server::bind(cfg, exports).context("cannot start the NBD server")?;
    if let Some(a) = server.local_addr() {
        tracing::info!(addr = %a, "NBD listening on TCP");
    }
    if let Some(u) = &args.unix {
        tracing::info!(path = %u.display(), "NBD listening on Unix socket");
    }

    let signals: Vec<Arc<Signal>> = served.iter().map(|_| Arc::default()).collect();
    let mut drivers: Vec<JoinHandle<()>> = Vec::new();
    let driver_cfg = DriverConfig {
        commit_delay: args.commit_delay,
    };
    let mut controls: Vec<ControlServer> = Vec::new();
    let started = (|| -> Result<()> {
        for (s, signal) in served.iter().zip(&signals) {
            let (store, signal, name) = (s.store.clone(), signal.clone(), s.canon.clone());
            drivers.push(
                std::thread::Builder::new()
                    .name("snapmv-driver".into())
                    .spawn(move || driver::run(store, signal, driver_cfg, name))
                    .context("cannot start a driver thread")?,
            );
        }
        // Control sockets last: a connectable socket tells scripts (and the
        // tests) that the server is fully up. Never fatal: without one the
        // NBD exports still work.
        controls.extend(served.iter().filter_map(start_control));
        Ok(())
    })();

    let run_result = match started {
        Ok(()) => {
            spawn_signal_thread(sigs, server.shutdown_handle())?;
            let names: Vec<String> = served
                .iter()
                .flat_map(|s| s.store.versions())
                .map(|v| snapmv_nbd::exports::export_name(&v))
                .collect();
            tracing::info!(exports = ?names, "serving");
            server.run().context("NBD server failed")
        }
        Err(e) => Err(e),
    };

    // Orderly stop: no new admin requests, then no background work, then
    // the server (and its store clones) go away before the stores close.
    for c in controls {
        c.stop();
    }
    for signal in &signals {
        signal.stop();
    }
    for d in drivers {
        if d.join().is_err() {
            tracing::error!("background thread panicked");
        }
    }
    drop(server);
    run_result
}

/// The TLS settings `--tls*` ask for, credentials loaded.
pub fn tls_config(a: &crate::cli::TlsArgs) -> Result<TlsConfig> {
    use crate::cli::TlsModeArg;
    let mode = match a.mode {
        TlsModeArg::Off => TlsMode::Off,
        TlsModeArg::On => TlsMode::On,
        TlsModeArg::Require => TlsMode::Require,
    };
    let x509_files = a.tls_cert.is_some() || a.tls_key.is_some() || a.tls_ca.is_some();
    let any = x509_files || a.tls_dir.is_some() || a.tls_psk.is_some();
    if a.tls_psk.is_some() && (x509_files || a.tls_dir.is_some()) {
        bail!(
            "--tls-psk cannot be combined with certificates (--tls-cert, --tls-key, --tls-ca, \
             --tls-dir): a server takes one kind of TLS credentials"
        );
    }
    if a.tls_dir.is_some() && x509_files {
        bail!("--tls-dir cannot be combined with --tls-cert, --tls-key or --tls-ca");
    }
    if x509_files && (a.tls_cert.is_none() || a.tls_key.is_none()) {
        bail!("--tls-cert and --tls-key go together (and --tls-ca needs both)");
    }
    if mode == TlsMode::Off {
        if any {
            bail!("TLS credentials were given but --tls is off: add --tls require (or --tls on)");
        }
        return Ok(TlsConfig::default());
    }
    let creds = if let Some(p) = &a.tls_psk {
        TlsCredentials::psk_file(p)
    } else if let Some(d) = &a.tls_dir {
        TlsCredentials::x509_dir(d)
    } else if let (Some(c), Some(k)) = (&a.tls_cert, &a.tls_key) {
        TlsCredentials::x509_files(c, k, a.tls_ca.as_deref())
    } else {
        bail!(
            "--tls {mode} needs credentials: --tls-cert FILE --tls-key FILE [--tls-ca FILE], \
             --tls-dir DIR, or --tls-psk FILE (scripts/tls-certs.sh makes a test set)"
        );
    }
    .context("cannot load the TLS credentials")?;
    let cfg = TlsConfig::new(mode, Some(creds))?;
    tracing::info!(tls = %cfg.describe(), "TLS");
    Ok(cfg)
}

/// Serving beyond loopback without TLS required: say so loudly.
fn warn_if_exposed(addr: SocketAddr, mode: TlsMode) {
    match mode {
        TlsMode::Require => {}
        TlsMode::Off => tracing::warn!(
            %addr,
            "listening beyond loopback WITHOUT TLS: anyone who reaches this port can read and \
             write every origin and snapshot; use --tls require (README: serving to another \
             host safely)"
        ),
        TlsMode::On => tracing::warn!(
            %addr,
            "listening beyond loopback with --tls on: clients that skip TLS are still served \
             in plain text; use --tls require"
        ),
    }
}

/// Bind the control socket of `s` at the first candidate path that works
/// (`lock` has the rule), saying why each earlier one did not. `None`, with
/// an error logged, if none does.
fn start_control(s: &Served) -> Option<ControlServer> {
    let cands = match lock::socket_candidates(&s.cow) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(cow = %s.canon, error = %format!("{e:#}"),
                "no control socket: cannot work out where it goes; snapshot, delete, rollback \
                 and list cannot reach this server, which keeps serving NBD");
            return None;
        }
    };
    let mut tried: Vec<(PathBuf, String)> = Vec::new();
    for (i, c) in cands.iter().enumerate() {
        let started = c
            .prepare()
            .and_then(|()| ControlServer::start(c.path.clone(), s.canon.clone(), s.store.clone()));
        match started {
            Ok(cs) => {
                tracing::info!(cow = %s.canon, socket = %cs.path().display(), "control socket ready");
                return Some(cs);
            }
            Err(e) => {
                let why = format!("{e:#}");
                match cands.get(i + 1) {
                    Some(next) => tracing::warn!(cow = %s.canon, socket = %c.path.display(),
                        error = %why, next = %next.path.display(),
                        "cannot use this control socket path; falling back to the next"),
                    None => tracing::warn!(cow = %s.canon, socket = %c.path.display(),
                        error = %why, "cannot use this control socket path"),
                }
                tried.push((c.path.clone(), why));
            }
        }
    }
    tracing::error!(cow = %s.canon, tried = %crate::route::tried_list(&tried),
        "no control socket: snapshot, delete, rollback and list cannot reach this server, \
         which keeps serving NBD");
    None
}

fn block_term_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use;
    // pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            bail!(
                "cannot block SIGINT/SIGTERM: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
        Ok(set)
    }
}

fn spawn_signal_thread(set: libc::sigset_t, h: ShutdownHandle) -> Result<()> {
    std::thread::Builder::new()
        .name("snapmv-signals".into())
        .spawn(move || {
            let mut first = true;
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is a valid, initialised sigset owned by this
                // closure; sigwait writes one int through `sig`.
                let rc = unsafe { libc::sigwait(&set, &mut sig) };
                if rc != 0 {
                    continue;
                }
                if first {
                    tracing::info!(signal = sig, "shutting down: finishing in-flight requests");
                    h.shutdown();
                    first = false;
                } else {
                    // The journal keeps the store consistent even now; the
                    // user asked twice.
                    tracing::warn!(signal = sig, "second signal: exiting without a clean close");
                    std::process::exit(130);
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

fn rw() -> OpenOptions {
    OpenOptions::default()
}

/// Lock one COW device for serving, naming the current holder if busy.
fn lock_for_serve(cow: &Path) -> Result<CowLock> {
    if let Some(l) = lock::try_lock(cow, LockMode::Exclusive)? {
        return Ok(l);
    }
    // Name the holder: the server answering on a control socket, else a
    // server seen holding the lock, else whoever it is.
    let answering = || -> Option<u32> {
        let canon = lock::canonical(cow).ok()?;
        crate::route::find_server(cow, &canon).ok().map(|f| f.pid)
    };
    let who = answering()
        .or_else(|| crate::route::serving_holder(cow))
        .map(|pid| format!("a running server (pid {pid})"))
        .unwrap_or_else(|| "another snapmv process".to_string());
    bail!("COW device {} is in use by {who}", cow.display())
}

/// Open every `--cow`, applying `--origin` overrides, and refuse origin id
/// clashes across devices.
fn open_all(cows: &[PathBuf], overrides: &[(String, PathBuf)]) -> Result<Vec<Served>> {
    let mut seen_cow: BTreeMap<PathBuf, &Path> = BTreeMap::new();
    for c in cows {
        let canon = lock::canonical(c)?;
        if let Some(prev) = seen_cow.insert(canon.clone(), c) {
            bail!(
                "COW device {} is given twice ({} and {})",
                canon.display(),
                prev.display(),
                c.display()
            );
        }
    }
    let ov: BTreeMap<String, PathBuf> = overrides.iter().cloned().collect();
    let used = Mutex::new(BTreeSet::new());
    let mut served: Vec<Served> = Vec::new();
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for c in cows {
        let s = open_one(c, &ov, &used)?;
        for o in s.store.status_without_usage().origins {
            if let Some(other) = owner.insert(o.id.clone(), s.canon.clone()) {
                let err = anyhow!(
                    "origin id {} is bound in both {other} and {}; export names must be unique",
                    o.id,
                    s.canon
                );
                served.push(s);
                close_all(served);
                return Err(err);
            }
        }
        served.push(s);
    }
    let used = used.into_inner().unwrap_or_default();
    if let Some(id) = ov.keys().find(|id| !used.contains(*id)) {
        close_all(served);
        bail!("--origin {id}=...: no served COW device has an origin {id} (bind it first with `snapmv bind`)");
    }
    Ok(served)
}

fn close_all(served: Vec<Served>) {
    for s in served {
        if let Err(e) = s.store.close() {
            tracing::error!(cow = %s.cow.display(), error = %e, "close failed");
        }
    }
}

fn open_one(
    cow: &Path,
    ov: &BTreeMap<String, PathBuf>,
    used: &Mutex<BTreeSet<String>>,
) -> Result<Served> {
    let canon = lock::canonical(cow)?.display().to_string();
    let l = lock_for_serve(cow)?;
    let dev: Dev = Arc::new(
        FileDev::open(cow, &rw())
            .with_context(|| format!("cannot open COW device {}", cow.display()))?,
    );
    let mut resolver = |id: &str, recorded: &str| -> snapmv_engine::Result<Dev> {
        let path = match ov.get(id) {
            Some(p) => {
                if let Ok(mut u) = used.lock() {
                    u.insert(id.to_string());
                }
                p.clone()
            }
            None => PathBuf::from(recorded),
        };
        tracing::info!(origin = id, path = %path.display(), "opening origin");
        crate::admin::open_origin(id, &path, false)
    };
    let store = Store::open(dev, &mut resolver)
        .with_context(|| format!("cannot open COW device {}", cow.display()))?;
    Ok(Served {
        cow: cow.to_path_buf(),
        canon,
        store,
        _lock: l,
    })
}

/// No COW given: `./snapmv-data/{cow,origin}.img`, created sparse and set up
/// on first run, so `snapmv serve` alone gives a working export.
fn open_default(overrides: &[(String, PathBuf)]) -> Result<Served> {
    let dir = Path::new(DEFAULT_DIR);
    let cow = dir.join("cow.img");
    let origin = dir.join("origin.img");
    let fresh = !cow.exists();
    let create = |p: &Path, size: u64| -> Result<()> {
        let o = OpenOptions {
            create_size: Some(size),
            ..OpenOptions::default()
        };
        FileDev::open(p, &o).with_context(|| format!("cannot create {}", p.display()))?;
        Ok(())
    };
    create(&cow, DEFAULT_COW_SIZE)?;
    create(&origin, DEFAULT_ORIGIN_SIZE)?;
    if fresh {
        let _l = lock_for_serve(&cow)?;
        tracing::info!(cow = %cow.display(), "first run: formatting the default COW device");
        let dev: Dev = Arc::new(FileDev::open(&cow, &rw())?);
        let store = Store::format(dev, &FormatOptions::default())
            .with_context(|| format!("cannot format {}", cow.display()))?;
        store
            .close()
            .with_context(|| format!("cannot close {}", cow.display()))?;
    }
    let s = open_all(std::slice::from_ref(&cow), overrides)?;
    let s = s
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no store opened for {}", cow.display()))?;
    // Bind on first run, and also if an earlier first run stopped between
    // format and bind.
    if s.store.status_without_usage().origins.is_empty() {
        let abs = std::path::absolute(&origin)
            .with_context(|| format!("cannot resolve {}", origin.display()))?;
        let abs_str = abs
            .to_str()
            .ok_or_else(|| anyhow!("path {} is not valid UTF-8", abs.display()))?;
        tracing::info!(origin = %abs.display(), id = DEFAULT_ORIGIN_ID, "binding the default origin");
        let dev = crate::admin::open_origin(DEFAULT_ORIGIN_ID, &abs, false)?;
        if let Err(e) = s
            .store
            .bind(DEFAULT_ORIGIN_ID, abs_str, dev, crate::operations::now())
        {
            close_all(vec![s]);
            return Err(e).context(format!("cannot bind {}", abs.display()));
        }
    }
    Ok(s)
}
