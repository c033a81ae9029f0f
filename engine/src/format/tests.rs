use super::node;
use super::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn layout() -> Layout {
    Layout::new(64 << 20, 64 * 1024).unwrap()
}

#[test]
fn chunk_size_validation() {
    for bad in [0, 1, 2048, 4095, 4097, 3 * 4096, 2 << 20] {
        assert!(matches!(
            Layout::new(1 << 30, bad),
            Err(crate::Error::Invalid(_))
        ));
    }
    for good in [4096, 8192, 64 * 1024, 1 << 20] {
        Layout::new(1 << 30, good).unwrap();
    }
    assert!(matches!(
        Layout::new(1 << 20, 64 * 1024),
        Err(crate::Error::Invalid(_))
    ));
}

#[test]
fn layout_is_ordered_and_aligned() {
    for (size, cs) in [
        (64u64 << 20, 4096u32),
        (64 << 20, 1 << 20),
        (3 << 30, 65536),
        (10 << 20, 8192),
    ] {
        let l = Layout::new(size, cs).unwrap();
        assert!(l.journal_start == 3 && l.bitmap_start == 3 + l.journal_blocks);
        assert!(l.alloc_start >= l.bitmap_start + l.bitmap_blocks);
        assert_eq!(l.alloc_start % l.bpc, 0);
        assert!(l.bitmap_blocks * BITS_PER_PAGE >= l.device_blocks);
        assert!(l.area_end <= l.device_blocks);
        assert_eq!(l.chunks_total(), l.device_chunks - l.first_chunk);
    }
}

#[test]
fn superblock_roundtrip_and_slot_check() {
    let sb = Superblock {
        seq: 7,
        version: FORMAT_VERSION,
        uuid: 0xdead_beef,
        layout: layout(),
        tail_pos: 5,
        tail_seq: 99,
    };
    let p = encode_superblock(&sb, 1);
    assert_eq!(decode_superblock(&p[..], 1).unwrap(), sb);
    assert!(decode_superblock(&p[..], 0).is_err(), "misdirected");
    for i in [0usize, 5, 9, 70, 100, 4095] {
        let mut q = p.clone();
        q[i] ^= 0x40;
        assert!(decode_superblock(&q[..], 1).is_err(), "flip at {i}");
    }
}

#[test]
fn state_roundtrip() {
    let s = StateRec {
        roots: [
            TreeRoot {
                block: 10,
                height: 1,
            },
            TreeRoot {
                block: 11,
                height: 3,
            },
            TreeRoot {
                block: 12,
                height: 2,
            },
            TreeRoot {
                block: 13,
                height: 4,
            },
        ],
        data_chunks: 1,
        meta_blocks: 2,
        free_blocks: 3,
        meta_chunks: 4,
        data_cursor: 5,
        meta_cursor: 6,
        app_state: vec![9; APP_STATE_CAP],
    };
    let p = encode_state(&s, 2);
    assert_eq!(decode_state(&p[..], 2).unwrap(), s);
    // Format 1's pages hold zeros where root 3 lives: it decodes absent.
    let mut v1 = s.clone();
    v1.roots[3] = TreeRoot::default();
    let back = decode_state(&encode_state(&v1, 2)[..], 2).unwrap();
    assert!(!back.roots[3].exists() && back.roots[..3] == s.roots[..3]);
    // Only root 3 may be absent.
    let mut bad = s.clone();
    bad.roots[1] = TreeRoot::default();
    assert!(decode_state(&encode_state(&bad, 2)[..], 2).is_err());
}

#[test]
fn journal_roundtrip() {
    let d = Descriptor {
        seq: 3,
        uuid: 4,
        last: true,
        homes: vec![1, 2, 3],
        revokes: vec![8, 9],
    };
    let p = encode_descriptor(&d, 100);
    assert_eq!(decode_descriptor(&p[..], 100).unwrap(), d);
    let c = CommitRec {
        seq: 3,
        uuid: 4,
        blocks: 5,
        data_crc: 6,
    };
    let p = encode_commit(&c, 101);
    assert_eq!(decode_commit(&p[..], 101).unwrap(), c);
    assert!(decode_descriptor(&p[..], 101).is_err(), "wrong type");
}

#[test]
fn node_ops() {
    let mut p = new_page();
    node::init_node(&mut p, 50, 0, 0, 8);
    let esz = node::entry_size(0, 8);
    for k in [5u128, 1, 9, 3] {
        let n = node::count(&p);
        let i = node::search(&p, n, esz, k).unwrap_err();
        node::insert_at(&mut p, i, &node::leaf_entry(k, &(k as u64).to_le_bytes()));
    }
    seal(&mut p);
    let info = decode_node(&p[..], 50).unwrap();
    assert_eq!(info.count, 4);
    let keys: Vec<u128> = (0..4).map(|i| node::key_at(&p[..], i, esz)).collect();
    assert_eq!(keys, vec![1, 3, 5, 9]);
    node::remove_at(&mut p, 1, esz);
    assert_eq!(node::search(&p, 3, esz, 5), Ok(1));
}

/// Decoders see arbitrary bytes from disk and fuzzers: they must never panic.
#[test]
fn decoders_never_panic_on_garbage() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let good = [
        encode_superblock(
            &Superblock {
                seq: 1,
                version: FORMAT_VERSION,
                uuid: 2,
                layout: layout(),
                tail_pos: 0,
                tail_seq: 1,
            },
            0,
        ),
        encode_state(&StateRec::default(), 2),
    ];
    for round in 0..3000 {
        let len = if round % 10 == 0 {
            rng.gen_range(0..5000)
        } else {
            PAGE_SIZE
        };
        let mut buf: Vec<u8> = if round % 2 == 0 && len == PAGE_SIZE {
            good[round % 2].to_vec()
        } else {
            (0..len).map(|_| rng.gen()).collect()
        };
        // Keep a valid type and crc half the time so the parsers go deep.
        if len == PAGE_SIZE && round % 3 != 0 {
            let kind = BlockKind::ALL[rng.gen_range(0..7)];
            buf[0..4].copy_from_slice(&(kind as u32).to_le_bytes());
            buf[8..16].copy_from_slice(&0u64.to_le_bytes());
            if round % 5 == 0 {
                buf[32..36].copy_from_slice(&rng.gen_range(0u32..600).to_le_bytes());
            }
            let crc = block_crc(kind, &buf);
            buf[4..8].copy_from_slice(&crc.to_le_bytes());
        }
        let _ = decode_superblock(&buf, 0);
        let _ = decode_state(&buf, 0);
        let _ = decode_descriptor(&buf, 0);
        let _ = decode_commit(&buf, 0);
        let _ = decode_node(&buf, 0);
        let _ = decode_bitmap(&buf, 0);
        let _ = has_magic(&buf);
    }
}

/// Superblocks with a valid crc and magic but arbitrary geometry: decoding
/// validates (recomputes the layout) and never panics or overflows.
#[test]
fn crafted_superblocks_never_panic() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for i in 0..5000 {
        let mut l = layout();
        let pick = |rng: &mut ChaCha8Rng| match rng.gen_range(0..4) {
            0 => 0,
            1 => u64::MAX - rng.gen_range(0..3),
            2 => rng.gen_range(0..1 << 20),
            _ => rng.gen(),
        };
        l.device_size = pick(&mut rng);
        l.chunk_size = if i % 3 == 0 {
            rng.gen()
        } else {
            1 << rng.gen_range(10..22)
        };
        l.journal_blocks = pick(&mut rng);
        l.bitmap_blocks = pick(&mut rng);
        l.alloc_start = pick(&mut rng);
        let sb = Superblock {
            seq: rng.gen(),
            version: rng.gen_range(OLDEST_FORMAT_VERSION..=FORMAT_VERSION),
            uuid: rng.gen(),
            layout: l,
            tail_pos: pick(&mut rng),
            tail_seq: rng.gen(),
        };
        let p = encode_superblock(&sb, 0);
        if let Ok(back) = decode_superblock(&p[..], 0) {
            assert_eq!(
                back.layout,
                Layout::new(l.device_size, l.chunk_size).unwrap()
            );
        }
    }
}
