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

/// A COW device wrapper that enforces what may ever be written to the fixed
/// blocks whose position does not depend on the (possibly damaged) layout:
/// blocks 0 and 1 take only whole, valid superblocks for their slot, and
/// block 2 only a whole, valid state page. Anything else there (data written
/// through a bogus exception value, say) panics: that is a finding.
pub struct GuardDev(pub Arc<MemDev>);

impl BlockDev for GuardDev {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> snapmv_engine::Result<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> snapmv_engine::Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        if offset < 3 * BLOCK && end > 0 {
            let whole = offset % BLOCK == 0 && buf.len() == PAGE_SIZE;
            let blk = offset / BLOCK;
            let ok = whole
                && match blk {
                    0 | 1 => format::decode_superblock(buf, blk).is_ok(),
                    _ => format::check_header(buf, 2, &[BlockKind::State]).is_ok(),
                };
            assert!(
                ok,
                "write of {} bytes at offset {offset} lands on superblock/state block {blk} \
                 and is not a valid page for it",
                buf.len()
            );
        }
        self.0.write_at(offset, buf)
    }
    fn flush(&self) -> snapmv_engine::Result<()> {
        self.0.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> snapmv_engine::Result<()> {
        assert!(
            offset >= 3 * BLOCK,
            "discard of {len} bytes at {offset} covers the superblocks or the state page"
        );
        self.0.discard(offset, len)
    }
}

/// Known, reported findings to step over during a long campaign, so the
/// fuzzer keeps looking for new ones. `SNAPMV_FUZZ_IGNORE` holds
/// comma-separated substrings of panic locations ("meta/mod.rs:80"). Unset
/// (the default, and in `run-slice.sh`), every panic is a crash.
pub fn run_ignoring_known(f: impl FnOnce()) {
    use std::cell::Cell;
    use std::sync::OnceLock;
    static KNOWN: OnceLock<Vec<String>> = OnceLock::new();
    thread_local!(static HIT: Cell<bool> = const { Cell::new(false) });
    let known = KNOWN.get_or_init(|| {
        let list: Vec<String> = std::env::var("SNAPMV_FUZZ_IGNORE")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if !list.is_empty() {
            // Wrap libFuzzer's hook (which aborts): known locations unwind
            // instead and are caught below.
            let prev = std::panic::take_hook();
            let list2 = list.clone();
            std::panic::set_hook(Box::new(move |info| {
                let loc = info.location().map(|l| format!("{}:{}", l.file(), l.line()));
                if loc.is_some_and(|l| list2.iter().any(|k| l.contains(k.as_str()))) {
                    HIT.with(|h| h.set(true));
                    return;
                }
                prev(info)
            }));
        }
        list
    });
    if known.is_empty() {
        return f();
    }
    HIT.with(|h| h.set(false));
    if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        if !HIT.with(|h| h.get()) {
            std::panic::resume_unwind(e);
        }
    }
}
