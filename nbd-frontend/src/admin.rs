//! The admin subcommands. Each one first decides where the COW device is
//! (`route`): free (take the lock, open it here, close it), or held by a
//! running `serve` (talk to it over its control socket), and produces the
//! same output either way. The operations proper are in `operations`,
//! which the control server runs too.

use crate::control::{Client, Reply, Request};
use crate::diff::DiffReport;
use crate::lock::{self, LockMode};
use crate::operations::{self, now};
use crate::route::{route, Route};
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
use std::time::Duration;

/// Chunks the offline rollback copier advances per step.
const STEP_BUDGET: usize = 256;
/// The longest a `rollback --wait` asks the server to hold a progress
/// request: the bar's clock and estimate are redrawn at least this often.
const PROGRESS_WAIT: Duration = Duration::from_millis(500);

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
    snapmv_engine::store::validate_id(&id)?;
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
    let pending = if store.cleaning() {
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
            let r = operations::snapshot(&store, id, of, memo);
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
            let r = operations::delete(&store, id, tag);
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
            let r = operations::rollback(&store, id, tag).and_then(|()| {
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
                follow_rollback(&mut c, id, tag)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Follow a rollback that the server's driver copies, with a progress
/// bar. Each request blocks in the server until the copy moves on (or
/// `PROGRESS_WAIT` passes, to redraw the bar), so nothing here polls.
fn follow_rollback(c: &mut Client, id: &str, tag: u64) -> Result<()> {
    let pb = progress_bar(id, tag);
    let mut seen = None;
    loop {
        let now = c.rollback_progress(seen, PROGRESS_WAIT).with_context(|| {
            format!("cannot follow the rollback of snapshot {tag} onto origin {id}; the server goes on copying")
        })?;
        match now {
            Some(r) if r.origin == id && r.tag == tag => {
                pb.set_length(r.total_chunks);
                pb.set_position(r.done_chunks);
                seen = Some(r);
            }
            _ => break,
        }
    }
    pb.finish();
    Ok(())
}

/// Run the copier here until the rollback is done, with a progress bar.
fn drive_rollback(store: &Store, id: &str, tag: u64) -> Result<()> {
    let pb = progress_bar(id, tag);
    loop {
        // Cheap whatever the snapshot count: refreshed every step.
        match store.rollback_status() {
            Some(r) if r.origin == id && r.tag == tag => {
                pb.set_length(r.total_chunks);
                pb.set_position(r.done_chunks);
            }
            _ => break,
        }
        let rep = store
            .step_background(STEP_BUDGET)
            .with_context(|| format!("rollback of snapshot {tag} onto origin {id} failed"))?;
        if !rep.more {
            if let Some(r) = store.rollback_status() {
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

/// `snapmv diff`: offline from the COW device alone (read-only; the
/// origin's device need not be there), or live page by page through the
/// server's control socket.
pub fn diff(
    cow: &Path,
    id: &str,
    versions: (Option<u64>, Option<u64>),
    json: bool,
) -> Result<ExitCode> {
    let report = match route(cow, LockMode::Shared, true)? {
        Route::Offline(_lock) => {
            let store = open_store_lenient(cow)?;
            let r = DiffReport::gather(id, versions, |offset| {
                operations::diff_page(&store, id, versions, offset, usize::MAX)
            });
            close(store, cow)?;
            r?
        }
        Route::Live(mut c) => DiffReport::gather(id, versions, |offset| {
            let (from, to) = versions;
            let req = Request::Diff {
                origin: id.to_string(),
                from,
                to,
                offset,
            };
            match c.call(&req)? {
                Reply::Diff(page) => Ok(page),
                other => bail!("unexpected reply to diff: {other:?}"),
            }
        })?,
    };
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
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
