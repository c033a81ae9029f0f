//! On-disk format decoders (`snapmv_engine::format`): arbitrary bytes in,
//! Ok or Err out, never a panic.
//!
//! Input: byte 0 picks the decoder and a mode, bytes 1..9 the expected block
//! number, the rest is the block. In "sealed" mode the target first writes
//! the decoder's block type and the expected block number into the header
//! and recomputes the crc, so the fuzzer reaches the checks *behind* the
//! checksum (counts, lengths, key order, layout cross-checks) instead of
//! stopping at "checksum mismatch" every time. Whatever decodes is encoded
//! again and must decode to the same value (round trip).
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapmv_engine::format::{self, node, BlockKind, Layout, PAGE_SIZE};

fn kind_for(sel: u8) -> BlockKind {
    BlockKind::ALL[sel as usize % BlockKind::ALL.len()]
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let sel = data[0];
    let which = sel & 0x0f;
    let sealed = sel & 0x10 != 0;
    let small_block = sel & 0x20 != 0;
    let mut blk = u64::from_le_bytes(data[1..9].try_into().unwrap());
    if small_block {
        blk %= 4;
    }
    let body = &data[9..];

    // Sealed mode: a full page with a matching type, block number and crc.
    let mut page = [0u8; PAGE_SIZE];
    let n = body.len().min(PAGE_SIZE);
    page[..n].copy_from_slice(&body[..n]);
    let kind = match which {
        0 => BlockKind::Superblock,
        1 => BlockKind::JournalDesc,
        2 => BlockKind::JournalCommit,
        3 => {
            if page[28..32] == [0, 0, 0, 0] {
                BlockKind::Leaf
            } else {
                BlockKind::Internal
            }
        }
        4 => BlockKind::Bitmap,
        5 => BlockKind::State,
        _ => kind_for(page[0]),
    };
    let buf: &[u8] = if sealed {
        if which == 0 {
            blk %= 2;
            // Give the superblock decoder a chance to get past the magic.
            page[64..72].copy_from_slice(&format::MAGIC);
            page[72..76].copy_from_slice(&format::FORMAT_VERSION.to_le_bytes());
            if sel & 0x40 != 0 {
                // And past the layout cross-check: record the fields the
                // decoder recomputes from device size and chunk size.
                let cs = 4096u32 << (page[76] % 9);
                page[76..80].copy_from_slice(&cs.to_le_bytes());
                if let Ok(l) = Layout::new(format::rd_u64(&page, 80), cs) {
                    for (off, v) in [
                        (96, l.journal_start),
                        (104, l.journal_blocks),
                        (112, l.bitmap_start),
                        (120, l.bitmap_blocks),
                        (128, l.alloc_start),
                        (136, l.state_block),
                        (160, l.device_chunks),
                        (168, l.first_chunk),
                    ] {
                        format::wr_u64(&mut page, off, v);
                    }
                }
            }
        }
        format::wr_u32(&mut page, 0, kind as u32);
        format::wr_u64(&mut page, 8, blk);
        format::seal(&mut page);
        &page[..]
    } else {
        body
    };

    match which {
        0 => {
            let _ = format::has_magic(buf);
            if let Ok(sb) = format::decode_superblock(buf, blk) {
                let again = format::encode_superblock(&sb, blk % 2);
                let back = format::decode_superblock(&again[..], blk % 2)
                    .expect("re-encoded superblock must decode");
                assert_eq!(back, sb, "superblock round trip");
                // The recorded layout is internally consistent.
                let l = sb.layout;
                assert!(l.journal_start + l.journal_blocks == l.bitmap_start);
                assert!(l.bitmap_start + l.bitmap_blocks <= l.alloc_start);
                assert!(l.alloc_start < l.area_end && l.area_end <= l.device_blocks);
                assert!(sb.tail_pos < l.journal_blocks);
                let _ = l.ring_block(sb.tail_pos.wrapping_mul(7));
            }
        }
        1 => {
            if let Ok(d) = format::decode_descriptor(buf, blk) {
                assert!(d.homes.len() + d.revokes.len() <= format::DESC_SLOTS);
                let again = format::encode_descriptor(&d, blk);
                let back = format::decode_descriptor(&again[..], blk)
                    .expect("re-encoded descriptor must decode");
                assert_eq!(back, d, "descriptor round trip");
            }
        }
        2 => {
            if let Ok(c) = format::decode_commit(buf, blk) {
                let again = format::encode_commit(&c, blk);
                let back = format::decode_commit(&again[..], blk)
                    .expect("re-encoded commit must decode");
                assert_eq!(back, c, "commit round trip");
            }
        }
        3 => {
            if let Ok(info) = format::decode_node(buf, blk) {
                // A validated page: the accessors must stay in bounds.
                let Ok(p) = <&[u8; PAGE_SIZE]>::try_from(buf) else {
                    return;
                };
                assert!(info.count <= node::capacity(info.level, info.value_size));
                assert_eq!(node::count(p), info.count);
                let esz = info.entry_size();
                let probe = format::rd_u128(body, 0);
                let mut prev = None;
                for i in 0..info.count {
                    let k = node::key_at(p, i, esz);
                    if let Some(pk) = prev {
                        assert!(pk < k, "decode_node accepted unsorted keys");
                    }
                    prev = Some(k);
                    if info.level == 0 {
                        assert_eq!(node::value_at(p, i, esz).len(), info.value_size);
                    } else {
                        let _ = node::child_at(p, i);
                    }
                    assert_eq!(node::search(p, info.count, esz, k), Ok(i));
                }
                let _ = node::search(p, info.count, esz, probe);
                if info.level > 0 && info.count > 0 {
                    let ci = node::child_index(p, info.count, probe);
                    assert!(ci < info.count);
                }
                let _ = node::entries(p, 0, info.count, esz);
            }
        }
        4 => {
            if format::decode_bitmap(buf, blk).is_ok() {
                if let Ok(p) = <&[u8; PAGE_SIZE]>::try_from(buf) {
                    for i in 0..format::BITMAP_WORDS {
                        let _ = format::bitmap::word(p, i);
                    }
                }
            }
        }
        5 => {
            if let Ok(st) = format::decode_state(buf, blk) {
                assert!(st.app_state.len() <= format::APP_STATE_CAP);
                let again = format::encode_state(&st, blk);
                let back = format::decode_state(&again[..], blk)
                    .expect("re-encoded state page must decode");
                assert_eq!(back, st, "state page round trip");
            }
        }
        6 => {
            // The generic header check with an arbitrary expectation set.
            let kinds: Vec<BlockKind> = body.iter().take(3).map(|b| kind_for(*b)).collect();
            if let Ok(h) = format::check_header(buf, blk, &kinds) {
                assert_eq!(h.block, blk);
                assert!(kinds.contains(&h.kind));
            }
        }
        7 => {
            // Layout from arbitrary geometry: never panics, and what it
            // accepts is consistent.
            let dev = format::rd_u64(body, 0);
            let cs = format::rd_u32(body, 8);
            let _ = Layout::validate_chunk_size(cs);
            let _ = Layout::journal_blocks_for(dev);
            if let Ok(l) = Layout::new(dev, cs) {
                assert!(l.bpc >= 1 && l.bpc <= 256 && l.bpc.is_power_of_two());
                assert!(l.alloc_start % l.bpc == 0 && l.area_end % l.bpc == 0);
                assert!(l.alloc_start < l.area_end && l.area_end <= l.device_blocks);
                assert!(l.reserve_blocks < l.area_blocks());
                assert!(l.chunks_total() > 0);
                assert!(l.chunk_in_area(l.first_chunk));
                assert!(!l.chunk_in_area(l.device_chunks));
                assert!(l.is_fixed(0) && !l.is_fixed(l.alloc_start));
            }
        }
        _ => {
            // Everything at once, on the same (raw or sealed) bytes.
            let _ = format::decode_superblock(buf, blk);
            let _ = format::decode_descriptor(buf, blk);
            let _ = format::decode_commit(buf, blk);
            let _ = format::decode_node(buf, blk);
            let _ = format::decode_bitmap(buf, blk);
            let _ = format::decode_state(buf, blk);
            let _ = format::check_header(buf, blk, &BlockKind::ALL);
            let _ = format::block_crc(kind, buf);
        }
    }
});
