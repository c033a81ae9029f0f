//! Where everything lives on the COW device, derived only from the device
//! size and the chunk size, so a superblock can be cross-checked by
//! recomputing it.
//!
//! In 4 KiB blocks: 0, 1 = superblock slots A/B; 2 = state page; then the
//! journal ring; then the space-map bitmap (one bit per block of the whole
//! device); then the allocation area, starting at a chunk boundary and
//! ending at the last whole chunk.

use super::{BITS_PER_PAGE, BLOCK};
use crate::error::{Error, Result};

pub const MIN_CHUNK: u32 = 4096;
pub const MAX_CHUNK: u32 = 1 << 20;
const JOURNAL_MIN: u64 = 256;
const JOURNAL_MAX: u64 = 16384;
/// Data chunks that must fit beyond the reserve and the three tree roots.
const MIN_DATA_CHUNKS: u64 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub device_size: u64,
    pub chunk_size: u32,
    /// 4 KiB blocks per chunk (1..=256, a power of two).
    pub bpc: u64,
    pub device_blocks: u64,
    pub state_block: u64,
    pub journal_start: u64,
    pub journal_blocks: u64,
    pub bitmap_start: u64,
    pub bitmap_blocks: u64,
    /// First block of the allocation area (chunk aligned).
    pub alloc_start: u64,
    /// One past the last block of the allocation area (chunk aligned).
    pub area_end: u64,
    pub first_chunk: u64,
    pub device_chunks: u64,
    /// Blocks data allocation leaves for metadata, so commits never fail.
    pub reserve_blocks: u64,
}

impl Layout {
    pub fn validate_chunk_size(chunk_size: u32) -> Result<()> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(Error::Invalid(format!(
                "chunk size {chunk_size} must be a power of two between {MIN_CHUNK} and {MAX_CHUNK}"
            )));
        }
        Ok(())
    }

    /// Ring size: ~1.5% of the device, so that ordinary transactions of
    /// ~1000 pages fit on devices of 512 MiB and up, bounded so recovery
    /// stays short.
    pub fn journal_blocks_for(device_blocks: u64) -> u64 {
        (device_blocks / 64).clamp(JOURNAL_MIN, JOURNAL_MAX)
    }

    pub fn new(device_size: u64, chunk_size: u32) -> Result<Layout> {
        Self::validate_chunk_size(chunk_size)?;
        let too_small = |need: String| {
            Error::Invalid(format!(
                "device of {device_size} bytes is too small for snapmv with {chunk_size}-byte chunks: {need}"
            ))
        };
        let bpc = u64::from(chunk_size) / BLOCK;
        let device_blocks = device_size / BLOCK;
        let journal_blocks = Self::journal_blocks_for(device_blocks);
        let bitmap_blocks = device_blocks.div_ceil(BITS_PER_PAGE);
        let journal_start = 3u64;
        let bitmap_start = journal_start + journal_blocks;
        let fixed_end = bitmap_start + bitmap_blocks;
        let alloc_start = fixed_end.div_ceil(bpc) * bpc;
        let first_chunk = alloc_start / bpc;
        let device_chunks = device_size / u64::from(chunk_size);
        if device_chunks <= first_chunk {
            return Err(too_small(format!(
                "the fixed areas alone take {} bytes",
                alloc_start * BLOCK
            )));
        }
        let area_end = device_chunks * bpc;
        let area_blocks = area_end - alloc_start;
        let reserve_blocks = (area_blocks / 200).max(64);
        let need = reserve_blocks + 3 + (MIN_DATA_CHUNKS + 1) * bpc;
        if area_blocks < need {
            return Err(too_small(format!(
                "allocation area has {area_blocks} blocks, needs at least {need}"
            )));
        }
        Ok(Layout {
            device_size,
            chunk_size,
            bpc,
            device_blocks,
            state_block: 2,
            journal_start,
            journal_blocks,
            bitmap_start,
            bitmap_blocks,
            alloc_start,
            area_end,
            first_chunk,
            device_chunks,
            reserve_blocks,
        })
    }

    pub fn chunks_total(&self) -> u64 {
        self.device_chunks - self.first_chunk
    }

    pub fn area_blocks(&self) -> u64 {
        self.area_end - self.alloc_start
    }

    pub fn in_area(&self, block: u64) -> bool {
        (self.alloc_start..self.area_end).contains(&block)
    }

    pub fn chunk_in_area(&self, chunk: u64) -> bool {
        (self.first_chunk..self.device_chunks).contains(&chunk)
    }

    pub fn in_bitmap(&self, block: u64) -> bool {
        (self.bitmap_start..self.bitmap_start + self.bitmap_blocks).contains(&block)
    }

    /// Physical block of ring position `pos`.
    pub fn ring_block(&self, pos: u64) -> u64 {
        self.journal_start + pos % self.journal_blocks
    }

    /// Blocks outside the allocation area are permanently "in use".
    pub fn is_fixed(&self, block: u64) -> bool {
        !self.in_area(block)
    }
}
