//! Model-based tests of the whole store on MemDev: random operation
//! sequences against a naive model that keeps every version as a full byte
//! array, with clean close + reopen in between, and the checker after each
//! reopen. Every verification also diffs every pair of versions of each
//! origin (`Store::diff`): no chunk whose bytes differ may be missed; the
//! chunks reported with equal bytes are counted and printed (this model
//! knows bytes, not copies: `store_diff.rs` checks that such chunks are
//! only ever ones read from different copies).

use proptest::prelude::*;
use snapmv_engine::store::{self, Dev, FormatOptions, Store};
use snapmv_engine::{Error, MemDev};
use std::collections::BTreeMap;
use std::sync::Arc;

const CS: u64 = 4096;
const ORIGIN_SIZE: u64 = 16 * CS + 1024; // a short last chunk
const COW_SIZE: u64 = 8 << 20;

struct World {
    cow: Arc<MemDev>,
    origins: Vec<(String, Arc<MemDev>)>,
    store: Store,
    /// (origin index, tag) -> content; tag 0 is the origin itself.
    model: BTreeMap<(usize, u64), Vec<u8>>,
    now: i64,
}

impl World {
    fn new() -> World {
        let cow = Arc::new(MemDev::new(COW_SIZE));
        let store = Store::format(
            cow.clone(),
            &FormatOptions {
                chunk_size: CS as u32,
                force: false,
            },
        )
        .unwrap();
        let mut origins = Vec::new();
        let mut model = BTreeMap::new();
        for (i, id) in ["sdb1", "sdb2"].iter().enumerate() {
            let dev = Arc::new(MemDev::new(ORIGIN_SIZE));
            let init: Vec<u8> = (0..ORIGIN_SIZE)
                .map(|b| (b as u8) ^ (i as u8 * 0x55))
                .collect();
            dev.write_at_test(&init);
            store
                .bind(id, &format!("/dev/{id}"), dev.clone(), 0)
                .unwrap();
            origins.push((id.to_string(), dev));
            model.insert((i, 0), init);
        }
        World {
            cow,
            origins,
            store,
            model,
            now: 1_700_000_000,
        }
    }

    fn reopen(&mut self) {
        let s = std::mem::replace(&mut self.store, dummy());
        s.close().unwrap();
        let report = store::check(self.cow.clone()).unwrap();
        assert!(
            report.errors.is_empty(),
            "check after close: {:?}",
            report.errors
        );
        let origins = self.origins.clone();
        self.store = Store::open(self.cow.clone(), &mut |id, _path| {
            origins
                .iter()
                .find(|(i, _)| i == id)
                .map(|(_, d)| d.clone() as Dev)
                .ok_or_else(|| Error::NoSuchOrigin(id.into()))
        })
        .unwrap();
        // After a clean close the origin devices hold exactly the origins' content.
        for (i, (_, dev)) in self.origins.iter().enumerate() {
            let rb = self.store.status().rollback.map(|r| r.origin);
            if rb.as_deref() == Some(self.origins[i].0.as_str()) {
                continue; // a rollback in progress still redirects reads
            }
            let mut raw = vec![0u8; ORIGIN_SIZE as usize];
            snapmv_engine::BlockDev::read_at(&**dev, 0, &mut raw).unwrap();
            assert!(
                raw == self.model[&(i, 0)],
                "origin device {i} differs from the origin's content"
            );
        }
    }

    fn tags(&self, o: usize) -> Vec<u64> {
        self.model
            .keys()
            .filter(|(oi, t)| *oi == o && *t != 0)
            .map(|(_, t)| *t)
            .collect()
    }

    fn vol(&self, o: usize, tag: u64) -> snapmv_engine::store::Volume {
        self.store
            .volume(&self.origins[o].0, (tag != 0).then_some(tag))
            .unwrap()
    }

    /// Block status: extents tile the range; a Zero extent reads zeros; a
    /// Shared one reads what the origin holds (unless a rollback is still
    /// redirecting the origin's reads).
    fn verify_map(&self, o: usize, tag: u64, content: &[u8]) {
        use snapmv_engine::store::ExtentKind;
        let ext = self.vol(o, tag).block_status(0, ORIGIN_SIZE).unwrap();
        let mut pos = 0;
        let rb = self.store.status().rollback.is_some();
        for e in ext {
            assert_eq!(e.offset, pos, "extents tile the volume");
            let (a, b) = (e.offset as usize, (e.offset + e.len) as usize);
            match e.kind {
                ExtentKind::Zero => assert!(
                    content[a..b].iter().all(|x| *x == 0),
                    "zero extent {a}..{b}"
                ),
                ExtentKind::Shared if !rb => {
                    assert!(
                        content[a..b] == self.model[&(o, 0)][a..b],
                        "shared extent {a}..{b} of tag {tag}"
                    )
                }
                _ => {}
            }
            pos += e.len;
        }
        assert_eq!(pos, ORIGIN_SIZE);
    }

    /// Diff every pair of versions of each origin against the model's
    /// bytes: a chunk that differs is always reported. Returns (pairs,
    /// chunks reported, chunks reported with equal bytes).
    fn verify_diffs(&self) -> (u64, u64, u64) {
        let (mut pairs, mut reported, mut unchanged) = (0, 0, 0);
        for (o, (id, _)) in self.origins.iter().enumerate() {
            let versions: Vec<u64> = self
                .model
                .keys()
                .filter(|(oi, _)| *oi == o)
                .map(|(_, t)| *t)
                .collect();
            for (i, &a) in versions.iter().enumerate() {
                for &b in &versions[i + 1..] {
                    let ext = self
                        .store
                        .diff(
                            id,
                            (a != 0).then_some(a),
                            (b != 0).then_some(b),
                            0,
                            ORIGIN_SIZE,
                        )
                        .unwrap();
                    pairs += 1;
                    let (x, y) = (&self.model[&(o, a)], &self.model[&(o, b)]);
                    for c in 0..ORIGIN_SIZE.div_ceil(CS) {
                        let r = (c * CS) as usize..((c + 1) * CS).min(ORIGIN_SIZE) as usize;
                        let is = ext.iter().any(|e| {
                            e.offset <= r.start as u64 && r.end as u64 <= e.offset + e.len
                        });
                        let same = x[r.clone()] == y[r];
                        assert!(
                            same || is,
                            "origin {o}: diff of {a} and {b} missed chunk {c}"
                        );
                        reported += u64::from(is);
                        unchanged += u64::from(is && same);
                    }
                }
            }
        }
        (pairs, reported, unchanged)
    }

    fn verify_all(&self) {
        self.verify_diffs();
        for ((o, tag), want) in &self.model {
            self.verify_map(*o, *tag, want);
            let mut got = vec![0u8; ORIGIN_SIZE as usize];
            self.vol(*o, *tag).read(0, &mut got).unwrap();
            if &got != want {
                let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
                panic!(
                    "origin {o} tag {tag}: first difference at byte {at} (chunk {})",
                    at as u64 / CS
                );
            }
        }
    }
}

fn dummy() -> Store {
    Store::format(
        Arc::new(MemDev::new(4 << 20)),
        &FormatOptions {
            chunk_size: 4096,
            force: false,
        },
    )
    .unwrap()
}

trait TestWrite {
    fn write_at_test(&self, data: &[u8]);
}
impl TestWrite for MemDev {
    fn write_at_test(&self, data: &[u8]) {
        snapmv_engine::BlockDev::write_at(self, 0, data).unwrap();
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        o: usize,
        k: usize,
        off: u64,
        len: u64,
        fua: bool,
        fill: u8,
    },
    Zeroes {
        o: usize,
        k: usize,
        off: u64,
        len: u64,
    },
    Snap {
        o: usize,
        of: Option<usize>,
    },
    Delete {
        o: usize,
        k: usize,
    },
    Rollback {
        o: usize,
        k: usize,
    },
    Step {
        budget: usize,
    },
    Flush,
    Reopen,
    Verify,
}

fn op() -> impl Strategy<Value = Op> {
    let o = 0usize..2;
    prop_oneof![
        6 => (o.clone(), 0usize..8, 0..ORIGIN_SIZE, 1u64..3 * CS, any::<bool>(), any::<u8>())
            .prop_map(|(o, k, off, len, fua, fill)| Op::Write { o, k, off, len, fua, fill }),
        1 => (o.clone(), 0usize..8, 0..ORIGIN_SIZE, 1u64..4 * CS).prop_map(|(o, k, off, len)| Op::Zeroes { o, k, off, len }),
        2 => (o.clone(), prop::option::of(0usize..8)).prop_map(|(o, of)| Op::Snap { o, of }),
        1 => (o.clone(), 0usize..8).prop_map(|(o, k)| Op::Delete { o, k }),
        1 => (o.clone(), 0usize..8).prop_map(|(o, k)| Op::Rollback { o, k }),
        2 => (1usize..8).prop_map(|budget| Op::Step { budget }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Verify),
    ]
}

fn pick(tags: &[u64], k: usize) -> Option<u64> {
    if tags.is_empty() {
        None
    } else {
        Some(tags[k % tags.len()])
    }
}

fn run(ops: Vec<Op>) {
    let mut w = World::new();
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            Op::Write {
                o,
                k,
                off,
                len,
                fua,
                fill,
            } => {
                // k == 0 writes the origin; otherwise the (k-1)th snapshot.
                let tag = if k == 0 {
                    Some(0)
                } else {
                    pick(&w.tags(o), k - 1)
                };
                let Some(tag) = tag else { continue };
                let len = len.min(ORIGIN_SIZE - off);
                let data: Vec<u8> = (0..len).map(|b| fill.wrapping_add(b as u8 / 7)).collect();
                w.vol(o, tag).write(off, &data, fua).unwrap();
                w.model.get_mut(&(o, tag)).unwrap()[off as usize..(off + len) as usize]
                    .copy_from_slice(&data);
            }
            Op::Zeroes { o, k, off, len } => {
                let tag = if k == 0 {
                    Some(0)
                } else {
                    pick(&w.tags(o), k - 1)
                };
                let Some(tag) = tag else { continue };
                let len = len.min(ORIGIN_SIZE - off);
                w.vol(o, tag).write_zeroes(off, len, false).unwrap();
                w.model.get_mut(&(o, tag)).unwrap()[off as usize..(off + len) as usize].fill(0);
            }
            Op::Snap { o, of } => {
                let src = match of {
                    None => 0,
                    Some(k) => match pick(&w.tags(o), k) {
                        Some(t) => t,
                        None => continue,
                    },
                };
                w.now += 1;
                let r = w
                    .store
                    .snapshot(&w.origins[o].0, (src != 0).then_some(src), "m", w.now);
                match r {
                    Ok(tag) => {
                        let content = w.model[&(o, src)].clone();
                        assert!(
                            w.model.insert((o, tag), content).is_none(),
                            "tag {tag} reused"
                        );
                    }
                    Err(Error::Busy(_)) => {} // rollback in progress
                    Err(e) => panic!("op {i}: snapshot: {e}"),
                }
            }
            Op::Delete { o, k } => {
                let Some(tag) = pick(&w.tags(o), k) else {
                    continue;
                };
                match w.store.delete(&w.origins[o].0, tag) {
                    Ok(()) => {
                        w.model.remove(&(o, tag));
                    }
                    Err(Error::Busy(_)) => {}
                    Err(e) => panic!("op {i}: delete: {e}"),
                }
            }
            Op::Rollback { o, k } => {
                let Some(tag) = pick(&w.tags(o), k) else {
                    continue;
                };
                match w.store.rollback(&w.origins[o].0, tag) {
                    Ok(()) => {
                        let content = w.model[&(o, tag)].clone();
                        w.model.insert((o, 0), content);
                    }
                    Err(Error::Busy(_)) => {}
                    Err(e) => panic!("op {i}: rollback: {e}"),
                }
            }
            Op::Step { budget } => {
                w.store.step_background(budget).unwrap();
            }
            Op::Flush => w.store.flush().unwrap(),
            Op::Reopen => w.reopen(),
            Op::Verify => w.verify_all(),
        }
    }
    w.verify_all();
    // Drain background work: nothing visible may change, and space returns.
    for _ in 0..10_000 {
        if !w.store.step_background(64).unwrap().more {
            break;
        }
    }
    assert!(
        !w.store.step_background(1).unwrap().more,
        "background work never finished"
    );
    w.verify_all();
    assert_eq!(w.store.lock_entries(), 0, "chunk locks leaked");
    w.reopen();
    w.verify_all();
    let (pairs, reported, unchanged) = w.verify_diffs();
    println!(
        "diff: {pairs} version pairs, {reported} chunks reported, {unchanged} with equal bytes"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("SNAPMV_PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(96), ..ProptestConfig::default() })]
    #[test]
    fn random_ops_match_model_across_reopens(ops in prop::collection::vec(op(), 1..80)) {
        run(ops);
    }
}

#[test]
fn delete_everything_returns_all_space() {
    let mut w = World::new();
    let base = w.store.status().chunks_used;
    let mut tags = Vec::new();
    for round in 0..6u8 {
        tags.push(w.store.snapshot("sdb1", None, "s", 1).unwrap());
        let data = vec![round; (ORIGIN_SIZE) as usize];
        w.vol(0, 0).write(0, &data, false).unwrap();
        w.model.insert((0, 0), data);
    }
    let t = *tags.last().unwrap();
    w.vol(0, t).write(100, &[9u8; 5000], false).unwrap();
    assert!(w.store.status().chunks_used > base);
    for t in tags {
        w.store.delete("sdb1", t).unwrap();
    }
    while w.store.step_background(16).unwrap().more {}
    w.store.flush().unwrap();
    let st = w.store.status();
    assert!(!st.cleaning);
    // Metadata pages may stay allocated; the ~100 data chunks must all be back.
    assert!(
        st.chunks_used <= base + 2,
        "used {} after cleaning, {base} before",
        st.chunks_used
    );
    w.reopen();
    w.verify_all();
}

#[test]
fn regression_rollback_then_other_origin_snapshot_delete() {
    run(vec![
        Op::Snap { o: 0, of: None },
        Op::Rollback { o: 0, k: 0 },
        Op::Step { budget: 6 },
        Op::Step { budget: 5 },
        Op::Step { budget: 4 },
        Op::Step { budget: 3 },
        Op::Snap { o: 1, of: None },
        Op::Write {
            o: 1,
            k: 0,
            off: 0,
            len: 1,
            fua: false,
            fill: 0,
        },
        Op::Delete { o: 1, k: 0 },
    ]);
}
