#!/usr/bin/env bash
# Do snapshot lookups serialise? Engine-only 4 KiB random reads
# (`scale_gen read`, no NBD, one process per run, default cache budget) of
# the snapshot (tag 1: a B+tree lookup per read, under the metadata read
# lock) and of the origin (tag 0: no metadata at all) of the scale
# benchmark's devices (benches/scale.sh builds them; run it once first), at
# 1 and 2 threads. Scaling = reads/s at 2 threads / reads/s at 1 thread,
# per round, snapshot and origin measured in the same round in rotating
# order; the report gives medians and every round. If lookups serialised
# on one mutex, snapshot scaling would stay near 1.0 while origin scaling
# rises towards the core count.
#
#   benches/lookup_scaling.sh                  # 3 rounds of 8 s runs, 10 M exceptions
#   benches/lookup_scaling.sh --rounds 5 --secs 10 --n 10000
# A measurement script: it asserts nothing about speed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=3; SECS=8; N=10000000; THREADS="1 2"
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift ;;
    --secs) SECS=$2; shift ;;
    --n) N=$2; shift ;;
    --threads) THREADS=$2; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "lookup_scaling.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
SCALE_DIR=${SCALE_DIR:-${TMPDIR:-/tmp}/snapmv-scale}
COW="$SCALE_DIR/n$N/cow.img"
[ -f "$COW" ] || { echo "lookup_scaling.sh: no device $COW; run benches/scale.sh${N:+ --big} first" >&2; exit 1; }
cargo build -q --release -p snapmv-benches --bin scale_gen
GEN=target/release/scale_gen
R=$(mktemp)
trap 'rm -f "$R"' EXIT
echo "# lookup scaling: $N exceptions, $ROUNDS rounds of ${SECS}s, threads $THREADS, $(nproc) cores, commit $(git rev-parse --short HEAD)"
echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
  configs=()
  for t in $THREADS; do for tag in 1 0; do configs+=("$tag:$t"); done; done
  # Rotate the order each round.
  k=$(( (r - 1) % ${#configs[@]} ))
  order=("${configs[@]:k}" "${configs[@]:0:k}")
  for c in "${order[@]}"; do
    tag=${c%:*}; t=${c#*:}
    line=$("$GEN" read --cow "$COW" --tag "$tag" --threads "$t" --secs "$SECS" | grep '^RESULT')
    rps=$(sed -E 's/.*reads_per_s=([0-9]+).*/\1/' <<<"$line")
    echo "round $r tag $tag threads $t: $rps reads/s"
    echo "$r $tag $t $rps" >>"$R"
  done
done
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$R" "$THREADS" <<'PY'
import sys, statistics as st
rows = [l.split() for l in open(sys.argv[1])]
threads = [int(t) for t in sys.argv[2].split()]
rate = {(int(r), int(tag), int(t)): float(v) for r, tag, t, v in rows}
rounds = sorted({k[0] for k in rate})
lo, hi = threads[0], threads[-1]
print(f"\n| version | reads/s at {lo} thread(s), median | at {hi} | scaling {hi}/{lo} per round | median |")
print("|---|---:|---:|---|---:|")
for tag, name in ((1, "snapshot (B+tree lookup)"), (0, "origin (no metadata)")):
    sc = [rate[(r, tag, hi)] / rate[(r, tag, lo)] for r in rounds]
    print(f"| {name} | {st.median(rate[(r, tag, lo)] for r in rounds):,.0f} | "
          f"{st.median(rate[(r, tag, hi)] for r in rounds):,.0f} | "
          + " / ".join(f"{x:.2f}" for x in sc) + f" | {st.median(sc):.2f} |")
rel = [(rate[(r, 1, hi)] / rate[(r, 1, lo)]) / (rate[(r, 0, hi)] / rate[(r, 0, lo)]) for r in rounds]
print(f"\nSnapshot scaling relative to origin scaling, per round: "
      + " / ".join(f"{x:.2f}" for x in rel) + f"; median {st.median(rel):.2f}")
PY
