#!/usr/bin/env bash
# Side-by-side peer benchmark: the same fio workloads (--ioengine=nbd, over
# loopback TCP) against three NBD servers:
#   snapmv  `snapmv serve` on a fresh sparse COW file + origin file (64 KiB chunks)
#   qcow2   `qemu-nbd -f qcow2` on a qcow2 image (64 KiB clusters)
#   nbdkit  `nbdkit file` on a raw file (no snapshots: the baseline)
# Workloads (fixed size and runtime, iodepth 16): a one-pass 1 MiB fill
# (reported, so every later job runs on a fully written device), 64 KiB
# sequential write, 4 KiB random read, 4 KiB random write, and 4 KiB random
# writes to the origin right after a snapshot (snapmv: `snapmv snapshot` live;
# qcow2: an internal snapshot with `qemu-img snapshot -c` while qemu-nbd is
# stopped, then restarted; qcow2-overlay: a fresh external overlay over the
# filled image; nbdkit: none).
#
#   benches/peer.sh            # 1 GiB devices, 20 s per job, numjobs 1 and 4
#   benches/peer.sh --quick    # 512 MiB, 5 s per job, numjobs 1
#   PEER_NUMJOBS="1" PEER_SIZE_MIB=256 PEER_RUNTIME=3 benches/peer.sh
#   SNAPMV_BIN=/path/to/snapmv benches/peer.sh       # that binary, no build
#   PEER_BASELINE=/path/to/old/snapmv benches/peer.sh
#
# PEER_BASELINE adds a server "snapmv-baseline": the same snapmv section (its
# own fresh COW + origin, the fill, the steady workloads, the after-snapshot
# job) with that binary. Both snapmv servers run side by side and every job
# runs on each in turn, the order rotating from job to job, so the two see
# the same machine; the report adds a table of snapmv vs snapmv-baseline per
# row, with per-second IOPS of every timed job of both.
#
# Prints a markdown table and rewrites benches/PEER.md (machine, date,
# versions, exact commands, table, caveats). Anything below the line
# "<!-- notes: kept by peer.sh -->" in PEER.md is hand-written and kept.
# A measurement script, not a test: it asserts nothing about speed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=0
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "peer.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  SIZE_MIB=${PEER_SIZE_MIB:-512}; RUNTIME=${PEER_RUNTIME:-5}; NUMJOBS=${PEER_NUMJOBS:-1}
else
  SIZE_MIB=${PEER_SIZE_MIB:-1024}; RUNTIME=${PEER_RUNTIME:-20}; NUMJOBS=${PEER_NUMJOBS:-1 4}
fi
IODEPTH=16
CHUNK=65536
T_START=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
# Other processes busy at the start (this machine may be shared).
BUSY_START=$(ps -eo pcpu=,comm= --sort=-pcpu | awk '$1 >= 10 { printf "%s%s (%s%% CPU)", sep, $2, $1; sep = ", " }')

# ---- tools -----------------------------------------------------------------
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
need=()
command -v fio >/dev/null || need+=(fio)
{ command -v qemu-nbd >/dev/null && command -v qemu-img >/dev/null; } || need+=(qemu-utils)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v python3 >/dev/null || need+=(python3)
if [ "${#need[@]}" -gt 0 ]; then
  echo "== installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y "${need[@]}" >/dev/null 2>&1 \
    || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y "${need[@]}" >/dev/null; }
fi
if ! fio --enghelp 2>/dev/null | grep -qx '[[:space:]]*nbd'; then
  echo "peer.sh: this fio has no nbd ioengine" >&2; exit 1
fi

if [ -n "${SNAPMV_BIN:-}" ]; then
  SNAPMV=$(realpath "$SNAPMV_BIN")
  echo "== snapmv: $SNAPMV (SNAPMV_BIN, not built)"
else
  echo "== building snapmv (release)"
  cargo build --release --bin snapmv
  SNAPMV="${CARGO_TARGET_DIR:-$ROOT/target}/release/snapmv"
fi
[ -x "$SNAPMV" ] || { echo "peer.sh: $SNAPMV is not an executable" >&2; exit 1; }
BASELINE=""
if [ -n "${PEER_BASELINE:-}" ]; then
  BASELINE=$(realpath "$PEER_BASELINE")
  [ -x "$BASELINE" ] || { echo "peer.sh: PEER_BASELINE $BASELINE is not an executable" >&2; exit 1; }
  echo "== snapmv-baseline: $BASELINE"
fi

# ---- temp dir, servers, cleanup ---------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/snapmv-peer.XXXXXX")
SERVER_PID=""
# Servers of a section that runs several at once (snapmv and snapmv-baseline):
# name -> pid; use_server NAME makes NAME's pid the one jobs measure.
declare -A PID_OF=()
stop_pid() {
  local pid=$1
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
}
stop_server() {
  stop_pid "$SERVER_PID"
  SERVER_PID=""
}
use_server() {
  if [ -n "${PID_OF[$1]:-}" ]; then SERVER_PID=${PID_OF[$1]}; fi
}
PERF_PID=""
cleanup() {
  if [ -n "$PERF_PID" ]; then kill -INT "$PERF_PID" 2>/dev/null || true; wait "$PERF_PID" 2>/dev/null || true; fi
  stop_server
  local p
  for p in ${PID_OF[@]+"${PID_OF[@]}"}; do stop_pid "$p"; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

CMDS="$WORK/commands.txt"   # every command that touches a server or image
RESULTS="$WORK/results.tsv" # server, workload, numjobs, fio json, server cpu s, wall s, fio cpu s, note
: >"$CMDS"; : >"$RESULTS"
# Record a command (with $WORK shown as $W) and run it.
run() {
  local q
  q=$(printf '%q ' "$@"); echo "${q//$WORK/\$W}" >>"$CMDS"
  "$@"
}
note() { echo "# $*" >>"$CMDS"; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_port() {
  local port=$1 i
  for i in $(seq 1 100); do
    if python3 -c "import socket,sys; s=socket.create_connection(('127.0.0.1',$port),0.2); s.close()" 2>/dev/null; then
      return 0
    fi
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "peer.sh: server exited early" >&2; return 1; }
    sleep 0.1
  done
  echo "peer.sh: server did not listen on $port" >&2; return 1
}
# Start a server in the background (recorded), wait for its port.
start_server() {
  local port=$1 log=$2; shift 2
  local q; q=$(printf '%q ' "$@"); echo "${q//$WORK/\$W} &" >>"$CMDS"
  "$@" >>"$log" 2>&1 &
  SERVER_PID=$!
  wait_port "$port"
}
cpu_ticks() {  # utime+stime of the whole server process (all threads)
  if [ -n "$SERVER_PID" ] && [ -r "/proc/$SERVER_PID/stat" ]; then
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$SERVER_PID/stat"
  else echo 0; fi
}
TCK=$(getconf CLK_TCK)
# Optional evidence from perf (not installed by this script): the server's
# context switches and fsync-class syscalls during each job.
PERF_EVENTS="context-switches,syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync"
PERF_OK=0
if command -v perf >/dev/null && perf stat -x, -e "$PERF_EVENTS" -o /dev/null -- true 2>/dev/null; then
  PERF_OK=1
fi

fio_name() {
  case "$1" in
    "$W_FILL") echo fill ;; "$W_SEQ") echo seqwrite-64k ;; "$W_RR") echo randread-4k ;;
    "$W_RW") echo randwrite-4k ;; "$W_SNAP") echo randwrite-4k-after-snapshot ;; *) echo job ;;
  esac
}
# fio_job SERVER WORKLOAD NUMJOBS URI fio-options...
JOBN=0
fio_job() {
  local server=$1 workload=$2 nj=$3 uri=$4; shift 4
  JOBN=$((JOBN + 1))
  local out="$WORK/fio-$JOBN.json" c0 c1 t0 t1
  echo "   $server / $workload / numjobs $nj"
  local tf="$WORK/time-$JOBN" rc=0 TIMEFORMAT='%3U %3S'
  # Write back earlier jobs' dirty pages first, so that no job is throttled
  # by (or pays for) another's writeback.
  sync
  if [ "$PERF_OK" = 1 ]; then
    perf stat -x, -e "$PERF_EVENTS" -p "$SERVER_PID" -o "$WORK/perf-$JOBN.csv" 2>/dev/null &
    PERF_PID=$!
  fi
  c0=$(cpu_ticks); t0=$(date +%s.%N)
  # The `time` keyword gives fio's own CPU (user, system; all its threads).
  # With PERSEC=1 (the snapmv section when comparing with a baseline), timed
  # jobs also log their IOPS per second (the after-snapshot job logs anyway).
  local persec=()
  if [ "${PERSEC:-0}" = 1 ] && [ "$workload" != "$W_FILL" ] && [ "$workload" != "$W_SNAP" ]; then
    persec=(--write_iops_log="$WORK/persec-$JOBN" --log_avg_msec=1000)
  fi
  { time run fio --name="$(fio_name "$workload")" --ioengine=nbd --uri="$uri" --iodepth=$IODEPTH \
    --numjobs="$nj" --group_reporting --randseed=1234 \
    --output-format=json --output="$out" "$@" "${persec[@]}" 2>&3; } 3>&2 2>"$tf" || rc=$?
  c1=$(cpu_ticks); t1=$(date +%s.%N)
  if [ -n "$PERF_PID" ]; then
    kill -INT "$PERF_PID" 2>/dev/null || true; wait "$PERF_PID" 2>/dev/null || true; PERF_PID=""
  fi
  [ "$rc" = 0 ] || { echo "peer.sh: fio failed ($rc) on $server / $workload" >&2; exit 1; }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$server" "$workload" "$nj" "$out" \
    "$(awk -v a="$c0" -v b="$c1" -v t="$TCK" 'BEGIN { print (b - a) / t }')" \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" \
    "$(tail -1 "$tf" | awk '{ print $1 + $2 }')" "${EXTRA_NOTE:-}" >>"$RESULTS"
  EXTRA_NOTE=""
}
# Append to the note of the last job run.
post_note() {
  python3 - "$RESULTS" "$1" <<'PY'
import sys
p, extra = sys.argv[1], sys.argv[2]
lines = open(p).read().splitlines()
f = lines[-1].split("\t")
f[-1] = (f[-1] + "; " if f[-1] else "") + extra
lines[-1] = "\t".join(f)
open(p, "w").write("\n".join(lines) + "\n")
PY
}
EXTRA_NOTE=""

SIZE_B=$((SIZE_MIB * 1048576))
TIMED=(--time_based --runtime="$RUNTIME")
W_FILL="fill 1M seq write (1 pass)"
W_SEQ="64K seq write"
W_RR="4K rand read"
W_RW="4K rand write"
W_SNAP="4K rand write after snapshot"

# The servers of the running section (names, URIs). With more than one, every
# job runs on each of them in turn, back to back, and the order rotates from
# one job to the next (A B, B A, A B, ...), so that no server always goes first.
SEC_NAMES=(); SEC_URIS=(); ROT=0
# on_each FN ARGS...: FN SERVER URI ARGS... for every server of the section.
on_each() {
  local fn=$1; shift
  local n=${#SEC_NAMES[@]} k i
  for ((k = 0; k < n; k++)); do
    i=$(( (k + ROT) % n ))
    use_server "${SEC_NAMES[i]}"
    "$fn" "${SEC_NAMES[i]}" "${SEC_URIS[i]}" "$@"
  done
  ROT=$((ROT + 1))
}
# job SERVER URI WORKLOAD NUMJOBS fio-options...
job() {
  local server=$1 uri=$2 workload=$3 nj=$4; shift 4
  fio_job "$server" "$workload" "$nj" "$uri" "$@"
}
# The fill, then the steady-state workloads: steady SERVER URI [SERVER URI ...].
steady() {
  SEC_NAMES=(); SEC_URIS=()
  while [ $# -gt 0 ]; do SEC_NAMES+=("$1"); SEC_URIS+=("$2"); shift 2; done
  local who nj
  who=$(printf '%s, ' "${SEC_NAMES[@]}"); who=${who%, }
  [ "${#SEC_NAMES[@]}" -eq 1 ] || who="$who (each job on each in turn, order rotating)"
  note "$who: fill the device once (1 MiB sequential writes)"
  on_each job "$W_FILL" 1 --rw=write --bs=1M --size="${SIZE_MIB}M"
  for nj in $NUMJOBS; do
    note "$who: steady-state workloads, numjobs $nj"
    # Sequential jobs split the device so numjobs > 1 stay sequential.
    on_each job "$W_SEQ" "$nj" --rw=write --bs=64k \
      --size="$((SIZE_MIB / nj))M" --offset_increment="$((SIZE_MIB / nj))M" "${TIMED[@]}"
    on_each job "$W_RR" "$nj" --rw=randread --bs=4k --norandommap \
      --size="${SIZE_MIB}M" "${TIMED[@]}"
    on_each job "$W_RW" "$nj" --rw=randwrite --bs=4k --norandommap \
      --size="${SIZE_MIB}M" "${TIMED[@]}"
  done
}
# The after-snapshot job, with a per-second IOPS log.
after_snap() {
  local server=$1 nj=$2 uri=$3
  fio_job "$server" "$W_SNAP" "$nj" "$uri" --rw=randwrite --bs=4k --norandommap \
    --size="${SIZE_MIB}M" "${TIMED[@]}" \
    --write_iops_log="$WORK/iops-$server-$nj" --log_avg_msec=1000
}

echo "== work dir $WORK; ${SIZE_MIB} MiB devices, ${RUNTIME} s per timed job, numjobs: $NUMJOBS"

# ---- (a) snapmv (and snapmv-baseline) ---------------------------------------------
# One fresh COW + origin and one server per binary; with a baseline both
# servers run for the whole section and the jobs alternate between them.
declare -A BIN_OF=() DIR_OF=()
SNAP_ARGS=()
snapmv_start() {
  local name=$1 bin=$2 port d
  port=$(free_port)
  d="$WORK/$name"; mkdir -p "$d"
  note "$name: fresh sparse COW file and origin file, 64 KiB chunks"
  run truncate -s "$((SIZE_MIB * 2 + 256))M" "$d/cow.img"
  run truncate -s "${SIZE_MIB}M" "$d/origin.img"
  run "$bin" format "$d/cow.img" --chunk-size "$CHUNK" >/dev/null
  run "$bin" bind "$d/cow.img" "$d/origin.img" --id vol >/dev/null
  start_server "$port" "$d/serve.log" "$bin" serve "$d/cow.img" --listen "127.0.0.1:$port"
  PID_OF[$name]=$SERVER_PID; BIN_OF[$name]=$bin; DIR_OF[$name]=$d
  SNAP_ARGS+=("$name" "nbd://127.0.0.1:$port/vol")
}
# A live snapshot, then the after-snapshot job: snap_job SERVER URI NUMJOBS.
snap_job() {
  local server=$1 uri=$2 nj=$3 bin=${BIN_OF[$1]} d=${DIR_OF[$1]} t0 tag snap_ms used0 used1
  note "$server: live snapshot through the running server's control socket"
  t0=$(date +%s.%N)
  tag=$(run "$bin" snapshot "$d/cow.img" vol -m "peer-nj$nj")
  snap_ms=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", (b - a) * 1000 }')
  used0=$("$bin" list "$d/cow.img" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["chunks_used"])')
  after_snap "$server" "$nj" "$uri"
  used1=$("$bin" list "$d/cow.img" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["chunks_used"])')
  post_note "snapshot tag $tag took ${snap_ms} ms (CLI + control socket); COW chunks used $used0 -> $used1 (the origin has $((SIZE_MIB * 1048576 / CHUNK)) chunks)"
}
snapmv_start snapmv "$SNAPMV"
if [ -n "$BASELINE" ]; then
  snapmv_start snapmv-baseline "$BASELINE"
  PERSEC=1
fi
steady "${SNAP_ARGS[@]}"
for nj in $NUMJOBS; do
  on_each snap_job "$nj"
done
PERSEC=0
for s in "${!PID_OF[@]}"; do
  use_server "$s"; stop_server; unset "PID_OF[$s]"
done

# ---- (b) qemu-nbd + qcow2 -----------------------------------------------------
PORT=$(free_port)
D="$WORK/qcow2"; mkdir -p "$D"
IMG="$D/vol.qcow2"
QNBD=(qemu-nbd -f qcow2 -t -b 127.0.0.1 -p "$PORT" -x vol -e 16 --cache=writeback --aio=threads)
note "qcow2: fresh image, 64 KiB clusters, no preallocation (qemu defaults)"
run qemu-img create -q -f qcow2 -o cluster_size=$CHUNK "$IMG" "${SIZE_MIB}M"
start_server "$PORT" "$D/qemu-nbd.log" "${QNBD[@]}" "$IMG"
URI="nbd://127.0.0.1:$PORT/vol"
steady qcow2 "$URI"
for nj in $NUMJOBS; do
  note "qcow2: internal snapshot: stop qemu-nbd (it holds the image lock), qemu-img snapshot -c, restart"
  t0=$(date +%s.%N)
  stop_server
  run qemu-img snapshot -c "peer-nj$nj" "$IMG"
  start_server "$PORT" "$D/qemu-nbd.log" "${QNBD[@]}" "$IMG"
  snap_ms=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", (b - a) * 1000 }')
  EXTRA_NOTE="stop + qemu-img snapshot -c + restart took ${snap_ms} ms"
  after_snap qcow2 "$nj" "$URI"
done
stop_server
run qemu-img snapshot -l "$IMG" >"$D/snapshots.txt"

# qcow2 external overlay over the same (filled) image, one fresh overlay per
# numjobs value, so every run starts with an empty overlay.
for nj in $NUMJOBS; do
  note "qcow2-overlay: external snapshot: the filled image becomes a read-only backing file"
  OVL="$D/overlay-$nj.qcow2"
  t0=$(date +%s.%N)
  run qemu-img create -q -f qcow2 -o cluster_size=$CHUNK -b "$IMG" -F qcow2 "$OVL"
  start_server "$PORT" "$D/qemu-nbd.log" "${QNBD[@]}" "$OVL"
  snap_ms=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", (b - a) * 1000 }')
  EXTRA_NOTE="qemu-img create -b + start took ${snap_ms} ms"
  after_snap qcow2-overlay "$nj" "$URI"
  stop_server
done

# ---- (c) nbdkit file plugin on a raw file ---------------------------------------
PORT=$(free_port)
D="$WORK/nbdkit"; mkdir -p "$D"
note "nbdkit: fresh sparse raw file, file plugin (no snapshot support)"
run truncate -s "${SIZE_MIB}M" "$D/vol.raw"
start_server "$PORT" "$D/nbdkit.log" nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$PORT" -e vol \
  file file="$D/vol.raw"
URI="nbd://127.0.0.1:$PORT/vol"
steady nbdkit "$URI"
stop_server

T_END=$(date +%s)
ELAPSED=$((T_END - T_START))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- report ---------------------------------------------------------------------
# The git commit a snapmv binary comes from: this checkout for the binary built
# here, else the git work tree holding the binary (SNAPMV_BIN, PEER_BASELINE).
bin_rev() {
  local top=$ROOT
  if [ "${2:-}" != built ]; then
    top=$(git -C "$(dirname "$1")" rev-parse --show-toplevel 2>/dev/null) \
      || { echo "$1, not in a git work tree"; return; }
    echo -n "$1, "
  fi
  echo "git $(git -C "$top" rev-parse --short HEAD)$(git -C "$top" diff --quiet HEAD -- engine nbd-frontend 2>/dev/null || echo ', engine/frontend with uncommitted changes')"
}
VERSIONS=$(
  if [ -n "${SNAPMV_BIN:-}" ]; then
    echo "- snapmv: $("$SNAPMV" --version) ($(bin_rev "$SNAPMV"))"
  else
    echo "- snapmv: $("$SNAPMV" --version) ($(bin_rev "$SNAPMV" built))"
  fi
  [ -z "$BASELINE" ] || echo "- snapmv-baseline: $("$BASELINE" --version) ($(bin_rev "$BASELINE"))"
  echo "- $(qemu-nbd --version | head -1)"
  echo "- $(qemu-img --version | head -1)"
  echo "- $(nbdkit --version | head -1)"
  echo "- fio: $(fio --version)"
  echo "- kernel: $(uname -r); filesystem of the temp dir: $(df -T "$WORK" | awk 'NR==2 { print $2 }')"
)
export RESULTS WORK SIZE_MIB RUNTIME NUMJOBS
TABLES=$(python3 - <<'PY'
import csv, glob, json, os

rows = list(csv.reader(open(os.environ["RESULTS"]), delimiter="\t"))
def perf_counts(path):
    c = {}
    try:
        for line in open(path):
            f = line.strip().split(",")
            if len(f) >= 3 and not line.startswith("#"):
                try:
                    c[f[2]] = float(f[0])
                except ValueError:
                    pass
    except OSError:
        return None
    return c or None

print("| server | workload | numjobs | IOPS | MB/s | p99 lat (ms) | server CPU (cores) | fio CPU (cores) | server ctx sw / I/O | server fsyncs/s |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
notes = []
for server, workload, nj, path, cpu, wall, fcpu, note in rows:
    j = json.load(open(path))["jobs"][0]
    d = j["read"] if "read" in workload else j["write"]
    p99 = d["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e6
    wall = float(wall)
    srv = float(cpu) / wall if wall > 0 else 0
    fio_cpu = float(fcpu) / wall if wall > 0 else 0
    pc = perf_counts(path.replace("fio-", "perf-").replace(".json", ".csv"))
    ios = d["total_ios"] if d.get("total_ios") else d["iops"] * j["job_runtime"] / 1000.0
    if pc and wall > 0:
        cs = pc.get("context-switches", 0) / ios if ios else 0
        fs = (pc.get("syscalls:sys_enter_fdatasync", 0) + pc.get("syscalls:sys_enter_fsync", 0)) / wall
        cs_s, fs_s = f"{cs:.2f}", f"{fs:,.0f}"
    else:
        cs_s = fs_s = "n/a"
    print(f"| {server} | {workload} | {nj} | {d['iops']:,.0f} | {d['bw_bytes'] / 1e6:,.1f} | "
          f"{p99:.2f} | {srv:.2f} | {fio_cpu:.2f} | {cs_s} | {fs_s} |")
    if note:
        notes.append(f"- {server}, numjobs {nj}: {note}")
    if j.get("error"):
        notes.append(f"- {server} {workload} numjobs {nj}: fio error {j['error']}")
print()
print("Snapshot step before each after-snapshot job:")
print()
print("\n".join(notes) if notes else "- (none)")
print()
print("Per-second IOPS of the after-snapshot job (fio write_iops_log, 1 s averages summed "
      "over the fio jobs; the first seconds include the first-write copies of most chunks):")
print()
series = {}
for f in sorted(glob.glob(os.path.join(os.environ["WORK"], "iops-*_iops.*.log"))):
    name = os.path.basename(f)[len("iops-"):].split("_iops.")[0]
    server, nj = name.rsplit("-", 1)
    s = series.setdefault((server, int(nj)), {})
    for line in open(f):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2:
            sec = int(round(int(parts[0]) / 1000.0))
            s[sec] = s.get(sec, 0) + int(parts[1])
for (server, nj), s in sorted(series.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    print(f"- {server}, numjobs {nj}: " + " ".join(f"{s[k]:,}" for k in sorted(s)))
PY
)
COMPARE=""
if [ -n "$BASELINE" ]; then
COMPARE=$(python3 - <<'PY'
import csv, glob, json, os, statistics

work = os.environ["WORK"]
rows = list(csv.reader(open(os.environ["RESULTS"]), delimiter="\t"))
def job_no(path):
    return int(os.path.basename(path)[len("fio-"):-len(".json")])
def per_second(server, workload, nj, path):
    # The job's IOPS per second (1 s averages summed over its fio jobs).
    if "after snapshot" in workload:
        files = glob.glob(os.path.join(work, f"iops-{server}-{nj}_iops.*.log"))
    else:
        files = glob.glob(os.path.join(work, f"persec-{job_no(path)}_iops.*.log"))
    s = {}
    for f in files:
        for line in open(f):
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 2:
                sec = int(round(int(parts[0]) / 1000.0))
                s[sec] = s.get(sec, 0) + int(parts[1])
    return [s[k] for k in sorted(s)]
res = {}
order = []
for server, workload, nj, path, cpu, wall, fcpu, note in rows:
    if server not in ("snapmv", "snapmv-baseline"):
        continue
    j = json.load(open(path))["jobs"][0]
    d = j["read"] if "read" in workload else j["write"]
    p99 = d["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e6
    res[(server, workload, nj)] = dict(iops=d["iops"], p99=p99, no=job_no(path),
                                       cpu=float(cpu) / float(wall) if float(wall) > 0 else 0,
                                       ps=per_second(server, workload, nj, path))
    if (workload, nj) not in order:
        order.append((workload, nj))

def ps_s(ps):
    if not ps:
        return "n/a"
    return f"{statistics.median(ps):,.0f} ({min(ps):,}-{max(ps):,})"
print("| workload | numjobs | ran first | IOPS snapmv | IOPS baseline | IOPS ratio | "
      "per-s IOPS snapmv: median (min-max) | per-s IOPS baseline: median (min-max) | "
      "p99 snapmv (ms) | p99 baseline (ms) | p99 ratio | server CPU snapmv / baseline |")
print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
plain, ratios = [], []
for workload, nj in order:
    c = res.get(("snapmv", workload, nj)); b = res.get(("snapmv-baseline", workload, nj))
    if not c or not b:
        continue
    r = c["iops"] / b["iops"] if b["iops"] else float("nan")
    pr = c["p99"] / b["p99"] if b["p99"] else float("nan")
    first = "snapmv" if c["no"] < b["no"] else "baseline"
    ratios.append(r)
    if workload in ("64K seq write", "4K rand read", "4K rand write"):
        plain.append(r)
    print(f"| {workload} | {nj} | {first} | {c['iops']:,.0f} | {b['iops']:,.0f} | {r:.2f} | "
          f"{ps_s(c['ps'])} | {ps_s(b['ps'])} | {c['p99']:.2f} | {b['p99']:.2f} | {pr:.2f} | "
          f"{c['cpu']:.2f} / {b['cpu']:.2f} |")
print()
if plain:
    print(f"IOPS ratio snapmv / snapmv-baseline over the plain overwrite and read rows "
          f"(64K seq write, 4K rand read, 4K rand write; {len(plain)} rows): median "
          f"{statistics.median(plain):.2f}, range {min(plain):.2f}-{max(plain):.2f}. "
          f"Over all {len(ratios)} rows: median {statistics.median(ratios):.2f}, "
          f"range {min(ratios):.2f}-{max(ratios):.2f}.")
PY
)
fi
echo
echo "$TABLES"
if [ -n "$COMPARE" ]; then
  echo
  echo "snapmv vs snapmv-baseline:"
  echo
  echo "$COMPARE"
fi
echo
echo "peer.sh: done in ${ELAPSED} s"

MD="$ROOT/benches/PEER.md"
KEEP=""
if [ -f "$MD" ] && grep -q '^<!-- notes: kept by peer.sh -->' "$MD"; then
  KEEP=$(sed -n '/^<!-- notes: kept by peer.sh -->/,$p' "$MD")
fi
MODE=full; [ "$QUICK" = 1 ] && MODE=quick
BASE_RERUN="" BASE_SETUP="" BASE_SECTION="" BASE_CAVEAT=""
if [ -n "$BASELINE" ]; then
  BASE_RERUN="
This run compared two snapmv binaries: \`PEER_BASELINE=OLD SNAPMV_BIN=NEW benches/peer.sh\`
(binaries under Machine)."
  BASE_SETUP="
- **snapmv-baseline** (\`PEER_BASELINE\`): the same as snapmv with the baseline binary, on
  its own fresh COW file and origin file. Both snapmv servers run for the whole snapmv
  section; every job (the fill, each steady workload at each numjobs, the snapshot and
  the after-snapshot job) runs on one and then the other, back to back, the order
  alternating from job to job (snapmv first, then baseline first, ...). Timed steady jobs
  on both also log IOPS per second (\`--write_iops_log --log_avg_msec=1000\`)."
  BASE_SECTION="
## snapmv vs snapmv-baseline

Ratios are snapmv / snapmv-baseline: an IOPS ratio above 1 or a p99 ratio below 1 means the
current binary did better. \"ran first\" is which server ran that job first of the pair.
Per-second IOPS are fio's 1 s IOPS log of the job (summed over its fio jobs); their
spread within one job is the noise a single figure carries.

$COMPARE
"
  BASE_CAVEAT="
- snapmv vs snapmv-baseline: one job per server per row, run back to back in
  alternating order, so both see nearly the same machine; the idle server holds its
  files in the page cache and runs its driver's 1 s flush (nothing to write back). A
  ratio within the rows' per-second spread, or within ~10 % on this shared VM, is noise."
fi
{
  cat <<EOF
# Peer benchmark: snapmv vs qemu-nbd/qcow2 vs nbdkit

Written by \`benches/peer.sh\` ($MODE mode) on $(date -u '+%Y-%m-%d %H:%M UTC'); the script
took ${ELAPSED} s. Numbers are what this one run measured on this machine, not a claim
about any other. Rerun: \`benches/peer.sh\` (1 GiB, 20 s per job, numjobs 1 and 4) or
\`benches/peer.sh --quick\` (512 MiB, 5 s, numjobs 1).$BASE_RERUN

## Machine

- $(nproc) cores, $(free -g | awk '/^Mem:/ { print $2 }') GiB RAM; load average at start: $LOAD_START,
  at the end: $LOAD_END (the benchmark's own server threads count in the latter)
- other processes using >= 10 % CPU at the start: ${BUSY_START:-none}
$VERSIONS

## Setup

- Device size ${SIZE_MIB} MiB; ${RUNTIME} s per timed job; iodepth $IODEPTH; numjobs: $NUMJOBS
  (one NBD connection per fio job); fio \`--ioengine=nbd\` over loopback TCP; fixed
  \`--randseed=1234\`, \`--norandommap\`, so every server sees the same offsets.
- \`sync\` runs before every fio job (untimed), so that no job is throttled by the
  writeback of an earlier job's dirty pages.
- Order on each server: one untimed 1 MiB sequential pass over the whole device (the
  "fill" row, so later jobs never hit unallocated space), then 64 KiB sequential write,
  4 KiB random read, 4 KiB random write, then (snapmv, qcow2) a snapshot and 4 KiB random
  writes to the origin. With several numjobs values, each gets a new snapshot.
- **snapmv**: \`snapmv serve\` on a sparse COW file (2x the device + 256 MiB) and a sparse
  origin file, 64 KiB chunks, buffered I/O (no O_DIRECT), the server's periodic 1 s flush.$BASE_SETUP
- **qcow2**: \`qemu-nbd -f qcow2 --cache=writeback --aio=threads -e 16\` on a qcow2 image with
  64 KiB clusters, no preallocation, default L2/refcount caches and lazy_refcounts=off.
- **nbdkit**: \`nbdkit file\` on a sparse raw file, default (buffered) cache mode and threads.
- Server CPU is the server process's user+system time (all threads, /proc/PID/stat) during
  the job divided by the job's wall time, in cores (2 = both cores). fio CPU is fio's own
  user+system time (bash \`time\`) over the same wall time. The last two columns come from
  \`perf stat -p SERVER\` during the job (all server threads, "n/a" without a working
  perf): context switches per completed I/O, and fdatasync+fsync calls per second: how
  often the server waits for the disk.

## What the after-snapshot row compares

- **snapmv**: \`snapmv snapshot COW vol\` while the server runs and no I/O is in flight
  (it goes through the control socket; the export stays open). The origin stays in
  place: the first write to each 64 KiB chunk copies the old chunk onto the COW device
  and maps it in the open transaction, holds the bytes written in memory (staging,
  \`--staging-budget\`, default 64 MiB) and acknowledges; a group commit (fdatasync of
  the COW file, journal write, fdatasync) follows within \`--commit-delay\` (default
  5 ms), at once on FLUSH or FUA or when staging is half full, and only then are the
  staged bytes written in place. Copy-out; an acknowledged write is durable after the
  next FLUSH (at once with FUA), and no origin overwrite reaches the disk before its
  chunk's copy is durable. (Builds before write-back staging, a183cb9, committed
  durably before acknowledging every first write.)
- **qcow2** (internal snapshot): \`qemu-img snapshot -c\` needs the image unlocked, so the
  script stops qemu-nbd, snapshots, and restarts it (qemu-nbd has no monitor; a live
  internal snapshot would need QEMU or qemu-storage-daemon with QMP
  \`blockdev-snapshot-internal-sync\`). fio reconnects to a fresh qemu-nbd with cold
  metadata caches. The snapshot bumps every cluster's refcount; the first write to a
  64 KiB cluster then allocates a new cluster, copies the old 64 KiB (the 4 KiB write
  merged in), and rewrites the L2 entry (the first touch of each shared L2 table copies
  the table too). Redirect-on-write at the same 64 KiB granularity, the same data moved
  per first write. qemu orders its metadata (refcounts before the L2 entries that use
  them) with flushes of the image file even with cache=writeback, so it waits for the
  disk during this phase too (see the fsyncs/s column); but it gives no promise that an
  acknowledged write's mapping is durable before a client flush (neither does snapmv
  since write-back staging; older snapmv committed the copy before acknowledging).
- **qcow2-overlay** (external snapshot): the filled image becomes the read-only backing
  file of a new empty overlay (what \`blockdev-snapshot-sync\` does), served by a restarted
  qemu-nbd. A first 4 KiB write to a cluster reads the other 60 KiB from the backing
  file, allocates a 64 KiB cluster in the overlay and writes it: also 64 KiB per first
  write, but on a fresh image (refcounts 0 -> 1, nothing shared to copy-on-write in the
  metadata). Here the writes go to the overlay and the old data stays in place, the
  opposite layout to snapmv's, and later reads of unwritten clusters go through the
  backing chain.
- **nbdkit** has no snapshots: its 4K random write row is the no-snapshot baseline.

## Results

$TABLES
$BASE_SECTION
## Exact commands

\`\$W\` is the run's temp dir (removed on exit). Servers were started in the background
(\`&\`) and stopped with SIGTERM; fio options are as run.

\`\`\`
$(cat "$CMDS")
\`\`\`

## Caveats

- Loopback TCP: every request crosses the kernel's TCP stack twice; client, server and
  the kernel share the same $(nproc) cores, so a server's CPU efficiency decides much of
  the result, and fio's nbd engine (libnbd) uses CPU of its own.
- Page cache: all servers use buffered I/O and the files (${SIZE_MIB} MiB, COW file
  included) fit in RAM, so reads and writes mostly hit the page cache; writeback to the
  virtual disk happens in the background or at the flushes each server issues (snapmv:
  durable commits on first writes after a snapshot, and a periodic 1 s flush; qemu-nbd
  and nbdkit only when the client flushes — fio sends no flush here). This measures
  the servers' software paths, not a disk.
- Sparse files on ext4: all backing files start sparse; the fill pass allocates ext4
  extents (qcow2 also allocates its clusters then). The snapmv COW file stays sparse
  until the after-snapshot job copies chunks into it.
- qcow2 snapshots are taken with the server stopped (see above), so the qcow2 rows
  include a reconnect and cold caches; snapmv's snapshot is live.
- One run, no repetitions: run-to-run noise on a shared 2-core VM can be 10-20 %;
  compare large differences only.$BASE_CAVEAT
EOF
  if [ -n "$KEEP" ]; then
    echo
    echo "$KEEP"
  fi
} >"$MD"
echo "wrote $MD"
