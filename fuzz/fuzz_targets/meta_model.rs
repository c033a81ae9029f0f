//! Model-based fuzzing of `snapmv_engine::meta::Meta` (in the manner of
//! redb's fuzzer): a fuzzer-chosen sequence of tree operations, chunk
//! allocations and frees, app-state updates, commits (one-shot, split
//! begin/write/end with mutations in between, aborted), checkpoints,
//! reopens (read-write and read-only) and checker runs, compared after
//! every step against a BTreeMap model. Any mismatch panics: that is a
//! finding, not a fuzzer artefact.
//!
//! Exceptions values are `ZERO_CHUNK` or a chunk this target allocated, so
//! the committed state is always consistent and `meta::check` must find it
//! clean.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use snapmv_engine::format::Layout;
use snapmv_engine::meta::{self, FormatOptions, Meta, Tree, ZERO_CHUNK};
use snapmv_engine::{Error, MemDev};
use snapmv_fuzz::{dev_from_image, image_of};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};

const DEV_SIZE: u64 = 8 << 20;
const CS: u32 = 4096;

type M = Meta<Arc<MemDev>>;

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Key(u16);

impl Key {
    fn get(self) -> u128 {
        let k = u128::from(self.0);
        match self.0 {
            // The very top of the key space.
            0xfff0..=0xffff => u128::MAX - (k - 0xfff0),
            // Spread over the high bits like (origin, chunk, node) keys,
            // dense enough below that removes and seeks hit.
            _ => ((k % 5) << 100) | ((k >> 13) << 48) | (k & 0x0fff),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum T {
    Exceptions,
    Nodes,
    Origins,
    ByNode,
}

impl T {
    fn tree(self) -> Tree {
        match self {
            T::Exceptions => Tree::Exceptions,
            T::Nodes => Tree::Nodes,
            T::Origins => Tree::Origins,
            T::ByNode => Tree::ByNode,
        }
    }
    fn ix(self) -> usize {
        self as usize
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    Insert { t: T, k: Key, salt: u8 },
    InsertRun { t: T, k: Key, n: u8, stride: u8, salt: u8 },
    Remove { t: T, k: Key },
    RemoveRun { t: T, k: Key, n: u8, stride: u8 },
    Get { t: T, k: Key },
    Seek { t: T, lo: Key, span: u16 },
    Range { t: T, lo: Key, span: u32, limit: u8 },
    /// Allocate a data chunk and map an exception key to it.
    MapAlloc { k: Key, n: u8 },
    /// Free of a chunk outside the allocation area: must be refused.
    FreeOutside { c: u64 },
    SetApp { len: u16, salt: u8 },
    Commit,
    /// begin_commit, then mutations, then write + end_commit.
    SplitCommit { k: Key, salt: u8 },
    /// begin_commit, then abort: the pages rejoin the open transaction.
    AbortCommit,
    Checkpoint,
    CheckpointAll,
    Reopen,
    ReopenReadOnly,
    Check,
}

#[derive(Clone, Default, PartialEq, Eq, Debug)]
struct State {
    trees: [BTreeMap<u128, Vec<u8>>; 4],
    app: Vec<u8>,
}

struct World {
    dev: Arc<MemDev>,
    m: M,
    live: State,
    committed: State,
    /// Chunks freed since the last commit (must not be handed out).
    quarantine: BTreeSet<u64>,
    reserve_chunks: u64,
}

fn val(t: Tree, k: u128, salt: u8) -> Vec<u8> {
    if t == Tree::Exceptions {
        return ZERO_CHUNK.to_le_bytes().to_vec();
    }
    (0..t.value_size())
        .map(|i| (k as u8) ^ salt ^ (i as u8).wrapping_mul(7))
        .collect()
}

fn chunk_of(v: &[u8]) -> Option<u64> {
    let c = u64::from_le_bytes(v.try_into().ok()?);
    (c != ZERO_CHUNK).then_some(c)
}

fn formatted() -> &'static [u8] {
    static IMG: OnceLock<Vec<u8>> = OnceLock::new();
    IMG.get_or_init(|| {
        let dev = Arc::new(MemDev::new(DEV_SIZE));
        let opts = FormatOptions {
            chunk_size: CS,
            force: false,
        };
        drop(Meta::format(dev.clone(), &opts).unwrap());
        image_of(&*dev)
    })
}

fn dump(m: &mut M) -> State {
    let mut s = State::default();
    for (i, t) in Tree::ALL.into_iter().enumerate() {
        let all = m.range(t, 0, u128::MAX, usize::MAX).expect("full range scan");
        s.trees[i] = all.into_iter().collect();
    }
    s.app = m.app_state().to_vec();
    s
}

/// Whether `r` is the tolerated "device full" answer.
fn full(r: &Result<impl std::fmt::Debug, Error>) -> bool {
    matches!(r, Err(Error::NoSpace))
}

impl World {
    fn new() -> World {
        let dev = dev_from_image(formatted());
        let m = Meta::open(dev.clone()).expect("open a freshly formatted device");
        let l = Layout::new(DEV_SIZE, CS).unwrap();
        World {
            dev,
            m,
            live: State::default(),
            committed: State::default(),
            quarantine: BTreeSet::new(),
            reserve_chunks: l.reserve_blocks / l.bpc,
        }
    }

    fn mapped(&self) -> BTreeSet<u64> {
        self.live.trees[0].values().filter_map(|v| chunk_of(v)).collect()
    }

    fn maybe_commit(&mut self) {
        if self.m.dirty_pages() + 24 >= self.m.max_dirty_pages() {
            self.commit();
        }
    }

    fn commit(&mut self) {
        self.m.commit().expect("commit");
        self.committed = self.live.clone();
        self.quarantine.clear();
    }

    /// Insert into the live model and Meta; frees a replaced data chunk.
    fn insert(&mut self, t: T, k: u128, v: Vec<u8>) -> bool {
        let r = self.m.insert(t.tree(), k, &v);
        if full(&r) {
            return false;
        }
        r.unwrap_or_else(|e| panic!("insert {t:?} {k:#x}: {e}"));
        if let Some(old) = self.live.trees[t.ix()].insert(k, v) {
            if let Some(c) = chunk_of(&old).filter(|_| t.ix() == 0) {
                self.free(c);
            }
        }
        true
    }

    fn free(&mut self, c: u64) {
        self.m.free_chunk(c).unwrap_or_else(|e| panic!("free of mapped chunk {c}: {e}"));
        self.quarantine.insert(c);
    }

    fn remove(&mut self, t: T, k: u128) {
        let r = self.m.remove(t.tree(), k);
        if full(&r) {
            return;
        }
        let was = r.unwrap_or_else(|e| panic!("remove {t:?} {k:#x}: {e}"));
        let old = self.live.trees[t.ix()].remove(&k);
        assert_eq!(was, old.is_some(), "remove {t:?} {k:#x}: presence differs");
        if let Some(c) = old.as_deref().and_then(chunk_of).filter(|_| t.ix() == 0) {
            self.free(c);
        }
    }

    fn alloc(&mut self) -> Option<u64> {
        match self.m.alloc_chunk() {
            Ok(c) => {
                assert!(self.m.chunk_in_area(c), "allocated chunk {c} outside the area");
                assert!(!self.mapped().contains(&c), "chunk {c} handed out twice");
                assert!(
                    !self.quarantine.contains(&c),
                    "chunk {c} reused before the freeing transaction committed"
                );
                Some(c)
            }
            Err(Error::NoSpace) => {
                let u = self.m.usage();
                let q = self.quarantine.len() as u64;
                assert!(
                    u.free_chunks <= self.reserve_chunks + q + 4,
                    "ENOSPC with {} free chunks (reserve {}, quarantined {q})",
                    u.free_chunks,
                    self.reserve_chunks
                );
                None
            }
            Err(e) => panic!("alloc_chunk: {e}"),
        }
    }

    fn query(&mut self, t: T, lo: u128, hi: u128, limit: usize) {
        let model = &self.live.trees[t.ix()];
        let want: Vec<(u128, Vec<u8>)> = model
            .range(lo..=hi)
            .take(limit)
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let got = self.m.range(t.tree(), lo, hi, limit).expect("range");
        assert_eq!(got, want, "range {t:?} {lo:#x}..={hi:#x} limit {limit}");
        let first = model.range(lo..=hi).next().map(|(k, v)| (*k, v.clone()));
        assert_eq!(self.m.seek(t.tree(), lo, hi).expect("seek"), first, "seek {t:?}");
    }

    fn run(&mut self, op: &Op) {
        match *op {
            Op::Insert { t, k, salt } => {
                let k = k.get();
                self.insert(t, k, val(t.tree(), k, salt));
            }
            Op::InsertRun { t, k, n, stride, salt } => {
                let mut k = k.get();
                for _ in 0..n % 64 {
                    self.insert(t, k, val(t.tree(), k, salt));
                    self.maybe_commit();
                    k = k.wrapping_add(u128::from(stride) + 1);
                }
            }
            Op::Remove { t, k } => self.remove(t, k.get()),
            Op::RemoveRun { t, k, n, stride } => {
                let mut k = k.get();
                for _ in 0..n % 64 {
                    self.remove(t, k);
                    self.maybe_commit();
                    k = k.wrapping_add(u128::from(stride) + 1);
                }
            }
            Op::Get { t, k } => {
                let k = k.get();
                let got = self.m.get(t.tree(), k).expect("get");
                assert_eq!(got.as_ref(), self.live.trees[t.ix()].get(&k), "get {t:?} {k:#x}");
                if t.ix() == 0 {
                    let g = self.m.get_u64(t.tree(), k).expect("get_u64");
                    let want = self.live.trees[0]
                        .get(&k)
                        .map(|v| u64::from_le_bytes(v[..8].try_into().unwrap()));
                    assert_eq!(g, want);
                }
            }
            Op::Seek { t, lo, span } => {
                let lo = lo.get();
                self.query(t, lo, lo.saturating_add(u128::from(span)), 1);
            }
            Op::Range { t, lo, span, limit } => {
                let lo = lo.get();
                let hi = if span == u32::MAX { u128::MAX } else { lo.saturating_add(u128::from(span)) };
                self.query(t, lo, hi, limit as usize);
            }
            Op::MapAlloc { k, n } => {
                let mut k = k.get();
                for _ in 0..=n % 32 {
                    let Some(c) = self.alloc() else { break };
                    if !self.insert(T::Exceptions, k, c.to_le_bytes().to_vec()) {
                        // No room for the mapping: give the chunk back.
                        self.free(c);
                        break;
                    }
                    self.maybe_commit();
                    k = k.wrapping_add(1);
                }
            }
            Op::FreeOutside { c } => {
                let g = self.m.geometry();
                let c = if c % 2 == 0 { c % (g.device_chunks - g.chunks_total) } else { g.device_chunks.saturating_add(c / 2) };
                if !self.m.chunk_in_area(c) {
                    assert!(self.m.free_chunk(c).is_err(), "free of chunk {c} outside the area accepted");
                }
            }
            Op::SetApp { len, salt } => {
                let len = len as usize % (meta::APP_STATE_MAX + 64);
                let v: Vec<u8> = (0..len).map(|i| salt ^ i as u8).collect();
                let r = self.m.set_app_state(&v);
                if len <= meta::APP_STATE_MAX {
                    r.expect("set_app_state");
                    self.live.app = v;
                } else {
                    assert!(r.is_err(), "oversized app state accepted");
                }
            }
            Op::Commit => self.commit(),
            Op::SplitCommit { k, salt } => {
                let batch = self.m.begin_commit().expect("begin_commit");
                let at_begin = self.live.clone();
                let q_begin = std::mem::take(&mut self.quarantine);
                // Joins the next transaction.
                let k = k.get();
                self.insert(T::Nodes, k, val(Tree::Nodes, k, salt));
                if let Some(b) = batch {
                    b.write().expect("commit write");
                    self.m.end_commit(b).expect("end_commit");
                }
                self.committed = at_begin;
                // Frees of the begun transaction are durable now; frees made
                // after begin stay quarantined.
                drop(q_begin);
            }
            Op::AbortCommit => {
                if let Some(b) = self.m.begin_commit().expect("begin_commit") {
                    self.m.abort_commit(b).expect("abort_commit");
                }
            }
            Op::Checkpoint => {
                self.m.checkpoint().expect("checkpoint");
                self.committed = self.live.clone();
                self.quarantine.clear();
            }
            Op::CheckpointAll => {
                self.commit();
                if let Some(b) = self.m.begin_checkpoint_all().expect("begin_checkpoint_all") {
                    b.write().expect("checkpoint write");
                    self.m.end_checkpoint(b).expect("end_checkpoint");
                }
            }
            Op::Reopen => {
                self.m = Meta::open(self.dev.clone()).expect("reopen");
                self.live = self.committed.clone();
                self.quarantine.clear();
                let got = dump(&mut self.m);
                assert!(got == self.live, "state after reopen differs from the committed model");
            }
            Op::ReopenReadOnly => {
                let before = image_of(&*self.dev);
                let mut ro = Meta::open_read_only(self.dev.clone()).expect("open read-only");
                let got = dump(&mut ro);
                assert!(got == self.committed, "read-only open differs from the committed model");
                assert!(ro.insert(Tree::Exceptions, 1, &ZERO_CHUNK.to_le_bytes()).is_err());
                assert!(ro.alloc_chunk().is_err());
                drop(ro);
                assert!(image_of(&*self.dev) == before, "read-only open wrote to the device");
            }
            Op::Check => {
                let rep = meta::check(self.dev.clone()).expect("check");
                assert!(rep.errors.is_empty(), "checker on a committed state: {:#?}", rep.errors);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let u = Unstructured::new(data);
    let Ok(ops) = Vec::<Op>::arbitrary_take_rest(u) else {
        return;
    };
    if std::env::var_os("SNAPMV_FUZZ_DEBUG").is_some() {
        eprintln!("{ops:#?}");
    }
    let mut w = World::new();
    for op in ops.iter().take(200) {
        w.run(op);
        w.maybe_commit();
    }
    // The end: everything committed survives a reopen and checks clean.
    w.commit();
    let rep = meta::check(w.dev.clone()).expect("check");
    assert!(rep.errors.is_empty(), "checker at the end: {:#?}", rep.errors);
    w.run(&Op::Reopen);
});
