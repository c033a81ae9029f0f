//! `Meta`: the page cache and the public API. The algorithms live in the
//! sibling modules: `btree` (trees), `spacemap` (allocator), `journal`
//! (commit, checkpoint, recovery), `check` (the checker).

pub use super::spacemap::Reserved;
use super::spacemap::SpaceState;
use super::*;
use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::{self, Layout, Page, StateRec, Superblock, BLOCK};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

pub use super::check::{check, CheckReport};
pub(super) use super::journal::JournalState;
pub use super::journal::{CheckpointBatch, CommitBatch};

const _: () = assert!(APP_STATE_MAX == format::APP_STATE_CAP);
const _: () = assert!(PAGE_SIZE == format::PAGE_SIZE);

/// One cached metadata page: its current (possibly uncommitted) content.
pub(super) struct CachePage {
    pub(super) buf: Box<Page>,
    /// Whether the structure-level validation for its role has been done.
    /// Pages replayed from the journal enter unchecked.
    pub(super) checked: bool,
}

/// What a cached page is expected to be; decides the validation on load.
#[derive(Clone, Copy, Debug)]
pub(super) enum Role {
    Bitmap,
    Node { tree: Tree, level: u32 },
}

pub struct Meta<D: BlockDev> {
    pub(super) dev: Arc<D>,
    pub(super) read_only: bool,
    pub(super) layout: Layout,
    pub(super) sb: Superblock,
    /// Roots, counters, cursors, app state. Encoded into the state page
    /// when a transaction closes.
    pub(super) st: StateRec,
    pub(super) state_dirty: bool,
    /// Every page loaded or created. Never evicted: a page's latest content
    /// may exist only here and in the journal until it is checkpointed.
    pub(super) cache: HashMap<u64, CachePage>,
    /// Pages changed by the open transaction (ordered, so journal images are
    /// written in a deterministic order and simulator seeds replay).
    pub(super) dirty: BTreeSet<u64>,
    pub(super) sm: SpaceState,
    pub(super) jn: JournalState,
}

pub(super) fn tree_index(t: Tree) -> usize {
    match t {
        Tree::Exceptions => 0,
        Tree::Nodes => 1,
        Tree::Origins => 2,
    }
}

pub(super) fn tree_id(t: Tree) -> u32 {
    tree_index(t) as u32
}

impl<D: BlockDev> Meta<D> {
    /// Write a fresh, empty store. Refuses a device that already holds a valid
    /// superblock unless `opts.force`.
    pub fn format(dev: D, opts: &FormatOptions) -> Result<Self> {
        super::journal::format_device(&dev, opts)?;
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
        if let Some(e) = m.jn.damage.take() {
            return Err(e);
        }
        m.st = m.load_state()?;
        m.sm = SpaceState::new(&m.layout);
        if !read_only && m.jn.needs_recovery_checkpoint() {
            m.recovery_checkpoint()?;
        }
        Ok(m)
    }

    /// Superblock + journal replay, without the state page: the checker uses
    /// this to go on reporting when the state page is damaged.
    pub(super) fn open_journal(dev: D, read_only: bool) -> Result<Self> {
        let sb = super::journal::read_superblock(&dev)?;
        if dev.size() < sb.layout.device_size {
            return Err(Error::Invalid(format!(
                "device is {} bytes but the superblock records {}",
                dev.size(),
                sb.layout.device_size
            )));
        }
        let mut m = Meta {
            dev: Arc::new(dev),
            read_only,
            layout: sb.layout,
            sb,
            st: StateRec::default(),
            state_dirty: false,
            cache: HashMap::new(),
            dirty: BTreeSet::new(),
            sm: SpaceState::new(&sb.layout),
            jn: JournalState::new(&sb),
        };
        m.replay()?;
        Ok(m)
    }

    /// The state page: the replayed image if the journal had one, else home.
    pub(super) fn load_state(&mut self) -> Result<StateRec> {
        let b = self.layout.state_block;
        let st = match self.cache.get(&b) {
            Some(p) => format::decode_state(&p.buf[..], b)?,
            None => format::decode_state(&self.read_block(b)?[..], b)?,
        };
        self.validate_state(&st)?;
        Ok(st)
    }

    fn validate_state(&self, st: &StateRec) -> Result<()> {
        let l = &self.layout;
        let bad = |reason: String| Error::Corrupt {
            block: l.state_block,
            kind: "state page",
            reason,
        };
        for (t, r) in Tree::ALL.iter().zip(st.roots.iter()) {
            if !l.in_area(r.block) {
                return Err(bad(format!(
                    "{} root {} outside the allocation area",
                    t.name(),
                    r.block
                )));
            }
        }
        if st.free_blocks > l.area_blocks() || st.data_chunks > l.chunks_total() {
            return Err(bad(format!(
                "counters out of range: free blocks {}, data chunks {}",
                st.free_blocks, st.data_chunks
            )));
        }
        Ok(())
    }

    pub(super) fn read_block(&self, block: u64) -> Result<Box<Page>> {
        let mut p = format::new_page();
        self.dev.read_at(block * BLOCK, &mut p[..])?;
        Ok(p)
    }

    /// Load (if needed) and validate a page for `role`. Damage is reported
    /// as an error and the page is not cached, so it is never used.
    pub(super) fn page(&mut self, block: u64, role: Role) -> Result<&mut CachePage> {
        if !self.cache.contains_key(&block) {
            let buf = self.read_block(block)?;
            self.cache.insert(
                block,
                CachePage {
                    buf,
                    checked: false,
                },
            );
        }
        let checked = self.cache.get(&block).is_some_and(|p| p.checked);
        if !checked {
            let res = match self.cache.get(&block) {
                Some(p) => self.validate(block, &p.buf, role),
                None => Ok(()),
            };
            if let Err(e) = res {
                // A replayed image stays (it is the committed content); a
                // page read from home is dropped so a later read retries.
                if !self.jn.is_replayed(block) {
                    self.cache.remove(&block);
                }
                return Err(e);
            }
        }
        match self.cache.get_mut(&block) {
            Some(p) => {
                p.checked = true;
                Ok(p)
            }
            None => Err(Error::Corrupt {
                block,
                kind: "page cache",
                reason: "page vanished from the cache".into(),
            }),
        }
    }

    fn validate(&self, block: u64, buf: &Page, role: Role) -> Result<()> {
        match role {
            Role::Bitmap => format::decode_bitmap(&buf[..], block),
            Role::Node { tree, level } => {
                let info = format::decode_node(&buf[..], block)?;
                let want_vs = if level == 0 { tree.value_size() } else { 8 };
                if info.tree != tree_id(tree) || info.level != level || info.value_size != want_vs {
                    return Err(Error::CorruptTree {
                        tree: tree.name(),
                        block,
                        key_lo: 0,
                        key_hi: u128::MAX,
                        reason: format!(
                            "node belongs to tree {} at level {} with {}-byte values; expected level {level}",
                            info.tree, info.level, info.value_size
                        ),
                    });
                }
                Ok(())
            }
        }
    }

    /// Mutable access to a cached page for the open transaction.
    pub(super) fn page_mut(&mut self, block: u64, role: Role) -> Result<&mut Page> {
        assert!(!self.read_only);
        // Load first: a page that fails to load must not be marked dirty,
        // or every later commit would look for it in vain.
        self.page(block, role)?;
        self.dirty.insert(block);
        Ok(&mut self.page(block, role)?.buf)
    }

    pub(super) fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

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
        Usage {
            data_chunks: self.st.data_chunks,
            meta_blocks: self.st.meta_blocks,
            free_chunks: self
                .layout
                .chunks_total()
                .saturating_sub(self.st.data_chunks)
                .saturating_sub(self.st.meta_chunks),
        }
    }
    pub fn get(&mut self, t: Tree, key: u128) -> Result<Option<Vec<u8>>> {
        self.tree_get(t, key)
    }
    pub fn get_u64(&mut self, t: Tree, key: u128) -> Result<Option<u64>> {
        Ok(self.tree_get(t, key)?.map(|v| format::rd_u64(&v, 0)))
    }
    /// First entry with lo <= key <= hi.
    pub fn seek(&mut self, t: Tree, lo: u128, hi: u128) -> Result<Option<(u128, Vec<u8>)>> {
        Ok(self.tree_range(t, lo, hi, 1)?.pop())
    }
    /// Entries with lo <= key <= hi, ascending, at most `limit`.
    pub fn range(
        &mut self,
        t: Tree,
        lo: u128,
        hi: u128,
        limit: usize,
    ) -> Result<Vec<(u128, Vec<u8>)>> {
        self.tree_range(t, lo, hi, limit)
    }
    /// Insert or replace. `val.len()` must equal `t.value_size()`.
    pub fn insert(&mut self, t: Tree, key: u128, val: &[u8]) -> Result<()> {
        self.tree_insert(t, key, val)
    }
    /// Remove; returns whether the key was present.
    pub fn remove(&mut self, t: Tree, key: u128) -> Result<bool> {
        self.tree_remove(t, key)
    }
    /// Allocate one data chunk in the open transaction: `reserve_chunk`
    /// and `claim_chunk` at once. `Error::NoSpace` when none is free (a
    /// small reserve is kept back for metadata so commits always complete).
    pub fn alloc_chunk(&mut self) -> Result<u64> {
        let r = self.sm_reserve_chunk()?;
        self.sm_claim_chunk(r)
    }
    /// Set a free data chunk aside without allocating it: nothing a commit
    /// writes changes, but no other reservation or tree page gets it.
    /// `Error::NoSpace` as for `alloc_chunk`.
    pub fn reserve_chunk(&mut self) -> Result<Reserved> {
        self.sm_reserve_chunk()
    }
    /// Allocate a reserved chunk in the open transaction. Call it in the
    /// same critical section as the insert that maps the chunk, so both
    /// become durable in one transaction.
    pub fn claim_chunk(&mut self, r: Reserved) -> Result<u64> {
        self.sm_claim_chunk(r)
    }
    /// Give a reservation back.
    pub fn release_chunk(&mut self, r: Reserved) -> Result<()> {
        self.sm_release_chunk(r)
    }
    /// Chunks reserved and not yet claimed or released.
    pub fn reserved_chunks(&self) -> u64 {
        self.sm.reserved_chunks()
    }
    pub fn free_chunk(&mut self, chunk: u64) -> Result<()> {
        self.sm_free_chunk(chunk)
    }
    pub fn app_state(&self) -> &[u8] {
        &self.st.app_state
    }
    pub fn set_app_state(&mut self, s: &[u8]) -> Result<()> {
        self.writable()?;
        if s.len() > APP_STATE_MAX {
            return Err(Error::Invalid(format!(
                "app state of {} bytes exceeds {APP_STATE_MAX}",
                s.len()
            )));
        }
        if self.st.app_state != s {
            self.st.app_state = s.to_vec();
            self.state_dirty = true;
        }
        Ok(())
    }
    /// Pages dirtied by the open transaction.
    /// Blocks freed by transactions not yet durable: allocatable after the
    /// next commit (the store commits before answering ENOSPC).
    pub fn quarantined_blocks(&self) -> u64 {
        self.sm.quarantined_blocks()
    }
    pub fn dirty_pages(&self) -> usize {
        let state_extra = self.state_dirty && !self.dirty.contains(&self.layout.state_block);
        self.dirty.len() + usize::from(state_extra)
    }
    /// The most dirty pages one transaction may carry; commit before
    /// `dirty_pages()` gets near it (a few pages of slack per operation).
    pub fn max_dirty_pages(&self) -> usize {
        self.jn.max_txn_pages()
    }
    /// Root block and height (1 = a single leaf) of a tree, for tests and
    /// diagnostics.
    pub fn tree_root(&self, t: Tree) -> (u64, u32) {
        let r = self.st.roots[tree_index(t)];
        (r.block, r.height)
    }
    /// Journal blocks in use (written since the last checkpoint).
    pub fn journal_used(&self) -> u64 {
        self.jn.used_blocks()
    }
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    /// Whether `chunk` is a data chunk number inside the allocation area.
    pub fn chunk_in_area(&self, chunk: u64) -> bool {
        self.layout.chunk_in_area(chunk)
    }
    pub fn end_commit(&mut self, b: CommitBatch) -> Result<()> {
        self.finish_commit(b.into_plan())
    }
    /// Undo `begin_commit` after its `write` failed: the batch's pages rejoin
    /// the open transaction so a later commit writes them again. Must be the
    /// newest outstanding batch.
    pub fn abort_commit(&mut self, b: CommitBatch) -> Result<()> {
        self.unplan_commit(b.into_plan())
    }
    pub fn end_checkpoint(&mut self, b: CheckpointBatch) -> Result<()> {
        self.finish_checkpoint(b.into_plan())
    }
    /// Undo `begin_checkpoint` after its `write` failed: its pages stay
    /// pending for the next checkpoint and the journal tail does not move.
    pub fn abort_checkpoint(&mut self, b: CheckpointBatch) -> Result<()> {
        self.unplan_checkpoint(b.into_plan())
    }
    /// begin/write/end commit, then checkpoint if due, all under `&mut self`.
    pub fn commit(&mut self) -> Result<()> {
        if self.jn.busy() {
            return Err(Error::Busy(
                "commit() while a CommitBatch/CheckpointBatch is outstanding; end it first".into(),
            ));
        }
        if let Some(plan) = self.plan_commit()? {
            if let Err(e) = super::journal::write_commit(&*self.dev, &plan) {
                self.unplan_commit(plan)?;
                return Err(e);
            }
            self.finish_commit(plan)?;
        }
        if let Some(plan) = self.plan_checkpoint(false)? {
            self.run_checkpoint(plan)?;
        }
        Ok(())
    }
    /// Commit, then checkpoint everything committed regardless of the
    /// threshold (for a clean close: the journal is then empty).
    pub fn checkpoint(&mut self) -> Result<()> {
        self.commit()?;
        if let Some(plan) = self.plan_checkpoint(true)? {
            self.run_checkpoint(plan)?;
        }
        Ok(())
    }
}

impl<D: BlockDev + 'static> Meta<D> {
    fn shared_dev(&self) -> Arc<dyn BlockDev> {
        self.dev.clone()
    }
    /// Close the open transaction. None if it changed nothing.
    pub fn begin_commit(&mut self) -> Result<Option<CommitBatch>> {
        let dev = self.shared_dev();
        Ok(self.plan_commit()?.map(|p| CommitBatch::new(dev, p)))
    }
    /// Some when the journal is past its threshold: home-write pages.
    pub fn begin_checkpoint(&mut self) -> Result<Option<CheckpointBatch>> {
        let dev = self.shared_dev();
        Ok(self
            .plan_checkpoint(false)?
            .map(|p| CheckpointBatch::new(dev, p)))
    }
    /// Like `begin_checkpoint` but regardless of the threshold (for close).
    pub fn begin_checkpoint_all(&mut self) -> Result<Option<CheckpointBatch>> {
        let dev = self.shared_dev();
        Ok(self
            .plan_checkpoint(true)?
            .map(|p| CheckpointBatch::new(dev, p)))
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
