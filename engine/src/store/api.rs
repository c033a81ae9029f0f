//! PUBLIC API CONTRACT of the engine. Frontend and sim code against this.
#![allow(unused)]
use crate::dev::BlockDev;
use crate::error::{Error, Result};
pub use crate::meta::FormatOptions;
pub use crate::meta::{CacheStats, DEFAULT_CACHE_BUDGET};
use std::sync::Arc;

/// Devices are shared trait objects so one `Store` can mix file, memory and
/// simulated devices.
pub type Dev = Arc<dyn BlockDev>;

/// Identifies one version: an origin (`tag == None`) or one of its snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VersionId {
    pub origin: String,
    pub tag: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotStatus {
    pub tag: u64,
    /// None for a snapshot of the origin; the source tag for a snapshot of a snapshot.
    pub parent: Option<u64>,
    /// Seconds since the Unix epoch, as passed by the caller.
    pub created: i64,
    pub memo: String,
    /// Chunks this snapshot alone reads from the COW device: what deleting
    /// it would free.
    pub own_chunks: u64,
    /// Chunks it reads from the COW device together with other versions.
    pub shared_chunks: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginStatus {
    pub id: String,
    pub path: String,
    pub size: u64,
    pub created: i64,
    pub snapshots: Vec<SnapshotStatus>,
    /// Why the origin's device is not open, when a lenient read-only open
    /// went on without it (`OriginDev::Absent`); `None` when it is open.
    pub absent: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollbackStatus {
    pub origin: String,
    pub tag: u64,
    pub done_chunks: u64,
    pub total_chunks: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub chunk_size: u32,
    pub chunks_total: u64,
    pub chunks_used: u64,
    /// "valid", or "failed: <reason>" after a fatal I/O error.
    pub status: String,
    pub cleaning: bool,
    pub rollback: Option<RollbackStatus>,
    pub origins: Vec<OriginStatus>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Data held on the COW device: copied there when the origin moved on,
    /// or written in this version (for the origin: everything, in place).
    Own,
    /// Still the origin's data, read in place and shared with it.
    Shared,
    /// Reads as zeros with no data behind it.
    Zero,
}

/// One run of `Volume::allocation_depth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepthExtent {
    pub offset: u64,
    pub len: u64,
    pub depth: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

/// A byte range where two versions may differ (`Store::diff`): whole
/// chunks, clipped to the range asked about and the device's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiffExtent {
    pub offset: u64,
    pub len: u64,
}

/// How a diff finds the chunks that may differ (`Store::set_diff_strategy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiffStrategy {
    /// The cheaper of the two by estimate (the default).
    #[default]
    Auto,
    /// Walk the exception index by chunk: visits every chunk holding
    /// exceptions in the range, whichever versions they belong to.
    ByChunk,
    /// Gather from the index by node: visits only the exceptions of the
    /// version nodes that can make the two differ. A format-1 device has
    /// no such index and walks by chunk.
    ByNode,
}

impl DiffStrategy {
    pub(crate) fn code(self) -> u8 {
        match self {
            DiffStrategy::Auto => 0,
            DiffStrategy::ByChunk => 1,
            DiffStrategy::ByNode => 2,
        }
    }

    pub(crate) fn from_code(code: u8) -> DiffStrategy {
        match code {
            1 => DiffStrategy::ByChunk,
            2 => DiffStrategy::ByNode,
            _ => DiffStrategy::Auto,
        }
    }
}

/// What `Volume::diff_from` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diff {
    /// Ascending, disjoint, not adjacent.
    pub extents: Vec<DiffExtent>,
    /// How far `extents` describe the range: every differing byte before
    /// `end` is in them, and they hold nothing at or past it. The range's
    /// end, unless the extent limit cut the description short there.
    pub end: u64,
}

/// What one call of `Store::step_background` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StepReport {
    /// Units of work done (chunks cleaned or copied).
    pub work: usize,
    /// Whether background work remains.
    pub more: bool,
}

/// Origin devices are supplied by the caller at open, looked up by the id
/// and the path recorded at bind time.
pub type OriginResolver<'a> = &'a mut dyn FnMut(&str, &str) -> Result<Dev>;

/// What a lenient resolver (`Store::open_read_only_lenient`) found for one
/// origin: its device, or why there is none.
pub enum OriginDev {
    Present(Dev),
    /// Not available (e.g. its file is missing). The origin and its
    /// snapshots are still listed; every I/O on them fails with
    /// `Error::OriginAbsent` carrying this reason.
    Absent(String),
}

/// Like `OriginResolver`, but may report an origin as absent.
pub type LenientResolver<'a> = &'a mut dyn FnMut(&str, &str) -> Result<OriginDev>;

/// Check an origin id before binding it: 1 to `ID_MAX` (128) printable
/// ASCII characters, none of them `@`, `/` or `=`. Ids name NBD exports
/// (`ID`, `ID@TAG`) and paths, and the frontend's `--origin ID=PATH`
/// splits at the first `=`. The one rule for the engine and every caller.
pub fn validate_id(id: &str) -> Result<()> {
    use crate::store::records::ID_MAX;
    let ok = !id.is_empty()
        && id.len() <= ID_MAX
        && id
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '@' | '/' | '='));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "origin id {id:?}: use 1..{ID_MAX} printable ASCII characters without '@', '/' or '='"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::validate_id;

    #[test]
    fn ids() {
        assert!(validate_id("orig").is_ok());
        assert!(validate_id("sdb1.img-2").is_ok());
        assert!(validate_id(&"x".repeat(128)).is_ok());
        for bad in ["", "a@1", "a=b", "a/b", "a b", "a\nb", "é"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_id(&"x".repeat(129)).is_err());
    }
}
