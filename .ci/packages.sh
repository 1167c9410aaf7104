# Sourced by .ci/run and demo.sh: installs the Debian packages given that are missing, one line
# per package, the package manager's own output kept in a log that is named if anything fails.
# shellcheck shell=bash

ensure_packages() {
  local missing=() pkg log
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  if ! command -v apt-get >/dev/null; then
    echo "missing packages: ${missing[*]} (install them; this script knows only apt-get)" >&2
    return 1
  fi
  log="${TMPDIR:-/tmp}/ambient-packages.log"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get update -qq >"$log" 2>&1; then
    echo "could not update the package lists (apt-get update); its output: $log" >&2
    return 1
  fi
  for pkg in "${missing[@]}"; do
    if apt-get install -y -qq --no-install-recommends "$pkg" >>"$log" 2>&1; then
      echo "installed $pkg" >&2
    else
      echo "could not install $pkg; the package manager's output: $log" >&2
      return 1
    fi
  done
}
