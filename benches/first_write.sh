#!/usr/bin/env bash
# First writes after a snapshot (issue 11): one fio job, --ioengine=nbd over
# loopback TCP, against three servers, each set up fresh for every run:
#   snapmv    `snapmv serve` on a copy of a filled raw origin, a live
#             `snapmv snapshot` through the control socket (origin in place,
#             write-back copy-on-write: first writes staged until the commit)
#   overlay   `qemu-nbd -f qcow2` on a fresh external qcow2 overlay whose
#             backing file is the filled raw image (redirect-on-write)
#   internal  `qemu-nbd -f qcow2` on a copy of a filled qcow2 image (64 KiB
#             clusters) after `qemu-img snapshot -c` (refcounts shared)
# The job: --rw=write:60k --bs=4k --io_size=SIZE/16 (4 KiB at every 64 KiB of
# a filled device, so every write is the first to its chunk since the
# snapshot: 16,384 writes on 1 GiB), at iodepth 16 and iodepth 1. Rounds run
# the six (server, iodepth) runs in rotating order; the report gives medians
# and the median of the per-round ratios snapmv/overlay, snapmv/internal.
#
#   benches/first_write.sh               # 3 rounds, 1 GiB (a few minutes)
#   benches/first_write.sh --quick       # 1 round, 256 MiB (a smoke test)
#   benches/first_write.sh --out benches/FIRST_WRITE.md
#   FW_ROUNDS=5 FW_SIZE_MIB=512 benches/first_write.sh
#
# Environment: FW_ROUNDS, FW_SIZE_MIB; FW_DIR (parent of the work dir, default
# /var/tmp: it must be a real disk, not tmpfs, so fdatasync costs what it
# costs; the script refuses tmpfs/ramfs); SNAPMV (a snapmv binary: skips the
# build; default: `cargo build --release -p snapmv-nbd`, then
# ${CARGO_TARGET_DIR:-target}/release/snapmv); FW_SNAPMV_ARGS (extra `snapmv
# serve` flags, e.g. "--commit-delay 2ms"); FW_KEEP=1 keeps the work dir.
# Prints a markdown report (machine, versions, commands, every run, medians,
# snapmv's peak RSS and staging counts; fdatasync rates where `perf` works).
# A measurement script, not a test: it asserts nothing about speed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) [ $# -ge 2 ] || { echo "first_write.sh: --out needs a file" >&2; exit 2; }; OUT=$2; shift ;;
    --out=*) OUT=${1#--out=} ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "first_write.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ "$QUICK" = 1 ]; then
  ROUNDS=${FW_ROUNDS:-1}; SIZE_MIB=${FW_SIZE_MIB:-256}
else
  ROUNDS=${FW_ROUNDS:-3}; SIZE_MIB=${FW_SIZE_MIB:-1024}
fi
if [ $((SIZE_MIB % 16)) != 0 ] || [ "$SIZE_MIB" -lt 16 ]; then
  echo "first_write.sh: FW_SIZE_MIB must be a multiple of 16" >&2; exit 2
fi
[ -z "$OUT" ] || case "$OUT" in /*) ;; *) OUT="$ROOT/$OUT" ;; esac
CHUNK=65536
IO_MIB=$((SIZE_MIB / 16))               # 4 KiB per 64 KiB
WRITES=$((SIZE_MIB * 1048576 / CHUNK))  # one per chunk
QDS_EVEN=(16 1)
QDS_ODD=(1 16)
SERVERS=(snapmv overlay internal)
T_START=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
BUSY_START=$(ps -eo pcpu=,comm= --sort=-pcpu | awk '$1 >= 10 { printf "%s%s (%s%% CPU)", sep, $2, $1; sep = ", " }')

# ---- tools -------------------------------------------------------------------
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
need=()
command -v fio >/dev/null || need+=(fio)
{ command -v qemu-nbd >/dev/null && command -v qemu-img >/dev/null; } || need+=(qemu-utils)
command -v python3 >/dev/null || need+=(python3)
if [ "${#need[@]}" -gt 0 ]; then
  echo "== installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y "${need[@]}" >/dev/null 2>&1 \
    || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y "${need[@]}" >/dev/null; }
fi
if ! fio --enghelp 2>/dev/null | grep -qx '[[:space:]]*nbd'; then
  echo "first_write.sh: this fio has no nbd ioengine" >&2; exit 1
fi
if [ -n "${SNAPMV:-}" ]; then
  [ -x "$SNAPMV" ] || { echo "first_write.sh: SNAPMV=$SNAPMV is not executable" >&2; exit 1; }
else
  echo "== building snapmv (release)"
  cargo build --release -p snapmv-nbd --bin snapmv
  SNAPMV="${CARGO_TARGET_DIR:-$ROOT/target}/release/snapmv"
fi
SNAPMV_ARGS=()
[ -z "${FW_SNAPMV_ARGS:-}" ] || read -r -a SNAPMV_ARGS <<<"$FW_SNAPMV_ARGS"

# ---- work dir: a real disk ----------------------------------------------------
BASE=${FW_DIR:-/var/tmp}
mkdir -p "$BASE"
BASE=$(cd "$BASE" && pwd -P)  # absolute and without symlinks: fd_filter compares paths
FSTYPE=$(df -T "$BASE" | awk 'NR==2 { print $2 }')
case "$FSTYPE" in
  tmpfs|ramfs|overlay)
    echo "first_write.sh: $BASE is on $FSTYPE; set FW_DIR to a directory on a real disk" >&2; exit 1 ;;
esac
AVAIL_MIB=$(df -Pm "$BASE" | awk 'NR==2 { print $4 }')
NEED_MIB=$((SIZE_MIB * 5 + 512))  # raw + qcow2 base + one run's copy + its COW/overlay + slack
if [ "$AVAIL_MIB" -lt "$NEED_MIB" ]; then
  echo "first_write.sh: $BASE has ${AVAIL_MIB} MiB free; need ~${NEED_MIB} MiB" >&2; exit 1
fi
WORK=$(mktemp -d "$BASE/snapmv-first-write.XXXXXX")

SERVER_PID=""
PERF_PID=""
# Stop the server: SIGTERM, then wait for it to exit. The guard only stops a
# hung server from hanging the script; it is not how the exit is detected.
SERVER_RC=0
stop_server() {
  SERVER_RC=0
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  ( sleep 120; kill -KILL "$SERVER_PID" 2>/dev/null ) &
  local guard=$!
  wait "$SERVER_PID" || SERVER_RC=$?
  kill "$guard" 2>/dev/null || true
  wait "$guard" 2>/dev/null || true
  SERVER_PID=""
}
stop_perf() {
  if [ -n "$PERF_PID" ]; then
    kill -INT "$PERF_PID" 2>/dev/null || true
    wait "$PERF_PID" 2>/dev/null || true
    PERF_PID=""
  fi
}
cleanup() {
  stop_perf
  stop_server
  if [ "${FW_KEEP:-0}" = 1 ]; then echo "first_write.sh: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

CMDS="$WORK/commands.txt"   # the commands of the setup and of round 1
RESULTS="$WORK/results.tsv"
: >"$CMDS"; : >"$RESULTS"
LOG_CMDS=1
# Record a command (with $WORK shown as $W) and run it.
run() {
  if [ "$LOG_CMDS" = 1 ]; then
    local q; q=$(printf '%q ' "$@"); echo "${q//$WORK/\$W}" >>"$CMDS"
  fi
  "$@"
}
note() { [ "$LOG_CMDS" != 1 ] || echo "# $*" >>"$CMDS"; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
# Start a server in the background (recorded), its output to LOG.
start_server() {
  local log=$1; shift
  if [ "$LOG_CMDS" = 1 ]; then
    local q; q=$(printf '%q ' "$@"); echo "${q//$WORK/\$W} &" >>"$CMDS"
  fi
  "$@" >>"$log" 2>&1 &
  SERVER_PID=$!
}
# Wait until the server takes connections: `unix PATH` (snapmv's control
# socket, which it binds last, once everything else is up) or `tcp PORT`
# (qemu-nbd gives no other signal). Retries a connect with a short back-off
# (5 ms doubling to 100 ms); fails if the server exits or after 60 s.
wait_ready() {
  python3 - "$1" "$2" "$SERVER_PID" <<'PY' || { echo "first_write.sh: server not ready ($1 $2)" >&2; return 1; }
import socket, sys, time
kind, target, pid = sys.argv[1], sys.argv[2], sys.argv[3]
delay, deadline = 0.005, time.monotonic() + 60
def alive():
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
while time.monotonic() < deadline:
    try:
        if kind == "unix":
            s = socket.socket(socket.AF_UNIX)
            s.connect(target)
        else:
            s = socket.create_connection(("127.0.0.1", int(target)), 1)
        s.close()
        sys.exit(0)
    except OSError:
        pass
    if not alive():
        print("server exited", file=sys.stderr)
        sys.exit(1)
    time.sleep(delay)
    delay = min(delay * 2, 0.1)
sys.exit(1)
PY
}
TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
vm_hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
# The server's fds open on FILE, as a perf filter ("fd == 5 || fd == 7").
fd_filter() {
  local pid=$1 file=$2 f out=""
  for f in /proc/"$pid"/fd/*; do
    if [ "$(readlink "$f" 2>/dev/null)" = "$file" ]; then
      out="${out:+$out || }fd == ${f##*/}"
    fi
  done
  echo "${out:-fd == -1}"
}
# Optional: fdatasync/fsync calls of the server during the job (perf is not
# installed by this script). For snapmv, split by file: COW and origin.
# FW_PERF=0 skips it (perf's syscall tracepoints slow every syscall of the
# traced server a little).
PERF_OK=0
if [ "${FW_PERF:-1}" != 0 ] && command -v perf >/dev/null \
   && perf stat -x, -e syscalls:sys_enter_fdatasync -o /dev/null -- true 2>/dev/null; then
  PERF_OK=1
fi

QNBD_FLAGS=(-t -b 127.0.0.1 -x vol -e 16 --cache=writeback --aio=threads)  # as peer.sh

# ---- the filled images, once ------------------------------------------------------
PRISTINE="$WORK/pristine.raw"
BASE_QCOW2="$WORK/base.qcow2"
echo "== work dir $WORK ($FSTYPE); ${SIZE_MIB} MiB devices, $WRITES first writes per run, $ROUNDS round(s)"
note "setup: a filled raw image (random data), and the same data as a qcow2 image (64 KiB clusters)"
run dd if=/dev/urandom of="$PRISTINE" bs=1M count="$SIZE_MIB" status=none
run qemu-img convert -f raw -O qcow2 -o cluster_size=$CHUNK "$PRISTINE" "$BASE_QCOW2"
sync

# One run: set up SERVER fresh, the fio job at iodepth QD, stop the server.
SEQ=0
one_run() {
  local round=$1 server=$2 qd=$3
  SEQ=$((SEQ + 1))
  local D="$WORK/run-$SEQ" port uri json="$WORK/fio-$SEQ.json" perfcsv="$WORK/perf-$SEQ.csv"
  mkdir -p "$D"
  port=$(free_port)
  uri="nbd://127.0.0.1:$port/vol"
  echo "   round $round: $server, iodepth $qd"
  note "$server (iodepth $qd): fresh setup"
  local perf_ev=()
  case "$server" in
    snapmv)
      run cp --reflink=auto "$PRISTINE" "$D/origin.img"
      run truncate -s "$((SIZE_MIB * 2 + 256))M" "$D/cow.img"
      run "$SNAPMV" format "$D/cow.img" --chunk-size "$CHUNK" >/dev/null
      run "$SNAPMV" bind "$D/cow.img" "$D/origin.img" --id vol >/dev/null
      start_server "$D/server.log" "$SNAPMV" serve "$D/cow.img" --listen "127.0.0.1:$port" "${SNAPMV_ARGS[@]}"
      wait_ready unix "$D/cow.img.snapmv.sock"
      note "snapmv: a live snapshot through the control socket, no I/O in flight"
      run "$SNAPMV" snapshot "$D/cow.img" vol -m first-write >/dev/null
      perf_ev=(-e syscalls:sys_enter_fdatasync --filter "$(fd_filter "$SERVER_PID" "$D/cow.img")"
               -e syscalls:sys_enter_fdatasync --filter "$(fd_filter "$SERVER_PID" "$D/origin.img")")
      ;;
    overlay)
      note "overlay: the filled raw image becomes the read-only backing file of an empty overlay"
      run qemu-img create -q -f qcow2 -o cluster_size=$CHUNK -b "$PRISTINE" -F raw "$D/overlay.qcow2"
      start_server "$D/server.log" qemu-nbd -f qcow2 -p "$port" "${QNBD_FLAGS[@]}" "$D/overlay.qcow2"
      wait_ready tcp "$port"
      ;;
    internal)
      note "internal: a copy of the filled qcow2 image, an internal snapshot (server not running)"
      run cp --reflink=auto "$BASE_QCOW2" "$D/image.qcow2"
      run qemu-img snapshot -c s1 "$D/image.qcow2"
      start_server "$D/server.log" qemu-nbd -f qcow2 -p "$port" "${QNBD_FLAGS[@]}" "$D/image.qcow2"
      wait_ready tcp "$port"
      ;;
  esac
  # The copies' dirty pages go to disk first, so no run pays for another's
  # writeback (untimed).
  sync
  if [ "$PERF_OK" = 1 ]; then
    perf stat -x, "${perf_ev[@]}" -e syscalls:sys_enter_fdatasync -e syscalls:sys_enter_fsync \
      -p "$SERVER_PID" -o "$perfcsv" 2>/dev/null &
    PERF_PID=$!
  fi
  local c0 c1 t0 t1 rc=0
  c0=$(cpu_ticks "$SERVER_PID"); t0=$(date +%s.%N)
  run fio --name=first-write --ioengine=nbd --uri="$uri" --rw=write:60k --bs=4k \
    --size="${SIZE_MIB}M" --io_size="${IO_MIB}M" --iodepth="$qd" --numjobs=1 \
    --output-format=json --output="$json" || rc=$?
  t1=$(date +%s.%N); c1=$(cpu_ticks "$SERVER_PID")
  stop_perf
  [ "$rc" = 0 ] || { echo "first_write.sh: fio failed ($rc) on $server, iodepth $qd" >&2; exit 1; }
  local hwm; hwm=$(vm_hwm_kib "$SERVER_PID")
  stop_server
  local staged="" destaged="" commits=""
  if [ "$server" = snapmv ]; then
    [ "$SERVER_RC" = 0 ] || { echo "first_write.sh: snapmv serve exited $SERVER_RC; log:" >&2; tail -20 "$D/server.log" >&2; exit 1; }
    # The shutdown line: "first-write staging cow=... staged=N destaged=M".
    staged=$(grep 'first-write staging' "$D/server.log" | grep -o ' staged=[0-9]*' | tail -1 | cut -d= -f2 || true)
    destaged=$(grep 'first-write staging' "$D/server.log" | grep -o ' destaged=[0-9]*' | tail -1 | cut -d= -f2 || true)
    commits=$(grep 'first-write staging' "$D/server.log" | grep -o ' commits=[0-9]*' | tail -1 | cut -d= -f2 || true)
  fi
  cp "$D/server.log" "$WORK/server-$SEQ.log"
  rm -rf "$D"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$SEQ" "$server" "$qd" "$json" \
    "$(awk -v a="$c0" -v b="$c1" -v t="$TCK" 'BEGIN { print (b - a) / t }')" \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" \
    "$hwm" "${staged:-}" "${destaged:-}" "$SERVER_RC" "${commits:-}" >>"$RESULTS"
}

for ((r = 0; r < ROUNDS; r++)); do
  order=("${SERVERS[@]:r % 3}" "${SERVERS[@]:0:r % 3}")
  if [ $((r % 2)) = 0 ]; then qds=("${QDS_EVEN[@]}"); else qds=("${QDS_ODD[@]}"); fi
  for s in "${order[@]}"; do
    for qd in "${qds[@]}"; do
      one_run "$((r + 1))" "$s" "$qd"
    done
  done
  LOG_CMDS=0
done

T_END=$(date +%s)
ELAPSED=$((T_END - T_START))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- report -----------------------------------------------------------------------
DIRTY=""
git diff --quiet HEAD -- engine nbd-frontend 2>/dev/null || DIRTY=", engine/frontend with uncommitted changes"
MODE=full; [ "$QUICK" = 1 ] && MODE=quick
export RESULTS WORK PERF_OK WRITES
TABLES=$(python3 - <<'PY'
import csv, json, os, statistics as st

rows = list(csv.reader(open(os.environ["RESULTS"]), delimiter="\t"))
perf_ok = os.environ["PERF_OK"] == "1"
writes = int(os.environ["WRITES"])
NAMES = {
    "snapmv": "snapmv (origin in place, live snapshot)",
    "overlay": "qemu-nbd qcow2, fresh external overlay (redirect-on-write)",
    "internal": "qemu-nbd qcow2, internal snapshot (64 KiB clusters)",
}
def perf_counts(path):
    vals = []
    try:
        for line in open(path):
            f = line.strip().split(",")
            if len(f) >= 3 and not line.startswith("#"):
                try:
                    vals.append(float(f[0]))
                except ValueError:
                    vals.append(None)
    except OSError:
        return None
    return vals or None

runs = []
for rnd, seq, server, qd, path, cpu, wall, hwm, staged, destaged, src, commits in rows:
    j = json.load(open(path))["jobs"][0]
    w = j["write"]
    pct = w["clat_ns"].get("percentile", {})
    wall = float(wall)
    pc = perf_counts(path.replace("fio-", "perf-").replace(".json", ".csv")) if perf_ok else None
    fs = {}
    if pc:
        if server == "snapmv" and len(pc) >= 4:
            fs = {"cow": pc[0], "origin": pc[1], "all": (pc[2] or 0) + (pc[3] or 0)}
        else:
            fs = {"all": (pc[-2] or 0) + (pc[-1] or 0)}
    runs.append(dict(round=int(rnd), seq=int(seq), server=server, qd=int(qd),
                     iops=w["iops"], ios=w["total_ios"], p50=pct.get("50.000000", 0) / 1e6,
                     p99=pct.get("99.000000", 0) / 1e6, cpu=float(cpu), wall=wall,
                     hwm=int(hwm or 0), staged=staged, destaged=destaged, rc=src, commits=commits,
                     runtime=j["job_runtime"] / 1000.0, fs=fs, err=j.get("error", 0)))

qds = sorted({r["qd"] for r in runs}, reverse=True)
rounds = sorted({r["round"] for r in runs})
def cell(server, qd, rnd=None):
    return [r for r in runs if r["server"] == server and r["qd"] == qd and (rnd is None or r["round"] == rnd)]
def med(xs):
    return st.median(xs) if xs else float("nan")

print(f"Medians over {len(rounds)} round(s), IOPS of the {writes:,} first writes (fio write IOPS):")
print()
print("| server | " + " | ".join(f"QD{q} IOPS" for q in qds) + " |")
print("|---|" + "---:|" * len(qds))
for s in ("snapmv", "overlay", "internal"):
    print(f"| {NAMES[s]} | " + " | ".join(f"{med([r['iops'] for r in cell(s, q)]):,.0f}" for q in qds) + " |")
print()
print("Median of the per-round ratios (each round's snapmv IOPS over the same round's peer):")
print()
print("| ratio | " + " | ".join(f"QD{q}" for q in qds) + " | issue 11 target |")
print("|---|" + "---:|" * len(qds) + "---|")
ratios = {}
for peer, target in (("overlay", 1.0), ("internal", 3.0)):
    vals = []
    for q in qds:
        per = [cell("snapmv", q, rn)[0]["iops"] / cell(peer, q, rn)[0]["iops"] for rn in rounds
               if cell("snapmv", q, rn) and cell(peer, q, rn)]
        ratios[(peer, q)] = per
        vals.append(med(per))
    met = "met" if all(v >= target for v in vals) else "not met"
    print(f"| snapmv / {peer} | " + " | ".join(f"{v:.2f}x" for v in vals)
          + f" | >= {target:.1f}x at every QD: {met} in this run |")
print()
print("Per-round ratios: " + "; ".join(
    f"snapmv/{p} QD{q}: " + ", ".join(f"{x:.2f}" for x in ratios[(p, q)])
    for p in ("overlay", "internal") for q in qds))
print()
sm = [r for r in runs if r["server"] == "snapmv"]
if sm:
    print("snapmv serve, per run (a fresh process each time):")
    print()
    for r in sorted(sm, key=lambda r: r["seq"]):
        extra = ""
        if r["fs"].get("cow") is not None:
            extra = (f"; fdatasync/s during the job: COW {r['fs']['cow'] / r['wall']:,.0f}, origin "
                     f"{r['fs']['origin'] / r['wall']:,.0f} (so about {r['fs']['cow'] / 2 / r['wall']:,.0f} "
                     "commits/s: a journal commit flushes the COW before and after its records; "
                     "checkpoints add a few)")
        commits = (f"; {int(r['commits']):,} commits, {int(r['commits']) / r['wall']:,.0f}/s over the job"
                   if r["commits"] else "")
        print(f"- round {r['round']}, QD{r['qd']}: peak RSS (VmHWM) {r['hwm'] / 1024:,.1f} MiB; "
              f"staged {r['staged'] or '?'}, destaged {r['destaged'] or '?'} (logged at shutdown; "
              f"{r['ios']:,} writes){commits}{extra}")
    print()
    print("Commits are the server's own count (logged at shutdown; they include the snapshot's "
          "commit before the job), per second of the job's wall time.")
    print()
print("Every run:")
print()
print("| round | # | server | QD | IOPS | writes | runtime (s) | p50 lat (ms) | p99 lat (ms) | server CPU (s) | server peak RSS (MiB) | server fsync-class calls/s |")
print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in sorted(runs, key=lambda r: r["seq"]):
    fs = f"{r['fs']['all'] / r['wall']:,.0f}" if r["fs"] else "n/a"
    print(f"| {r['round']} | {r['seq']} | {r['server']} | {r['qd']} | {r['iops']:,.0f} | {r['ios']:,} | "
          f"{r['runtime']:.2f} | {r['p50']:.3f} | {r['p99']:.3f} | {r['cpu']:.2f} | "
          f"{r['hwm'] / 1024:,.1f} | {fs} |")
bad = [r for r in runs if r["ios"] != writes or r["err"]]
if bad:
    print()
    for r in bad:
        print(f"- run {r['seq']} ({r['server']}, QD{r['qd']}): {r['ios']} writes, fio error {r['err']}")
qrc = [r for r in runs if r["server"] != "snapmv" and r["rc"] not in ("0", "")]
if qrc:
    print()
    print("qemu-nbd exit statuses after SIGTERM: " + ", ".join(f"run {r['seq']}: {r['rc']}" for r in qrc))
PY
)

REPORT=$(cat <<EOF
# First writes after a snapshot: snapmv vs qemu-nbd/qcow2

Written by \`benches/first_write.sh\` ($MODE mode: $ROUNDS round(s), ${SIZE_MIB} MiB devices) on
$(date -u '+%Y-%m-%d %H:%M UTC'); the script took ${ELAPSED} s. Numbers are what this one run
measured on this machine, not a claim about any other.

## Machine

- $(nproc) cores, $(free -g | awk '/^Mem:/ { print $2 }') GiB RAM; kernel $(uname -r); work dir on $FSTYPE
  ($(df -P "$BASE" | awk 'NR==2 { print $1 }'), under $BASE)
- load average at start: $LOAD_START, at the end: $LOAD_END; other processes using >= 10 % CPU
  at the start: ${BUSY_START:-none}
- snapmv: $("$SNAPMV" --version) (git $(git rev-parse --short HEAD)$DIRTY)$([ ${#SNAPMV_ARGS[@]} = 0 ] || echo "; serve flags: ${SNAPMV_ARGS[*]}")
- $(qemu-nbd --version | head -1); $(qemu-img --version | head -1); fio: $(fio --version)

## Setup

- One fio job per run, the same binary and options for every server: \`--ioengine=nbd\` over
  loopback TCP, \`--rw=write:60k --bs=4k --size=${SIZE_MIB}M --io_size=${IO_MIB}M\`, iodepth 16 or 1,
  one connection: 4 KiB at every 64 KiB, so each of the $WRITES writes is the first to its
  64 KiB chunk/cluster since the snapshot. fio sends no FLUSH.
- Every run starts from a fresh server on fresh images, all holding the same data (random
  bytes, written once with dd): snapmv on a copy of the raw image (COW file sparse, 64 KiB
  chunks, \`snapmv serve\` defaults: --staging-budget 64MiB, --commit-delay 5ms, unless the
  flags above say otherwise) with a live \`snapmv snapshot\` once it is up; the overlay on an
  empty qcow2 (64 KiB clusters) whose backing file is the raw image; the internal snapshot on
  a copy of the qcow2 image (made with \`qemu-img convert\`, 64 KiB clusters) after
  \`qemu-img snapshot -c\`. qemu-nbd flags as in peer.sh: \`${QNBD_FLAGS[*]}\`.
- \`sync\` (untimed) before each job. Rounds run the six (server, iodepth) runs in rotating
  order: round r starts at server r mod 3 (snapmv, overlay, internal) and alternates
  iodepth 16 first / 1 first.
- Server CPU is user+system time of the whole server process during the job; peak RSS is
  VmHWM just before the SIGTERM; fsync-class calls come from \`perf stat -p\` ("n/a"
  without a working perf).

## Results

$TABLES

## Exact commands (setup and round 1)

\`\$W\` is the run's work dir (removed on exit). Servers ran in the background and were
stopped with SIGTERM and \`wait\`.

\`\`\`
$(cat "$CMDS")
\`\`\`

## Caveats

- Loopback TCP on $(nproc) shared cores: client, server and kernel compete for CPU.
- Buffered I/O everywhere; the images fit in RAM, so the copies read from the page cache.
  What differs is how often a server waits for fdatasync: snapmv makes each copy and its
  mapping durable (a group commit) before it writes the origin chunk in place (with
  staging, that commit comes after the write was acknowledged, the new data held in
  memory meanwhile); qemu orders refcounts before L2 entries with flushes after an
  internal snapshot; the overlay needs no ordering flushes at all.
- A quick run (one round, 256 MiB) is a smoke test, not a result.
EOF
)
echo
echo "$REPORT"
echo
echo "first_write.sh: done in ${ELAPSED} s"
if [ -n "$OUT" ]; then
  echo "$REPORT" >"$OUT"
  echo "wrote $OUT"
fi
