#!/usr/bin/env bash
# Installs what is missing, builds the demo and runs it on the CPU. Arguments
# go to the demo (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
kvcache_ensure_deps
kvcache_configure
cmake --build build -j"$(nproc)" --target demo >/dev/null
exec ./build/examples/demo "$@"
