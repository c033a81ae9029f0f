//! The admin subcommands. Each one first decides where the COW device is:
//! free (take the lock, open it here, close it), or held by a running
//! `serve` (talk to it over its control socket), and produces the same
//! output either way.

use crate::control::{Client, Reply, Request};
use crate::lock::{self, CowLock, LockMode, SocketCandidate};
use crate::status::StatusWire;
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use snapmv_engine::dev::OpenOptions;
use snapmv_engine::meta::{Damage, DamageKind};
use snapmv_engine::store::{Dev, OriginDev, Store};
use snapmv_engine::FileDev;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Chunks the offline rollback copier advances per step.
const STEP_BUDGET: usize = 256;
/// How long an admin command waits for a lock held by a short-lived
/// command (not a server) before giving up.
const LOCK_RETRY: Duration = Duration::from_secs(3);
/// How long a control socket candidate may take to answer the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Wall clock in Unix seconds; the engine reads no clock, so creation
/// times come from here.
pub fn now() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Origin ids become export names (`ID`, `ID@TAG`) and appear in
/// `--origin ID=PATH`, so they may not contain `@`, `=`, `/`, whitespace or
/// control characters.
pub fn validate_id(id: &str) -> Result<()> {
    if id.is_empty() {
        bail!("origin id must not be empty");
    }
    if id.len() > 128 {
        bail!("origin id {id:?} is longer than 128 bytes");
    }
    if let Some(c) = id
        .chars()
        .find(|c| matches!(c, '@' | '=' | '/') || c.is_whitespace() || c.is_control())
    {
        bail!("origin id {id:?} contains {c:?}; ids may not contain '@', '=', '/', spaces or control characters");
    }
    Ok(())
}

/// Where a command runs.
enum Route {
    /// The COW device was free; we hold its lock.
    Offline(CowLock),
    /// A server holds it; this is a client of its control socket.
    Live(Client),
}

/// Decide where to run. `live_ok` is false for commands a running server
/// cannot do for us (format, bind, unbind, check).
fn route(cow: &Path, mode: LockMode, live_ok: bool) -> Result<Route> {
    let canon = lock::canonical(cow)?;
    // Fail early, with the reason, if the candidates cannot be worked out.
    lock::socket_candidates(cow)?;
    let start = Instant::now();
    loop {
        if let Some(l) = lock::try_lock(cow, mode)? {
            return Ok(Route::Offline(l));
        }
        if !live_ok {
            // No need to reach the server just to refuse.
            if let Some(pid) = serving_holder(cow) {
                bail!(
                    "COW device {} is in use by a running server (pid {pid}); stop it first",
                    cow.display()
                );
            }
        }
        match find_server(cow, &canon) {
            Ok(found) => {
                if !live_ok {
                    bail!(
                        "COW device {} is in use by a running server (pid {}); stop it first",
                        cow.display(),
                        found.pid
                    );
                }
                tracing::debug!(pid = found.pid, socket = %found.path.display(), "using the running server");
                return Ok(Route::Live(found.client));
            }
            Err(tried) if start.elapsed() >= LOCK_RETRY => {
                let paths = tried_list(&tried);
                match serving_holder(cow) {
                    Some(pid) if !live_ok => bail!(
                        "COW device {} is in use by a running server (pid {pid}); stop it first",
                        cow.display()
                    ),
                    Some(pid) => bail!(
                        "COW device {} is in use by a running server (pid {pid}) that has no control \
                         socket (its log says why; or it is still starting up), so this cannot be done \
                         while it runs; tried {paths}",
                        cow.display()
                    ),
                    None => bail!(
                        "COW device {} is locked by another process, and no snapmv server answers on {paths}",
                        cow.display()
                    ),
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The pid of the `snapmv serve` holding `cow`, if that is who holds it.
pub fn serving_holder(cow: &Path) -> Option<u32> {
    lock::exclusive_holder(cow).filter(|&pid| lock::is_snapmv_server(pid))
}

/// A server answering for a COW device.
pub struct Found {
    pub client: Client,
    pub pid: u32,
    pub path: PathBuf,
}

/// Try the control socket candidates of `cow` (canonical path `canon`) in
/// order and return the first server that answers the hello, runs as a
/// user we trust, and serves `canon`. Otherwise every path tried, each with
/// why it was passed over.
///
/// Trusted: root, us, the COW device's owner, and the user of the `snapmv
/// serve` holding its lock. That server's runtime directories (from its
/// environment, which may differ from ours, or be another user's when root
/// asks) are tried after ours.
pub fn find_server(cow: &Path, canon: &Path) -> std::result::Result<Found, Vec<(PathBuf, String)>> {
    use std::os::unix::fs::MetadataExt;
    let mut cands = match lock::socket_candidates(cow) {
        Ok(c) => c,
        Err(e) => return Err(vec![(canon.to_path_buf(), format!("{e:#}"))]),
    };
    let mut trusted = vec![0, lock::euid()];
    trusted.extend(std::fs::metadata(canon).map(|m| m.uid()).ok());
    let holder = serving_holder(cow).and_then(|pid| Some((pid, lock::process_uid(pid)?)));
    if let Some((pid, uid)) = holder {
        trusted.push(uid);
        let theirs = lock::candidates_from(canon, false, &lock::process_runtime_dirs(pid, uid));
        for c in theirs {
            if !cands.iter().any(|x| x.path == c.path) {
                cands.push(c);
            }
        }
    }
    let mut tried = Vec::new();
    for c in &cands {
        match probe(c, canon, &trusted) {
            Ok((client, pid)) => {
                return Ok(Found {
                    client,
                    pid,
                    path: c.path.clone(),
                })
            }
            Err(e) => tried.push((c.path.clone(), e.root_cause().to_string())),
        }
    }
    Err(tried)
}

fn probe(c: &SocketCandidate, canon: &Path, trusted: &[u32]) -> Result<(Client, u32)> {
    c.check()?;
    let mut client = Client::connect(&c.path)?;
    // Before telling it anything: a socket in a shared directory may have
    // been planted by someone else.
    match client.peer_uid() {
        Some(uid) if trusted.contains(&uid) => {}
        Some(uid) => bail!(
            "served by uid {uid}, which is neither root, us, the COW device's owner, nor the \
             user of the server holding it; not trusted"
        ),
        None => bail!("cannot tell who serves it; not trusted"),
    }
    // A server answers hello at once; something that accepts but never
    // answers must not hold up the next candidate for long.
    client.set_timeout(Some(HELLO_TIMEOUT))?;
    match client.call(&Request::Hello)? {
        Reply::Hello { pid, cow, .. } if Path::new(&cow) == canon => {
            client.set_timeout(None)?;
            Ok((client, pid))
        }
        Reply::Hello { cow, .. } => bail!("it belongs to a server of {cow}"),
        other => bail!("unexpected reply to hello: {other:?}"),
    }
}

/// `A (why), B (why)` for an error message.
pub fn tried_list(tried: &[(PathBuf, String)]) -> String {
    tried
        .iter()
        .map(|(p, why)| format!("{} ({why})", p.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn file_dev(path: &Path, read_only: bool) -> snapmv_engine::Result<Dev> {
    let opts = OpenOptions {
        read_only,
        ..OpenOptions::default()
    };
    Ok(Arc::new(FileDev::open(path, &opts)?))
}

/// Open origin `id` from `path`, naming both in any error.
pub fn open_origin(id: &str, path: &Path, read_only: bool) -> snapmv_engine::Result<Dev> {
    file_dev(path, read_only).map_err(|e| match e {
        snapmv_engine::Error::Io {
            what,
            offset,
            source,
        } => snapmv_engine::Error::Io {
            what,
            offset,
            source: std::io::Error::new(
                source.kind(),
                format!("origin {id} at {}: {source}", path.display()),
            ),
        },
        e => e,
    })
}

/// Open the store on `cow`, its origins from the paths recorded at bind.
fn open_store(cow: &Path) -> Result<Store> {
    let dev = file_dev(cow, false)
        .with_context(|| format!("cannot open COW device {}", cow.display()))?;
    let mut resolver = |id: &str, path: &str| -> snapmv_engine::Result<Dev> {
        open_origin(id, Path::new(path), false)
    };
    Store::open(dev, &mut resolver)
        .with_context(|| format!("cannot open COW device {}", cow.display()))
}

/// Open the store on `cow` read-only for `list` and `check`, which need
/// only the COW device: an origin whose device cannot be opened (its file
/// moved or deleted) is marked absent with the reason instead of failing
/// the open.
fn open_store_lenient(cow: &Path) -> Result<Store> {
    let dev =
        file_dev(cow, true).with_context(|| format!("cannot open COW device {}", cow.display()))?;
    let mut resolver = |id: &str, path: &str| -> snapmv_engine::Result<OriginDev> {
        Ok(match file_dev(Path::new(path), true) {
            Ok(d) => OriginDev::Present(d),
            Err(e) => {
                tracing::debug!(origin = id, path, error = %e, "origin device not available");
                OriginDev::Absent(os_reason(path, e))
            }
        })
    };
    Store::open_read_only_lenient(dev, &mut resolver)
        .with_context(|| format!("cannot open COW device {}", cow.display()))
}

/// Why opening `path` failed, naming the path once, without the "I/O
/// error on ... at byte 0" framing.
fn os_reason(path: &str, e: snapmv_engine::Error) -> String {
    let msg = match e {
        snapmv_engine::Error::Io { source, .. } => source.to_string(),
        e => e.to_string(),
    };
    if msg.contains(path) {
        msg
    } else {
        format!("{path}: {msg}")
    }
}

/// Tell the user (on stderr, so `--json` output stays one object) which
/// origins an offline `list` or `check` went on without.
fn note_missing(missing: &[MissingOrigin], what: &str) {
    for m in missing {
        eprintln!("snapmv: note: {}; {what}", m.note());
    }
}

/// An origin whose device could not be opened.
struct MissingOrigin {
    id: String,
    path: String,
    reason: String,
}

impl MissingOrigin {
    fn from_status(st: &snapmv_engine::store::Status) -> Vec<MissingOrigin> {
        st.origins
            .iter()
            .filter_map(|o| {
                Some(MissingOrigin {
                    id: o.id.clone(),
                    path: o.path.clone(),
                    reason: o.absent.clone()?,
                })
            })
            .collect()
    }

    fn note(&self) -> String {
        // The reason names the path.
        format!("origin {}'s device is missing ({})", self.id, self.reason)
    }
}

fn close(store: Store, cow: &Path) -> Result<()> {
    store
        .close()
        .with_context(|| format!("cannot close COW device {} cleanly", cow.display()))
}

pub fn do_snapshot(store: &Store, id: &str, of: Option<u64>, memo: &str, now: i64) -> Result<u64> {
    store.snapshot(id, of, memo, now).with_context(|| match of {
        None => format!("cannot snapshot origin {id}"),
        Some(t) => format!("cannot snapshot snapshot {t} of origin {id}"),
    })
}

pub fn do_delete(store: &Store, id: &str, tag: u64) -> Result<()> {
    store
        .delete(id, tag)
        .with_context(|| format!("cannot delete snapshot {tag} of origin {id}"))
}

pub fn do_rollback(store: &Store, id: &str, tag: u64) -> Result<()> {
    store
        .rollback(id, tag)
        .with_context(|| format!("cannot roll snapshot {tag} back onto origin {id}"))
}

pub fn format(cow: &Path, chunk_size: u32, force: bool) -> Result<ExitCode> {
    let _lock = match route(cow, LockMode::Exclusive, false)? {
        Route::Offline(l) => l,
        Route::Live(_) => unreachable_live(cow)?,
    };
    let dev = file_dev(cow, false)
        .with_context(|| format!("cannot open COW device {}", cow.display()))?;
    let opts = snapmv_engine::store::FormatOptions { chunk_size, force };
    let store =
        Store::format(dev, &opts).with_context(|| format!("cannot format {}", cow.display()))?;
    close(store, cow)?;
    Ok(ExitCode::SUCCESS)
}

fn unreachable_live<T>(cow: &Path) -> Result<T> {
    // route() never returns Live when live_ok is false; keep a real error
    // rather than a panic in case that ever changes.
    Err(anyhow!(
        "COW device {} is in use by a running server",
        cow.display()
    ))
}

pub fn bind(cow: &Path, origin: &Path, id: Option<String>) -> Result<ExitCode> {
    let id = match id {
        Some(id) => id,
        None => origin
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .ok_or_else(|| {
                anyhow!(
                    "cannot derive an origin id from {}; give one with --id",
                    origin.display()
                )
            })?,
    };
    validate_id(&id)?;
    // Record an absolute path (without resolving symlinks, so stable names
    // like /dev/disk/by-id/... stay stable) so later opens work from any
    // working directory.
    let abs = std::path::absolute(origin)
        .with_context(|| format!("cannot resolve origin path {}", origin.display()))?;
    let abs_str = abs
        .to_str()
        .ok_or_else(|| anyhow!("origin path {} is not valid UTF-8", abs.display()))?
        .to_string();
    if !abs.exists() {
        bail!("origin device {} does not exist", origin.display());
    }
    if lock::canonical(cow)? == lock::canonical(&abs)? {
        bail!(
            "{} cannot be both the COW device and an origin",
            cow.display()
        );
    }
    let _lock = match route(cow, LockMode::Exclusive, false)? {
        Route::Offline(l) => l,
        Route::Live(_) => unreachable_live(cow)?,
    };
    let store = open_store(cow)?;
    let dev = open_origin(&id, &abs, false)?;
    let r = store.bind(&id, &abs_str, dev, now()).with_context(|| {
        format!(
            "cannot bind {} as origin {id} to {}",
            abs.display(),
            cow.display()
        )
    });
    close(store, cow)?;
    r?;
    Ok(ExitCode::SUCCESS)
}

pub fn unbind(cow: &Path, id: &str) -> Result<ExitCode> {
    let _lock = match route(cow, LockMode::Exclusive, false)? {
        Route::Offline(l) => l,
        Route::Live(_) => unreachable_live(cow)?,
    };
    let store = open_store(cow)?;
    // Offline nobody drives the cleaner, and the engine refuses to unbind an
    // origin whose deleted snapshots are still being cleaned: finish that
    // work here first.
    let pending = if store.status_without_usage().cleaning {
        drain_background(&store)
    } else {
        Ok(())
    };
    let r = pending
        .with_context(|| format!("cannot finish background work on {}", cow.display()))
        .and_then(|()| {
            store
                .unbind(id)
                .with_context(|| format!("cannot unbind origin {id} from {}", cow.display()))
        });
    close(store, cow)?;
    r?;
    Ok(ExitCode::SUCCESS)
}

/// Run the cleaner and rollback copier until they have nothing left to do.
fn drain_background(store: &Store) -> Result<()> {
    while store.step_background(STEP_BUDGET)?.more {}
    Ok(())
}

pub fn snapshot(cow: &Path, id: &str, of: Option<u64>, memo: &str) -> Result<ExitCode> {
    let tag = match route(cow, LockMode::Exclusive, true)? {
        Route::Offline(_lock) => {
            let store = open_store(cow)?;
            let r = do_snapshot(&store, id, of, memo, now());
            close(store, cow)?;
            r?
        }
        Route::Live(mut c) => match c.call(&Request::Snapshot {
            origin: id.to_string(),
            of,
            memo: memo.to_string(),
        })? {
            Reply::Tag { tag } => tag,
            other => bail!("unexpected reply to snapshot: {other:?}"),
        },
    };
    // The tag alone, so scripts can capture it.
    println!("{tag}");
    Ok(ExitCode::SUCCESS)
}

pub fn delete(cow: &Path, id: &str, tag: u64) -> Result<ExitCode> {
    match route(cow, LockMode::Exclusive, true)? {
        Route::Offline(_lock) => {
            let store = open_store(cow)?;
            let r = do_delete(&store, id, tag);
            close(store, cow)?;
            r?;
        }
        Route::Live(mut c) => match c.call(&Request::Delete {
            origin: id.to_string(),
            tag,
        })? {
            Reply::Ok => {}
            other => bail!("unexpected reply to delete: {other:?}"),
        },
    }
    Ok(ExitCode::SUCCESS)
}

fn progress_bar(id: &str, tag: u64) -> ProgressBar {
    let pb = ProgressBar::new(0);
    let style = ProgressStyle::with_template(
        "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} chunks ({eta})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_message(format!("rollback {id}@{tag}"));
    pb
}

pub fn rollback(cow: &Path, id: &str, tag: u64, wait: bool) -> Result<ExitCode> {
    match route(cow, LockMode::Exclusive, true)? {
        Route::Offline(_lock) => {
            let store = open_store(cow)?;
            let r = do_rollback(&store, id, tag).and_then(|()| {
                if wait {
                    drive_rollback(&store, id, tag)
                } else {
                    eprintln!(
                        "rollback of snapshot {tag} onto origin {id} started; the copy to the origin \
                         device finishes while `snapmv serve` runs (or use --wait); until then only \
                         snapmv shows the rolled-back content"
                    );
                    Ok(())
                }
            });
            close(store, cow)?;
            r?;
        }
        Route::Live(mut c) => {
            match c.call(&Request::Rollback {
                origin: id.to_string(),
                tag,
            })? {
                Reply::Ok => {}
                other => bail!("unexpected reply to rollback: {other:?}"),
            }
            if wait {
                // The server's background driver does the copying; follow
                // its progress through the status.
                let pb = progress_bar(id, tag);
                loop {
                    let st = match c.call(&Request::List)? {
                        Reply::Status(s) => s,
                        other => bail!("unexpected reply to list: {other:?}"),
                    };
                    match st.rollback {
                        Some(r) if r.origin == id && r.tag == tag => {
                            pb.set_length(r.total_chunks);
                            pb.set_position(r.done_chunks);
                        }
                        _ => break,
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                pb.finish();
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Run the copier here until the rollback is done, with a progress bar.
fn drive_rollback(store: &Store, id: &str, tag: u64) -> Result<()> {
    let pb = progress_bar(id, tag);
    let mut last = Instant::now() - Duration::from_secs(1);
    loop {
        // status() walks every snapshot, so refresh the bar at most 10x/s.
        if last.elapsed() >= Duration::from_millis(100) {
            last = Instant::now();
            match store.status_without_usage().rollback {
                Some(r) if r.origin == id && r.tag == tag => {
                    pb.set_length(r.total_chunks);
                    pb.set_position(r.done_chunks);
                }
                _ => break,
            }
        }
        let rep = store
            .step_background(STEP_BUDGET)
            .with_context(|| format!("rollback of snapshot {tag} onto origin {id} failed"))?;
        if !rep.more {
            if let Some(r) = store.status_without_usage().rollback {
                bail!(
                    "rollback of snapshot {} onto origin {} stopped at {}/{} chunks",
                    r.tag,
                    r.origin,
                    r.done_chunks,
                    r.total_chunks
                );
            }
            break;
        }
    }
    pb.finish();
    Ok(())
}

pub fn list(cow: &Path, json: bool) -> Result<ExitCode> {
    let canon = lock::canonical(cow)?;
    let st = match route(cow, LockMode::Shared, true)? {
        Route::Offline(_lock) => {
            let store = open_store_lenient(cow)?;
            let status = store.status();
            close(store, cow)?;
            note_missing(
                &MissingOrigin::from_status(&status),
                "listed from the COW device alone",
            );
            StatusWire::from_status(canon.display().to_string(), status)
        }
        Route::Live(mut c) => match c.call(&Request::List)? {
            Reply::Status(s) => s,
            other => bail!("unexpected reply to list: {other:?}"),
        },
    };
    if json {
        println!("{}", st.to_json());
    } else {
        print!("{}", st.to_table());
    }
    Ok(ExitCode::SUCCESS)
}

/// `check` exit codes.
const CHECK_DAMAGE: u8 = 1;
const CHECK_UNREADABLE: u8 = 2;

pub fn check(cow: &Path, json: bool) -> Result<ExitCode> {
    let canon: PathBuf = lock::canonical(cow)?;
    let _lock = match route(cow, LockMode::Shared, false)? {
        Route::Offline(l) => l,
        Route::Live(_) => unreachable_live(cow)?,
    };
    let dev = match FileDev::open(
        cow,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    ) {
        Ok(d) => d,
        Err(e) => return Ok(report_unreadable(&canon, &e.to_string(), json)),
    };
    use snapmv_engine::Error as E;
    // store::check runs the metadata walk and then the store's own
    // invariants (records decode, trees rebuild, own-chunk counters).
    match snapmv_engine::store::check(Arc::new(dev)) {
        Ok(rep) => {
            let origins = origin_notes(cow, rep.errors.is_empty());
            Ok(report_check(&canon, &rep, &origins, json))
        }
        // A checksum or structure failure the checker could not get past is
        // still damage found, not an unreadable device.
        Err(e @ (E::Corrupt { .. } | E::CorruptTree { .. })) => {
            let msg = e.to_string();
            if json {
                let block = match e {
                    E::Corrupt { block, .. } | E::CorruptTree { block, .. } => block,
                    _ => 0,
                };
                println!(
                    "{}",
                    serde_json::json!({
                        "cow": canon.display().to_string(),
                        "clean": false,
                        "errors": [msg],
                        "damage": [{
                            "tree": null,
                            "path": [block],
                            "keys": null,
                            "kind": DamageKind::Corrupt.name(),
                            "detail": msg,
                        }],
                    })
                );
            } else {
                println!("{}: 1 problem(s) found\n  {msg}", canon.display());
            }
            Ok(ExitCode::from(CHECK_DAMAGE))
        }
        Err(e) => Ok(report_unreadable(&canon, &e.to_string(), json)),
    }
}

/// What `check` says about the origin devices besides the metadata: notes,
/// never damage, so they leave the exit code alone (the check reads only
/// the COW device).
struct OriginNotes {
    missing: Vec<MissingOrigin>,
    notes: Vec<String>,
}

/// Open the store read-only to see which origin devices are missing.
/// Failing to open is worth a note only when the metadata checked clean;
/// otherwise the damage already reported is why.
fn origin_notes(cow: &Path, clean: bool) -> OriginNotes {
    let mut notes = Vec::new();
    let missing = match open_store_lenient(cow) {
        Ok(store) => {
            let m = MissingOrigin::from_status(&store.status_without_usage());
            if let Err(e) = store.close() {
                notes.push(format!("closing the read-only store failed: {e}"));
            }
            m
        }
        Err(e) => {
            if clean {
                notes.push(format!("cannot look at the origin devices: {e:#}"));
            }
            Vec::new()
        }
    };
    let mut all: Vec<String> = missing
        .iter()
        .map(|m| format!("{}; the check needs only the COW device", m.note()))
        .collect();
    all.append(&mut notes);
    OriginNotes {
        missing,
        notes: all,
    }
}

/// Print a check report (JSON or text); the exit code says clean or damaged.
fn report_check(
    canon: &Path,
    rep: &snapmv_engine::meta::CheckReport,
    origins: &OriginNotes,
    json: bool,
) -> ExitCode {
    let clean = rep.errors.is_empty();
    if json {
        let missing: Vec<_> = origins
            .missing
            .iter()
            .map(|m| serde_json::json!({"id": m.id, "path": m.path, "error": m.reason}))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "cow": canon.display().to_string(),
                "clean": clean,
                "errors": rep.errors,
                "damage": rep.damage.iter().map(damage_json).collect::<Vec<_>>(),
                "omitted": rep.omitted,
                "pages_checked": rep.pages_checked,
                "exceptions": rep.exceptions,
                "data_chunks_referenced": rep.data_chunks_referenced,
                "missing_origins": missing,
                "notes": origins.notes,
            })
        );
    } else {
        println!(
            "{}: {} ({} metadata pages checked, {} exceptions, {} data chunks referenced)",
            canon.display(),
            if clean {
                "clean".to_string()
            } else {
                format!("{} problem(s) found", rep.errors.len())
            },
            rep.pages_checked,
            rep.exceptions,
            rep.data_chunks_referenced
        );
        for e in &rep.errors {
            println!("  {e}");
        }
        for n in &origins.notes {
            println!("  note: {n}");
        }
    }
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(CHECK_DAMAGE)
    }
}

/// One damage as `check --json` gives it: `tree` (or the fixed structure),
/// `path` (blocks from the root to the damaged page), `keys` (`from`, and
/// `to` or null for the end of the key space, as hex strings: keys are
/// 128-bit), `kind`, `detail`; a counter's kind adds `recorded` and
/// `found`.
fn damage_json(d: &Damage) -> serde_json::Value {
    let keys = d.keys.map(|k| {
        serde_json::json!({
            "from": format!("{:#x}", k.from),
            "to": k.to.map(|to| format!("{to:#x}")),
        })
    });
    let mut v = serde_json::json!({
        "tree": d.place.name(),
        "path": d.path,
        "keys": keys,
        "kind": d.kind.name(),
        "detail": d.detail,
    });
    match d.kind {
        DamageKind::CounterMismatch {
            what,
            recorded,
            found,
        } => {
            v["counter"] = what.into();
            v["recorded"] = recorded.into();
            v["found"] = found.into();
        }
        DamageKind::OwnChunksMismatch { recorded, found } => {
            v["recorded"] = recorded.into();
            v["found"] = found.into();
        }
        _ => {}
    }
    v
}

fn report_unreadable(cow: &Path, msg: &str, json: bool) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::json!({"cow": cow.display().to_string(), "clean": false, "fatal": msg})
        );
    }
    eprintln!("snapmv: cannot check {}: {msg}", cow.display());
    ExitCode::from(CHECK_UNREADABLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("orig").is_ok());
        assert!(validate_id("sdb1.img-2").is_ok());
        for bad in ["", "a@1", "a=b", "a/b", "a b", "a\nb"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_id(&"x".repeat(129)).is_err());
    }
}
