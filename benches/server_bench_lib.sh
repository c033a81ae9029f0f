# Helpers the NBD server benchmarks share (frontend.sh, tls.sh). Sourced
# once ME (the script's name, for messages) is set; the command helpers use
# WORK (the work dir: recorded commands show it as $W) and CMDS (the file
# recording the setup's and round 1's commands) when called. LOG_CMDS=1
# records, 0 does not.
# shellcheck shell=bash
LOG_CMDS=${LOG_CMDS:-1}

# tmpfs_work_dir BASE PREFIX SIZE_MIB: make and print a fresh work dir
# under BASE, for devices of SIZE_MIB. Warns when BASE is not tmpfs (the
# disk would show in the numbers); fails when BASE or RAM lacks room for
# a pristine image, one copy and a memory disk.
tmpfs_work_dir() {
  local base=$1 prefix=$2 size=$3 fstype avail memavail
  mkdir -p "$base"
  base=$(cd "$base" && pwd -P)
  fstype=$(df -T "$base" | awk 'NR==2 { print $2 }')
  case "$fstype" in
    tmpfs|ramfs) ;;
    *) echo "$ME: warning: $base is on $fstype, not tmpfs: the disk may show in the numbers" >&2 ;;
  esac
  avail=$(df -Pm "$base" | awk 'NR==2 { print $4 }')
  memavail=$(awk '/^MemAvailable:/ { print int($2 / 1024) }' /proc/meminfo)
  if [ "$avail" -lt $((size * 2 + 256)) ] || [ "$memavail" -lt $((size * 3 + 512)) ]; then
    echo "$ME: not enough room: $base has ${avail} MiB free (need ~$((size * 2 + 256))), \
${memavail} MiB RAM available (need ~$((size * 3 + 512)))" >&2
    return 1
  fi
  mktemp -d "$base/$prefix.XXXXXX"
}

# Record a command (with $WORK shown as $W) and run it.
run() {
  if [ "$LOG_CMDS" = 1 ]; then
    local q; q=$(printf '%q ' "$@"); q=${q% }; echo "${q//$WORK/\$W}" >>"$CMDS"
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
    local q; q=$(printf '%q ' "$@"); q=${q% }; echo "${q//$WORK/\$W} &" >>"$CMDS"
  fi
  "$@" >>"$log" 2>&1 &
  SERVER_PID=$!
}
# Wait until the server accepts a TCP connection on PORT: a connect probe
# retried with a short back-off (5 ms doubling to 100 ms); fails if the
# server exits or after 60 s.
wait_ready() {
  python3 - "$1" "$SERVER_PID" <<'PY' || { echo "$ME: server not ready on port $1" >&2; return 1; }
import socket, sys, time
port, pid = int(sys.argv[1]), sys.argv[2]
delay, deadline = 0.005, time.monotonic() + 60
def alive():
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
while time.monotonic() < deadline:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
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
# utime+stime of the whole server process (live and exited threads).
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
vm_hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

SERVER_PID=""
SERVER_RC=0
# Stop the server: SIGTERM, then wait for it. The guard only keeps a hung
# server from hanging the script.
stop_server() {
  SERVER_RC=0
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  # The guard's sleep must not outlive it (nor hold the script's stdout open).
  local pid=$SERVER_PID
  ( trap 'kill "$s" 2>/dev/null; exit 0' TERM
    exec >/dev/null 2>&1
    sleep 60 & s=$!
    wait "$s"
    kill -KILL "$pid" ) &
  local guard=$!
  wait "$SERVER_PID" || SERVER_RC=$?
  kill "$guard" 2>/dev/null || true
  wait "$guard" 2>/dev/null || true
  SERVER_PID=""
}
