//! Corruption: for each kind of metadata block, damage it and show that
//! open / get / check report it (never a panic, never a wrong answer), and
//! that every single-byte flip anywhere in a B+tree leaf or internal page is
//! reported by `check`.

mod meta_common;

use meta_common::is_corrupt;
use snapmv_engine::dev::BlockDev;
use snapmv_engine::format::{self, node};
use snapmv_engine::meta::{check, FormatOptions, Meta, Tree};
use snapmv_engine::{Error, MemDev};
use std::sync::Arc;

type D = Arc<MemDev>;

fn flip(d: &D, block: u64, pos: usize, x: u8) {
    let off = block * 4096 + pos as u64;
    let mut b = [0u8; 1];
    d.read_at(off, &mut b).unwrap();
    b[0] ^= x;
    d.write_at(off, &b).unwrap();
}

fn read_block(d: &D, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    d.read_at(block * 4096, &mut b).unwrap();
    b
}

fn write_block(d: &D, block: u64, b: &[u8]) {
    d.write_at(block * 4096, b).unwrap();
}

const KEYS: u128 = 700;

/// A store with an exceptions tree of height 2 (root internal + leaves),
/// each key mapping to its own allocated chunk; everything checkpointed
/// home so the journal no longer covers any page.
fn populated() -> (D, Vec<(u128, u64)>) {
    let d: D = Arc::new(MemDev::new(16 << 20));
    let opts = FormatOptions {
        chunk_size: 4096,
        force: false,
    };
    let mut m = Meta::format(d.clone(), &opts).unwrap();
    let mut map = Vec::new();
    for i in 0..KEYS {
        let k = i * 1000 + 7;
        let c = m.alloc_chunk().unwrap();
        m.insert(Tree::Exceptions, k, &c.to_le_bytes()).unwrap();
        map.push((k, c));
    }
    for i in 0..40u128 {
        m.insert(Tree::Nodes, i, &[i as u8; 256]).unwrap();
    }
    m.set_app_state(b"app").unwrap();
    m.checkpoint().unwrap();
    assert_eq!(m.tree_root(Tree::Exceptions).1, 2);
    assert_eq!(m.journal_used(), 0);
    drop(m);
    let rep = check(d.clone()).unwrap();
    assert!(rep.errors.is_empty(), "{:#?}", rep.errors);
    assert_eq!(rep.exceptions, KEYS as u64);
    assert_eq!(rep.data_chunks_referenced, KEYS as u64);
    (d, map)
}

fn root_and_leaf(d: &D) -> (u64, u64, u128) {
    let m = Meta::open_read_only(d.clone()).unwrap();
    let (root, h) = m.tree_root(Tree::Exceptions);
    assert_eq!(h, 2);
    let rb = read_block(d, root);
    let leaf = node::child_at(&rb, 1);
    let first_key = node::key_at(&rb, 1, 24);
    (root, leaf, first_key)
}

fn check_errors(d: &D) -> Vec<String> {
    check(d.clone()).unwrap().errors
}

fn expect_get_fails(d: &D, key: u128) {
    let mut m = Meta::open(d.clone()).unwrap();
    match m.get(Tree::Exceptions, key) {
        Err(e) => assert!(is_corrupt(&e), "{e}"),
        Ok(v) => panic!("damaged page read as valid: {v:?}"),
    }
}

#[test]
fn every_byte_of_a_leaf_and_an_internal_page() {
    let (d, _) = populated();
    let (root, leaf, leaf_key) = root_and_leaf(&d);
    for (what, block, key) in [("leaf", leaf, leaf_key), ("internal", root, leaf_key)] {
        for pos in 0..4096 {
            flip(&d, block, pos, 1 << (pos % 8));
            let errs = check_errors(&d);
            assert!(
                errs.iter().any(|e| e.contains(&format!("block {block}"))),
                "{what} byte {pos}: {errs:#?}"
            );
            if pos % 97 == 0 {
                expect_get_fails(&d, key);
            }
            flip(&d, block, pos, 1 << (pos % 8));
        }
    }
    assert!(check_errors(&d).is_empty());
}

#[test]
fn damaged_page_is_not_cached_and_heals_when_rewritten() {
    let (d, map) = populated();
    let (_, leaf, key) = root_and_leaf(&d);
    let mut m = Meta::open(d.clone()).unwrap();
    flip(&d, leaf, 100, 0xff);
    assert!(is_corrupt(&m.get(Tree::Exceptions, key).unwrap_err()));
    assert!(m.seek(Tree::Exceptions, key, key + 5).is_err());
    assert!(m.insert(Tree::Exceptions, key + 1, &[0; 8]).is_err());
    flip(&d, leaf, 100, 0xff);
    let c = map.iter().find(|x| x.0 == key).unwrap().1;
    assert_eq!(m.get_u64(Tree::Exceptions, key).unwrap(), Some(c));
}

#[test]
fn misdirected_page_is_detected() {
    let (d, _) = populated();
    let (root, leaf, key) = root_and_leaf(&d);
    let other = node::child_at(&read_block(&d, root), 2);
    let img = read_block(&d, other);
    write_block(&d, leaf, &img);
    let errs = check_errors(&d);
    assert!(
        errs.iter().any(|e| e.contains("claims to be block")),
        "{errs:#?}"
    );
    expect_get_fails(&d, key);
}

fn newest_slot(d: &D) -> u64 {
    let s: Vec<_> = (0..2)
        .map(|i| format::decode_superblock(&read_block(d, i), i).unwrap())
        .collect();
    if s[0].seq > s[1].seq {
        0
    } else {
        1
    }
}

#[test]
fn superblock_damage() {
    let (d, _) = populated();
    let newest = newest_slot(&d);
    // One slot damaged: the other, older one still opens a consistent store.
    flip(&d, newest, 200, 0x10);
    let mut m = Meta::open_read_only(d.clone()).unwrap();
    assert_eq!(m.get(Tree::Nodes, 3).unwrap(), Some(vec![3u8; 256]));
    drop(m);
    // ...but check reports the damaged slot: silently falling back could
    // roll the store back past commits the newer checkpoint covered.
    let errs = check_errors(&d);
    assert!(
        errs.iter().any(|e| e.contains("superblock slot")),
        "{errs:?}"
    );
    // Both damaged: refuse.
    flip(&d, 1 - newest, 9, 0x01);
    assert!(is_corrupt(&Meta::open(d.clone()).err().unwrap()));
    assert!(is_corrupt(&Meta::open_read_only(d.clone()).err().unwrap()));
    assert!(check(d.clone()).is_err());
    // No magic at all: not a snapmv device.
    write_block(&d, 0, &[0u8; 4096]);
    write_block(&d, 1, &[0u8; 4096]);
    assert!(matches!(Meta::open(d.clone()), Err(Error::NotFormatted(_))));
}

#[test]
fn state_page_damage() {
    let (d, _) = populated();
    flip(&d, 2, 120, 0x04);
    assert!(is_corrupt(&Meta::open(d.clone()).err().unwrap()));
    let errs = check_errors(&d);
    assert!(errs.iter().any(|e| e.contains("state page")), "{errs:#?}");
}

#[test]
fn bitmap_page_damage() {
    let (d, _) = populated();
    let sb = format::decode_superblock(&read_block(&d, 0), 0).unwrap();
    let bm = sb.layout.bitmap_start;
    flip(&d, bm, 3000, 0x80);
    let mut m = Meta::open(d.clone()).unwrap();
    assert!(is_corrupt(&m.alloc_chunk().unwrap_err()));
    assert!(is_corrupt(
        &m.free_chunk(sb.layout.first_chunk + 5).unwrap_err()
    ));
    drop(m);
    let errs = check_errors(&d);
    assert!(
        errs.iter()
            .any(|e| e.contains(&format!("bitmap block {bm}"))),
        "{errs:#?}"
    );
}

/// Damage inside the journal: a damaged last transaction looks exactly like
/// a torn one (recovery ends before it); a damaged transaction followed by a
/// valid one is corruption and is refused.
#[test]
fn journal_damage() {
    let (d, _) = populated();
    let sb = format::decode_superblock(&read_block(&d, newest_slot(&d)), newest_slot(&d)).unwrap();
    let ring = |pos: u64| sb.layout.journal_start + pos % sb.layout.journal_blocks;
    let mut m = Meta::open(d.clone()).unwrap();
    let mut lens = Vec::new();
    for i in 0..2u128 {
        m.insert(Tree::Nodes, 100 + i, &[9u8; 256]).unwrap();
        let b = m.begin_commit().unwrap().unwrap();
        lens.push(b.pages() as u64 + 2);
        b.write().unwrap();
        m.end_commit(b).unwrap();
    }
    drop(m);
    let first_desc = ring(sb.tail_pos);
    let first_commit = ring(sb.tail_pos + lens[0] - 1);
    let last_commit = ring(sb.tail_pos + lens[0] + lens[1] - 1);
    for block in [first_desc, first_commit] {
        flip(&d, block, 50, 0x02);
        assert!(is_corrupt(&Meta::open_read_only(d.clone()).err().unwrap()));
        let errs = check_errors(&d);
        assert!(errs.iter().any(|e| e.contains("journal")), "{errs:#?}");
        flip(&d, block, 50, 0x02);
    }
    flip(&d, last_commit, 3000, 0x02);
    let mut m = Meta::open_read_only(d.clone()).unwrap();
    assert_eq!(m.get(Tree::Nodes, 100).unwrap(), Some(vec![9u8; 256]));
    assert_eq!(m.get(Tree::Nodes, 101).unwrap(), None);
    drop(m);
    assert!(check_errors(&d).is_empty());
}

#[test]
fn inconsistent_trees_are_reported() {
    let (d, map) = populated();
    let mut m = Meta::open(d.clone()).unwrap();
    let g = m.geometry();
    // Outside the allocation area (chunk 1 is the superblock/journal area).
    m.insert(Tree::Exceptions, 1, &1u64.to_le_bytes()).unwrap();
    m.insert(Tree::Exceptions, 2, &(g.device_chunks + 3).to_le_bytes())
        .unwrap();
    // Two keys naming one chunk.
    m.insert(Tree::Exceptions, 3, &map[5].1.to_le_bytes())
        .unwrap();
    // A chunk allocated but named by nothing (leak), and a mapping to a
    // chunk that is free.
    let leaked = m.alloc_chunk().unwrap();
    let free = m.alloc_chunk().unwrap();
    m.free_chunk(free).unwrap();
    m.insert(Tree::Exceptions, 4, &free.to_le_bytes()).unwrap();
    m.commit().unwrap();
    drop(m);
    let errs = check_errors(&d);
    let has = |s: &str| errs.iter().any(|e| e.contains(s));
    assert!(has("maps to chunk 1, outside"), "{errs:#?}");
    assert!(has(&format!(
        "maps to chunk {}, outside",
        g.device_chunks + 3
    )));
    assert!(has("used twice"), "{errs:#?}");
    assert!(has("leaked") && has(&leaked.to_string()), "{errs:#?}");
    assert!(has("marked free") && has(&free.to_string()), "{errs:#?}");
    assert!(has("counter of data chunks"), "{errs:#?}");
}

#[test]
fn random_garbage_pages_never_panic() {
    use rand::{Rng, SeedableRng};
    let (d, map) = populated();
    let (root, leaf, _) = root_and_leaf(&d);
    let sb = format::decode_superblock(&read_block(&d, 0), 0).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let targets = [
        root,
        leaf,
        2,
        sb.layout.bitmap_start,
        0,
        1,
        sb.layout.journal_start,
    ];
    let orig: Vec<Vec<u8>> = targets.iter().map(|&b| read_block(&d, b)).collect();
    for round in 0..300 {
        let i = rng.gen_range(0..targets.len());
        let mut img = orig[i].clone();
        // Valid header and crc over garbage, or a few random flips.
        if round % 2 == 0 {
            for _ in 0..rng.gen_range(1..20) {
                let p = rng.gen_range(24..4096);
                img[p] = rng.gen();
            }
            let kind =
                format::BlockKind::from_u32(u32::from_le_bytes(img[0..4].try_into().unwrap()));
            if let Some(kind) = kind {
                let crc = format::block_crc(kind, &img);
                img[4..8].copy_from_slice(&crc.to_le_bytes());
            }
        } else {
            let p = rng.gen_range(0..4096);
            img[p] ^= 1 << rng.gen_range(0..8);
        }
        write_block(&d, targets[i], &img);
        let _ = check(d.clone());
        if let Ok(mut m) = Meta::open_read_only(d.clone()) {
            for &(k, _) in map.iter().step_by(50) {
                let _ = m.get(Tree::Exceptions, k);
                let _ = m.range(Tree::Exceptions, k, k + 5000, 10);
            }
        }
        write_block(&d, targets[i], &orig[i]);
    }
    assert!(check_errors(&d).is_empty());
}
