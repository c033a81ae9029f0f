//! B+tree node pages.
//!
//! Header fields after the common header: 24 tree u32, 28 level u32
//! (0 = leaf), 32 count u32, 36 value_size u32 (8 for internal nodes: the
//! child block number). Entries start at byte 64, sorted strictly ascending
//! by key: leaves hold `key u128 | value`, internal nodes `key u128 | child
//! u64`. An internal entry's key is a lower bound of every key in that
//! child's subtree (and the next entry's key an exclusive upper bound).
//!
//! The accessors below index a page whose `count` has been validated by
//! [`decode_node`] (or that this process built), so entry offsets are always
//! inside the page.

use super::{check_header, init_header, rd_u128, rd_u32, rd_u64, wr_u128, wr_u32, wr_u64};
use super::{BlockKind, Page, HEADER_SIZE, MAX_HEIGHT, PAGE_SIZE};
use crate::error::{Error, Result};

const KEY: usize = 16;
const CHILD: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub tree: u32,
    pub level: u32,
    pub count: usize,
    /// Bytes per value (leaves) or 8 (internal nodes).
    pub value_size: usize,
}

impl NodeInfo {
    pub fn entry_size(&self) -> usize {
        KEY + self.value_size
    }
}

pub fn entry_size(level: u32, value_size: usize) -> usize {
    KEY + if level == 0 { value_size } else { CHILD }
}

pub fn capacity(level: u32, value_size: usize) -> usize {
    (PAGE_SIZE - HEADER_SIZE) / entry_size(level, value_size)
}

pub fn init_node(buf: &mut Page, block: u64, tree: u32, level: u32, value_size: usize) {
    buf.fill(0);
    let kind = if level == 0 {
        BlockKind::Leaf
    } else {
        BlockKind::Internal
    };
    init_header(buf, kind, block, 0);
    wr_u32(buf, 24, tree);
    wr_u32(buf, 28, level);
    wr_u32(buf, 32, 0);
    let vs = if level == 0 { value_size } else { CHILD };
    wr_u32(buf, 36, vs as u32);
}

/// Validate a node page: header, type/level agreement, sizes, count within
/// capacity, and keys strictly ascending. Tree id and level against the
/// parent's expectation are the caller's job.
pub fn decode_node(buf: &[u8], expected_block: u64) -> Result<NodeInfo> {
    let h = check_header(buf, expected_block, &[BlockKind::Leaf, BlockKind::Internal])?;
    let bad = |reason: String| Error::Corrupt {
        block: expected_block,
        kind: h.kind.name(),
        reason,
    };
    let level = rd_u32(buf, 28);
    let is_leaf = h.kind == BlockKind::Leaf;
    if is_leaf != (level == 0) || level >= MAX_HEIGHT {
        return Err(bad(format!("{} at level {level}", h.kind.name())));
    }
    let value_size = rd_u32(buf, 36) as usize;
    let max_value = PAGE_SIZE - HEADER_SIZE - KEY;
    // A leaf value may be empty: a tree whose keys say everything (`ByNode`).
    if (is_leaf && value_size > max_value) || (!is_leaf && value_size != CHILD) {
        return Err(bad(format!("value size {value_size}")));
    }
    let count = rd_u32(buf, 32) as usize;
    let cap = capacity(level, value_size);
    if count > cap {
        return Err(bad(format!("{count} entries exceed capacity {cap}")));
    }
    let esz = KEY + value_size;
    for i in 1..count {
        let (a, b) = (key_at(buf, i - 1, esz), key_at(buf, i, esz));
        if a >= b {
            return Err(bad(format!(
                "keys out of order at entry {i}: {a:#x} then {b:#x}"
            )));
        }
    }
    Ok(NodeInfo {
        tree: rd_u32(buf, 24),
        level,
        count,
        value_size,
    })
}

fn off(i: usize, esz: usize) -> usize {
    HEADER_SIZE + i * esz
}

pub fn count(buf: &Page) -> usize {
    rd_u32(buf, 32) as usize
}

pub fn level(buf: &Page) -> u32 {
    rd_u32(buf, 28)
}

pub fn set_count(buf: &mut Page, n: usize) {
    wr_u32(buf, 32, n as u32);
}

pub fn key_at(buf: &[u8], i: usize, esz: usize) -> u128 {
    rd_u128(buf, off(i, esz))
}

pub fn set_key(buf: &mut Page, i: usize, esz: usize, key: u128) {
    wr_u128(buf, off(i, esz), key);
}

pub fn child_at(buf: &[u8], i: usize) -> u64 {
    rd_u64(buf, off(i, KEY + CHILD) + KEY)
}

pub fn value_at(buf: &Page, i: usize, esz: usize) -> &[u8] {
    let start = off(i, esz) + KEY;
    buf.get(start..off(i + 1, esz)).unwrap_or(&[])
}

pub fn set_value(buf: &mut Page, i: usize, esz: usize, val: &[u8]) {
    assert_eq!(val.len(), esz - KEY);
    let start = off(i, esz) + KEY;
    if let Some(s) = buf.get_mut(start..start + val.len()) {
        s.copy_from_slice(val);
    }
}

/// The bytes of entries `from..to`.
pub fn entries(buf: &Page, from: usize, to: usize, esz: usize) -> &[u8] {
    buf.get(off(from, esz)..off(to, esz)).unwrap_or(&[])
}

/// Replace all entries with `bytes` (a whole number of entries).
pub fn set_entries(buf: &mut Page, bytes: &[u8], esz: usize) {
    assert_eq!(bytes.len() % esz, 0);
    let n = bytes.len() / esz;
    if let Some(s) = buf.get_mut(HEADER_SIZE..HEADER_SIZE + bytes.len()) {
        s.copy_from_slice(bytes);
        set_count(buf, n);
    }
}

/// Binary search among `count` entries: Ok(index) if present, else the
/// insertion point.
pub fn search(
    buf: &Page,
    count: usize,
    esz: usize,
    key: u128,
) -> std::result::Result<usize, usize> {
    let (mut lo, mut hi) = (0usize, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match key_at(buf, mid, esz).cmp(&key) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return Ok(mid),
        }
    }
    Err(lo)
}

/// Internal node: the child whose range holds `key` (the last entry whose
/// key is <= `key`, or the first one when `key` is below them all).
pub fn child_index(buf: &Page, count: usize, key: u128) -> usize {
    assert!(count > 0);
    match search(buf, count, KEY + CHILD, key) {
        Ok(i) => i,
        Err(i) => i.saturating_sub(1),
    }
}

/// Insert an encoded entry at `i`, shifting the tail. Caller ensures room.
pub fn insert_at(buf: &mut Page, i: usize, entry: &[u8]) {
    let esz = entry.len();
    let n = count(buf);
    assert!(i <= n && n < (PAGE_SIZE - HEADER_SIZE) / esz);
    buf.copy_within(off(i, esz)..off(n, esz), off(i + 1, esz));
    buf[off(i, esz)..off(i + 1, esz)].copy_from_slice(entry);
    set_count(buf, n + 1);
}

pub fn remove_at(buf: &mut Page, i: usize, esz: usize) {
    let n = count(buf);
    assert!(i < n);
    buf.copy_within(off(i + 1, esz)..off(n, esz), off(i, esz));
    let end = off(n, esz);
    buf[end - esz..end].fill(0);
    set_count(buf, n - 1);
}

pub fn leaf_entry(key: u128, val: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(KEY + val.len());
    e.extend_from_slice(&key.to_le_bytes());
    e.extend_from_slice(val);
    e
}

pub fn internal_entry(key: u128, child: u64) -> Vec<u8> {
    let mut e = Vec::with_capacity(KEY + CHILD);
    e.extend_from_slice(&key.to_le_bytes());
    e.extend_from_slice(&child.to_le_bytes());
    e
}

pub fn set_child(buf: &mut Page, i: usize, child: u64) {
    wr_u64(buf, off(i, KEY + CHILD) + KEY, child);
}
