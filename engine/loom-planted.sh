#!/usr/bin/env bash
# Each planted bug removes one protection from the engine (see
# engine/src/planted.rs); the loom model guarding that protection must FAIL.
# The engine is built once, as engine/loom.sh builds it (`--cfg loom`,
# release, in its target directory, so the dependencies are shared) plus
# `--cfg snapmv_planted` on the workspace crates through
# RUSTC_WORKSPACE_WRAPPER (cargo hashes the wrapper into their artifact
# names, so the unplanted build stays too). Then, for each bug, the loom
# suite runs with SNAPMV_PLANTED_BUG=<bug>, and the expected model(s) must
# be among the failures. Exit status is non-zero if any planted bug goes
# unnoticed.
#
#   engine/loom-planted.sh              # every bug
#   engine/loom-planted.sh no_gate      # only the named ones
set -euo pipefail
cd "$(dirname "$0")/.."
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"

# bug -> models that must fail under it
declare -A expect=(
  [no_chunk_lock]="model_read_vs_origin_write"
  [no_write_lock]="model_two_writers_first_copy"
  [no_gate]="model_write_vs_snapshot model_write_vs_own_delete"
  [no_clean_lock]="model_write_vs_delete_clean"
  [no_flush_barrier]="model_flush_vs_writes"
  [no_rb_lock]="model_rollback_vs_write"
  [skip_cow_flush]="model_copy_before_overwrite_crash"
  [destage_early]="model_destage_waits_for_the_copy"
)
order=(no_chunk_lock no_write_lock no_gate no_clean_lock no_flush_barrier no_rb_lock skip_cow_flush destage_early)
if [ $# -gt 0 ]; then order=("$@"); fi

export CARGO_TARGET_DIR="${SNAPMV_LOOM_TARGET:-$PWD/target/loom}"
export RUSTFLAGS="--cfg loom"
RUSTC_WORKSPACE_WRAPPER=$(scripts/planted-wrapper.sh "$CARGO_TARGET_DIR/wrappers")
export RUSTC_WORKSPACE_WRAPPER

start=$SECONDS
missed=()
summary=()
for bug in "${order[@]}"; do
  [ -n "${expect[$bug]:-}" ] || { echo "unknown planted bug: $bug" >&2; exit 2; }
  t0=$SECONDS
  echo "=== planted bug $bug: expect ${expect[$bug]} to fail"
  out=$(mktemp)
  set +e
  SNAPMV_PLANTED_BUG="$bug" \
    cargo test -p snapmv-engine --release --test loom_models -- --test-threads=2 >"$out" 2>&1
  rc=$?
  set -e
  if ! grep -q '^test result:' "$out"; then
    tail -40 "$out"
    echo "planted bug $bug: the loom suite did not run (build failure?)" >&2
    rm -f "$out"
    exit 1
  fi
  # `|| true`: no failing model is an outcome to report, not a reason for
  # `set -e` to end the script silently.
  failed=$( (grep -o '^test model_[a-z_]* \.\.\. FAILED' "$out" || true) | awk '{print $2}' | sort | tr '\n' ' ')
  ok=1
  for m in ${expect[$bug]}; do
    if ! grep -q "^test $m \.\.\. FAILED" "$out"; then ok=0; fi
  done
  # The first assertion message of each failing model, to show what broke.
  grep -A1 "panicked at" "$out" | grep -v '^--' | grep -v 'panicked at' | sort -u | head -4 | sed 's/^/    /'
  if [ "$ok" = 1 ] && [ "$rc" != 0 ]; then
    line="$bug: CAUGHT (failing: ${failed}) [$((SECONDS - t0))s]"
  else
    line="$bug: MISSED (expected ${expect[$bug]} to fail; failing: ${failed:-none}) [$((SECONDS - t0))s]"
    missed+=("$bug")
  fi
  echo "$line"
  summary+=("$line")
  rm -f "$out"
done
echo
echo "loom planted bugs (LOOM_MAX_PREEMPTIONS=$LOOM_MAX_PREEMPTIONS), $((SECONDS - start))s:"
printf '  %s\n' "${summary[@]}"
if [ ${#missed[@]} -gt 0 ]; then
  echo "planted bugs NOT caught: ${missed[*]}" >&2
  exit 1
fi
echo "every planted bug was caught"
