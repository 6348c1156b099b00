#!/usr/bin/env bash
# Build CUDA kernel A/B variants here, for `scripts/gpu-check.sh ab` (decode
# tables) or `ab-prefill` (prefill tables) on a lent GPU, where one compile
# of a kernel file takes minutes:
#
#   bash scripts/ab-prebuild.sh c2=QMOE_DECODE_CHAINS=2 d2=QMOE_DECODE_DEPTH=2,X=1
#   bash scripts/ab-prebuild.sh k4=@experiment/int4-k4-pairs
#   QMOE_AB_SOURCES="prefill_wgmma_bf16.cu prefill_wgmma_f16.cu" bash scripts/ab-prebuild.sh old=@HEAD~1
#
# builds libqmoe.a once (sm_90a, build/ab-base) from the working tree, then
# the files of QMOE_AB_SOURCES (under src/cuda; default decode.cu) once per
# NAME=DEF[,DEF...] with those definitions, or per NAME=@REV from the
# sources (src/, include/) of that git revision (resolved when its turn
# comes: name a commit, not HEAD, if you commit meanwhile), and packs the
# library and each variant's objects (NAME.d/FILE.o, the archive's member
# names) into build-abpk/libs.tar.gz. On the GPU machine (carry build-abpk):
#
#   mkdir -p build-ab && tar -C build-ab -xzf build-abpk/libs.tar.gz &&
#     QMOE_AB_PREBUILT=build-ab bash scripts/gpu-check.sh ab
set -euo pipefail
cd "$(dirname "$0")/.."
base=build/ab-base
stage=build/ab-stage
sources=(${QMOE_AB_SOURCES:-decode.cu})
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
cmake -S . -B "$base" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQMOE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a-real \
  -DQMOE_BUILD_TESTS=OFF -DQMOE_BUILD_BENCH=OFF "${launcher[@]}" >/dev/null
echo "== libqmoe.a (sm_90a)"
cmake --build "$base" --target qmoe
rm -rf "$stage" && mkdir -p "$stage" build-abpk
cp "$base/libqmoe.a" "$stage/"
for v in "$@"; do
  name=${v%%=*} defs=${v#*=}
  mkdir -p "$stage/$name.d"
  tree=
  if [[ $defs == @* ]]; then  # the files and their headers as they are at that revision
    echo "== variant $name: sources of ${defs#@}"
    tree=$PWD/$stage/$name-src
    mkdir -p "$tree" && git archive "${defs#@}" src include | tar -x -C "$tree"
  else
    echo "== variant $name: ${defs//,/ }"
  fi
  for src in "${sources[@]}"; do
    # The library's own compile command for the file, with the variant's
    # sources or definitions.
    vcmd=$(cd "$base" && ninja -t commands qmoe | grep -F "src/cuda/$src -o" | tail -1)
    [ -n "$vcmd" ] || { echo "no compile command for src/cuda/$src" >&2; exit 1; }
    if [ -n "$tree" ]; then
      vcmd=${vcmd//$PWD\/src/$tree/src}
      vcmd=${vcmd//$PWD\/include/$tree/include}
    else
      vcmd=${vcmd/ -x cu / $(printf -- '-D%s ' ${defs//,/ })-x cu }
    fi
    vcmd=${vcmd% -o *}" -o $PWD/$stage/$name.d/$src.o"
    (cd "$base" && eval "$vcmd")
  done
  [ -z "$tree" ] || rm -rf "$tree"
done
tar -C "$stage" -cf - . | gzip -6 >build-abpk/libs.tar.gz
ls -la build-abpk/libs.tar.gz
