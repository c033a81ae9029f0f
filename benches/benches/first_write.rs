//! The engine's first-write path alone (no NBD, no driver thread): after a
//! snapshot, 4 KiB writes at QD1 on one thread, each to the next chunk not
//! yet written since the snapshot, so every write is a first write (the old
//! 64 KiB chunk is copied to the COW device and mapped). One criterion
//! iteration is one write; the time reported is the mean per write.
//!
//! Two ways of paying for the commit that makes each copy durable:
//! - `budget0_backpressure`: `set_staging_budget(0)`, staging nearly off.
//!   A write stages its chunk and returns, and the next write finds the
//!   budget used, so it commits and destages the previous one first: one
//!   commit per write, paid by the writer (what a first write cost before
//!   staging, shifted by one write).
//! - `commit_every/N`: the default budget (64 MiB, 1024 chunks here) and
//!   `commit_staged()` after every N writes, on the writing thread: what the
//!   server's driver thread does off the writers' path, here timed inline,
//!   so the per-write time includes 1/N of a commit and its destaging.
//!
//! Two groups, one per COW/origin backend:
//! - `first_write_4k/memdev`: `MemDev` (flushes free: the CPU cost of the
//!   copy, the staging and the commit's journal write).
//! - `first_write_4k/filedev`: `FileDev` files under the bench's target tmp
//!   dir (`CARGO_TARGET_TMPDIR`, or `SNAPMV_BENCH_DIR`), buffered I/O: each
//!   commit pays the disk's real `fdatasync`s. Check that the dir is not on
//!   tmpfs if the numbers are to mean anything.
//!
//! Between timed stretches (untimed) a fresh snapshot replaces the previous
//! one, which is deleted and cleaned, so uncopied chunks never run out.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use snapmv_engine::dev::OpenOptions;
use snapmv_engine::store::{FormatOptions, Store, Volume, DEFAULT_STAGING_BUDGET};
use snapmv_engine::{BlockDev, FileDev, MemDev};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHUNK: u64 = 64 * 1024;
const IO: usize = 4096;
/// Origin chunks: first writes available per snapshot.
const CHUNKS: u64 = 1024;
const ORIGIN_SIZE: u64 = CHUNKS * CHUNK;
/// Room for one snapshot's copies, the next one's, and the metadata.
const COW_SIZE: u64 = 4 * ORIGIN_SIZE;
/// Commit intervals of the staged runs (writes per `commit_staged`).
const COMMIT_EVERY: [u64; 2] = [16, 128];

#[derive(Clone, Copy)]
enum Backend {
    Mem,
    File,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Mem => "memdev",
            Backend::File => "filedev",
        }
    }
}

#[derive(Clone, Copy)]
enum Mode {
    /// Staging budget 0: every write commits the previous one's copy.
    Budget0,
    /// Default budget, `commit_staged()` after every N writes.
    CommitEvery(u64),
}

struct Rig {
    store: Store,
    origin: Volume,
    snap: Option<u64>,
    /// The next chunk without a first write since the snapshot.
    next: u64,
    now: i64,
    mode: Mode,
    /// Writes since the last `commit_staged` (CommitEvery).
    pending: u64,
    dir: Option<PathBuf>,
}

fn bench_dir() -> PathBuf {
    let base = std::env::var_os("SNAPMV_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    base.join(format!("first_write-{}", std::process::id()))
}

impl Rig {
    fn new(backend: Backend, mode: Mode) -> Rig {
        let (cow, dev, dir): (Arc<dyn BlockDev>, Arc<dyn BlockDev>, _) = match backend {
            Backend::Mem => (
                Arc::new(MemDev::new(COW_SIZE)),
                Arc::new(MemDev::new(ORIGIN_SIZE)),
                None,
            ),
            Backend::File => {
                let dir = bench_dir();
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).expect("bench dir");
                let open = |name: &str, size| {
                    let opts = OpenOptions {
                        create_size: Some(size),
                        ..OpenOptions::default()
                    };
                    Arc::new(FileDev::open(dir.join(name), &opts).expect("open"))
                };
                (
                    open("cow.img", COW_SIZE),
                    open("origin.img", ORIGIN_SIZE),
                    Some(dir),
                )
            }
        };
        // Fill the origin, so the copies read real data (and, on MemDev,
        // the timed writes never allocate).
        let fill = vec![0x5Au8; 1 << 20];
        for off in (0..ORIGIN_SIZE).step_by(fill.len()) {
            dev.write_at(off, &fill).expect("prefill");
        }
        dev.flush().expect("prefill flush");
        let store = Store::format(
            cow,
            &FormatOptions {
                chunk_size: CHUNK as u32,
                force: false,
            },
        )
        .expect("format");
        store.bind("o", "bench:o", dev, 0).expect("bind");
        store.set_staging_budget(match mode {
            Mode::Budget0 => 0,
            Mode::CommitEvery(_) => DEFAULT_STAGING_BUDGET,
        });
        let origin = store.volume("o", None).expect("origin");
        let mut rig = Rig {
            store,
            origin,
            snap: None,
            next: CHUNKS,
            now: 0,
            mode,
            pending: 0,
            dir,
        };
        rig.resnapshot();
        rig
    }

    /// A fresh snapshot (every chunk needs its first copy again); the
    /// previous one is deleted and cleaned. Untimed. Taking the snapshot
    /// drains what is staged.
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
        self.next = 0;
        self.pending = 0;
    }

    /// `n` first writes, timed (resnapshots in between are not).
    fn run(&mut self, n: u64, buf: &[u8]) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = n;
        while left > 0 {
            if self.next == CHUNKS {
                self.resnapshot();
            }
            let k = left.min(CHUNKS - self.next);
            let t0 = Instant::now();
            for _ in 0..k {
                let c = self.next;
                self.next += 1;
                // A different 4 KiB slot of each chunk.
                let off = c * CHUNK + (c % (CHUNK / IO as u64)) * IO as u64;
                self.origin.write(off, buf, false).expect("write");
                if let Mode::CommitEvery(every) = self.mode {
                    self.pending += 1;
                    if self.pending == every {
                        self.store.commit_staged().expect("commit_staged");
                        self.pending = 0;
                    }
                }
            }
            total += t0.elapsed();
            left -= k;
        }
        total
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn group(c: &mut Criterion, backend: Backend) {
    let mut g = c.benchmark_group(format!("first_write_4k/{}", backend.name()));
    g.throughput(Throughput::Elements(1));
    let buf = vec![0xC3u8; IO];
    let mut modes = vec![(
        BenchmarkId::from_parameter("budget0_backpressure"),
        Mode::Budget0,
    )];
    for n in COMMIT_EVERY {
        modes.push((BenchmarkId::new("commit_every", n), Mode::CommitEvery(n)));
    }
    for (id, mode) in modes {
        let mut rig = Rig::new(backend, mode);
        g.bench_function(id, |b| b.iter_custom(|iters| rig.run(iters, &buf)));
        let st = rig.store.staging_stats();
        // Every first write went through staging, whatever the budget.
        assert!(st.staged > 0 && st.staged >= st.destaged, "{st:?}");
    }
    g.finish();
}

fn memdev(c: &mut Criterion) {
    group(c, Backend::Mem);
}

fn filedev(c: &mut Criterion) {
    group(c, Backend::File);
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = memdev, filedev
}
criterion_main!(benches);
