#!/usr/bin/env bash
# Builds build/ort/libqwen_vl_ort_kernels.so: ONNX Runtime custom op qwen_vl::MatMulInt4 (README.md here).
#
#   bash plugins/ortMatMulInt4/build.sh            # incremental: rebuilds only when a source is newer
#   bash plugins/ortMatMulInt4/build.sh --force    # always rebuild
#
# ONNX Runtime headers (the C/C++ API only; nothing is linked: ONNX Runtime hands the library its API table):
# $ONNXRUNTIME_ROOT/include[/onnxruntime], else a system /usr/include/onnxruntime, else the headers of Debian's
# libonnxruntime-dev 1.21.0 (trixie; fetched from deb.debian.org, SHA-256 checked, into third_party/, git-ignored).
# Env: CXX (default g++).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
SRC="$ROOT/plugins/ortMatMulInt4"
OUT="$ROOT/build/ort"
LIB="$OUT/libqwen_vl_ort_kernels.so"
CXX="${CXX:-g++}"
DEB_URL="http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb"
DEB_SHA256="14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"

find_ort_include() {
  local d
  for d in "${ONNXRUNTIME_ROOT:-/nonexistent}/include" "${ONNXRUNTIME_ROOT:-/nonexistent}/include/onnxruntime" \
           /usr/include/onnxruntime /usr/local/include/onnxruntime; do
    if [ -f "$d/onnxruntime_cxx_api.h" ]; then echo "$d"; return; fi
  done
  local tp="$ROOT/third_party/onnxruntime-1.21" inc="$ROOT/third_party/onnxruntime-1.21/usr/include/onnxruntime"
  if [ ! -f "$inc/onnxruntime_cxx_api.h" ]; then
    mkdir -p "$tp"
    local deb="$tp/libonnxruntime-dev.deb"
    curl -fsSL --retry 3 -o "$deb" "$DEB_URL" >&2
    echo "$DEB_SHA256  $deb" | sha256sum -c --quiet - >&2
    (cd "$tp" && ar x "$deb" && tar xf data.tar.* ./usr/include/onnxruntime && rm -f data.tar.* control.tar.* \
      debian-binary "$deb") >&2
  fi
  echo "$inc"
}

if [ "${1:-}" != "--force" ] && [ -f "$LIB" ] && \
   [ -z "$(find "$SRC" -newer "$LIB" \( -name '*.cpp' -o -name '*.h' -o -name build.sh \))" ]; then
  echo "ort kernels: $LIB is up to date"; exit 0
fi
case "$(uname -m)" in
  x86_64) ;;
  *) echo "ort kernels: skipped on $(uname -m) (AVX-512 kernels only; ONNX Runtime's MatMulNBits runs instead)"
     exit 0 ;;
esac

# -Wno-(maybe-)uninitialized: GCC 12 flags its own _mm512_undefined_ps inside avx512fintrin.h
ORT_INC="$(find_ort_include)"
mkdir -p "$OUT/obj"
FLAGS="-std=c++17 -O3 -fPIC -fvisibility=hidden -fvisibility-inlines-hidden -Wall -Wextra -I$SRC -I$ORT_INC"
"$CXX" $FLAGS -c "$SRC/matMulInt4Kernel.cpp" -o "$OUT/obj/matMulInt4Kernel.o"
AVX512="-mavx512f -Wno-uninitialized -Wno-maybe-uninitialized"
"$CXX" $FLAGS $AVX512 -c "$SRC/matMulInt4Avx512.cpp" -o "$OUT/obj/matMulInt4Avx512.o"
"$CXX" $FLAGS $AVX512 -mavx512bw -mavx512vnni -c "$SRC/matMulInt4Vnni.cpp" -o "$OUT/obj/matMulInt4Vnni.o"
"$CXX" $FLAGS $AVX512 -c "$SRC/matMulF32Avx512.cpp" -o "$OUT/obj/matMulF32Avx512.o"
for unit in matMulInt4Op matMulF32Kernel matMulF32Op ortRegister; do
  "$CXX" $FLAGS -c "$SRC/$unit.cpp" -o "$OUT/obj/$unit.o"
done
"$CXX" -shared -o "$LIB.tmp" "$OUT"/obj/*.o -Wl,--no-undefined -Wl,-z,defs
mv "$LIB.tmp" "$LIB"
echo "ort kernels: built $LIB (ONNX Runtime headers: $ORT_INC)"
