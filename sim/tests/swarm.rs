//! The CI slice of the swarm: a few hundred seeds, short runs, every seed
//! with its own operation mix and fault rates. Seeds are fixed, so CI is
//! deterministic for a given engine; a failure prints its replay command.
//!
//! Every operation kind is on, including I/O faults, metadata damage,
//! power cuts inside calls and fill-until-ENOSPC phases.

use snapmv_sim::campaign::swarm;
use snapmv_sim::RunOpts;

pub const CI_SEEDS: u64 = 500;
pub const CI_OPS: u64 = 800;
pub const CI_FROM: u64 = 1;

#[test]
fn bounded_swarm() {
    let opts = RunOpts::default();
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    println!(
        "swarm: seeds {CI_FROM}..{} ({CI_SEEDS} seeds), {CI_OPS} ops each, {jobs} jobs, {}",
        CI_FROM + CI_SEEDS,
        opts.flags()
    );
    let rep = swarm(CI_FROM, CI_SEEDS, CI_OPS, jobs, false, false, &opts);
    println!("{}", rep.stats);
    println!(
        "{} seeds, {} simulated ops in {:.1}s = {:.0} simulated ops/s (test profile)",
        rep.seeds,
        rep.stats.ops,
        rep.secs,
        rep.ops_per_sec()
    );
    for r in &rep.failures {
        if let Some(f) = &r.failure {
            println!("{f}  replay: {}", f.replay_command(&opts.flags()));
        }
    }
    assert!(
        rep.failures.is_empty(),
        "{} seed(s) failed",
        rep.failures.len()
    );
    assert_eq!(rep.seeds, CI_SEEDS);
    // A quarter of the seeds run with a page cache of a few pages.
    assert!(
        rep.stats.cache_evictions > CI_SEEDS,
        "too few page-cache evictions: {}",
        rep.stats.cache_evictions
    );
}
