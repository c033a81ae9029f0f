//! Planted-bug self-test: a bench that cannot fail is worth nothing.
//!
//! `sim/planted.sh` builds this test once with `--cfg snapmv_planted` and
//! runs it once per planted engine bug X (`SNAPMV_PLANTED_BUG=X`, see
//! `snapmv_engine::planted`), and requires it to pass: the simulator must
//! catch bug X within a bounded effort (the exhaustive workloads, then at
//! most `MAX_SEEDS` swarm seeds of the CI slice). With no bug planted the
//! test only says so.
//!
//! The CI slice passes on the unplanted engine, so any failure here is the
//! planted bug's doing; the test also checks it breaks the expected clause.

use snapmv_engine::planted::{self, Bug};
use snapmv_sim::campaign::swarm;
use snapmv_sim::exhaustive::{self, Limits};
use snapmv_sim::{Clause, RunOpts};

const MAX_SEEDS: u64 = 200;
const OPS: u64 = 300;

/// The planted bug of this process, and the clauses it may break.
fn planted() -> Option<(&'static str, &'static [Clause])> {
    let bug = planted::active()?;
    let clauses: &'static [Clause] = match bug {
        Bug::SkipCowFlush => &[Clause::CrashStates, Clause::Durability],
        Bug::SkipChecksum => &[Clause::Detection],
        Bug::EarlyReuse => &[Clause::CrashStates, Clause::Isolation],
        other => panic!(
            "planted bug {} is not one the sequential simulator is meant to catch",
            other.name()
        ),
    };
    Some((bug.name(), clauses))
}

#[test]
fn planted_bug_is_caught() {
    let Some((bug, clauses)) = planted() else {
        println!("no planted bug in this build; run sim/planted.sh");
        return;
    };
    println!("planted bug: {bug}");
    // 1. Exhaustive crash states of the scripted workloads.
    let reps = exhaustive::run_until_failure(&Limits::default());
    for r in &reps {
        if let Some((at, f)) = r.failures.first() {
            println!(
                "CAUGHT {bug} by exhaustive workload {} ({} states checked) at {at}\n{f}",
                r.name, r.checked
            );
            assert!(
                clauses.contains(&f.clause),
                "{bug} broke {} instead",
                f.clause
            );
            return;
        }
    }
    println!("exhaustive mode did not catch {bug}; trying swarm seeds");
    // 2. Swarm seeds of the CI slice, in order, stopping at the first failure.
    let opts = RunOpts::default();
    let rep = swarm(1, MAX_SEEDS, OPS, 2, false, true, &opts);
    let first = rep
        .failures
        .iter()
        .filter_map(|r| r.failure.as_ref())
        .min_by_key(|f| f.seed);
    match first {
        Some(f) => {
            println!(
                "CAUGHT {bug} by swarm seed {} at op {}: {}\n{f}replay: {}",
                f.seed,
                f.op,
                f.clause,
                f.replay_command(&opts.flags())
            );
            assert!(
                clauses.contains(&f.clause),
                "{bug} broke {} instead",
                f.clause
            );
        }
        None => panic!("{bug} NOT caught: exhaustive mode and {MAX_SEEDS} swarm seeds all passed"),
    }
}
