#!/usr/bin/env bash
# Parallel scaling of the origin write path: runs the criterion bench
# `scaling` (1 vs 2 threads of 4 KiB random writes to distinct chunks, on
# MemDev, without a snapshot and with one that forces a first-write copy of
# every chunk) and prints the 2-thread/1-thread throughput ratio of each case
# from criterion's estimates (target/criterion/scaling_*).
#
#   benches/scaling.sh                 # run the bench, then report
#   benches/scaling.sh --report-only   # report the last run
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--report-only" ]; then
  cargo bench -p snapmv-benches --bench scaling -- "$@"
fi
dir="${CARGO_TARGET_DIR:-target}/criterion"
# Time per iteration (ns) from criterion's estimates.json: the slope (what
# criterion prints as "time" for linear sampling), else the mean.
per_iter() {
  local f=$1 v
  v=$(sed -nE 's/.*"slope":\{"confidence_interval":\{[^}]*\},"point_estimate":([0-9.eE+-]+).*/\1/p' "$f")
  [ -n "$v" ] || v=$(sed -nE 's/.*"mean":\{"confidence_interval":\{[^}]*\},"point_estimate":([0-9.eE+-]+).*/\1/p' "$f")
  echo "$v"
}
echo
echo "parallel scaling on $(nproc) cores (one iteration = one 4 KiB write;" \
  "load average now: $(cut -d' ' -f1-3 /proc/loadavg), so other work on the machine skews the 2-thread case):"
for case in origin_4k first_copy_4k; do
  f1="$dir/scaling_$case/threads/1/new/estimates.json"
  f2="$dir/scaling_$case/threads/2/new/estimates.json"
  if [ ! -f "$f1" ] || [ ! -f "$f2" ]; then
    echo "  $case: no estimates (run the bench first)"
    continue
  fi
  awk -v c="$case" -v a="$(per_iter "$f1")" -v b="$(per_iter "$f2")" 'BEGIN {
    printf "  %-14s 1 thread %8.1f MiB/s (%7.2f us/write)   2 threads %8.1f MiB/s (%7.2f us/write)   ratio 2/1 = %.2f\n",
      c, 4096 / a * 1e9 / 1048576, a / 1000, 4096 / b * 1e9 / 1048576, b / 1000, a / b
  }'
done
