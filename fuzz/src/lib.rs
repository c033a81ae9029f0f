//! Helpers shared by the snapmv fuzz targets: building small COW images on
//! `MemDev`, turning images back into devices, and "resealing" damaged
//! metadata so that fuzzer mutations get past the crc32c checks and reach
//! the structural validation behind them.

use snapmv_engine::dev::BlockDev;
use snapmv_engine::format::{self, BlockKind, BLOCK, PAGE_SIZE};
use snapmv_engine::store::{Dev, FormatOptions, Store};
use snapmv_engine::{Error, MemDev};
use std::sync::Arc;

/// Chunk size of every image built here (smallest allowed: smallest images).
pub const CHUNK: u32 = 4096;

/// Copy a whole device into a byte vector.
pub fn image_of(dev: &dyn BlockDev) -> Vec<u8> {
    let mut v = vec![0u8; dev.size() as usize];
    dev.read_at(0, &mut v).expect("read back a MemDev");
    v
}

/// A fresh `MemDev` holding `img`. Only non-zero 64 KiB pieces are written,
/// so a mostly empty image costs little.
pub fn dev_from_image(img: &[u8]) -> Arc<MemDev> {
    let dev = Arc::new(MemDev::new(img.len() as u64));
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    for (i, piece) in img.chunks(64 * 1024).enumerate() {
        // A slice compare (memcmp), not a byte loop: this runs on every
        // input and the byte loop is slow under coverage instrumentation.
        if piece != &ZEROS[..piece.len()] {
            dev.write_at((i * 64 * 1024) as u64, piece)
                .expect("write into a MemDev");
        }
    }
    dev
}

/// Indexes of the 4 KiB blocks of `img` that look like metadata (their
/// first word is a known block type).
pub fn metadata_blocks(img: &[u8]) -> Vec<usize> {
    img.chunks(PAGE_SIZE)
        .enumerate()
        .filter(|(_, b)| {
            b.len() == PAGE_SIZE && BlockKind::from_u32(format::rd_u32(b, 0)).is_some()
        })
        .map(|(i, _)| i)
        .collect()
}

/// Recompute the crc of every block whose type field is a known type. The
/// block-number field is left as it is, so misdirection stays detectable.
pub fn reseal_all(img: &mut [u8]) {
    for b in img.chunks_mut(PAGE_SIZE) {
        if let Ok(page) = <&mut [u8; PAGE_SIZE]>::try_from(b) {
            if BlockKind::from_u32(format::rd_u32(page, 0)).is_some() {
                format::seal(page);
            }
        }
    }
}

fn block(img: &[u8], b: u64) -> Option<&[u8]> {
    let s = usize::try_from(b.checked_mul(BLOCK)?).ok()?;
    img.get(s..s.checked_add(PAGE_SIZE)?)
}

fn block_mut(img: &mut [u8], b: u64) -> Option<&mut [u8; PAGE_SIZE]> {
    let s = usize::try_from(b.checked_mul(BLOCK)?).ok()?;
    img.get_mut(s..s.checked_add(PAGE_SIZE)?)
        .and_then(|s| <&mut [u8; PAGE_SIZE]>::try_from(s).ok())
}

/// Walk the journal from the newest valid superblock's tail and make every
/// transaction's commit block agree with its (possibly mutated) descriptors
/// and images: the commit's `data_crc` is recomputed and the block resealed.
/// Together with [`reseal_all`] this lets mutated journal content be
/// replayed, which is where a damaged journal is most dangerous.
pub fn fix_journal(img: &mut [u8]) {
    let mut best: Option<format::Superblock> = None;
    for slot in 0..2u64 {
        if let Some(b) = block(img, slot) {
            if let Ok(sb) = format::decode_superblock(b, slot) {
                if best.is_none_or(|x| sb.seq > x.seq) {
                    best = Some(sb);
                }
            }
        }
    }
    let Some(sb) = best else { return };
    let l = sb.layout;
    let n = l.journal_blocks;
    let (mut pos, mut seq, mut scanned) = (sb.tail_pos, sb.tail_seq, 0u64);
    // Bounded: every transaction takes at least two ring blocks.
    'txns: while scanned < n {
        let mut k = 0u64;
        let mut crc = format::JOURNAL_DATA_SALT;
        loop {
            if scanned + k >= n {
                return;
            }
            let rb = l.ring_block(pos + k);
            let Some(buf) = block(img, rb) else { return };
            let Ok(d) = format::decode_descriptor(buf, rb) else {
                return;
            };
            if d.seq != seq || d.uuid != sb.uuid {
                return;
            }
            crc = crc32c::crc32c_append(crc, buf);
            k += 1;
            for _ in &d.homes {
                let Some(img_b) = block(img, l.ring_block(pos + k)) else {
                    return;
                };
                crc = crc32c::crc32c_append(crc, img_b);
                k += 1;
                if k > n {
                    return;
                }
            }
            if d.last {
                break;
            }
        }
        let cb = l.ring_block(pos + k);
        let Some(page) = block_mut(img, cb) else { return };
        match format::decode_commit(&page[..], cb) {
            Ok(c) if c.seq == seq && c.uuid == sb.uuid => {
                format::wr_u32(page, 36, crc);
                format::seal(page);
            }
            _ => break 'txns,
        }
        pos = (pos + k + 1) % n;
        scanned += k + 1;
        seq += 1;
    }
}

/// Resolver for `Store::open` over a fixed list of origin devices. With
/// `fallback`, an unknown id gets the first device (lets damaged origin
/// records reach the data path instead of stopping at open).
pub fn resolver(
    origins: &[(String, Arc<MemDev>)],
    fallback: bool,
) -> impl FnMut(&str, &str) -> snapmv_engine::Result<Dev> + '_ {
    move |id, _path| {
        origins
            .iter()
            .find(|(i, _)| i == id)
            .or(if fallback { origins.first() } else { None })
            .map(|(_, d)| d.clone() as Dev)
            .ok_or_else(|| Error::NoSuchOrigin(id.into()))
    }
}

/// Deterministic, non-metadata-looking content for data writes and origins
/// (first word never a valid block type).
pub fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| 0xA0 ^ (i as u8).wrapping_mul(31) ^ salt.rotate_left((i % 7) as u32))
        .collect()
}

/// A formatted, empty store on a fresh `MemDev` of `size` bytes.
pub fn fresh_store(size: u64) -> (Arc<MemDev>, Store) {
    let cow = Arc::new(MemDev::new(size));
    let store = Store::format(
        cow.clone(),
        &FormatOptions {
            chunk_size: CHUNK,
            force: false,
        },
    )
    .expect("format a fresh MemDev");
    (cow, store)
}

/// A fresh origin device filled with [`pattern`].
pub fn origin_dev(size: usize, salt: u8) -> Arc<MemDev> {
    let d = Arc::new(MemDev::new(size as u64));
    d.write_at(0, &pattern(size, salt)).expect("fill origin");
    d
}
