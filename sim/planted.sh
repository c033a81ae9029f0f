#!/bin/sh
# Show that the simulator catches each bug planted in the engine
# (engine hooks: #[cfg(snapmv_planted_bug = "...")]). Each bug is built in
# its own target directory so the main build is not invalidated.
#
#   sim/planted.sh                 # all three
#   sim/planted.sh skip_checksum   # one
#
# Exit status is non-zero if any planted bug goes uncaught.
set -eu
cd "$(dirname "$0")/.."
bugs="${*:-skip_cow_flush skip_checksum early_reuse}"
target="${CARGO_TARGET_DIR:-target}"
status=0
for b in $bugs; do
    echo "=== planted bug: $b"
    if RUSTFLAGS="--cfg snapmv_planted_bug=\"$b\"" CARGO_TARGET_DIR="$target/planted-$b" \
        cargo test -p snapmv-sim --test planted -- --nocapture 2>&1 | tee "/tmp/snapmv-planted-$b.log" |
        grep -E "CAUGHT|NOT caught|planted bug|test result|panicked|exhaustive mode did not"; then :; fi
    if grep -q "^CAUGHT" "/tmp/snapmv-planted-$b.log" && grep -q "test result: ok" "/tmp/snapmv-planted-$b.log"; then
        echo "=== $b: caught"
    else
        echo "=== $b: NOT CAUGHT (log: /tmp/snapmv-planted-$b.log)"
        status=1
    fi
done
exit $status
