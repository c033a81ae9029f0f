//! `PageCache`: the metadata pages in memory, and which of them the open
//! transaction changed. All page access goes through it.
//!
//! What the cache knows of each page:
//! - *dirty*: changed by the open transaction; the next commit seals it and
//!   takes its image (`seal_dirty`, in block order);
//! - *homed*: its bytes equal its home block. A page read from home is
//!   homed; one changed, created, or replayed from the journal is not,
//!   until a checkpoint writes those very bytes home
//!   (`note_written_home`).
//!
//! The cache holds at most a byte budget (`set_budget`, default
//! `DEFAULT_BUDGET`) of *clean* pages: homed and not dirty, the only ones
//! that can be dropped and read again. Every other page is *pinned*: it may
//! exist only here and in the journal, so it stays until a checkpoint homes
//! it, whatever the budget. Pinned pages count towards the bytes but are
//! never evicted; when they alone fill the budget, the cache keeps a floor
//! of `MIN_CLEAN_PAGES` clean pages (one operation's working set) and goes
//! over budget, which `CacheStats::over_budget` counts.
//!
//! Eviction is CLOCK over the clean pages only: an access sets a page's
//! reference bit; the hand sweeps the ring, clearing set bits and evicting
//! the first page whose bit is clear. A page joins the ring when it becomes
//! clean (read from home, or homed by a checkpoint) and leaves it when it
//! is pinned again (changed) or freed. An evicted page is read from home on
//! its next access and validated again (crc, type, block number, role).
//!
//! Two ways in:
//! - `page`/`page_mut` (exclusive access, `&mut self`): a miss reads the
//!   home block there and then (`load`), under whatever lock the caller
//!   holds. The store's writers, commits, open, check and repair use it;
//!   `CacheStats::locked_misses` counts these misses.
//! - `cached_page` (shared access, `&self`): lookups under a read lock. A
//!   page not held is not read; the lookup fails with `Error::NotCached`,
//!   the caller drops its lock, reads the block with a `PageFetcher` and
//!   offers it back with `insert_fetched`. The fetch may race with a
//!   checkpoint writing that block home or with the block being freed and
//!   reused, so every such event bumps the cache's *epoch*, and a fetched
//!   page read under an older epoch is dropped (the lookup runs again).
//!   Between two bumps, a block that is live and not held has exactly its
//!   home content: a page leaves the cache only when clean (homed) or freed
//!   (a bump), and changes home only by a checkpoint (a bump).

use super::types::Tree;
use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::{self, Page, BLOCK, PAGE_SIZE};
use crate::planted::{self, Bug};
use std::collections::{BTreeSet, HashMap};
// Hints only (a reference bit, counters): any interleaving of them is
// correct, so they are std atomics even under loom and shuttle.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// The default byte budget of the page cache: 8192 pages.
pub const DEFAULT_BUDGET: u64 = 32 << 20;

/// Clean pages kept whatever the budget, so one operation (a root-to-leaf
/// descent, a split, a bitmap word) does not evict its own pages.
pub const MIN_CLEAN_PAGES: usize = 4;

/// What the page cache holds and has done since the open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// The byte budget for clean pages plus pinned pages.
    pub budget: u64,
    /// Pages held, and their bytes (`pages * 4096`; the map's own overhead,
    /// tens of bytes a page, is not counted).
    pub pages: u64,
    pub bytes: u64,
    /// Pages that cannot be evicted: dirty, or not yet homed.
    pub pinned: u64,
    /// Accesses served from memory, and from a read of the home block.
    pub hits: u64,
    pub misses: u64,
    /// Of the misses, those read under exclusive access (`page`,
    /// `page_mut`); the rest were fetched with no lock held.
    pub locked_misses: u64,
    /// Fetched pages dropped because a checkpoint or a free happened while
    /// they were read (the lookup ran again).
    pub stale_fetches: u64,
    /// Clean pages dropped to stay within the budget.
    pub evictions: u64,
    /// Times a page entered the cache and left it over budget because the
    /// pinned pages (plus the floor of clean ones) alone exceed it.
    pub over_budget: u64,
}

/// What a page is expected to be; decides the validation on load.
#[derive(Clone, Copy, Debug)]
pub(super) enum Role {
    Bitmap,
    Node { tree: Tree, level: u32 },
}

/// One cached metadata page: its current (possibly uncommitted) content.
struct CachedPage {
    buf: Box<Page>,
    /// Whether the structure-level validation for its role has been done.
    /// Pages replayed from the journal enter unchecked.
    checked: bool,
    /// Whether `buf` equals the home block (see the module docs).
    homed: bool,
    /// CLOCK reference bit: accessed since the hand last passed. Set
    /// under shared access too.
    referenced: AtomicBool,
    /// Position in the clock ring; `Some` exactly when the page is clean.
    slot: Option<usize>,
}

pub(super) struct PageCache<D: BlockDev> {
    dev: Arc<D>,
    read_only: bool,
    pages: HashMap<u64, CachedPage>,
    /// Pages changed by the open transaction, always cached. Ordered, so
    /// journal images are written in a deterministic order and simulator
    /// seeds replay.
    dirty: BTreeSet<u64>,
    /// The clock ring: the clean (evictable) pages, in no particular order.
    ring: Vec<u64>,
    /// The clock hand, an index into `ring`.
    hand: usize,
    budget_pages: usize,
    /// Bumped before any checkpoint writes home and whenever a page is
    /// freed: see the module docs.
    epoch: u64,
    stats: CacheStats,
    /// Counted under shared access.
    hits: AtomicU64,
    shared_misses: AtomicU64,
}

/// A page a shared lookup needs and the cache does not hold.
#[derive(Clone, Copy, Debug)]
pub struct PageMiss {
    block: u64,
    role: Role,
    epoch: u64,
}

impl PageMiss {
    pub fn block(&self) -> u64 {
        self.block
    }
}

/// Reads missed pages with no lock held (see the module docs).
pub struct PageFetcher<D: BlockDev> {
    dev: Arc<D>,
}

/// A page read by a `PageFetcher`, or why it could not be: offered back
/// with `insert_fetched`, which judges it against the epoch.
pub struct FetchedPage {
    miss: PageMiss,
    content: Result<Box<Page>>,
}

impl<D: BlockDev> PageFetcher<D> {
    pub fn fetch(&self, miss: PageMiss) -> FetchedPage {
        let content = read_block(&*self.dev, miss.block)
            .and_then(|buf| validate(miss.block, &buf, miss.role).map(|()| buf));
        FetchedPage { miss, content }
    }
}

/// Read one block from its home on `dev`, bypassing any cache.
pub(super) fn read_block(dev: &dyn BlockDev, block: u64) -> Result<Box<Page>> {
    let mut p = format::new_page();
    dev.read_at(block * BLOCK, &mut p[..])?;
    Ok(p)
}

fn validate(block: u64, buf: &Page, role: Role) -> Result<()> {
    match role {
        Role::Bitmap => format::decode_bitmap(&buf[..], block),
        Role::Node { tree, level } => {
            let info = format::decode_node(&buf[..], block)?;
            let want_vs = if level == 0 { tree.value_size() } else { 8 };
            if info.tree != tree.node_id() || info.level != level || info.value_size != want_vs {
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

fn budget_pages(bytes: u64) -> usize {
    usize::try_from(bytes / PAGE_SIZE as u64).unwrap_or(usize::MAX)
}

// ---- the clock ----

impl<D: BlockDev> PageCache<D> {
    pub(super) fn new(dev: Arc<D>, read_only: bool) -> Self {
        PageCache {
            dev,
            read_only,
            pages: HashMap::new(),
            dirty: BTreeSet::new(),
            ring: Vec::new(),
            hand: 0,
            budget_pages: budget_pages(DEFAULT_BUDGET),
            epoch: 0,
            stats: CacheStats::default(),
            hits: AtomicU64::new(0),
            shared_misses: AtomicU64::new(0),
        }
    }

    /// Set the byte budget (see the module docs) and evict down to it.
    pub(super) fn set_budget(&mut self, bytes: u64) {
        self.budget_pages = budget_pages(bytes);
        self.make_room(0);
    }

    pub(super) fn stats(&self) -> CacheStats {
        let pages = self.pages.len() as u64;
        let shared_misses = self.shared_misses.load(Relaxed);
        CacheStats {
            budget: self.budget_pages as u64 * PAGE_SIZE as u64,
            pages,
            bytes: pages * PAGE_SIZE as u64,
            pinned: pages - self.ring.len() as u64,
            hits: self.stats.hits + self.hits.load(Relaxed),
            misses: self.stats.locked_misses + shared_misses,
            ..self.stats
        }
    }

    /// Whether a page belongs on the clock: clean, so it can be read again.
    fn evictable(&self, block: u64, p: &CachedPage) -> bool {
        // The planted bug: every page is on the clock, dirty and unhomed
        // ones too, and evicting one loses its change.
        planted::on(Bug::EvictDirty) || (p.homed && !self.dirty.contains(&block))
    }

    /// Put `block` on the clock or take it off, as its state now says.
    fn sync_clock(&mut self, block: u64) {
        let Some(p) = self.pages.get(&block) else {
            return;
        };
        match (self.evictable(block, p), p.slot) {
            (true, None) => {
                let slot = self.ring.len();
                self.ring.push(block);
                self.cached_mut(block).slot = Some(slot);
            }
            (false, Some(_)) => self.clock_remove(block),
            _ => {}
        }
    }

    fn clock_remove(&mut self, block: u64) {
        let Some(slot) = self.pages.get_mut(&block).and_then(|p| p.slot.take()) else {
            return;
        };
        self.ring.swap_remove(slot);
        if let Some(&moved) = self.ring.get(slot) {
            self.cached_mut(moved).slot = Some(slot);
        }
        if self.hand >= self.ring.len() {
            self.hand = 0;
        }
    }

    /// Drop a page from the cache (and the clock).
    fn remove(&mut self, block: u64) {
        self.clock_remove(block);
        self.pages.remove(&block);
    }

    /// Clean pages allowed now: the budget less the pinned pages, but never
    /// below the floor.
    fn clean_limit(&self) -> usize {
        let pinned = self.pages.len() - self.ring.len();
        self.budget_pages
            .saturating_sub(pinned)
            .max(MIN_CLEAN_PAGES)
    }

    /// Evict clean pages until `incoming` more clean pages fit the budget.
    fn make_room(&mut self, incoming: usize) {
        while !self.ring.is_empty() && self.ring.len() + incoming > self.clean_limit() {
            self.evict_one();
        }
    }

    /// A page just entered: count it if the cache is now over budget.
    fn note_entered(&mut self) {
        if self.pages.len() > self.budget_pages {
            self.stats.over_budget += 1;
        }
    }

    /// Sweep the hand to the first clean page not referenced since it last
    /// passed, clearing bits on the way, and evict that page.
    fn evict_one(&mut self) {
        loop {
            if self.hand >= self.ring.len() {
                self.hand = 0;
            }
            let block = self.ring[self.hand];
            let p = self.cached_mut(block);
            if *p.referenced.get_mut() {
                *p.referenced.get_mut() = false;
                self.hand += 1;
                continue;
            }
            // The page that moves into this slot is the hand's next.
            self.remove(block);
            // A no-op for a clean page; with the planted bug, the lost change.
            self.dirty.remove(&block);
            self.stats.evictions += 1;
            return;
        }
    }
}

// ---- pages ----

impl<D: BlockDev> PageCache<D> {
    /// Read a block from its home, bypassing the cache.
    pub(super) fn read_home(&self, block: u64) -> Result<Box<Page>> {
        read_block(&*self.dev, block)
    }

    /// Load (if needed) and validate a page for `role`. Damage is reported
    /// as an error and the page is not used. This is the only place a miss
    /// is served: one read of the home block.
    fn load(&mut self, block: u64, role: Role) -> Result<&mut CachedPage> {
        if self.pages.contains_key(&block) {
            self.stats.hits += 1;
        } else {
            self.stats.locked_misses += 1;
            let buf = self.read_home(block)?;
            self.insert_clean(block, buf, false);
        }
        let p = self.cached_mut(block);
        *p.referenced.get_mut() = true;
        if !p.checked {
            if let Err(e) = validate(block, &p.buf, role) {
                // A page read from home is dropped so a later read retries;
                // one that is not homed (replayed) is the committed content
                // and stays.
                if p.homed {
                    self.remove(block);
                }
                return Err(e);
            }
            p.checked = true;
        }
        Ok(self.cached_mut(block))
    }

    /// A page read from home joins the cache (and the clock).
    fn insert_clean(&mut self, block: u64, buf: Box<Page>, checked: bool) {
        self.make_room(1);
        let page = CachedPage {
            buf,
            checked,
            homed: true,
            referenced: AtomicBool::new(false),
            slot: None,
        };
        self.pages.insert(block, page);
        self.sync_clock(block);
        self.note_entered();
    }

    fn cached_mut(&mut self, block: u64) -> &mut CachedPage {
        match self.pages.get_mut(&block) {
            Some(p) => p,
            None => panic!("page {block} is not in the cache"),
        }
    }

    /// A page validated for `role`, loaded from home on a miss.
    pub(super) fn page(&mut self, block: u64, role: Role) -> Result<&Page> {
        Ok(&self.load(block, role)?.buf)
    }

    /// A page for a lookup under shared access: served from memory, or
    /// `Error::NotCached` (see the module docs). A page replayed from the
    /// journal and not yet validated is validated on every such access
    /// (marking it needs exclusive access), which is cheap and rare.
    pub(super) fn cached_page(&self, block: u64, role: Role) -> Result<&Page> {
        let Some(p) = self.pages.get(&block) else {
            self.shared_misses.fetch_add(1, Relaxed);
            return Err(Error::NotCached(PageMiss {
                block,
                role,
                epoch: self.epoch,
            }));
        };
        self.hits.fetch_add(1, Relaxed);
        p.referenced.store(true, Relaxed);
        if !p.checked {
            validate(block, &p.buf, role)?;
        }
        Ok(&p.buf)
    }

    /// What reads missed pages with no lock held.
    pub(super) fn fetcher(&self) -> PageFetcher<D> {
        PageFetcher {
            dev: self.dev.clone(),
        }
    }

    /// Offer a fetched page. Dropped if the epoch moved since the miss (a
    /// checkpoint or a free may have raced with the read: the caller looks
    /// up again) or if the page is held by now (that copy is as new or
    /// newer). Otherwise the read's result stands: the page joins the cache,
    /// or its damage is the lookup's error.
    pub(super) fn insert_fetched(&mut self, fetched: FetchedPage) -> Result<()> {
        let FetchedPage { miss, content } = fetched;
        if miss.epoch != self.epoch && !planted::on(Bug::FetchIgnoresEpoch) {
            self.stats.stale_fetches += 1;
            return Ok(());
        }
        if self.pages.contains_key(&miss.block) {
            return Ok(());
        }
        self.insert_clean(miss.block, content?, true);
        Ok(())
    }

    /// Under exclusive access, after shared lookups kept missing pages that
    /// other fetches evicted again: read the page here, and keep it
    /// whatever the budget until `trim`, so the lookup's next round finds
    /// every page it has loaded so far.
    pub(super) fn load_unevicted(&mut self, miss: PageMiss) -> Result<()> {
        if self.pages.contains_key(&miss.block) {
            return Ok(());
        }
        self.stats.locked_misses += 1;
        let buf = self.read_home(miss.block)?;
        validate(miss.block, &buf, miss.role)?;
        let page = CachedPage {
            buf,
            checked: true,
            homed: true,
            referenced: AtomicBool::new(true),
            slot: None,
        };
        self.pages.insert(miss.block, page);
        self.sync_clock(miss.block);
        Ok(())
    }

    /// Evict down to the budget (after `load_unevicted`).
    pub(super) fn trim(&mut self) {
        self.make_room(0);
    }

    /// Mutable access to a page for the open transaction. The page is
    /// pinned from now until a checkpoint writes its bytes home.
    pub(super) fn page_mut(&mut self, block: u64, role: Role) -> Result<&mut Page> {
        assert!(!self.read_only, "page {block} changed on a read-only open");
        // Load first: a page that fails to load must not be marked dirty,
        // or every later commit would look for it in vain.
        self.load(block, role)?;
        self.dirty.insert(block);
        self.cached_mut(block).homed = false;
        self.sync_clock(block);
        Ok(&mut self.cached_mut(block).buf)
    }

    /// The current content of a block, cached or home, unvalidated and not
    /// cached: the checker's view, which must report damage, not refuse it.
    pub(super) fn peek(&self, block: u64) -> Result<Box<Page>> {
        match self.pages.get(&block) {
            Some(p) => Ok(p.buf.clone()),
            None => self.read_home(block),
        }
    }

    /// Insert a pinned page (not homed), replacing any cached content.
    fn insert_pinned(&mut self, block: u64, buf: Box<Page>, checked: bool) {
        self.remove(block);
        let page = CachedPage {
            buf,
            checked,
            homed: false,
            referenced: AtomicBool::new(true),
            slot: None,
        };
        self.pages.insert(block, page);
        self.sync_clock(block);
        self.make_room(0);
        self.note_entered();
    }

    /// A page built in memory (a new tree page, the state page) joins the
    /// open transaction, replacing any cached content of the block.
    pub(super) fn install_new(&mut self, block: u64, buf: Box<Page>) {
        assert!(!self.read_only, "page {block} created on a read-only open");
        self.dirty.insert(block);
        self.insert_pinned(block, buf, true);
    }

    /// A committed image replayed from the journal at open: newer than the
    /// home block and not yet validated for its role.
    pub(super) fn install_replayed(&mut self, block: u64, buf: Box<Page>) {
        self.insert_pinned(block, buf, false);
    }

    /// Forget a freed page, and its change in the open transaction: the
    /// journal revokes the block instead.
    pub(super) fn discard(&mut self, block: u64) {
        // The block may be reused, and a fetch of it may be in flight.
        self.epoch += 1;
        self.remove(block);
        self.dirty.remove(&block);
    }

    /// A checkpoint is about to write pages home: fetches in flight may
    /// read a block half-written, or before its new content lands.
    pub(super) fn note_home_writes_begin(&mut self) {
        self.epoch += 1;
    }

    pub(super) fn dirty_count(&self) -> usize {
        self.dirty.len()
    }

    pub(super) fn is_dirty(&self, block: u64) -> bool {
        self.dirty.contains(&block)
    }

    /// Close the open transaction's changes: seal every dirty page (block
    /// order) and return immutable images of them. No page is dirty after;
    /// every one of them stays pinned (not homed) until its checkpoint.
    pub(super) fn seal_dirty(&mut self) -> Vec<(u64, Arc<Page>)> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut images = Vec::with_capacity(dirty.len());
        for block in dirty {
            let p = self.cached_mut(block);
            format::seal(&mut p.buf);
            images.push((block, Arc::new(*p.buf)));
        }
        images
    }

    /// A sealed image was not written after all (the commit failed): the
    /// page rejoins the open transaction. A page freed since is gone, and
    /// stays gone.
    pub(super) fn redirty(&mut self, block: u64) {
        if self.pages.contains_key(&block) {
            self.dirty.insert(block);
            self.sync_clock(block);
        }
    }

    /// A checkpoint wrote `img` to `block`'s home: the cached page is homed
    /// if it is clean and has exactly those bytes (a newer change, committed
    /// or not, keeps it unhomed). A homed page becomes evictable.
    pub(super) fn note_written_home(&mut self, block: u64, img: &Page) {
        let clean = !self.dirty.contains(&block);
        if let Some(p) = self.pages.get_mut(&block) {
            if clean && p.buf[..] == img[..] {
                p.homed = true;
                self.sync_clock(block);
                self.make_room(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::MemDev;
    use crate::format::node;

    const T: Tree = Tree::Exceptions;
    const LEAF: Role = Role::Node { tree: T, level: 0 };
    const PAGE: u64 = PAGE_SIZE as u64;

    fn leaf(block: u64, key: u128) -> Box<Page> {
        let mut p = format::new_page();
        node::init_node(&mut p, block, T.node_id(), 0, T.value_size());
        node::insert_at(&mut p, 0, &node::leaf_entry(key, &[7u8; 8]));
        format::seal(&mut p);
        p
    }

    /// A device whose blocks 0..256 hold valid leaves (key = block).
    fn cache(budget_pages: u64) -> PageCache<MemDev> {
        let dev = MemDev::new(256 * PAGE);
        for b in 0..256 {
            dev.write_at(b * BLOCK, &leaf(b, b.into())[..]).unwrap();
        }
        let mut c = PageCache::new(Arc::new(dev), false);
        c.set_budget(budget_pages * PAGE);
        c
    }

    impl<D: BlockDev> PageCache<D> {
        fn cached(&self, b: u64) -> bool {
            self.pages.contains_key(&b)
        }
        /// The bound the cache keeps after every call.
        fn within_bound(&self) -> bool {
            let s = self.stats();
            s.pages <= (self.budget_pages as u64).max(s.pinned + MIN_CLEAN_PAGES as u64)
        }
    }

    fn key_of(c: &mut PageCache<MemDev>, b: u64) -> u128 {
        node::key_at(&c.page(b, LEAF).unwrap()[..], 0, node::entry_size(0, 8))
    }

    #[test]
    fn clock_gives_referenced_pages_a_second_chance() {
        let mut c = cache(6);
        for b in 10..16 {
            c.page(b, LEAF).unwrap();
        }
        assert_eq!((c.stats().pages, c.stats().evictions), (6, 0));
        assert_eq!((c.stats().misses, c.stats().hits), (6, 0));
        // Every page was referenced: the hand clears all six bits, comes
        // round, and takes the first page of the ring.
        c.page(16, LEAF).unwrap();
        assert!(!c.cached(10));
        assert_eq!((c.stats().pages, c.stats().evictions), (6, 1));
        // 11 is used again; the next evictions take pages not used since the
        // sweep, never 11 or the newer 16 and 17.
        c.page(11, LEAF).unwrap();
        assert_eq!(c.stats().hits, 1);
        c.page(17, LEAF).unwrap();
        c.page(18, LEAF).unwrap();
        assert_eq!(c.stats().evictions, 3);
        for b in [11, 16, 17, 18] {
            assert!(c.cached(b), "page {b} evicted");
        }
        assert_eq!([12, 13, 14, 15].iter().filter(|b| c.cached(**b)).count(), 2);
        // An evicted page is read again, with its content.
        assert_eq!(key_of(&mut c, 10), 10);
        assert_eq!(c.stats().misses, 10);
        assert!(c.within_bound());
    }

    #[test]
    fn pinned_pages_stay_until_homed() {
        let mut c = cache(6);
        // Dirty pages (changed, created) and a replayed one.
        c.page_mut(10, LEAF).unwrap();
        c.page_mut(11, LEAF).unwrap();
        c.install_new(200, leaf(200, 1));
        c.install_replayed(201, leaf(201, 2));
        let pinned = [10, 11, 200, 201];
        let sweep = |c: &mut PageCache<MemDev>, from: u64| {
            for b in from..from + 30 {
                c.page(b, LEAF).unwrap();
                assert!(c.within_bound(), "{:?}", c.stats());
                for p in pinned {
                    assert!(c.cached(p), "pinned page {p} evicted");
                }
            }
        };
        sweep(&mut c, 20);
        assert_eq!(c.stats().pinned, 4);
        assert!(c.stats().evictions > 0);
        // Committed (no longer dirty) but not yet home: still pinned.
        let images = c.seal_dirty();
        assert_eq!(images.len(), 3);
        sweep(&mut c, 60);
        assert_eq!(c.stats().pinned, 4);
        // Pinned pages alone over the budget: the cache goes over it and
        // keeps the floor of clean pages.
        c.set_budget(2 * PAGE);
        let over = c.stats().over_budget;
        sweep(&mut c, 100);
        assert!(c.stats().over_budget > over);
        assert_eq!(c.stats().pages, 4 + MIN_CLEAN_PAGES as u64);
        // A checkpoint writes 10 home: it becomes clean and evictable, and
        // reads back as what went home. 11 went home with other bytes (a
        // newer change is not home yet): it stays pinned.
        c.set_budget(6 * PAGE);
        let (h, img) = &images[0];
        assert_eq!(*h, 10);
        c.dev.write_at(10 * BLOCK, &img[..]).unwrap();
        c.note_written_home(10, img);
        c.note_written_home(11, &leaf(11, 99));
        assert_eq!(c.stats().pinned, 3);
        for b in 140..150 {
            c.page(b, LEAF).unwrap();
        }
        assert!(!c.cached(10));
        assert!(c.cached(11) && c.cached(200) && c.cached(201));
        assert_eq!(c.page(10, LEAF).unwrap()[..], img[..]);
    }

    #[test]
    fn an_evicted_page_is_validated_again() {
        let mut c = cache(4);
        assert_eq!(key_of(&mut c, 10), 10);
        // Damage at home does not touch the cached page...
        c.dev.write_at(10 * BLOCK + 100, &[0xff; 8]).unwrap();
        assert_eq!(key_of(&mut c, 10), 10);
        for b in 20..30 {
            c.page(b, LEAF).unwrap();
        }
        // ...but once evicted, the damaged home copy is refused, every time.
        assert!(!c.cached(10));
        assert!(matches!(c.page(10, LEAF), Err(Error::Corrupt { .. })));
        assert!(matches!(c.page(10, LEAF), Err(Error::Corrupt { .. })));
        assert!(!c.cached(10));
        // An evicted page is checked for its role again, too.
        assert!(!c.cached(20));
        let internal = Role::Node { tree: T, level: 1 };
        assert!(matches!(
            c.page(20, internal),
            Err(Error::CorruptTree { .. })
        ));
    }

    fn miss_of(c: &PageCache<MemDev>, b: u64) -> PageMiss {
        match c.cached_page(b, LEAF) {
            Err(Error::NotCached(m)) => m,
            other => panic!("page {b}: expected a miss, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_shared_miss_is_fetched_outside_and_offered_back() {
        let mut c = cache(8);
        let miss = miss_of(&c, 10);
        assert_eq!(miss.block(), 10);
        let fetched = c.fetcher().fetch(miss);
        c.insert_fetched(fetched).unwrap();
        let p = c.cached_page(10, LEAF).unwrap();
        assert_eq!(node::key_at(&p[..], 0, node::entry_size(0, 8)), 10);
        let s = c.stats();
        assert_eq!((s.misses, s.locked_misses, s.hits), (1, 0, 1));
        // A page loaded meanwhile (here: changed) wins over the fetched copy.
        let miss = miss_of(&c, 11);
        let fetched = c.fetcher().fetch(miss);
        node::set_key(c.page_mut(11, LEAF).unwrap(), 0, node::entry_size(0, 8), 99);
        c.insert_fetched(fetched).unwrap();
        assert_eq!(key_of(&mut c, 11), 99);
    }

    /// The race the epoch exists for: a page is read for a shared lookup
    /// while another thread changes it, commits, checkpoints it home and
    /// it is evicted. The old bytes must not enter the cache. (The planted
    /// bug `fetch_ignores_epoch` fails this test.)
    #[test]
    fn a_fetch_that_raced_a_checkpoint_is_dropped() {
        let mut c = cache(6);
        let miss = miss_of(&c, 10);
        let stale = c.fetcher().fetch(miss);
        // Meanwhile: change, commit, checkpoint home, evict.
        node::set_key(c.page_mut(10, LEAF).unwrap(), 0, node::entry_size(0, 8), 77);
        let images = c.seal_dirty();
        c.note_home_writes_begin();
        c.dev.write_at(10 * BLOCK, &images[0].1[..]).unwrap();
        c.note_written_home(10, &images[0].1);
        for b in 20..40 {
            c.page(b, LEAF).unwrap();
        }
        assert!(!c.cached(10), "the test needs the page evicted");
        c.insert_fetched(stale).unwrap();
        assert_eq!(c.stats().stale_fetches, 1);
        assert!(!c.cached(10), "a stale fetch entered the cache");
        assert_eq!(key_of(&mut c, 10), 77);
    }

    /// The same for a freed page whose block is reused: a fetch that read
    /// the freed page must not bring it back.
    #[test]
    fn a_fetch_that_raced_a_free_is_dropped() {
        let mut c = cache(6);
        let stale = c.fetcher().fetch(miss_of(&c, 12));
        c.page_mut(12, LEAF).unwrap();
        c.discard(12);
        c.insert_fetched(stale).unwrap();
        assert!(!c.cached(12));
        assert_eq!(c.stats().stale_fetches, 1);
    }

    #[test]
    fn damage_found_by_a_fetch_is_the_lookups_error() {
        let mut c = cache(6);
        c.dev.write_at(13 * BLOCK + 100, &[0xff; 8]).unwrap();
        let fetched = c.fetcher().fetch(miss_of(&c, 13));
        assert!(matches!(
            c.insert_fetched(fetched),
            Err(Error::Corrupt { .. })
        ));
        assert!(!c.cached(13));
    }

    #[test]
    fn pages_loaded_unevicted_stay_until_trimmed() {
        let mut c = cache(0);
        for b in 50..60 {
            c.load_unevicted(miss_of(&c, b)).unwrap();
        }
        assert_eq!(c.stats().pages, 10);
        assert_eq!(c.stats().locked_misses, 10);
        c.trim();
        assert_eq!(c.stats().pages, MIN_CLEAN_PAGES as u64);
        assert!(c.within_bound());
    }
}
