#!/usr/bin/env bash
# NBD over TLS, the cost (issue 14, item 5): the frontend benchmark's
# client (fio --ioengine=nbd) against the same servers with and without TLS,
# in one run, every file on tmpfs so that the protocol path is measured:
#   snapmv        `snapmv serve` on a COW device bound to a raw origin (as in
#                 frontend.sh), plain (nbd://)
#   snapmv-x509   the same with `--tls require --tls-dir CERTS/server`:
#                 client certificates required (nbds://...?tls-certificates=)
#   snapmv-psk    the same with `--tls require --tls-psk CERTS/psk/keys.psk`
#   nbdkit, nbdkit-x509, nbdkit-psk
#                 `nbdkit memory` plain, `--tls=require --tls-certificates`
#                 (and --tls-verify-peer), `--tls=require --tls-psk`: the
#                 peer, its TLS is GnuTLS
#   qemu, qemu-x509 (with --qemu)
#                 `qemu-nbd -f raw` plain and with tls-creds-x509 (verify-peer)
# Jobs on every server: 4 KiB randread and randwrite at iodepth 16 over 1 and
# 4 connections, then 1 MiB sequential read and write at iodepth 4 over one
# connection. Credentials are made at run time with scripts/tls-certs.sh
# into the work dir. Each round starts a fresh server per (configuration,
# round), in rotating order (round r starts at configuration r mod N).
#
#   benches/tls.sh                 # 3 rounds, 1 GiB devices, 5 s per job
#   benches/tls.sh --quick         # 1 round, 256 MiB, 2 s (a smoke test)
#   benches/tls.sh --no-psk --qemu # X.509 only, qemu-nbd rows added
#   TLSBENCH_ROUNDS=5 SNAPMV_BIN=/tmp/old/snapmv benches/tls.sh
#
# Environment: TLSBENCH_SIZE_MIB, TLSBENCH_RUNTIME (s), TLSBENCH_ROUNDS,
# TLSBENCH_CONNS ("1 4": connection counts of the 4 KiB jobs),
# TLSBENCH_SEQ_IODEPTH (4); SNAPMV_BIN (a snapmv binary: skips the build;
# default `cargo build --release -p snapmv-nbd --bin snapmv`);
# SNAPMV_SERVE_ARGS (extra `snapmv serve` flags, every snapmv configuration);
# TLSBENCH_DIR (parent of the work dir, default /dev/shm); TLSBENCH_KEEP=1
# keeps the work dir. Prints the tables and rewrites benches/TLS.md; anything
# below the line "<!-- notes: kept by tls.sh -->" in TLS.md is kept.
# A measurement script, not a test: it asserts nothing about speed.
#
# fio's nbd engine passes the URI to libnbd's nbd_connect_uri, which refuses
# tls-certificates= and tls-psk-file= unless the program calls
# nbd_set_uri_allow_local_file (fio does not), and as root libnbd's default
# certificate directory is /etc/pki/libnbd. So fio runs with a tiny
# LD_PRELOAD shim, built here with cc, that makes that one call before
# nbd_connect_uri (plain rows too, so every row has the same client).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ME=tls.sh

QUICK=0
PSK=1
QEMU=0
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    --no-psk) PSK=0 ;;
    --qemu) QEMU=1 ;;
    -h|--help) sed -n '2,42p' "$0"; exit 0 ;;
    *) echo "$ME: unknown argument $a (try --help)" >&2; exit 2 ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  ROUNDS=${TLSBENCH_ROUNDS:-1}; RUNTIME=${TLSBENCH_RUNTIME:-2}; SIZE_MIB=${TLSBENCH_SIZE_MIB:-256}
else
  ROUNDS=${TLSBENCH_ROUNDS:-3}; RUNTIME=${TLSBENCH_RUNTIME:-5}; SIZE_MIB=${TLSBENCH_SIZE_MIB:-1024}
fi
CONNS=${TLSBENCH_CONNS:-1 4}
SEQ_IODEPTH=${TLSBENCH_SEQ_IODEPTH:-4}
for v in "$ROUNDS" "$RUNTIME" "$SIZE_MIB" "$SEQ_IODEPTH" $CONNS; do
  case "$v" in ''|*[!0-9]*|0*) echo "$ME: rounds, runtime, size, iodepth and connections must be positive integers (got '$v')" >&2; exit 2 ;; esac
done
[ -n "${CONNS// /}" ] || { echo "$ME: TLSBENCH_CONNS is empty" >&2; exit 2; }
IODEPTH=16
CHUNK=65536
CONFIGS=(snapmv snapmv-x509 nbdkit nbdkit-x509)
[ "$PSK" = 0 ] || CONFIGS+=(snapmv-psk nbdkit-psk)
[ "$QEMU" = 0 ] || CONFIGS+=(qemu qemu-x509)
NCONF=${#CONFIGS[@]}
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
[ "$QEMU" = 0 ] || command -v qemu-nbd >/dev/null || need+=(qemu-utils)
command -v nbdkit >/dev/null || need+=(nbdkit)
{ command -v nbdcopy >/dev/null && command -v nbdinfo >/dev/null; } || need+=(libnbd-bin)
{ command -v certtool >/dev/null && command -v psktool >/dev/null; } || need+=(gnutls-bin)
command -v cc >/dev/null || need+=(gcc)
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
if ! nbdkit --dump-config 2>/dev/null | grep -qx 'tls=yes'; then
  echo "$ME: this nbdkit was built without TLS" >&2; exit 1
fi
if [ -n "${SNAPMV_BIN:-}" ]; then
  [ -x "$SNAPMV_BIN" ] || { echo "$ME: SNAPMV_BIN=$SNAPMV_BIN is not executable" >&2; exit 1; }
  SNAPMV=$(cd "$(dirname "$SNAPMV_BIN")" && pwd -P)/$(basename "$SNAPMV_BIN")
else
  echo "== building snapmv (release)"
  cargo build --release -p snapmv-nbd --bin snapmv
  SNAPMV="${CARGO_TARGET_DIR:-$ROOT/target}/release/snapmv"
fi
"$SNAPMV" serve --help 2>/dev/null | grep -q -- '--tls-psk' \
  || { echo "$ME: $SNAPMV has no TLS (serve --help lists no --tls-psk)" >&2; exit 1; }
SERVE_ARGS=()
[ -z "${SNAPMV_SERVE_ARGS:-}" ] || read -r -a SERVE_ARGS <<<"$SNAPMV_SERVE_ARGS"

# ---- work dir on tmpfs -----------------------------------------------------------
# shellcheck source=benches/server_bench_lib.sh
. "$ROOT/benches/server_bench_lib.sh"
WORK=$(tmpfs_work_dir "${TLSBENCH_DIR:-/dev/shm}" snapmv-tls "$SIZE_MIB") || exit 1
BASE=$(dirname "$WORK")
FSTYPE=$(df -T "$BASE" | awk 'NR==2 { print $2 }')

cleanup() {
  stop_server
  if [ "${TLSBENCH_KEEP:-0}" = 1 ]; then echo "$ME: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A private copy of the binary, so a rebuild during the run cannot change it.
SNAPMV_SRC=$SNAPMV
SNAPMV_ID="binary ${SNAPMV_SRC/#$ROOT\//}, modified $(date -u -r "$SNAPMV_SRC" '+%Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$SNAPMV_SRC" | cut -c1-12)"
cp -p "$SNAPMV_SRC" "$WORK/snapmv"
SNAPMV=$WORK/snapmv
if top=$(git -C "$(dirname "$SNAPMV_SRC")" rev-parse --show-toplevel 2>/dev/null); then
  SNAP_REV="git $(git -C "$top" rev-parse --short HEAD)"
  [ -z "$(git -C "$top" status --porcelain -- engine nbd-frontend 2>/dev/null)" ] \
    || SNAP_REV="$SNAP_REV, engine/frontend with uncommitted changes"
  [ -z "${SNAPMV_BIN:-}" ] || SNAP_REV="$SNAP_REV: the checkout holding SNAPMV_BIN"
else
  SNAP_REV="not in a git checkout"
fi
SNAP_REV="$SNAP_REV; $SNAPMV_ID"
SCRIPT_REV="git $(git rev-parse --short HEAD)"
[ -z "$(git status --porcelain -- benches/tls.sh)" ] || SCRIPT_REV="$SCRIPT_REV, tls.sh modified"

CMDS="$WORK/commands.txt"   # the setup's and round 1's commands
RESULTS="$WORK/results.tsv" # one line per fio job
PROCS="$WORK/procs.tsv"     # one line per server process
: >"$CMDS"; : >"$RESULTS"; : >"$PROCS"
LOG_CMDS=1
# The script's reaped children's user+system CPU, in seconds (bash `times`,
# second line), into CHILD_CPU: its difference around fio is fio's own CPU,
# all threads. `times` must run in this shell (in $(...) it would report the
# subshell's children), hence the file.
children_cpu() {
  times >"$WORK/times.txt"
  CHILD_CPU=$(awk 'NR == 2 { s = 0; for (i = 1; i <= 2; i++) { split($i, a, "m"); sub(/s$/, "", a[2]); s += a[1] * 60 + a[2] } print s }' "$WORK/times.txt")
}

echo "== work dir $WORK ($FSTYPE); ${SIZE_MIB} MiB devices, ${RUNTIME} s per job, 4 KiB connections: $CONNS, $ROUNDS round(s)"
echo "== configurations: ${CONFIGS[*]}; fio --randseed=1234; every command of the setup and round 1 goes into benches/TLS.md"

# ---- credentials and the fio shim --------------------------------------------------
CERTS="$WORK/certs"
note "setup: TLS credentials (CA, server certificate for localhost/127.0.0.1/::1, client alice, PSK file)"
run scripts/tls-certs.sh "$CERTS" >/dev/null
note "setup: the LD_PRELOAD shim for fio (nbd_set_uri_allow_local_file(h, true) before nbd_connect_uri)"
cat >"$WORK/uri-shim.c" <<'C'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdbool.h>
struct nbd_handle;
/* libnbd refuses tls-certificates= and tls-psk-file= in a URI unless the
   program allows local files; fio's nbd engine does not. */
int nbd_connect_uri(struct nbd_handle *h, const char *uri)
{
  static int (*real)(struct nbd_handle *, const char *);
  int (*allow)(struct nbd_handle *, bool) =
    (int (*)(struct nbd_handle *, bool))dlsym(RTLD_NEXT, "nbd_set_uri_allow_local_file");
  if (!real)
    real = (int (*)(struct nbd_handle *, const char *))dlsym(RTLD_NEXT, "nbd_connect_uri");
  if (allow && allow(h, true) == -1)
    return -1;
  return real(h, uri);
}
C
run cc -O2 -Wall -shared -fPIC -o "$WORK/uri-shim.so" "$WORK/uri-shim.c" -ldl
SHIM="$WORK/uri-shim.so"

# ---- the pristine image, once ------------------------------------------------------
PRISTINE="$WORK/pristine.raw"
SIZE_B=$((SIZE_MIB * 1048576))
note "setup: one raw image of random bytes; every server starts from these bytes"
run dd if=/dev/urandom of="$PRISTINE" bs=1M count="$SIZE_MIB" status=none
[ "$FSTYPE" = tmpfs ] || [ "$FSTYPE" = ramfs ] || sync

# Jobs: name, fio --rw, block size, iodepth, connection count(s).
JOBS=()
for nj in $CONNS; do JOBS+=("randread randread 4k $IODEPTH $nj" "randwrite randwrite 4k $IODEPTH $nj"); done
JOBS+=("seqread read 1m $SEQ_IODEPTH 1" "seqwrite write 1m $SEQ_IODEPTH 1")

SEQ=0
fio_job() {
  local round=$1 conf=$2 name=$3 rw=$4 bs=$5 depth=$6 nj=$7 uri=$8
  SEQ=$((SEQ + 1))
  local json="$WORK/fio-$SEQ.json" c0 c1 f0 f1 t0 t1 rc=0
  echo "   round $round: $conf / $name / $nj connection(s)"
  c0=$(cpu_ticks "$SERVER_PID"); children_cpu; f0=$CHILD_CPU; t0=$(date +%s.%N)
  run env LD_PRELOAD="$SHIM" fio --name="$name" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" \
    --iodepth="$depth" --numjobs="$nj" --group_reporting --size="${SIZE_MIB}M" \
    --norandommap --randseed=1234 --time_based --runtime="$RUNTIME" \
    --output-format=json --output="$json" || rc=$?
  t1=$(date +%s.%N); children_cpu; f1=$CHILD_CPU; c1=$(cpu_ticks "$SERVER_PID")
  [ "$rc" = 0 ] || { echo "$ME: fio failed ($rc) on $conf / $name / $nj" >&2; tail -5 "$WORK/server.log" >&2 || true; exit 1; }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$SEQ" "$conf" "$name" "$nj" "$bs" "$json" \
    "$(awk -v a="$c0" -v b="$c1" -v t="$TCK" 'BEGIN { print (b - a) / t }')" \
    "$(awk -v a="$f0" -v b="$f1" 'BEGIN { print b - a }')" \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" \
    "$(vm_hwm_kib "$SERVER_PID")" >>"$RESULTS"
}

# One configuration's run: a fresh server holding the pristine bytes, every
# job on it, then stop it.
one_server() {
  local round=$1 conf=$2 port uri D="$WORK/run" server=${2%%-*} tls=plain
  case "$conf" in *-x509) tls=x509 ;; *-psk) tls=psk ;; esac
  rm -rf "$D"; mkdir -p "$D"
  : >"$WORK/server.log"
  port=$(free_port)
  case "$tls" in
    plain) uri="nbd://127.0.0.1:$port/vol" ;;
    x509) uri="nbds://127.0.0.1:$port/vol?tls-certificates=$CERTS/alice" ;;
    # libnbd 1.14 takes the PSK username from the URI's user part only.
    psk) uri="nbds://alice@127.0.0.1:$port/vol?tls-psk-file=$CERTS/psk/keys.psk" ;;
  esac
  local -a stls=() ktls=() qtls=()
  case "$tls" in
    x509)
      stls=(--tls require --tls-dir "$CERTS/server")
      ktls=(--tls=require --tls-certificates="$CERTS/server" --tls-verify-peer)
      qtls=(--object "tls-creds-x509,id=tls0,dir=$CERTS/server,endpoint=server,verify-peer=on" --tls-creds tls0) ;;
    psk)
      stls=(--tls require --tls-psk "$CERTS/psk/keys.psk")
      ktls=(--tls=require --tls-psk="$CERTS/psk/keys.psk") ;;
  esac
  echo "== round $round: $conf"
  case "$server" in
    snapmv)
      note "$conf: a copy of the image as the origin, a fresh COW device (64 KiB chunks), no snapshot"
      run cp "$PRISTINE" "$D/origin.img"
      run truncate -s "$((SIZE_MIB * 2 + 256))M" "$D/cow.img"
      run "$SNAPMV" format "$D/cow.img" --chunk-size "$CHUNK" >/dev/null
      run "$SNAPMV" bind "$D/cow.img" "$D/origin.img" --id vol >/dev/null
      start_server "$WORK/server.log" "$SNAPMV" serve "$D/cow.img" --listen "127.0.0.1:$port" \
        "${stls[@]}" "${SERVE_ARGS[@]}"
      wait_ready "$port"
      ;;
    nbdkit)
      note "$conf: a memory disk, filled with the image's bytes through NBD (untimed)"
      start_server "$WORK/server.log" nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$port" -e vol \
        "${ktls[@]}" memory "${SIZE_MIB}M"
      wait_ready "$port"
      run nbdcopy "$PRISTINE" "$uri"
      ;;
    qemu)
      note "$conf: a copy of the image, served raw"
      run cp "$PRISTINE" "$D/vol.raw"
      start_server "$WORK/server.log" qemu-nbd -f raw -t -b 127.0.0.1 -p "$port" -x vol -e 16 \
        --cache=writeback --aio=threads "${qtls[@]}" "$D/vol.raw"
      wait_ready "$port"
      ;;
  esac
  local got; got=$(run nbdinfo --size "$uri")
  [ "$got" = "$SIZE_B" ] || { echo "$ME: $conf exports $got bytes, expected $SIZE_B" >&2; exit 1; }
  if [ "$tls" != plain ]; then
    # A TLS server must refuse a plain client: the row really is TLS.
    if nbdinfo --size "nbd://127.0.0.1:$port/vol" >/dev/null 2>&1; then
      echo "$ME: $conf answered a plain-text client: not a TLS row" >&2; exit 1
    fi
  fi
  [ "$FSTYPE" = tmpfs ] || [ "$FSTYPE" = ramfs ] || sync
  local j peak_hwm
  for j in "${JOBS[@]}"; do
    # shellcheck disable=SC2086
    fio_job "$round" "$conf" $j "$uri"
  done
  peak_hwm=$(vm_hwm_kib "$SERVER_PID")
  stop_server
  printf '%s\t%s\t%s\t%s\n' "$round" "$conf" "$peak_hwm" "$SERVER_RC" >>"$PROCS"
  if [ "$SERVER_RC" != 0 ]; then
    echo "$ME: warning: $conf exited with status $SERVER_RC after SIGTERM; log tail:" >&2
    tail -5 "$WORK/server.log" >&2 || true
  fi
  cp "$WORK/server.log" "$WORK/server-$round-$conf.log"
  rm -rf "$D"
}

for ((r = 0; r < ROUNDS; r++)); do
  order=("${CONFIGS[@]:r % NCONF}" "${CONFIGS[@]:0:r % NCONF}")
  for c in "${order[@]}"; do
    one_server "$((r + 1))" "$c"
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
CONFIGS_S="${CONFIGS[*]}"
export RESULTS PROCS CONNS CONFIGS_S
TABLES=$(python3 - <<'PY'
import csv, json, os, statistics as st

rows = list(csv.reader(open(os.environ["RESULTS"]), delimiter="\t"))
procs = list(csv.reader(open(os.environ["PROCS"]), delimiter="\t"))
conns = [int(c) for c in os.environ["CONNS"].split()]
configs = os.environ["CONFIGS_S"].split()
servers = [s for s in ("snapmv", "nbdkit", "qemu") if s in configs]
modes = [m for m in ("x509", "psk") if any(c.endswith("-" + m) for c in configs)]
NAMES = {"snapmv": "snapmv", "nbdkit": "nbdkit memory", "qemu": "qemu-nbd raw"}
MODE_NAMES = {"plain": "plain", "x509": "X.509", "psk": "PSK"}
def cname(c):
    s, _, m = c.partition("-")
    return NAMES[s] + " " + MODE_NAMES[m or "plain"]

runs = []
for rnd, seq, conf, name, nj, bs, path, cpu, ccpu, wall, hwm in rows:
    j = json.load(open(path))["jobs"][0]
    d = j["read"] if "read" in name else j["write"]
    pct = d["clat_ns"].get("percentile", {})
    runs.append(dict(round=int(rnd), seq=int(seq), conf=conf, w=name, nj=int(nj), bs=bs,
                     iops=d["iops"], mibs=d["bw_bytes"] / 1048576, ios=d["total_ios"],
                     p99=pct.get("99.000000", 0) / 1e6, cpu=float(cpu), ccpu=float(ccpu),
                     wall=float(wall), hwm=int(hwm or 0), err=j.get("error", 0)))
rounds = sorted({r["round"] for r in runs})
many = len(rounds) > 1
cells = [("randread", nj) for nj in conns] + [("randwrite", nj) for nj in conns] \
    + [("seqread", 1), ("seqwrite", 1)]
LABEL = {"randread": "4 KiB randread", "randwrite": "4 KiB randwrite",
         "seqread": "1 MiB seq read", "seqwrite": "1 MiB seq write"}
def metric(w):
    return "mibs" if w.startswith("seq") else "iops"
def get(conf, w, nj, rn=None):
    return [r for r in runs if r["conf"] == conf and r["w"] == w and r["nj"] == nj
            and (rn is None or r["round"] == rn)]
def med(xs):
    return st.median(xs) if xs else float("nan")
def val(conf, w, nj, rn):
    return get(conf, w, nj, rn)[0][metric(w)]
def per_round(a, b, w, nj):
    out = []
    for rn in rounds:
        try:
            out.append(val(a, w, nj, rn) / val(b, w, nj, rn))
        except (IndexError, ZeroDivisionError):
            pass
    return out
def rng(xs, fmt):
    if not xs:
        return "n/a"
    m = fmt(med(xs))
    return m if len(xs) == 1 else f"{m} ({fmt(min(xs))}–{fmt(max(xs))})"
def ratio_cell(per):
    if not per:
        return "n/a"
    return f"{med(per):.2f}x" + (" [" + ", ".join(f"{x:.2f}" for x in per) + "]" if many else "")
i0 = lambda x: f"{x:,.0f}"

cols = [c for s in servers for c in [s] + [f"{s}-{m}" for m in modes] if c in configs]
print(f"Throughput, {'median (min–max) over ' + str(len(rounds)) + ' rounds' if many else 'one round'}: "
      "IOPS for the 4 KiB rows (iodepth 16 per connection), MiB/s for the 1 MiB rows "
      "(one connection, iodepth as in the setup):")
print()
print("| workload | conns | unit | " + " | ".join(cname(c) for c in cols) + " |")
print("|---|---:|---|" + "---:|" * len(cols))
for w, nj in cells:
    unit = "MiB/s" if metric(w) == "mibs" else "IOPS"
    print(f"| {LABEL[w]} | {nj} | {unit} | "
          + " | ".join(rng([r[metric(w)] for r in get(c, w, nj)], i0) for c in cols) + " |")
print()
print("TLS / plain: median of the per-round ratios (each round's TLS throughput over the same "
      "round's plain throughput of the same server)" + (", per-round values in brackets" if many else "") + ":")
print()
pairs = [(f"{s}-{m}", s) for s in servers for m in modes if f"{s}-{m}" in configs]
print("| workload | conns | " + " | ".join(f"{cname(a)} / plain" for a, _ in pairs) + " |")
print("|---|---:|" + "---:|" * len(pairs))
ratios = {}
for w, nj in cells:
    row = []
    for a, b in pairs:
        per = per_round(a, b, w, nj)
        ratios[(a, w, nj)] = per
        row.append(ratio_cell(per))
    print(f"| {LABEL[w]} | {nj} | " + " | ".join(row) + " |")
print()
if "nbdkit" in servers:
    snap_cols = [c for c in ["snapmv"] + [f"snapmv-{m}" for m in modes] if c in configs]
    print("snapmv / nbdkit memory, same mode: median of the per-round ratios:")
    print()
    print("| workload | conns | " + " | ".join(MODE_NAMES[(c.partition('-')[2] or 'plain')] for c in snap_cols) + " |")
    print("|---|---:|" + "---:|" * len(snap_cols))
    for w, nj in cells:
        print(f"| {LABEL[w]} | {nj} | " + " | ".join(
            ratio_cell(per_round(c, "nbdkit" + c[len("snapmv"):], w, nj)) for c in snap_cols) + " |")
    print()
def verdict(per, target):
    if not per:
        return "n/a"
    m = med(per)
    return ("met" if m >= target else "not met") + f" ({m:.2f}x)"
print("Issue 14 aim (1 MiB sequential throughput over TLS >= 0.5x plain), on the medians of the "
      "per-round ratios, in this run (reported, not asserted):")
print()
for m in modes:
    for w in ("seqread", "seqwrite"):
        print(f"- snapmv {MODE_NAMES[m]}, {LABEL[w]}: " + verdict(ratios.get((f"snapmv-{m}", w, 1), []), 0.5))
print()
print("Costs, medians over rounds: p99 completion latency (fio clat), server CPU (user+system, all "
      "threads, /proc) and client CPU (fio's, all threads, from the shell's children times) per I/O:")
print()
print("| workload | conns | configuration | p99 lat (ms) | server CPU (µs / I/O) | client CPU (µs / I/O) |")
print("|---|---:|---|---:|---:|---:|")
for w, nj in cells:
    for c in cols:
        rs = get(c, w, nj)
        if not rs:
            continue
        print(f"| {LABEL[w]} | {nj} | {cname(c)} | {med([r['p99'] for r in rs]):.3f} | "
              f"{med([r['cpu'] / r['ios'] * 1e6 for r in rs if r['ios']]):.1f} | "
              f"{med([r['ccpu'] / r['ios'] * 1e6 for r in rs if r['ios']]):.1f} |")
print()
print("Per server process (a fresh one per configuration and round): peak RSS (VmHWM just before "
      "the SIGTERM; nbdkit's includes its memory disk), exit status after SIGTERM:")
print()
print("| round | configuration | peak RSS (MiB) | exit status |")
print("|---:|---|---:|---:|")
for rnd, conf, hwm, rc in procs:
    print(f"| {rnd} | {cname(conf)} | {int(hwm or 0) / 1024:,.1f} | {rc} |")
print()
print("Every job:")
print()
print("| round | # | configuration | workload | conns | IOPS | MiB/s | I/Os | p99 lat (ms) | "
      "server CPU (s) | client CPU (s) | wall (s) |")
print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in sorted(runs, key=lambda r: r["seq"]):
    print(f"| {r['round']} | {r['seq']} | {cname(r['conf'])} | {LABEL[r['w']]} | {r['nj']} | "
          f"{r['iops']:,.0f} | {r['mibs']:,.1f} | {r['ios']:,} | {r['p99']:.3f} | {r['cpu']:.2f} | "
          f"{r['ccpu']:.2f} | {r['wall']:.2f} |")
bad = [r for r in runs if r["err"] or not r["ios"]]
if bad:
    print()
    for r in bad:
        print(f"- job {r['seq']} ({r['conf']} {r['w']} {r['nj']}): fio error {r['err']}, {r['ios']} I/Os")
PY
)
echo
echo "$TABLES"
echo
echo "$ME: done in ${ELAPSED} s"

MD="$ROOT/benches/TLS.md"
MARK='<!-- notes: kept by tls.sh -->'
KEEP="$MARK"
if [ -f "$MD" ] && grep -qxF "$MARK" "$MD"; then
  KEEP=$(sed -n "\\|^$MARK\$|,\$p" "$MD")
fi
QEMU_VER=""
[ "$QEMU" = 0 ] || QEMU_VER=$'\n'"- $(qemu-nbd --version | head -1)"
{
  cat <<EOF
# NBD over TLS, the cost (issue 14): plain vs TLS, snapmv and nbdkit memory$([ "$QEMU" = 0 ] || echo " and qemu-nbd raw")

Written by \`benches/tls.sh\` ($MODE mode: $ROUNDS round(s), ${SIZE_MIB} MiB devices, ${RUNTIME} s
per job, 4 KiB connections: $CONNS; configurations: ${CONFIGS[*]}) on $(date -u '+%Y-%m-%d %H:%M UTC');
the script ($SCRIPT_REV) took ${ELAPSED} s. Numbers are what this one run measured on this
machine, not a claim about any other.
$QUICK_BANNER
## Machine

- $(nproc) cores ($(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(free -g | awk '/^Mem:/ { print $2 }') GiB RAM; kernel $(uname -r)
- CPU flags for TLS ciphers: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'aes|pclmulqdq|avx2|sha_ni|vaes|vpclmulqdq' | tr '\n' ' ')
- work dir on $FSTYPE ($BASE)
- load average at start: $LOAD_START, at the end: $LOAD_END (the benchmark's own load counts in the latter)
- other processes using >= 10 % CPU (ps, averaged over their lifetime) at the start:
  ${BUSY_START:-none}; at the end: ${BUSY_END:-none}

## Versions

- snapmv: $("$SNAPMV" --version) ($SNAP_REV)$([ ${#SERVE_ARGS[@]} = 0 ] || echo "; serve flags: ${SERVE_ARGS[*]}"); TLS: rustls (X.509), OpenSSL (PSK)
- $(nbdkit --version | head -1); $(nbdkit --dump-config | grep -m1 '^tls=' || true) (GnuTLS)$QEMU_VER
- fio: $(fio --version); $(nbdcopy --version | tail -1) (fio's nbd engine, nbdcopy and nbdinfo use libnbd, with GnuTLS)
- $(certtool --version | head -1)

## Setup

- Client, the same for every configuration: fio \`--ioengine=nbd --uri=URI --time_based
  --runtime=$RUNTIME --group_reporting --norandommap --randseed=1234 --size=${SIZE_MIB}M\`, with
  \`--rw=randread|randwrite --bs=4k --iodepth=$IODEPTH --numjobs=N\` (N = $CONNS: one NBD
  connection per fio job), then \`--rw=read|write --bs=1m --iodepth=$SEQ_IODEPTH --numjobs=1\`.
  Over loopback TCP; fio sends no FLUSH.
- URIs: plain \`nbd://127.0.0.1:PORT/vol\`; X.509 \`nbds://127.0.0.1:PORT/vol?tls-certificates=CERTS/alice\`
  (client certificate CN alice, server certificate checked against the CA and 127.0.0.1);
  PSK \`nbds://alice@127.0.0.1:PORT/vol?tls-psk-file=CERTS/psk/keys.psk\` (libnbd 1.14
  takes the PSK username from the URI's user part only).
- fio runs with an LD_PRELOAD shim (built by the script, source in the commands below)
  that calls libnbd's \`nbd_set_uri_allow_local_file(h, true)\` before \`nbd_connect_uri\`:
  fio's nbd engine does not, and libnbd then refuses \`tls-certificates=\` and
  \`tls-psk-file=\`. Plain rows run with the same shim.
- Credentials: \`scripts/tls-certs.sh\` at the start of the run (RSA 2048 keys; CA, server
  certificate for localhost, 127.0.0.1 and ::1, client alice, psktool file).
- TLS servers: **snapmv** \`--tls require --tls-dir CERTS/server\` (client certificates
  required, verified against the CA) or \`--tls require --tls-psk CERTS/psk/keys.psk\`;
  **nbdkit** \`--tls=require --tls-certificates=CERTS/server --tls-verify-peer\` or
  \`--tls=require --tls-psk=CERTS/psk/keys.psk\`$([ "$QEMU" = 0 ] || echo ";
  **qemu-nbd** \`--object tls-creds-x509,id=tls0,dir=CERTS/server,endpoint=server,verify-peer=on --tls-creds tls0\`").
  Before its jobs, each TLS server is checked to refuse a plain client (\`nbdinfo nbd://...\`).
  The cipher suite is whatever the client (GnuTLS) and server negotiate by default.
- Data: one raw image of random bytes (dd from /dev/urandom, once); $([ "$QEMU" = 0 ] && echo "snapmv's origin is a copy" || echo "snapmv's origin and qemu-nbd's file are copies") of it, and nbdkit's memory disk is filled from it with \`nbdcopy\` through NBD
  (over TLS for the TLS configurations; untimed). \`nbdinfo --size\` checks each export.
- **snapmv**: \`snapmv serve\` (defaults$([ ${#SERVE_ARGS[@]} = 0 ] || echo " plus ${SERVE_ARGS[*]}")) on a fresh COW device (sparse,
  2x the device + 256 MiB, 64 KiB chunks) bound to the origin copy, export \`vol\` (the
  origin). No snapshot: every read and write goes to the origin in place. snapmv's TLS is a
  per-connection pump between the client's socket and a Unix socket pair in front of the
  unchanged transmission path.
- **nbdkit memory**: \`nbdkit memory ${SIZE_MIB}M\` (default thread model): no file, no engine.
- Rounds: round r (r = 0, 1, ...) starts at configuration r mod $NCONF of (${CONFIGS[*]}).
  Each (configuration, round) gets a fresh server process on fresh data, which then serves
  every job in the order above.
- Measures, per job: throughput from fio's json (IOPS, bw_bytes); p99 = fio's completion
  latency 99th percentile; server CPU = utime+stime of the server process (/proc/PID/stat,
  all threads) from just before fio starts to just after it exits; client CPU = fio's
  user+system time (the shell's \`times\` for reaped children, before and after fio),
  both over the I/Os fio completed; peak RSS = VmHWM.

## Results

$TABLES

## Exact commands (setup and round 1)

\`\$W\` is the run's work dir (removed on exit); \`\$W/snapmv\` is a copy of the snapmv binary above;
\`\$W/certs\` holds the credentials. Servers ran in the background (\`&\`), were waited for with a
TCP connect probe, and stopped with SIGTERM and \`wait\`. fio ran with \`LD_PRELOAD=\$W/uri-shim.so\`.

\`\`\`
$(cat "$CMDS")
\`\`\`

The shim (\`\$W/uri-shim.c\`):

\`\`\`c
$(cat "$WORK/uri-shim.c")
\`\`\`

## Caveats

- Loopback TCP on $(nproc) shared cores: fio (libnbd and its GnuTLS), the server (and its
  TLS) and the kernel's TCP stack compete for the same CPUs. Over TLS each byte is encrypted
  and decrypted once on each side, so on this machine the client's TLS work takes CPU
  from the server and the other way round; across a real network the two sides have their
  own CPUs. The TLS/plain ratios here are therefore a pessimistic, CPU-bound view of the
  overhead. Other work on the machine (see the load averages above) shows up as noise.
- Everything is on tmpfs (unless the machine section says otherwise): no disk, no writeback.
- Each fio job reconnects: the server CPU window includes one TLS handshake per connection
  (RSA 2048), negligible against ${RUNTIME} s of I/O.
- The TCP connect probe that waits for a server to listen is a failed TLS handshake for
  the TLS servers; nbdkit logs it (and fio's unannounced disconnects) as errors. Harmless.
- nbdkit's RSS includes its ${SIZE_MIB} MiB memory disk; snapmv's files are in tmpfs pages,
  which are not in its RSS.
- $NOISE

$KEEP
EOF
} >"$MD"
echo "wrote $MD"
