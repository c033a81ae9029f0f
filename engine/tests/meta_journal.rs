//! Journal edge cases: ring wrap without regular checkpoints, transactions
//! too large for the ring, multi-descriptor transactions with many revokes
//! replayed after a crash, and checkpoints that are aborted or outstanding
//! while commits go on.

mod meta_common;

use meta_common::{maybe_commit, snapshot, CrashDev, Model};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use snapmv_engine::dev::BlockDev;
use snapmv_engine::meta::{check, FormatOptions, Meta, Tree, ZERO_CHUNK};
use snapmv_engine::{Error, MemDev};
use std::sync::Arc;

fn zero() -> [u8; 8] {
    ZERO_CHUNK.to_le_bytes()
}

fn fmt<D: BlockDev>(d: D, chunk: u32) -> Meta<D> {
    let opts = FormatOptions {
        chunk_size: chunk,
        force: false,
    };
    Meta::format(d, &opts).unwrap()
}

fn split_commit<D: BlockDev + 'static>(m: &mut Meta<D>) {
    if let Some(b) = m.begin_commit().unwrap() {
        b.write().unwrap();
        m.end_commit(b).unwrap();
    }
}

/// Commits through the split API and never calls begin_checkpoint: the ring
/// fills, wraps, and begin_commit makes room itself.
#[test]
fn ring_wraps_without_regular_checkpoints() {
    let d = Arc::new(MemDev::new(8 << 20));
    let mut m = fmt(d.clone(), 4096);
    let ring = 256u64;
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut model = Model::default();
    for _ in 0..300 {
        for _ in 0..rng.gen_range(1..60) {
            let k = rng.gen_range(0..20_000u128);
            if rng.gen_bool(0.7) {
                m.insert(Tree::Exceptions, k, &zero()).unwrap();
                model.trees[0].insert(k, zero().to_vec());
            } else {
                m.remove(Tree::Exceptions, k).unwrap();
                model.trees[0].remove(&k);
            }
        }
        split_commit(&mut m);
        assert!(m.journal_used() <= ring);
    }
    drop(m);
    let mut m = Meta::open(d.clone()).unwrap();
    assert_eq!(snapshot(&mut m).unwrap(), model);
    drop(m);
    assert!(check(d).unwrap().errors.is_empty());
}

/// A transaction larger than the ring is refused with a clear error and
/// does no damage; the last committed state stays intact.
#[test]
fn oversized_transaction_is_refused() {
    let d = Arc::new(MemDev::new(8 << 20));
    let mut m = fmt(d.clone(), 4096);
    m.insert(Tree::Nodes, 1, &[1; 256]).unwrap();
    m.commit().unwrap();
    let max = m.max_dirty_pages();
    assert!(max >= 250, "{max}");
    let mut i = 0u128;
    while m.dirty_pages() <= max + 2 {
        // Nodes leaves hold 14 records: spread keys so each dirties a leaf.
        m.insert(Tree::Nodes, 1000 + i, &[2; 256]).unwrap();
        i += 1;
    }
    match m.begin_commit() {
        Err(Error::Invalid(msg)) => assert!(msg.contains("max_dirty_pages"), "{msg}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("oversized transaction accepted"),
    }
    drop(m);
    let mut m = Meta::open(d.clone()).unwrap();
    assert_eq!(m.get(Tree::Nodes, 1).unwrap(), Some(vec![1; 256]));
    assert_eq!(m.get(Tree::Nodes, 1000).unwrap(), None);
    drop(m);
    assert!(check(d).unwrap().errors.is_empty());
}

/// Hundreds of images and revokes in single transactions (several
/// descriptor blocks), left in the journal by a "crash" and replayed.
#[test]
fn multi_descriptor_transactions_replay() {
    let d = CrashDev::new(256 << 20);
    let mut m = fmt(d.clone(), 65536);
    let max = m.max_dirty_pages();
    assert!(max > 1000, "{max}");
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut keys = Vec::new();
    while m.dirty_pages() < 900 {
        let k = rng.gen::<u128>();
        m.insert(Tree::Exceptions, k, &zero()).unwrap();
        keys.push(k);
    }
    m.commit().unwrap();
    m.checkpoint().unwrap();
    // One transaction that rewrites ~600 leaves (two descriptors).
    for k in &keys {
        m.insert(Tree::Exceptions, *k, &7u64.to_le_bytes().map(|_| 0xff))
            .unwrap();
    }
    assert!(m.dirty_pages() > 504, "{}", m.dirty_pages());
    split_commit(&mut m);
    // One transaction that frees every leaf: hundreds of revokes.
    let before = m.usage().meta_blocks;
    for k in &keys[..keys.len() - 10] {
        m.remove(Tree::Exceptions, *k).unwrap();
        maybe_commit(&mut m).unwrap();
    }
    assert!(m.usage().meta_blocks + 500 < before);
    split_commit(&mut m);
    let want = snapshot(&mut m).unwrap();
    assert!(m.journal_used() > 600, "still in the journal");
    // Crash: nothing after the last flush is lost since every commit
    // flushed; reopen replays both transactions.
    let img = d.durable_image();
    drop(m);
    let d2 = CrashDev::from_image(img);
    let mut ro = Meta::open_read_only(d2.clone()).unwrap();
    assert_eq!(snapshot(&mut ro).unwrap(), want);
    drop(ro);
    let rep = check(d2.clone()).unwrap();
    assert!(rep.errors.is_empty(), "{:#?}", rep.errors);
    let mut rw = Meta::open(d2.clone()).unwrap();
    assert_eq!(rw.journal_used(), 0, "recovery checkpointed");
    assert_eq!(snapshot(&mut rw).unwrap(), want);
}

/// A checkpoint that fails to write is aborted: its pages stay pending and
/// the next checkpoint writes them.
#[test]
fn aborted_checkpoint_keeps_pages_pending() {
    let d = Arc::new(MemDev::new(8 << 20));
    let mut m = fmt(d.clone(), 4096);
    for k in 0..500u128 {
        m.insert(Tree::Exceptions, k, &zero()).unwrap();
    }
    split_commit(&mut m);
    let cp = m.begin_checkpoint_all().unwrap().unwrap();
    assert!(m.begin_checkpoint_all().unwrap().is_none(), "one at a time");
    assert!(matches!(m.commit(), Err(Error::Busy(_))));
    m.abort_checkpoint(cp).unwrap();
    m.checkpoint().unwrap();
    assert_eq!(m.journal_used(), 0);
    drop(m);
    // Wipe the journal: everything must be home now.
    d.write_at(3 * 4096, &vec![0u8; 256 * 4096]).unwrap();
    let mut m = Meta::open(d.clone()).unwrap();
    assert_eq!(
        m.range(Tree::Exceptions, 0, u128::MAX, 1000).unwrap().len(),
        500
    );
    drop(m);
    assert!(check(d).unwrap().errors.is_empty());
}

/// Commits while a checkpoint is being written: chunks they free stay
/// quarantined until the checkpoint ends (it may still write old images).
#[test]
fn commits_during_an_outstanding_checkpoint() {
    let d = Arc::new(MemDev::new(8 << 20));
    let mut m = fmt(d.clone(), 4096);
    let mut chunks = Vec::new();
    while let Ok(c) = m.alloc_chunk() {
        m.insert(Tree::Exceptions, c as u128, &c.to_le_bytes())
            .unwrap();
        chunks.push(c);
        maybe_commit(&mut m).unwrap();
    }
    split_commit(&mut m);
    let cp = m.begin_checkpoint_all().unwrap().unwrap();
    for &c in &chunks[..100] {
        m.remove(Tree::Exceptions, c as u128).unwrap();
        m.free_chunk(c).unwrap();
    }
    split_commit(&mut m);
    assert!(
        matches!(m.alloc_chunk(), Err(Error::NoSpace)),
        "deferred until checkpoint ends"
    );
    cp.write().unwrap();
    m.end_checkpoint(cp).unwrap();
    let c = m.alloc_chunk().unwrap();
    m.insert(Tree::Exceptions, c as u128, &c.to_le_bytes())
        .unwrap();
    m.checkpoint().unwrap();
    drop(m);
    let rep = check(d.clone()).unwrap();
    assert!(rep.errors.is_empty(), "{:#?}", rep.errors);
    assert_eq!(rep.data_chunks_referenced, chunks.len() as u64 - 99);
}

/// Format of a device whose journal holds another format's valid records
/// never replays them, even if the superblocks were lost.
#[test]
fn reformat_never_replays_old_journal() {
    let d = Arc::new(MemDev::new(8 << 20));
    let mut m = fmt(d.clone(), 4096);
    for i in 0..20u128 {
        m.insert(Tree::Nodes, i, &[5; 256]).unwrap();
        split_commit(&mut m);
    }
    drop(m);
    // Lose both superblocks, then format again (no force needed now).
    d.write_at(0, &[0u8; 8192]).unwrap();
    let mut m = fmt(d.clone(), 4096);
    assert_eq!(m.get(Tree::Nodes, 3).unwrap(), None);
    m.insert(Tree::Nodes, 100, &[6; 256]).unwrap();
    split_commit(&mut m);
    drop(m);
    let mut m = Meta::open(d.clone()).unwrap();
    assert_eq!(m.range(Tree::Nodes, 0, u128::MAX, 100).unwrap().len(), 1);
    drop(m);
    assert!(check(d).unwrap().errors.is_empty());
}
