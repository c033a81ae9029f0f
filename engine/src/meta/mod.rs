//! Journalled metadata: paged B+trees, the space map, transactions, commit,
//! recovery and the checker.
//!
//! CONTRACT (the store is written against exactly this API):
//! - `Meta` is used under one `RwLock` by the store. Lookups under the
//!   read lock (`get_cached`, `seek_cached`) never read the device: a page
//!   not held fails them with `Error::NotCached`, and the store fetches it
//!   with no lock held (`fetcher`, `insert_fetched`) and looks up again.
//!   Every `&mut self` method that does I/O under the write lock must be
//!   bounded (cache misses only); the long I/O of a commit happens in
//!   `CommitBatch::write` / `CheckpointBatch::write`, which the store calls
//!   with the lock released.
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
//!
//! The owners, each with its fields private (ARCHITECTURE.md has the
//! dependency order; no file here imports one that imports it back):
//! - `types`: the shared vocabulary (`Tree`, sizes, `Geometry`, `Usage`);
//! - `page_cache`: `PageCache`, the loaded pages within a byte budget
//!   (CLOCK over the clean ones), and the dirty set;
//! - `space_map`: `SpaceMap`, bitmap, allocators, quarantine, reservations;
//! - `btree`: the tree `Roots` and the B+tree algorithms (`BTree`);
//! - `recovery`: superblock choice and journal replay at open;
//! - `journal`: `Journal`, the ring, commit and checkpoint;
//! - `empty_store`: what `Meta::format` writes;
//! - `meta`: the `Meta` façade over them;
//! - `check`, `repair`: the offline checker and space repair;
//!   `damage`, the structured damage it reports; `bulk_read`, its reads
//!   in long runs of blocks.

mod btree;
mod bulk_read;
mod check;
mod damage;
mod empty_store;
mod journal;
// The file is named for the type it holds, the `Meta` façade.
#[allow(clippy::module_inception)]
mod meta;
mod page_cache;
mod recovery;
mod repair;
mod space_map;
mod types;

pub use btree::Walk;
pub use check::{check, CheckReport};
pub use damage::{Damage, DamageKind, KeyRange, Place};
pub use journal::{CheckpointBatch, CommitBatch};
pub use meta::Meta;
pub use page_cache::{
    CacheStats, FetchedPage, PageFetcher, PageMiss, DEFAULT_BUDGET as DEFAULT_CACHE_BUDGET,
    MIN_CLEAN_PAGES,
};
pub use repair::{repair, RepairReport};
pub use space_map::Reserved;
pub use types::{
    FormatOptions, Geometry, Tree, Usage, APP_STATE_MAX, NODE_REC_SIZE, ORIGIN_REC_SIZE, PAGE_SIZE,
    ZERO_CHUNK,
};
