//! loom models of the engine's real synchronisation: the chunk lock table,
//! the per-origin gate, group commit, copy-before-overwrite ordering, the
//! cleaner and the rollback copier. Every model drives the real `Store` and
//! `Volume` (nothing here re-implements their protocol) on a tiny test-local
//! device whose state sits behind one loom `Mutex`, so every device I/O is a
//! point where loom may switch threads, and which keeps durable and volatile
//! state apart so that a "crash" (taking the durable image) can be modelled.
//!
//! Run with `engine/loom.sh` (`RUSTFLAGS="--cfg loom"`, release,
//! `LOOM_MAX_PREEMPTIONS=2`). `engine/loom-planted.sh` builds once with
//! `--cfg snapmv_planted`, runs the suite with each planted bug
//! (`SNAPMV_PLANTED_BUG`, see `snapmv_engine::planted`) and checks that the
//! model guarding that protection fails.
//!
//! Each model prints the number of interleavings loom explored.
#![cfg(loom)]

use loom::thread;
use snapmv_engine::dev::BlockDev;
use snapmv_engine::store::{self, Dev, FormatOptions, Store, Volume};
use snapmv_engine::sync::Mutex;
use snapmv_engine::{Error, Result};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const CS: u64 = 4096;
const PAGE: u64 = 4096;
/// Smallest COW device the formatter accepts with 4 KiB chunks (a 1 MiB
/// journal ring plus the reserve) with a little room for data.
const COW_SIZE: u64 = 1536 * 1024;
const ORIGIN_SIZE: u64 = 2 * CS;
/// Engine code runs on loom's generator stacks; give them room.
const STACK: usize = 8 << 20;

// ---------------------------------------------------------------- device

/// A device image: sparse 4 KiB pages (absent = zeros).
#[derive(Clone, Default)]
struct Image {
    size: u64,
    pages: Arc<BTreeMap<u64, Box<[u8]>>>,
}

struct DevState {
    size: u64,
    base: Arc<BTreeMap<u64, Box<[u8]>>>,
    /// Pages written since `base`: what reads see.
    cur: BTreeMap<u64, Box<[u8]>>,
    /// Pages as of the last flush.
    durable: BTreeMap<u64, Box<[u8]>>,
}

impl DevState {
    fn page(&self, p: u64) -> Option<&[u8]> {
        self.cur
            .get(&p)
            .or_else(|| self.base.get(&p))
            .map(|b| &b[..])
    }

    fn image(&self, pages: &BTreeMap<u64, Box<[u8]>>) -> Image {
        let mut all = (*self.base).clone();
        for (k, v) in pages {
            all.insert(*k, v.clone());
        }
        Image {
            size: self.size,
            pages: Arc::new(all),
        }
    }
}

/// Every device of one modelled machine behind one loom mutex, so that a
/// crash takes the durable state of all of them at one instant.
struct Machine {
    devs: Mutex<Vec<DevState>>,
}

impl Machine {
    fn new(images: &[Image]) -> Arc<Machine> {
        Arc::new(Machine {
            devs: Mutex::new(
                images
                    .iter()
                    .map(|i| DevState {
                        size: i.size,
                        base: i.pages.clone(),
                        cur: BTreeMap::new(),
                        durable: BTreeMap::new(),
                    })
                    .collect(),
            ),
        })
    }

    fn dev(self: &Arc<Self>, idx: usize) -> Dev {
        let size = self.devs.lock().unwrap()[idx].size;
        Arc::new(LDev {
            m: self.clone(),
            idx,
            size,
        })
    }

    /// Power cut: the durable state of every device (what a reopen sees).
    fn crash(&self) -> Vec<Image> {
        let g = self.devs.lock().unwrap();
        g.iter().map(|d| d.image(&d.durable)).collect()
    }

    /// Everything written so far (a clean shutdown).
    fn current(&self) -> Vec<Image> {
        let g = self.devs.lock().unwrap();
        g.iter().map(|d| d.image(&d.cur)).collect()
    }
}

struct LDev {
    m: Arc<Machine>,
    idx: usize,
    size: u64,
}

fn pieces(offset: u64, len: usize, mut f: impl FnMut(u64, usize, usize, usize)) {
    let mut done = 0usize;
    while done < len {
        let pos = offset + done as u64;
        let (p, in_p) = (pos / PAGE, (pos % PAGE) as usize);
        let n = (PAGE as usize - in_p).min(len - done);
        f(p, in_p, done, n);
        done += n;
    }
}

impl BlockDev for LDev {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        snapmv_engine::dev::check_range("ldev read", offset, buf.len() as u64, self.size)?;
        let g = self.m.devs.lock().unwrap();
        let d = &g[self.idx];
        pieces(offset, buf.len(), |p, in_p, done, n| match d.page(p) {
            Some(pg) => buf[done..done + n].copy_from_slice(&pg[in_p..in_p + n]),
            None => buf[done..done + n].fill(0),
        });
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        snapmv_engine::dev::check_range("ldev write", offset, buf.len() as u64, self.size)?;
        let mut g = self.m.devs.lock().unwrap();
        let d = &mut g[self.idx];
        pieces(offset, buf.len(), |p, in_p, done, n| {
            if !d.cur.contains_key(&p) {
                let init = d
                    .base
                    .get(&p)
                    .cloned()
                    .unwrap_or_else(|| vec![0u8; PAGE as usize].into_boxed_slice());
                d.cur.insert(p, init);
            }
            let pg = d.cur.get_mut(&p).expect("page just inserted");
            pg[in_p..in_p + n].copy_from_slice(&buf[done..done + n]);
        });
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let mut g = self.m.devs.lock().unwrap();
        let d = &mut g[self.idx];
        d.durable = d.cur.clone();
        Ok(())
    }

    fn name(&self) -> &str {
        "loomdev"
    }
}

// ---------------------------------------------------------------- harness

/// A booted store on a fresh machine built from images (COW, origin "o").
struct Boot {
    m: Arc<Machine>,
    cow: Dev,
    store: Store,
}

fn boot(images: &[Image]) -> Boot {
    let m = Machine::new(images);
    let cow = m.dev(0);
    let origin = m.dev(1);
    let store = Store::open(cow.clone(), &mut |id, _| {
        assert_eq!(id, "o");
        Ok(origin.clone())
    })
    .expect("open");
    Boot { m, cow, store }
}

fn builder() -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    // Opening a store is thousands of (single-threaded) sync operations.
    if std::env::var("LOOM_MAX_BRANCHES").is_err() {
        b.max_branches = 1 << 20;
    }
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(2);
    }
    b
}

/// Run `f` once inside loom (the engine's primitives are loom's, so even a
/// one-threaded setup must run in a model) and return what it produced.
fn once<T: Send + 'static>(f: impl Fn() -> T + Send + Sync + 'static) -> T {
    let out = Arc::new(std::sync::Mutex::new(None));
    let o2 = out.clone();
    let f = Arc::new(f);
    builder().check(move || {
        let f = f.clone();
        let v = thread::Builder::new()
            .stack_size(STACK)
            .spawn(move || f())
            .expect("spawn")
            .join()
            .expect("join");
        *o2.lock().unwrap() = Some(v);
    });
    let v = out.lock().unwrap().take().expect("setup ran");
    v
}

/// Format a COW device and bind a 2-chunk origin "o" filled with `fill`,
/// then run `prep`; returns the cleanly closed images.
fn prepare(fill: u8, prep: impl Fn(&Store) + Send + Sync + 'static) -> Vec<Image> {
    once(move || {
        let m = Machine::new(&[
            Image {
                size: COW_SIZE,
                ..Default::default()
            },
            Image {
                size: ORIGIN_SIZE,
                ..Default::default()
            },
        ]);
        let (cow, origin) = (m.dev(0), m.dev(1));
        origin
            .write_at(0, &vec![fill; ORIGIN_SIZE as usize])
            .expect("fill");
        let store = Store::format(
            cow,
            &FormatOptions {
                chunk_size: CS as u32,
                force: true,
            },
        )
        .expect("format");
        store.bind("o", "o", origin, 0).expect("bind");
        prep(&store);
        store.close().expect("close");
        m.current()
    })
}

/// Explore every interleaving of `body` (which spawns its own threads with
/// `spawn`), printing how many there were.
fn explore(name: &str, images: Vec<Image>, body: impl Fn(Boot) + Send + Sync + 'static) {
    let count = Arc::new(AtomicUsize::new(0));
    let c2 = count.clone();
    let images = Arc::new(images);
    let body = Arc::new(body);
    let start = std::time::Instant::now();
    builder().check(move || {
        c2.fetch_add(1, Ordering::Relaxed);
        let (images, body) = (images.clone(), body.clone());
        thread::Builder::new()
            .stack_size(STACK)
            .spawn(move || body(boot(&images)))
            .expect("spawn")
            .join()
            .expect("model body");
    });
    println!(
        "loom model {name}: {} interleavings explored in {:.1?}",
        count.load(Ordering::Relaxed),
        start.elapsed()
    );
}

fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
    thread::Builder::new()
        .stack_size(STACK)
        .spawn(f)
        .expect("spawn")
}

fn read(v: &Volume, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    v.read(off, &mut b).expect("read");
    b
}

fn chunk(v: &Volume, c: u64) -> Vec<u8> {
    read(v, c * CS, CS as usize)
}

fn patched(base: u8, patches: &[(usize, usize, u8)]) -> Vec<u8> {
    let mut v = vec![base; CS as usize];
    for &(off, len, b) in patches {
        v[off..off + len].fill(b);
    }
    v
}

/// Run-length form of a buffer, for failure messages.
fn show(v: &[u8]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let j = v[i..]
            .iter()
            .position(|&x| x != v[i])
            .map_or(v.len(), |n| i + n);
        out.push(format!("{}x{:02x}", j - i, v[i]));
        i = j;
    }
    out.join(" ")
}

#[track_caller]
fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    assert!(
        got == want,
        "{what}: got [{}], want [{}]",
        show(got),
        show(want)
    );
}

fn assert_checks(cow: &Dev) {
    let r = store::check(cow.clone()).expect("check ran");
    assert!(r.errors.is_empty(), "checker: {:?}", r.errors);
}

fn used(s: &Store) -> u64 {
    s.status_without_usage().chunks_used
}

fn run_background(s: &Store) {
    for _ in 0..16 {
        if !s.step_background(8).expect("step_background").more {
            return;
        }
    }
    panic!("background work did not finish");
}

/// After a first write of 0xBB over chunk 0 (0xAA, shared with snapshot 1)
/// and a power cut taken two ways (only flushed writes kept, every write
/// kept): the snapshot still reads the old chunk, the origin the old or the
/// new one whole, and the checker is clean.
fn assert_first_write_cuts(cuts: &[Vec<Image>; 2], when: &str) {
    for (cut, kept) in cuts.iter().zip(["flushed writes", "every write"]) {
        let a = boot(cut);
        assert_bytes(
            &chunk(&a.store.volume("o", Some(1)).unwrap(), 0),
            &patched(0xAA, &[]),
            &format!("snapshot after a power cut keeping {kept}, {when}"),
        );
        let oc = chunk(&a.store.volume("o", None).unwrap(), 0);
        assert!(oc == patched(0xAA, &[]) || oc == patched(0xBB, &[]));
        assert_checks(&a.cow);
    }
}

// ---------------------------------------------------------------- models

/// An origin write racing a snapshot read of the same chunk: the reader sees
/// only the pre-snapshot data (the shared chunk lock orders it against the
/// writer's copy-then-overwrite). The write has FUA, so its staged data goes
/// in place within the call (a write without it stays staged here, and a
/// reader that resolved the chunk to the origin would read the old data in
/// place anyway). Planted bug `no_chunk_lock`.
#[test]
fn model_read_vs_origin_write() {
    let images = prepare(0xAA, |s| {
        s.snapshot("o", None, "", 1).expect("snapshot");
    });
    explore("read_vs_origin_write", images, |b| {
        let (o, s1) = (
            b.store.volume("o", None).unwrap(),
            b.store.volume("o", Some(1)).unwrap(),
        );
        let w = spawn(move || o.write(0, &[0xBB; CS as usize], true).expect("write"));
        let snap = s1.clone();
        let r = spawn(move || chunk(&snap, 0));
        w.join().unwrap();
        let seen = r.join().unwrap();
        assert_bytes(
            &seen,
            &patched(0xAA, &[]),
            "snapshot read racing an origin write",
        );
        assert!(chunk(&s1, 0).iter().all(|&x| x == 0xAA));
        let o = b.store.volume("o", None).unwrap();
        assert!(chunk(&o, 0).iter().all(|&x| x == 0xBB));
        assert_eq!(b.store.lock_entries(), 0);
    });
}

/// Two origin writes racing to make the first copy of one chunk: exactly one
/// copy is made, it holds the pre-snapshot data, and both writes land.
/// Planted bug `no_write_lock` (writes take no exclusive chunk locks).
#[test]
fn model_two_writers_first_copy() {
    let images = prepare(0xAA, |s| {
        s.snapshot("o", None, "", 1).expect("snapshot");
    });
    explore("two_writers_first_copy", images, |b| {
        let base = used(&b.store);
        let o1 = b.store.volume("o", None).unwrap();
        let o2 = o1.clone();
        let t1 = spawn(move || o1.write(0, &[0x11; 512], false).expect("write 1"));
        let t2 = spawn(move || o2.write(1024, &[0x22; 512], false).expect("write 2"));
        t1.join().unwrap();
        t2.join().unwrap();
        let (o, s1) = (
            b.store.volume("o", None).unwrap(),
            b.store.volume("o", Some(1)).unwrap(),
        );
        assert_bytes(
            &chunk(&s1, 0),
            &patched(0xAA, &[]),
            "the copy does not hold the pre-snapshot data",
        );
        assert_bytes(
            &chunk(&o, 0),
            &patched(0xAA, &[(0, 512, 0x11), (1024, 512, 0x22)]),
            "origin after both writes",
        );
        assert_eq!(used(&b.store), base + 1, "not exactly one copy was made");
        b.store.flush().unwrap();
        assert_checks(&b.cow);
    });
}

/// A write racing snapshot creation: the snapshot holds the (two-chunk)
/// write whole or not at all, both as read live and as durable the moment
/// `snapshot` returned (a crash right then). Planted bug `no_gate` (writes
/// do not hold the origin gate).
#[test]
fn model_write_vs_snapshot() {
    let images = prepare(0xAA, |_| {});
    explore("write_vs_snapshot", images, |b| {
        let o = b.store.volume("o", None).unwrap();
        let w = spawn(move || o.write(0, &[0xBB; 2 * CS as usize], false).expect("write"));
        let (st, m) = (b.store.clone(), b.m.clone());
        let s = spawn(move || {
            let tag = st.snapshot("o", None, "", 2).expect("snapshot");
            (tag, m.crash())
        });
        w.join().unwrap();
        let (tag, crash) = s.join().unwrap();
        let whole = |v: &[u8], when: &str| {
            assert!(
                v.iter().all(|&x| x == 0xAA) || v.iter().all(|&x| x == 0xBB),
                "the snapshot ({when}) holds part of a write: [{}]",
                show(v)
            )
        };
        let live = read(
            &b.store.volume("o", Some(tag)).unwrap(),
            0,
            ORIGIN_SIZE as usize,
        );
        whole(&live, "live");
        drop(b);
        let after = boot(&crash);
        let durable = read(
            &after.store.volume("o", Some(tag)).unwrap(),
            0,
            ORIGIN_SIZE as usize,
        );
        whole(&durable, "durable when snapshot returned");
        assert_bytes(
            &durable,
            &live,
            "the snapshot as durable when made vs. as read later",
        );
    });
}

/// A write to a snapshot racing the delete of its sibling snapshot-of-
/// snapshot, with the cleaner run to completion: the cleaner merges the
/// shared ghost into the written leaf under the chunk lock, so the write
/// lands on the right data and no chunk leaks. Planted bug `no_clean_lock`.
#[test]
fn model_write_vs_delete_clean() {
    let images = prepare(0xAA, |s| {
        s.snapshot("o", None, "", 1).expect("snapshot 1");
        let v = s.volume("o", Some(1)).unwrap();
        v.write(0, &[0xCC; CS as usize], false).expect("write s1");
        s.snapshot("o", Some(1), "", 1).expect("snapshot 2 of 1");
    });
    explore("write_vs_delete_clean", images, |b| {
        let base = used(&b.store);
        let s1 = b.store.volume("o", Some(1)).unwrap();
        let w = spawn(move || s1.write(0, &[0xDD; 512], false).expect("write"));
        let st = b.store.clone();
        let d = spawn(move || {
            st.delete("o", 2).expect("delete");
            run_background(&st);
        });
        w.join().unwrap();
        d.join().unwrap();
        run_background(&b.store);
        let s1 = b.store.volume("o", Some(1)).unwrap();
        assert_bytes(
            &chunk(&s1, 0),
            &patched(0xCC, &[(0, 512, 0xDD)]),
            "s1 chunk 0",
        );
        assert_bytes(&chunk(&s1, 1), &patched(0xAA, &[]), "s1 chunk 1");
        assert_eq!(used(&b.store), base, "a chunk leaked or was lost");
        b.store.flush().unwrap();
        assert_checks(&b.cow);
    });
}

/// A write to a snapshot racing its own delete and a full cleaner pass: the
/// write either lands before the delete (and the cleaner frees it) or fails;
/// no exception is left behind for a removed node. Planted bug `no_gate`.
#[test]
fn model_write_vs_own_delete() {
    let images = prepare(0xAA, |s| {
        s.snapshot("o", None, "", 1).expect("snapshot 1");
    });
    explore("write_vs_own_delete", images, |b| {
        let base = used(&b.store);
        let s1 = b.store.volume("o", Some(1)).unwrap();
        let w = spawn(move || match s1.write(CS, &[0xEE; 512], false) {
            Ok(()) | Err(Error::NoSuchSnapshot { .. }) => {}
            Err(e) => panic!("write: {e}"),
        });
        let st = b.store.clone();
        let d = spawn(move || {
            st.delete("o", 1).expect("delete");
            run_background(&st);
        });
        w.join().unwrap();
        d.join().unwrap();
        run_background(&b.store);
        assert_eq!(b.store.versions().len(), 1);
        assert_eq!(used(&b.store), base, "a chunk leaked");
        b.store.flush().unwrap();
        assert_checks(&b.cow);
    });
}

/// A flush racing writes: each thread writes (an origin chunk in place; a
/// snapshot chunk through a fresh exception), flushes, and "crashes" at
/// once. Everything it completed before its flush began must be in the
/// durable image. Planted bug `no_flush_barrier` (group commit returns when
/// another commit is running without waiting for one that covers it).
#[test]
fn model_flush_vs_writes() {
    let images = prepare(0xAA, |s| {
        s.snapshot("o", None, "", 1).expect("snapshot");
        // The first copy of chunk 0 is done, so the origin write below is a
        // plain in-place write that only a flush makes durable.
        let o = s.volume("o", None).unwrap();
        o.write(0, &[0xA1; CS as usize], false).expect("write");
    });
    explore("flush_vs_writes", images, |b| {
        let (o, s1) = (
            b.store.volume("o", None).unwrap(),
            b.store.volume("o", Some(1)).unwrap(),
        );
        let m1 = b.m.clone();
        let t1 = spawn(move || {
            o.write(0, &[0xBB; 512], false).expect("origin write");
            o.flush().expect("flush");
            m1.crash()
        });
        let m2 = b.m.clone();
        let t2 = spawn(move || {
            s1.write(CS, &[0xCC; 512], false).expect("snapshot write");
            s1.flush().expect("flush");
            m2.crash()
        });
        let c1 = t1.join().unwrap();
        let c2 = t2.join().unwrap();
        drop(b);
        let a = boot(&c1);
        assert_bytes(
            &chunk(&a.store.volume("o", None).unwrap(), 0),
            &patched(0xA1, &[(0, 512, 0xBB)]),
            "an origin write that completed before a flush, after it and a crash",
        );
        drop(a);
        let a = boot(&c2);
        assert_bytes(
            &chunk(&a.store.volume("o", Some(1)).unwrap(), 1),
            &patched(0xAA, &[(0, 512, 0xCC)]),
            "a snapshot write that completed before a flush, after it and a crash",
        );
    });
}

/// The rollback copier (`step_background`) racing an origin write to the
/// same chunk: the write survives, on top of the snapshot's content.
/// Planted bug `no_rb_lock` (the copier does not take the chunk lock).
#[test]
fn model_rollback_vs_write() {
    let images = prepare(0xAA, |s| {
        s.snapshot("o", None, "", 1).expect("snapshot");
        let o = s.volume("o", None).unwrap();
        o.write(0, &[0xBB; ORIGIN_SIZE as usize], false)
            .expect("write");
        s.rollback("o", 1).expect("rollback");
    });
    explore("rollback_vs_write", images, |b| {
        let o = b.store.volume("o", None).unwrap();
        let w = spawn(move || o.write(0, &[0x77; 512], false).expect("write"));
        let st = b.store.clone();
        let c = spawn(move || run_background(&st));
        w.join().unwrap();
        c.join().unwrap();
        run_background(&b.store);
        assert!(b.store.status_without_usage().rollback.is_none());
        let (o, s1) = (
            b.store.volume("o", None).unwrap(),
            b.store.volume("o", Some(1)).unwrap(),
        );
        assert_bytes(
            &chunk(&o, 0),
            &patched(0xAA, &[(0, 512, 0x77)]),
            "origin chunk 0 (the write over the rolled-back content)",
        );
        assert_bytes(&chunk(&o, 1), &patched(0xAA, &[]), "origin chunk 1");
        assert_bytes(
            &read(&s1, 0, ORIGIN_SIZE as usize),
            &[0xAA; ORIGIN_SIZE as usize],
            "snapshot 1",
        );
        assert_eq!(b.store.lock_entries(), 0);
        b.store.flush().unwrap();
        assert_checks(&b.cow);
    });
}

/// Copy-before-overwrite ordering under a crash at any instant: a FUA origin
/// write that must first copy the chunk for a snapshot, with a power cut
/// racing it. After reopening, the snapshot still holds the pre-snapshot
/// data. Planted bug `skip_cow_flush` (the overwrite does not wait for the
/// copy and its mapping to be durable).
#[test]
fn model_copy_before_overwrite_crash() {
    let images = prepare(0xAA, |s| {
        s.snapshot("o", None, "", 1).expect("snapshot");
    });
    explore("copy_before_overwrite_crash", images, |b| {
        let o = b.store.volume("o", None).unwrap();
        let w = spawn(move || o.write(0, &[0xBB; CS as usize], true).expect("write"));
        let m = b.m.clone();
        // Two power cuts at this instant: only flushed writes survive, or
        // every write issued so far does (a disk may write back any time).
        let c = spawn(move || [m.crash(), m.current()]);
        w.join().unwrap();
        let cuts = c.join().unwrap();
        drop(b);
        assert_first_write_cuts(&cuts, "during a copying origin write");
    });
}

/// Snapshot lookups under the shared metadata lock, with a page cache so
/// small that they miss: a reader of one chunk fetches pages with no lock
/// held and offers them back, while a writer of another chunk of the same
/// snapshot maps a fresh copy (write lock) into the same exception tree
/// page and commits. Both see their data; the mapping is durable after the
/// writer's FUA; no lock is left held (store/lookup.rs).
#[test]
fn model_shared_lookup_vs_leaf_write() {
    let images = prepare(0xAA, |s| {
        let t = s.snapshot("o", None, "", 1).expect("snapshot");
        let v = s.volume("o", Some(t)).unwrap();
        v.write(0, &[0x11; CS as usize], false).expect("own chunk");
    });
    explore("shared_lookup_vs_leaf_write", images, |b| {
        b.store.set_cache_budget(0);
        let s1 = b.store.volume("o", Some(1)).unwrap();
        let (r1, w1) = (s1.clone(), s1.clone());
        let r = spawn(move || chunk(&r1, 0));
        let w = spawn(move || w1.write(CS, &[0x22; 512], true).expect("write"));
        w.join().unwrap();
        let seen = r.join().unwrap();
        assert_bytes(
            &seen,
            &patched(0x11, &[]),
            "shared lookup of an owned chunk",
        );
        assert_bytes(
            &chunk(&s1, 1),
            &patched(0xAA, &[(0, 512, 0x22)]),
            "the fresh copy after the write",
        );
        assert_eq!(b.store.lock_entries(), 0);
        let cache = b.store.cache_stats();
        assert!(
            cache.misses > cache.locked_misses,
            "no lookup fetched a page: {cache:?}"
        );
        let crash = b.m.crash();
        let a = boot(&crash);
        assert_bytes(
            &chunk(&a.store.volume("o", Some(1)).unwrap(), 1),
            &patched(0xAA, &[(0, 512, 0x22)]),
            "the FUA write after a crash",
        );
    });
}

/// Write-back copy-on-write (store/staging.rs): a first write to an origin
/// chunk after a snapshot is staged and returns before any commit; the
/// driver's step (`commit_staged`) races it. Live, the origin reads the
/// staged data and the snapshot the old. Then the power fails, in the two
/// extreme ways: only what was flushed survives, or every write issued
/// reached the disk. Either way the snapshot still reads the old data (an
/// in-place write never precedes the commit that made the copy durable),
/// and the origin holds the old or the new chunk. Planted bug
/// `destage_early` (destaging ignores the copy's generation).
#[test]
fn model_destage_waits_for_the_copy() {
    let images = prepare(0xAA, |s| {
        s.snapshot("o", None, "", 1).expect("snapshot");
    });
    explore("destage_waits_for_the_copy", images, |b| {
        let o = b.store.volume("o", None).unwrap();
        let w = spawn(move || o.write(0, &[0xBB; CS as usize], false).expect("write"));
        let st = b.store.clone();
        let d = spawn(move || st.commit_staged().expect("commit_staged"));
        w.join().unwrap();
        d.join().unwrap();
        let (o, s1) = (
            b.store.volume("o", None).unwrap(),
            b.store.volume("o", Some(1)).unwrap(),
        );
        assert_bytes(&chunk(&o, 0), &patched(0xBB, &[]), "origin, staged or not");
        assert_bytes(&chunk(&s1, 0), &patched(0xAA, &[]), "snapshot, live");
        let cuts = [b.m.crash(), b.m.current()];
        drop(b);
        assert_first_write_cuts(&cuts, "with a staged first write");
    });
}
