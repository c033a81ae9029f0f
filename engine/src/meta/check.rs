//! The checker (after thin-provisioning-tools' thin_check): open read-only
//! with the journal replayed in memory, walk every tree page, rebuild the
//! space map from what the trees reference, and compare it with the stored
//! bitmap and the state page's counters. Every damage becomes one human
//! readable line naming the tree, block and key range; nothing panics.

use super::meta::Meta;
use super::space_map::SpaceCounters;
use super::types::{Tree, ZERO_CHUNK};
use crate::dev::BlockDev;
use crate::error::Result;
use crate::format::{self, node, Layout, Page, BITMAP_WORDS, BITS_PER_PAGE};
use std::collections::HashSet;

#[derive(Debug, Default, Clone)]
pub struct CheckReport {
    /// Each damage found, with its block, tree and key range.
    pub errors: Vec<String>,
    pub pages_checked: u64,
    pub exceptions: u64,
    pub data_chunks_referenced: u64,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Lines kept per report; a wrecked device must not produce millions.
const MAX_ERRORS: usize = 1000;
/// Block ranges listed per leaked/missing message.
const MAX_RANGES: usize = 16;

/// Walk every metadata page read-only; verify checksums, types, block
/// numbers, key order and bounds; rebuild the space map from the trees and
/// compare it with the stored one.
pub fn check<D: BlockDev>(dev: D) -> Result<CheckReport> {
    let mut m = Meta::open_journal(dev, true)?;
    let mut c = Checker::new(*m.layout());
    if let Some(e) = m.take_journal_damage() {
        c.err(format!("journal: {e}"));
    }
    c.check_slots(&m);
    if let Err(e) = m.load_state() {
        c.err(format!("state page: {e}"));
        return Ok(c.finish());
    }
    c.walk_all(&m);
    Ok(c.finish())
}

pub(super) struct Checker {
    l: Layout,
    /// Errors other than the space map's bits and the state page's
    /// counters: damage that repair cannot fix safely.
    structural: Vec<String>,
    /// Expected bitmap, one bit per block over every bitmap page's range.
    expect: Vec<u64>,
    tree_pages: u64,
    meta_chunks: HashSet<u64>,
    doubles: Vec<String>,
    rep: CheckReport,
    suppressed: usize,
}

fn range_str(lo: u128, hi: Option<u128>) -> String {
    match hi {
        Some(h) => format!("{lo:#x}..{h:#x}"),
        None => format!("{lo:#x}..end"),
    }
}

/// Bits of blocks `wb..wb+64` outside the allocation area (always in use).
fn fixed_word(l: &Layout, wb: u64) -> u64 {
    let mut w = 0u64;
    let lo = l.alloc_start;
    if wb + 64 <= lo {
        w = u64::MAX;
    } else if wb < lo {
        w |= (1u64 << (lo - wb)) - 1;
    }
    if wb >= l.area_end {
        w = u64::MAX;
    } else if wb + 64 > l.area_end {
        w |= !((1u64 << (l.area_end - wb)) - 1);
    }
    w
}

fn area_word(l: &Layout, wb: u64) -> u64 {
    !fixed_word(l, wb)
}

/// Append runs of set bits of `w` (blocks from `wb`) to `runs`.
fn add_runs(runs: &mut Vec<(u64, u64)>, wb: u64, mut w: u64) {
    while w != 0 {
        let b = wb + u64::from(w.trailing_zeros());
        w &= w - 1;
        match runs.last_mut() {
            Some((s, n)) if *s + *n == b => *n += 1,
            _ => runs.push((b, 1)),
        }
    }
}

fn runs_str(runs: &[(u64, u64)]) -> String {
    let mut s: Vec<String> = runs
        .iter()
        .take(MAX_RANGES)
        .map(|&(b, n)| {
            if n == 1 {
                b.to_string()
            } else {
                format!("{b}..{}", b + n - 1)
            }
        })
        .collect();
    if runs.len() > MAX_RANGES {
        s.push(format!("and {} more ranges", runs.len() - MAX_RANGES));
    }
    s.join(", ")
}

impl Checker {
    pub(super) fn new(l: Layout) -> Self {
        let words = (l.bitmap_blocks * BITMAP_WORDS as u64) as usize;
        let expect = (0..words as u64).map(|i| fixed_word(&l, i * 64)).collect();
        Checker {
            l,
            structural: Vec::new(),
            expect,
            tree_pages: 0,
            meta_chunks: HashSet::new(),
            doubles: Vec::new(),
            rep: CheckReport::default(),
            suppressed: 0,
        }
    }

    /// Damage of the structure (pages, keys, pointers, double use).
    fn err(&mut self, s: String) {
        if self.structural.len() < MAX_ERRORS {
            self.structural.push(s.clone());
        }
        self.space_err(s);
    }

    /// A space map bit or a counter that disagrees with the trees: what
    /// `repair` rewrites.
    fn space_err(&mut self, s: String) {
        if self.rep.errors.len() < MAX_ERRORS {
            self.rep.errors.push(s);
        } else {
            self.suppressed += 1;
        }
    }

    /// Both superblock slots are written at format and alternate at each
    /// checkpoint, so each must be valid. Open falls back to the other one
    /// (a torn slot is a legal crash state, healed by the next checkpoint),
    /// but check reports it: a flipped newest slot would otherwise silently
    /// roll the store back.
    pub(super) fn check_slots<D: BlockDev>(&mut self, m: &Meta<D>) {
        for slot in 0..2u64 {
            let mut buf = format::new_page();
            match m.dev().read_at(slot * format::BLOCK, &mut buf[..]) {
                Ok(()) => {
                    if let Err(e) = format::decode_superblock(&buf[..], slot) {
                        self.err(format!(
                            "superblock slot {} (block {slot}): {e}",
                            ["A", "B"][slot as usize]
                        ));
                    }
                }
                Err(e) => self.err(format!("superblock slot block {slot}: unreadable: {e}")),
            }
        }
    }

    /// Walk every tree, then compare the space map and the counters.
    pub(super) fn walk_all<D: BlockDev>(&mut self, m: &Meta<D>) {
        let roots = m.roots();
        for t in Tree::ALL {
            let r = roots[t.index()];
            self.walk(m, t, r.block, r.height - 1, 0, None, true);
        }
        let free = self.compare_bitmap(m);
        self.compare_counters(&m.space_counters(), free);
    }

    pub(super) fn structural(&self) -> &[String] {
        &self.structural
    }

    /// The bitmap word the trees imply for blocks `wb..wb+64`.
    pub(super) fn implied_word(&self, wb: u64) -> u64 {
        self.expect
            .get((wb / 64) as usize)
            .copied()
            .unwrap_or(u64::MAX)
    }

    /// Free blocks of the allocation area the trees imply.
    pub(super) fn implied_free(&self) -> u64 {
        let words = self.l.bitmap_blocks * BITMAP_WORDS as u64;
        (0..words)
            .map(|i| {
                u64::from((!self.implied_word(i * 64) & area_word(&self.l, i * 64)).count_ones())
            })
            .sum()
    }

    /// (data chunks, tree pages, chunks holding tree pages) the trees imply.
    pub(super) fn implied_counters(&self) -> (u64, u64, u64) {
        (
            self.rep.data_chunks_referenced,
            self.tree_pages,
            self.meta_chunks.len() as u64,
        )
    }

    pub(super) fn finish(mut self) -> CheckReport {
        if !self.doubles.is_empty() {
            let n = self.doubles.len();
            let list = self
                .doubles
                .iter()
                .take(MAX_RANGES)
                .cloned()
                .collect::<Vec<_>>();
            self.err(format!(
                "space map: {n} block(s) used twice: {}{}",
                list.join("; "),
                if n > MAX_RANGES { "; ..." } else { "" }
            ));
        }
        if self.suppressed > 0 {
            let n = self.suppressed;
            self.rep.errors.push(format!("... and {n} more errors"));
        }
        self.rep
    }

    /// Mark `block` as expected in use; false if it already was.
    fn mark(&mut self, block: u64) -> bool {
        let (i, bit) = ((block / 64) as usize, block % 64);
        match self.expect.get_mut(i) {
            Some(w) if *w & (1 << bit) == 0 => {
                *w |= 1 << bit;
                true
            }
            _ => false,
        }
    }

    /// Check the subtree at `block`, whose keys must lie in [lo, hi).
    #[allow(clippy::too_many_arguments)]
    fn walk(
        &mut self,
        m: &Meta<impl BlockDev>,
        t: Tree,
        block: u64,
        level: u32,
        lo: u128,
        hi: Option<u128>,
        is_root: bool,
    ) {
        let at = format!("{}: block {block} (keys {})", t.name(), range_str(lo, hi));
        if !self.l.in_area(block) {
            return self.err(format!("{at}: pointer outside the allocation area"));
        }
        if !self.mark(block) {
            self.doubles
                .push(format!("block {block} as a {} page", t.name()));
            return self.err(format!(
                "{at}: page referenced twice or overlapping other space"
            ));
        }
        self.tree_pages += 1;
        self.meta_chunks.insert(block / self.l.bpc);
        self.rep.pages_checked += 1;
        let buf = match m.peek_page(block) {
            Ok(b) => b,
            Err(e) => return self.err(format!("{at}: unreadable: {e}")),
        };
        let info = match format::decode_node(&buf[..], block) {
            Ok(i) => i,
            Err(e) => return self.err(format!("{at}: {e}")),
        };
        let want_vs = if level == 0 { t.value_size() } else { 8 };
        if info.tree != t.node_id() || info.level != level || info.value_size != want_vs {
            return self.err(format!(
                "{at}: node of tree {} at level {} with {}-byte values, expected level {level}",
                info.tree, info.level, info.value_size
            ));
        }
        if info.count == 0 && !(is_root && level == 0) {
            self.err(format!("{at}: empty node"));
        }
        let esz = info.entry_size();
        let keys: Vec<u128> = (0..info.count)
            .map(|i| node::key_at(&buf[..], i, esz))
            .collect();
        if let Some(k) = keys.iter().find(|&&k| k < lo || hi.is_some_and(|h| k >= h)) {
            self.err(format!(
                "{at}: key {k:#x} outside the range its parent gives"
            ));
        }
        if level == 0 {
            if t == Tree::Exceptions {
                self.leaf_exceptions(&at, &buf, &keys, esz);
            }
            return;
        }
        for (i, &k) in keys.iter().enumerate() {
            let child = node::child_at(&buf[..], i);
            let chi = keys.get(i + 1).copied().or(hi);
            self.walk(m, t, child, level - 1, k.max(lo), chi, false);
        }
    }

    fn leaf_exceptions(&mut self, at: &str, buf: &Page, keys: &[u128], esz: usize) {
        for (i, &k) in keys.iter().enumerate() {
            self.rep.exceptions += 1;
            let v = format::rd_u64(node::value_at(buf, i, esz), 0);
            if v == ZERO_CHUNK {
                continue;
            }
            if !self.l.chunk_in_area(v) {
                self.err(format!(
                    "{at}: key {k:#x} maps to chunk {v}, outside the allocation area ({}..{})",
                    self.l.first_chunk, self.l.device_chunks
                ));
                continue;
            }
            self.rep.data_chunks_referenced += 1;
            let b = v * self.l.bpc;
            let clash = (b..b + self.l.bpc).filter(|&x| !self.mark(x)).count();
            if clash > 0 {
                self.doubles.push(format!(
                    "data chunk {v} (key {k:#x}) overlaps {clash} used block(s)"
                ));
            }
        }
    }

    /// Compare the stored bitmap with the expected one. Returns the number
    /// of free blocks in the area if every bitmap page was readable.
    fn compare_bitmap(&mut self, m: &Meta<impl BlockDev>) -> Option<u64> {
        let mut leaked = Vec::new();
        let mut missing = Vec::new();
        let mut free = Some(0u64);
        for p in 0..self.l.bitmap_blocks {
            let block = self.l.bitmap_start + p;
            let first = p * BITS_PER_PAGE;
            let page = match m
                .peek_page(block)
                .and_then(|b| format::decode_bitmap(&b[..], block).map(|_| b))
            {
                Ok(b) => b,
                Err(e) => {
                    free = None;
                    self.err(format!(
                        "space map: bitmap block {block} (blocks {first}..{}): {e}",
                        first + BITS_PER_PAGE - 1
                    ));
                    continue;
                }
            };
            for i in 0..BITMAP_WORDS {
                let wb = first + i as u64 * 64;
                let stored = format::bitmap::word(&page, i);
                let want = self
                    .expect
                    .get((wb / 64) as usize)
                    .copied()
                    .unwrap_or(u64::MAX);
                add_runs(&mut leaked, wb, stored & !want);
                add_runs(&mut missing, wb, want & !stored);
                free = free.map(|f| f + u64::from((!stored & area_word(&self.l, wb)).count_ones()));
            }
        }
        let count = |r: &[(u64, u64)]| r.iter().map(|x| x.1).sum::<u64>();
        if !leaked.is_empty() {
            self.space_err(format!(
                "space map: {} block(s) marked in use but referenced by nothing (leaked): {}",
                count(&leaked),
                runs_str(&leaked)
            ));
        }
        if !missing.is_empty() {
            self.space_err(format!(
                "space map: {} block(s) in use by the trees but marked free: {}",
                count(&missing),
                runs_str(&missing)
            ));
        }
        free
    }

    fn compare_counters(&mut self, stored: &SpaceCounters, free: Option<u64>) {
        let mut checks = vec![
            (
                "data chunks",
                stored.data_chunks,
                self.rep.data_chunks_referenced,
            ),
            ("tree pages", stored.meta_blocks, self.tree_pages),
            (
                "chunks holding tree pages",
                stored.meta_chunks,
                self.meta_chunks.len() as u64,
            ),
        ];
        if let Some(f) = free {
            checks.push(("free blocks", stored.free_blocks, f));
        }
        for (what, recorded, found) in checks {
            if recorded != found {
                self.space_err(format!(
                    "state page: counter of {what} says {recorded}, metadata has {found}"
                ));
            }
        }
    }
}
