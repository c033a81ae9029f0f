//! Space-map bitmap pages: one bit per 4 KiB block of the device, 1 = in use.
//!
//! Payload is 504 u64 words after the header: 32256 bits per page. 32256 is
//! a multiple of 256 (the most blocks one chunk can span), so a chunk's bits
//! never straddle two pages.

use super::{check_header, init_header, BlockKind, Page, Result, HEADER_SIZE, PAGE_SIZE};

pub const BITMAP_WORDS: usize = (PAGE_SIZE - HEADER_SIZE) / 8;
pub const BITS_PER_PAGE: u64 = BITMAP_WORDS as u64 * 64;

const _: () = assert!(BITS_PER_PAGE.is_multiple_of(256));

pub fn decode_bitmap(buf: &[u8], expected_block: u64) -> Result<()> {
    check_header(buf, expected_block, &[BlockKind::Bitmap]).map(|_| ())
}

pub fn init_bitmap(buf: &mut Page, block: u64) {
    buf.fill(0);
    init_header(buf, BlockKind::Bitmap, block, 0);
}

/// Word `i` (0..BITMAP_WORDS) of a bitmap page.
pub fn word(buf: &Page, i: usize) -> u64 {
    assert!(i < BITMAP_WORDS);
    super::rd_u64(buf, HEADER_SIZE + i * 8)
}

pub fn set_word(buf: &mut Page, i: usize, w: u64) {
    assert!(i < BITMAP_WORDS);
    super::wr_u64(buf, HEADER_SIZE + i * 8, w);
}
