#!/usr/bin/env bash
# The main job: builds qmoe-bench and runs it on the GPU if one is present,
# else on the CPU. Arguments go to qmoe-bench (default: --quick).
#
#   bash scripts/bench.sh                 # quick table, a minute or two
#   bash scripts/bench.sh --shapes all    # every reference shape and layer
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${QMOE_BENCH_BUILD_DIR:-build/bench}
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
  export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=1
fi
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQMOE_BUILD_TESTS=OFF "${launcher[@]}" ${QMOE_CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD" -j "$(nproc)" --target qmoe-bench
if (($# == 0)); then set -- --quick; fi
exec "$BUILD/bench/qmoe-bench" "$@"
