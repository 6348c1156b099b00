#!/usr/bin/env bash
# Builds qmoe and runs every test: the C++ tests (CTest) and the Python tests
# (pytest). GPU tests skip with their reason where no GPU is present.
#
#   bash scripts/test.sh            # from a fresh clone; installs what it needs
#
# The C++ build compiles the CUDA backend whenever nvcc is found (so CUDA code
# is always compiled); the Python package is built with CUDA only where a GPU
# is present (elsewhere it would add compile time and run nothing new).
set -euo pipefail
cd "$(dirname "$0")/.."

JOBS=${JOBS:-$(nproc)}
BUILD=${QMOE_TEST_BUILD_DIR:-build/test}
PY=${PYTHON:-python3}

# Python build and test dependencies (torch is optional: .ci/run adds it).
missing=()
for mod in numpy nanobind scikit_build_core pytest ml_dtypes; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("${mod//_/-}")
done
if ((${#missing[@]})); then
  echo "== installing ${missing[*]}"
  "$PY" -m pip install -q "${missing[@]}"
fi

launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
  # Fresh clones in other folders hit the same cache entries.
  export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=1
fi
gpu=OFF
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then gpu=ON; fi

echo "== C++: configure and build ($BUILD)"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" ${QMOE_CMAKE_ARGS:-}
cmake --build "$BUILD" -j "$JOBS"

echo "== C++: tests"
ctest --test-dir "$BUILD" --output-on-failure -j "$JOBS"

echo "== C++: install and use the CMake package from a separate project"
rm -rf "$BUILD/prefix" "$BUILD/example"
cmake --install "$BUILD" --prefix "$BUILD/prefix" >/dev/null
cmake -S examples/cpp -B "$BUILD/example" -G Ninja -DCMAKE_PREFIX_PATH="$PWD/$BUILD/prefix" "${launcher[@]}" >/dev/null
cmake --build "$BUILD/example" -j "$JOBS" >/dev/null
"$BUILD/example/qmoe_example"

echo "== Python: build and install the package (CUDA: $gpu)"
"$PY" -m pip install -q --no-build-isolation --no-deps -C cmake.define.QMOE_CUDA=$gpu \
  -C build-dir=build/python-{wheel_tag} .

echo "== Python: tests"
"$PY" -m pytest tests/python -q -rs
