//! Basic Meta behaviour: format, trees, commit, reopen, app state, format
//! refusal and chunk-size validation.

use snapmv_engine::meta::{check, FormatOptions, Meta, Tree, APP_STATE_MAX};
use snapmv_engine::{Error, MemDev};
use std::sync::Arc;

fn dev(mb: u64) -> Arc<MemDev> {
    Arc::new(MemDev::new(mb << 20))
}

fn opts(chunk: u32) -> FormatOptions {
    FormatOptions {
        chunk_size: chunk,
        force: false,
    }
}

fn v8(x: u64) -> [u8; 8] {
    x.to_le_bytes()
}

#[test]
fn format_open_insert_commit_reopen() {
    let d = dev(64);
    let mut m = Meta::format(d.clone(), &FormatOptions::default()).unwrap();
    let g = m.geometry();
    assert_eq!(g.chunk_size, 65536);
    assert_eq!(g.device_chunks, 1024);
    assert!(g.chunks_total > 900 && g.chunks_total < 1024);
    assert_eq!(m.get(Tree::Exceptions, 5).unwrap(), None);
    for k in 0..2000u128 {
        m.insert(Tree::Exceptions, k * 3, &v8(k as u64)).unwrap();
    }
    m.insert(Tree::Nodes, 7, &[7u8; 256]).unwrap();
    m.insert(Tree::Origins, 1, &[1u8; 512]).unwrap();
    m.set_app_state(b"hello").unwrap();
    m.commit().unwrap();
    drop(m);
    let mut m = Meta::open(d.clone()).unwrap();
    assert_eq!(m.app_state(), b"hello");
    for k in 0..2000u128 {
        assert_eq!(m.get_u64(Tree::Exceptions, k * 3).unwrap(), Some(k as u64));
        assert_eq!(m.get_u64(Tree::Exceptions, k * 3 + 1).unwrap(), None);
    }
    assert_eq!(m.get(Tree::Nodes, 7).unwrap(), Some(vec![7u8; 256]));
    assert_eq!(m.get(Tree::Origins, 1).unwrap(), Some(vec![1u8; 512]));
    assert_eq!(
        m.seek(Tree::Exceptions, 4, 100).unwrap().map(|x| x.0),
        Some(6)
    );
    assert_eq!(m.seek(Tree::Exceptions, 7, 8).unwrap(), None);
    let r = m.range(Tree::Exceptions, 10, 40, 5).unwrap();
    let keys: Vec<u128> = r.iter().map(|x| x.0).collect();
    assert_eq!(keys, vec![12, 15, 18, 21, 24]);
    for k in 0..2000u128 {
        assert!(m.remove(Tree::Exceptions, k * 3).unwrap());
    }
    assert!(!m.remove(Tree::Exceptions, 3).unwrap());
    m.commit().unwrap();
    drop(m);
    let rep = check(d.clone()).unwrap();
    assert!(rep.errors.is_empty(), "{:#?}", rep.errors);
    let mut m = Meta::open(d).unwrap();
    assert_eq!(m.seek(Tree::Exceptions, 0, u128::MAX).unwrap(), None);
    assert_eq!(
        m.usage().meta_blocks,
        Tree::ALL.len() as u64,
        "trees collapsed back to one root leaf each"
    );
}

#[test]
fn app_state_limits() {
    let mut m = Meta::format(dev(16), &opts(4096)).unwrap();
    assert!(matches!(
        m.set_app_state(&vec![0; APP_STATE_MAX + 1]),
        Err(Error::Invalid(_))
    ));
    m.set_app_state(&vec![3; APP_STATE_MAX]).unwrap();
    m.commit().unwrap();
    assert_eq!(m.app_state(), &vec![3; APP_STATE_MAX][..]);
}

#[test]
fn format_refuses_existing_without_force() {
    let d = dev(16);
    drop(Meta::format(d.clone(), &opts(65536)).unwrap());
    assert!(matches!(
        Meta::format(d.clone(), &opts(65536)),
        Err(Error::AlreadyFormatted)
    ));
    let m = Meta::format(
        d.clone(),
        &FormatOptions {
            chunk_size: 8192,
            force: true,
        },
    )
    .unwrap();
    assert_eq!(m.geometry().chunk_size, 8192);
}

#[test]
fn chunk_size_validation_and_small_devices() {
    for bad in [0u32, 512, 4095, 12288, 2 << 20] {
        assert!(matches!(
            Meta::format(dev(16), &opts(bad)),
            Err(Error::Invalid(_))
        ));
    }
    assert!(matches!(
        Meta::format(Arc::new(MemDev::new(256 << 10)), &opts(4096)),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(Meta::open(dev(16)), Err(Error::NotFormatted(_))));
    for cs in [4096u32, 1 << 20] {
        let m = Meta::format(dev(32), &opts(cs)).unwrap();
        assert_eq!(m.geometry().chunk_size, cs);
    }
}

#[test]
fn read_only_refuses_writes() {
    let d = dev(16);
    drop(Meta::format(d.clone(), &opts(65536)).unwrap());
    let mut m = Meta::open_read_only(d).unwrap();
    assert!(matches!(m.alloc_chunk(), Err(Error::ReadOnly)));
    assert!(matches!(
        m.insert(Tree::Exceptions, 1, &v8(1)),
        Err(Error::ReadOnly)
    ));
    assert!(m.begin_commit().unwrap().is_none());
}

/// `walk_cached` against a `BTreeMap`: random skips forward over a tree
/// several levels deep land on the first key at or after their target,
/// within a leaf or across leaves, and stop at `hi`; a page the cache
/// does not hold fails the walk with `NotCached`; a skip backwards is
/// refused.
#[test]
fn walks_skip_like_a_sorted_map() {
    use rand::{Rng, SeedableRng};
    use snapmv_engine::meta::Walk;
    let mut m = Meta::format(dev(64), &opts(4096)).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
    let mut model = std::collections::BTreeMap::new();
    for _ in 0..20_000 {
        let k = rng.gen_range(0..1u128 << 40);
        m.insert(Tree::Exceptions, k, &v8(k as u64)).unwrap();
        model.insert(k, k as u64);
    }
    let (first, last) = (*model.keys().next().unwrap(), *model.keys().last().unwrap());
    for round in 0..300 {
        let lo = rng.gen_range(0..=last);
        let hi = rng.gen_range(lo..=last + 10);
        let mut want: Vec<u128> = Vec::new();
        let mut got: Vec<u128> = Vec::new();
        // The model's walk: the same skips, drawn from a copy of the rng.
        let mut skips = rand_chacha::ChaCha8Rng::seed_from_u64(round);
        let mut at = lo;
        while let Some((&k, _)) = model.range(at..).next().filter(|(k, _)| **k <= hi) {
            want.push(k);
            match skips.gen_range(0..4) {
                0 => at = k + 1,
                1 => at = k + rng_skip(&mut skips),
                2 if want.len() > 40 => break,
                _ => at = k + 1,
            }
        }
        let mut skips = rand_chacha::ChaCha8Rng::seed_from_u64(round);
        m.walk_cached(Tree::Exceptions, lo, hi, &mut |k, v| {
            assert_eq!(u64::from_le_bytes(v.try_into().unwrap()), k as u64);
            got.push(k);
            Ok(match skips.gen_range(0..4) {
                0 => Walk::Next,
                1 => Walk::Seek(k + rng_skip(&mut skips)),
                2 if got.len() > 40 => Walk::Stop,
                _ => Walk::Next,
            })
        })
        .unwrap();
        assert_eq!(got, want, "round {round}: walk {lo:#x}..={hi:#x}");
    }
    let back = m.walk_cached(Tree::Exceptions, first, last, &mut |k, _| Ok(Walk::Seek(k)));
    assert!(matches!(back, Err(Error::Invalid(_))), "{back:?}");
    // Cold pages: a shared walk reads nothing and says which page it missed.
    m.commit().unwrap();
    m.checkpoint().unwrap();
    m.set_cache_budget(0);
    let cold = m.walk_cached(Tree::Exceptions, first, last, &mut |_, _| Ok(Walk::Next));
    assert!(matches!(cold, Err(Error::NotCached(_))), "{cold:?}");
}

/// A skip of a few keys (within a leaf) or of many (across leaves).
fn rng_skip(rng: &mut impl rand::Rng) -> u128 {
    match rng.gen_bool(0.5) {
        true => rng.gen_range(1..1u128 << 30),
        false => rng.gen_range(1..1u128 << 38),
    }
}
