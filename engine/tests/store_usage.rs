//! Space accounting (`Status`: each snapshot's own and shared chunks)
//! against a model that knows nothing of the version tree: per version and
//! chunk, which physical copy it reads. An origin write gives every version
//! that still reads the origin there one new copy, shared by all of them; a
//! snapshot write gives the snapshot a new copy unless it alone reads the
//! one it has; a snapshot of a snapshot shares all of its source's copies;
//! zeroing a whole chunk leaves no copy. Own = copies no other version
//! reads; shared = copies read by two or more.
//!
//! Seeds are printed; `SNAPMV_USAGE_SEED=S` replays one.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use snapmv_engine::store::{Dev, FormatOptions, Store};
use snapmv_engine::MemDev;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

const CS: u64 = 4096;
const CHUNKS: u64 = 8;

/// What a version reads at one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Copy {
    Origin,
    Zero,
    Data(u64),
}

#[derive(Default)]
struct Model {
    /// Snapshot tag -> what it reads per chunk.
    snaps: BTreeMap<u64, Vec<Copy>>,
    next_copy: u64,
}

impl Model {
    fn new_copy(&mut self) -> Copy {
        self.next_copy += 1;
        Copy::Data(self.next_copy)
    }

    fn readers(&self, c: usize, copy: Copy) -> usize {
        self.snaps.values().filter(|v| v[c] == copy).count()
    }

    fn origin_write(&mut self, c: usize) {
        if self.snaps.values().any(|v| v[c] == Copy::Origin) {
            let copy = self.new_copy();
            for v in self.snaps.values_mut() {
                if v[c] == Copy::Origin {
                    v[c] = copy;
                }
            }
        }
    }

    fn snapshot_write(&mut self, tag: u64, c: usize) {
        let cur = self.snaps[&tag][c];
        let alone = matches!(cur, Copy::Data(_)) && self.readers(c, cur) == 1;
        if !alone {
            let copy = self.new_copy();
            self.snaps.get_mut(&tag).expect("live tag")[c] = copy;
        }
    }

    /// (own, shared) of each snapshot.
    fn usage(&self) -> BTreeMap<u64, (u64, u64)> {
        let mut count: HashMap<(usize, Copy), usize> = HashMap::new();
        for v in self.snaps.values() {
            for (c, copy) in v.iter().enumerate() {
                *count.entry((c, *copy)).or_insert(0) += 1;
            }
        }
        let mut out = BTreeMap::new();
        for (tag, v) in &self.snaps {
            let (mut own, mut shared) = (0, 0);
            for (c, copy) in v.iter().enumerate() {
                if let Copy::Data(_) = copy {
                    match count[&(c, *copy)] {
                        1 => own += 1,
                        _ => shared += 1,
                    }
                }
            }
            out.insert(*tag, (own, shared));
        }
        out
    }
}

fn store_usage(s: &Store) -> BTreeMap<u64, (u64, u64)> {
    s.status().origins[0]
        .snapshots
        .iter()
        .map(|x| (x.tag, (x.own_chunks, x.shared_chunks)))
        .collect()
}

/// A store on memory devices with one origin, `o`, of `CHUNKS` chunks.
fn new_store() -> Store {
    let fo = FormatOptions {
        chunk_size: CS as u32,
        force: false,
    };
    let s = Store::format(Arc::new(MemDev::new(8 << 20)) as Dev, &fo).unwrap();
    s.bind("o", "/o", Arc::new(MemDev::new(CHUNKS * CS)) as Dev, 0)
        .unwrap();
    s
}

fn run(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let s = new_store();
    let mut m = Model::default();
    for step in 0..120 {
        let tags: Vec<u64> = m.snaps.keys().copied().collect();
        let pick = |rng: &mut ChaCha8Rng| tags[rng.gen_range(0..tags.len())];
        let c = rng.gen_range(0..CHUNKS) as usize;
        // Half a chunk or a whole one: both follow the same copy rules.
        let (off, len) = match rng.gen_bool(0.5) {
            true => (c as u64 * CS + 512, 1024),
            false => (c as u64 * CS, CS as usize),
        };
        match rng.gen_range(0..10) {
            0..=3 => {
                s.volume("o", None)
                    .unwrap()
                    .write(off, &vec![step as u8; len], false)
                    .unwrap();
                m.origin_write(c);
            }
            4..=5 if !tags.is_empty() => {
                let t = pick(&mut rng);
                s.volume("o", Some(t))
                    .unwrap()
                    .write(off, &vec![step as u8; len], false)
                    .unwrap();
                m.snapshot_write(t, c);
            }
            6 if !tags.is_empty() => {
                // Whole chunk zeroed: a zero exception, no copy.
                let t = pick(&mut rng);
                s.volume("o", Some(t))
                    .unwrap()
                    .write_zeroes(c as u64 * CS, CS, false)
                    .unwrap();
                m.snaps.get_mut(&t).unwrap()[c] = Copy::Zero;
            }
            7 => {
                let t = s.snapshot("o", None, "", 0).unwrap();
                m.snaps.insert(t, vec![Copy::Origin; CHUNKS as usize]);
            }
            8 if !tags.is_empty() => {
                let of = pick(&mut rng);
                let t = s.snapshot("o", Some(of), "", 0).unwrap();
                let copies = m.snaps[&of].clone();
                m.snaps.insert(t, copies);
            }
            9 if tags.len() > 1 => {
                let t = pick(&mut rng);
                s.delete("o", t).unwrap();
                m.snaps.remove(&t);
                if rng.gen_bool(0.5) {
                    while s.step_background(16).unwrap().more {}
                }
            }
            _ => {}
        }
        assert_eq!(store_usage(&s), m.usage(), "seed {seed} step {step}");
    }
    let own: u64 = m.usage().values().map(|u| u.0).sum();
    println!("seed {seed}: {} snapshots, {own} own chunks", m.snaps.len());
}

#[test]
fn own_and_shared_match_a_model_of_physical_copies() {
    if let Some(seed) = std::env::var("SNAPMV_USAGE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return run(seed);
    }
    for seed in 0..40 {
        run(seed);
    }
}

#[test]
fn origin_writes_give_the_newest_snapshot_own_chunks() {
    let s = new_store();
    let o = s.volume("o", None).unwrap();
    let t1 = s.snapshot("o", None, "", 0).unwrap();
    o.write(0, &[1; 4096 * 3], false).unwrap(); // chunks 0-2 copied for t1
    let t2 = s.snapshot("o", None, "", 0).unwrap();
    o.write(0, &[2; 4096], false).unwrap(); // chunk 0 copied for t2 only
    o.write(3 * CS, &[2; 4096], false).unwrap(); // chunk 3 copied for t1 and t2
    let u = store_usage(&s);
    assert_eq!(u[&t1], (3, 1), "t1: chunks 0-2 alone, chunk 3 with t2");
    assert_eq!(u[&t2], (1, 1), "t2: chunk 0 alone, chunk 3 with t1");
}
