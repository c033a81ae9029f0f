#!/bin/sh
# Write the RUSTC_WORKSPACE_WRAPPER that builds the workspace crates with
# --cfg snapmv_planted (engine/src/planted.rs) into directory $1, and print
# its path. sim/planted.sh and engine/loom-planted.sh build through it.
#
#   RUSTC_WORKSPACE_WRAPPER=$(scripts/planted-wrapper.sh target/wrappers)
set -eu
mkdir -p "$1"
wrap="$1/rustc-snapmv-planted"
tmp=$(mktemp "$wrap.XXXXXX")
cat >"$tmp" <<'WRAP'
#!/bin/sh
# RUSTC_WORKSPACE_WRAPPER (scripts/planted-wrapper.sh): $1 is rustc.
exec "$@" --cfg snapmv_planted
WRAP
chmod +x "$tmp"
# Rewrite only on change: the wrapper's mtime is part of cargo's cache key.
if cmp -s "$tmp" "$wrap"; then rm -f "$tmp"; else mv "$tmp" "$wrap"; fi
echo "$(cd "$1" && pwd)/rustc-snapmv-planted"
