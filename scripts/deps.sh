# Sourced by the other scripts: installs the Debian/Ubuntu packages the build
# needs when any is missing, with sudo when not root.
kvcache_packages="g++ cmake make libeigen3-dev libfmt-dev catch2 libbenchmark-dev ccache"

kvcache_missing() {
  command -v g++ >/dev/null && command -v cmake >/dev/null && command -v make >/dev/null &&
    [ -f /usr/include/eigen3/Eigen/Dense ] && [ -f /usr/include/fmt/core.h ] &&
    [ -f /usr/include/catch2/catch.hpp ] && [ -f /usr/include/benchmark/benchmark.h ] &&
    command -v ccache >/dev/null && return 1
  return 0
}

kvcache_ensure_deps() {
  kvcache_missing || return 0
  local run=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      run="sudo"
    else
      echo "kvcache: missing build dependencies; install them as root with:" >&2
      echo "  apt-get update && apt-get install -y $kvcache_packages" >&2
      echo "(neither root nor passwordless sudo is available here)" >&2
      exit 1
    fi
  fi
  if ! command -v apt-get >/dev/null; then
    echo "kvcache: apt-get not found; install: $kvcache_packages" >&2
    exit 1
  fi
  echo "kvcache: installing $kvcache_packages" >&2
  $run apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $run apt-get install -y -qq $kvcache_packages >/dev/null
}

kvcache_configure() {
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
}
