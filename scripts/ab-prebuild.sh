#!/usr/bin/env bash
# Build decode-kernel A/B variants here, for `scripts/gpu-check.sh ab` on a
# lent GPU, where one compile of src/cuda/decode.cu takes minutes:
#
#   bash scripts/ab-prebuild.sh c2=QMOE_DECODE_CHAINS=2 d2=QMOE_DECODE_DEPTH=2,X=1
#   bash scripts/ab-prebuild.sh k4=@experiment/int4-k4-pairs
#
# builds libqmoe.a once (sm_90a, build/ab-base), then decode.cu once per
# NAME=DEF[,DEF...] with those definitions, or per NAME=@REV from the
# sources (src/, include/) of that git revision, and packs the library and
# the NAME.o objects into build-abpk/libs.tar.gz. On the GPU machine (carry
# build-abpk):
#
#   mkdir -p build-ab && tar -C build-ab -xzf build-abpk/libs.tar.gz &&
#     QMOE_AB_PREBUILT=build-ab bash scripts/gpu-check.sh ab
set -euo pipefail
cd "$(dirname "$0")/.."
base=build/ab-base
stage=build/ab-stage
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
cmake -S . -B "$base" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQMOE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a-real \
  -DQMOE_BUILD_TESTS=OFF -DQMOE_BUILD_BENCH=OFF "${launcher[@]}" >/dev/null
echo "== libqmoe.a (sm_90a)"
cmake --build "$base" --target qmoe
rm -rf "$stage" && mkdir -p "$stage" build-abpk
cp "$base/libqmoe.a" "$stage/"
# The library's own compile command for decode.cu, with the variant's definitions added.
cmd=$(cd "$base" && ninja -t commands qmoe | grep -F 'src/cuda/decode.cu -o' | tail -1)
[ -n "$cmd" ] || { echo "no compile command for decode.cu" >&2; exit 1; }
for v in "$@"; do
  name=${v%%=*} defs=${v#*=}
  vcmd=$cmd
  if [[ $defs == @* ]]; then  # decode.cu and its headers as they are at that revision
    echo "== variant $name: sources of ${defs#@}"
    tree=$PWD/$stage/$name-src
    mkdir -p "$tree" && git archive "${defs#@}" src include | tar -x -C "$tree"
    vcmd=${vcmd//$PWD\/src/$tree/src}
    vcmd=${vcmd//$PWD\/include/$tree/include}
  else
    echo "== variant $name: ${defs//,/ }"
    vcmd=${vcmd/ -x cu / $(printf -- '-D%s ' ${defs//,/ })-x cu }
  fi
  vcmd=${vcmd% -o *}" -o $PWD/$stage/$name.o"
  (cd "$base" && eval "$vcmd")
  rm -rf "$PWD/$stage/$name-src"
done
tar -C "$stage" -cf - . | gzip -6 >build-abpk/libs.tar.gz
ls -la build-abpk/libs.tar.gz
