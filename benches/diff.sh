#!/usr/bin/env bash
# Diff benchmark (issue 13): how long `Store::diff` / `snapmv diff` takes on
# a COW device with 10,000 snapshots and about a million exceptions, and
# what that time grows with.
#
# For each origin size in DIFF_SIZES (default "1T 16G": the same history on
# a 1 TiB and a 16 GiB sparse origin, 4 KiB chunks), builds (or reuses) a
# device with benches/src/bin/diff_bench.rs `gen`: 10,000 snapshots of the
# origin; after each one the origin rewrites 30 hot chunks (one copy per
# snapshot each: 300,000 exceptions, 10,000 in each hot chunk); every 10th
# snapshot gets 700 chunks zeroed (700,000 zero exceptions, each alone in
# its chunk, spread over the device); after snapshot 5005 the origin writes
# 100,000 chunks spread over the device. Then `diff_bench measure` times
# diffs (first call, median and min of 7 more): adjacent snapshots with 30
# changed chunks, with 730, and with 100,030; the first and last snapshot;
# snapshot and origin; the burst pair over a 64 MiB and a 1 GiB window
# (what one NBD block-status request asks); and, as the reference for a
# walk chunk by chunk, `block_status` over 1 GiB, extrapolated. Both devices
# are measured in one process, taking turns call by call, so the load of
# the (shared) machine falls on them alike. Last, the
# whole `snapmv diff ... --json` process (open, diff, output) for two cases.
# The measurement runs twice: with the default page-cache budget, and with
# DIFF_BIG_CACHE (256 MiB), which holds the whole exception index.
#
#   benches/diff.sh                  # both sizes
#   DIFF_SIZES=16G benches/diff.sh   # one
#   benches/diff.sh --out FILE       # also write the report to FILE
#   env: DIFF_DIR (device cache, default /var/tmp/snapmv-diff; kept, about
#        1.7 GiB per device), DIFF_ROUNDS (default 7), DIFF_BIG_CACHE,
#        DIFF_REGEN=1
#
# A measurement script: it asserts nothing about speed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "diff.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
SIZES=${DIFF_SIZES:-1T 16G}
DIR=${DIFF_DIR:-/var/tmp/snapmv-diff}
ROUNDS=${DIFF_ROUNDS:-7}
BIG_CACHE=${DIFF_BIG_CACHE:-268435456}
GEN_ARGS="--snapshots 10000 --hot 30 --zeroed-every 10 --zeroed 700 --burst-after 5005 --burst 100000"

cargo build --release -q -p snapmv-nbd --bin snapmv -p snapmv-benches --bin diff_bench
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD -- engine nbd-frontend benches 2>/dev/null || COMMIT="$COMMIT, with uncommitted changes"
REPORT=$(mktemp)
trap 'rm -f "$REPORT"' EXIT

{
  echo "## Run of $(date -u '+%Y-%m-%d %H:%M UTC'), snapmv at $COMMIT"
  echo
  echo "- Machine: $(nproc) CPU ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- Devices in $DIR ($(df -P "$(dirname "$DIR")" | awk 'NR == 2 {print $1}')); history: $GEN_ARGS"
} >>"$REPORT"

COWS=""
for SIZE in $SIZES; do
  D="$DIR/o$SIZE"
  # The engine's format is part of the key: a device made before format 2
  # has no index by node, and every diff on it would walk by chunk.
  PARAMS="format 2 origin-size $SIZE $GEN_ARGS"
  if [ "${DIFF_REGEN:-0}" = 1 ] || [ "$(cat "$D/params" 2>/dev/null)" != "$PARAMS" ]; then
    rm -rf "$D"; mkdir -p "$D"
    echo "== generating $D (origin $SIZE)" >&2
    # shellcheck disable=SC2086
    "$BIN/diff_bench" gen --cow "$D/cow.img" --origin "$D/origin.img" --origin-size "$SIZE" $GEN_ARGS | tee "$D/gen.txt" >&2
    echo "$PARAMS" >"$D/params"
  fi
  echo "- Origin $SIZE: $(grep '^made' "$D/gen.txt")." >>"$REPORT"
  COWS="${COWS:+$COWS,}$D/cow.img"
done

echo "== measuring $COWS" >&2
"$BIN/diff_bench" measure --cow "$COWS" --rounds "$ROUNDS" --burst-after 5005 >"$DIR/measure.txt"
"$BIN/diff_bench" measure --cow "$COWS" --rounds "$ROUNDS" --burst-after 5005 \
  --cache-budget "$BIG_CACHE" >"$DIR/measure-big-cache.txt"
"$BIN/diff_bench" measure --cow "$COWS" --rounds "$ROUNDS" --burst-after 5005 \
  --strategy by-chunk >"$DIR/measure-by-chunk.txt"
{
  echo
  echo "### Default page-cache budget (32 MiB, as \`snapmv serve\` runs)"
  echo
  grep -v '^RESULT' "$DIR/measure.txt"
  echo
  echo "### Page-cache budget $((BIG_CACHE >> 20)) MiB (the whole exception index stays in memory)"
  echo
  grep -v '^RESULT' "$DIR/measure-big-cache.txt" | grep -v 'opened in'
  echo
  echo "### The walk by chunk alone (every diff made to take it; default budget)"
  echo
  grep -v '^RESULT' "$DIR/measure-by-chunk.txt" | grep -v 'opened in'
  echo
  echo "### Whole \`snapmv diff COW vol FROM TO --json\` processes"
  echo
  echo "Offline (open, diff, JSON out); wall seconds and peak RSS:"
  echo
  for SIZE in $SIZES; do
    for pair in "1254 1255" "5005 5006"; do
      set -- $pair
      t=$( { /usr/bin/time -f '%e s, %M KiB' "$BIN/snapmv" diff "$DIR/o$SIZE/cow.img" vol "$1" "$2" --json >/dev/null; } 2>&1 )
      echo "- origin $SIZE, \`diff $1 $2\`: $t"
    done
  done
  echo
  echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
} >>"$REPORT"

cat "$REPORT"
if [ -n "$OUT" ]; then cp "$REPORT" "$OUT"; fi
