//! Which blocks of a COW image hold metadata, for aiming corruption where
//! contract 5 applies.
//!
//! Data chunks have no checksums by design, so damage there is not
//! detectable and not the contract's business. The targets are blocks that
//! hold a valid metadata page *at its own location* in the state page, the
//! space-map bitmap, or the allocation area (B+tree pages): the engine has
//! no designed fallback for those, so if it reads a damaged one it must
//! report an error. The superblock slots and the journal ring are left out:
//! skipping a bad superblock slot for the other one, and ending replay at a
//! bad record, are their designed behaviour (and cannot be told apart from
//! a torn write), so a probe there could not say "should have failed".

use crate::simdev::{Image, PAGE};
use snapmv_engine::format::{check_header, decode_superblock, BlockKind, Layout};
use std::collections::BTreeSet;

/// The layout of the newest valid superblock, if any.
pub fn layout(img: &Image) -> Option<Layout> {
    let mut best: Option<(u64, Layout)> = None;
    for slot in 0..2u64 {
        let mut b = vec![0u8; PAGE];
        img.read(slot * PAGE as u64, &mut b);
        if let Ok(sb) = decode_superblock(&b, slot) {
            if best.map(|(s, _)| sb.seq > s).unwrap_or(true) {
                best = Some((sb.seq, sb.layout));
            }
        }
    }
    best.map(|(_, l)| l)
}

/// (candidate blocks, blocks whose damage must be reported if read). Here
/// the two sets are the same; the split exists so a classifier can aim at
/// blocks where detection is best-effort.
pub fn classify(img: &Image) -> (Vec<u64>, BTreeSet<u64>) {
    let Some(l) = layout(img) else {
        return (Vec::new(), BTreeSet::new());
    };
    let mut out = Vec::new();
    let mut b = vec![0u8; PAGE];
    for blk in img.written_pages() {
        if blk >= l.device_blocks {
            continue;
        }
        let kinds: &[BlockKind] = if blk == l.state_block {
            &[BlockKind::State]
        } else if l.in_bitmap(blk) {
            &[BlockKind::Bitmap]
        } else if l.in_area(blk) {
            &[BlockKind::Leaf, BlockKind::Internal]
        } else {
            continue;
        };
        img.read(blk * PAGE as u64, &mut b);
        if check_header(&b, blk, kinds).is_ok() {
            out.push(blk);
        }
    }
    let must: BTreeSet<u64> = out.iter().copied().collect();
    (out, must)
}
