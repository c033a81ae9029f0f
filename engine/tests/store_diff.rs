//! `Store::diff` against a model of every version's bytes *and* of the
//! physical copy it reads per chunk, over random histories: snapshots of
//! the origin and of snapshots, writes (partial and multi-chunk) to every
//! version, whole-chunk zeroing, deletes with the cleaner run part way or
//! to the end, rollbacks whose copier advances a few chunks at a time
//! (origin writes landing on chunks it has not reached), staged origin
//! writes left uncommitted, flushes and reopens; two origins, so the walk
//! must stay within one.
//!
//! The copy model (as in `store_usage.rs`): an origin write gives every
//! version still reading the origin in place there one new copy, shared by
//! them; a snapshot write gives the snapshot a new copy unless it alone
//! reads the one it has; a snapshot shares its source's copies; a zeroed
//! chunk reads no copy; a rollback freezes the snapshot's copies in a
//! hidden source, and the origin reads through it until the copier (or an
//! origin write) rewrites the chunk in place.
//!
//! After every step, for every pair of versions of each origin, `diff`
//! must report exactly the chunks where the two read different copies (the
//! origin in place counting as one copy, zeros as one): so a chunk whose
//! bytes differ is never missed, and none is reported where both read the
//! same thing. Chunks reported with equal bytes are counted (different
//! copies holding equal bytes, which metadata cannot tell apart), and so
//! are the bounded and sub-range forms (`Volume::diff_from`). The model's
//! bytes are checked against reads of every version too.
//!
//! Seeds are printed; `SNAPMV_DIFF_SEED=S` replays one (add
//! `SNAPMV_DIFF_TRACE=1` to print each step drawn), `SNAPMV_DIFF_SEEDS=N`
//! runs seeds 0..N (default 24).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use snapmv_engine::store::{Dev, DiffExtent, DiffStrategy, FormatOptions, Store};
use snapmv_engine::{Error, MemDev};
use std::collections::BTreeMap;
use std::sync::Arc;

const CS: u64 = 4096;
const CHUNKS: u64 = 10;
/// A short last chunk.
const SIZE: u64 = CHUNKS * CS - 1536;
const IDS: [&str; 2] = ["o", "p"];
/// The rollback's hidden source, among the versions that read copies.
const HIDDEN: u64 = u64::MAX;

/// What a version reads at one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Copy {
    Origin,
    Zero,
    Data(u64),
}

#[derive(Clone)]
struct Version {
    bytes: Vec<u8>,
    copies: Vec<Copy>,
}

/// One origin: its bytes, its snapshots (and a rollback's hidden source),
/// and which chunks a rollback has still to copy.
struct OriginModel {
    origin: Vec<u8>,
    snaps: BTreeMap<u64, Version>,
    pending: Vec<bool>,
}

#[derive(Default)]
struct Tally {
    checks: u64,
    reported: u64,
    unchanged: u64,
}

struct World {
    cow: Arc<MemDev>,
    devs: Vec<Arc<MemDev>>,
    store: Store,
    models: Vec<OriginModel>,
    next_copy: u64,
    tally: Tally,
}

fn chunks_of(off: u64, len: u64) -> std::ops::Range<usize> {
    (off / CS) as usize..(off + len).div_ceil(CS) as usize
}

impl OriginModel {
    /// What the origin reads at `c`: in place, or through the rollback's
    /// source where the copier has not been.
    fn origin_copy(&self, c: usize) -> Copy {
        match self.pending[c] {
            true => self.snaps[&HIDDEN].copies[c],
            false => Copy::Origin,
        }
    }

    fn version(&self, tag: Option<u64>) -> (&[u8], Vec<Copy>) {
        match tag {
            None => (
                &self.origin,
                (0..CHUNKS as usize).map(|c| self.origin_copy(c)).collect(),
            ),
            Some(t) => (&self.snaps[&t].bytes, self.snaps[&t].copies.clone()),
        }
    }

    fn readers(&self, c: usize, copy: Copy) -> usize {
        self.snaps.values().filter(|v| v.copies[c] == copy).count()
    }
}

impl World {
    fn new() -> World {
        let cow = Arc::new(MemDev::new(8 << 20));
        let fo = FormatOptions {
            chunk_size: CS as u32,
            force: false,
        };
        let store = Store::format(cow.clone() as Dev, &fo).unwrap();
        let mut devs = Vec::new();
        let mut models = Vec::new();
        for (i, id) in IDS.iter().enumerate() {
            let dev = Arc::new(MemDev::new(SIZE));
            let init: Vec<u8> = (0..SIZE)
                .map(|b| (b / 512) as u8 ^ (i as u8 * 0x55))
                .collect();
            snapmv_engine::BlockDev::write_at(&*dev, 0, &init).unwrap();
            store
                .bind(id, &format!("/{id}"), dev.clone() as Dev, 0)
                .unwrap();
            devs.push(dev);
            models.push(OriginModel {
                origin: init,
                snaps: BTreeMap::new(),
                pending: vec![false; CHUNKS as usize],
            });
        }
        World {
            cow,
            devs,
            store,
            models,
            next_copy: 0,
            tally: Tally::default(),
        }
    }

    fn new_copy(&mut self) -> Copy {
        self.next_copy += 1;
        Copy::Data(self.next_copy)
    }

    /// The origin is about to change chunk `c` in place: the versions
    /// reading it there (the hidden source too) get one copy of the old data.
    fn copy_before_origin_write(&mut self, o: usize, c: usize) {
        if self.models[o].readers(c, Copy::Origin) == 0 {
            return;
        }
        let copy = self.new_copy();
        for v in self.models[o].snaps.values_mut() {
            if v.copies[c] == Copy::Origin {
                v.copies[c] = copy;
            }
        }
    }

    /// A rollback's pending chunk is rewritten in place (by the copier or
    /// an origin write): its bytes are already the origin's in the model.
    fn settle_pending(&mut self, o: usize, c: usize) {
        if !self.models[o].pending[c] {
            return;
        }
        if self.models[o].snaps[&HIDDEN].copies[c] != Copy::Origin {
            self.copy_before_origin_write(o, c);
        }
        self.models[o].pending[c] = false;
    }

    fn write_origin(&mut self, o: usize, off: u64, data: &[u8]) {
        for c in chunks_of(off, data.len() as u64) {
            // A chunk the rollback has not copied is brought up to date
            // first; then whoever still reads it in place gets the copy.
            self.settle_pending(o, c);
            self.copy_before_origin_write(o, c);
        }
        let (a, b) = (off as usize, off as usize + data.len());
        self.models[o].origin[a..b].copy_from_slice(data);
        self.store
            .volume(IDS[o], None)
            .unwrap()
            .write(off, data, false)
            .unwrap();
    }

    /// A snapshot writes chunk `c`: in place if it alone reads its copy,
    /// else onto a new copy of its own.
    fn copy_before_snapshot_write(&mut self, o: usize, tag: u64, c: usize) {
        let cur = self.models[o].snaps[&tag].copies[c];
        let alone = matches!(cur, Copy::Data(_)) && self.models[o].readers(c, cur) == 1;
        if !alone {
            let copy = self.new_copy();
            self.models[o].snaps.get_mut(&tag).unwrap().copies[c] = copy;
        }
    }

    fn write_snapshot(&mut self, o: usize, tag: u64, off: u64, data: &[u8]) {
        for c in chunks_of(off, data.len() as u64) {
            self.copy_before_snapshot_write(o, tag, c);
        }
        let v = self.models[o].snaps.get_mut(&tag).unwrap();
        v.bytes[off as usize..off as usize + data.len()].copy_from_slice(data);
        self.store
            .volume(IDS[o], Some(tag))
            .unwrap()
            .write(off, data, false)
            .unwrap();
    }

    /// Whole chunks of a snapshot zeroed: zero exceptions, no copy. The
    /// short last chunk is not whole: zeros are written there.
    fn zero_snapshot(&mut self, o: usize, tag: u64, first: u64, n: u64) {
        let len = (n * CS).min(SIZE - first * CS);
        self.store
            .volume(IDS[o], Some(tag))
            .unwrap()
            .write_zeroes(first * CS, len, false)
            .unwrap();
        for c in chunks_of(first * CS, len) {
            match (c as u64 + 1) * CS <= SIZE {
                true => self.models[o].snaps.get_mut(&tag).unwrap().copies[c] = Copy::Zero,
                false => self.copy_before_snapshot_write(o, tag, c),
            }
        }
        let v = self.models[o].snaps.get_mut(&tag).unwrap();
        v.bytes[(first * CS) as usize..(first * CS + len) as usize].fill(0);
    }

    /// A background step: what the rollback copier passed is in place now,
    /// and a finished rollback drops its source.
    fn step(&mut self, budget: usize) {
        let before = self.store.rollback_status();
        self.store.step_background(budget).unwrap();
        let after = self.store.rollback_status();
        let Some(rb) = before else { return };
        let o = IDS.iter().position(|id| *id == rb.origin).unwrap();
        let done = after.as_ref().map_or(CHUNKS, |a| a.done_chunks);
        for c in rb.done_chunks..done {
            self.settle_pending(o, c as usize);
        }
        if after.is_none() {
            assert!(
                self.models[o].pending.iter().all(|p| !p),
                "rollback ended early"
            );
            self.models[o].snaps.remove(&HIDDEN);
        }
    }

    fn rollback(&mut self, o: usize, tag: u64) -> bool {
        match self.store.rollback(IDS[o], tag) {
            Ok(()) => {}
            Err(Error::Busy(_)) => return false,
            Err(e) => panic!("rollback: {e}"),
        }
        let m = &mut self.models[o];
        let source = m.snaps[&tag].clone();
        m.origin = source.bytes.clone();
        m.snaps.insert(HIDDEN, source);
        m.pending = vec![true; CHUNKS as usize];
        true
    }

    fn reopen(&mut self) {
        let s = std::mem::replace(&mut self.store, placeholder());
        s.close().unwrap();
        let devs = self.devs.clone();
        self.store = Store::open(self.cow.clone() as Dev, &mut |id, _| {
            let i = IDS.iter().position(|x| *x == id).unwrap();
            Ok(devs[i].clone() as Dev)
        })
        .unwrap();
    }

    fn tags(&self, o: usize) -> Vec<u64> {
        self.models[o]
            .snaps
            .keys()
            .copied()
            .filter(|t| *t != HIDDEN)
            .collect()
    }
}

fn placeholder() -> Store {
    let fo = FormatOptions {
        chunk_size: CS as u32,
        force: false,
    };
    Store::format(Arc::new(MemDev::new(4 << 20)) as Dev, &fo).unwrap()
}

/// Chunks covered by extents.
fn chunks_in(extents: &[DiffExtent]) -> Vec<u64> {
    let mut out = Vec::new();
    for e in extents {
        assert!(e.len > 0);
        out.extend(e.offset / CS..(e.offset + e.len).div_ceil(CS));
    }
    out
}

/// Every version reads what the model holds.
fn check_bytes(w: &World, o: usize, versions: &[Option<u64>], ctx: &str) {
    for &v in versions {
        let mut got = vec![0u8; SIZE as usize];
        w.store
            .volume(IDS[o], v)
            .unwrap()
            .read(0, &mut got)
            .unwrap();
        let (want, _) = w.models[o].version(v);
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!(
                "{ctx}: origin {} version {v:?} differs from the model at byte {at}",
                IDS[o]
            );
        }
    }
}

/// The diff of `from` and `to` against the model: exactly the chunks
/// whose copies differ; the bounded and sub-range forms agree with it.
fn check_pair(
    w: &mut World,
    o: usize,
    from: Option<u64>,
    to: Option<u64>,
    rng: &mut ChaCha8Rng,
    ctx: &str,
) {
    // Both ways to the candidates (the walk by chunk, the gather over the
    // index by node) give the same extents.
    w.store.set_diff_strategy(DiffStrategy::ByChunk);
    let by_chunk = w.store.diff(IDS[o], from, to, 0, SIZE).unwrap();
    w.store.set_diff_strategy(DiffStrategy::ByNode);
    let got = w.store.diff(IDS[o], from, to, 0, SIZE).unwrap();
    assert_eq!(
        got, by_chunk,
        "{ctx}: diff {} {from:?} {to:?}: by node, by chunk",
        IDS[o]
    );
    // The sub-range and paged forms below take either way.
    let way = [
        DiffStrategy::ByChunk,
        DiffStrategy::ByNode,
        DiffStrategy::Auto,
    ][rng.gen_range(0..3)];
    w.store.set_diff_strategy(way);
    assert!(
        got.windows(2).all(|p| p[0].offset + p[0].len < p[1].offset),
        "{ctx}: extents ascend, apart"
    );
    let reported = chunks_in(&got);
    let m = &w.models[o];
    let ((xb, xc), (yb, yc)) = (m.version(from), m.version(to));
    for c in 0..CHUNKS as usize {
        let is = reported.contains(&(c as u64));
        let range = c * CS as usize..((c + 1) * CS as usize).min(SIZE as usize);
        let bytes_differ = xb[range.clone()] != yb[range];
        assert!(
            !bytes_differ || is,
            "{ctx}: diff {} {from:?} {to:?} missed chunk {c}",
            IDS[o]
        );
        assert_eq!(
            is,
            xc[c] != yc[c],
            "{ctx}: diff {} {from:?} {to:?} chunk {c}: reported {is}, the model reads {:?} and {:?}",
            IDS[o],
            xc[c],
            yc[c]
        );
        w.tally.reported += u64::from(is);
        w.tally.unchanged += u64::from(is && !bytes_differ);
    }
    w.tally.checks += 1;
    // A sub-range, and the same diff a page of one or two extents at a time.
    let off = rng.gen_range(0..SIZE);
    let len = rng.gen_range(0..=SIZE - off);
    let part = w.store.diff(IDS[o], from, to, off, len).unwrap();
    let clipped: Vec<DiffExtent> = got
        .iter()
        .filter_map(|e| {
            let (lo, hi) = (e.offset.max(off), (e.offset + e.len).min(off + len));
            (lo < hi).then(|| DiffExtent {
                offset: lo,
                len: hi - lo,
            })
        })
        .collect();
    assert_eq!(part, clipped, "{ctx}: diff of {off}+{len}");
    let vol = w.store.volume(IDS[o], to).unwrap();
    let (mut pos, mut paged) = (0, Vec::new());
    while pos < SIZE {
        let page = vol
            .diff_from(from, pos, SIZE - pos, rng.gen_range(1..3))
            .unwrap();
        assert!(
            page.end > pos || !page.extents.is_empty(),
            "{ctx}: a page makes progress"
        );
        assert!(page.extents.iter().all(|e| e.offset + e.len <= page.end));
        paged.extend(page.extents);
        pos = page.end;
    }
    assert_eq!(paged, got, "{ctx}: paged diff");
}

fn check_all(w: &mut World, rng: &mut ChaCha8Rng, ctx: &str) {
    for o in 0..IDS.len() {
        let mut versions = vec![None];
        versions.extend(w.tags(o).into_iter().map(Some));
        check_bytes(w, o, &versions, ctx);
        for (i, &from) in versions.iter().enumerate() {
            for &to in &versions[i..] {
                check_pair(w, o, from, to, rng, ctx);
            }
        }
    }
}

/// Bytes no earlier write made: every write changes what it covers.
fn stamp(step: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (step as u8).wrapping_mul(31).wrapping_add((i / 64) as u8) | 1)
        .collect()
}

fn one_step(w: &mut World, rng: &mut ChaCha8Rng, step: u64) -> &'static str {
    let o = rng.gen_range(0..IDS.len());
    let tags = w.tags(o);
    let pick = |rng: &mut ChaCha8Rng| tags.get(rng.gen_range(0..tags.len().max(1))).copied();
    let off = rng.gen_range(0..SIZE);
    let len = rng.gen_range(1..=(2 * CS).min(SIZE - off));
    let kind = rng.gen_range(0..20);
    if std::env::var("SNAPMV_DIFF_TRACE").is_ok() {
        println!(
            "step {step}: origin {} op {kind} at {off}+{len}, tags {tags:?}",
            IDS[o]
        );
    }
    match kind {
        0..=5 => {
            w.write_origin(o, off, &stamp(step, len as usize));
            "origin write"
        }
        6..=9 => match pick(rng) {
            Some(t) => {
                w.write_snapshot(o, t, off, &stamp(step, len as usize));
                "snapshot write"
            }
            None => "none",
        },
        10 => match pick(rng) {
            Some(t) => {
                w.zero_snapshot(o, t, rng.gen_range(0..CHUNKS), rng.gen_range(1..3));
                "zero"
            }
            None => "none",
        },
        11 | 12 => match w.store.snapshot(IDS[o], None, "", 0) {
            Ok(tag) => {
                let m = &mut w.models[o];
                let copies = vec![Copy::Origin; CHUNKS as usize];
                let v = Version {
                    bytes: m.origin.clone(),
                    copies,
                };
                m.snaps.insert(tag, v);
                "snapshot"
            }
            Err(Error::Busy(_)) => "none", // a rollback is in progress
            Err(e) => panic!("snapshot: {e}"),
        },
        13 => match pick(rng) {
            Some(of) => {
                let tag = w.store.snapshot(IDS[o], Some(of), "", 0).unwrap();
                let v = w.models[o].snaps[&of].clone();
                w.models[o].snaps.insert(tag, v);
                "snapshot of snapshot"
            }
            None => "none",
        },
        14 => match pick(rng) {
            Some(t) if tags.len() > 1 => {
                w.store.delete(IDS[o], t).unwrap();
                w.models[o].snaps.remove(&t);
                "delete"
            }
            _ => "none",
        },
        15 => match pick(rng) {
            Some(t) if w.rollback(o, t) => "rollback",
            _ => "none",
        },
        16 | 17 => {
            w.step(rng.gen_range(1..6));
            "background step"
        }
        18 => {
            w.store.flush().unwrap();
            "flush"
        }
        _ => {
            w.reopen();
            "reopen"
        }
    }
}

fn run(seed: u64) -> Tally {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w = World::new();
    for step in 0..150 {
        let what = one_step(&mut w, &mut rng, step);
        if what != "none" {
            let ctx = format!("seed {seed} step {step} ({what}; replay: SNAPMV_DIFF_SEED={seed})");
            check_all(&mut w, &mut rng, &ctx);
        }
    }
    // Drain the background work: nothing a diff sees may change.
    while w.store.rollback_status().is_some() || w.store.step_background(0).unwrap().more {
        w.step(16);
    }
    check_all(&mut w, &mut rng, &format!("seed {seed} after draining"));
    let staged = w.store.staging_stats().staged;
    println!(
        "seed {seed}: {} diffs, {} chunks reported, {} of them with equal bytes; {staged} chunks staged",
        w.tally.checks, w.tally.reported, w.tally.unchanged
    );
    w.tally
}

#[test]
fn diff_reports_exactly_the_chunks_read_from_different_copies() {
    if let Some(seed) = std::env::var("SNAPMV_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run(seed);
        return;
    }
    let seeds: u64 = std::env::var("SNAPMV_DIFF_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let mut total = Tally::default();
    for seed in 0..seeds {
        let t = run(seed);
        total.checks += t.checks;
        total.reported += t.reported;
        total.unchanged += t.unchanged;
    }
    println!(
        "{seeds} seeds: {} diffs, {} chunks reported, {} with equal bytes (different copies)",
        total.checks, total.reported, total.unchanged
    );
    assert!(total.reported > 0);
}

/// The cases by hand: siblings, ancestor and descendant, snapshot and
/// origin; a staged origin write counts at once; a rewrite of a chunk
/// with the bytes it held is reported (metadata cannot tell); unknown tags
/// and origins are refused.
#[test]
fn diff_by_hand() {
    let w = World::new();
    let s1 = w.store.snapshot("o", None, "", 0).unwrap();
    // Nothing written: the origin and its snapshot read the same chunks.
    assert_eq!(w.store.diff("o", Some(s1), None, 0, SIZE).unwrap(), vec![]);
    let vol = w.store.volume("o", None).unwrap();
    vol.write(CS + 10, b"new", false).unwrap();
    assert!(
        w.store.staging_stats().chunks > 0,
        "the first write is staged"
    );
    let one = vec![DiffExtent {
        offset: CS,
        len: CS,
    }];
    assert_eq!(w.store.diff("o", Some(s1), None, 0, SIZE).unwrap(), one);
    let s2 = w.store.snapshot("o", None, "", 0).unwrap();
    assert_eq!(w.store.diff("o", Some(s1), Some(s2), 0, SIZE).unwrap(), one);
    assert_eq!(w.store.diff("o", Some(s2), None, 0, SIZE).unwrap(), vec![]);
    // Snapshot of snapshot: descendant and ancestor, then siblings.
    let s3 = w.store.snapshot("o", Some(s2), "", 0).unwrap();
    assert_eq!(
        w.store.diff("o", Some(s2), Some(s3), 0, SIZE).unwrap(),
        vec![]
    );
    let sv = w.store.volume("o", Some(s3)).unwrap();
    sv.write(9 * CS - 1, &[7, 7], false).unwrap(); // chunks 8 and 9 (short)
    let tail = vec![DiffExtent {
        offset: 8 * CS,
        len: SIZE - 8 * CS,
    }];
    assert_eq!(
        w.store.diff("o", Some(s2), Some(s3), 0, SIZE).unwrap(),
        tail
    );
    assert_eq!(
        w.store.diff("o", Some(s3), Some(s2), 0, SIZE).unwrap(),
        tail
    );
    // The same bytes written again: a new copy, reported.
    let mut old = vec![0u8; 16];
    vol.read(5 * CS, &mut old).unwrap();
    vol.write(5 * CS, &old, false).unwrap();
    let got = w.store.diff("o", Some(s2), None, 0, SIZE).unwrap();
    assert_eq!(
        got,
        vec![DiffExtent {
            offset: 5 * CS,
            len: CS
        }]
    );
    // A range inside one chunk is clipped to it.
    let got = w.store.diff("o", Some(s1), None, CS + 100, 50).unwrap();
    assert_eq!(
        got,
        vec![DiffExtent {
            offset: CS + 100,
            len: 50
        }]
    );
    assert!(matches!(
        w.store.diff("o", Some(99), None, 0, SIZE),
        Err(Error::NoSuchSnapshot { tag: 99, .. })
    ));
    assert!(matches!(
        w.store.diff("zz", None, None, 0, SIZE),
        Err(Error::NoSuchOrigin(_))
    ));
    assert!(matches!(
        w.store.diff("o", None, None, 0, SIZE + 1),
        Err(Error::OutOfRange { .. })
    ));
    // Tags belong to one origin: p has no snapshot s1.
    assert!(w.store.diff("p", Some(s1), None, 0, SIZE).is_err());
    assert!(
        vol.diff_from(Some(s1), 0, SIZE, 0).is_err(),
        "room for no extent"
    );
}
