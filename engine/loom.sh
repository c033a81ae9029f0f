#!/usr/bin/env bash
# Run the loom models (engine/tests/loom_models.rs) of the engine's real
# synchronisation: chunk locks, origin gate, group commit, copy-before-
# overwrite ordering, cleaner and rollback copier. Each model prints how many
# interleavings loom explored.
#
#   engine/loom.sh                  # LOOM_MAX_PREEMPTIONS=3 (default)
#   LOOM_MAX_PREEMPTIONS=2 engine/loom.sh
#   engine/loom.sh model_flush      # only models whose name contains this
set -euo pipefail
cd "$(dirname "$0")/.."
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}"
export RUSTFLAGS="--cfg loom"
export CARGO_TARGET_DIR="${SNAPMV_LOOM_TARGET:-$PWD/target/loom}"
start=$SECONDS
out=$(mktemp)
trap 'rm -f "$out"' EXIT
set +e
cargo test -p snapmv-engine --release --test loom_models -- \
  --nocapture --test-threads="${SNAPMV_TEST_THREADS:-2}" "$@" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
set -e
echo
echo "loom summary (LOOM_MAX_PREEMPTIONS=$LOOM_MAX_PREEMPTIONS):"
grep '^loom model ' "$out" | sort || true
total=$(grep -o '^loom model [a-z_]*: [0-9]*' "$out" | awk '{s += $4} END {print s + 0}')
echo "total interleavings explored: $total; $((SECONDS - start))s"
exit "$rc"
