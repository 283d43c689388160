# Shared by scripts/run-main and scripts/run-tests: checks the Debian
# packages the build needs, installs missing ones when run as root, and
# otherwise stops with the exact apt-get command to run.
set -euo pipefail

KVEVICT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KVEVICT_BUILD_DIR=${KVEVICT_BUILD_DIR:-$KVEVICT_ROOT/build}
KVEVICT_JOBS=${KVEVICT_JOBS:-$(nproc 2>/dev/null || echo 2)}

# Packages needed to build and test. gnuplot-nox draws the evaluation plot.
KVEVICT_PACKAGES=(cmake g++ make libeigen3-dev catch2 libbenchmark-dev gnuplot-nox)

kvevict_missing_packages() {
  local missing=()
  for package in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$package")
    fi
  done
  echo "${missing[@]:-}"
}

kvevict_require_packages() {
  local missing
  missing=$(kvevict_missing_packages "$@")
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" = 0 ]; then
    echo "Installing missing Debian packages: $missing" >&2
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >&2
  else
    echo "error: missing Debian packages: $missing" >&2
    echo "Install them with:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y $missing" >&2
    exit 1
  fi
}

# Configures (once) and builds the given targets in $KVEVICT_BUILD_DIR.
kvevict_build() {
  cmake -S "$KVEVICT_ROOT" -B "$KVEVICT_BUILD_DIR" -DCMAKE_BUILD_TYPE=Release "${KVEVICT_CMAKE_ARGS[@]}" >&2
  cmake --build "$KVEVICT_BUILD_DIR" -j "$KVEVICT_JOBS" "$@" >&2
}
KVEVICT_CMAKE_ARGS=()
