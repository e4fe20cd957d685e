#!/usr/bin/env bash
# Installs what is missing, builds everything (tests, examples, benchmarks)
# and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
kvcache_ensure_deps
kvcache_configure
cmake --build build -j"$(nproc)"
ctest --test-dir build --output-on-failure -j"$(nproc)"
