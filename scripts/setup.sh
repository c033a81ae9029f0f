#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine:
# the real NBD clients the interop tests drive, fio, qemu-utils, FUSE and
# e2fsprogs for the ext4 example, nbdkit for the power-cut test, certtool
# and psktool (gnutls-bin) for the TLS tests' credentials, OpenSSL's
# headers and pkg-config for the PSK side of TLS (the `openssl` crate),
# and cargo-fuzz for the fuzz slice.
# Idempotent: does nothing when all is present.
set -euo pipefail

pkgs=(libnbd-bin python3-libnbd fio qemu-utils fuse3 e2fsprogs util-linux nbdkit zstd gnutls-bin libssl-dev pkg-config)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ "${SNAPMV_SKIP_FUZZ:-0}" != 1 ] && ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz"
  cargo install cargo-fuzz --locked -q
fi
