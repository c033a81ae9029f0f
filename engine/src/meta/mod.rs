//! Journalled metadata: paged B+trees, the space map, transactions, commit,
//! recovery and the checker.
//!
//! CONTRACT (the store is written against exactly this API):
//! - `Meta` is used under one `Mutex` by the store. Every method that does
//!   I/O under that lock must be bounded (cache misses only); the long I/O
//!   of a commit happens in `CommitBatch::write` / `CheckpointBatch::write`,
//!   which the store calls with the lock released.
//! - Mutations (insert/remove/alloc/free/set_app_state) join the open
//!   transaction. `begin_commit` closes it and captures its page images;
//!   mutations made after that join the next transaction.
//! - A data chunk is reserved (`reserve_chunk`, in memory only) while its
//!   data is written, and allocated (`claim_chunk`) in the same critical
//!   section as the insert that maps it, so an allocation never becomes
//!   durable without its mapping. Frees likewise go with their unmapping.
//! - A chunk freed in transaction N is not handed out by `alloc_chunk` until
//!   N's commit has been written (`end_commit`): otherwise a crash could
//!   leave a durable mapping pointing at another version's data.
//! - `CommitBatch::write` first flushes the device (data chunks written for
//!   new mappings become durable before the mappings do), then writes the
//!   journal records and flushes again.
//! - One commit at a time: `begin_commit` returns `Error::Busy` while a
//!   `CommitBatch` is outstanding. If `write` fails, call `abort_commit`
//!   (its pages rejoin the open transaction) or treat the store as failed;
//!   never begin another commit behind a batch that was neither ended nor
//!   aborted. Likewise `abort_checkpoint` after a failed checkpoint write.
//! - Commit before `dirty_pages()` exceeds `max_dirty_pages()` (the journal
//!   ring bounds one transaction: ~250 pages on the smallest devices, 1000+
//!   from 256 MiB up); a larger one is refused by `begin_commit`.
//! - After each commit, `begin_checkpoint` returns a batch once the journal
//!   is half full. For a clean close use `checkpoint()` (or
//!   `begin_checkpoint_all`), which leaves the journal empty.
//!
//! On-disk layout, block formats and checksums: see `crate::format`.

mod btree;
mod check;
mod imp;
mod journal;
mod repair;
mod spacemap;

pub use imp::{check, CheckReport, CheckpointBatch, CommitBatch, Meta, Reserved};
pub use repair::{repair, RepairReport};

/// The trees the store keeps. Keys are u128; values have a fixed size per tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tree {
    /// (origin, chunk, node) -> data chunk number (u64 LE). The value
    /// [`ZERO_CHUNK`] means "reads as zeros, no data chunk".
    Exceptions,
    /// node id -> the store's node record.
    Nodes,
    /// origin number -> the store's origin record.
    Origins,
}

impl Tree {
    pub const ALL: [Tree; 3] = [Tree::Exceptions, Tree::Nodes, Tree::Origins];

    pub fn value_size(self) -> usize {
        match self {
            Tree::Exceptions => 8,
            Tree::Nodes => NODE_REC_SIZE,
            Tree::Origins => ORIGIN_REC_SIZE,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tree::Exceptions => "exceptions",
            Tree::Nodes => "nodes",
            Tree::Origins => "origins",
        }
    }
}

pub const NODE_REC_SIZE: usize = 256;
pub const ORIGIN_REC_SIZE: usize = 512;
/// Exception value meaning "all zeros; no data chunk behind it".
pub const ZERO_CHUNK: u64 = u64::MAX;
/// Bytes of opaque store state kept in the state page and journalled.
pub const APP_STATE_MAX: usize = 2048;
/// Metadata page size.
pub const PAGE_SIZE: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per chunk: a power of two in [4 KiB, 1 MiB].
    pub chunk_size: u32,
    /// Chunks in the whole device (chunk n lives at byte n * chunk_size).
    pub device_chunks: u64,
    /// Chunks available for data and metadata after the fixed areas.
    pub chunks_total: u64,
}

impl Geometry {
    /// Byte offset of a chunk. Saturates: a value from a damaged index
    /// then fails the device's range check instead of wrapping around.
    pub fn chunk_offset(&self, chunk: u64) -> u64 {
        chunk.saturating_mul(self.chunk_size as u64)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Usage {
    /// Chunks holding exception data.
    pub data_chunks: u64,
    /// 4 KiB blocks holding B+tree pages.
    pub meta_blocks: u64,
    /// Chunks that are neither (whole chunks free for data).
    pub free_chunks: u64,
}

#[derive(Clone, Debug)]
pub struct FormatOptions {
    pub chunk_size: u32,
    pub force: bool,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            chunk_size: 64 * 1024,
            force: false,
        }
    }
}
