//! The checker (after thin-provisioning-tools' thin_check): open read-only
//! with the journal replayed in memory, walk every tree page, rebuild the
//! space map from what the trees reference, and compare it with the stored
//! bitmap and the state page's counters. Each tree is walked level by
//! level, each level's pages in block order and read in long runs
//! (`BulkReader`), so the walk goes forward across the device in memory
//! that grows with the tree's pages, not its keys. Every damage becomes a
//! `Damage`: the tree, the path of blocks from its root, the key range and
//! the kind, with a human-readable line; nothing panics.

use super::bulk_read::BulkReader;
use super::damage::{Damage, DamageKind, KeyRange, Place};
use super::meta::Meta;
use super::space_map::SpaceCounters;
use super::types::{Tree, ZERO_CHUNK};
use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::{self, node, Layout, Page, TreeRoot, BITMAP_WORDS, BITS_PER_PAGE};
use std::collections::HashSet;

#[derive(Debug, Default, Clone)]
pub struct CheckReport {
    /// Each damage found, in full up to `MAX_ERRORS`.
    pub damage: Vec<Damage>,
    /// The same, one human-readable line each (`Damage`'s `Display`),
    /// then "... and N more errors" when the cap cut the list.
    pub errors: Vec<String>,
    /// Damage found beyond the cap, counted only.
    pub omitted: u64,
    pub pages_checked: u64,
    pub exceptions: u64,
    pub data_chunks_referenced: u64,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }

    /// Record one damage: a wrecked device must not produce millions, so
    /// past `MAX_ERRORS` it is only counted.
    pub fn push(&mut self, d: Damage) {
        if self.damage.len() < MAX_ERRORS {
            self.errors.push(d.to_string());
            self.damage.push(d);
            return;
        }
        if self.omitted > 0 {
            self.errors.pop();
        }
        self.omitted += 1;
        self.errors
            .push(format!("... and {} more errors", self.omitted));
    }
}

/// Damage kept in full per report.
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
        let path = corrupt_block(&e).into_iter().collect();
        c.damage(
            Damage::new(Place::Journal, DamageKind::JournalDamage, e.to_string()).with_path(path),
        );
    }
    c.check_slots(&m);
    if let Err(e) = m.load_state() {
        let d = Damage::new(Place::StatePage, error_kind(&e), e.to_string());
        c.damage(d.with_path(vec![m.layout().state_block]));
        return Ok(c.finish());
    }
    c.walk_all(&m);
    Ok(c.finish())
}

/// An I/O failure is unreadable; anything else read is corrupt.
fn error_kind(e: &Error) -> DamageKind {
    match e {
        Error::Io { .. } | Error::OutOfRange { .. } => DamageKind::Unreadable,
        _ => DamageKind::Corrupt,
    }
}

fn corrupt_block(e: &Error) -> Option<u64> {
    match e {
        Error::Corrupt { block, .. } => Some(*block),
        _ => None,
    }
}

/// A page to visit: its block, the keys its parent gives it (`lo..hi`),
/// and its parent's index in the level above (sorted by block).
#[derive(Clone, Copy)]
struct Visit {
    block: u64,
    parent: usize,
    lo: u128,
    hi: Option<u128>,
}

const NO_PARENT: usize = usize::MAX;

/// The page being visited, with what names it in a damage report.
struct Site<'a> {
    tree: Tree,
    /// The levels above, root first.
    upper: &'a [Vec<Visit>],
    level: &'a [Visit],
    i: usize,
}

impl Site<'_> {
    fn visit(&self) -> Visit {
        self.level[self.i]
    }

    /// Blocks from the root down to this page, by the parent indices.
    fn path(&self) -> Vec<u64> {
        let mut path = vec![self.visit().block];
        let mut parent = self.visit().parent;
        for level in self.upper.iter().rev() {
            let Some(v) = level.get(parent) else { break };
            path.push(v.block);
            parent = v.parent;
        }
        path.reverse();
        path
    }

    fn damage(&self, kind: DamageKind, detail: String) -> Damage {
        let v = self.visit();
        Damage::new(Place::Tree(self.tree), kind, detail)
            .with_path(self.path())
            .with_keys(KeyRange {
                from: v.lo,
                to: v.hi,
            })
    }
}

pub(super) struct Checker {
    l: Layout,
    /// Damage other than the space map's bits and the state page's
    /// counters: what repair cannot fix safely.
    structural: Vec<String>,
    /// Expected bitmap, one bit per block over every bitmap page's range.
    expect: Vec<u64>,
    tree_pages: u64,
    meta_chunks: HashSet<u64>,
    rep: CheckReport,
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
            rep: CheckReport::default(),
        }
    }

    fn damage(&mut self, d: Damage) {
        if !d.kind.is_space_accounting() && self.structural.len() < MAX_ERRORS {
            self.structural.push(d.to_string());
        }
        self.rep.push(d);
    }

    /// Both superblock slots are written at format and alternate at each
    /// checkpoint, so each must be valid. Open falls back to the other one
    /// (a torn slot is a legal crash state, healed by the next checkpoint),
    /// but check reports it: a flipped newest slot would otherwise silently
    /// roll the store back.
    pub(super) fn check_slots<D: BlockDev>(&mut self, m: &Meta<D>) {
        for slot in 0..2u64 {
            let mut buf = format::new_page();
            let (kind, detail) = match m.dev().read_at(slot * format::BLOCK, &mut buf[..]) {
                Ok(()) => match format::decode_superblock(&buf[..], slot) {
                    Ok(_) => continue,
                    Err(e) => (DamageKind::BadSuperblockSlot, e.to_string()),
                },
                Err(e) => (DamageKind::Unreadable, format!("unreadable: {e}")),
            };
            self.damage(Damage::new(Place::Superblock, kind, detail).with_path(vec![slot]));
        }
    }

    /// Walk every tree, then compare the space map and the counters.
    pub(super) fn walk_all<D: BlockDev>(&mut self, m: &Meta<D>) {
        let mut reader = BulkReader::new(m);
        let roots = m.roots();
        // An absent tree (format 1's `ByNode`) was checked against the
        // superblock's version when the state page was loaded.
        for t in Tree::ALL.into_iter().filter(|t| roots[t.index()].exists()) {
            self.walk_tree(&mut reader, t, roots[t.index()]);
        }
        let free = self.compare_bitmap(&mut reader);
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

    pub(super) fn finish(self) -> CheckReport {
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

    /// Walk tree `t` level by level from the root; each level's pages are
    /// visited in block order, so the reads go forward across the device
    /// in runs, and a page of the level below is known by its parent's
    /// index, so a damage report can give the whole path from the root.
    ///
    /// Memory: one `Visit` (64 bytes) per page of the tree, kept for the
    /// levels above the one being read (the parent indices point into
    /// them) and for that level: O(interior pages + leaves). Interior
    /// pages are under 1 % of a tree (a node holds ~170 keys); 10 M
    /// exceptions take ~60 k pages, ~4 MiB of visits. Next to that the
    /// walk keeps one bit per device block (the rebuilt space map) and one
    /// 256 KiB run; never a key per exception.
    fn walk_tree<D: BlockDev>(&mut self, reader: &mut BulkReader<D>, t: Tree, root: TreeRoot) {
        let mut upper: Vec<Vec<Visit>> = Vec::new();
        let mut level = vec![Visit {
            block: root.block,
            parent: NO_PARENT,
            lo: 0,
            hi: None,
        }];
        for depth in (0..root.height).rev() {
            level.sort_by_key(|v| v.block);
            let mut below = Vec::new();
            for i in 0..level.len() {
                let site = Site {
                    tree: t,
                    upper: &upper,
                    level: &level,
                    i,
                };
                self.visit(reader, &site, depth, &mut below);
            }
            upper.push(level);
            level = below;
        }
    }

    /// Check the page at `site`, which must be a node at `depth` (0: a
    /// leaf); an interior node's children join `below`.
    fn visit<D: BlockDev>(
        &mut self,
        reader: &mut BulkReader<D>,
        site: &Site,
        depth: u32,
        below: &mut Vec<Visit>,
    ) {
        let v = site.visit();
        if !self.enter(site) {
            return;
        }
        let ahead = site.level[site.i + 1..].iter().map(|n| n.block);
        let page = match reader.read(v.block, ahead) {
            Ok(p) => p,
            Err(e) => {
                let d = site.damage(DamageKind::Unreadable, format!("unreadable: {e}"));
                return self.damage(d);
            }
        };
        let Some((keys, esz)) = self.check_node(site, page, depth) else {
            return;
        };
        if depth > 0 {
            below.extend(keys.iter().enumerate().map(|(i, &k)| Visit {
                block: node::child_at(&page[..], i),
                parent: site.i,
                lo: k.max(v.lo),
                hi: keys.get(i + 1).copied().or(v.hi),
            }));
        } else if site.tree == Tree::Exceptions {
            self.leaf_exceptions(site, page, &keys, esz);
        }
    }

    /// Claim the site's block as a tree page; false (damage reported) if
    /// it lies outside the area or is in use already.
    fn enter(&mut self, site: &Site) -> bool {
        let block = site.visit().block;
        if !self.l.in_area(block) {
            let detail = "pointer outside the allocation area".to_string();
            self.damage(site.damage(DamageKind::PointerOutsideArea, detail));
            return false;
        }
        if !self.mark(block) {
            let detail = "page referenced twice or overlapping other space".to_string();
            self.damage(site.damage(DamageKind::ReferencedTwice, detail));
            return false;
        }
        self.tree_pages += 1;
        self.meta_chunks.insert(block / self.l.bpc);
        self.rep.pages_checked += 1;
        true
    }

    /// Check that `page` is a node of the site's tree at `depth`, not empty
    /// (but for a lone root leaf), with its keys inside the range its
    /// parent gives. Returns its keys and entry size if it can be walked.
    fn check_node(&mut self, site: &Site, page: &Page, depth: u32) -> Option<(Vec<u128>, usize)> {
        let (t, v) = (site.tree, site.visit());
        let info = match format::decode_node(&page[..], v.block) {
            Ok(i) => i,
            Err(e) => {
                self.damage(site.damage(error_kind(&e), e.to_string()));
                return None;
            }
        };
        let want_vs = if depth == 0 { t.value_size() } else { 8 };
        if info.tree != t.node_id() || info.level != depth || info.value_size != want_vs {
            let detail = format!(
                "node of tree {} at level {} with {}-byte values, expected level {depth}",
                info.tree, info.level, info.value_size
            );
            self.damage(site.damage(DamageKind::WrongNode, detail));
            return None;
        }
        if info.count == 0 && !(v.parent == NO_PARENT && depth == 0) {
            self.damage(site.damage(DamageKind::EmptyNode, "empty node".to_string()));
        }
        let esz = info.entry_size();
        let keys: Vec<u128> = (0..info.count)
            .map(|i| node::key_at(&page[..], i, esz))
            .collect();
        if let Some(k) = keys
            .iter()
            .find(|&&k| k < v.lo || v.hi.is_some_and(|h| k >= h))
        {
            let detail = format!("key {k:#x} outside the range its parent gives");
            self.damage(site.damage(DamageKind::KeyOutOfRange, detail));
        }
        Some((keys, esz))
    }

    /// Each exception's data chunk lies in the area and overlaps nothing
    /// else; its blocks join the rebuilt space map.
    fn leaf_exceptions(&mut self, site: &Site, page: &Page, keys: &[u128], esz: usize) {
        for (i, &k) in keys.iter().enumerate() {
            self.rep.exceptions += 1;
            let v = format::rd_u64(node::value_at(page, i, esz), 0);
            if v == ZERO_CHUNK {
                continue;
            }
            if !self.l.chunk_in_area(v) {
                let detail = format!(
                    "key {k:#x} maps to chunk {v}, outside the allocation area ({}..{})",
                    self.l.first_chunk, self.l.device_chunks
                );
                self.damage(site.damage(DamageKind::DataChunkOutsideArea, detail));
                continue;
            }
            self.rep.data_chunks_referenced += 1;
            let b = v * self.l.bpc;
            let clash = (b..b + self.l.bpc).filter(|&x| !self.mark(x)).count();
            if clash > 0 {
                let detail = format!(
                    "key {k:#x} maps to data chunk {v}, whose blocks are used twice \
                     ({clash} already in use)"
                );
                self.damage(site.damage(DamageKind::DataChunkOverlap, detail));
            }
        }
    }

    /// Compare the stored bitmap with the expected one. Returns the number
    /// of free blocks in the area if every bitmap page was readable.
    fn compare_bitmap<D: BlockDev>(&mut self, reader: &mut BulkReader<D>) -> Option<u64> {
        let mut leaked = Vec::new();
        let mut missing = Vec::new();
        let mut free = Some(0u64);
        let end = self.l.bitmap_start + self.l.bitmap_blocks;
        for block in self.l.bitmap_start..end {
            let first = (block - self.l.bitmap_start) * BITS_PER_PAGE;
            let page = match reader
                .read(block, block + 1..end)
                .and_then(|b| format::decode_bitmap(&b[..], block).map(|_| b))
            {
                Ok(b) => b,
                Err(e) => {
                    free = None;
                    let detail = format!(
                        "blocks {first}..{} unchecked: {e}",
                        first + BITS_PER_PAGE - 1
                    );
                    let d = Damage::new(Place::SpaceMap, error_kind(&e), detail);
                    self.damage(d.with_path(vec![block]));
                    continue;
                }
            };
            for i in 0..BITMAP_WORDS {
                let wb = first + i as u64 * 64;
                let stored = format::bitmap::word(page, i);
                let want = self.implied_word(wb);
                add_runs(&mut leaked, wb, stored & !want);
                add_runs(&mut missing, wb, want & !stored);
                free = free.map(|f| f + u64::from((!stored & area_word(&self.l, wb)).count_ones()));
            }
        }
        self.report_runs(DamageKind::Leaked, &leaked);
        self.report_runs(DamageKind::MissingFromSpaceMap, &missing);
        free
    }

    /// One damage naming the runs of blocks leaked or missing.
    fn report_runs(&mut self, kind: DamageKind, runs: &[(u64, u64)]) {
        if runs.is_empty() {
            return;
        }
        let count: u64 = runs.iter().map(|r| r.1).sum();
        let what = match kind {
            DamageKind::Leaked => "marked in use but referenced by nothing (leaked)",
            _ => "in use by the trees but marked free",
        };
        let detail = format!("{count} block(s) {what}: {}", runs_str(runs));
        self.damage(Damage::new(Place::SpaceMap, kind, detail));
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
                let kind = DamageKind::CounterMismatch {
                    what,
                    recorded,
                    found,
                };
                let detail = format!("counter of {what} says {recorded}, metadata has {found}");
                self.damage(Damage::new(Place::StatePage, kind, detail));
            }
        }
    }
}
