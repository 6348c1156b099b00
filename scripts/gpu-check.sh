#!/usr/bin/env bash
# One call on a lent GPU machine: build with all cores, run the GPU tests,
# compute-sanitizer on the CUDA kernels, and the benchmarks. Results go to
# $OUT (default ./gpu-out): at most a few files, so that they all come back.
#
#   bash scripts/gpu-check.sh                 # every stage
#   bash scripts/gpu-check.sh build test      # some stages
# Stages: build test sanitize python bench pybench
# The GPU image has no GoogleTest: copy Debian's sources first, and name the
# copy in the device call's carry list:  cp -r /usr/src/googletest .gtest-src
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
stages=("$@")
((${#stages[@]})) || stages=(build test sanitize python bench pybench)
want() { [[ " ${stages[*]} " == *" $1 "* ]]; }
say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
BUILD=build/gpu
ARCHS=${QMOE_CUDA_ARCHS:-80-real;90a-real}
status=0

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  nvcc --version | tail -1
  python3 -c "import torch; print('torch', torch.__version__)"
} >>"$LOG" 2>&1

if want build; then
  say "build (CUDA archs $ARCHS)"
  # The GPU image has no GoogleTest: bring its sources as .gtest-src (carry it).
  gtest=()
  [ -d .gtest-src ] && gtest=(-DQMOE_GTEST_SOURCE_DIR="$PWD/.gtest-src")
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQMOE_CUDA=ON \
    "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS" "${gtest[@]}" >>"$LOG" 2>&1 &&
    cmake --build "$BUILD" -j "$(nproc)" >>"$LOG" 2>&1 || { say "BUILD FAILED"; tail -40 "$LOG"; exit 1; }
fi

if want test; then
  say "C++ tests"
  "$BUILD/tests/cpp/qmoe_tests" --gtest_brief=1 >"$OUT/gtest.log" 2>&1 || status=1
  tail -5 "$OUT/gtest.log" | tee -a "$LOG"
fi

if want sanitize; then
  say "compute-sanitizer memcheck + racecheck"
  filter=${QMOE_SANITIZE_FILTER:-'*CudaKernels*int4*:*CudaKernels*fp8_e4m3*:*CudaKernels.Graph*:*CudaKernels.Inconsistent*:*CudaDecode*int2*:*CudaPrefill*int8*'}
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 9 "$BUILD/tests/cpp/qmoe_tests" \
      --gtest_brief=1 "--gtest_filter=$filter" >>"$OUT/sanitizer.log" 2>&1
    rc=$?
    say "$tool exit $rc: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer.log" | tail -1)"
    ((rc == 0)) || status=1
  done
fi

if want python; then
  say "Python package (CUDA) and pytest"
  python3 -m pip install -q --no-build-isolation --no-deps \
    -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$ARCHS" -C build-dir=build/python-gpu . >>"$LOG" 2>&1 ||
    { say "pip install FAILED"; status=1; }
  python3 -m pytest tests/python -q -rs -x >"$OUT/pytest.log" 2>&1 || status=1
  tail -5 "$OUT/pytest.log" | tee -a "$LOG"
fi

if want bench; then
  say "qmoe-bench (C++), all shapes, int4/int8/int2/fp8/bf16"
  "$BUILD/bench/qmoe-bench" --device cuda --shapes all --markdown "$OUT/qmoe-bench.md" >>"$LOG" 2>&1 || status=1
fi

if want pybench && [ -f bench/gpu_bench.py ]; then
  say "bench/gpu_bench.py: decode and prefill vs torch"
  python3 bench/gpu_bench.py --phase decode --out "$OUT" >>"$LOG" 2>&1 || status=1
  python3 bench/gpu_bench.py --phase prefill --out "$OUT" >>"$LOG" 2>&1 || status=1
fi

say "done (status $status)"
exit $status
