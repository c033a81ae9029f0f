//! `Meta`: the façade the store uses. It composes the owners, each with
//! its fields private: the `PageCache` (pages), the `SpaceMap` (bitmap,
//! allocators, quarantine, reservations, counters), the tree `Roots` (with
//! `BTree` for the algorithms) and the `Journal` (commit, checkpoint,
//! recovery). It keeps what belongs to no one owner: the device, the
//! store's app state, and the state page that records all of them.

use super::btree::{BTree, Roots, Shared, TreeReader, Walk};
use super::empty_store::write_empty_store;
use super::journal::{write_commit, CheckpointBatch, CommitBatch, CommitPlan, Journal};
use super::page_cache::{CacheStats, FetchedPage, PageCache, PageFetcher, PageMiss};
use super::recovery::{read_superblock, replay};
use super::space_map::{Reserved, SpaceCounters, SpaceMap};
use super::types::{FormatOptions, Geometry, Tree, Usage, APP_STATE_MAX};
use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::{self, Layout, Page, StateRec, TreeRoot, TREES};
use std::sync::Arc;

pub struct Meta<D: BlockDev> {
    dev: Arc<D>,
    read_only: bool,
    /// The device's format version (the superblock's).
    version: u32,
    layout: Layout,
    cache: PageCache<D>,
    space: SpaceMap,
    roots: Roots,
    journal: Journal,
    app_state: Vec<u8>,
    /// The state page must be encoded again for a reason no owner records:
    /// the app state changed, or an aborted commit put back the changes
    /// that had last encoded it.
    state_stale: bool,
}

// ---- open ----

impl<D: BlockDev> Meta<D> {
    /// Write a fresh, empty store. Refuses a device that already holds a valid
    /// superblock unless `opts.force`.
    pub fn format(dev: D, opts: &FormatOptions) -> Result<Self> {
        write_empty_store(&dev, opts)?;
        Self::open(dev)
    }
    /// Open: pick the newest valid superblock, replay the journal.
    pub fn open(dev: D) -> Result<Self> {
        Self::open_inner(dev, false)
    }
    /// Open without writing anything (replay in memory only).
    pub fn open_read_only(dev: D) -> Result<Self> {
        Self::open_inner(dev, true)
    }

    fn open_inner(dev: D, read_only: bool) -> Result<Self> {
        let mut m = Self::open_journal(dev, read_only)?;
        if let Some(e) = m.journal.take_damage() {
            return Err(e);
        }
        m.load_state()?;
        if !read_only && m.journal.needs_recovery_checkpoint() {
            m.journal
                .recovery_checkpoint(&*m.dev, &mut m.cache, &mut m.space)?;
        }
        Ok(m)
    }

    /// Superblock + journal replay, without the state page (the owners
    /// start from an empty record): the checker uses this to go on
    /// reporting when the state page is damaged.
    pub(super) fn open_journal(dev: D, read_only: bool) -> Result<Self> {
        let sb = read_superblock(&dev)?;
        if dev.size() < sb.layout.device_size {
            return Err(Error::Invalid(format!(
                "device is {} bytes but the superblock records {}",
                dev.size(),
                sb.layout.device_size
            )));
        }
        let replayed = replay(&dev, &sb)?;
        let dev = Arc::new(dev);
        let mut cache = PageCache::new(dev.clone(), read_only);
        let journal = Journal::open(sb, read_only, replayed, &mut cache);
        let empty = StateRec::default();
        Ok(Meta {
            dev,
            read_only,
            version: sb.version,
            layout: sb.layout,
            cache,
            space: SpaceMap::new(&sb.layout, &empty),
            roots: Roots::new(empty.roots),
            journal,
            app_state: empty.app_state,
            state_stale: false,
        })
    }

    /// Damage the journal replay found behind a later transaction.
    pub(super) fn take_journal_damage(&mut self) -> Option<Error> {
        self.journal.take_damage()
    }

    /// Read the state page (the replayed image if the journal had one,
    /// else home), validate it, and hand each owner its part.
    pub(super) fn load_state(&mut self) -> Result<()> {
        let b = self.layout.state_block;
        let rec = format::decode_state(&self.cache.peek(b)?[..], b)?;
        self.validate_state(&rec)?;
        self.space = SpaceMap::new(&self.layout, &rec);
        self.roots = Roots::new(rec.roots);
        self.app_state = rec.app_state;
        self.state_stale = false;
        Ok(())
    }

    fn validate_state(&self, rec: &StateRec) -> Result<()> {
        let l = &self.layout;
        let bad = |reason: String| Error::Corrupt {
            block: l.state_block,
            kind: "state page",
            reason,
        };
        for (t, r) in Tree::ALL.iter().zip(rec.roots.iter()) {
            if r.exists() != self.format_has(*t) {
                return Err(bad(format!(
                    "{} tree {} in a format {} device",
                    t.name(),
                    if r.exists() { "present" } else { "missing" },
                    self.version
                )));
            }
            if r.exists() && !l.in_area(r.block) {
                return Err(bad(format!(
                    "{} root {} outside the allocation area",
                    t.name(),
                    r.block
                )));
            }
        }
        if rec.free_blocks > l.area_blocks() || rec.data_chunks > l.chunks_total() {
            return Err(bad(format!(
                "counters out of range: free blocks {}, data chunks {}",
                rec.free_blocks, rec.data_chunks
            )));
        }
        Ok(())
    }
}

// ---- the state page ----

impl<D: BlockDev> Meta<D> {
    /// The state page's record: each owner's part, and the app state.
    fn state_rec(&self) -> StateRec {
        let mut rec = StateRec {
            roots: self.roots.all(),
            app_state: self.app_state.clone(),
            ..StateRec::default()
        };
        self.space.fill_state(&mut rec);
        rec
    }

    fn state_changed(&self) -> bool {
        self.state_stale || self.space.state_changed() || self.roots.changed()
    }

    /// Encode the state page into the open transaction if anything it
    /// records changed.
    fn install_state_page(&mut self) {
        if !self.state_changed() {
            return;
        }
        let b = self.layout.state_block;
        self.cache
            .install_new(b, format::encode_state(&self.state_rec(), b));
        self.space.state_encoded();
        self.roots.state_encoded();
        self.state_stale = false;
    }

    /// The space counters (the checker compares them with the trees).
    pub(super) fn space_counters(&self) -> SpaceCounters {
        self.space.counters()
    }

    /// Repair: replace the space counters with those the trees imply.
    pub(super) fn set_space_counters(&mut self, c: SpaceCounters) -> Result<()> {
        self.writable()?;
        self.space.set_counters(c);
        Ok(())
    }

    /// Roots of every tree, in state page order (an absent tree's root
    /// has height 0).
    pub(super) fn roots(&self) -> [TreeRoot; TREES] {
        self.roots.all()
    }

    /// Whether this device's format has tree `t` (format 1 lacks `ByNode`).
    fn format_has(&self, t: Tree) -> bool {
        t != Tree::ByNode || self.version >= format::NODE_INDEX_VERSION
    }
}

// ---- pages, for the checker and repair ----

impl<D: BlockDev> Meta<D> {
    pub(super) fn layout(&self) -> &Layout {
        &self.layout
    }

    /// A block's current content, unvalidated (see `PageCache::peek`).
    pub(super) fn peek_page(&self, block: u64) -> Result<Box<Page>> {
        self.cache.peek(block)
    }

    /// Repair: store `v` as the bitmap bits of blocks `wb..wb+64`, if they
    /// differ. Returns whether they did.
    pub(super) fn repair_bitmap_word(&mut self, wb: u64, v: u64) -> Result<bool> {
        self.writable()?;
        self.space.repair_word(&mut self.cache, wb, v)
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    fn tree(&mut self, t: Tree) -> BTree<'_, D> {
        BTree::new(
            t,
            &self.layout,
            &mut self.roots,
            &mut self.cache,
            &mut self.space,
        )
    }
}

// ---- the store's API ----

impl<D: BlockDev> Meta<D> {
    pub fn dev(&self) -> &D {
        &self.dev
    }
    /// Give the device back (for a reopen of another mode).
    pub fn into_dev(self) -> D
    where
        D: Clone,
    {
        (*self.dev).clone()
    }
    pub fn geometry(&self) -> Geometry {
        Geometry {
            chunk_size: self.layout.chunk_size,
            device_chunks: self.layout.device_chunks,
            chunks_total: self.layout.chunks_total(),
        }
    }
    pub fn usage(&self) -> Usage {
        let c = self.space.counters();
        Usage {
            data_chunks: c.data_chunks,
            meta_blocks: c.meta_blocks,
            free_chunks: self
                .layout
                .chunks_total()
                .saturating_sub(c.data_chunks)
                .saturating_sub(c.meta_chunks),
        }
    }
    pub fn get(&mut self, t: Tree, key: u128) -> Result<Option<Vec<u8>>> {
        self.tree(t).get(key)
    }
    pub fn get_u64(&mut self, t: Tree, key: u128) -> Result<Option<u64>> {
        Ok(self.tree(t).get(key)?.map(|v| format::rd_u64(&v, 0)))
    }
    /// First entry with lo <= key <= hi.
    pub fn seek(&mut self, t: Tree, lo: u128, hi: u128) -> Result<Option<(u128, Vec<u8>)>> {
        Ok(self.tree(t).range(lo, hi, 1)?.pop())
    }
    /// Entries with lo <= key <= hi, ascending, at most `limit`.
    pub fn range(
        &mut self,
        t: Tree,
        lo: u128,
        hi: u128,
        limit: usize,
    ) -> Result<Vec<(u128, Vec<u8>)>> {
        self.tree(t).range(lo, hi, limit)
    }
    /// `get` under shared access (the store's read lock): reads no page
    /// from the device; a page not held is `Error::NotCached`.
    pub fn get_cached(&self, t: Tree, key: u128) -> Result<Option<Vec<u8>>> {
        let mut pages = Shared(&self.cache);
        TreeReader::new(t, &self.layout, self.roots.existing(t), &mut pages).get(key)
    }
    pub fn get_u64_cached(&self, t: Tree, key: u128) -> Result<Option<u64>> {
        Ok(self.get_cached(t, key)?.map(|v| format::rd_u64(&v, 0)))
    }
    /// `seek` under shared access, as `get_cached`.
    pub fn seek_cached(&self, t: Tree, lo: u128, hi: u128) -> Result<Option<(u128, Vec<u8>)>> {
        Ok(self.range_cached(t, lo, hi, 1)?.pop())
    }
    /// `range` under shared access, as `get_cached`.
    pub fn range_cached(
        &self,
        t: Tree,
        lo: u128,
        hi: u128,
        limit: usize,
    ) -> Result<Vec<(u128, Vec<u8>)>> {
        let mut pages = Shared(&self.cache);
        TreeReader::new(t, &self.layout, self.roots.existing(t), &mut pages).range(lo, hi, limit)
    }
    /// Walk the entries with lo <= key <= hi under shared access, as
    /// `get_cached` (a page not held fails the walk with
    /// `Error::NotCached`, after some entries may have been visited: the
    /// caller starts over). `visit` steers it (`Walk`): on, stop, or skip
    /// forward, a skip within a leaf costing a binary search there.
    pub fn walk_cached(
        &self,
        t: Tree,
        lo: u128,
        hi: u128,
        visit: &mut dyn FnMut(u128, &[u8]) -> Result<Walk>,
    ) -> Result<()> {
        let mut pages = Shared(&self.cache);
        TreeReader::new(t, &self.layout, self.roots.existing(t), &mut pages).walk(lo, hi, visit)
    }
    /// Reads pages that shared lookups missed, with no lock held.
    pub fn fetcher(&self) -> PageFetcher<D> {
        self.cache.fetcher()
    }
    /// Offer a fetched page to the cache (see `PageCache::insert_fetched`).
    pub fn insert_fetched(&mut self, page: FetchedPage) -> Result<()> {
        self.cache.insert_fetched(page)
    }
    /// Under exclusive access: load a missed page and keep it until
    /// `trim_cache`, so a lookup that keeps losing its pages to other
    /// fetches completes (see `PageCache::load_unevicted`).
    pub fn load_unevicted(&mut self, miss: PageMiss) -> Result<()> {
        self.cache.load_unevicted(miss)
    }
    pub fn trim_cache(&mut self) {
        self.cache.trim();
    }
    /// Insert or replace. `val.len()` must equal `t.value_size()`.
    pub fn insert(&mut self, t: Tree, key: u128, val: &[u8]) -> Result<()> {
        self.writable()?;
        self.tree(t).insert(key, val)
    }
    /// Remove; returns whether the key was present.
    pub fn remove(&mut self, t: Tree, key: u128) -> Result<bool> {
        self.writable()?;
        self.tree(t).remove(key)
    }
    /// Allocate one data chunk in the open transaction: `reserve_chunk`
    /// and `claim_chunk` at once. `Error::NoSpace` when none is free (a
    /// small reserve is kept back for metadata so commits always complete).
    pub fn alloc_chunk(&mut self) -> Result<u64> {
        let r = self.reserve_chunk()?;
        self.claim_chunk(r)
    }
    /// Set a free data chunk aside without allocating it: nothing a commit
    /// writes changes, but no other reservation or tree page gets it.
    /// `Error::NoSpace` as for `alloc_chunk`.
    pub fn reserve_chunk(&mut self) -> Result<Reserved> {
        self.writable()?;
        self.space.reserve_chunk(&mut self.cache)
    }
    /// Allocate a reserved chunk in the open transaction. Call it in the
    /// same critical section as the insert that maps the chunk, so both
    /// become durable in one transaction.
    pub fn claim_chunk(&mut self, r: Reserved) -> Result<u64> {
        self.space.claim_chunk(&mut self.cache, r)
    }
    /// Give a reservation back.
    pub fn release_chunk(&mut self, r: Reserved) -> Result<()> {
        self.space.release_chunk(&mut self.cache, r)
    }
    /// Chunks reserved and not yet claimed or released.
    pub fn reserved_chunks(&self) -> u64 {
        self.space.reserved_chunks()
    }
    pub fn free_chunk(&mut self, chunk: u64) -> Result<()> {
        self.writable()?;
        self.space.free_chunk(&mut self.cache, chunk)
    }
    pub fn app_state(&self) -> &[u8] {
        &self.app_state
    }
    pub fn set_app_state(&mut self, s: &[u8]) -> Result<()> {
        self.writable()?;
        if s.len() > APP_STATE_MAX {
            return Err(Error::Invalid(format!(
                "app state of {} bytes exceeds {APP_STATE_MAX}",
                s.len()
            )));
        }
        if self.app_state != s {
            self.app_state = s.to_vec();
            self.state_stale = true;
        }
        Ok(())
    }
    /// Blocks freed by transactions not yet durable: allocatable after the
    /// next commit (the store commits before answering ENOSPC).
    pub fn quarantined_blocks(&self) -> u64 {
        self.space.quarantined_blocks()
    }
    /// Pages dirtied by the open transaction.
    pub fn dirty_pages(&self) -> usize {
        let b = self.layout.state_block;
        let state_extra = self.state_changed() && !self.cache.is_dirty(b);
        self.cache.dirty_count() + usize::from(state_extra)
    }
    /// The most dirty pages one transaction may carry; commit before
    /// `dirty_pages()` gets near it (a few pages of slack per operation).
    pub fn max_dirty_pages(&self) -> usize {
        self.journal.max_txn_pages()
    }
    /// Whether the device has tree `t`: every tree but `ByNode`, which a
    /// format-1 device lacks (its exceptions are then indexed only by
    /// chunk).
    pub fn has_tree(&self, t: Tree) -> bool {
        self.roots.get(t).exists()
    }
    /// Root block and height (1 = a single leaf) of a tree, for tests and
    /// diagnostics.
    pub fn tree_root(&self, t: Tree) -> (u64, u32) {
        let r = self.roots.get(t);
        (r.block, r.height)
    }
    /// Journal blocks in use (written since the last checkpoint).
    pub fn journal_used(&self) -> u64 {
        self.journal.used_blocks()
    }
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    /// Set the page cache's byte budget (default `DEFAULT_CACHE_BUDGET`):
    /// clean pages beyond it are evicted, pinned ones (changed and not yet
    /// checkpointed) never are. Takes effect at once.
    pub fn set_cache_budget(&mut self, bytes: u64) {
        self.cache.set_budget(bytes);
    }
    /// What the page cache holds and has done since the open.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }
    /// Whether `chunk` is a data chunk number inside the allocation area.
    pub fn chunk_in_area(&self, chunk: u64) -> bool {
        self.layout.chunk_in_area(chunk)
    }
}

// ---- commit and checkpoint ----

impl<D: BlockDev> Meta<D> {
    /// Close the open transaction and lay it out in the ring.
    fn plan_commit(&mut self) -> Result<Option<CommitPlan>> {
        if !self.journal.may_commit()? {
            return Ok(None);
        }
        self.install_state_page();
        self.journal
            .plan_commit(&*self.dev, &mut self.cache, &mut self.space)
    }

    fn unplan_commit(&mut self, plan: CommitPlan) -> Result<()> {
        self.journal
            .unplan_commit(plan, &mut self.cache, &mut self.space)?;
        // The state page image went with the failed write.
        self.state_stale = true;
        Ok(())
    }

    pub fn end_commit(&mut self, b: CommitBatch) -> Result<()> {
        self.journal.finish_commit(b.into_plan(), &mut self.space)
    }
    /// Undo `begin_commit` after its `write` failed: the batch's pages rejoin
    /// the open transaction so a later commit writes them again. Must be the
    /// newest outstanding batch.
    pub fn abort_commit(&mut self, b: CommitBatch) -> Result<()> {
        self.unplan_commit(b.into_plan())
    }
    pub fn end_checkpoint(&mut self, b: CheckpointBatch) -> Result<()> {
        self.journal
            .finish_checkpoint(b.into_plan(), &mut self.cache, &mut self.space)
    }
    /// Undo `begin_checkpoint` after its `write` failed: its pages stay
    /// pending for the next checkpoint and the journal tail does not move.
    pub fn abort_checkpoint(&mut self, b: CheckpointBatch) -> Result<()> {
        self.journal
            .unplan_checkpoint(b.into_plan(), &mut self.space)
    }

    /// Checkpoint now if due (or regardless, with `force`), under `&mut self`.
    fn checkpoint_now(&mut self, force: bool) -> Result<()> {
        if let Some(plan) = self.journal.plan_checkpoint(force) {
            self.cache.note_home_writes_begin();
            self.journal
                .run_checkpoint(&*self.dev, plan, &mut self.cache, &mut self.space)?;
        }
        Ok(())
    }

    /// begin/write/end commit, then checkpoint if due, all under `&mut self`.
    pub fn commit(&mut self) -> Result<()> {
        if self.journal.busy() {
            return Err(Error::Busy(
                "commit() while a CommitBatch/CheckpointBatch is outstanding; end it first".into(),
            ));
        }
        if let Some(plan) = self.plan_commit()? {
            if let Err(e) = write_commit(&*self.dev, &plan) {
                self.unplan_commit(plan)?;
                return Err(e);
            }
            self.journal.finish_commit(plan, &mut self.space)?;
        }
        self.checkpoint_now(false)
    }
    /// Commit, then checkpoint everything committed regardless of the
    /// threshold (for a clean close: the journal is then empty).
    pub fn checkpoint(&mut self) -> Result<()> {
        self.commit()?;
        self.checkpoint_now(true)
    }
}

impl<D: BlockDev + 'static> Meta<D> {
    fn shared_dev(&self) -> Arc<dyn BlockDev> {
        self.dev.clone()
    }
    fn plan_checkpoint(&mut self, force: bool) -> Result<Option<CheckpointBatch>> {
        let dev = self.shared_dev();
        let plan = self.journal.plan_checkpoint(force);
        if plan.is_some() {
            self.cache.note_home_writes_begin();
        }
        Ok(plan.map(|p| CheckpointBatch::new(dev, p)))
    }
    /// Close the open transaction. None if it changed nothing.
    pub fn begin_commit(&mut self) -> Result<Option<CommitBatch>> {
        let dev = self.shared_dev();
        Ok(self.plan_commit()?.map(|p| CommitBatch::new(dev, p)))
    }
    /// Some when the journal is past its threshold: home-write pages.
    pub fn begin_checkpoint(&mut self) -> Result<Option<CheckpointBatch>> {
        self.plan_checkpoint(false)
    }
    /// Like `begin_checkpoint` but regardless of the threshold (for close).
    pub fn begin_checkpoint_all(&mut self) -> Result<Option<CheckpointBatch>> {
        self.plan_checkpoint(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send<T: Send>() {}
    fn sync<T: Sync>() {}

    /// The store moves batches out of the meta lock and shares `Meta` in a
    /// Mutex across threads.
    #[test]
    fn batches_are_send_and_meta_is_send_sync() {
        send::<CommitBatch>();
        send::<CheckpointBatch>();
        send::<Meta<Arc<dyn BlockDev>>>();
        sync::<Meta<Arc<dyn BlockDev>>>();
    }
}
