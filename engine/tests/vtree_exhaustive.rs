//! The versioned-pointer algebra against the naive full-copy model:
//! every operation sequence up to a bound, exhaustively (two threads share
//! the branches after the first op), plus a proptest over long random
//! sequences. Every state reached is compared on content
//! and on space accounting: each snapshot's own and shared chunks as
//! `vtree::usage` counts them (what the store's `status` shows) against
//! the naive model's physical copies (`Algebra::check`), and on `diff`
//! between every pair of versions (`Algebra::check_diff`): a chunk is
//! reported exactly where the two versions read different physical copies,
//! so none whose content differs is missed, and an unchanged one is
//! reported only where the metadata cannot tell (two copies with equal
//! content: zeros, or an origin rolled back in place); the totals are
//! printed. The version tree's index of flagged nodes is compared with a
//! walk over every node after every operation, and each cleaner pass's end
//! (`finish_pass`, which visits only indexed nodes) with the walk it
//! replaced (`Algebra::check`, `Algebra::clean_step`); planted bug
//! `unindexed_flag` fails `every_sequence_up_to_bound_matches_the_naive_model`.

use proptest::prelude::*;
use snapmv_engine::vtree::model::{Algebra, DiffTally, Naive, Op};

const CHUNKS: u64 = 2;

fn alphabet(live: usize) -> Vec<Op> {
    let mut ops = vec![Op::SnapOrigin, Op::CleanStep];
    for c in 0..CHUNKS {
        for h in 0..2 {
            ops.push(Op::WriteOrigin { c, h });
            for k in 0..live {
                ops.push(Op::WriteSnap { k, c, h });
            }
        }
        for k in 0..live {
            ops.push(Op::ZeroSnap { k, c });
        }
    }
    for k in 0..live {
        ops.extend([Op::SnapOf { k }, Op::Delete { k }, Op::Rollback { k }]);
    }
    ops
}

/// Apply `op` to copies of the state and check the result against the
/// naive model, diff included; at the last op of a sequence (`depth` 1),
/// also check that draining the cleaner changes nothing visible.
fn apply_checked(
    alg: &Algebra,
    naive: &Naive,
    op: Op,
    depth: usize,
    trail: &[Op],
    tally: &mut DiffTally,
) -> (Algebra, Naive) {
    let (mut a, mut n) = (alg.clone(), naive.clone());
    assert!(n.apply(op), "alphabet offered an inapplicable op");
    match a.apply(op) {
        Ok(true) => {}
        other => panic!("algebra refused {op:?} after {trail:?}: {other:?}"),
    }
    if let Err(e) = a.check(&n) {
        panic!("mismatch after {trail:?}: {e}");
    }
    match a.check_diff(&n) {
        Ok(t) => tally.add(t),
        Err(e) => panic!("diff after {trail:?}: {e}"),
    }
    if depth == 1 {
        let mut drained = a.clone();
        drained
            .clean_all()
            .unwrap_or_else(|e| panic!("clean_all after {trail:?}: {e}"));
        if let Err(e) = drained.check(&n) {
            panic!("mismatch after draining the cleaner, {trail:?}: {e}");
        }
        if let Err(e) = drained.check_diff(&n) {
            panic!("diff after draining the cleaner, {trail:?}: {e}");
        }
    }
    (a, n)
}

/// Depth-first over every sequence; clones state at each branch so every
/// prefix is checked once. Returns the number of sequences checked.
fn dfs(
    alg: &Algebra,
    naive: &Naive,
    depth: usize,
    trail: &mut Vec<Op>,
    tally: &mut DiffTally,
) -> u64 {
    if depth == 0 {
        return 1;
    }
    let mut count = 0;
    for op in alphabet(naive.versions.len()) {
        trail.push(op);
        let (a, n) = apply_checked(alg, naive, op, depth, trail, tally);
        count += dfs(&a, &n, depth - 1, trail, tally);
        trail.pop();
    }
    count
}

/// `dfs` from the empty state, its subtrees shared among `workers` threads:
/// the states after one op are checked here once, and each branch from
/// them (a second op and all that follows) is one task, dealt round robin.
fn dfs_parallel(depth: usize, workers: usize) -> (u64, DiffTally) {
    assert!(depth >= 2 && workers >= 1);
    let (alg, naive) = (Algebra::new(CHUNKS), Naive::new(CHUNKS));
    let mut tally = DiffTally::default();
    let roots: Vec<(Op, Algebra, Naive)> = alphabet(0)
        .into_iter()
        .map(|op| {
            let (a, n) = apply_checked(&alg, &naive, op, depth, &[op], &mut tally);
            (op, a, n)
        })
        .collect();
    let tasks: Vec<(usize, Op)> = roots
        .iter()
        .enumerate()
        .flat_map(|(i, (_, _, n))| {
            alphabet(n.versions.len())
                .into_iter()
                .map(move |op| (i, op))
        })
        .collect();
    let results: Vec<(u64, DiffTally)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (roots, tasks) = (&roots, &tasks);
                scope.spawn(move || {
                    let mut tally = DiffTally::default();
                    let mut count = 0;
                    for &(i, op) in tasks.iter().skip(w).step_by(workers) {
                        let (first, a, n) = &roots[i];
                        let mut trail = vec![*first, op];
                        let (a, n) = apply_checked(a, n, op, depth - 1, &trail, &mut tally);
                        count += dfs(&a, &n, depth - 2, &mut trail, &mut tally);
                    }
                    (count, tally)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a worker panicked"))
            .collect()
    });
    let mut count = 0;
    for (c, t) in results {
        count += c;
        tally.add(t);
    }
    (count, tally)
}

#[test]
fn every_sequence_up_to_bound_matches_the_naive_model() {
    let depth: usize = std::env::var("SNAPMV_VTREE_DEPTH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let t = std::time::Instant::now();
    let (n, tally) = match depth {
        0 | 1 => {
            let mut tally = DiffTally::default();
            let (alg, naive) = (Algebra::new(CHUNKS), Naive::new(CHUNKS));
            (dfs(&alg, &naive, depth, &mut Vec::new(), &mut tally), tally)
        }
        _ => dfs_parallel(depth, 2),
    };
    println!(
        "vtree exhaustive: {n} sequences of {depth} ops over {CHUNKS} chunks checked in {:?}",
        t.elapsed()
    );
    // Unchanged chunks reported where both versions read one copy, both
    // zeros or both the origin in place: 0, or check_diff fails. What is
    // left are two copies with equal content, which no metadata tells apart.
    println!(
        "diff: {} version pairs, {} chunks reported; unchanged among them, all physically \
         different copies: {} zero, {} other (rollback)",
        tally.pairs, tally.reported, tally.unchanged_zero, tally.unchanged_other
    );
    assert!(tally.reported > 0, "no diff ever reported a chunk");
    assert!(
        n > 1_000_000 || depth < 6,
        "the enumeration is smaller than expected: {n}"
    );
}

fn op_strategy() -> impl Strategy<Value = (u8, usize, u64, usize)> {
    (0u8..8, 0usize..6, 0u64..4, 0usize..2)
}

fn to_op((kind, k, c, h): (u8, usize, u64, usize), live: usize) -> Option<Op> {
    let need = |op: Op| if live > 0 { Some(op) } else { None };
    let k = if live > 0 { k % live } else { 0 };
    match kind {
        0 | 1 => Some(Op::WriteOrigin { c, h }),
        2 => need(Op::WriteSnap { k, c, h }),
        3 => Some(Op::SnapOrigin),
        4 => need(Op::SnapOf { k }),
        5 => need(Op::Delete { k }),
        6 => Some(Op::CleanStep),
        _ => need(if c == 0 {
            Op::Rollback { k }
        } else {
            Op::ZeroSnap { k, c }
        }),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn long_random_sequences_match_the_naive_model(raw in prop::collection::vec(op_strategy(), 1..300)) {
        let mut a = Algebra::new(4);
        let mut n = Naive::new(4);
        for (i, r) in raw.into_iter().enumerate() {
            let Some(op) = to_op(r, n.versions.len()) else { continue };
            prop_assert!(n.apply(op));
            prop_assert_eq!(a.apply(op).map_err(|e| e.to_string()), Ok(true));
            if let Err(e) = a.check(&n) {
                return Err(TestCaseError::fail(format!("step {i} {op:?}: {e}")));
            }
            if let Err(e) = a.check_diff(&n) {
                return Err(TestCaseError::fail(format!("diff at step {i} {op:?}: {e}")));
            }
        }
        a.clean_all().map_err(|e| TestCaseError::fail(e.to_string()))?;
        if let Err(e) = a.check(&n) {
            return Err(TestCaseError::fail(format!("after cleaning: {e}")));
        }
        prop_assert!(!a.tree.has_flagged());
    }
}
