#!/usr/bin/env bash
# The whole test suite: the one command the README gives and CI runs.
#   lint -> unit/integration/interop/sim tests -> the concurrent crash
#   simulator -> loom models and their planted bugs -> sim planted bugs
#   (sequential and concurrent) -> 10 power cuts of the real server
#   (scripts/powercut.sh) -> a bounded fuzz slice.
# Longer campaigns are separate commands (see README "Long campaigns").
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
step() { printf '\n=== %s (t=%ss)\n' "$1" "$((SECONDS - start))"; }

step setup
scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p snapmv-sim --features shuttle --all-targets -- -D warnings

step "cargo test (engine, vtree exhaustive, store model, limits, NBD interop, CLI, sim slice)"
cargo test --workspace --profile test -- --test-threads="${SNAPMV_TEST_THREADS:-2}"

step "concurrent crash simulator (engine threads under shuttle + power cuts: 2000 seeds, focused regressions)"
cargo test -p snapmv-sim --features shuttle --profile test --test concurrent_crash -- --nocapture

if [ -x engine/loom.sh ]; then
  step "loom models"
  engine/loom.sh
fi
if [ -x engine/loom-planted.sh ]; then
  step "loom planted bugs (each must be caught)"
  engine/loom-planted.sh
fi
if [ -x sim/planted.sh ]; then
  step "sim planted bugs (each must be caught)"
  sim/planted.sh
fi
step "power cut of the real server (10 cuts)"
scripts/powercut.sh --cuts 10
if [ -x fuzz/run-slice.sh ] && [ "${SNAPMV_SKIP_FUZZ:-0}" != 1 ]; then
  step "fuzz slice"
  fuzz/run-slice.sh "${SNAPMV_FUZZ_SECONDS:-15}"
fi
step "all passed"
