#!/usr/bin/env bash
# The README's main command: a whole ambient mesh on this machine, walked through step by step.
# Installs the system packages it needs (iproute2, nftables, util-linux), builds the binaries
# (the same build the test suite uses, so either one after the other rebuilds little), then runs
# the walk-through (`target/debug/demo --help` for its options).
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
packages=(iproute2 nftables util-linux wget)
# With --keep the mesh stays up for a look around, Prometheus scraping it.
[[ " $* " == *" --keep "* ]] && packages+=(prometheus)
ensure_packages "${packages[@]}"

# One line of progress instead of cargo's hundreds; its whole output goes to a log, shown on failure.
log="${TMPDIR:-/tmp}/ambient-demo-build.log"
crates=$(grep -c '^name = ' Cargo.lock)
echo "building (the first build compiles about $crates crates and takes several minutes; log: $log)" >&2
start=$SECONDS
compiled=0
set +e
cargo build --workspace --all-features --locked --bins --color never 2>&1 | tee "$log" | {
  while IFS= read -r line; do
    [[ $line == *Compiling* ]] || continue
    compiled=$((compiled + 1))
    if [[ -t 2 ]]; then
      printf '\r  %d crates compiled' "$compiled" >&2
    elif ((compiled % 100 == 0)); then
      echo "  $compiled crates compiled" >&2
    fi
  done
  [[ -t 2 && $compiled -gt 0 ]] && echo >&2
  true
}
status=${PIPESTATUS[0]}
set -e
if ((status != 0)); then
  echo "the build failed; the last lines of $log:" >&2
  tail -n 30 "$log" >&2
  exit "$status"
fi
echo "built in $((SECONDS - start)) s" >&2
exec target/debug/demo "$@"
