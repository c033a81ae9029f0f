//! Writing an empty store onto a device (`Meta::format`): the superblock
//! slots, an empty root leaf per tree, the state page, and a bitmap with
//! the fixed areas and those three leaves in use. The journal's sequence
//! numbers start above any found in the old ring, so stale records can
//! never be replayed.

use super::types::{FormatOptions, Tree};
use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::{self, node, BlockKind, Layout, StateRec, Superblock, TreeRoot};
use crate::format::{BITS_PER_PAGE, BLOCK, PAGE_SIZE};

fn mix64(mut x: u64) -> u64 {
    // splitmix64 finaliser: spreads the format inputs into an id.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Highest journal sequence number found in the ring (any format's), so a
/// new format starts above it and stale records can never be replayed.
fn scan_ring_max_seq(dev: &dyn BlockDev, l: &Layout) -> Result<u64> {
    const BATCH: u64 = 256;
    let mut max = 0u64;
    let mut buf = vec![0u8; BATCH as usize * PAGE_SIZE];
    let mut pos = 0;
    while pos < l.journal_blocks {
        let k = BATCH.min(l.journal_blocks - pos);
        let bytes = &mut buf[..k as usize * PAGE_SIZE];
        dev.read_at((l.journal_start + pos) * BLOCK, bytes)?;
        for (i, blk) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
            let kinds = [BlockKind::JournalDesc, BlockKind::JournalCommit];
            if let Ok(h) = format::check_header(blk, l.journal_start + pos + i as u64, &kinds) {
                max = max.max(h.seq);
            }
        }
        pos += k;
    }
    Ok(max)
}

/// A fresh store's tree pages: one empty root leaf per tree, in the first
/// blocks of the allocation area.
const ROOT_LEAVES: u64 = Tree::ALL.len() as u64;

/// Bitmap word for blocks `wb..wb+64` of a fresh device: fixed areas, the
/// root leaves, and blocks past the last whole chunk are in use.
fn fresh_bitmap_word(l: &Layout, wb: u64) -> u64 {
    let low = l.alloc_start + ROOT_LEAVES;
    let mut w = 0u64;
    if wb + 64 <= low {
        w = u64::MAX;
    } else if wb < low {
        w |= (1u64 << (low - wb)) - 1;
    }
    if wb >= l.area_end {
        w = u64::MAX;
    } else if wb + 64 > l.area_end {
        w |= !((1u64 << (l.area_end - wb)) - 1);
    }
    w
}

fn write_fresh_bitmap(dev: &dyn BlockDev, l: &Layout) -> Result<()> {
    const BATCH: u64 = 64;
    let mut p = 0;
    while p < l.bitmap_blocks {
        let k = BATCH.min(l.bitmap_blocks - p);
        let mut bytes = Vec::with_capacity(k as usize * PAGE_SIZE);
        for q in p..p + k {
            let mut page = format::new_page();
            format::init_bitmap(&mut page, l.bitmap_start + q);
            for i in 0..format::BITMAP_WORDS {
                let wb = q * BITS_PER_PAGE + i as u64 * 64;
                format::bitmap::set_word(&mut page, i, fresh_bitmap_word(l, wb));
            }
            format::seal(&mut page);
            bytes.extend_from_slice(&page[..]);
        }
        dev.write_at((l.bitmap_start + p) * BLOCK, &bytes)?;
        p += k;
    }
    Ok(())
}

fn fresh_state(l: &Layout) -> StateRec {
    let roots = [0u64, 1, 2, 3].map(|i| TreeRoot {
        block: l.alloc_start + i,
        height: 1,
    });
    let trees = ROOT_LEAVES;
    assert_eq!(roots.len() as u64, trees);
    let meta_chunks = (l.alloc_start + trees - 1) / l.bpc - l.alloc_start / l.bpc + 1;
    StateRec {
        roots,
        data_chunks: 0,
        meta_blocks: trees,
        free_blocks: l.area_blocks() - trees,
        meta_chunks,
        data_cursor: l.first_chunk + l.chunks_total() / 32,
        meta_cursor: l.alloc_start + trees,
        app_state: Vec::new(),
    }
}

/// Write an empty store onto `dev`.
pub(super) fn write_empty_store(dev: &dyn BlockDev, opts: &FormatOptions) -> Result<()> {
    let l = Layout::new(dev.size(), opts.chunk_size)?;
    let mut old_id = 0u64;
    let mut formatted = false;
    for slot in 0..2u64 {
        let mut buf = format::new_page();
        dev.read_at(slot * BLOCK, &mut buf[..])?;
        match format::decode_superblock(&buf[..], slot) {
            Ok(sb) => {
                formatted = true;
                old_id ^= mix64(sb.uuid ^ sb.seq);
            }
            Err(Error::UnsupportedVersion { .. }) => formatted = true,
            Err(_) => {}
        }
    }
    if formatted && !opts.force {
        return Err(Error::AlreadyFormatted);
    }
    let start_seq = scan_ring_max_seq(dev, &l)? + 1;
    let uuid = mix64(l.device_size ^ mix64(u64::from(l.chunk_size) ^ mix64(start_seq ^ old_id)));
    // Invalidate old superblocks first: a crash mid-format must not leave
    // an old superblock pointing at half-overwritten metadata.
    let zero = format::new_page();
    dev.write_at(0, &zero[..])?;
    dev.write_at(BLOCK, &zero[..])?;
    dev.flush()?;
    write_fresh_bitmap(dev, &l)?;
    for (i, t) in Tree::ALL.iter().enumerate() {
        let b = l.alloc_start + i as u64;
        let mut p = format::new_page();
        node::init_node(&mut p, b, t.node_id(), 0, t.value_size());
        format::seal(&mut p);
        dev.write_at(b * BLOCK, &p[..])?;
    }
    let state = fresh_state(&l);
    dev.write_at(
        l.state_block * BLOCK,
        &format::encode_state(&state, l.state_block)[..],
    )?;
    dev.flush()?;
    for seq in [1u64, 2] {
        let sb = Superblock {
            seq,
            version: format::FORMAT_VERSION,
            uuid,
            layout: l,
            tail_pos: 0,
            tail_seq: start_seq,
        };
        dev.write_at(
            (seq % 2) * BLOCK,
            &format::encode_superblock(&sb, seq % 2)[..],
        )?;
    }
    dev.flush()?;
    tracing::info!(
        size = l.device_size,
        chunk = l.chunk_size,
        "formatted snapmv COW device"
    );
    Ok(())
}
