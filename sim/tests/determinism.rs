//! Replays are bit-identical: the same seed gives the same trace hash (a
//! crc32c over every operation and its result, every read's data and every
//! post-crash sector), and the exhaustive enumeration is deterministic.

use snapmv_sim::exhaustive::{self, Limits};
use snapmv_sim::workload::{cache_budget_text, Config, CACHE_BUDGETS};
use snapmv_sim::{parse_seed, run_seed, RunOpts};

#[test]
fn same_seed_same_trace_hash() {
    // Between them, these seeds run with every page-cache budget.
    for seed in [1u64, 7, 42, 0xdead_beef] {
        let opts = RunOpts::default();
        let a = run_seed(seed, 400, &opts);
        let b = run_seed(seed, 400, &opts);
        println!(
            "seed {seed}: page cache {}, trace hash {:08x}, {} ops, failure: {:?}",
            cache_budget_text(Config::swarm(seed).cache_budget),
            a.trace_hash,
            a.ops,
            a.failure.as_ref().map(|f| f.clause)
        );
        assert_eq!(
            a.trace_hash, b.trace_hash,
            "seed {seed} replayed differently"
        );
        assert_eq!(a.ops, b.ops);
        assert_eq!(a.stats.sectors_verified, b.stats.sectors_verified);
        assert_eq!(
            (a.stats.cache_misses, a.stats.cache_evictions),
            (b.stats.cache_misses, b.stats.cache_evictions)
        );
        assert_eq!(
            a.failure.as_ref().map(|f| (f.op, f.clause)),
            b.failure.as_ref().map(|f| (f.op, f.clause))
        );
    }
}

/// The swarm runs seeds through a small page cache, and there it evicts
/// (and misses) for real: the budget is no dead setting.
#[test]
fn a_seed_with_a_few_pages_of_cache_evicts() {
    let few_pages = CACHE_BUDGETS[1];
    assert_eq!(few_pages, Some(16 << 10));
    let seed = (1..)
        .find(|s| Config::swarm(*s).cache_budget == few_pages)
        .expect("some seed draws each budget");
    let r = run_seed(seed, 400, &RunOpts::default());
    println!("seed {seed}: {}; {}", r.config, r.stats);
    assert!(r.failure.is_none(), "seed {seed}: {:?}", r.failure);
    assert!(
        r.stats.cache_evictions > 0,
        "seed {seed}: no page was evicted with a budget of a few pages"
    );
    let default = (1..)
        .find(|s| Config::swarm(*s).cache_budget.is_none())
        .expect("some seed keeps the default");
    let d = run_seed(default, 400, &RunOpts::default());
    println!("seed {default}: {}", d.stats);
    assert_eq!(d.stats.cache_evictions, 0, "the default budget evicted");
}

#[test]
fn different_seeds_differ() {
    let opts = RunOpts::default();
    let a = run_seed(3, 200, &opts);
    let b = run_seed(4, 200, &opts);
    println!("seeds 3, 4: {:08x} {:08x}", a.trace_hash, b.trace_hash);
    assert_ne!(a.trace_hash, b.trace_hash);
}

#[test]
fn commit_id_seeds_replay() {
    let s = parse_seed("6629dbb1c3a5e7f9021436587a9cbedf01234567").expect("valid commit id");
    println!("commit-id seed -> {s}");
    let opts = RunOpts::default();
    assert_eq!(
        run_seed(s, 150, &opts).trace_hash,
        run_seed(s, 150, &opts).trace_hash
    );
}

#[test]
fn exhaustive_is_deterministic() {
    let lim = Limits::default();
    let a = exhaustive::run_all(Some("snapshot-write-with-children"), &lim, false, true);
    let b = exhaustive::run_all(Some("snapshot-write-with-children"), &lim, false, true);
    let key = |r: &[exhaustive::WorkloadReport]| {
        r.iter()
            .map(|w| (w.recorded_ios, w.crash_points, w.raw_states, w.checked))
            .collect::<Vec<_>>()
    };
    println!("{:?}", key(&a));
    assert_eq!(key(&a), key(&b));
}
