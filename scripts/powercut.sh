#!/usr/bin/env bash
# Power cuts of the real `snapmv serve` (scripts/powercut/README.md).
#
#   scripts/powercut.sh [--cuts N] [--seed S] [--keep] [-- campaign options]
#
# N cuts (default 10), cut k with seed S+k (S random unless given; printed).
# Each cut runs snapmv serve on a COW file and an origin file that sit on a
# disk losing every unflushed write at the cut (nbdkit's write-back cache
# behind nbdfuse), writes with FLUSH and FUA from 6 connections with
# snapshots taken and deleted live and the cleaner busy, SIGKILLs everything
# at a random instant, recovers, and checks every sector of every version
# against the NBD reply rule, plus `snapmv check` before and after a serve.
# Replay one cut: scripts/powercut.sh --cuts 1 --seed SEED (the schedule is
# seeded; thread timing is not, so a replay is the same test, not the same
# interleaving).
#
# Environment: SNAPMV_BIN (default: cargo build --profile test, then
# target/debug/snapmv), SNAPMV_POWERCUT_DIR (work dir; default a new
# /tmp/snapmv-powercut.XXXXXX, removed when every cut passed, kept with the
# failing cuts' images and logs otherwise), SNAPMV_CI=1 (a missing nbdkit,
# nbdfuse, FUSE or python3-libnbd fails instead of skipping).
set -euo pipefail
cd "$(dirname "$0")/.."

cuts=10
seed=""
keep=""
extra=()
while (($#)); do
  case "$1" in
    --cuts) cuts="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --keep) keep="--keep"; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "powercut: unknown argument $1" >&2; exit 2 ;;
  esac
done

py=/usr/bin/python3 # Debian's python3-libnbd lives in Debian's python
export PYTHONDONTWRITEBYTECODE=1
missing=()
command -v nbdkit >/dev/null || missing+=(nbdkit)
command -v nbdfuse >/dev/null || missing+=("nbdfuse (libnbd-bin)")
command -v fusermount3 >/dev/null || missing+=("fusermount3 (fuse3)")
[ -c /dev/fuse ] || missing+=(/dev/fuse)
{ [ -x "$py" ] && "$py" -c 'import nbd' 2>/dev/null; } || missing+=("python3-libnbd for $py")
if ((${#missing[@]})); then
  if [ "${SNAPMV_CI:-0}" = 1 ]; then
    echo "powercut: FAIL: missing ${missing[*]} (required under SNAPMV_CI=1; scripts/setup.sh installs them)" >&2
    exit 1
  fi
  echo "powercut: SKIPPED: missing ${missing[*]} (scripts/setup.sh installs them)"
  exit 0
fi

bin="${SNAPMV_BIN:-}"
if [ -z "$bin" ]; then
  cargo build -q --profile test --bin snapmv
  bin="$PWD/target/debug/snapmv"
fi
bin="$(realpath "$bin")"

if [ -n "${SNAPMV_POWERCUT_DIR:-}" ]; then
  work="$SNAPMV_POWERCUT_DIR"
  mkdir -p "$work"
else
  work="$(mktemp -d /tmp/snapmv-powercut.XXXXXX)"
fi
work="$(realpath "$work")"

# Whatever happens, leave no process or mount behind: the Python side cleans
# up after itself; this covers it being killed. Only processes it recorded
# (pid plus start time, so a recycled pid is never hit) are killed.
pypid=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$pypid" ] && kill -0 "$pypid" 2>/dev/null; then
    kill -TERM "$pypid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pypid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pypid" 2>/dev/null || true
  fi
  if [ -f "$work/pids" ]; then
    while read -r pid start; do
      if [ -r "/proc/$pid/stat" ] &&
        [ "$(sed 's/.*) //' "/proc/$pid/stat" | cut -d' ' -f20)" = "$start" ]; then
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done <"$work/pids"
    rm -f "$work/pids"
  fi
  if [ -f "$work/mounts" ]; then
    while read -r m; do
      if grep -q " $m fuse" /proc/self/mounts; then
        fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
      fi
    done <"$work/mounts"
    rm -f "$work/mounts"
  fi
  if [ "$rc" = 0 ] && [ -z "$keep" ] && [ -z "${SNAPMV_POWERCUT_DIR:-}" ]; then
    rm -rf "$work"
  elif [ "$rc" != 0 ]; then
    echo "powercut: work dir kept: $work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$py" scripts/powercut/test_check.py
"$py" scripts/powercut/selftest.py "$work" &
pypid=$!
wait "$pypid"
pypid=""

args=(--cuts "$cuts" --bin "$bin" --workdir "$work" $keep)
[ -n "$seed" ] && args+=(--seed "$seed")
"$py" scripts/powercut/campaign.py "${args[@]}" "${extra[@]}" &
pypid=$!
wait "$pypid"
