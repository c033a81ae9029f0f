#!/usr/bin/env bash
# Control-plane benchmark (issue 12 item 3): how fast a live `snapmv serve`
# answers admin calls with many snapshots on one origin.
#
# On tmpfs (/dev/shm), then on disk, with N snapshots (default 100,000) of
# origin `vol` (64 MiB file, 64 KiB chunks) existing:
#   - fill: N snapshots taken through one control connection (pipelined);
#   - rtt (benches/src/bin/control_bench.rs, one persistent connection):
#     hello and rollback_progress (cheap calls), snapshots back to back and
#     then their deletes, snapshot+delete pairs (a rotating script: the
#     cleaner runs between snapshots), and `list` (the whole status);
#   - cli: whole `snapmv snapshot COW vol` processes, each timed from spawn
#     to exit (its snapshots deleted afterwards, untimed).
# The disk run serves a copy of the tmpfs COW device from $CONTROL_DISK_DIR
# (default /var/tmp), since taking N snapshots there costs N commits
# (fdatasync each). Figures are p50/p99/max in microseconds.
#
#   benches/control.sh                  # N = 100,000; 2,000 calls; 500 CLI runs
#   CONTROL_N=10000 CONTROL_CALLS=500 CONTROL_CLI=100 benches/control.sh
#   benches/control.sh --out FILE       # also write the report to FILE
#   env: CONTROL_DISK_DIR, CONTROL_DISK_CALLS (default 500),
#        CONTROL_DISK_CLI (default 200), CONTROL_LISTS (default 5)
#
# Targets (issue 12): a round trip under 1 ms at p99, the CLI under 10 ms at
# p99. A measurement script: it asserts nothing about speed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "control.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
N=${CONTROL_N:-100000}
CALLS=${CONTROL_CALLS:-2000}
CLI=${CONTROL_CLI:-500}
DISK_CALLS=${CONTROL_DISK_CALLS:-500}
DISK_CLI=${CONTROL_DISK_CLI:-200}
LISTS=${CONTROL_LISTS:-5}
DISK_DIR=${CONTROL_DISK_DIR:-/var/tmp}

cargo build --release -q -p snapmv-nbd --bin snapmv -p snapmv-benches --bin control_bench
SNAPMV=$ROOT/target/release/snapmv
BENCH=$ROOT/target/release/control_bench

SHM=$(mktemp -d /dev/shm/snapmv-control.XXXXXX)
DISK=$(mktemp -d "$DISK_DIR/snapmv-control.XXXXXX")
PID=""
cleanup() {
  if [ -n "$PID" ]; then kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  rm -rf "$SHM" "$DISK"
}
trap cleanup EXIT
REPORT=$(mktemp)

# start_server DIR [serve args...]: serve DIR/cow.img; returns once its
# control socket accepts.
start_server() {
  local dir=$1; shift
  "$SNAPMV" serve "$dir/cow.img" --unix "$dir/nbd.sock" "$@" >"$dir/serve.log" 2>&1 &
  PID=$!
  for _ in $(seq 600); do
    [ -S "$dir/cow.img.snapmv.sock" ] && return 0
    kill -0 "$PID" 2>/dev/null || { cat "$dir/serve.log" >&2; exit 1; }
    sleep 0.05
  done
  echo "control.sh: no control socket after 30 s" >&2; exit 1
}

stop_server() {
  kill -TERM "$PID"; wait "$PID" || true; PID=""
}

rss_mib() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$PID/status"; }

# measure LABEL DIR CALLS CLI: the rtt and cli runs against DIR's server.
measure() {
  local label=$1 dir=$2 calls=$3 cli=$4 sock=$2/cow.img.snapmv.sock
  echo "== $label: rtt ($calls calls), cli ($cli runs)" >&2
  "$BENCH" rtt "$sock" vol "$calls" "$LISTS" | sed "s/^/$label /" >>"$REPORT"
  "$BENCH" cli "$sock" "$SNAPMV" "$dir/cow.img" vol "$cli" | sed "s/^/$label /" >>"$REPORT"
  echo "$label serve_rss_mib $(rss_mib)" >>"$REPORT"
}

echo "== tmpfs: format, bind, fill $N snapshots" >&2
truncate -s 64M "$SHM/vol"
truncate -s 4G "$SHM/cow.img"
"$SNAPMV" format "$SHM/cow.img" >/dev/null
"$SNAPMV" bind "$SHM/cow.img" "$SHM/vol" --id vol
start_server "$SHM"
"$BENCH" fill "$SHM/cow.img.snapmv.sock" vol "$N" | sed "s/^/tmpfs /" >>"$REPORT"
measure tmpfs "$SHM" "$CALLS" "$CLI"
stop_server

echo "== disk ($DISK_DIR): copy the COW device, serve it" >&2
cp --sparse=always "$SHM/cow.img" "$SHM/vol" "$DISK/"
rm -f "$SHM/cow.img"
sync
start_server "$DISK" --origin "vol=$DISK/vol"
measure disk "$DISK" "$DISK_CALLS" "$DISK_CLI"
stop_server

{
  echo "Control plane, $N snapshots on one origin ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
  echo
  grep -E ' fill ' "$REPORT" | awk '{printf "fill (%s): %s snapshots in %s s, %s\n", $1, $3, $4, $6}'
  echo
  echo "| where | call | calls | p50 µs | p99 µs | max µs |"
  echo "|---|---|---:|---:|---:|---:|"
  awk 'NF == 6 && $2 != "fill" {printf "| %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6}' "$REPORT"
  echo
  awk '$2 == "list_reply_bytes" {printf "list reply (%s): %s bytes\n", $1, $3}' "$REPORT"
  awk '$2 == "serve_rss_mib" {printf "serve RSS (%s): %s MiB\n", $1, $3}' "$REPORT"
} | tee ${OUT:+"$OUT"}
rm -f "$REPORT"
