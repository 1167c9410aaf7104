#!/usr/bin/env bash
# The README's main command: a whole ambient mesh on this machine, walked through step by step.
# Installs the system packages it needs (iproute2, nftables, util-linux), builds the binaries in
# release mode, then runs the walk-through (`target/release/demo --help` for its options).
set -euo pipefail
cd "$(dirname "$0")"

if [[ $EUID -ne 0 ]]; then
  echo "demo.sh: the demo builds network namespaces and capture rules: run it as root (sudo ./demo.sh)" >&2
  exit 1
fi
if ! command -v cargo >/dev/null; then
  echo "demo.sh: cargo is not on root's PATH; keep yours with: sudo env PATH=\"\$PATH\" ./demo.sh" >&2
  exit 1
fi

source .ci/packages.sh
ensure_packages iproute2 nftables util-linux

echo "building (release; the first build takes a few minutes) ..." >&2
cargo build --release --locked --bins -p ca -p ztunnel -p waypoint -p e2e
exec target/release/demo "$@"
