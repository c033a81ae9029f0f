//! Space map: allocation until NoSpace, the metadata reserve, quarantine of
//! freed chunks until their transaction commits, argument validation, and
//! heavy random use that must leave `check` clean and the counters right.

mod meta_common;

use meta_common::{is_corrupt, maybe_commit};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use snapmv_engine::meta::{check, FormatOptions, Meta, Tree, ZERO_CHUNK};
use snapmv_engine::{Error, MemDev};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

type M = Meta<Arc<MemDev>>;

fn fresh(mb: u64, chunk: u32) -> (Arc<MemDev>, M) {
    let d = Arc::new(MemDev::new(mb << 20));
    let opts = FormatOptions {
        chunk_size: chunk,
        force: false,
    };
    let m = Meta::format(d.clone(), &opts).unwrap();
    (d, m)
}

fn fill(m: &mut M) -> Vec<u64> {
    let mut got = Vec::new();
    loop {
        match m.alloc_chunk() {
            Ok(c) => got.push(c),
            Err(Error::NoSpace) => return got,
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn alloc_until_full_free_commit_realloc() {
    for chunk in [4096u32, 65536, 1 << 20] {
        let (_d, mut m) = fresh(64, chunk);
        let g = m.geometry();
        let got = fill(&mut m);
        let set: BTreeSet<u64> = got.iter().copied().collect();
        assert_eq!(set.len(), got.len(), "no chunk handed out twice");
        assert!(got
            .iter()
            .all(|&c| c >= g.device_chunks - g.chunks_total && c < g.device_chunks));
        // Only the metadata reserve (~0.5%, at least 64 blocks) and the
        // chunks holding tree pages are left.
        let reserve_chunks = (64 * 4096u64)
            .div_ceil(u64::from(chunk))
            .max(g.chunks_total / 200 * 4096 / u64::from(chunk));
        assert!(
            got.len() as u64 + reserve_chunks + 4 >= g.chunks_total,
            "chunk {chunk}: {} of {}",
            got.len(),
            g.chunks_total
        );
        let u = m.usage();
        assert_eq!(u.data_chunks, got.len() as u64);
        // One root leaf per tree, one 4 KiB block each.
        let root_chunks = if chunk == 4096 {
            Tree::ALL.len() as u64
        } else {
            1
        };
        assert_eq!(
            u.data_chunks + u.free_chunks + root_chunks,
            g.chunks_total,
            "{u:?}"
        );
        m.commit().unwrap();
        for &c in &got {
            m.free_chunk(c).unwrap();
        }
        // Freed but not yet committed: not reusable.
        assert!(matches!(m.alloc_chunk(), Err(Error::NoSpace)));
        m.commit().unwrap();
        let again = fill(&mut m);
        assert_eq!(again.len(), got.len());
        m.commit().unwrap();
    }
}

#[test]
fn freed_chunk_not_reused_before_commit() {
    let (_d, mut m) = fresh(16, 65536);
    let all = fill(&mut m);
    m.commit().unwrap();
    let victim = all[all.len() / 2];
    m.free_chunk(victim).unwrap();
    assert!(matches!(m.alloc_chunk(), Err(Error::NoSpace)));
    // Through the split API: still quarantined until end_commit.
    let b = m.begin_commit().unwrap().unwrap();
    assert!(matches!(m.alloc_chunk(), Err(Error::NoSpace)));
    b.write().unwrap();
    assert!(matches!(m.alloc_chunk(), Err(Error::NoSpace)));
    m.end_commit(b).unwrap();
    // The reserve is a block count, so any free chunk may come back now.
    let c = m.alloc_chunk().unwrap();
    assert!(c == victim || !all.contains(&c));
    assert!(matches!(m.alloc_chunk(), Err(Error::NoSpace)));
}

#[test]
fn free_validation() {
    let (_d, mut m) = fresh(16, 65536);
    let g = m.geometry();
    let first = g.device_chunks - g.chunks_total;
    assert!(matches!(m.free_chunk(0), Err(Error::Invalid(_))));
    assert!(matches!(m.free_chunk(first - 1), Err(Error::Invalid(_))));
    assert!(matches!(
        m.free_chunk(g.device_chunks),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(m.free_chunk(ZERO_CHUNK), Err(Error::Invalid(_))));
    let c = m.alloc_chunk().unwrap();
    assert!(
        is_corrupt(&m.free_chunk(c + 1).unwrap_err()),
        "not allocated"
    );
    m.free_chunk(c).unwrap();
    assert!(is_corrupt(&m.free_chunk(c).unwrap_err()), "double free");
    // The chunk holding the tree roots is not a data chunk.
    assert!(is_corrupt(&m.free_chunk(first).unwrap_err()));
    m.commit().unwrap();
}

#[test]
fn metadata_may_use_the_reserve() {
    let (d, mut m) = fresh(8, 4096);
    let got = fill(&mut m);
    m.commit().unwrap();
    // Data is out of space, yet the trees can still grow into the reserve.
    for (i, c) in got.iter().enumerate() {
        m.insert(Tree::Exceptions, i as u128, &c.to_le_bytes())
            .unwrap();
        maybe_commit(&mut m).unwrap();
    }
    for i in 0..200u128 {
        m.insert(Tree::Nodes, i, &[1; 256]).unwrap();
    }
    m.commit().unwrap();
    drop(m);
    let rep = check(d).unwrap();
    assert!(rep.errors.is_empty(), "{:#?}", rep.errors);
}

/// Random allocs, frees, mappings, commits, checkpoints and reopens; the
/// checker must find every counter and bitmap bit consistent.
#[test]
fn heavy_random_use_checks_clean() {
    for (seed, chunk) in [(1u64, 4096u32), (2, 65536), (3, 8192)] {
        let (d, mut m) = fresh(24, chunk);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut live: BTreeMap<u128, u64> = BTreeMap::new();
        let mut committed = live.clone();
        for step in 0..6000 {
            match rng.gen_range(0..10) {
                0..=5 => match m.alloc_chunk() {
                    Ok(c) => {
                        let k = rng.gen::<u128>() >> 8;
                        m.insert(Tree::Exceptions, k, &c.to_le_bytes()).unwrap();
                        if let Some(old) = live.insert(k, c) {
                            m.free_chunk(old).unwrap();
                        }
                    }
                    Err(Error::NoSpace) => {}
                    Err(e) => panic!("{e}"),
                },
                6..=8 if !live.is_empty() => {
                    let k = *live.keys().nth(rng.gen_range(0..live.len())).unwrap();
                    let c = live.remove(&k).unwrap();
                    assert!(m.remove(Tree::Exceptions, k).unwrap());
                    m.free_chunk(c).unwrap();
                }
                _ => {
                    let k = rng.gen::<u128>() >> 8;
                    m.insert(Tree::Exceptions, k, &ZERO_CHUNK.to_le_bytes())
                        .unwrap();
                    if let Some(old) = live.remove(&k) {
                        m.free_chunk(old).unwrap();
                    }
                }
            }
            maybe_commit(&mut m).unwrap();
            if step % 97 == 0 {
                m.commit().unwrap();
                committed = live.clone();
            }
            if step % 1013 == 0 {
                m = Meta::open(d.clone()).unwrap();
                live = committed.clone();
            }
        }
        m.commit().unwrap();
        let u = m.usage();
        assert_eq!(u.data_chunks, live.len() as u64);
        drop(m);
        let rep = check(d.clone()).unwrap();
        assert!(rep.errors.is_empty(), "seed {seed}: {:#?}", rep.errors);
        assert_eq!(rep.data_chunks_referenced, live.len() as u64);
    }
}

/// The "no free chunk" shortcut must not outlive a release.
#[test]
fn full_device_recovers_after_frees_commit() {
    let (_d, mut m) = fresh(8, 4096);
    let got = fill(&mut m);
    m.commit().unwrap();
    for _ in 0..3 {
        assert!(matches!(m.alloc_chunk(), Err(Error::NoSpace)));
    }
    for &c in &got[..10] {
        m.free_chunk(c).unwrap();
    }
    m.commit().unwrap();
    let again = fill(&mut m);
    assert_eq!(again.len(), 10);
}
