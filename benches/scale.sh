#!/usr/bin/env bash
# Scale benchmark: a snapshot with many exceptions under a 1 TiB sparse origin.
#
# Builds (or reuses, see below) COW devices with N = 10,000 and, with --big,
# N = 10,000,000 exceptions on snapshot vol@1 of a 1 TiB sparse origin, 4 KiB
# chunks (benches/src/bin/scale_gen.rs: runs of 16 zero-exception chunks spread
# evenly over the origin, 1 % of the runs starting with a real data chunk), then
# measures, one thing at a time:
#   - `snapmv check COW`: wall time and peak RSS (/usr/bin/time %e %M);
#   - `Store::open` and `Store::close` wall time (`scale_gen open`, median of 3),
#     and the time from starting `snapmv serve` until its Unix socket accepts;
#   - with every device served at once (one `snapmv serve --read-only --unix`
#     each), fio --ioengine=nbd 4 KiB random reads (QD16, over the whole 1 TiB,
#     --norandommap) of the snapshot export vol@1 and of the origin export vol,
#     at 1, 2 and 4 connections, in rounds; each round rotates the order of
#     devices and of snapshot/origin, and uses its own random seed (the same
#     seed for the snapshot and origin jobs of a round). During each job the
#     serve process's VmRSS is sampled once a second, and its VmHWM is reset
#     before the job (echo 5 > /proc/PID/clear_refs) and read after it;
#   - engine-only random reads of the snapshot (`scale_gen read`, 1 thread,
#     no NBD), once per round per device, with RSS.
# Prints a Markdown report (medians of the rounds, every round's value too).
#
#   benches/scale.sh                 # N = 10,000 only; 3 rounds of 20 s jobs
#   benches/scale.sh --big           # and N = 10,000,000
#   benches/scale.sh --big --quick   # 1 round of 5 s jobs
#   benches/scale.sh --big --assert  # exit 1 if a target below is missed
#   options: --rounds R --runtime S --conns "1 2 4" --out FILE --regen
#   env: SCALE_DIR (device cache; default ${TMPDIR:-/tmp}/snapmv-scale),
#        SCALE_BIG_N (default 10000000), SCALE_SMALL_N (default 10000),
#        SCALE_SERVE_ARGS (extra `snapmv serve` arguments, e.g. a cache budget)
#
# Targets (issue 10), reported, asserted only with --assert: serve peak RSS
# under 128 MiB during snapshot reads of the largest device, `check` peak RSS
# under 256 MiB there.
#
# Device cache: each device lives in $SCALE_DIR/n<N>/ with the generator's
# parameters in `params`; a device whose params match (and whose generation
# finished) is reused, otherwise it is regenerated (--regen forces it). The
# cache is kept after the run; delete the directory to reclaim the space
# (~0.5 GiB allocated for 10 M exceptions; the 1 TiB origin is sparse).
# A measurement script: it asserts nothing about speed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

BIG=0; QUICK=0; ASSERT=0; REGEN=0; OUT=""; ROUNDS=""; RUNTIME=""; CONNS="1 2 4"
while [ $# -gt 0 ]; do
  case "$1" in
    --big) BIG=1 ;;
    --quick) QUICK=1 ;;
    --assert) ASSERT=1 ;;
    --regen) REGEN=1 ;;
    --rounds) ROUNDS=$2; shift ;;
    --runtime) RUNTIME=$2; shift ;;
    --conns) CONNS=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,41p' "$0"; exit 0 ;;
    *) echo "scale.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ "$QUICK" = 1 ]; then ROUNDS=${ROUNDS:-1}; RUNTIME=${RUNTIME:-5}; fi
ROUNDS=${ROUNDS:-3}; RUNTIME=${RUNTIME:-20}
SMALL_N=${SCALE_SMALL_N:-10000}
BIG_N=${SCALE_BIG_N:-10000000}
SIZES="$SMALL_N"; [ "$BIG" = 1 ] && SIZES="$SMALL_N $BIG_N"
SCALE_DIR=${SCALE_DIR:-${TMPDIR:-/tmp}/snapmv-scale}
SERVE_EXTRA=${SCALE_SERVE_ARGS:-}
CHUNK=4096; COW_SIZE=8G; ORIGIN_SIZE=1T; ORIGIN_BYTES=$((1 << 40)); RUN=16; IODEPTH=16

T_START=$(date +%s)
DATE_START=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
BUSY_START=$(ps -eo pcpu=,etimes=,args= --sort=-pcpu | awk '$1 >= 10 { a = $3; for (i = 4; i <= NF && i <= 6; i++) a = a " " $i; printf "%s%s (%s%% CPU)", sep, substr(a, 1, 90), $1; sep = "; " }')

for t in fio python3 /usr/bin/time; do
  command -v "$t" >/dev/null || { echo "scale.sh: needs $t (apt-get install fio python3 time)" >&2; exit 1; }
done
fio --enghelp 2>/dev/null | grep -qx '[[:space:]]*nbd' || { echo "scale.sh: this fio has no nbd ioengine" >&2; exit 1; }

echo "== building snapmv and scale_gen (release)"
cargo build --release -p snapmv-nbd --bin snapmv -p snapmv-benches --bin scale_gen
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
SNAPMV="$BIN/snapmv"; GEN="$BIN/scale_gen"
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD -- engine nbd-frontend 2>/dev/null || COMMIT="$COMMIT, engine/frontend with uncommitted changes"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/snapmv-scale-run.XXXXXX")
PIDS=()          # servers
SAMPLER=""
cleanup() {
  [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null || true
  local p
  for p in "${PIDS[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
  done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

CMDS="$WORK/commands.txt"; : >"$CMDS"
R="$WORK/results.tsv"; : >"$R"       # kind \t key=value ...
run() {  # record (paths shortened) and run
  local q; q=$(printf '%q ' "$@"); q=${q//$WORK/\$W}; q=${q//$SCALE_DIR/\$SCALE_DIR}; q=${q//$BIN\//}
  echo "$q" >>"$CMDS"
  "$@"
}
rec() { printf '%s\n' "$*" >>"$R"; }
result_of() { sed -n 's/^RESULT //p' "$1" | tail -1; }   # key=value line of scale_gen
now() { date +%s.%N; }
ms_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", (b - a) * 1000 }'; }
status_kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

echo "== devices in $SCALE_DIR; sizes: $SIZES; $ROUNDS round(s) of ${RUNTIME} s jobs; connections: $CONNS"

# ---- devices ------------------------------------------------------------------
declare -A DIR
for n in $SIZES; do
  d="$SCALE_DIR/n$n"; DIR[$n]=$d
  data=$(( (n + RUN - 1) / RUN / 100 ))   # 1 % of the runs start with a data chunk
  params="exceptions=$n chunk_size=$CHUNK cow_size=$COW_SIZE origin_size=$ORIGIN_SIZE run=$RUN data=$data"
  if [ "$REGEN" = 0 ] && [ -f "$d/done" ] && [ "$(cat "$d/params" 2>/dev/null)" = "$params" ]; then
    echo "== reusing the device with $n exceptions ($d, generated $(cat "$d/done"))"
    rec "gen n=$n reused=1 $(result_of "$d/gen.log")"
  else
    echo "== generating a device with $n exceptions in $d"
    rm -rf "$d"; mkdir -p "$d"
    echo "$params" >"$d/params"
    t0=$(now)
    run "$GEN" gen --cow "$d/cow.img" --origin "$d/origin.img" --exceptions "$n" \
      --chunk-size "$CHUNK" --cow-size "$COW_SIZE" --origin-size "$ORIGIN_SIZE" \
      --run "$RUN" --data "$data" --id vol | tee "$d/gen.log"
    echo "wall_ms=$(ms_since "$t0")" >>"$d/gen.log"
    date -u '+%Y-%m-%d %H:%M UTC' >"$d/done"
    rec "gen n=$n reused=0 $(result_of "$d/gen.log")"
  fi
done

# ---- check and open, one at a time ------------------------------------------
for n in $SIZES; do
  d=${DIR[$n]}
  echo "== check, $n exceptions"
  tf="$WORK/check-$n.time"
  run /usr/bin/time -o "$tf" -f '%e %M' "$SNAPMV" check "$d/cow.img" --json >"$WORK/check-$n.json"
  read -r secs kib <"$tf"
  exc=$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["exceptions"], j["clean"], j["pages_checked"], j["data_chunks_referenced"])' "$WORK/check-$n.json")
  read -r e clean pages dchunks <<<"$exc"
  echo "   ${secs} s, peak RSS $((kib / 1024)) MiB; exceptions $e, clean $clean, $pages pages"
  [ "$e" = "$n" ] || { echo "scale.sh: check counts $e exceptions, expected $n" >&2; exit 1; }
  [ "$clean" = True ] || { echo "scale.sh: check found damage" >&2; cat "$WORK/check-$n.json" >&2; exit 1; }
  rec "check n=$n secs=$secs kib=$kib pages=$pages data_chunks=$dchunks"
  echo "== the engine's parts alone: meta::check, store::check, Store::status(), $n exceptions"
  run "$GEN" check --cow "$d/cow.img" --part meta >"$WORK/mcheck-$n.log"
  rec "part n=$n what=meta_check $(result_of "$WORK/mcheck-$n.log")"
  run "$GEN" check --cow "$d/cow.img" --part store >"$WORK/scheck-$n.log"
  rec "part n=$n what=store_check $(result_of "$WORK/scheck-$n.log")"
  run "$GEN" status --cow "$d/cow.img" >"$WORK/status-$n.log"
  rec "part n=$n what=status $(result_of "$WORK/status-$n.log")"
  echo "== Store::open, $n exceptions (3 times)"
  for i in 1 2 3; do
    run "$GEN" open --cow "$d/cow.img" >"$WORK/open-$n-$i.log"
    rec "open n=$n $(result_of "$WORK/open-$n-$i.log")"
  done
done

# ---- servers --------------------------------------------------------------------
declare -A PID SOCK
for n in $SIZES; do
  d=${DIR[$n]}; s="$WORK/n$n.sock"; SOCK[$n]=$s
  echo "== serving $n exceptions on $s"
  # shellcheck disable=SC2086
  { q=$(printf '%q ' "$SNAPMV" serve "$d/cow.img" --read-only --unix "$s" $SERVE_EXTRA); q=${q//$WORK/\$W}; q=${q//$SCALE_DIR/\$SCALE_DIR}; echo "${q//$BIN\//}&" >>"$CMDS"; }
  t0=$(now)
  # shellcheck disable=SC2086
  "$SNAPMV" serve "$d/cow.img" --read-only --unix "$s" $SERVE_EXTRA >"$WORK/serve-$n.log" 2>&1 &
  PID[$n]=$!; PIDS+=("$!")
  # scale_gen wait (a native binary: no interpreter start-up in the timing)
  # connects every millisecond until the socket accepts; prints ms since t0.
  ready_ms=$("$GEN" wait --unix "$s" --t0 "$t0" --pid "${PID[$n]}") \
    || { echo "scale.sh: snapmv serve did not start" >&2; cat "$WORK/serve-$n.log" >&2; exit 1; }
  rec "ready n=$n ms=$ready_ms rss_kib=$(status_kib "${PID[$n]}" VmRSS) hwm_kib=$(status_kib "${PID[$n]}" VmHWM)"
done

# fio_job ROUND N EXPORT CONNS: one timed job with RSS sampling.
fio_job() {
  local r=$1 n=$2 exp=$3 c=$4 pid=${PID[$2]} name uri out samples
  name=origin; [ "$exp" = "vol@1" ] && name=snapshot
  uri="nbd+unix:///$exp?socket=${SOCK[$n]}"
  out="$WORK/fio-$r-$n-$name-$c.json"; samples="$WORK/rss-$r-$n-$name-$c.txt"
  echo "   round $r: $n exceptions, $name, $c connection(s)"
  local rss0; rss0=$(status_kib "$pid" VmRSS)
  echo 5 >"/proc/$pid/clear_refs"   # VmHWM := VmRSS
  ( while :; do status_kib "$pid" VmRSS; sleep 1; done ) >"$samples" &
  SAMPLER=$!
  run fio --name=randread --ioengine=nbd --uri="$uri" --rw=randread --bs=4k \
    --iodepth=$IODEPTH --numjobs="$c" --group_reporting --size="$ORIGIN_BYTES" --norandommap \
    --randseed=$((1000 + r)) --time_based --runtime="$RUNTIME" \
    --output-format=json --output="$out" >/dev/null
  kill "$SAMPLER" 2>/dev/null || true; wait "$SAMPLER" 2>/dev/null || true; SAMPLER=""
  rec "fio round=$r n=$n export=$name conns=$c json=$out rss0_kib=$rss0 rss1_kib=$(status_kib "$pid" VmRSS) hwm_kib=$(status_kib "$pid" VmHWM) samples=$samples"
}

# ---- rounds ---------------------------------------------------------------------
read -r -a NS <<<"$SIZES"
read -r -a CS <<<"$CONNS"
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r of $ROUNDS"
  for k in "${!CS[@]}"; do
    c=${CS[$k]}
    # Rotate the device order by round, the snapshot/origin order by round and connections.
    for j in "${!NS[@]}"; do
      n=${NS[$(( (j + r + k) % ${#NS[@]} ))]}
      if [ $(( (r + k + j) % 2 )) = 1 ]; then
        fio_job "$r" "$n" vol@1 "$c"; fio_job "$r" "$n" vol "$c"
      else
        fio_job "$r" "$n" vol "$c"; fio_job "$r" "$n" vol@1 "$c"
      fi
    done
  done
done
LOAD_FIO_END=$(cut -d' ' -f1-3 /proc/loadavg)

# Servers stop before the engine-only reads (which open the stores themselves).
for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
PIDS=()

ER_SECS=$(( RUNTIME < 10 ? RUNTIME : 10 ))
for r in $(seq 1 "$ROUNDS"); do
  for j in "${!NS[@]}"; do
    n=${NS[$(( (j + r) % ${#NS[@]} ))]}
    echo "== engine-only reads, round $r, $n exceptions"
    run "$GEN" read --cow "${DIR[$n]}/cow.img" --tag 1 --threads 1 --secs "$ER_SECS" >"$WORK/eread-$r-$n.log"
    rec "eread round=$r n=$n log=$WORK/eread-$r-$n.log $(result_of "$WORK/eread-$r-$n.log")"
  done
done

T_END=$(date +%s)
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- report ----------------------------------------------------------------------
export R SIZES CONNS ROUNDS RUNTIME ASSERT BIG
REPORT=$(python3 - <<'PY'
import json, os, statistics as st

rows = []
for line in open(os.environ["R"]):
    kind, *kv = line.split()
    d = dict(x.split("=", 1) for x in kv if "=" in x)
    d["kind"] = kind
    rows.append(d)
sizes = [int(x) for x in os.environ["SIZES"].split()]
conns = [int(x) for x in os.environ["CONNS"].split()]
big = max(sizes)
def med(xs): return st.median(xs) if xs else float("nan")
def mib(k): return float(k) / 1024
def of(kind, **kw): return [r for r in rows if r["kind"] == kind and all(r.get(k) == str(v) for k, v in kw.items())]
out = []
p = out.append

p("### Devices\n")
p("| exceptions | data chunks | generated | generation time | generator peak RSS | COW file allocated | metadata pages (`check`) |")
p("|---:|---:|---|---:|---:|---:|---:|")
for n in sizes:
    g = of("gen", n=n)[-1]; c = of("check", n=n)[-1]
    when = "earlier run (cached)" if g.get("reused") == "1" else "this run"
    p(f"| {n:,} | {int(g.get('data', 0)):,} | {when} | {float(g.get('total_s', 'nan')):.1f} s | "
      f"{mib(g.get('peak_rss_kib', 0)):.0f} MiB | {int(g.get('cow_alloc_bytes', 0)) / 2**20:,.0f} MiB | {int(c['pages']):,} |")

p("\n### `check`, open, serve start\n")
p("| exceptions | `snapmv check` wall | `check` peak RSS | `Store::open` (median of 3) | `Store::close` | serve: start to socket accepting | serve RSS when ready |")
p("|---:|---:|---:|---:|---:|---:|---:|")
for n in sizes:
    c = of("check", n=n)[-1]; o = of("open", n=n); rd = of("ready", n=n)[-1]
    p(f"| {n:,} | {float(c['secs']):.2f} s | {mib(c['kib']):,.0f} MiB | "
      f"{med([float(x['open_ms']) for x in o]):.1f} ms | {med([float(x['close_ms']) for x in o]):.1f} ms | "
      f"{float(rd['ms']):.0f} ms | {mib(rd['rss_kib']):.1f} MiB |")

fio = {}
for r in of("fio"):
    j = json.load(open(r["json"]))["jobs"][0]["read"]
    samples = [int(x) for x in open(r["samples"]).read().split() if x.isdigit()]
    fio.setdefault((int(r["n"]), r["export"], int(r["conns"])), []).append(dict(
        round=int(r["round"]), iops=j["iops"], p99=j["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e6,
        rss0=int(r["rss0_kib"]), rss1=int(r["rss1_kib"]), hwm=int(r["hwm_kib"]), samples=samples))

p("\nThe same, split into the engine's parts (`scale_gen`, one process each; peak RSS is the whole process's):\n")
p("| exceptions | `meta::check` (metadata walk) | its peak RSS | `store::check` (walk + store invariants; what `snapmv check` runs first) | its peak RSS | `Store::status()` (space accounting, what `list` runs) | RSS before -> after it |")
p("|---:|---:|---:|---:|---:|---:|---:|")
for n in sizes:
    m = of("part", n=n, what="meta_check")[-1]; sc = of("part", n=n, what="store_check")[-1]; s = of("part", n=n, what="status")[-1]
    p(f"| {n:,} | {float(m['secs']):.2f} s | {mib(m['hwm_kib']):,.0f} MiB | {float(sc['secs']):.2f} s | {mib(sc['hwm_kib']):,.0f} MiB | "
      f"{float(s['status_s']):.2f} s | {mib(s['rss_before_kib']):.1f} -> {mib(s['rss_after_kib']):.1f} MiB |")

p(f"\n### 4 KiB random reads over NBD (fio, QD{16} per connection, {os.environ['RUNTIME']} s per job, {os.environ['ROUNDS']} round(s))\n")
p("IOPS: median of the rounds (each round's value in the next column, in round order). RSS: the serve process; "
  "\"peak\" is VmHWM during the job (reset before it), the largest over the rounds; \"end\" is VmRSS after the job's last round.\n")
p("| exceptions | export | conns | IOPS median | IOPS per round | p99 latency (ms, median) | vs 1 conn | serve RSS before -> end (last round) | serve peak RSS |")
p("|---:|---|---:|---:|---|---:|---:|---:|---:|")
for n in sizes:
    for exp in ("snapshot", "origin"):
        base = None
        for c in conns:
            xs = sorted(fio.get((n, exp, c), []), key=lambda x: x["round"])
            if not xs: continue
            m = med([x["iops"] for x in xs])
            if base is None: base = m
            last = xs[-1]
            p(f"| {n:,} | {exp} | {c} | {m:,.0f} | {' / '.join(format(x['iops'], ',.0f') for x in xs)} | "
              f"{med([x['p99'] for x in xs]):.2f} | {m / base:.2f}x | "
              f"{mib(last['rss0']):.1f} -> {mib(last['rss1']):.1f} MiB | {max(mib(x['hwm']) for x in xs):.1f} MiB |")

p("\n### Scaling and cost of the exceptions (from the medians above)\n")
p("| exceptions | conns | snapshot / origin IOPS | snapshot scaling vs 1 conn | origin scaling vs 1 conn |")
p("|---:|---:|---:|---:|---:|")
def mi(n, e, c): return med([x["iops"] for x in fio.get((n, e, c), [])])
for n in sizes:
    for c in conns:
        p(f"| {n:,} | {c} | {mi(n,'snapshot',c) / mi(n,'origin',c):.2f} | "
          f"{mi(n,'snapshot',c) / mi(n,'snapshot',conns[0]):.2f}x | {mi(n,'origin',c) / mi(n,'origin',conns[0]):.2f}x |")
if len(sizes) > 1:
    small = min(sizes)
    p("")
    p(f"Snapshot IOPS at {big:,} exceptions relative to {small:,} (median, same run): " + ", ".join(
        f"{c} conn: {mi(big,'snapshot',c) / mi(small,'snapshot',c):.2f}" for c in conns) + ".")

p(f"\n### Serve RSS, once a second, during snapshot reads ({big:,} exceptions)\n")
for c in conns:
    for x in sorted(fio.get((big, "snapshot", c), []), key=lambda x: x["round"]):
        p(f"- round {x['round']}, {c} conn: " + " ".join(f"{mib(s):.0f}" for s in x["samples"]) + " MiB")

er = of("eread")
if er:
    p("\n### Engine-only random reads of the snapshot (`scale_gen read`, 1 thread, no NBD)\n")
    p("Each round is a fresh process (a cold metadata cache). Reads/s: median of the rounds (each round's value).\n")
    p("| exceptions | reads/s median | per round | RSS at end (last round) | peak RSS (largest) |")
    p("|---:|---:|---|---:|---:|")
    for n in sizes:
        xs = sorted(of("eread", n=n), key=lambda x: int(x["round"]))
        p(f"| {n:,} | {med([float(x['reads_per_s']) for x in xs]):,.0f} | {' / '.join(format(float(x['reads_per_s']), ',.0f') for x in xs)} | "
          f"{mib(xs[-1]['rss_kib']):.1f} MiB | {max(mib(x['hwm_kib']) for x in xs):.1f} MiB |")
    p(f"\nRSS once a second during the engine-only reads ({big:,} exceptions), MiB:\n")
    for x in sorted(of("eread", n=big), key=lambda x: int(x["round"])):
        series = [l.split("RSS ")[1].split()[0] for l in open(x["log"]) if "reads/s, RSS" in l]
        p(f"- round {x['round']}: " + " ".join(f"{float(v):.0f}" for v in series))

p("\n### Targets (issue 10)\n")
snap_peak = max((mib(x["hwm"]) for c in conns for x in fio.get((big, "snapshot", c), [])), default=float("nan"))
chk = mib(of("check", n=big)[-1]["kib"])
fails = []
def t(name, val, lim):
    ok = val < lim
    if not ok: fails.append(name)
    p(f"- {name}: {val:,.1f} MiB (target < {lim} MiB): {'met' if ok else 'NOT met'}")
p(f"(at {big:,} exceptions{'' if big >= 10_000_000 else '; the targets are for 10,000,000: run with --big'})")
t("serve peak RSS during snapshot random reads", snap_peak, 128)
t("`check` peak RSS", chk, 256)
for c in conns[1:]:
    s, o = mi(big, "snapshot", c) / mi(big, "snapshot", conns[0]), mi(big, "origin", c) / mi(big, "origin", conns[0])
    p(f"- snapshot reads scale at least as well as origin reads at {c} conns: {s:.2f}x vs {o:.2f}x: {'yes' if s >= o else 'no'}")
print("\n".join(out))
open(os.environ["R"] + ".fails", "w").write("\n".join(fails))
PY
)

{
  echo "## Run of $DATE_START"
  echo
  echo "- \`benches/scale.sh$([ "$BIG" = 1 ] && echo ' --big')$([ "$QUICK" = 1 ] && echo ' --quick') --rounds $ROUNDS --runtime $RUNTIME --conns \"$CONNS\"\`${SERVE_EXTRA:+ with SCALE_SERVE_ARGS=\"$SERVE_EXTRA\"}; took $((T_END - T_START)) s"
  echo "- snapmv $("$SNAPMV" --version | awk '{ print $2 }') (git $COMMIT); fio $(fio --version); kernel $(uname -r); $(df -T "$SCALE_DIR" | awk 'NR==2 { print $2 }') under $SCALE_DIR"
  echo "- $(nproc) cores, $(free -g | awk '/^Mem:/ { print $2 }') GiB RAM; load average at start $LOAD_START, after the fio jobs $LOAD_FIO_END, at the end $LOAD_END"
  echo "- other processes using >= 10 % CPU at the start: ${BUSY_START:-none}"
  echo
  echo "$REPORT"
  echo
  echo "### Exact commands"
  echo
  echo "\`\$SCALE_DIR\` = $SCALE_DIR (device cache), \`\$W\` = the run's temp dir; binaries from target/release."
  echo
  echo '```'
  cat "$CMDS"
  echo '```'
} >"$WORK/report.md"
echo
cat "$WORK/report.md"
[ -n "$OUT" ] && cp "$WORK/report.md" "$OUT" && echo "wrote $OUT"
if [ "$ASSERT" = 1 ] && [ -s "$R.fails" ]; then
  echo "scale.sh: targets not met: $(tr '\n' ';' <"$R.fails")" >&2
  exit 1
fi
