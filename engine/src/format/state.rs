//! The state page (block 2): tree roots, space counters, allocator cursors
//! and the store's opaque app-state blob. Journalled like any other page.
//!
//! ```text
//!  64 + 16*i  root i: block u64, height u32, pad u32   (i = 0..3)
//! 112 data_chunks  120 meta_blocks  128 free_blocks  136 meta_chunks
//! 144 data_cursor  152 meta_cursor  160 app_len u32  168 app bytes
//! 2224 root 3: block u64, height u32 (format 2; all zeros: absent)
//! ```
//!
//! Root 3 (format 2) sits after the app state's room: the first three
//! roots were packed before the counters in format 1, whose pages hold
//! zeros there, which decode as "no such tree".

use super::{check_header, init_header, new_page, rd_u32, rd_u64, wr_u32, wr_u64};
use super::{BlockKind, Page, PAGE_SIZE};
use crate::error::{Error, Result};

pub const APP_STATE_CAP: usize = 2048;
/// Deepest tree accepted. With fan-out >= 7 this covers far more keys than
/// any device holds; bounding it bounds every recursion over a tree.
pub const MAX_HEIGHT: u32 = 40;
const OFF_APP: usize = 168;
const _: () = assert!(OFF_APP + APP_STATE_CAP <= PAGE_SIZE);
/// Trees whose roots the state page records.
pub const TREES: usize = 4;
/// Where root 3 lives (after the app state's room).
const OFF_ROOT3: usize = 2224;
const _: () = assert!(OFF_APP + APP_STATE_CAP <= OFF_ROOT3 && OFF_ROOT3 + 16 <= PAGE_SIZE);

/// Where root `i` lives in the state page.
fn root_offset(i: usize) -> usize {
    assert!(i < TREES);
    if i < 3 {
        64 + 16 * i
    } else {
        OFF_ROOT3
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TreeRoot {
    pub block: u64,
    /// 1 = the root is a leaf; 0 = the tree does not exist (root 3 of a
    /// format-1 device), and then `block` is 0.
    pub height: u32,
}

impl TreeRoot {
    pub fn exists(&self) -> bool {
        self.height > 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct StateRec {
    pub roots: [TreeRoot; TREES],
    pub data_chunks: u64,
    pub meta_blocks: u64,
    /// Clear bits in the allocation area.
    pub free_blocks: u64,
    /// Chunks of the allocation area holding at least one tree page.
    pub meta_chunks: u64,
    pub data_cursor: u64,
    pub meta_cursor: u64,
    pub app_state: Vec<u8>,
}

pub fn encode_state(s: &StateRec, block: u64) -> Box<Page> {
    assert!(s.app_state.len() <= APP_STATE_CAP);
    let mut p = new_page();
    init_header(&mut p, BlockKind::State, block, 0);
    for (i, r) in s.roots.iter().enumerate() {
        wr_u64(&mut p[..], root_offset(i), r.block);
        wr_u32(&mut p[..], root_offset(i) + 8, r.height);
    }
    for (off, v) in [
        (112, s.data_chunks),
        (120, s.meta_blocks),
        (128, s.free_blocks),
        (136, s.meta_chunks),
        (144, s.data_cursor),
        (152, s.meta_cursor),
    ] {
        wr_u64(&mut p[..], off, v);
    }
    let n = s.app_state.len().min(APP_STATE_CAP);
    wr_u32(&mut p[..], 160, n as u32);
    p[OFF_APP..OFF_APP + n].copy_from_slice(&s.app_state[..n]);
    super::seal(&mut p);
    p
}

/// Decode the state page. Only self-contained checks happen here; the
/// caller checks roots and cursors against the layout.
pub fn decode_state(buf: &[u8], expected_block: u64) -> Result<StateRec> {
    check_header(buf, expected_block, &[BlockKind::State])?;
    let bad = |reason: String| Error::Corrupt {
        block: expected_block,
        kind: "state page",
        reason,
    };
    let mut roots = [TreeRoot::default(); TREES];
    for (i, r) in roots.iter_mut().enumerate() {
        r.block = rd_u64(buf, root_offset(i));
        r.height = rd_u32(buf, root_offset(i) + 8);
        // Only the tree format 2 added may be absent (the caller checks
        // that against the superblock's version).
        let absent = i == 3 && r.height == 0 && r.block == 0;
        if !absent && (r.height == 0 || r.height > MAX_HEIGHT) {
            return Err(bad(format!("tree {i} has height {}", r.height)));
        }
    }
    let n = rd_u32(buf, 160) as usize;
    if n > APP_STATE_CAP {
        return Err(bad(format!(
            "app state of {n} bytes exceeds {APP_STATE_CAP}"
        )));
    }
    let app_state = buf
        .get(OFF_APP..OFF_APP + n)
        .ok_or_else(|| bad("app state out of page".into()))?
        .to_vec();
    Ok(StateRec {
        roots,
        data_chunks: rd_u64(buf, 112),
        meta_blocks: rd_u64(buf, 120),
        free_blocks: rd_u64(buf, 128),
        meta_chunks: rd_u64(buf, 136),
        data_cursor: rd_u64(buf, 144),
        meta_cursor: rd_u64(buf, 152),
        app_state,
    })
}
