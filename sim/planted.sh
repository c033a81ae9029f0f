#!/bin/sh
# Show that the simulator catches each bug planted in the engine
# (engine/src/planted.rs: `planted::on(Bug::...)` hooks, live only in a
# build with --cfg snapmv_planted and for the bug SNAPMV_PLANTED_BUG names).
#
#   sim/planted.sh                 # all of them
#   sim/planted.sh skip_checksum   # one
#
# skip_cow_flush, skip_checksum and early_reuse are caught by the sequential
# simulator (tests/planted.rs). alloc_early, flush_no_cover and
# clean_free_early only show when threads and a power cut meet: the
# concurrent crash simulator (src/concurrent.rs) must catch each within its
# CI slice's seeds; SNAPMV_PLANTED_CROSS=1 also runs each of them through
# the sequential swarm, to show that mode misses it. evict_dirty (the page
# cache evicts dirty or not-yet-checkpointed pages) is caught by the engine's
# B+tree model run through a page cache of a few pages
# (engine/tests/meta_model.rs): those tests must fail. fetch_ignores_epoch
# (a page read with no lock held enters the cache although a checkpoint or
# a free raced the read) is caught by the page cache's race tests
# (engine/src/meta/page_cache.rs, `a_fetch_that_raced_*`). destage_early
# (staged first writes go in place before the commit that makes their
# copy durable) needs a commit racing a write: the concurrent simulator.
# unindexed_flag (the version tree's flag index misses the interior nodes a
# delete flags, so no cleaner pass removes them) is caught by the vtree
# exhaustive check (engine/tests/vtree_exhaustive.rs), which compares the
# index with a walk over every node after every operation.
# gather_ignores_moves (a diff's gather over the index by node goes on
# after the cleaner moved exceptions between its batches) is caught by
# `a_gather_disturbed_by_the_cleaner_misses_nothing`
# (engine/src/store/diff_by_node.rs), which deletes snapshots between
# batches and compares with the undisturbed diff.
# pool_blocks_on_client (a frontend bug: a shared pool thread waits on a
# client that does not read its replies) is caught by the NBD server's
# test `a_client_that_never_reads_holds_no_pool_thread`.
#
# One build serves every bug: --cfg snapmv_planted is added to the workspace
# crates alone through RUSTC_WORKSPACE_WRAPPER, in the suite's own target
# directory, so the dependencies the suite built are reused, and cargo keeps
# these artifacts apart from the unplanted ones (the wrapper is part of their
# hash). Each bug is then a run with SNAPMV_PLANTED_BUG set, not a rebuild.
# Exit status is non-zero if any planted bug goes uncaught.
set -eu
cd "$(dirname "$0")/.."
bugs="${*:-skip_cow_flush skip_checksum early_reuse alloc_early flush_no_cover clean_free_early evict_dirty fetch_ignores_epoch unindexed_flag gather_ignores_moves destage_early pool_blocks_on_client}"
concurrent_seeds="${SNAPMV_CONCURRENT_SEEDS:-2000}"
RUSTC_WORKSPACE_WRAPPER=$(scripts/planted-wrapper.sh "${CARGO_TARGET_DIR:-target}/wrappers")
export RUSTC_WORKSPACE_WRAPPER
status=0
# Run package $1's tests (cargo test arguments after the first three)
# against the bug's build: they must fail, with a test whose name contains
# $3 FAILED. $2 says what they are.
tests_catch() {
    package=$1
    what=$2
    pattern=$3
    shift 3
    if SNAPMV_PLANTED_BUG="$b" cargo test -p "$package" --profile test "$@" >"$log" 2>&1; then
        tail -5 "$log"
        echo "=== $b: NOT CAUGHT: $what passed (log: $log)"
        status=1
    elif grep -q "^test .*$pattern.* FAILED" "$log"; then
        echo "CAUGHT $b by $what:"
        grep -E "^test .* FAILED|^called|Err" "$log" | head -4
        echo "=== $b: caught"
    else
        tail -20 "$log"
        echo "=== $b: NOT CAUGHT: the build or run failed otherwise (log: $log)"
        status=1
    fi
}

for b in $bugs; do
    echo "=== planted bug: $b"
    log="/tmp/snapmv-planted-$b.log"
    case "$b" in
    evict_dirty)
        tests_catch snapmv-engine "the meta model with a tiny page cache" tiny_cache \
            --test meta_model -- tiny_cache_keeps_pinned_pages deep_trees_tiny_cache
        ;;
    fetch_ignores_epoch)
        tests_catch snapmv-engine "the page cache's race tests" a_fetch_that_raced \
            --lib -- a_fetch_that_raced
        ;;
    unindexed_flag)
        tests_catch snapmv-engine "the vtree exhaustive check" every_sequence \
            --test vtree_exhaustive -- every_sequence_up_to_bound
        ;;
    gather_ignores_moves)
        tests_catch snapmv-engine "the diff's disturbed-gather test" a_gather_disturbed \
            --lib -- a_gather_disturbed
        ;;
    pool_blocks_on_client)
        tests_catch snapmv-nbd "the NBD server's stuck-client test" a_client_that_never_reads \
            --lib -- a_client_that_never_reads
        ;;
    alloc_early | flush_no_cover | clean_free_early | destage_early)
        # The concurrent simulator: the first failing seed is the catch.
        if SNAPMV_PLANTED_BUG="$b" \
            cargo run -q -p snapmv-sim --features shuttle --profile test --bin snapmv-sim-concurrent -- \
            swarm --seeds "$concurrent_seeds" --jobs 2 --expect-failure >"$log" 2>&1; then
            echo "CAUGHT $b by the concurrent crash simulator:"
            grep -E "seeds in|FAILED" "$log" | head -2
            echo "=== $b: caught"
        else
            tail -5 "$log"
            echo "=== $b: NOT CAUGHT within $concurrent_seeds seeds (log: $log)"
            status=1
        fi
        if [ "${SNAPMV_PLANTED_CROSS:-0}" = 1 ]; then
            echo "--- $b through the sequential swarm (expected to miss it):"
            SNAPMV_PLANTED_BUG="$b" \
                cargo run -q -p snapmv-sim --profile test --bin snapmv-sim -- \
                swarm --seeds 500 --ops 800 --jobs 2 2>&1 | tail -2 || true
        fi
        ;;
    *)
        if SNAPMV_PLANTED_BUG="$b" \
            cargo test -p snapmv-sim --profile test --test planted -- --nocapture 2>&1 | tee "$log" |
            grep -E "CAUGHT|NOT caught|planted bug|test result|panicked|exhaustive mode did not"; then :; fi
        if grep -q "^CAUGHT" "$log" && grep -q "test result: ok" "$log"; then
            echo "=== $b: caught"
        else
            echo "=== $b: NOT CAUGHT (log: $log)"
            status=1
        fi
        ;;
    esac
done
exit $status
