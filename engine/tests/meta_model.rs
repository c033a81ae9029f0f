//! B+tree against a BTreeMap model: random inserts, removes, gets, seeks and
//! ranges, with commits, checkpoints and reopens in between (a reopen drops
//! whatever was not committed, so the model keeps the committed copy too).
//!
//! Each workload also runs with a page cache budget of a few pages, so
//! clean pages are evicted and read again all the time, while dirty and
//! not-yet-checkpointed pages must stay (the planted bug `evict_dirty`
//! evicts them, and these tests catch it).

mod meta_common;

use meta_common::{maybe_commit, snapshot, tree_ix, Model};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use snapmv_engine::meta::{check, FormatOptions, Meta, Tree, MIN_CLEAN_PAGES, PAGE_SIZE};
use snapmv_engine::MemDev;
use std::sync::Arc;

type M = Meta<Arc<MemDev>>;

#[derive(Clone, Debug)]
enum Phase {
    Insert(u16),
    Remove(u16),
    Queries(u16),
    Commit,
    Checkpoint,
    Reopen,
}

fn phase() -> impl Strategy<Value = Phase> {
    prop_oneof![
        4 => (1u16..3000).prop_map(Phase::Insert),
        2 => (1u16..2000).prop_map(Phase::Remove),
        2 => (1u16..200).prop_map(Phase::Queries),
        2 => Just(Phase::Commit),
        1 => Just(Phase::Checkpoint),
        1 => Just(Phase::Reopen),
    ]
}

struct World {
    dev: Arc<MemDev>,
    m: M,
    live: Model,
    committed: Model,
    rng: ChaCha8Rng,
    /// Keys are drawn from 0..span (dense, so removes and seeks hit).
    span: u128,
    /// Page cache budget in bytes; None keeps the default.
    budget: Option<u64>,
}

/// A budget of a few pages: eviction on nearly every miss.
const TINY: Option<u64> = Some(6 * PAGE_SIZE as u64);

fn val(t: Tree, k: u128, salt: u64) -> Vec<u8> {
    let mut v = vec![0u8; t.value_size()];
    let x = (k as u64) ^ salt.rotate_left(17);
    for (i, b) in v.iter_mut().enumerate() {
        *b = (x >> (i % 8 * 8)) as u8 ^ i as u8;
    }
    if t == Tree::Exceptions {
        // Exceptions values are chunk numbers; keep them ZERO_CHUNK so the
        // checker's space accounting holds without real allocations.
        v.copy_from_slice(&u64::MAX.to_le_bytes());
    }
    v
}

impl World {
    fn new(seed: u64, span: u128, budget: Option<u64>) -> Self {
        let dev = Arc::new(MemDev::new(256 << 20));
        let m = Meta::format(dev.clone(), &FormatOptions::default()).unwrap();
        let mut w = World {
            dev,
            m,
            live: Model::default(),
            committed: Model::default(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            span,
            budget,
        };
        w.set_budget();
        w
    }

    fn set_budget(&mut self) {
        if let Some(b) = self.budget {
            self.m.set_cache_budget(b);
        }
    }

    fn open(dev: &Arc<MemDev>, budget: Option<u64>) -> M {
        let mut m = Meta::open(dev.clone()).unwrap();
        if let Some(b) = budget {
            m.set_cache_budget(b);
        }
        m
    }

    /// The cache holds its budget, or the pinned pages and the floor of
    /// clean ones when those exceed it.
    fn check_cache(&self) {
        let s = self.m.cache_stats();
        let bound = (s.budget / PAGE_SIZE as u64).max(s.pinned + MIN_CLEAN_PAGES as u64);
        assert!(s.pages <= bound, "{s:?}");
        assert_eq!(s.bytes, s.pages * PAGE_SIZE as u64);
        assert!(s.pinned <= s.pages);
    }

    fn tree(&mut self) -> Tree {
        // Mostly exceptions; Origins (7 per leaf) grows tall quickly.
        match self.rng.gen_range(0..10) {
            0..=5 => Tree::Exceptions,
            6 => Tree::Nodes,
            _ => Tree::Origins,
        }
    }

    fn key(&mut self) -> u128 {
        let k = self.rng.gen_range(0..self.span);
        // Spread keys over the high bits too, like (origin, chunk, node).
        (k % 7) << 100 | k
    }

    fn commit(&mut self) {
        self.m.commit().unwrap();
        self.committed = self.live.clone();
    }

    fn run(&mut self, p: &Phase) {
        match *p {
            Phase::Insert(n) => {
                for _ in 0..n {
                    let (t, k) = (self.tree(), self.key());
                    let v = val(t, k, self.rng.gen());
                    self.m.insert(t, k, &v).unwrap();
                    self.live.trees[tree_ix(t)].insert(k, v);
                    if self.m.dirty_pages() + 16 >= self.m.max_dirty_pages() {
                        self.commit();
                    }
                    self.check_cache();
                }
            }
            Phase::Remove(n) => {
                for _ in 0..n {
                    let (t, k) = (self.tree(), self.key());
                    let was = self.live.trees[tree_ix(t)].remove(&k).is_some();
                    assert_eq!(self.m.remove(t, k).unwrap(), was);
                    if self.m.dirty_pages() + 16 >= self.m.max_dirty_pages() {
                        self.commit();
                    }
                    self.check_cache();
                }
            }
            Phase::Queries(n) => {
                for _ in 0..n {
                    self.query();
                }
            }
            Phase::Commit => self.commit(),
            Phase::Checkpoint => {
                self.m.checkpoint().unwrap();
                self.committed = self.live.clone();
            }
            Phase::Reopen => {
                self.m = Self::open(&self.dev, self.budget);
                self.live = self.committed.clone();
                assert_eq!(snapshot(&mut self.m).unwrap(), self.live);
            }
        }
    }

    fn query(&mut self) {
        let (t, lo) = (self.tree(), self.key());
        let hi = lo.saturating_add(self.rng.gen_range(0..50u128));
        let model = &self.live.trees[tree_ix(t)];
        assert_eq!(self.m.get(t, lo).unwrap().as_ref(), model.get(&lo));
        let want = model.range(lo..=hi).next().map(|(k, v)| (*k, v.clone()));
        assert_eq!(
            self.m.seek(t, lo, hi).unwrap(),
            want,
            "seek {lo:#x}..={hi:#x}"
        );
        let limit = self.rng.gen_range(0..20);
        let want: Vec<_> = model
            .range(lo..=hi)
            .take(limit)
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        assert_eq!(self.m.range(t, lo, hi, limit).unwrap(), want);
        self.check_cache();
    }

    fn finish(mut self) {
        self.commit();
        assert_eq!(snapshot(&mut self.m).unwrap(), self.live);
        drop(self.m);
        let rep = check(self.dev.clone()).unwrap();
        assert!(rep.errors.is_empty(), "{:#?}", rep.errors);
        let mut m = Self::open(&self.dev, self.budget);
        assert_eq!(snapshot(&mut m).unwrap(), self.live);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn btree_matches_model(
        seed in any::<u64>(),
        span in prop_oneof![Just(500u128), Just(5000u128), Just(60000u128)],
        phases in proptest::collection::vec(phase(), 1..25),
    ) {
        let mut w = World::new(seed, span, None);
        for p in &phases {
            w.run(p);
        }
        w.finish();
    }

    /// The same with a cache of a few pages.
    #[test]
    fn btree_matches_model_tiny_cache(
        seed in any::<u64>(),
        span in prop_oneof![Just(500u128), Just(5000u128), Just(60000u128)],
        phases in proptest::collection::vec(phase(), 1..25),
    ) {
        let mut w = World::new(seed, span, TINY);
        for p in &phases {
            w.run(p);
        }
        w.finish();
    }
}

/// Tens of thousands of keys: the exceptions tree reaches height 3 and the
/// origins tree height 4, then shrinks back to a single leaf.
#[test]
fn deep_trees_grow_and_collapse() {
    deep_trees(None);
}

/// The same through a cache of a few pages: most lookups miss, and the
/// pages evicted are read back from home and validated again.
#[test]
fn deep_trees_tiny_cache() {
    let s = deep_trees(TINY);
    assert!(s.evictions > 1000 && s.misses > 1000, "{s:?}");
}

/// A mixed workload with a tiny cache, without reopens: what eviction
/// may not take (dirty pages, pages committed but not yet checkpointed)
/// must still be there at each commit and checkpoint.
#[test]
fn tiny_cache_keeps_pinned_pages() {
    for seed in 0..4 {
        let mut w = World::new(seed, 5000, TINY);
        for p in [
            Phase::Insert(2500),
            Phase::Commit,
            Phase::Remove(800),
            Phase::Queries(100),
            Phase::Commit,
            Phase::Insert(1500),
            Phase::Checkpoint,
            Phase::Remove(1500),
            Phase::Queries(100),
            Phase::Commit,
            Phase::Reopen,
            Phase::Queries(200),
        ] {
            w.run(&p);
            assert_eq!(snapshot(&mut w.m).unwrap(), w.live, "after {p:?}");
        }
        let s = w.m.cache_stats();
        assert!(s.evictions > 0, "{s:?}");
        w.finish();
    }
}

fn deep_trees(budget: Option<u64>) -> snapmv_engine::meta::CacheStats {
    let mut w = World::new(7, 1 << 40, budget);
    let mut keys = Vec::new();
    for i in 0..45_000u64 {
        let k = w.key();
        let t = if i % 8 == 0 {
            Tree::Origins
        } else {
            Tree::Exceptions
        };
        let v = val(t, k, i);
        w.m.insert(t, k, &v).unwrap();
        w.live.trees[tree_ix(t)].insert(k, v);
        keys.push((t, k));
        maybe_commit(&mut w.m).unwrap();
    }
    w.commit();
    assert!(
        w.m.tree_root(Tree::Exceptions).1 >= 3,
        "{:?}",
        w.m.tree_root(Tree::Exceptions)
    );
    assert!(
        w.m.tree_root(Tree::Origins).1 >= 3,
        "{:?}",
        w.m.tree_root(Tree::Origins)
    );
    w.run(&Phase::Reopen);
    for _ in 0..500 {
        w.query();
    }
    let rep = check(w.dev.clone()).unwrap();
    assert!(rep.errors.is_empty(), "{:#?}", rep.errors);
    assert!(rep.pages_checked > 300);
    for (t, k) in keys {
        let was = w.live.trees[tree_ix(t)].remove(&k).is_some();
        assert_eq!(w.m.remove(t, k).unwrap(), was);
        maybe_commit(&mut w.m).unwrap();
    }
    w.commit();
    assert_eq!(w.m.tree_root(Tree::Exceptions).1, 1);
    assert_eq!(w.m.tree_root(Tree::Origins).1, 1);
    assert_eq!(w.m.usage().meta_blocks, Tree::ALL.len() as u64);
    let stats = w.m.cache_stats();
    w.finish();
    stats
}

/// Sequential (append) inserts fill leaves completely; reverse order and
/// keys at the extremes of the u128 space work too.
#[test]
fn sequential_and_extreme_keys() {
    let mut w = World::new(3, 10, None);
    let ks: Vec<u128> = (0..5000u128)
        .chain((0..3000u128).map(|i| u128::MAX - i))
        .chain((0..3000u128).map(|i| (1 << 64) + 3000 - i))
        .collect();
    for &k in &ks {
        let v = val(Tree::Exceptions, k, 1);
        w.m.insert(Tree::Exceptions, k, &v).unwrap();
        w.live.trees[0].insert(k, v);
        maybe_commit(&mut w.m).unwrap();
    }
    assert_eq!(
        w.m.seek(Tree::Exceptions, u128::MAX, u128::MAX)
            .unwrap()
            .map(|x| x.0),
        Some(u128::MAX)
    );
    assert_eq!(
        w.m.seek(Tree::Exceptions, 5000, 1 << 65)
            .unwrap()
            .map(|x| x.0),
        Some((1 << 64) + 1)
    );
    assert_eq!(w.m.seek(Tree::Exceptions, 5000, 1 << 64).unwrap(), None);
    w.finish();
}

/// Throughput smoke test (run with --release --ignored --nocapture).
#[test]
#[ignore]
fn perf_smoke() {
    use std::time::Instant;
    let mut w = World::new(11, 1 << 60, None);
    let n = 300_000u64;
    let t0 = Instant::now();
    let mut keys = Vec::with_capacity(n as usize);
    for i in 0..n {
        let k = w.key();
        let _ = i;
        w.m.insert(Tree::Exceptions, k, &u64::MAX.to_le_bytes())
            .unwrap();
        keys.push(k);
        maybe_commit(&mut w.m).unwrap();
    }
    w.m.commit().unwrap();
    let ins = t0.elapsed();
    let t1 = Instant::now();
    for k in &keys {
        assert!(w.m.get(Tree::Exceptions, *k).unwrap().is_some());
    }
    let get = t1.elapsed();
    let t2 = Instant::now();
    for k in &keys {
        assert!(w
            .m
            .seek(Tree::Exceptions, *k, k.saturating_add(1 << 20))
            .unwrap()
            .is_some());
    }
    let seek = t2.elapsed();
    let t3 = Instant::now();
    drop(std::mem::replace(
        &mut w.m,
        Meta::open(w.dev.clone()).unwrap(),
    ));
    let reopen = t3.elapsed();
    let t4 = Instant::now();
    let rep = check(w.dev.clone()).unwrap();
    let chk = t4.elapsed();
    assert!(
        rep.errors.is_empty(),
        "{:#?}",
        &rep.errors[..rep.errors.len().min(5)]
    );
    eprintln!(
        "{n} keys, height {}: insert {:.0} ns/op, get {:.0} ns/op, seek {:.0} ns/op, reopen {:?}, check {:?} ({} pages)",
        w.m.tree_root(Tree::Exceptions).1,
        ins.as_nanos() as f64 / n as f64,
        get.as_nanos() as f64 / n as f64,
        seek.as_nanos() as f64 / n as f64,
        reopen,
        chk,
        rep.pages_checked
    );
}
