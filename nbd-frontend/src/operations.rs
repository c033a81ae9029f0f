//! The admin operations themselves, shared by the offline commands (which
//! open the store in their own process) and the control server (which runs
//! them on the served store), so both take the same steps and fail with
//! the same messages.

use crate::control::{DiffPage, ExtentWire};
use anyhow::{Context, Result};
use snapmv_engine::store::Store;

/// Extents in one page of a live `diff` reply (a few MiB of JSON).
pub const DIFF_PAGE: usize = 65_536;

/// Wall clock in Unix seconds; the engine reads no clock, so creation
/// times come from here.
pub fn now() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Snapshot origin `id` (or its snapshot `of`), created now; the new tag.
pub fn snapshot(store: &Store, id: &str, of: Option<u64>, memo: &str) -> Result<u64> {
    store
        .snapshot(id, of, memo, now())
        .with_context(|| match of {
            None => format!("cannot snapshot origin {id}"),
            Some(t) => format!("cannot snapshot snapshot {t} of origin {id}"),
        })
}

pub fn delete(store: &Store, id: &str, tag: u64) -> Result<()> {
    store
        .delete(id, tag)
        .with_context(|| format!("cannot delete snapshot {tag} of origin {id}"))
}

/// Start rolling snapshot `tag` back onto origin `id`; the copy finishes
/// in background steps (the server's driver, or `rollback --wait` offline).
pub fn rollback(store: &Store, id: &str, tag: u64) -> Result<()> {
    store
        .rollback(id, tag)
        .with_context(|| format!("cannot roll snapshot {tag} back onto origin {id}"))
}

/// A version as messages name it.
pub fn version_name(tag: Option<u64>) -> String {
    match tag {
        None => "the origin".into(),
        Some(t) => format!("snapshot {t}"),
    }
}

/// The byte ranges where versions `from` and `to` of origin `id` may
/// differ, from byte `offset` to the end of the origin, at most
/// `max_extents` of them (the page's `end` says how far they go).
pub fn diff_page(
    store: &Store,
    id: &str,
    (from, to): (Option<u64>, Option<u64>),
    offset: u64,
    max_extents: usize,
) -> Result<DiffPage> {
    let context = || {
        format!(
            "cannot diff {} and {} of origin {id}",
            version_name(from),
            version_name(to)
        )
    };
    let vol = store.volume(id, to).with_context(context)?;
    let size = vol.size();
    let len = size.checked_sub(offset).with_context(|| {
        format!(
            "{}: offset {offset} is past the end ({size} bytes)",
            context()
        )
    })?;
    let diff = vol
        .diff_from(from, offset, len, max_extents)
        .with_context(context)?;
    let extents = diff.extents.iter().map(|e| ExtentWire {
        offset: e.offset,
        length: e.len,
    });
    Ok(DiffPage {
        chunk_size: store.chunk_size(),
        size,
        extents: extents.collect(),
        end: diff.end,
    })
}
