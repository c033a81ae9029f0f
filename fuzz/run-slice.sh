#!/usr/bin/env bash
# CI slice of the snapmv fuzzers.
#
#   fuzz/run-slice.sh [SECONDS]      (default 20 seconds per target)
#
# Installs cargo-fuzz if missing, builds every target (nightly), replays
# every saved reproducer under fuzz/regressions/<target>/, then runs each
# target for SECONDS starting from fuzz/seeds/<target>/ (the growing corpus
# goes to fuzz/corpus/<target>/, crashes to fuzz/artifacts/<target>/).
# Exits non-zero if any reproducer still crashes or any run finds a crash,
# a hang (-timeout) or runs out of memory.
#
# Environment:
#   FUZZ_SANITIZER   sanitizer for cargo fuzz (default: none; the code under
#                    test has no unsafe outside syscalls, and ASan costs the
#                    store targets 50x in speed). "address" also works.
#   FUZZ_TARGETS     space-separated subset of targets to run.
set -u -o pipefail

SECONDS_PER_TARGET="${1:-20}"
SAN="${FUZZ_SANITIZER:-none}"
cd "$(dirname "$0")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked || exit 2
fi

ALL_TARGETS="format_decode store_records nbd_proto control_msg meta_model damaged_cow nbd_conn"
TARGETS="${FUZZ_TARGETS:-$ALL_TARGETS}"

dict_for() {
    case "$1" in
        nbd_proto | nbd_conn) echo "-dict=dicts/nbd.dict" ;;
        control_msg) echo "-dict=dicts/control.dict" ;;
        *) echo "" ;;
    esac
}

echo "== building fuzz targets (sanitizer: $SAN)"
cargo +nightly fuzz build -s "$SAN" || exit 2

failed=()

for t in $TARGETS; do
    dir="regressions/$t"
    [ -d "$dir" ] || continue
    files=$(find "$dir" -type f ! -name '*.md' ! -name '*.txt' | sort)
    [ -n "$files" ] || continue
    echo "== replaying $(echo "$files" | wc -l) reproducer(s) for $t"
    # shellcheck disable=SC2086
    if ! cargo +nightly fuzz run -s "$SAN" "$t" $files -- -runs=1 >"/tmp/snapmv-fuzz-replay-$t.log" 2>&1; then
        echo "!! $t: a reproducer still fails (log: /tmp/snapmv-fuzz-replay-$t.log)"
        grep -E "panicked at|ERROR: libFuzzer|SUMMARY" "/tmp/snapmv-fuzz-replay-$t.log" | head -5
        failed+=("$t (regression)")
    fi
done

for t in $TARGETS; do
    mkdir -p "corpus/$t"
    echo "== $t for ${SECONDS_PER_TARGET}s"
    log="/tmp/snapmv-fuzz-$t.log"
    # shellcheck disable=SC2046
    if cargo +nightly fuzz run -s "$SAN" "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=30 -rss_limit_mb=4096 \
        -print_final_stats=1 $(dict_for "$t") >"$log" 2>&1; then
        grep -E "^Done|stat::number_of_executed_units|stat::average_exec_per_sec" "$log" | tr '\n' ' '
        echo
    else
        echo "!! $t: crash, hang or OOM (log: $log; input under fuzz/artifacts/$t/)"
        grep -E "panicked at|ERROR: libFuzzer|SUMMARY|Test unit written" "$log" | head -5
        failed+=("$t")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "== FAILED: ${failed[*]}"
    exit 1
fi
echo "== all fuzz targets clean"
