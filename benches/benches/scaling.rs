//! Parallel scaling of the origin write path on `MemDev`: 1 thread against
//! 2 threads of 4 KiB random writes, each thread to its own chunks (so the
//! chunk locks never contend and what is measured is everything else the
//! threads share: the metadata mutex, the lock-table shards, group commit).
//!
//! - `origin_4k`: no snapshot; every write is a plain in-place overwrite
//!   (within 32 chunks per thread, so the data stays in cache).
//! - `first_copy_4k`: a snapshot shares every chunk, and every write is the
//!   first to its chunk since that snapshot, so each one copies the old 64 KiB
//!   chunk to the COW device and waits for the copy's commit (group commit
//!   lets concurrent writers share one). Between timed rounds (untimed) the
//!   bench takes a fresh snapshot, deletes the previous one and runs the
//!   cleaner, so the supply of uncopied chunks never runs out.
//!
//! One criterion iteration is one 4 KiB write (whichever thread does it), so
//! the reported throughput is the total; `benches/scaling.sh` prints the
//! 2-thread/1-thread ratio from criterion's estimates.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use snapmv_engine::store::{FormatOptions, Store, Volume};
use snapmv_engine::{BlockDev, MemDev};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const CHUNK: u64 = 64 * 1024;
const IO: usize = 4096;
const MAX_THREADS: u64 = 2;
/// Chunks each thread owns; also the first-copy writes per thread per round.
const PER_THREAD: u64 = 512;
/// Chunks each thread writes in `origin_4k`: 2 MiB per thread, so the data
/// stays in cache and the bench measures the engine, not RAM bandwidth.
const HOT: u64 = 32;
const ORIGIN_SIZE: u64 = MAX_THREADS * PER_THREAD * CHUNK;
const COW_SIZE: u64 = 1 << 30;

struct Rig {
    store: Store,
    origin: Volume,
    snap: Option<u64>,
    now: i64,
}

impl Rig {
    fn new() -> Rig {
        let cow = Arc::new(MemDev::new(COW_SIZE));
        let dev = Arc::new(MemDev::new(ORIGIN_SIZE));
        // Touch every page now so the timed writes never allocate.
        let fill = vec![0x5Au8; 1 << 20];
        for off in (0..ORIGIN_SIZE).step_by(fill.len()) {
            dev.write_at(off, &fill).expect("prefill");
        }
        let store = Store::format(
            cow,
            &FormatOptions {
                chunk_size: CHUNK as u32,
                force: false,
            },
        )
        .expect("format");
        store.bind("o", "mem:o", dev, 0).expect("bind");
        let origin = store.volume("o", None).expect("origin");
        Rig {
            store,
            origin,
            snap: None,
            now: 0,
        }
    }

    /// A fresh snapshot (so every chunk needs its first copy again); the
    /// previous one is deleted and cleaned. Untimed.
    fn resnapshot(&mut self) {
        self.now += 1;
        let tag = self
            .store
            .snapshot("o", None, "bench", self.now)
            .expect("snapshot");
        if let Some(old) = self.snap.replace(tag) {
            self.store.delete("o", old).expect("delete");
            while self.store.step_background(4096).expect("clean").more {}
        }
    }
}

/// `threads` threads, thread t doing `per_thread` writes to its own chunks
/// [t * PER_THREAD, t * PER_THREAD + span): random chunks and offsets when
/// `distinct` is false, each chunk at most once (in random order) when true.
/// Returns the wall time from the common start to the last finish.
fn timed_round(
    vol: &Volume,
    threads: u64,
    per_thread: u64,
    span: u64,
    distinct: bool,
    seed: u64,
) -> Duration {
    let start = Barrier::new(threads as usize + 1);
    std::thread::scope(|s| {
        let start = &start;
        for t in 0..threads {
            let vol = vol.clone();
            s.spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (t << 32));
                let base = t * PER_THREAD;
                let mut order: Vec<u64> = (0..span).collect();
                if distinct {
                    for i in (1..order.len()).rev() {
                        order.swap(i, rng.gen_range(0..=i));
                    }
                }
                let buf = vec![t as u8 + 1; IO];
                start.wait();
                for i in 0..per_thread {
                    let c = if distinct {
                        order[i as usize]
                    } else {
                        rng.gen_range(0..span)
                    };
                    let slot = rng.gen_range(0..CHUNK / IO as u64);
                    let off = (base + c) * CHUNK + slot * IO as u64;
                    vol.write(off, &buf, false).expect("write");
                }
            });
        }
        start.wait();
        let t0 = Instant::now();
        // The scope joins every thread before returning.
        t0
    })
    .elapsed()
}

fn origin_4k(c: &mut Criterion) {
    let rig = Rig::new();
    let mut g = c.benchmark_group("scaling/origin_4k");
    g.throughput(Throughput::Bytes(IO as u64));
    for threads in 1..=MAX_THREADS {
        let mut seed = 0;
        g.bench_with_input(BenchmarkId::new("threads", threads), &threads, |b, &n| {
            b.iter_custom(|iters| {
                seed += 1;
                let per = iters.div_ceil(n);
                timed_round(&rig.origin, n, per, HOT, false, seed)
            })
        });
    }
    g.finish();
}

fn first_copy_4k(c: &mut Criterion) {
    let mut rig = Rig::new();
    rig.resnapshot();
    let mut g = c.benchmark_group("scaling/first_copy_4k");
    g.throughput(Throughput::Bytes(IO as u64));
    for threads in 1..=MAX_THREADS {
        let mut seed = 0;
        g.bench_with_input(BenchmarkId::new("threads", threads), &threads, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters.div_ceil(n);
                while left > 0 {
                    let per = left.min(PER_THREAD);
                    rig.resnapshot();
                    seed += 1;
                    total += timed_round(&rig.origin, n, per, PER_THREAD, true, seed);
                    left -= per;
                }
                total
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
}

criterion_group! {
    name = benches;
    config = config();
    targets = origin_4k, first_copy_4k
}
criterion_main!(benches);
