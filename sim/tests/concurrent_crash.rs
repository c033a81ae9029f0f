//! The concurrent crash simulator's CI slice (sim/src/concurrent.rs):
//! the engine's threads under shuttle, a power cut, and the contract.
//!
//!   cargo test -p snapmv-sim --features shuttle --test concurrent_crash
//!
//! `SNAPMV_CONCURRENT_SEEDS` sets the slice's size, `SNAPMV_CONCURRENT_FROM`
//! its first seed. Longer campaigns: `snapmv-sim-concurrent swarm`.

use snapmv_sim::concurrent::{run_seed, Opts};

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
    for seed in from..from + n {
        let o = run_seed(seed, &opts);
        ops += o.ops;
        sure += o.sure_writes;
        mid += u64::from(o.cut_mid_run);
        if let Some(f) = &o.failure {
            failures.push(format!(
                "seed {seed}: {f}\n  replay: {}",
                o.replay_command()
            ));
        }
    }
    println!(
        "concurrent crash slice: seeds {from}..{}, {ops} ops, {sure} durable writes checked, {mid} cuts mid-run",
        from + n
    );
    // The slice must really exercise both cut placements and durability.
    assert!(mid > n / 4, "too few power cuts fell mid-run: {mid} of {n}");
    assert!(sure > n, "too few durable writes to check: {sure}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_seed_replays_bit_identically() {
    for seed in [7, 8, 1234] {
        let a = run_seed(seed, &Opts::default());
        let b = run_seed(seed, &Opts::default());
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed} did not replay");
        assert_eq!((a.ops, a.writes_ok), (b.ops, b.writes_ok));
    }
    let (a, b) = (run_seed(1, &Opts::default()), run_seed(2, &Opts::default()));
    assert_ne!(a.trace_hash, b.trace_hash, "different seeds, same run");
}
