//! On-disk encoding of the COW device: layout, the common block header with
//! its salted crc32c, superblocks, the state page, journal blocks, B+tree
//! node pages and space-map bitmap pages.
//!
//! Everything here is a pure function over byte slices. Decoders take bytes
//! straight from disk (or a fuzzer) and must never panic: every length read
//! from disk is validated before it is used as an index, and all reads go
//! through the checked helpers below.
//!
//! Common header (first 64 bytes of every metadata block):
//! ```text
//!   0  u32  block type (BlockKind)
//!   4  u32  crc32c, salted per type, over bytes 0..4 and 8..4096
//!   8  u64  the block's own number (misdirected writes fail this check)
//!  16  u64  sequence number (superblock / journal blocks; 0 elsewhere)
//!  24..64   type-specific fields
//! ```

pub mod bitmap;
mod journal;
mod layout;
pub mod node;
mod state;
mod superblock;

pub use bitmap::{decode_bitmap, init_bitmap, BITMAP_WORDS, BITS_PER_PAGE};
pub use journal::{
    decode_commit, decode_descriptor, encode_commit, encode_descriptor, CommitRec, Descriptor,
    DESC_SLOTS, JOURNAL_DATA_SALT,
};
pub use layout::Layout;
pub use node::{decode_node, NodeInfo};
pub use state::{decode_state, encode_state, StateRec, TreeRoot, APP_STATE_CAP, MAX_HEIGHT, TREES};
pub use superblock::{decode_superblock, encode_superblock, has_magic, Superblock};

use crate::error::{Error, Result};
use crate::planted::{self, Bug};

/// Metadata block size. Every metadata structure is exactly one block.
pub const PAGE_SIZE: usize = 4096;
/// `PAGE_SIZE` as a byte count for offset arithmetic.
pub const BLOCK: u64 = PAGE_SIZE as u64;
/// Bytes reserved for the common header at the start of every block.
pub const HEADER_SIZE: usize = 64;
pub const MAGIC: [u8; 8] = *b"SNAPMV\0\x01";
/// The format this build writes: 2 adds the exception index by version
/// node (the state page's fourth root).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format this build still reads and writes (in its own
/// format: a device keeps the version it was formatted with).
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// The first format with the exception index by version node.
pub const NODE_INDEX_VERSION: u32 = 2;

/// One metadata block image.
pub type Page = [u8; PAGE_SIZE];

/// A zeroed page on the heap.
pub fn new_page() -> Box<Page> {
    Box::new([0u8; PAGE_SIZE])
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockKind {
    Superblock = 1,
    State = 2,
    JournalDesc = 3,
    JournalCommit = 4,
    Leaf = 5,
    Internal = 6,
    Bitmap = 7,
}

impl BlockKind {
    pub const ALL: [BlockKind; 7] = [
        BlockKind::Superblock,
        BlockKind::State,
        BlockKind::JournalDesc,
        BlockKind::JournalCommit,
        BlockKind::Leaf,
        BlockKind::Internal,
        BlockKind::Bitmap,
    ];

    pub fn from_u32(v: u32) -> Option<BlockKind> {
        BlockKind::ALL.into_iter().find(|k| *k as u32 == v)
    }

    /// Distinct crc seed per type, so a block of one type copied (or
    /// misdirected) where another is expected fails its checksum even if
    /// the type field were to be rewritten consistently.
    pub fn salt(self) -> u32 {
        match self {
            BlockKind::Superblock => 0x5a3c_9e01,
            BlockKind::State => 0x71d2_4b02,
            BlockKind::JournalDesc => 0x0be8_6a03,
            BlockKind::JournalCommit => 0xc4f1_3704,
            BlockKind::Leaf => 0x96a7_d205,
            BlockKind::Internal => 0x2d5b_8f06,
            BlockKind::Bitmap => 0xe809_5c07,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BlockKind::Superblock => "superblock",
            BlockKind::State => "state page",
            BlockKind::JournalDesc => "journal descriptor",
            BlockKind::JournalCommit => "journal commit",
            BlockKind::Leaf => "btree leaf",
            BlockKind::Internal => "btree internal",
            BlockKind::Bitmap => "space-map bitmap",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: BlockKind,
    pub block: u64,
    pub seq: u64,
}

// ---- checked little-endian helpers (never panic) ----

pub fn rd_u32(buf: &[u8], off: usize) -> u32 {
    buf.get(off..off.saturating_add(4))
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_le_bytes)
}

pub fn rd_u64(buf: &[u8], off: usize) -> u64 {
    buf.get(off..off.saturating_add(8))
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_le_bytes)
}

pub fn rd_u128(buf: &[u8], off: usize) -> u128 {
    buf.get(off..off.saturating_add(16))
        .and_then(|s| <[u8; 16]>::try_from(s).ok())
        .map_or(0, u128::from_le_bytes)
}

fn wr(buf: &mut [u8], off: usize, bytes: &[u8]) {
    let end = off.saturating_add(bytes.len());
    assert!(end <= buf.len(), "write past end of block");
    if let Some(s) = buf.get_mut(off..end) {
        s.copy_from_slice(bytes);
    }
}

pub fn wr_u32(buf: &mut [u8], off: usize, v: u32) {
    wr(buf, off, &v.to_le_bytes());
}

pub fn wr_u64(buf: &mut [u8], off: usize, v: u64) {
    wr(buf, off, &v.to_le_bytes());
}

pub fn wr_u128(buf: &mut [u8], off: usize, v: u128) {
    wr(buf, off, &v.to_le_bytes());
}

// ---- header ----

/// The salted crc of a block: covers the type field and everything after the
/// crc field, so any single flipped byte anywhere in the block is caught.
pub fn block_crc(kind: BlockKind, buf: &[u8]) -> u32 {
    let head = buf.get(0..4).unwrap_or(&[]);
    let rest = buf.get(8..).unwrap_or(&[]);
    crc32c::crc32c_append(crc32c::crc32c_append(kind.salt(), head), rest)
}

/// Write the type, block number and sequence fields of a fresh block.
pub fn init_header(buf: &mut Page, kind: BlockKind, block: u64, seq: u64) {
    wr_u32(buf, 0, kind as u32);
    wr_u32(buf, 4, 0);
    wr_u64(buf, 8, block);
    wr_u64(buf, 16, seq);
}

/// Compute and store the crc. Called on every page image just before it is
/// written anywhere (journal or home), never earlier: in-cache pages are
/// edited freely and sealed only when captured.
pub fn seal(buf: &mut Page) {
    let kind = BlockKind::from_u32(rd_u32(buf, 0));
    assert!(kind.is_some(), "sealing a page with no valid type");
    if let Some(kind) = kind {
        let crc = block_crc(kind, buf);
        wr_u32(buf, 4, crc);
    }
}

fn corrupt(block: u64, kind: &'static str, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        block,
        kind,
        reason: reason.into(),
    }
}

/// Verify a block's header: length, known type, salted crc, own block number,
/// and that its type is one of `expected`. The first failure is returned as
/// `Error::Corrupt`; such a block must never be used.
pub fn check_header(buf: &[u8], expected_block: u64, expected: &[BlockKind]) -> Result<Header> {
    let want = expected.first().map_or("metadata block", |k| k.name());
    if buf.len() != PAGE_SIZE {
        return Err(corrupt(
            expected_block,
            want,
            format!("block is {} bytes, expected {PAGE_SIZE}", buf.len()),
        ));
    }
    let raw = rd_u32(buf, 0);
    let kind = BlockKind::from_u32(raw)
        .ok_or_else(|| corrupt(expected_block, want, format!("unknown block type {raw:#x}")))?;
    verify_crc(buf, expected_block, kind)?;
    let block = rd_u64(buf, 8);
    if block != expected_block {
        return Err(corrupt(
            expected_block,
            kind.name(),
            format!("block claims to be block {block} (misdirected or stale write)"),
        ));
    }
    if !expected.contains(&kind) {
        return Err(corrupt(
            expected_block,
            want,
            format!("found a {} where a {want} was expected", kind.name()),
        ));
    }
    Ok(Header {
        kind,
        block,
        seq: rd_u64(buf, 16),
    })
}

fn verify_crc(buf: &[u8], expected_block: u64, kind: BlockKind) -> Result<()> {
    // Planted bug (simulator self-test): checksums are not compared, so
    // flipped bits in metadata are read as valid.
    if planted::on(Bug::SkipChecksum) {
        return Ok(());
    }
    let stored = rd_u32(buf, 4);
    let actual = block_crc(kind, buf);
    if stored != actual {
        return Err(corrupt(
            expected_block,
            kind.name(),
            format!("checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
