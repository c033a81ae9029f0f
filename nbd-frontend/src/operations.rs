//! The admin operations themselves, shared by the offline commands (which
//! open the store in their own process) and the control server (which runs
//! them on the served store), so both take the same steps and fail with
//! the same messages.

use anyhow::{Context, Result};
use snapmv_engine::store::Store;

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
