//! Offline repair of the space accounting (after thin_repair and
//! `qemu-img check -r leaks`): what the trees reference is the truth; the
//! space map's bits and the state page's counters are brought in line with
//! it in one journalled transaction. Damage to the structure itself (a bad
//! page, a key out of order, a block used twice, a mapping outside the
//! area, a damaged superblock slot or journal) is refused: repair never
//! drops a mapping, so it never changes any version's content.

use super::check::Checker;
use super::meta::Meta;
use super::space_map::SpaceCounters;
use crate::dev::BlockDev;
use crate::error::Result;
use crate::format::BITMAP_WORDS;

/// What `repair` did.
#[derive(Debug, Default, Clone)]
pub struct RepairReport {
    /// What the check before repair found.
    pub found: Vec<String>,
    /// Damage repair will not touch; when not empty, nothing was written.
    pub refused: Vec<String>,
    /// Bitmap words rewritten (each covers 64 blocks).
    pub bitmap_words: u64,
    /// Counters rewritten, as "name: old -> new".
    pub counters: Vec<String>,
}

impl RepairReport {
    pub fn changed(&self) -> bool {
        self.bitmap_words > 0 || !self.counters.is_empty()
    }
}

/// Repair the space map and counters of the store on `dev`. The journal is
/// replayed first (a normal open); the result is committed and
/// checkpointed, so the journal is empty afterwards.
pub fn repair<D: BlockDev + Clone>(dev: D) -> Result<RepairReport> {
    // Decide on a read-only open first: a refusal writes nothing at all
    // (a writable open may run a recovery checkpoint).
    let ro = Meta::open_read_only(dev)?;
    let mut c = Checker::new(*ro.layout());
    c.check_slots(&ro);
    c.walk_all(&ro);
    if !c.structural().is_empty() {
        return Ok(RepairReport {
            refused: c.structural().to_vec(),
            found: c.finish().errors,
            ..RepairReport::default()
        });
    }
    let dev = ro.into_dev();
    let mut m = Meta::open(dev)?;
    let mut c = Checker::new(*m.layout());
    c.check_slots(&m);
    c.walk_all(&m);
    let mut report = RepairReport {
        refused: c.structural().to_vec(),
        ..RepairReport::default()
    };
    if report.refused.is_empty() {
        report.bitmap_words = rewrite_bitmap(&mut m, &c)?;
        report.counters = rewrite_counters(&mut m, &c)?;
    }
    report.found = c.finish().errors;
    if report.changed() {
        m.checkpoint()?;
    }
    Ok(report)
}

/// Store the bitmap the trees imply; returns the words that changed.
fn rewrite_bitmap<D: BlockDev>(m: &mut Meta<D>, c: &Checker) -> Result<u64> {
    let words = m.layout().bitmap_blocks * BITMAP_WORDS as u64;
    let mut changed = 0;
    for i in 0..words {
        let wb = i * 64;
        changed += u64::from(m.repair_bitmap_word(wb, c.implied_word(wb))?);
        // One transaction must fit the journal: commit every few pages'
        // worth of changes (a bitmap page holds BITMAP_WORDS words).
        if m.dirty_pages() >= m.max_dirty_pages() / 2 {
            m.commit()?;
        }
    }
    Ok(changed)
}

/// Store the counters the trees imply; returns what changed.
fn rewrite_counters<D: BlockDev>(m: &mut Meta<D>, c: &Checker) -> Result<Vec<String>> {
    let (data, pages, page_chunks) = c.implied_counters();
    let old = m.space_counters();
    let new = SpaceCounters {
        data_chunks: data,
        meta_blocks: pages,
        free_blocks: c.implied_free(),
        meta_chunks: page_chunks,
    };
    let out: Vec<String> = [
        ("data chunks", old.data_chunks, new.data_chunks),
        ("tree pages", old.meta_blocks, new.meta_blocks),
        (
            "chunks holding tree pages",
            old.meta_chunks,
            new.meta_chunks,
        ),
        ("free blocks", old.free_blocks, new.free_blocks),
    ]
    .into_iter()
    .filter(|(_, was, want)| was != want)
    .map(|(name, was, want)| format!("{name}: {was} -> {want}"))
    .collect();
    m.set_space_counters(new)?;
    Ok(out)
}
