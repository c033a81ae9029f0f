#!/usr/bin/env bash
# Incremental backup of a snapmv origin over NBD, from metadata alone.
#
#   incremental-backup.sh full   BASE ID TAG BACKUP
#       Full copy of ID@TAG into the file BACKUP (nbdcopy).
#   incremental-backup.sh incr   BASE ID FROM TO BACKUP [CHUNK_SIZE]
#       BACKUP holds ID@FROM; bring it to ID@TO by copying only the extents
#       `nbdinfo --map=snapmv:changed-since:FROM BASE/ID@TO` marks changed,
#       then check it equals ID@TO byte for byte (cmp against an nbdcopy).
#       Prints the bytes moved and the changed chunks x CHUNK_SIZE (default
#       65536, snapmv's default chunk size).
#   incremental-backup.sh demo   [SIZE]
#       The whole story on a throw-away store: an ext4 filesystem (SIZE,
#       default 256M) as the origin, served live by snapmv; files written
#       through the server (nbdfuse + debugfs -w), snapshot 1, full backup,
#       more writes, snapshot 2, incremental backup, verification.
#
# BASE is an NBD URI prefix without the export: nbd://HOST:PORT, or
# nbd+unix:// with SOCKET in $NBD_SOCKET (the script appends
# ?socket=SOCKET). Needs libnbd's nbdinfo, nbdcopy and nbdsh; the demo
# also needs mkfs.ext4, debugfs, e2fsck, nbdfuse and fusermount3, and
# $SNAPMV (default: snapmv on PATH).
#
# Exit status: 0 when the backup equals the new version and the bytes
# moved are within the changed chunks' bound; 1 otherwise.
set -euo pipefail

die() { echo "incremental-backup: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is required"; }

uri() { # BASE EXPORT
    if [[ -n "${NBD_SOCKET:-}" ]]; then
        echo "nbd+unix:///$2?socket=$NBD_SOCKET"
    else
        echo "$1/$2"
    fi
}

full() { # BASE ID TAG BACKUP
    need nbdcopy
    nbdcopy "$(uri "$1" "$2@$3")" "$4"
}

# The changed extents of ID@TO against FROM, "offset length" a line.
changed_extents() { # BASE ID FROM TO
    need nbdinfo
    nbdinfo --map="snapmv:changed-since:$3" --json "$(uri "$1" "$2@$4")" |
        python3 -c '
import json, sys
for e in json.load(sys.stdin):
    if e["type"] & 1:
        print(e["offset"], e["length"])
'
}

incr() { # BASE ID FROM TO BACKUP [CHUNK]
    local base=$1 id=$2 from=$3 to=$4 backup=$5 chunk=${6:-65536}
    need nbdsh; need nbdcopy; need cmp
    [[ -f "$backup" ]] || die "$backup: no full backup of $id@$from (run: $0 full ...)"
    local ext; ext=$(mktemp)
    local t0 t1; t0=$(date +%s.%N)
    changed_extents "$base" "$id" "$from" "$to" >"$ext"
    # Copy each changed extent from ID@TO into the backup at its offset,
    # over one connection, in pieces of at most 32 MiB.
    local moved
    # (nbdsh is Python: /usr/bin first, where python3-libnbd lives.)
    moved=$(EXTENTS="$ext" BACKUP="$backup" PATH="/usr/bin:$PATH" nbdsh -u "$(uri "$base" "$id@$to")" -c '
import os
fd = os.open(os.environ["BACKUP"], os.O_WRONLY)
moved = 0
for line in open(os.environ["EXTENTS"]):
    off, n = map(int, line.split())
    while n > 0:
        k = min(n, 32 << 20)
        buf = h.pread(k, off)
        os.pwrite(fd, buf, off)
        moved += k
        off += k
        n -= k
os.fsync(fd)
os.close(fd)
print(moved)
')
    t1=$(date +%s.%N)
    local extents chunks bound
    extents=$(wc -l <"$ext")
    # Chunks the extents touch (they are chunk-aligned except at the end
    # of the device): the bound on what an exact diff may move.
    chunks=$(awk -v c="$chunk" '{ n += int(($1 + $2 + c - 1) / c) - int($1 / c) } END { print n + 0 }' "$ext")
    bound=$((chunks * chunk))
    rm -f "$ext"
    # Verify: the backup equals ID@TO byte for byte.
    local check; check=$(mktemp)
    nbdcopy "$(uri "$base" "$id@$to")" "$check"
    local same=yes
    cmp -s "$backup" "$check" || same=no
    rm -f "$check"
    printf 'incremental %s@%s -> %s@%s: %d extents, %d changed chunks x %d = %d bytes bound, %d bytes moved in %.3f s; backup equals %s@%s: %s\n' \
        "$id" "$from" "$id" "$to" "$extents" "$chunks" "$chunk" "$bound" "$moved" \
        "$(echo "$t1 - $t0" | bc)" "$id" "$to" "$same"
    echo "MOVED=$moved BOUND=$bound SAME=$same"
    [[ $same == yes && $moved -le $bound ]]
}

# Write files into the ext4 filesystem on the live origin: nbdfuse shows
# the export as a file, debugfs -w edits the filesystem in it. Every write
# goes through the server, so snapshots see them copy-on-write.
fs_edit() { # SOCKET EXPORT DIR REQUESTS...
    local sock=$1 export=$2 dir=$3; shift 3
    local mnt="$dir/fuse"
    mkdir -p "$mnt"
    nbdfuse -P "$dir/nbdfuse.pid" "$mnt/disk" --unix "$sock" >/dev/null 2>&1 &
    local fpid=$!
    for _ in $(seq 100); do [[ -s "$dir/nbdfuse.pid" ]] && break; sleep 0.1; done
    [[ -s "$dir/nbdfuse.pid" ]] || die "nbdfuse did not start"
    local req
    for req in "$@"; do
        debugfs -w -R "$req" "$mnt/disk" >/dev/null 2>&1 || die "debugfs: $req"
    done
    sync "$mnt/disk" 2>/dev/null || true
    fusermount3 -u "$mnt"
    wait "$fpid" 2>/dev/null || true
    rm -f "$dir/nbdfuse.pid"
    : "$export"
}

demo() { # [SIZE]
    local size=${1:-256M}
    local snapmv=${SNAPMV:-snapmv}
    for t in mkfs.ext4 debugfs e2fsck nbdfuse fusermount3 nbdinfo nbdcopy nbdsh python3 bc; do need "$t"; done
    command -v "$snapmv" >/dev/null 2>&1 || die "snapmv not found (set SNAPMV)"
    local dir; dir=$(mktemp -d "${TMPDIR:-/tmp}/snapmv-backup-demo.XXXXXX")
    spid=""
    # shellcheck disable=SC2064
    trap "[[ -z \"\${spid:-}\" ]] || kill \$spid 2>/dev/null || true; fusermount3 -u '$dir/fuse' 2>/dev/null || true; rm -rf '$dir'" EXIT
    echo "demo in $dir"
    truncate -s "$size" "$dir/origin.img"
    mkfs.ext4 -q -F -E nodiscard "$dir/origin.img"
    truncate -s 1G "$dir/cow.img"
    "$snapmv" format "$dir/cow.img" >/dev/null
    "$snapmv" bind "$dir/cow.img" "$dir/origin.img" --id demo >/dev/null
    local sock="$dir/nbd.sock"
    "$snapmv" serve "$dir/cow.img" --unix "$sock" >"$dir/serve.log" 2>&1 &
    spid=$!
    for _ in $(seq 100); do [[ -S "$sock" ]] && break; sleep 0.1; done
    [[ -S "$sock" ]] || die "server did not start: $(cat "$dir/serve.log")"
    export NBD_SOCKET=$sock
    local base="nbd+unix://"

    # Files, snapshot 1, full backup.
    head -c 8M /dev/urandom >"$dir/a"; head -c 3M /dev/urandom >"$dir/b"
    seq 1 200000 >"$dir/c"
    fs_edit "$sock" demo "$dir" "write $dir/a a.bin" "write $dir/b b.bin" "mkdir docs" "write $dir/c docs/numbers.txt"
    local s1; s1=$("$snapmv" snapshot "$dir/cow.img" demo -m "before" | tail -1)
    full "$base" demo "$s1" "$dir/backup.img"
    echo "full backup of demo@$s1: $(stat -c %s "$dir/backup.img") bytes"

    # More writes: a new file, a changed one, a removed one; snapshot 2.
    head -c 2M /dev/urandom >"$dir/d"; head -c 1M /dev/urandom >"$dir/b2"
    fs_edit "$sock" demo "$dir" "write $dir/d new.bin" "rm b.bin" "write $dir/b2 b.bin" "rm docs/numbers.txt"
    local s2; s2=$("$snapmv" snapshot "$dir/cow.img" demo -m "after" | tail -1)

    # The origin moves on after snapshot 2: the backup must follow @2.
    fs_edit "$sock" demo "$dir" "write $dir/a later.bin"

    local out rc=0
    out=$(incr "$base" demo "$s1" "$s2" "$dir/backup.img" 65536) || rc=$?
    echo "$out"
    # The backup is a clean filesystem holding snapshot 2's files.
    e2fsck -fn "$dir/backup.img" >/dev/null 2>&1 || { echo "e2fsck found errors in the backup"; rc=1; }
    debugfs -R "dump new.bin $dir/new.out" "$dir/backup.img" >/dev/null 2>&1
    cmp -s "$dir/d" "$dir/new.out" || { echo "new.bin differs in the backup"; rc=1; }
    debugfs -R "stat later.bin" "$dir/backup.img" 2>&1 | grep -q "not found" ||
        { echo "later.bin (written after snapshot 2) is in the backup"; rc=1; }
    echo "device $(stat -c %s "$dir/origin.img") bytes"
    kill "$spid"; wait "$spid" 2>/dev/null || true; spid=""
    return $rc
}

case "${1:-}" in
    full) shift; [[ $# -eq 4 ]] || die "usage: $0 full BASE ID TAG BACKUP"; full "$@" ;;
    incr) shift; [[ $# -ge 5 ]] || die "usage: $0 incr BASE ID FROM TO BACKUP [CHUNK_SIZE]"; incr "$@" ;;
    demo) shift; demo "$@" ;;
    *) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
