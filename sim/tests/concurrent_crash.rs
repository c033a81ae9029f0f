//! The concurrent crash simulator's CI slice (sim/src/concurrent.rs):
//! the engine's threads under shuttle, a power cut, and the contract.
//!
//!   cargo test -p snapmv-sim --features shuttle --test concurrent_crash
//!
//! `SNAPMV_CONCURRENT_SEEDS` sets the slice's size, `SNAPMV_CONCURRENT_FROM`
//! its first seed. Longer campaigns: `snapmv-sim-concurrent swarm`.

use snapmv_sim::concurrent::{cache_budget, run_seed, Opts, YieldDev};
use snapmv_sim::workload::CACHE_BUDGETS;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn ci_slice_keeps_the_contract() {
    let (from, n) = (
        env_u64("SNAPMV_CONCURRENT_FROM", 1),
        env_u64("SNAPMV_CONCURRENT_SEEDS", 2000),
    );
    let opts = Opts::default();
    let (mut ops, mut sure, mut mid, mut failures) = (0, 0, 0, Vec::new());
    let (mut misses, mut evictions, mut stale) = (0, 0, 0);
    for seed in from..from + n {
        let o = run_seed(seed, &opts);
        ops += o.ops;
        sure += o.sure_writes;
        mid += u64::from(o.cut_mid_run);
        misses += o.cache_misses;
        evictions += o.cache_evictions;
        stale += o.cache_stale_fetches;
        if let Some(f) = &o.failure {
            failures.push(format!(
                "seed {seed}: {f}\n  replay: {}",
                o.replay_command()
            ));
        }
    }
    println!(
        "concurrent crash slice: seeds {from}..{}, {ops} ops, {sure} durable writes checked, {mid} cuts mid-run, \
         page cache {misses} misses {evictions} evictions {stale} stale fetches while the threads ran",
        from + n
    );
    // The slice must really exercise both cut placements and durability,
    // and page-cache evictions while the threads race.
    assert!(mid > n / 4, "too few power cuts fell mid-run: {mid} of {n}");
    assert!(sure > n, "too few durable writes to check: {sure}");
    assert!(evictions > n, "too few page-cache evictions: {evictions}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_seed_replays_bit_identically() {
    // Page cache: 7 and 1234 64 KiB, 8 16 KiB, 2 the default.
    for seed in [7, 8, 1234, 2] {
        let a = run_seed(seed, &Opts::default());
        let b = run_seed(seed, &Opts::default());
        println!(
            "seed {seed}: page cache {:?}, {} misses, {} evictions, trace {:016x}",
            a.cache_budget, a.cache_misses, a.cache_evictions, a.trace_hash
        );
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed} did not replay");
        assert_eq!((a.ops, a.writes_ok), (b.ops, b.writes_ok));
        assert_eq!(
            (a.cache_misses, a.cache_evictions),
            (b.cache_misses, b.cache_evictions)
        );
    }
    let (a, b) = (run_seed(1, &Opts::default()), run_seed(2, &Opts::default()));
    assert_ne!(a.trace_hash, b.trace_hash, "different seeds, same run");
}

/// With a page cache of a few pages, the threads evict and miss while they
/// race (the ballast and the `status` walks see to it), in most seeds: the
/// ones that do not had their power cut early.
#[test]
fn a_few_pages_of_cache_evict_while_the_threads_run() {
    let few_pages = CACHE_BUDGETS[1];
    let seeds: Vec<u64> = (1..=200)
        .filter(|s| cache_budget(*s) == few_pages)
        .take(20)
        .collect();
    let mut evicting = 0;
    for &seed in &seeds {
        let o = run_seed(seed, &Opts::default());
        println!(
            "seed {seed}: {} ops, {} misses, {} evictions, cut mid-run {}",
            o.ops, o.cache_misses, o.cache_evictions, o.cut_mid_run
        );
        assert!(o.failure.is_none(), "seed {seed}: {:?}", o.failure);
        evicting += usize::from(o.cache_evictions > 0);
    }
    assert_eq!(seeds.len(), 20);
    assert!(
        evicting * 2 > seeds.len(),
        "only {evicting} of {} seeds with a few pages of cache evicted",
        seeds.len()
    );
}

// Focused scenarios: each reproduces one defect's mechanism under shuttle,
// over many seeded schedules, and fails on the code before its fix.

use shuttle::scheduler::{PctScheduler, RandomScheduler};
use shuttle::{Config, FailurePersistence, Runner};
use snapmv_engine::store::{self, Dev, FormatOptions, Store};
use snapmv_sim::{Domain, SimDev};
use std::sync::{Arc, Mutex};

const CS: u64 = 4096;

/// Run `body` under `schedules` seeded schedules (random and PCT); each
/// returns Err on a violation, which fails the test with its seed.
fn explore(schedules: u64, body: impl Fn() -> Result<(), String> + Send + Sync + 'static) {
    let body = Arc::new(body);
    let found: Arc<Mutex<Vec<String>>> = Arc::default();
    for seed in 0..schedules {
        let (body, found2) = (body.clone(), found.clone());
        let mut config = Config::new();
        config.failure_persistence = FailurePersistence::None;
        config.stack_size = 1 << 20;
        let run = move || {
            if let Err(e) = body() {
                found2
                    .lock()
                    .unwrap()
                    .push(format!("schedule seed {seed}: {e}"));
            }
        };
        if seed.is_multiple_of(2) {
            Runner::new(RandomScheduler::new_from_seed(seed, 1), config).run(run);
        } else {
            Runner::new(PctScheduler::new_from_seed(seed, 3, 1), config).run(run);
        }
        let f = found.lock().unwrap();
        assert!(f.is_empty(), "{}", f.join("\n"));
    }
}

struct Rig {
    store: Store,
    cow: SimDev,
    origin: SimDev,
}

fn rig(fill: u8, chunks: u64) -> Rig {
    let d = Domain::new();
    let cow = SimDev::new(&d, 0, "cow", 4 << 20, 1);
    let origin = SimDev::new(&d, 1, "o", chunks * CS, 1);
    let fo = FormatOptions {
        chunk_size: CS as u32,
        force: false,
    };
    // Every I/O is a scheduling point, as a disk's latency is.
    let store = Store::format(Arc::new(YieldDev(cow.clone())), &fo).unwrap();
    store
        .bind("o", "sim://o", Arc::new(YieldDev(origin.clone())), 0)
        .unwrap();
    let v = store.volume("o", None).unwrap();
    v.write(0, &vec![fill; (chunks * CS) as usize], true)
        .unwrap();
    Rig { store, cow, origin }
}

/// Reboot from what the disks hold when every unflushed write is lost.
fn reboot_dropping_unflushed(r: &Rig) -> Store {
    r.cow.domain().power_off();
    let (c, o) = (r.cow.crash_drop_all(), r.origin.crash_drop_all());
    let d = Domain::new();
    let (c, o) = (
        SimDev::from_image(&d, 0, "c", c, 1),
        SimDev::from_image(&d, 1, "o", o, 1),
    );
    let mut resolve =
        move |_: &str, _: &str| -> snapmv_engine::Result<Dev> { Ok(Arc::new(o.clone())) };
    Store::open(Arc::new(c), &mut resolve).unwrap()
}

/// Defect 2 of the power-cut report: a write that completes while a FLUSH
/// runs, and returns before the FLUSH does, must be durable when the FLUSH
/// returns (NBD: a FLUSH reply covers every write already replied).
#[test]
fn a_flush_covers_writes_completed_while_it_ran() {
    explore(400, || {
        let r = rig(0x11, 16);
        let tag = r.store.snapshot("o", None, "s", 0).unwrap();
        let order: Arc<Mutex<Vec<&str>>> = Arc::default();
        let (s1, o1) = (r.store.clone(), order.clone());
        let writer = shuttle::thread::spawn(move || {
            let v = s1.volume("o", Some(tag)).unwrap();
            v.write(3 * CS, &[0xaa; 512], false).unwrap();
            o1.lock().unwrap().push("write");
        });
        r.store.flush().unwrap();
        order.lock().unwrap().push("flush");
        writer.join().unwrap();
        let write_first = order.lock().unwrap()[0] == "write";
        let s = reboot_dropping_unflushed(&r);
        let mut b = [0u8; 512];
        s.volume("o", Some(tag))
            .unwrap()
            .read(3 * CS, &mut b)
            .unwrap();
        match (write_first, b[0]) {
            (true, 0x11) => Err("a write that returned before the FLUSH was lost".into()),
            _ => Ok(()),
        }
    });
}

/// Found by the concurrent simulator: the end of a rollback (dropping its
/// frozen source kills spine nodes) must not run while an origin write is
/// between planning a copy into such a node and mapping it; the cleaner
/// then left the copy dangling and its chunk leaked.
#[test]
fn a_rollback_ends_only_between_origin_writes() {
    explore(1000, || {
        // Two chunks: the copier's whole run fits in one write's I/O.
        let r = rig(0x22, 2);
        let tag = r.store.snapshot("o", None, "s", 0).unwrap();
        r.store.rollback("o", tag).unwrap();
        r.store.delete("o", tag).unwrap();
        let s1 = r.store.clone();
        let writer = shuttle::thread::spawn(move || {
            let v = s1.volume("o", None).unwrap();
            v.write(0, &[0xbb; 512], false).unwrap();
        });
        for _ in 0..1000 {
            if !r.store.step_background(1).unwrap().more {
                break;
            }
        }
        writer.join().unwrap();
        while r.store.step_background(64).unwrap().more {}
        r.store.flush().unwrap();
        let report = store::check(Arc::new(r.cow.clone())).unwrap();
        match report.errors.is_empty() {
            true => Ok(()),
            false => Err(format!("{:?}", report.errors)),
        }
    });
}
