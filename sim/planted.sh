#!/bin/sh
# Show that the simulator catches each bug planted in the engine
# (engine hooks: #[cfg(snapmv_planted_bug = "...")]).
#
#   sim/planted.sh                 # all three
#   sim/planted.sh skip_checksum   # one
#
# One target directory (target/planted) serves every bug: the planted cfg is
# added only to workspace crates through a per-bug RUSTC_WORKSPACE_WRAPPER,
# so dependencies build once and only the engine and the sim rebuild per bug.
# Exit status is non-zero if any planted bug goes uncaught.
set -eu
cd "$(dirname "$0")/.."
bugs="${*:-skip_cow_flush skip_checksum early_reuse}"
target="${CARGO_TARGET_DIR:-target}/planted"
mkdir -p "$target/wrappers"
status=0
for b in $bugs; do
    echo "=== planted bug: $b"
    wrap="$target/wrappers/rustc-sim-planted-$b"
    tmp=$(mktemp "$wrap.XXXXXX")
    cat >"$tmp" <<WRAP
#!/bin/sh
# RUSTC_WORKSPACE_WRAPPER for sim/planted.sh: \$1 is rustc.
exec "\$@" --cfg 'snapmv_planted_bug="$b"'
WRAP
    chmod +x "$tmp"
    # Rewrite only on change: the wrapper's mtime is part of cargo's cache key.
    if cmp -s "$tmp" "$wrap"; then rm -f "$tmp"; else mv "$tmp" "$wrap"; fi
    if RUSTC_WORKSPACE_WRAPPER="$wrap" CARGO_TARGET_DIR="$target" \
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
