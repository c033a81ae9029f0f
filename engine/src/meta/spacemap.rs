//! The space map: a bitmap of 4 KiB blocks (1 = in use), loaded lazily page
//! by page. Data chunks are aligned runs of `bpc` blocks that must be wholly
//! free; tree pages are single blocks taken from a separate cursor so they
//! cluster near the start of the allocation area.
//!
//! Freed blocks are *quarantined* until the transaction that freed them is
//! durable (`end_commit`): the bitmap page already says "free" (it is
//! journalled with the frees), but the allocator skips them, because until
//! the commit a crash would bring back mappings that still point at them.

use super::imp::{Meta, Role};
use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::{bitmap, Layout, BITS_PER_PAGE};
use std::collections::{HashMap, HashSet};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Freed {
    Chunk(u64),
    Block(u64),
}

pub(super) struct SpaceState {
    q_chunks: HashSet<u64>,
    q_blocks: HashSet<u64>,
    /// Quarantined single blocks per chunk: such a chunk is not wholly free.
    q_blocks_in_chunk: HashMap<u64, u32>,
    /// Blocks in quarantine (a chunk counts `bpc`).
    q_count: u64,
    bpc: u64,
    /// Frees made by the open transaction.
    pub(super) open_freed: Vec<Freed>,
    /// Tree pages freed by the open transaction (journal revoke records).
    pub(super) open_revoked: Vec<u64>,
    /// A full scan found no free chunk; nothing was released since. Keeps a
    /// full device from rescanning the whole bitmap on every failing write.
    no_free_chunk: bool,
    /// Data chunks reserved and not yet claimed or released.
    reserved: HashSet<u64>,
    /// Planted bug `alloc_early`: reservations already allocated.
    #[cfg(snapmv_planted_bug = "alloc_early")]
    claimed_early: HashSet<u64>,
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

impl SpaceState {
    pub(super) fn new(l: &Layout) -> Self {
        SpaceState {
            q_chunks: HashSet::new(),
            q_blocks: HashSet::new(),
            q_blocks_in_chunk: HashMap::new(),
            q_count: 0,
            bpc: l.bpc,
            open_freed: Vec::new(),
            open_revoked: Vec::new(),
            no_free_chunk: false,
            reserved: HashSet::new(),
            #[cfg(snapmv_planted_bug = "alloc_early")]
            claimed_early: HashSet::new(),
        }
    }

    pub(super) fn reserved_chunks(&self) -> u64 {
        self.reserved.len() as u64
    }

    fn quarantine(&mut self, f: Freed) {
        if cfg!(snapmv_planted_bug = "early_reuse") {
            // PLANTED BUG (simulator self-test): freed space is reusable at
            // once, before the freeing transaction is durable.
            self.no_free_chunk = false;
            return;
        }
        match f {
            Freed::Chunk(c) => {
                if self.q_chunks.insert(c) {
                    self.q_count += self.bpc;
                }
            }
            Freed::Block(b) => {
                if self.q_blocks.insert(b) {
                    self.q_count += 1;
                    *self.q_blocks_in_chunk.entry(b / self.bpc).or_insert(0) += 1;
                }
            }
        }
    }

    /// The freeing transaction is durable: the space may be reused.
    pub(super) fn release(&mut self, freed: &[Freed]) {
        for f in freed {
            match *f {
                Freed::Chunk(c) => {
                    if self.q_chunks.remove(&c) {
                        self.q_count -= self.bpc;
                    }
                }
                Freed::Block(b) => {
                    if self.q_blocks.remove(&b) {
                        self.q_count -= 1;
                        let c = b / self.bpc;
                        if let Some(n) = self.q_blocks_in_chunk.get_mut(&c) {
                            *n -= 1;
                            if *n == 0 {
                                self.q_blocks_in_chunk.remove(&c);
                            }
                        }
                    }
                }
            }
        }
        if !freed.is_empty() {
            self.no_free_chunk = false;
        }
    }

    fn block_usable(&self, b: u64) -> bool {
        let c = b / self.bpc;
        !self.q_blocks.contains(&b) && !self.q_chunks.contains(&c) && !self.reserved.contains(&c)
    }

    fn chunk_usable(&self, c: u64) -> bool {
        !self.q_chunks.contains(&c)
            && !self.q_blocks_in_chunk.contains_key(&c)
            && !self.reserved.contains(&c)
    }

    pub(super) fn quarantined_blocks(&self) -> u64 {
        self.q_count
    }
}

/// Mask of `n` bits starting at bit `shift` (n in 1..=64, shift + n <= 64).
fn mask(shift: u64, n: u64) -> u64 {
    assert!(n >= 1 && shift + n <= 64);
    let ones = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
    ones << shift
}

impl<D: BlockDev> Meta<D> {
    /// Bitmap page block and word index of the word holding `block`'s bit.
    fn bm_pos(&self, block: u64) -> (u64, usize) {
        let page = block / BITS_PER_PAGE;
        let word = (block % BITS_PER_PAGE) / 64;
        (self.layout.bitmap_start + page, word as usize)
    }

    /// The 64 bits for blocks `wb..wb+64` (`wb` a multiple of 64).
    pub(super) fn bm_word(&mut self, wb: u64) -> Result<u64> {
        assert_eq!(wb % 64, 0);
        let (pb, w) = self.bm_pos(wb);
        Ok(bitmap::word(&self.page(pb, Role::Bitmap)?.buf, w))
    }

    /// Repair: store `v` as the bits of blocks `wb..wb+64`, if they differ.
    /// Returns whether they did.
    pub(super) fn repair_bitmap_word(&mut self, wb: u64, v: u64) -> Result<bool> {
        self.writable()?;
        if self.bm_word(wb)? == v {
            return Ok(false);
        }
        self.bm_set_word(wb, v)?;
        Ok(true)
    }

    fn bm_set_word(&mut self, wb: u64, v: u64) -> Result<()> {
        let (pb, w) = self.bm_pos(wb);
        bitmap::set_word(self.page_mut(pb, Role::Bitmap)?, w, v);
        Ok(())
    }

    /// Update the bits of `n` blocks from `b`, which lie within one page
    /// (one block, or one aligned chunk).
    fn bm_update(&mut self, b: u64, n: u64, set: bool) -> Result<()> {
        let mut at = b;
        while at < b + n {
            let wb = at & !63;
            let k = (b + n - at).min(64 - (at - wb));
            let m = mask(at - wb, k);
            let w = self.bm_word(wb)?;
            self.bm_set_word(wb, if set { w | m } else { w & !m })?;
            at += k;
        }
        Ok(())
    }

    /// (all set, any set) over the bits of chunk `c`.
    pub(super) fn chunk_bits(&mut self, c: u64) -> Result<(bool, bool)> {
        let bpc = self.layout.bpc;
        let b = c * bpc;
        let (mut all, mut any) = (true, false);
        let mut at = b;
        while at < b + bpc {
            let wb = at & !63;
            let k = (b + bpc - at).min(64);
            let m = mask(at - wb, k);
            let w = self.bm_word(wb)? & m;
            all &= w == m;
            any |= w != 0;
            at += k;
        }
        Ok((all, any))
    }

    fn corrupt_map(&self, block: u64, reason: String) -> Error {
        Error::Corrupt {
            block,
            kind: "space map",
            reason,
        }
    }

    /// Blocks free now, not in quarantine and not reserved.
    pub(super) fn available_blocks(&self) -> u64 {
        self.st
            .free_blocks
            .saturating_sub(self.sm.quarantined_blocks())
            .saturating_sub(self.sm.reserved_chunks() * self.layout.bpc)
    }

    /// First usable free block at or after `start`, wrapping once.
    fn find_free_block(&mut self, start: u64) -> Result<Option<u64>> {
        let (lo, hi) = (self.layout.alloc_start, self.layout.area_end);
        let start = if (lo..hi).contains(&start) { start } else { lo };
        for (from, to) in [(start, hi), (lo, start)] {
            let mut wb = from & !63;
            while wb < to {
                let mut w = self.bm_word(wb)?;
                if wb < from {
                    w |= mask(0, from - wb);
                }
                if to - wb < 64 {
                    w |= !mask(0, to - wb);
                }
                while w != u64::MAX {
                    let bit = u64::from((!w).trailing_zeros());
                    if self.sm.block_usable(wb + bit) {
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
    fn find_free_chunk(&mut self, start: u64) -> Result<Option<u64>> {
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
                    let w = self.bm_word(wb)?;
                    let word_end = ((wb + 64) / bpc).min(to);
                    if w == u64::MAX {
                        c = word_end;
                        continue;
                    }
                    while c < word_end {
                        let m = mask(c * bpc - wb, bpc);
                        if w & m == 0 && self.sm.chunk_usable(c) {
                            return Ok(Some(c));
                        }
                        c += 1;
                    }
                } else {
                    let (_, any) = self.chunk_bits(c)?;
                    if !any && self.sm.chunk_usable(c) {
                        return Ok(Some(c));
                    }
                    c += 1;
                }
            }
        }
        Ok(None)
    }

    /// Set a wholly free data chunk aside. Changes nothing that a commit
    /// writes: the cursor moves in memory only (it is a hint).
    pub(super) fn sm_reserve_chunk(&mut self) -> Result<Reserved> {
        self.writable()?;
        let bpc = self.layout.bpc;
        if self.sm.no_free_chunk || self.available_blocks() < bpc + self.layout.reserve_blocks {
            return Err(Error::NoSpace);
        }
        let Some(c) = self.find_free_chunk(self.st.data_cursor)? else {
            self.sm.no_free_chunk = true;
            return Err(Error::NoSpace);
        };
        assert!(
            self.layout.chunk_in_area(c),
            "reserved chunk {c} outside the area"
        );
        assert!(self.sm.reserved.insert(c), "chunk {c} reserved twice");
        self.st.data_cursor = c + 1;
        #[cfg(snapmv_planted_bug = "alloc_early")]
        {
            self.mark_chunk_allocated(c)?;
            self.sm.claimed_early.insert(c);
        }
        Ok(Reserved(c))
    }

    /// Turn a reservation into an allocation in the open transaction. The
    /// caller maps the chunk in the same critical section.
    pub(super) fn sm_claim_chunk(&mut self, r: Reserved) -> Result<u64> {
        let c = r.0;
        assert!(
            self.sm.reserved.remove(&c),
            "claim of chunk {c}, which is not reserved"
        );
        // Planted bug (simulator self-test): the allocation joins the open
        // transaction at reservation time, as before reservations existed.
        #[cfg(snapmv_planted_bug = "alloc_early")]
        if self.sm.claimed_early.remove(&c) {
            return Ok(c);
        }
        self.mark_chunk_allocated(c)?;
        Ok(c)
    }

    /// Give a reservation back (its operation failed before mapping).
    pub(super) fn sm_release_chunk(&mut self, r: Reserved) -> Result<()> {
        assert!(
            self.sm.reserved.remove(&r.0),
            "release of chunk {}, which is not reserved",
            r.0
        );
        self.sm.no_free_chunk = false;
        #[cfg(snapmv_planted_bug = "alloc_early")]
        if self.sm.claimed_early.remove(&r.0) {
            return self.sm_free_chunk(r.0);
        }
        Ok(())
    }

    fn mark_chunk_allocated(&mut self, c: u64) -> Result<()> {
        let bpc = self.layout.bpc;
        // Reserved chunks are skipped by both allocators, so its bits are
        // still clear; anything else is a broken allocator invariant.
        let (_, any) = self.chunk_bits(c)?;
        assert!(!any, "claimed chunk {c} is no longer free in the space map");
        self.bm_update(c * bpc, bpc, true)?;
        self.st.data_chunks += 1;
        self.st.free_blocks -= bpc;
        self.state_dirty = true;
        Ok(())
    }

    pub(super) fn sm_free_chunk(&mut self, c: u64) -> Result<()> {
        self.writable()?;
        if !self.layout.chunk_in_area(c) {
            return Err(Error::Invalid(format!(
                "free of chunk {c} outside the allocation area (chunks {}..{})",
                self.layout.first_chunk, self.layout.device_chunks
            )));
        }
        let bpc = self.layout.bpc;
        let (all, _) = self.chunk_bits(c)?;
        if !all {
            return Err(self.corrupt_map(
                c * bpc,
                format!("free of data chunk {c}, which is not allocated"),
            ));
        }
        let Some(n) = self.st.data_chunks.checked_sub(1) else {
            return Err(self.corrupt_map(c * bpc, "data chunk counter underflow".into()));
        };
        self.bm_update(c * bpc, bpc, false)?;
        self.st.data_chunks = n;
        self.st.free_blocks += bpc;
        self.state_dirty = true;
        self.sm.quarantine(Freed::Chunk(c));
        self.sm.open_freed.push(Freed::Chunk(c));
        Ok(())
    }

    /// Allocate one block for a tree page. May use the reserve.
    pub(super) fn alloc_meta_block(&mut self) -> Result<u64> {
        if self.available_blocks() == 0 {
            return Err(Error::NoSpace);
        }
        let b = self
            .find_free_block(self.st.meta_cursor)?
            .ok_or(Error::NoSpace)?;
        let c = b / self.layout.bpc;
        let (_, chunk_had_meta) = self.chunk_bits(c)?;
        self.bm_update(b, 1, true)?;
        self.st.meta_blocks += 1;
        self.st.free_blocks -= 1;
        if !chunk_had_meta {
            self.st.meta_chunks += 1;
        }
        self.st.meta_cursor = b + 1;
        self.state_dirty = true;
        Ok(b)
    }

    /// Free a tree page. Its old images in the journal are revoked so replay
    /// never writes them over whatever the block holds next.
    pub(super) fn free_meta_block(&mut self, b: u64) -> Result<()> {
        if !self.layout.in_area(b) {
            return Err(self.corrupt_map(b, "free of a tree page outside the area".into()));
        }
        let (wb, bit) = (b & !63, b % 64);
        if self.bm_word(wb)? & (1 << bit) == 0 {
            return Err(self.corrupt_map(b, "free of a tree page that is not allocated".into()));
        }
        let Some(n) = self.st.meta_blocks.checked_sub(1) else {
            return Err(self.corrupt_map(b, "tree page counter underflow".into()));
        };
        self.bm_update(b, 1, false)?;
        self.st.meta_blocks = n;
        self.st.free_blocks += 1;
        let (_, any) = self.chunk_bits(b / self.layout.bpc)?;
        if !any {
            self.st.meta_chunks = self.st.meta_chunks.saturating_sub(1);
        }
        self.state_dirty = true;
        self.cache.remove(&b);
        self.dirty.remove(&b);
        self.sm.quarantine(Freed::Block(b));
        self.sm.open_freed.push(Freed::Block(b));
        self.sm.open_revoked.push(b);
        Ok(())
    }
}
