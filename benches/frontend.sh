#!/usr/bin/env bash
# NBD frontend benchmark (issue 12): 4 KiB random reads and random writes at
# iodepth 16, over 1 and 4 NBD connections, against three servers holding the
# same data, every file on tmpfs so that the protocol path is measured, not a
# disk:
#   snapmv    `snapmv serve` on a COW device bound to a raw origin (64 KiB
#             chunks, no snapshot: reads and writes go to the origin in place)
#   nbdkit    `nbdkit memory` (the protocol-path ceiling: no file, no engine)
#   qemu-nbd  `qemu-nbd -f raw` on a raw file
# One client for all: fio --ioengine=nbd, one NBD connection per fio job
# (--numjobs 1 and 4, --group_reporting). Each round starts a fresh server
# per (server, round), in rotating order (round r starts at server r mod 3),
# and runs on it, for each connection count, randread then randwrite.
#
#   benches/frontend.sh            # 3 rounds, 1 GiB devices, 5 s per job
#   benches/frontend.sh --quick    # 1 round, 256 MiB, 2 s (a smoke test)
#   FRONTEND_ROUNDS=5 FRONTEND_RUNTIME=10 benches/frontend.sh
#   SNAPMV_BIN=/tmp/old/snapmv benches/frontend.sh   # compare another build
#
# Environment: FRONTEND_SIZE_MIB, FRONTEND_RUNTIME (s), FRONTEND_ROUNDS,
# FRONTEND_CONNS ("1 4"); SNAPMV_BIN (a snapmv binary: skips the build;
# default `cargo build --release --bin snapmv`); SNAPMV_SERVE_ARGS (extra
# `snapmv serve` flags); FRONTEND_DIR (parent of the work dir, default
# /dev/shm; a non-tmpfs directory is used with a warning); FRONTEND_KEEP=1
# keeps the work dir. Prints the tables and rewrites benches/FRONTEND.md
# (machine, versions, round-1 commands, tables, caveats); anything below the
# line "<!-- notes: kept by frontend.sh -->" in FRONTEND.md is kept.
# A measurement script, not a test: it asserts nothing about speed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ME=frontend.sh

QUICK=0
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "$ME: unknown argument $a" >&2; exit 2 ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  ROUNDS=${FRONTEND_ROUNDS:-1}; RUNTIME=${FRONTEND_RUNTIME:-2}; SIZE_MIB=${FRONTEND_SIZE_MIB:-256}
else
  ROUNDS=${FRONTEND_ROUNDS:-3}; RUNTIME=${FRONTEND_RUNTIME:-5}; SIZE_MIB=${FRONTEND_SIZE_MIB:-1024}
fi
CONNS=${FRONTEND_CONNS:-1 4}
for v in "$ROUNDS" "$RUNTIME" "$SIZE_MIB" $CONNS; do
  case "$v" in ''|*[!0-9]*|0) echo "$ME: rounds, runtime, size and connections must be positive integers (got '$v')" >&2; exit 2 ;; esac
done
[ -n "${CONNS// /}" ] || { echo "$ME: FRONTEND_CONNS is empty" >&2; exit 2; }
IODEPTH=16
BS=4k
CHUNK=65536
SERVERS=(snapmv nbdkit qemu)
WORKLOADS=(randread randwrite)
T_START=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
busy_now() {  # other processes using >= 10 % CPU (ps: average over their lifetime)
  ps -eo pcpu=,comm= --sort=-pcpu | awk '$1 >= 10 { printf "%s%s (%s%% CPU)", sep, $2, $1; sep = ", " }'
}
BUSY_START=$(busy_now)

# ---- tools ---------------------------------------------------------------------
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
need=()
command -v fio >/dev/null || need+=(fio)
command -v qemu-nbd >/dev/null || need+=(qemu-utils)
command -v nbdkit >/dev/null || need+=(nbdkit)
{ command -v nbdcopy >/dev/null && command -v nbdinfo >/dev/null; } || need+=(libnbd-bin)
command -v python3 >/dev/null || need+=(python3)
if [ "${#need[@]}" -gt 0 ]; then
  echo "== installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y "${need[@]}" >/dev/null 2>&1 \
    || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y "${need[@]}" >/dev/null; }
fi
if ! fio --enghelp 2>/dev/null | grep -qx '[[:space:]]*nbd'; then
  echo "$ME: this fio has no nbd ioengine" >&2; exit 1
fi
if ! nbdkit memory --dump-plugin >/dev/null 2>&1; then
  echo "$ME: nbdkit has no memory plugin" >&2; exit 1
fi
if [ -n "${SNAPMV_BIN:-}" ]; then
  [ -x "$SNAPMV_BIN" ] || { echo "$ME: SNAPMV_BIN=$SNAPMV_BIN is not executable" >&2; exit 1; }
  SNAPMV=$(cd "$(dirname "$SNAPMV_BIN")" && pwd -P)/$(basename "$SNAPMV_BIN")
else
  echo "== building snapmv (release)"
  cargo build --release --bin snapmv
  SNAPMV="${CARGO_TARGET_DIR:-$ROOT/target}/release/snapmv"
fi
SERVE_ARGS=()
[ -z "${SNAPMV_SERVE_ARGS:-}" ] || read -r -a SERVE_ARGS <<<"$SNAPMV_SERVE_ARGS"

# ---- work dir on tmpfs -----------------------------------------------------------
# shellcheck source=benches/server_bench_lib.sh
. "$ROOT/benches/server_bench_lib.sh"
# On disk (tmpfs: RAM): the pristine image, one run's copy and the COW file's
# metadata; in RAM besides: nbdkit's memory disk.
WORK=$(tmpfs_work_dir "${FRONTEND_DIR:-/dev/shm}" snapmv-frontend "$SIZE_MIB") || exit 1
BASE=$(dirname "$WORK")
FSTYPE=$(df -T "$BASE" | awk 'NR==2 { print $2 }')

SAMPLER_PID=""
stop_sampler() {
  if [ -n "$SAMPLER_PID" ]; then
    kill -TERM "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=""
  fi
}
cleanup() {
  stop_sampler
  stop_server
  if [ "${FRONTEND_KEEP:-0}" = 1 ]; then echo "$ME: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Run a private copy of the binary, so a rebuild during the run (this tree is
# shared) cannot change it half-way.
SNAPMV_SRC=$SNAPMV
SNAPMV_ID="binary ${SNAPMV_SRC/#$ROOT\//}, modified $(date -u -r "$SNAPMV_SRC" '+%Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$SNAPMV_SRC" | cut -c1-12)"
cp -p "$SNAPMV_SRC" "$WORK/snapmv"
SNAPMV=$WORK/snapmv
# The git revision of the checkout holding the binary (the build may be
# older than the checkout's HEAD when SNAPMV_BIN is given).
if top=$(git -C "$(dirname "$SNAPMV_SRC")" rev-parse --show-toplevel 2>/dev/null); then
  SNAP_REV="git $(git -C "$top" rev-parse --short HEAD)"
  [ -z "$(git -C "$top" status --porcelain -- engine nbd-frontend 2>/dev/null)" ] \
    || SNAP_REV="$SNAP_REV, engine/frontend with uncommitted changes"
  [ -z "${SNAPMV_BIN:-}" ] || SNAP_REV="$SNAP_REV: the checkout holding SNAPMV_BIN"
else
  SNAP_REV="not in a git checkout"
fi
SNAP_REV="$SNAP_REV; $SNAPMV_ID"

CMDS="$WORK/commands.txt"   # the setup's and round 1's commands
RESULTS="$WORK/results.tsv" # one line per fio job
PROCS="$WORK/procs.tsv"     # one line per server process
: >"$CMDS"; : >"$RESULTS"; : >"$PROCS"
LOG_CMDS=1

# The background sampler: every 100 ms (every 10 ms from 0.2 s before the
# end of fio's runtime, when the connections' threads may exit), the
# server's Threads count and each thread's voluntary+nonvoluntary context
# switches (/proc/PID/task/*/status: the process's own status counts its
# main thread only). On SIGTERM it takes a last sample and writes: peak
# threads, context switches during the job (per thread: last seen minus the
# value at the first sample, or 0 for a thread started since), threads
# started, samples. A thread that exits during the job loses its switches
# since its last sample: at most 10 ms' worth if it exits after the fast
# phase begins.
cat >"$WORK/sampler.py" <<'PY'
import glob, json, os, signal, sys, time
pid, out, ready, fast_after = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
class Stop(Exception):
    pass
def on_term(*_):
    raise Stop()
first, last, peak, samples = None, {}, 0, 0
def sample():
    global first, peak, samples
    seen = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("Threads:"):
                peak = max(peak, int(line.split()[1]))
    except OSError:
        return
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        tid = path.split("/")[-2]
        try:
            n = 0
            for line in open(path):
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    n += int(line.split()[1])
        except OSError:
            continue
        seen[tid] = n
    last.update(seen)
    if first is None:
        first = dict(seen)
    samples += 1
signal.signal(signal.SIGTERM, on_term)
try:
    sample()
    open(ready, "w").close()
    t0 = time.monotonic()
    while True:
        time.sleep(0.01 if time.monotonic() - t0 >= fast_after else 0.1)
        sample()
except Stop:
    pass
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sample()
first = first or {}
cs = sum(v - first.get(t, 0) for t, v in last.items())
json.dump({"peak_threads": peak, "ctxsw": cs, "new_threads": len(set(last) - set(first)),
           "samples": samples}, open(out, "w"))
PY
start_sampler() {
  local out=$1 ready="$1.ready"
  python3 "$WORK/sampler.py" "$SERVER_PID" "$out" "$ready" \
    "$(awk -v r="$RUNTIME" 'BEGIN { print (r > 0.2 ? r - 0.2 : 0) }')" &
  SAMPLER_PID=$!
  while [ ! -e "$ready" ]; do
    kill -0 "$SAMPLER_PID" 2>/dev/null || { echo "$ME: sampler failed" >&2; exit 1; }
    sleep 0.01
  done
}

# ---- the pristine image, once ------------------------------------------------------
PRISTINE="$WORK/pristine.raw"
SIZE_B=$((SIZE_MIB * 1048576))
echo "== work dir $WORK ($FSTYPE); ${SIZE_MIB} MiB devices, ${RUNTIME} s per job, connections: $CONNS, $ROUNDS round(s)"
note "setup: one raw image of random bytes; every server starts from these bytes"
run dd if=/dev/urandom of="$PRISTINE" bs=1M count="$SIZE_MIB" status=none
[ "$FSTYPE" = tmpfs ] || [ "$FSTYPE" = ramfs ] || sync

SEQ=0
# One fio job on the running server; appends a line to RESULTS.
fio_job() {
  local round=$1 server=$2 workload=$3 nj=$4 uri=$5
  SEQ=$((SEQ + 1))
  local json="$WORK/fio-$SEQ.json" samp="$WORK/sampler-$SEQ.json" c0 c1 t0 t1 rc=0
  echo "   round $round: $server / $workload / $nj connection(s)"
  start_sampler "$samp"
  c0=$(cpu_ticks "$SERVER_PID"); t0=$(date +%s.%N)
  run fio --name="$workload" --ioengine=nbd --uri="$uri" --rw="$workload" --bs="$BS" \
    --iodepth="$IODEPTH" --numjobs="$nj" --group_reporting --size="${SIZE_MIB}M" \
    --norandommap --randseed=1234 --time_based --runtime="$RUNTIME" \
    --output-format=json --output="$json" || rc=$?
  t1=$(date +%s.%N); c1=$(cpu_ticks "$SERVER_PID")
  stop_sampler
  [ "$rc" = 0 ] || { echo "$ME: fio failed ($rc) on $server / $workload / $nj" >&2; tail -5 "$WORK/server.log" >&2 || true; exit 1; }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$SEQ" "$server" "$workload" "$nj" "$json" \
    "$(awk -v a="$c0" -v b="$c1" -v t="$TCK" 'BEGIN { print (b - a) / t }')" \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" \
    "$samp" "$(vm_hwm_kib "$SERVER_PID")" >>"$RESULTS"
}

# One server run: a fresh server holding the pristine bytes, every
# (connections, workload) job on it, then stop it.
one_server() {
  local round=$1 server=$2 port uri D="$WORK/run"
  rm -rf "$D"; mkdir -p "$D"
  : >"$WORK/server.log"
  port=$(free_port)
  uri="nbd://127.0.0.1:$port/vol"
  echo "== round $round: $server"
  case "$server" in
    snapmv)
      note "snapmv: a copy of the image as the origin, a fresh COW device (64 KiB chunks), no snapshot"
      run cp "$PRISTINE" "$D/origin.img"
      run truncate -s "$((SIZE_MIB * 2 + 256))M" "$D/cow.img"
      run "$SNAPMV" format "$D/cow.img" --chunk-size "$CHUNK" >/dev/null
      run "$SNAPMV" bind "$D/cow.img" "$D/origin.img" --id vol >/dev/null
      start_server "$WORK/server.log" "$SNAPMV" serve "$D/cow.img" --listen "127.0.0.1:$port" "${SERVE_ARGS[@]}"
      wait_ready "$port"
      ;;
    nbdkit)
      note "nbdkit: a memory disk, filled with the image's bytes through NBD (untimed)"
      start_server "$WORK/server.log" nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$port" -e vol \
        memory "${SIZE_MIB}M"
      wait_ready "$port"
      run nbdcopy "$PRISTINE" "$uri"
      ;;
    qemu)
      note "qemu-nbd: a copy of the image, served raw"
      run cp "$PRISTINE" "$D/vol.raw"
      start_server "$WORK/server.log" qemu-nbd -f raw -t -b 127.0.0.1 -p "$port" -x vol -e 16 \
        --cache=writeback --aio=threads "$D/vol.raw"
      wait_ready "$port"
      ;;
  esac
  local got; got=$(nbdinfo --size "$uri")
  [ "$got" = "$SIZE_B" ] || { echo "$ME: $server exports $got bytes, expected $SIZE_B" >&2; exit 1; }
  [ "$FSTYPE" = tmpfs ] || [ "$FSTYPE" = ramfs ] || sync
  local nj w peak_hwm
  for nj in $CONNS; do
    for w in "${WORKLOADS[@]}"; do
      fio_job "$round" "$server" "$w" "$nj" "$uri"
    done
  done
  peak_hwm=$(vm_hwm_kib "$SERVER_PID")
  stop_server
  printf '%s\t%s\t%s\t%s\n' "$round" "$server" "$peak_hwm" "$SERVER_RC" >>"$PROCS"
  if [ "$SERVER_RC" != 0 ]; then
    echo "$ME: warning: $server exited with status $SERVER_RC after SIGTERM; log tail:" >&2
    tail -5 "$WORK/server.log" >&2 || true
  fi
  cp "$WORK/server.log" "$WORK/server-$round-$server.log"
  rm -rf "$D"
}

for ((r = 0; r < ROUNDS; r++)); do
  order=("${SERVERS[@]:r % 3}" "${SERVERS[@]:0:r % 3}")
  for s in "${order[@]}"; do
    one_server "$((r + 1))" "$s"
  done
  LOG_CMDS=0
done

T_END=$(date +%s)
ELAPSED=$((T_END - T_START))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
BUSY_END=$(busy_now)

# ---- report --------------------------------------------------------------------------
NOISE="One round: no estimate of the noise at all."
[ "$ROUNDS" = 1 ] || NOISE="$ROUNDS rounds; medians and per-round ratios damp drift on the shared machine, but differences under ~10 % are within its noise."
MODE=full; QUICK_BANNER=""
if [ "$QUICK" = 1 ]; then
  MODE=quick
  QUICK_BANNER=$'\n**A quick run (`--quick`) is a smoke test of the script, not a result.**\n'
fi
export RESULTS PROCS ROUNDS CONNS
TABLES=$(python3 - <<'PY'
import csv, json, os, statistics as st

rows = list(csv.reader(open(os.environ["RESULTS"]), delimiter="\t"))
procs = list(csv.reader(open(os.environ["PROCS"]), delimiter="\t"))
conns = [int(c) for c in os.environ["CONNS"].split()]
NAMES = {"snapmv": "snapmv", "nbdkit": "nbdkit memory", "qemu": "qemu-nbd raw"}
SERVERS = ["snapmv", "nbdkit", "qemu"]
WORKLOADS = ["randread", "randwrite"]

runs = []
for rnd, seq, server, w, nj, path, cpu, wall, samp, hwm in rows:
    j = json.load(open(path))["jobs"][0]
    d = j["read"] if w == "randread" else j["write"]
    pct = d["clat_ns"].get("percentile", {})
    s = json.load(open(samp))
    ios = d["total_ios"]
    runs.append(dict(round=int(rnd), seq=int(seq), server=server, w=w, nj=int(nj), iops=d["iops"],
                     ios=ios, p99=pct.get("99.000000", 0) / 1e6, cpu=float(cpu), wall=float(wall),
                     cs=s["ctxsw"], threads=s["peak_threads"], new=s["new_threads"],
                     samples=s["samples"], hwm=int(hwm or 0), err=j.get("error", 0)))
rounds = sorted({r["round"] for r in runs})

def get(server, w, nj, rnd=None):
    return [r for r in runs if r["server"] == server and r["w"] == w and r["nj"] == nj
            and (rnd is None or r["round"] == rnd)]
def med(xs):
    return st.median(xs) if xs else float("nan")
def per_round(f):
    out = []
    for rn in rounds:
        try:
            out.append(f(rn))
        except (IndexError, ZeroDivisionError):
            pass
    return out
def iops(server, w, nj, rn):
    return get(server, w, nj, rn)[0]["iops"]
def rng(xs, fmt):
    if not xs:
        return "n/a"
    m = fmt(med(xs))
    return m if len(xs) == 1 else f"{m} ({fmt(min(xs))}–{fmt(max(xs))})"
i0 = lambda x: f"{x:,.0f}"
x2 = lambda x: f"{x:.2f}x"
f2 = lambda x: f"{x:.2f}"

many = len(rounds) > 1
print(f"IOPS, {'median (min–max) over ' + str(len(rounds)) + ' rounds' if many else 'one round'}; "
      "4 KiB, iodepth 16 per connection:")
print()
print("| workload | connections | snapmv | nbdkit memory | qemu-nbd raw |")
print("|---|---:|---:|---:|---:|")
for w in WORKLOADS:
    for nj in conns:
        print(f"| {w} | {nj} | " + " | ".join(rng([r["iops"] for r in get(s, w, nj)], i0) for s in SERVERS) + " |")
print()
print("Median of the per-round ratios (each round's snapmv IOPS over the same round's peer)"
      + (", per-round values in brackets" if many else "") + ":")
print()
print("| workload | connections | snapmv / nbdkit memory | snapmv / qemu-nbd raw |")
print("|---|---:|---:|---:|")
ratio = {}
for w in WORKLOADS:
    for nj in conns:
        cells = []
        for peer in ("nbdkit", "qemu"):
            per = per_round(lambda rn: iops("snapmv", w, nj, rn) / iops(peer, w, nj, rn))
            ratio[(peer, w, nj)] = per
            cells.append(f"{med(per):.2f}x" + (" [" + ", ".join(f"{x:.2f}" for x in per) + "]" if many else ""))
        print(f"| {w} | {nj} | " + " | ".join(cells) + " |")
print()
lo, hi = min(conns), max(conns)
scale = {}
if hi > lo:
    print(f"Scaling: median of the per-round ratios of IOPS at {hi} connections over IOPS at {lo}:")
    print()
    print("| workload | snapmv | nbdkit memory | qemu-nbd raw |")
    print("|---|---:|---:|---:|")
    for w in WORKLOADS:
        cells = []
        for s in SERVERS:
            per = per_round(lambda rn: iops(s, w, hi, rn) / iops(s, w, lo, rn))
            scale[(s, w)] = per
            cells.append(f"{med(per):.2f}x" + (" [" + ", ".join(f"{x:.2f}" for x in per) + "]" if many else ""))
        print(f"| {w} | " + " | ".join(cells) + " |")
    print()

def verdict(vals, target):
    vals = [v for v in vals if v == v]
    if not vals:
        return "n/a"
    return ("met" if min(vals) >= target else "not met") + f" (lowest {min(vals):.2f}x)"
print("Issue 12 targets, on the medians of the per-round ratios, in this run:")
print()
print("- snapmv >= 0.9x nbdkit memory in every cell: "
      + verdict([med(v) for (p, _, _), v in ratio.items() if p == "nbdkit"], 0.9))
print("- snapmv >= 1.5x qemu-nbd raw in every cell: "
      + verdict([med(v) for (p, _, _), v in ratio.items() if p == "qemu"], 1.5))
if hi > lo:
    print(f"- snapmv at {hi} connections >= at {lo}, each workload: "
          + verdict([med(scale[("snapmv", w)]) for w in WORKLOADS], 1.0))
else:
    print("- N-connection >= 1-connection: n/a (one connection count in this run)")
print()
print("Server-side costs, medians over rounds: p99 completion latency (fio clat), server CPU "
      "(user+system, all threads) per I/O, server context switches per I/O, peak server threads "
      "seen during the job:")
print()
print("| workload | connections | server | p99 lat (ms) | server CPU (µs / I/O) | ctx switches / I/O | peak threads |")
print("|---|---:|---|---:|---:|---:|---:|")
for w in WORKLOADS:
    for nj in conns:
        for s in SERVERS:
            c = get(s, w, nj)
            if not c:
                continue
            print(f"| {w} | {nj} | {NAMES[s]} | {med([r['p99'] for r in c]):.3f} | "
                  f"{med([r['cpu'] / r['ios'] * 1e6 for r in c if r['ios']]):.1f} | "
                  f"{med([r['cs'] / r['ios'] for r in c if r['ios']]):.2f} | "
                  f"{max(r['threads'] for r in c)} |")
print()
print("Per server process (a fresh one per server and round): peak RSS (VmHWM just before "
      "the SIGTERM; nbdkit's includes its memory disk), exit status after SIGTERM:")
print()
print("| round | server | peak RSS (MiB) | exit status |")
print("|---:|---|---:|---:|")
for rnd, server, hwm, rc in procs:
    print(f"| {rnd} | {NAMES[server]} | {int(hwm or 0) / 1024:,.1f} | {rc} |")
print()
print("Every job:")
print()
print("| round | # | server | workload | conns | IOPS | I/Os | p99 lat (ms) | server CPU (s) | wall (s) | "
      "ctx sw / I/O | peak threads | threads started | samples |")
print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in sorted(runs, key=lambda r: r["seq"]):
    print(f"| {r['round']} | {r['seq']} | {NAMES[r['server']]} | {r['w']} | {r['nj']} | {r['iops']:,.0f} | "
          f"{r['ios']:,} | {r['p99']:.3f} | {r['cpu']:.2f} | {r['wall']:.2f} | "
          f"{(r['cs'] / r['ios'] if r['ios'] else 0):.2f} | {r['threads']} | {r['new']} | {r['samples']} |")
bad = [r for r in runs if r["err"] or not r["ios"]]
if bad:
    print()
    for r in bad:
        print(f"- job {r['seq']} ({r['server']} {r['w']} {r['nj']}): fio error {r['err']}, {r['ios']} I/Os")
PY
)
echo
echo "$TABLES"
echo
echo "$ME: done in ${ELAPSED} s"

MD="$ROOT/benches/FRONTEND.md"
MARK='<!-- notes: kept by frontend.sh -->'
KEEP="$MARK"
if [ -f "$MD" ] && grep -qxF "$MARK" "$MD"; then
  KEEP=$(sed -n "\\|^$MARK\$|,\$p" "$MD")
fi
{
  cat <<EOF
# NBD frontend benchmark (issue 12): snapmv vs nbdkit memory vs qemu-nbd raw

Written by \`benches/frontend.sh\` ($MODE mode: $ROUNDS round(s), ${SIZE_MIB} MiB devices, ${RUNTIME} s
per job, connections: $CONNS) on $(date -u '+%Y-%m-%d %H:%M UTC'); the script took ${ELAPSED} s.
Numbers are what this one run measured on this machine, not a claim about any other.
$QUICK_BANNER
## Machine

- $(nproc) cores ($(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(free -g | awk '/^Mem:/ { print $2 }') GiB RAM; kernel $(uname -r)
- work dir on $FSTYPE ($BASE)
- load average at start: $LOAD_START, at the end: $LOAD_END (the benchmark's own load counts in the latter)
- other processes using >= 10 % CPU (ps, averaged over their lifetime) at the start:
  ${BUSY_START:-none}; at the end: ${BUSY_END:-none}

## Versions

- snapmv: $("$SNAPMV" --version) ($SNAP_REV)$([ ${#SERVE_ARGS[@]} = 0 ] || echo "; serve flags: ${SERVE_ARGS[*]}")
- $(nbdkit --version | head -1)
- $(qemu-nbd --version | head -1)
- fio: $(fio --version); $(nbdcopy --version | tail -1) (fio's nbd engine and nbdcopy use libnbd)

## Setup

- Client, the same for every server: fio \`--ioengine=nbd --uri=nbd://127.0.0.1:PORT/vol\`,
  \`--rw=randread|randwrite --bs=$BS --iodepth=$IODEPTH --time_based --runtime=$RUNTIME --numjobs=N
  --group_reporting --norandommap --randseed=1234 --size=${SIZE_MIB}M\`: one NBD connection per fio
  job (N = $CONNS), over loopback TCP. fio sends no FLUSH.
- Data: one raw image of random bytes (dd from /dev/urandom, once); snapmv's origin and
  qemu-nbd's file are copies of it, and nbdkit's memory disk is filled from it with
  \`nbdcopy\` through NBD (untimed), so every device holds the same bytes before its first
  timed job (\`nbdinfo --size\` checks each export's size).
- **snapmv**: \`snapmv serve\` (defaults$([ ${#SERVE_ARGS[@]} = 0 ] || echo " plus ${SERVE_ARGS[*]}")) on a fresh COW
  device (sparse, 2x the device + 256 MiB, 64 KiB chunks) bound to the origin copy, export
  \`vol\` (the origin). No snapshot: every read and write goes to the origin in place.
- **nbdkit memory**: \`nbdkit memory ${SIZE_MIB}M\` (default thread model and threads): no
  file, no engine; the protocol-path ceiling.
- **qemu-nbd raw**: \`qemu-nbd -f raw -t -e 16 --cache=writeback --aio=threads\` on the copy.
- Rounds: round r (r = 0, 1, ...) starts at server r mod 3 of (snapmv, nbdkit memory,
  qemu-nbd raw). Each (server, round) gets a fresh server process on fresh data, which then
  serves, for each connection count in turn, randread then randwrite (so later jobs see
  the bytes earlier random writes left: random either way).
- Server-side measures, per job: CPU = utime+stime of the server process (/proc/PID/stat,
  all threads, live and exited) from just before fio starts to just after it exits, over
  the I/Os fio completed; context switches = voluntary + nonvoluntary summed over
  /proc/PID/task/*/status by a background sampler (every 100 ms, every 10 ms from 0.2 s
  before the end of the runtime: per thread, last value seen minus its value at the job's
  start, 0 for threads started during the job), which
  also records the peak \`Threads:\` of /proc/PID/status; peak RSS = VmHWM; p99 = fio's
  completion-latency 99th percentile (json).

## Results

$TABLES

## Exact commands (setup and round 1)

\`\$W\` is the run's work dir (removed on exit); \`\$W/snapmv\` is a copy of the snapmv binary above. Servers ran in the background (\`&\`), were
waited for with a TCP connect probe, and stopped with SIGTERM and \`wait\`.

\`\`\`
$(cat "$CMDS")
\`\`\`

## Caveats

- Loopback TCP on $(nproc) shared cores: fio (libnbd), the server and the kernel's TCP
  stack compete for the same CPUs, so a server's CPU per I/O decides much of its IOPS, and
  more connections mean more runnable threads on the same cores, not more parallelism.
  Other work on the machine (see the load averages above) shows up as noise.
- Everything is on tmpfs (unless the machine section says otherwise): no disk, no
  writeback; snapmv's periodic flush costs next to nothing. This measures the servers'
  request paths, not storage.
- Context switches of a thread that exits during a job (snapmv's and nbdkit's per-connection
  threads when fio disconnects, qemu's idle pool threads) since the sampler last saw it are
  missed: its last <= 10 ms when it exits at the end of the job (<= 100 ms earlier on). The
  sampler itself (a Python process waking 10 times a second, 100 near the end) takes a
  little CPU from the same cores.
- nbdkit's RSS includes its ${SIZE_MIB} MiB memory disk; snapmv's and qemu-nbd's files are
  in tmpfs pages, which are not in their RSS.
- Each fio job reconnects; the server CPU window includes connection setup and teardown.
- $NOISE

$KEEP
EOF
} >"$MD"
echo "wrote $MD"
