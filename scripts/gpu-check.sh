#!/usr/bin/env bash
# One call on a lent GPU machine: build with all cores, run the GPU tests,
# compute-sanitizer on the CUDA kernels, and the benchmarks. Results go to
# $OUT (default ./gpu-out): at most a few files, so that they all come back.
#
#   bash scripts/gpu-check.sh                 # every stage
#   bash scripts/gpu-check.sh build test      # some stages
# Stages: build test sanitize python bench pybench model (default), variants, variants-prefill, ab, ab-prefill, profile
# QMOE_BUILD_TARGETS (e.g. "_ext qmoe") builds only those targets; QMOE_CUDA_ARCHS
# the architectures (default "80-real;90a-real").
# The GPU image has no GoogleTest: copy Debian's sources first, and name the
# copy in the device call's carry list:  cp -r /usr/src/googletest .gtest-src
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
stages=("$@")
((${#stages[@]})) || stages=(build test sanitize python bench pybench model)
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
  # The Python extension is built in the same tree (QMOE_PY_INPLACE=1, the
  # default): one CUDA compile instead of a second one by pip.
  py=()
  [ "${QMOE_PY_INPLACE:-1}" = 1 ] && py=(-DQMOE_PYTHON=ON)
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQMOE_CUDA=ON \
    "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS" "${gtest[@]}" "${py[@]}" >>"$LOG" 2>&1 &&
    cmake --build "$BUILD" -j "$(nproc)" ${QMOE_BUILD_TARGETS:+--target $QMOE_BUILD_TARGETS} >>"$LOG" 2>&1 ||
    { say "BUILD FAILED"; tail -40 "$LOG"; exit 1; }
fi

# The in-tree extension, used by every Python stage through PYTHONPATH.
if [ "${QMOE_PY_INPLACE:-1}" = 1 ] && ls "$BUILD"/python/_ext*.so >/dev/null 2>&1; then
  cp "$BUILD"/python/_ext*.so python/qmoe/
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
  py_inplace=1
fi

if want test; then
  say "C++ tests"
  "$BUILD/tests/cpp/qmoe_tests" --gtest_brief=1 >"$OUT/gtest.log" 2>&1 || status=1
  tail -5 "$OUT/gtest.log" | tee -a "$LOG"
fi

if want sanitize; then
  say "compute-sanitizer memcheck + racecheck"
  filter=${QMOE_SANITIZE_FILTER:-'*CudaKernels*bfloat16_int4_asym*:*CudaKernels*float16_fp8_e4m3_decode*:CudaKernels.Graph*:CudaKernels.Inconsistent*:CudaDecodeSanitize.*:CudaDecodeEdges.InconsistentCounts:CudaPrefillSizes.InconsistentCounts:*CudaPrefill.MatchesFloat64Reference/bfloat16_int4_asym*:*CudaPrefill.SplitTailOnWgmma/bfloat16_int4_asym*:*CudaPrefill.MatchesFloat64Reference/float16_int8*:FusedMoe.Cuda*'}
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
  if [ -z "${py_inplace:-}" ]; then
    python3 -m pip install -q --no-build-isolation --no-deps \
      -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$ARCHS" -C build-dir=build/python-gpu . >>"$LOG" 2>&1 ||
      { say "pip install FAILED"; status=1; }
  fi
  # shellcheck disable=SC2086
  python3 -m pytest ${QMOE_PYTEST_ARGS:-tests/python} -q -rs >"$OUT/pytest.log" 2>&1 || status=1
  tail -5 "$OUT/pytest.log" | tee -a "$LOG"
fi

# Benchmark files go to $OUT/raw and come back as one tar (the device tool
# returns at most 8 files); the tables are also printed into the log.
mkdir -p "$OUT/raw"
if want bench; then
  say "qmoe-bench (C++): quick, then ARK's prefill shapes for int4 and bf16"
  "$BUILD/bench/qmoe-bench" --device cuda --quick >>"$LOG" 2>&1 || status=1
  "$BUILD/bench/qmoe-bench" --device cuda --shapes ark --phase prefill --encodings int4,bf16 \
    --markdown "$OUT/raw/qmoe-bench-prefill.md" >>"$LOG" 2>&1 || status=1
fi

if want pybench; then
  say "bench/gpu_bench.py: decode and prefill vs torch, decode/prefill crossover"
  timeout "${QMOE_BENCH_TIMEOUT:-240}" python3 bench/gpu_bench.py --phase decode --out "$OUT/raw" >>"$LOG" 2>&1 || status=1
  timeout "${QMOE_BENCH_TIMEOUT:-240}" python3 bench/gpu_bench.py --phase prefill --out "$OUT/raw" >>"$LOG" 2>&1 || status=1
  timeout "${QMOE_BENCH_TIMEOUT:-240}" python3 bench/gpu_bench.py --phase crossover --encodings int4,bf16 \
    --tokens-per-expert 1,2,4,8,12,16,24,32,64 --out "$OUT/raw" >>"$LOG" 2>&1 || status=1
fi

if want model && [ -f bench/model_bench.py ]; then
  say "bench/model_bench.py: MoE layer and model level"
  # shellcheck disable=SC2086
  timeout "${QMOE_BENCH_TIMEOUT:-240}" python3 bench/model_bench.py --out "$OUT/raw" ${QMOE_MODEL_BENCH_ARGS:-} >>"$LOG" 2>&1 || status=1
fi

# Decode kernel variants side by side: one gpu_bench.py decode run per value
# of a tuning variable (QMOE_VARIANT_VAR, default QMOE_DECODE_PIPE; values
# QMOE_VARIANT_VALUES, default "1 2"; see src/cuda/decode.h), into
# raw/<var>=<value>, for bench/compare_runs.py (stage profile: an ncu
# profile).
if want variants; then
  var=${QMOE_VARIANT_VAR:-QMOE_DECODE_PIPE}
  values=${QMOE_VARIANT_VALUES:-${QMOE_PIPES:-1 2}}
  say "decode variants ($var = $values)"
  sel=(--encodings "${QMOE_VARIANT_ENCODINGS:-int4,int2,int8,bf16}" --models "${QMOE_VARIANT_MODELS:-qwen1.5-moe,mixtral-8x7b}")
  for v in $values; do
    env "$var=$v" timeout "${QMOE_BENCH_TIMEOUT:-240}" python3 bench/gpu_bench.py --phase decode \
      --backend shim --lib "$BUILD/libqmoe.a" --no-anchors "${sel[@]}" --out "$OUT/raw/$var=$v" \
      --tag "$var=$v" >>"$LOG" 2>&1 || status=1
  done
fi

# Compile-time variants of the kernels against the default build, their
# tables side by side. QMOE_AB_PREBUILT: a folder that scripts/ab-prebuild.sh
# filled elsewhere (libqmoe.a, the default, as "a"; each NAME.d/ the objects
# of a variant, which replace those of the library: one compile of a kernel
# file takes minutes on the GPU machine). QMOE_AB_CUDA_FLAGS instead builds
# the whole library again here with those flags, as variant "b". Then
# QMOE_AB_ROUNDS (default 2) rounds of runs, one per build in turn
# (NAME_rN), and bench/compare_runs.py over all of them, with each variant's
# geometric-mean time against "a":
#   ab          gpu_bench.py decode tables (QMOE_AB_BENCH_ARGS: more options);
#   ab-prefill  prefill_bench.py tables (QMOE_AB_PREFILL_ARGS, default
#               "--encodings int4,int8,fp8_e4m3,native16").
ab_libs() {  # fills $libs with a.a and NAME.a; sets names=(a NAME...)
  libs="$OUT/ab-libs"
  mkdir -p "$libs"
  names=(a)
  if [ -n "${QMOE_AB_PREBUILT:-}" ]; then
    cp "$QMOE_AB_PREBUILT/libqmoe.a" "$libs/a.a"
    for d in "$QMOE_AB_PREBUILT"/*.d; do
      [ -d "$d" ] || continue
      n=$(basename "$d" .d)
      cp "$libs/a.a" "$libs/$n.a" && ar r "$libs/$n.a" "$d"/*.o && names+=("$n")
    done
  else
    cp "$BUILD/libqmoe.a" "$libs/a.a"
  fi
  if [ -n "${QMOE_AB_CUDA_FLAGS:-}" ]; then
    say "A/B build with CUDA flags '$QMOE_AB_CUDA_FLAGS'"
    cmake -S . -B build/gpu-ab -G Ninja -DCMAKE_BUILD_TYPE=Release -DQMOE_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS" \
      "-DCMAKE_CUDA_FLAGS=$QMOE_AB_CUDA_FLAGS" >>"$LOG" 2>&1 &&
      cmake --build build/gpu-ab -j "$(nproc)" --target qmoe >>"$LOG" 2>&1 &&
      cp build/gpu-ab/libqmoe.a "$libs/b.a" && names+=(b) || { say "A/B BUILD FAILED"; status=1; }
  fi
}

# QMOE_AB_ROUNDS interleaved rounds of `$2 NAME ROUND` (runs the benchmark
# of one library, prints NAME_rROUND=RESULT; non-zero if it failed) over the
# libraries of ab_libs, then bench/compare_runs.py over them into $OUT/$1.
ab_rounds() {
  local result=$1 run=$2 runs=() one
  for r in $(seq 1 "${QMOE_AB_ROUNDS:-2}"); do
    for n in "${names[@]}"; do
      one=$("$run" "$n" "$r") || status=1
      runs+=("$one")
    done
  done
  python3 bench/compare_runs.py "${runs[@]}" >"$OUT/$result" 2>&1 || status=1
  tail -60 "$OUT/$result" | tee -a "$LOG"
  rm -rf "$libs"
}
ab_decode_run() {
  local sel=(--phase decode --backend shim --no-anchors --encodings "${QMOE_VARIANT_ENCODINGS:-int4,int2,int8}"
             --models "${QMOE_VARIANT_MODELS:-qwen1.5-moe,deepseek-v2-lite,mixtral-8x7b,qwen3-30b-a3b}"
             ${QMOE_AB_BENCH_ARGS:-})
  echo "$1_r$2=$OUT/raw/$1_r$2"
  timeout "${QMOE_BENCH_TIMEOUT:-240}" python3 bench/gpu_bench.py "${sel[@]}" --lib "$libs/$1.a" \
    --out "$OUT/raw/$1_r$2" --tag "$1_r$2" >>"$LOG" 2>&1
}
ab_prefill_run() {
  echo "$1_r$2=$OUT/raw/prefill-$1_r$2.json"
  # shellcheck disable=SC2086
  timeout "${QMOE_BENCH_TIMEOUT:-240}" python3 bench/prefill_bench.py --lib "$libs/$1.a" \
    ${QMOE_AB_PREFILL_ARGS:---encodings int4,int8,fp8_e4m3,native16} --json "$OUT/raw/prefill-$1_r$2.json" \
    >>"$LOG" 2>&1
}

if want ab; then
  ab_libs
  ab_rounds ab-compare.txt ab_decode_run
fi

if want ab-prefill; then
  ab_libs
  say "prefill A/B: ${names[*]}"
  ab_rounds ab-prefill.txt ab_prefill_run
fi

# A runtime switch of the prefill path side by side, on the build's library:
# QMOE_VARIANT_VAR (default QMOE_PREFILL_WIDE) set to each of
# QMOE_VARIANT_VALUES (default "1 0") in turn, prefill_bench.py tables
# (QMOE_AB_PREFILL_ARGS) in QMOE_AB_ROUNDS interleaved rounds, compared
# against the first value into $OUT/variants-prefill.txt.
env_prefill_run() {
  echo "v$1_r$2=$OUT/raw/prefill-v$1_r$2.json"
  # shellcheck disable=SC2086
  env "$var=$1" timeout "${QMOE_BENCH_TIMEOUT:-240}" python3 bench/prefill_bench.py --lib "$BUILD/libqmoe.a" \
    ${QMOE_AB_PREFILL_ARGS:---encodings int4,int8,fp8_e4m3,native16} --json "$OUT/raw/prefill-v$1_r$2.json" \
    >>"$LOG" 2>&1
}
if want variants-prefill; then
  var=${QMOE_VARIANT_VAR:-QMOE_PREFILL_WIDE}
  read -r -a names <<<"${QMOE_VARIANT_VALUES:-1 0}"
  libs="$OUT/ab-libs"  # (ab_rounds removes it; nothing is built here)
  say "prefill variants ($var = ${names[*]})"
  ab_rounds variants-prefill.txt env_prefill_run
fi

# An ncu profile (full set; stall reasons and the SASS lines that stall
# most, through scripts/ncu_summary.py) of one kernel on one row:
# QMOE_PROFILE_PHASE (decode, or prefill: the decode kernel or the prefill
# kernels), QMOE_PROFILE_MODEL (default qwen3-30b-a3b), QMOE_PROFILE_BATCH
# (tokens before top-k; default 1, prefill 4096), QMOE_PROFILE_ENC (int4),
# QMOE_PROFILE_PRODUCT (gate_up), for each library of QMOE_PROFILE_LIBS
# ("NAME=LIB ...", default the build's). Writes $OUT/profile-NAME.txt.
if want profile && command -v ncu >/dev/null; then
  phase=${QMOE_PROFILE_PHASE:-decode}
  if [ "$phase" = prefill ]; then
    kernel='regex:wgmma_kernel|prefill' batch=${QMOE_PROFILE_BATCH:-4096} rows=(--prefill-batches)
  else
    kernel='regex:decode_kernel' batch=${QMOE_PROFILE_BATCH:-1} rows=(--batches)
  fi
  model=${QMOE_PROFILE_MODEL:-qwen3-30b-a3b}
  enc=${QMOE_PROFILE_ENC:-int4} product=${QMOE_PROFILE_PRODUCT:-gate_up}
  say "ncu profile: $phase kernel, $model b$batch $enc $product"
  for entry in ${QMOE_PROFILE_LIBS:-default=$BUILD/libqmoe.a}; do
    name=${entry%%=*} lib=${entry#*=} rep=/tmp/$phase-profile-$name
    timeout 300 ncu --set full --import-source no -k "$kernel" --launch-skip 3 --launch-count 1 \
      -f -o "$rep" python3 bench/gpu_bench.py --phase "$phase" --backend shim --lib "$lib" --no-anchors \
      --models "$model" "${rows[@]}" "$batch" --encodings "$enc" --products "$product" --out /tmp/profile-bench \
      >"$OUT/raw/ncu-$name.log" 2>&1 || status=1
    # The report is too large to come back: its details page, the stall
    # reasons and the SASS lines that stall most do.
    ncu -i "$rep.ncu-rep" --page details >"$OUT/profile-$name.txt" 2>&1
    python3 scripts/ncu_summary.py "$rep.ncu-rep" >>"$OUT/profile-$name.txt" 2>&1 || status=1
    say "profile $name"
    grep -E "Warp Cycles Per Issued|Issued Ipc|Achieved Occupancy|DRAM Throughput|Duration|L1/TEX Hit Rate|L2 Hit Rate|L1/TEX Cache Throughput|L2 Cache Throughput|^  [a-z_]+ +[0-9.]+$" \
      "$OUT/profile-$name.txt" | head -30 | tee -a "$LOG"
  done
fi

if [ -n "$(ls -A "$OUT/raw")" ]; then tar -C "$OUT" -cf "$OUT/raw.tar" raw; fi
rm -rf "$OUT/raw"

say "done (status $status)"
exit $status
