//! TEMPORARY signatures; replaced by the real implementation.
#![allow(unused)]
use super::api::*;
use crate::error::Result;

/// A COW device with its origins. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Store {}

/// One version's data path. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Volume {}

impl Store {
    /// Format `cow` as an empty store.
    pub fn format(cow: Dev, opts: &FormatOptions) -> Result<Store> { todo!() }
    /// Open an existing store; `origins` supplies each bound origin's device.
    /// Replays the journal and resumes cleaning and rollback.
    pub fn open(cow: Dev, origins: OriginResolver<'_>) -> Result<Store> { todo!() }
    /// Open read-only (for `list` and `check` while offline): nothing is written.
    pub fn open_read_only(cow: Dev, origins: OriginResolver<'_>) -> Result<Store> { todo!() }
    /// Bind an origin device under `id`; `path` is recorded for later opens.
    pub fn bind(&self, id: &str, path: &str, dev: Dev, now: i64) -> Result<()> { todo!() }
    /// Unbind; refused while the origin has snapshots.
    pub fn unbind(&self, id: &str) -> Result<()> { todo!() }
    /// Snapshot the origin (`of == None`) or snapshot `of`. Returns the new tag.
    /// Durable when it returns; every write that completed before the call is
    /// in the snapshot and durable, none that starts after it returns is.
    pub fn snapshot(&self, id: &str, of: Option<u64>, memo: &str, now: i64) -> Result<u64> { todo!() }
    /// Delete a snapshot: instant; the cleaner frees its chunks later.
    pub fn delete(&self, id: &str, tag: u64) -> Result<()> { todo!() }
    /// Roll snapshot `tag` back onto its origin. The origin shows the
    /// snapshot's content at once; `step_background` finishes the copy.
    pub fn rollback(&self, id: &str, tag: u64) -> Result<()> { todo!() }
    pub fn status(&self) -> Status { todo!() }
    /// Every live version, origin first, then snapshots by tag.
    pub fn versions(&self) -> Vec<VersionId> { todo!() }
    pub fn volume(&self, id: &str, tag: Option<u64>) -> Result<Volume> { todo!() }
    /// Advance the cleaner and the rollback copier by at most `budget` chunks.
    pub fn step_background(&self, budget: usize) -> Result<StepReport> { todo!() }
    /// Make every completed write and metadata change durable.
    pub fn flush(&self) -> Result<()> { todo!() }
    /// Flush, then checkpoint the journal; the origin files then hold exactly the origins' content.
    pub fn close(self) -> Result<()> { todo!() }
}

impl Volume {
    pub fn id(&self) -> VersionId { todo!() }
    pub fn size(&self) -> u64 { todo!() }
    /// Human description: the memo of a snapshot.
    pub fn memo(&self) -> String { todo!() }
    /// Whether this version still exists (false after delete or unbind).
    pub fn is_live(&self) -> bool { todo!() }
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> { todo!() }
    /// Write; with `fua` the write is durable when this returns.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> { todo!() }
    pub fn flush(&self) -> Result<()> { todo!() }
    /// Advisory discard. Content afterwards is unspecified but never another version's data.
    pub fn trim(&self, offset: u64, len: u64) -> Result<()> { todo!() }
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> { todo!() }
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> { todo!() }
}
