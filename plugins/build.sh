#!/usr/bin/env bash
# Builds build/plugins/libqwen_vl_plugins.so (MRoPE, VarlenAttention, KVCacheAttention, MoEExperts; namespace qwen_vl).
#
#   bash plugins/build.sh            # incremental: rebuilds only when a source is newer than the library
#   bash plugins/build.sh --force    # always rebuild
#
# TensorRT headers: $TENSORRT_ROOT/include, else a system TensorRT include dir, else the public TensorRT
# 10.14 headers inside the kernel-lens 2.0.1 wheel (fetched with `pip download --no-deps` into
# third_party/, git-ignored). The library links cudart statically and no TensorRT library at all: its only
# exports are getCreators and setLoggerFinder (IPluginRegistry::loadLibrary needs both) and
# qwen_vl_set_attention_kernel (common/attentionMma.h); -fvisibility=hidden hides everything else.
# Env: NVCC (default nvcc), CUDA_ARCHS (default "80 86 89 90 120"; PTX is added for the last one).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="$ROOT/plugins"
OUT="$ROOT/build/plugins"
LIB="$OUT/libqwen_vl_plugins.so"
NVCC="${NVCC:-nvcc}"
ARCHS="${CUDA_ARCHS:-80 86 89 90 120}"
mkdir -p "$OUT/obj"

find_trt_include() {
  if [ -n "${TENSORRT_ROOT:-}" ] && [ -f "$TENSORRT_ROOT/include/NvInferRuntime.h" ]; then
    echo "$TENSORRT_ROOT/include"; return
  fi
  for d in /usr/include/x86_64-linux-gnu /usr/include/aarch64-linux-gnu /usr/include /usr/local/include; do
    if [ -f "$d/NvInferRuntime.h" ]; then echo "$d"; return; fi
  done
  local tp="$ROOT/third_party" inc="$ROOT/third_party/kernel_lens/include/tensorrt"
  if [ ! -f "$inc/NvInferRuntime.h" ]; then
    local pip="python3 -m pip"
    [ -x "$ROOT/.venv/bin/pip" ] && pip="$ROOT/.venv/bin/pip"
    mkdir -p "$tp"
    $pip download -q --no-deps -d "$tp" kernel-lens==2.0.1 >&2
    python3 - "$tp" <<'PY'
import glob, sys, zipfile
tp = sys.argv[1]
z = zipfile.ZipFile(sorted(glob.glob(f"{tp}/kernel_lens-2.0.1-*.whl"))[0])
for n in z.namelist():
    if n.startswith("kernel_lens/include/tensorrt/"):
        z.extract(n, tp)
PY
  fi
  echo "$inc"
}

SOURCES_CPP=$(ls "$SRC"/common/*.cpp "$SRC"/*/*Plugin.cpp)
SOURCES_CU=$(ls "$SRC"/*/*Kernel.cu)
if [ "${1:-}" != "--force" ] && [ -f "$LIB" ] && \
   [ -z "$(find "$SRC" -newer "$LIB" \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name build.sh \))" ]; then
  echo "plugins: $LIB is up to date"; exit 0
fi

TRT_INC="$(find_trt_include)"
GENCODE=""
for a in $ARCHS; do GENCODE="$GENCODE -gencode arch=compute_$a,code=sm_$a"; done
LAST=${ARCHS##* }
GENCODE="$GENCODE -gencode arch=compute_$LAST,code=compute_$LAST"
COMMON="-std=c++17 -O3 -I$SRC -Xcompiler -fPIC,-fvisibility=hidden,-fvisibility-inlines-hidden"
t0=$(date +%s)
pids=()
for f in $SOURCES_CPP; do
  o="$OUT/obj/$(basename "${f%.*}").o"
  # -isystem: the TensorRT headers' own deprecation warnings would flood the log with -I.
  $NVCC $COMMON -Xcompiler -Wall,-Wextra,-Wno-unused-parameter -isystem "$TRT_INC" -c "$f" -o "$o" & pids+=($!)
done
for f in $SOURCES_CU; do
  o="$OUT/obj/$(basename "${f%.*}").o"
  $NVCC $COMMON -Xptxas -O3 $GENCODE -c "$f" -o "$o" & pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
[ $rc -eq 0 ] || { echo "plugins: compile failed" >&2; exit 1; }
objs=""
for f in $SOURCES_CPP $SOURCES_CU; do objs="$objs $OUT/obj/$(basename "${f%.*}").o"; done
# cudart is static (nvcc default); --exclude-libs keeps its symbols out of the dynamic table.
$NVCC -shared -o "$LIB.tmp" $objs -Xlinker --no-undefined -Xlinker --exclude-libs=ALL
mv "$LIB.tmp" "$LIB"
echo "plugins: built $LIB in $(( $(date +%s) - t0 )) s (sm: $ARCHS + compute_$LAST PTX; TensorRT headers: $TRT_INC)"
