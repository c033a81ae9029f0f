//! `PageCache`: every metadata page loaded or created, and which of them
//! the open transaction changed. All page access goes through it.
//!
//! What the cache knows of each page:
//! - *dirty*: changed by the open transaction; the next commit seals it and
//!   takes its image (`seal_dirty`, in block order);
//! - *homed*: its bytes equal its home block. A page read from home is
//!   homed; one changed, created, or replayed from the journal is not,
//!   until a checkpoint writes those very bytes home
//!   (`note_written_home`).
//!
//! The cache is unbounded: a page that is not homed may exist only here
//! and in the journal. Only a clean, homed page could be dropped and read
//! again, which is what a byte budget with eviction would build on.

use super::types::Tree;
use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::{self, Page, BLOCK};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

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
}

pub(super) struct PageCache<D: BlockDev> {
    dev: Arc<D>,
    read_only: bool,
    pages: HashMap<u64, CachedPage>,
    /// Pages changed by the open transaction, always cached. Ordered, so
    /// journal images are written in a deterministic order and simulator
    /// seeds replay.
    dirty: BTreeSet<u64>,
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

impl<D: BlockDev> PageCache<D> {
    pub(super) fn new(dev: Arc<D>, read_only: bool) -> Self {
        PageCache {
            dev,
            read_only,
            pages: HashMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// Read a block from its home, bypassing the cache.
    pub(super) fn read_home(&self, block: u64) -> Result<Box<Page>> {
        read_block(&*self.dev, block)
    }

    /// Load (if needed) and validate a page for `role`. Damage is reported
    /// as an error and the page is not used.
    fn load(&mut self, block: u64, role: Role) -> Result<&mut CachedPage> {
        if !self.pages.contains_key(&block) {
            let buf = self.read_home(block)?;
            let page = CachedPage {
                buf,
                checked: false,
                homed: true,
            };
            self.pages.insert(block, page);
        }
        let p = self.cached_mut(block);
        if !p.checked {
            if let Err(e) = validate(block, &p.buf, role) {
                // A page read from home is dropped so a later read retries;
                // one that is not homed (replayed) is the committed content
                // and stays.
                if p.homed {
                    self.pages.remove(&block);
                }
                return Err(e);
            }
            p.checked = true;
        }
        Ok(self.cached_mut(block))
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

    /// Mutable access to a page for the open transaction.
    pub(super) fn page_mut(&mut self, block: u64, role: Role) -> Result<&mut Page> {
        assert!(!self.read_only, "page {block} changed on a read-only open");
        // Load first: a page that fails to load must not be marked dirty,
        // or every later commit would look for it in vain.
        self.load(block, role)?;
        self.dirty.insert(block);
        let p = self.cached_mut(block);
        p.homed = false;
        Ok(&mut p.buf)
    }

    /// The current content of a block, cached or home, unvalidated and not
    /// cached: the checker's view, which must report damage, not refuse it.
    pub(super) fn peek(&self, block: u64) -> Result<Box<Page>> {
        match self.pages.get(&block) {
            Some(p) => Ok(p.buf.clone()),
            None => self.read_home(block),
        }
    }

    /// A page built in memory (a new tree page, the state page) joins the
    /// open transaction, replacing any cached content of the block.
    pub(super) fn install_new(&mut self, block: u64, buf: Box<Page>) {
        assert!(!self.read_only, "page {block} created on a read-only open");
        let page = CachedPage {
            buf,
            checked: true,
            homed: false,
        };
        self.pages.insert(block, page);
        self.dirty.insert(block);
    }

    /// A committed image replayed from the journal at open: newer than the
    /// home block and not yet validated for its role.
    pub(super) fn install_replayed(&mut self, block: u64, buf: Box<Page>) {
        let page = CachedPage {
            buf,
            checked: false,
            homed: false,
        };
        self.pages.insert(block, page);
    }

    /// Forget a freed page, and its change in the open transaction: the
    /// journal revokes the block instead.
    pub(super) fn discard(&mut self, block: u64) {
        self.pages.remove(&block);
        self.dirty.remove(&block);
    }

    pub(super) fn dirty_count(&self) -> usize {
        self.dirty.len()
    }

    pub(super) fn is_dirty(&self, block: u64) -> bool {
        self.dirty.contains(&block)
    }

    /// Close the open transaction's changes: seal every dirty page (block
    /// order) and return immutable images of them. No page is dirty after.
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
        }
    }

    /// A checkpoint wrote `img` to `block`'s home: the cached page is homed
    /// if it is clean and has exactly those bytes (a newer change, committed
    /// or not, keeps it unhomed).
    pub(super) fn note_written_home(&mut self, block: u64, img: &Page) {
        let clean = !self.dirty.contains(&block);
        if let Some(p) = self.pages.get_mut(&block) {
            if clean && p.buf[..] == img[..] {
                p.homed = true;
            }
        }
    }
}
