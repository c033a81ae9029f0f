//! Superblock: two slots (blocks 0 and 1); the valid one with the higher
//! sequence number wins. Written by format (both slots) and by each
//! checkpoint (alternating slots: sequence `s` goes to slot `s % 2`).
//!
//! Payload (after the common header; the header's seq field is the
//! superblock sequence number):
//! ```text
//!  64 magic[8]      72 version u32     76 chunk_size u32
//!  80 device_size   88 uuid            96 journal_start  104 journal_blocks
//! 112 bitmap_start 120 bitmap_blocks  128 alloc_start    136 state_block
//! 144 tail_pos     152 tail_seq       160 device_chunks  168 first_chunk
//! ```

use super::{
    check_header, init_header, new_page, rd_u32, rd_u64, wr_u32, wr_u64, BlockKind, Layout, Page,
    FORMAT_VERSION, MAGIC, OLDEST_FORMAT_VERSION,
};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Newest valid slot wins.
    pub seq: u64,
    /// The format the device was made in (kept by every checkpoint).
    pub version: u32,
    /// Identifies one format of the device; journal blocks carry it so
    /// records left by an earlier format are never replayed.
    pub uuid: u64,
    pub layout: Layout,
    /// Ring position of the oldest transaction not yet checkpointed.
    pub tail_pos: u64,
    /// Sequence number that transaction must carry.
    pub tail_seq: u64,
}

const OFF_MAGIC: usize = 64;

/// Whether the block carries the snapmv magic at all (to tell "not a snapmv
/// device" from "a damaged snapmv device").
pub fn has_magic(buf: &[u8]) -> bool {
    buf.get(OFF_MAGIC..OFF_MAGIC + 8) == Some(&MAGIC[..])
}

pub fn encode_superblock(sb: &Superblock, slot: u64) -> Box<Page> {
    assert!(slot < 2);
    let l = &sb.layout;
    let mut p = new_page();
    init_header(&mut p, BlockKind::Superblock, slot, sb.seq);
    p[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
    assert!((OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&sb.version));
    wr_u32(&mut p[..], 72, sb.version);
    wr_u32(&mut p[..], 76, l.chunk_size);
    for (off, v) in [
        (80, l.device_size),
        (88, sb.uuid),
        (96, l.journal_start),
        (104, l.journal_blocks),
        (112, l.bitmap_start),
        (120, l.bitmap_blocks),
        (128, l.alloc_start),
        (136, l.state_block),
        (144, sb.tail_pos),
        (152, sb.tail_seq),
        (160, l.device_chunks),
        (168, l.first_chunk),
    ] {
        wr_u64(&mut p[..], off, v);
    }
    super::seal(&mut p);
    p
}

/// Decode and fully validate one slot: header, magic, version, and a layout
/// that matches the one recomputed from the recorded sizes.
pub fn decode_superblock(buf: &[u8], slot: u64) -> Result<Superblock> {
    let h = check_header(buf, slot, &[BlockKind::Superblock])?;
    let bad = |reason: String| Error::Corrupt {
        block: slot,
        kind: "superblock",
        reason,
    };
    if !has_magic(buf) {
        return Err(bad("bad magic".into()));
    }
    let version = rd_u32(buf, 72);
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(Error::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let chunk_size = rd_u32(buf, 76);
    let device_size = rd_u64(buf, 80);
    let layout = Layout::new(device_size, chunk_size)
        .map_err(|e| bad(format!("recorded geometry is invalid: {e}")))?;
    let recorded = [
        (96, layout.journal_start, "journal start"),
        (104, layout.journal_blocks, "journal size"),
        (112, layout.bitmap_start, "bitmap start"),
        (120, layout.bitmap_blocks, "bitmap size"),
        (128, layout.alloc_start, "allocation area start"),
        (136, layout.state_block, "state block"),
        (160, layout.device_chunks, "device chunks"),
        (168, layout.first_chunk, "first chunk"),
    ];
    for (off, want, what) in recorded {
        let got = rd_u64(buf, off);
        if got != want {
            return Err(bad(format!("{what} is {got}, layout says {want}")));
        }
    }
    let tail_pos = rd_u64(buf, 144);
    if tail_pos >= layout.journal_blocks {
        return Err(bad(format!(
            "journal tail {tail_pos} outside a ring of {} blocks",
            layout.journal_blocks
        )));
    }
    Ok(Superblock {
        seq: h.seq,
        version,
        uuid: rd_u64(buf, 88),
        layout,
        tail_pos,
        tail_seq: rd_u64(buf, 152),
    })
}
