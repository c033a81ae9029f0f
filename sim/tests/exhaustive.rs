//! The full exhaustive crash-state mode, as CI runs it: every scripted
//! workload, every crash state (see the enumeration rules in
//! sim/src/exhaustive.rs), each booted and checked against the contract.

use snapmv_sim::exhaustive::{self, Limits};

#[test]
fn every_crash_state_of_every_workload() {
    let lim = Limits::default();
    let reps = exhaustive::run_all(None, &lim, false, true);
    for l in exhaustive::table(&reps) {
        println!("{l}");
    }
    let mut failed = 0;
    for r in &reps {
        if !r.note.is_empty() {
            println!("{}: {}", r.name, r.note);
        }
        for (at, f) in &r.failures {
            failed += 1;
            println!("FAILED workload {} at {at}:\n{f}", r.name);
        }
        assert!(r.checked > 0, "workload {} checked no state", r.name);
    }
    let total: u64 = reps.iter().map(|r| r.checked).sum();
    println!("crash states checked: {total}");
    assert_eq!(failed, 0);
}
