//! Self-describing sector content.
//!
//! Every sector the workload writes is `gen(stamp, lba)`: the write's unique
//! stamp, the sector's logical address within its version, and 496 bytes of
//! noise derived from both. The model then keeps one u64 per sector, and a
//! wrong read can be explained ("holds write #812 of tag 3 at op 57") or
//! recognised as garbage or misplaced data. Stamp 0 is all zeros.

use crate::simdev::mix;

pub const SECTOR: usize = 512;

/// Fill `out` (512 bytes) with the content of `stamp` at `lba`.
pub fn gen_sector(stamp: u64, lba: u64, out: &mut [u8]) {
    debug_assert_eq!(out.len(), SECTOR);
    if stamp == 0 {
        out.fill(0);
        return;
    }
    out[0..8].copy_from_slice(&stamp.to_le_bytes());
    out[8..16].copy_from_slice(&lba.to_le_bytes());
    let mut x = mix(stamp ^ lba.rotate_left(29) ^ 0x5eed);
    for c in out[16..].chunks_mut(8) {
        x = mix(x);
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
}

/// Content of `stamps.len()` sectors starting at `lba`.
pub fn gen_run(stamps: &[u64], lba: u64) -> Vec<u8> {
    let mut v = vec![0u8; stamps.len() * SECTOR];
    for (i, (s, out)) in stamps.iter().zip(v.chunks_mut(SECTOR)).enumerate() {
        gen_sector(*s, lba + i as u64, out);
    }
    v
}

/// Whether `buf` is exactly `gen(stamp, lba)`.
pub fn matches(buf: &[u8], stamp: u64, lba: u64) -> bool {
    if stamp == 0 {
        return buf.iter().all(|&b| b == 0);
    }
    if buf.len() != SECTOR || buf[0..8] != stamp.to_le_bytes() || buf[8..16] != lba.to_le_bytes() {
        return false;
    }
    let mut tmp = [0u8; SECTOR];
    gen_sector(stamp, lba, &mut tmp);
    tmp[..] == buf[..]
}

/// What a sector holds, as far as the pattern can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Exactly `gen(stamp, lba)` for the expected lba (0 = zeros).
    Stamp(u64),
    /// A valid sector of `stamp`, but for another address: misplaced data.
    Misplaced { stamp: u64, lba: u64 },
    /// Anything else: torn inside a sector, bit-flipped, or metadata.
    Garbage,
}

pub fn decode(buf: &[u8], lba: u64) -> Decoded {
    if buf.iter().all(|&b| b == 0) {
        return Decoded::Stamp(0);
    }
    if buf.len() != SECTOR {
        return Decoded::Garbage;
    }
    let mut a = [0u8; 8];
    a.copy_from_slice(&buf[0..8]);
    let stamp = u64::from_le_bytes(a);
    a.copy_from_slice(&buf[8..16]);
    let at = u64::from_le_bytes(a);
    if stamp != 0 && matches(buf, stamp, at) {
        if at == lba {
            Decoded::Stamp(stamp)
        } else {
            Decoded::Misplaced { stamp, lba: at }
        }
    } else {
        Decoded::Garbage
    }
}
