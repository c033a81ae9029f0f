//! `SpaceMap`: which 4 KiB blocks are in use, the allocators, and the
//! state page's counters and cursors. The bitmap (1 = in use) lives in
//! bitmap pages that the space map reaches only through the `PageCache`
//! passed to each call. Data chunks are aligned runs of `bpc` blocks that
//! must be wholly free; tree pages are single blocks taken from a separate
//! cursor so they cluster near the start of the allocation area.
//!
//! Freed blocks are *quarantined* until the transaction that freed them is
//! durable (`end_commit`): the bitmap page already says "free" (it is
//! journalled with the frees), but the allocators skip them, because until
//! the commit a crash would bring back mappings that still point at them.
//! The journal takes the open transaction's frees with `take_open_frees`
//! and hands them back to `release_quarantine` once they are durable.
//!
//! A data chunk is first *reserved* (`reserve_chunk`): set aside in memory
//! only, skipped by both allocators and counted as used by the space test,
//! while no page changes, so no commit can carry it. The store fills the
//! chunk with no lock held, then `claim_chunk` allocates it (bitmap bits,
//! counters) in the same critical section as the insert that maps it, or
//! `release_chunk` gives it back with nothing to undo on disk.

use super::page_cache::{PageCache, Role};
use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::{bitmap, Layout, StateRec, BITS_PER_PAGE};
use crate::planted::{self, Bug};
use std::collections::{HashMap, HashSet};

/// Space freed by a transaction: a data chunk or a tree page's block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Freed {
    Chunk(u64),
    Block(u64),
}

/// The space counters kept in the state page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SpaceCounters {
    /// Data chunks allocated.
    pub(super) data_chunks: u64,
    /// Blocks holding tree pages.
    pub(super) meta_blocks: u64,
    /// Clear bits in the allocation area.
    pub(super) free_blocks: u64,
    /// Chunks of the allocation area holding at least one tree page.
    pub(super) meta_chunks: u64,
}

/// A data chunk set aside for one operation, not yet allocated in the space
/// map (see the module docs). Neither `Clone` nor `Copy`: each reservation
/// is claimed or released exactly once.
#[must_use = "a reservation must be claimed (with its mapping) or released"]
#[derive(Debug, PartialEq, Eq)]
pub struct Reserved(u64);

impl Reserved {
    /// The chunk's number (where the operation may write its data).
    pub fn chunk(&self) -> u64 {
        self.0
    }
}

/// Space freed by transactions that are not durable yet.
struct Quarantine {
    bpc: u64,
    chunks: HashSet<u64>,
    blocks: HashSet<u64>,
    /// Quarantined single blocks per chunk: such a chunk is not wholly free.
    blocks_in_chunk: HashMap<u64, u32>,
    /// Blocks in quarantine (a chunk counts `bpc`).
    count: u64,
}

impl Quarantine {
    fn new(bpc: u64) -> Self {
        Quarantine {
            bpc,
            chunks: HashSet::new(),
            blocks: HashSet::new(),
            blocks_in_chunk: HashMap::new(),
            count: 0,
        }
    }

    fn add(&mut self, f: Freed) {
        match f {
            Freed::Chunk(c) => {
                if self.chunks.insert(c) {
                    self.count += self.bpc;
                }
            }
            Freed::Block(b) => {
                if self.blocks.insert(b) {
                    self.count += 1;
                    *self.blocks_in_chunk.entry(b / self.bpc).or_insert(0) += 1;
                }
            }
        }
    }

    fn remove(&mut self, f: Freed) {
        match f {
            Freed::Chunk(c) => {
                if self.chunks.remove(&c) {
                    self.count -= self.bpc;
                }
            }
            Freed::Block(b) => {
                if self.blocks.remove(&b) {
                    self.count -= 1;
                    let c = b / self.bpc;
                    if let Some(n) = self.blocks_in_chunk.get_mut(&c) {
                        *n -= 1;
                        if *n == 0 {
                            self.blocks_in_chunk.remove(&c);
                        }
                    }
                }
            }
        }
    }

    /// Whether block `b` (alone, or as part of its chunk) is quarantined.
    fn holds_block(&self, b: u64) -> bool {
        self.blocks.contains(&b) || self.chunks.contains(&(b / self.bpc))
    }

    /// Whether any block of chunk `c` is quarantined.
    fn holds_any_of_chunk(&self, c: u64) -> bool {
        self.chunks.contains(&c) || self.blocks_in_chunk.contains_key(&c)
    }
}

pub(super) struct SpaceMap {
    layout: Layout,
    counters: SpaceCounters,
    /// Where the next searches start: hints, kept in the state page.
    data_cursor: u64,
    meta_cursor: u64,
    /// Counters changed since the state page was last encoded. A cursor
    /// moved by a reservation alone does not count: it is a hint, and a
    /// reservation changes nothing a commit writes.
    state_changed: bool,
    quarantine: Quarantine,
    /// Frees made by the open transaction.
    open_freed: Vec<Freed>,
    /// Tree pages freed by the open transaction (journal revoke records).
    open_revoked: Vec<u64>,
    /// A full scan found no free chunk; nothing was released since. Keeps a
    /// full device from rescanning the whole bitmap on every failing write.
    no_free_chunk: bool,
    /// Data chunks reserved and not yet claimed or released.
    reserved: HashSet<u64>,
    /// Planted bug `alloc_early`: reservations already allocated.
    #[cfg(snapmv_planted)]
    claimed_early: HashSet<u64>,
}

/// Mask of `n` bits starting at bit `shift` (n in 1..=64, shift + n <= 64).
fn mask(shift: u64, n: u64) -> u64 {
    assert!(n >= 1 && shift + n <= 64);
    let ones = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
    ones << shift
}

fn corrupt_map(block: u64, reason: String) -> Error {
    Error::Corrupt {
        block,
        kind: "space map",
        reason,
    }
}

impl SpaceMap {
    /// The space map of a store whose state page holds `rec`.
    pub(super) fn new(layout: &Layout, rec: &StateRec) -> Self {
        SpaceMap {
            layout: *layout,
            counters: SpaceCounters {
                data_chunks: rec.data_chunks,
                meta_blocks: rec.meta_blocks,
                free_blocks: rec.free_blocks,
                meta_chunks: rec.meta_chunks,
            },
            data_cursor: rec.data_cursor,
            meta_cursor: rec.meta_cursor,
            state_changed: false,
            quarantine: Quarantine::new(layout.bpc),
            open_freed: Vec::new(),
            open_revoked: Vec::new(),
            no_free_chunk: false,
            reserved: HashSet::new(),
            #[cfg(snapmv_planted)]
            claimed_early: HashSet::new(),
        }
    }

    /// Write the counters and cursors into a state record being encoded.
    pub(super) fn fill_state(&self, rec: &mut StateRec) {
        let c = &self.counters;
        rec.data_chunks = c.data_chunks;
        rec.meta_blocks = c.meta_blocks;
        rec.free_blocks = c.free_blocks;
        rec.meta_chunks = c.meta_chunks;
        rec.data_cursor = self.data_cursor;
        rec.meta_cursor = self.meta_cursor;
    }

    pub(super) fn counters(&self) -> SpaceCounters {
        self.counters
    }

    /// Repair: replace the counters with those the trees imply.
    pub(super) fn set_counters(&mut self, c: SpaceCounters) {
        if self.counters != c {
            self.counters = c;
            self.state_changed = true;
        }
    }

    /// Whether the state page must be encoded again for the space map.
    pub(super) fn state_changed(&self) -> bool {
        self.state_changed
    }

    /// The state page was encoded with the current counters.
    pub(super) fn state_encoded(&mut self) {
        self.state_changed = false;
    }

    pub(super) fn reserved_chunks(&self) -> u64 {
        self.reserved.len() as u64
    }

    pub(super) fn quarantined_blocks(&self) -> u64 {
        self.quarantine.count
    }

    /// Blocks free now, not in quarantine and not reserved.
    pub(super) fn available_blocks(&self) -> u64 {
        self.counters
            .free_blocks
            .saturating_sub(self.quarantine.count)
            .saturating_sub(self.reserved_chunks() * self.layout.bpc)
    }

    fn block_usable(&self, b: u64) -> bool {
        !self.quarantine.holds_block(b) && !self.reserved.contains(&(b / self.layout.bpc))
    }

    fn chunk_usable(&self, c: u64) -> bool {
        !self.quarantine.holds_any_of_chunk(c) && !self.reserved.contains(&c)
    }
}

// ---- frees of the open transaction, and their quarantine ----

impl SpaceMap {
    fn quarantine(&mut self, f: Freed) {
        if planted::on(Bug::EarlyReuse) {
            // PLANTED BUG (simulator self-test): freed space is reusable at
            // once, before the freeing transaction is durable.
            self.no_free_chunk = false;
            return;
        }
        self.quarantine.add(f);
    }

    /// Whether the open transaction freed anything: its commit must carry
    /// the revokes, and end the frees' quarantine.
    pub(super) fn has_open_frees(&self) -> bool {
        !self.open_freed.is_empty() || !self.open_revoked.is_empty()
    }

    /// Tree pages freed by the open transaction: its revoke records.
    pub(super) fn open_revokes(&self) -> usize {
        self.open_revoked.len()
    }

    /// Close the open transaction's frees: (space freed, tree pages to
    /// revoke). The space stays quarantined until `release_quarantine`.
    pub(super) fn take_open_frees(&mut self) -> (Vec<Freed>, Vec<u64>) {
        (
            std::mem::take(&mut self.open_freed),
            std::mem::take(&mut self.open_revoked),
        )
    }

    /// A commit that took these frees failed: they rejoin the open
    /// transaction, ahead of anything freed since.
    pub(super) fn restore_open_frees(&mut self, freed: Vec<Freed>, revoked: Vec<u64>) {
        self.open_freed.splice(0..0, freed);
        self.open_revoked.splice(0..0, revoked);
    }

    /// The freeing transaction is durable: the space may be reused.
    pub(super) fn release_quarantine(&mut self, freed: &[Freed]) {
        for f in freed {
            self.quarantine.remove(*f);
        }
        if !freed.is_empty() {
            self.no_free_chunk = false;
        }
    }
}

// ---- the bitmap ----

impl SpaceMap {
    /// Bitmap page block and word index of the word holding `block`'s bit.
    fn word_pos(&self, block: u64) -> (u64, usize) {
        let page = block / BITS_PER_PAGE;
        let word = (block % BITS_PER_PAGE) / 64;
        (self.layout.bitmap_start + page, word as usize)
    }

    /// The 64 bits for blocks `wb..wb+64` (`wb` a multiple of 64).
    pub(super) fn word<D: BlockDev>(&self, cache: &mut PageCache<D>, wb: u64) -> Result<u64> {
        assert_eq!(wb % 64, 0);
        let (pb, w) = self.word_pos(wb);
        Ok(bitmap::word(cache.page(pb, Role::Bitmap)?, w))
    }

    fn set_word<D: BlockDev>(&self, cache: &mut PageCache<D>, wb: u64, v: u64) -> Result<()> {
        let (pb, w) = self.word_pos(wb);
        bitmap::set_word(cache.page_mut(pb, Role::Bitmap)?, w, v);
        Ok(())
    }

    /// Repair: store `v` as the bits of blocks `wb..wb+64`, if they differ.
    /// Returns whether they did.
    pub(super) fn repair_word<D: BlockDev>(
        &self,
        cache: &mut PageCache<D>,
        wb: u64,
        v: u64,
    ) -> Result<bool> {
        if self.word(cache, wb)? == v {
            return Ok(false);
        }
        self.set_word(cache, wb, v)?;
        Ok(true)
    }

    /// Update the bits of `n` blocks from `b`, which lie within one page
    /// (one block, or one aligned chunk).
    fn update<D: BlockDev>(
        &self,
        cache: &mut PageCache<D>,
        b: u64,
        n: u64,
        set: bool,
    ) -> Result<()> {
        let mut at = b;
        while at < b + n {
            let wb = at & !63;
            let k = (b + n - at).min(64 - (at - wb));
            let m = mask(at - wb, k);
            let w = self.word(cache, wb)?;
            self.set_word(cache, wb, if set { w | m } else { w & !m })?;
            at += k;
        }
        Ok(())
    }

    /// (all set, any set) over the bits of chunk `c`.
    fn chunk_bits<D: BlockDev>(&self, cache: &mut PageCache<D>, c: u64) -> Result<(bool, bool)> {
        let bpc = self.layout.bpc;
        let b = c * bpc;
        let (mut all, mut any) = (true, false);
        let mut at = b;
        while at < b + bpc {
            let wb = at & !63;
            let k = (b + bpc - at).min(64);
            let m = mask(at - wb, k);
            let w = self.word(cache, wb)? & m;
            all &= w == m;
            any |= w != 0;
            at += k;
        }
        Ok((all, any))
    }
}

// ---- searches ----

impl SpaceMap {
    /// First usable free block at or after `start`, wrapping once.
    fn find_free_block<D: BlockDev>(
        &self,
        cache: &mut PageCache<D>,
        start: u64,
    ) -> Result<Option<u64>> {
        let (lo, hi) = (self.layout.alloc_start, self.layout.area_end);
        let start = if (lo..hi).contains(&start) { start } else { lo };
        for (from, to) in [(start, hi), (lo, start)] {
            let mut wb = from & !63;
            while wb < to {
                let mut w = self.word(cache, wb)?;
                if wb < from {
                    w |= mask(0, from - wb);
                }
                if to - wb < 64 {
                    w |= !mask(0, to - wb);
                }
                while w != u64::MAX {
                    let bit = u64::from((!w).trailing_zeros());
                    if self.block_usable(wb + bit) {
                        return Ok(Some(wb + bit));
                    }
                    w |= 1 << bit;
                }
                wb += 64;
            }
        }
        Ok(None)
    }

    /// First usable wholly-free chunk at or after `start`, wrapping once.
    fn find_free_chunk<D: BlockDev>(
        &self,
        cache: &mut PageCache<D>,
        start: u64,
    ) -> Result<Option<u64>> {
        let (lo, hi) = (self.layout.first_chunk, self.layout.device_chunks);
        let bpc = self.layout.bpc;
        let start = if (lo..hi).contains(&start) { start } else { lo };
        for (from, to) in [(start, hi), (lo, start)] {
            let mut c = from;
            while c < to {
                let b = c * bpc;
                if bpc < 64 {
                    // Several chunks per word: skip a full word at once.
                    let wb = b & !63;
                    let w = self.word(cache, wb)?;
                    let word_end = ((wb + 64) / bpc).min(to);
                    if w == u64::MAX {
                        c = word_end;
                        continue;
                    }
                    while c < word_end {
                        let m = mask(c * bpc - wb, bpc);
                        if w & m == 0 && self.chunk_usable(c) {
                            return Ok(Some(c));
                        }
                        c += 1;
                    }
                } else {
                    let (_, any) = self.chunk_bits(cache, c)?;
                    if !any && self.chunk_usable(c) {
                        return Ok(Some(c));
                    }
                    c += 1;
                }
            }
        }
        Ok(None)
    }
}

// ---- data chunks ----

impl SpaceMap {
    /// Set a wholly free data chunk aside. Changes nothing that a commit
    /// writes: the cursor moves in memory only (it is a hint).
    pub(super) fn reserve_chunk<D: BlockDev>(
        &mut self,
        cache: &mut PageCache<D>,
    ) -> Result<Reserved> {
        let bpc = self.layout.bpc;
        if self.no_free_chunk || self.available_blocks() < bpc + self.layout.reserve_blocks {
            return Err(Error::NoSpace);
        }
        let Some(c) = self.find_free_chunk(cache, self.data_cursor)? else {
            self.no_free_chunk = true;
            return Err(Error::NoSpace);
        };
        assert!(
            self.layout.chunk_in_area(c),
            "reserved chunk {c} outside the area"
        );
        assert!(self.reserved.insert(c), "chunk {c} reserved twice");
        self.data_cursor = c + 1;
        #[cfg(snapmv_planted)]
        if planted::on(Bug::AllocEarly) {
            self.mark_chunk_allocated(cache, c)?;
            self.claimed_early.insert(c);
        }
        Ok(Reserved(c))
    }

    /// Turn a reservation into an allocation in the open transaction. The
    /// caller maps the chunk in the same critical section.
    pub(super) fn claim_chunk<D: BlockDev>(
        &mut self,
        cache: &mut PageCache<D>,
        r: Reserved,
    ) -> Result<u64> {
        let c = r.0;
        assert!(
            self.reserved.remove(&c),
            "claim of chunk {c}, which is not reserved"
        );
        // Planted bug (simulator self-test): the allocation joins the open
        // transaction at reservation time, as before reservations existed.
        #[cfg(snapmv_planted)]
        if self.claimed_early.remove(&c) {
            return Ok(c);
        }
        self.mark_chunk_allocated(cache, c)?;
        Ok(c)
    }

    /// Give a reservation back (its operation failed before mapping).
    pub(super) fn release_chunk<D: BlockDev>(
        &mut self,
        cache: &mut PageCache<D>,
        r: Reserved,
    ) -> Result<()> {
        assert!(
            self.reserved.remove(&r.0),
            "release of chunk {}, which is not reserved",
            r.0
        );
        self.no_free_chunk = false;
        #[cfg(snapmv_planted)]
        if self.claimed_early.remove(&r.0) {
            return self.free_chunk(cache, r.0);
        }
        let _ = cache; // only the planted bug above frees through it
        Ok(())
    }

    fn mark_chunk_allocated<D: BlockDev>(
        &mut self,
        cache: &mut PageCache<D>,
        c: u64,
    ) -> Result<()> {
        let bpc = self.layout.bpc;
        // Reserved chunks are skipped by both allocators, so its bits are
        // still clear; anything else is a broken allocator invariant.
        let (_, any) = self.chunk_bits(cache, c)?;
        assert!(!any, "claimed chunk {c} is no longer free in the space map");
        self.update(cache, c * bpc, bpc, true)?;
        self.counters.data_chunks += 1;
        self.counters.free_blocks -= bpc;
        self.state_changed = true;
        Ok(())
    }

    /// Free an allocated data chunk in the open transaction.
    pub(super) fn free_chunk<D: BlockDev>(
        &mut self,
        cache: &mut PageCache<D>,
        c: u64,
    ) -> Result<()> {
        if !self.layout.chunk_in_area(c) {
            return Err(Error::Invalid(format!(
                "free of chunk {c} outside the allocation area (chunks {}..{})",
                self.layout.first_chunk, self.layout.device_chunks
            )));
        }
        let bpc = self.layout.bpc;
        let (all, _) = self.chunk_bits(cache, c)?;
        if !all {
            return Err(corrupt_map(
                c * bpc,
                format!("free of data chunk {c}, which is not allocated"),
            ));
        }
        let Some(n) = self.counters.data_chunks.checked_sub(1) else {
            return Err(corrupt_map(c * bpc, "data chunk counter underflow".into()));
        };
        self.update(cache, c * bpc, bpc, false)?;
        self.counters.data_chunks = n;
        self.counters.free_blocks += bpc;
        self.state_changed = true;
        self.quarantine(Freed::Chunk(c));
        self.open_freed.push(Freed::Chunk(c));
        Ok(())
    }
}

// ---- tree pages ----

impl SpaceMap {
    /// Allocate one block for a tree page. May use the reserve.
    pub(super) fn alloc_tree_block<D: BlockDev>(
        &mut self,
        cache: &mut PageCache<D>,
    ) -> Result<u64> {
        if self.available_blocks() == 0 {
            return Err(Error::NoSpace);
        }
        let b = self
            .find_free_block(cache, self.meta_cursor)?
            .ok_or(Error::NoSpace)?;
        let (_, chunk_had_meta) = self.chunk_bits(cache, b / self.layout.bpc)?;
        self.update(cache, b, 1, true)?;
        self.counters.meta_blocks += 1;
        self.counters.free_blocks -= 1;
        if !chunk_had_meta {
            self.counters.meta_chunks += 1;
        }
        self.meta_cursor = b + 1;
        self.state_changed = true;
        Ok(b)
    }

    /// Free a tree page's block. Its old images in the journal are revoked
    /// so replay never writes them over whatever the block holds next. The
    /// caller drops the page from the cache.
    pub(super) fn free_tree_block<D: BlockDev>(
        &mut self,
        cache: &mut PageCache<D>,
        b: u64,
    ) -> Result<()> {
        if !self.layout.in_area(b) {
            return Err(corrupt_map(
                b,
                "free of a tree page outside the area".into(),
            ));
        }
        let (wb, bit) = (b & !63, b % 64);
        if self.word(cache, wb)? & (1 << bit) == 0 {
            return Err(corrupt_map(
                b,
                "free of a tree page that is not allocated".into(),
            ));
        }
        let Some(n) = self.counters.meta_blocks.checked_sub(1) else {
            return Err(corrupt_map(b, "tree page counter underflow".into()));
        };
        self.update(cache, b, 1, false)?;
        self.counters.meta_blocks = n;
        self.counters.free_blocks += 1;
        let (_, any) = self.chunk_bits(cache, b / self.layout.bpc)?;
        if !any {
            self.counters.meta_chunks = self.counters.meta_chunks.saturating_sub(1);
        }
        self.state_changed = true;
        self.quarantine(Freed::Block(b));
        self.open_freed.push(Freed::Block(b));
        self.open_revoked.push(b);
        Ok(())
    }
}
