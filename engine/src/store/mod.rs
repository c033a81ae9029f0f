//! `Store` (one COW device with its origins) and `Volume` (one version's
//! data path). See ARCHITECTURE.md for the protocol and its invariants.

mod api;
mod background;
mod check;
mod commit;
mod diff;
mod diff_by_node;
mod inner;
mod io;
pub(crate) mod locks;
mod lookup;
pub mod records;
mod staging;
mod usage;

pub use api::*;
pub use check::{check, repair, RepairReport};
pub use inner::FlushHold;
pub use io::Volume;
pub use staging::{StagingStats, DEFAULT_STAGING_BUDGET};

use crate::error::Result;
use crate::sync::{self, Arc};
use inner::Inner;

/// A COW device with its origins. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// Format `cow` as an empty store.
    pub fn format(cow: Dev, opts: &FormatOptions) -> Result<Store> {
        Ok(Store {
            inner: Arc::new(Inner::format(cow, opts)?),
        })
    }

    /// Open an existing store; `origins` supplies each bound origin's device.
    /// Replays the journal; cleaning and rollback resume with `step_background`.
    pub fn open(cow: Dev, origins: OriginResolver<'_>) -> Result<Store> {
        let mut present = |id: &str, path: &str| origins(id, path).map(OriginDev::Present);
        Ok(Store {
            inner: Arc::new(Inner::open(cow, &mut present, false)?),
        })
    }

    /// Open read-only: nothing is written. Every origin must be present
    /// (`open_read_only_lenient` goes on without missing ones).
    pub fn open_read_only(cow: Dev, origins: OriginResolver<'_>) -> Result<Store> {
        let mut present = |id: &str, path: &str| origins(id, path).map(OriginDev::Present);
        Ok(Store {
            inner: Arc::new(Inner::open(cow, &mut present, true)?),
        })
    }

    /// Open read-only, going on without any origin the resolver reports
    /// `OriginDev::Absent`: listing needs only the COW device. Absent origins
    /// and their snapshots are in `versions()` and `status()` (with
    /// `OriginStatus::absent` set); every I/O on their volumes fails with
    /// `Error::OriginAbsent`. Read-only because a write may have to copy
    /// out of the origin.
    pub fn open_read_only_lenient(cow: Dev, origins: LenientResolver<'_>) -> Result<Store> {
        Ok(Store {
            inner: Arc::new(Inner::open(cow, origins, true)?),
        })
    }

    /// Bind an origin device under `id`; `path` is recorded for later opens.
    pub fn bind(&self, id: &str, path: &str, dev: Dev, now: i64) -> Result<()> {
        let _stop = self.inner.gc.panic_stop();
        self.inner.bind(id, path, dev, now)
    }

    /// Unbind; refused while the origin has snapshots.
    pub fn unbind(&self, id: &str) -> Result<()> {
        let _stop = self.inner.gc.panic_stop();
        self.inner.unbind(id)
    }

    /// Snapshot the origin (`of == None`) or snapshot `of`. Returns the new
    /// tag. Durable when it returns; every write that completed before the
    /// call is in the snapshot and durable, none that starts after it is.
    pub fn snapshot(&self, id: &str, of: Option<u64>, memo: &str, now: i64) -> Result<u64> {
        let _stop = self.inner.gc.panic_stop();
        self.inner.snapshot(id, of, memo, now)
    }

    /// Delete a snapshot: instant; the cleaner frees its chunks later.
    pub fn delete(&self, id: &str, tag: u64) -> Result<()> {
        let _stop = self.inner.gc.panic_stop();
        self.inner.delete(id, tag)
    }

    /// Roll snapshot `tag` back onto its origin. The origin shows the
    /// snapshot's content at once; `step_background` finishes the copy.
    pub fn rollback(&self, id: &str, tag: u64) -> Result<()> {
        let _stop = self.inner.gc.panic_stop();
        self.inner.rollback(id, tag)
    }

    /// Everything `list` shows, including each snapshot's own and shared
    /// chunks: that costs a pass over the exceptions (see usage.rs).
    pub fn status(&self) -> Status {
        self.inner.status(true)
    }

    /// `status()` without the space accounting (`own_chunks` and
    /// `shared_chunks` are 0): no pass over the exceptions, but still a
    /// walk over every snapshot (their listing data, sorted): tens of ms
    /// at 100,000 snapshots, holding each origin's tree shared. For the
    /// cleaner's state alone see [`Store::cleaning`], for the origins
    /// [`Store::origin_ids`].
    pub fn status_without_usage(&self) -> Status {
        self.inner.status(false)
    }

    /// Whether cleaning is pending (`Status::cleaning`): a cleaner pass in
    /// progress, or a node waiting for one. O(origins).
    pub fn cleaning(&self) -> bool {
        // The meta lock is released before the trees are read (lock order).
        let pass = sync::read(&self.inner.md).app.clean_pass.is_some();
        pass || self.inner.any_flagged()
    }

    /// The bound origins' ids, in the order `versions()` lists them,
    /// without walking their snapshots. O(origins).
    pub fn origin_ids(&self) -> Vec<String> {
        let origins = sync::read(&self.inner.origins);
        origins.values().map(|o| o.rec.id.clone()).collect()
    }

    /// The byte ranges of `[offset, offset + len)` where version `from`
    /// and version `to` of origin `id` (`None`: the origin itself) may
    /// differ, merged into extents: changed-block tracking for incremental
    /// backup, from the version tree and the exception index alone (it
    /// reads no data, and works with the origin's device absent). Exact at
    /// chunk granularity: never misses a differing chunk; reports one with
    /// equal bytes only where the two versions read different copies. Any
    /// two versions of one origin: ancestor and descendant, siblings, or a
    /// snapshot and the origin. Cost grows with the chunks holding
    /// exceptions in the range, not with the device (see
    /// `Volume::diff_from`, which also bounds the extents returned).
    pub fn diff(
        &self,
        id: &str,
        from: Option<u64>,
        to: Option<u64>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<DiffExtent>> {
        let volume = self.volume(id, to)?;
        let (end, mut at) = (offset + len, offset);
        let mut extents: Vec<DiffExtent> = Vec::new();
        // A diff with no extent limit still bounds its memory, and may
        // describe less than asked: ask again from where it stopped.
        loop {
            let diff = volume.diff_from(from, at, end - at, usize::MAX)?;
            assert!(diff.end > at || at == end, "a diff makes progress");
            for e in diff.extents {
                match extents.last_mut() {
                    Some(last) if last.offset + last.len == e.offset => last.len += e.len,
                    _ => extents.push(e),
                }
            }
            at = diff.end;
            if at == end {
                return Ok(extents);
            }
        }
    }

    /// How diffs on this store find their candidate chunks (default
    /// `Auto`); for tests and benchmarks that compare the two ways.
    pub fn set_diff_strategy(&self, strategy: DiffStrategy) {
        self.inner.set_diff_strategy(strategy);
    }

    /// The chunk size: the unit of copy-on-write, and of `diff`'s extents.
    pub fn chunk_size(&self) -> u32 {
        self.inner.geo.chunk_size
    }

    /// Every live version, origin first, then snapshots by tag.
    pub fn versions(&self) -> Vec<VersionId> {
        let mut out = Vec::new();
        for o in sync::read(&self.inner.origins).values() {
            out.push(VersionId {
                origin: o.rec.id.clone(),
                tag: None,
            });
            let tree = sync::read(&o.tree);
            let mut tags: Vec<u64> = tree
                .tags
                .keys()
                .copied()
                .filter(|t| inner::visible(&tree, *t))
                .collect();
            tags.sort_unstable();
            out.extend(tags.into_iter().map(|t| VersionId {
                origin: o.rec.id.clone(),
                tag: Some(t),
            }));
        }
        out
    }

    pub fn volume(&self, id: &str, tag: Option<u64>) -> Result<Volume> {
        let o = self.inner.origin_by_id(id)?;
        if let Some(t) = tag {
            if !inner::visible(&sync::read(&o.tree), t) {
                return Err(inner::no_snap(id, t));
            }
        }
        Ok(Volume {
            inner: self.inner.clone(),
            o,
            tag,
        })
    }

    /// Advance the cleaner and the rollback copier by at most `budget` chunks.
    pub fn step_background(&self, budget: usize) -> Result<StepReport> {
        let _stop = self.inner.gc.panic_stop();
        let report = self.inner.step_background(&self.inner, budget);
        self.inner.wake_progress();
        report
    }

    /// The rollback in progress, if any: `status()`'s `rollback` without
    /// walking the snapshots (cheap whatever their number).
    pub fn rollback_status(&self) -> Option<RollbackStatus> {
        let rb = sync::read(&self.inner.md).app.rollback?;
        let o = self.inner.origin_by_num(rb.origin)?;
        Some(RollbackStatus {
            origin: o.rec.id.clone(),
            tag: rb.tag,
            done_chunks: rb.cursor,
            total_chunks: rb.total,
        })
    }

    /// Make every completed write and metadata change durable, and
    /// (NBD's FLUSH rule) every write that completes while this runs.
    pub fn flush(&self) -> Result<()> {
        let _stop = self.inner.gc.panic_stop();
        Inner::flush_hold(&self.inner).map(drop)
    }

    /// Make every write and metadata change completed before the call
    /// durable, without `flush`'s cover of writes completing meanwhile
    /// (which makes each of them wait for a commit of its own): for a
    /// driver's periodic flush, which no client waits on.
    pub fn sync(&self) -> Result<()> {
        let _stop = self.inner.gc.panic_stop();
        self.inner.sync_all()
    }

    /// Flush everything; afterwards the origin devices hold exactly the
    /// origins' content.
    pub fn close(self) -> Result<()> {
        let _stop = self.inner.gc.panic_stop();
        self.inner.close()
    }

    /// Set the metadata page cache's byte budget (default
    /// `DEFAULT_CACHE_BUDGET`, 32 MiB). Clean pages beyond it are evicted
    /// at once and whenever a page is read; pages changed and not yet
    /// checkpointed stay whatever the budget (`CacheStats::over_budget`
    /// counts the times they alone exceeded it).
    pub fn set_cache_budget(&self, bytes: u64) {
        sync::write(&self.inner.md).meta.set_cache_budget(bytes);
    }

    /// The metadata page cache's counters.
    pub fn cache_stats(&self) -> CacheStats {
        sync::read(&self.inner.md).meta.cache_stats()
    }

    /// Set the staging budget: the bytes of first writes to origin chunks
    /// held in memory until the commit that makes their copies durable
    /// (default `DEFAULT_STAGING_BUDGET`, 64 MiB; 0 stages one sub-operation
    /// at a time). A writer that finds it used up commits and destages
    /// first.
    pub fn set_staging_budget(&self, bytes: u64) {
        self.inner.staging.set_budget(bytes);
    }

    /// What is staged now, and what staging has done.
    pub fn staging_stats(&self) -> StagingStats {
        self.inner.staging.stats()
    }

    /// Commits (each one durable transaction, shared by every write it
    /// covers) completed since the store was opened.
    pub fn commits(&self) -> u64 {
        self.inner.gc.commits()
    }

    /// Commit, then write in place every staged origin chunk (the driver
    /// thread's step: call it a few milliseconds after writes were
    /// staged, so that one commit covers many of them). FLUSH, FUA,
    /// snapshot, delete, rollback and close do this themselves.
    pub fn commit_staged(&self) -> Result<()> {
        let _stop = self.inner.gc.panic_stop();
        self.inner.commit_staged()
    }

    /// Whether staging has passed half its budget (the driver then commits
    /// without waiting out its delay).
    pub fn staging_pressing(&self) -> bool {
        self.inner.staging.pressing()
    }

    /// Register the function the engine calls when the caller's driver
    /// thread has work: writes were staged (it should `commit_staged` after
    /// its commit delay, or at once when `staging_pressing`), or a delete
    /// or rollback left background work (`step_background`). It is called
    /// on the thread that made the work, with engine locks held: it must
    /// only signal (a condition variable, an eventfd), never call back.
    pub fn set_waker(&self, waker: impl Fn() + Send + Sync + 'static) {
        self.inner.set_waker(std::sync::Arc::new(waker));
    }

    /// Register the function the engine calls after every
    /// `step_background` (whoever made the call, whatever it did): for a
    /// caller that follows a rollback's progress (`rollback_status`) and
    /// wants to wait for it to move rather than poll. It runs on the
    /// stepping thread with no engine lock held, and should only signal.
    pub fn set_progress_waker(&self, waker: impl Fn() + Send + Sync + 'static) {
        self.inner.set_progress_waker(std::sync::Arc::new(waker));
    }

    /// Chunk-lock table entries in use (zero when idle; for tests).
    pub fn lock_entries(&self) -> usize {
        self.inner.locks.entries()
    }
}
