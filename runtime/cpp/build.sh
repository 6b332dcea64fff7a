#!/usr/bin/env bash
# Builds build/runtime_cpp/qwen-vl-generate, the C++ runtime (runtime/cpp/, docs/cpp-runtime.md).
#
#   bash runtime/cpp/build.sh            # incremental: recompiles only sources newer than their object
#   bash runtime/cpp/build.sh --force    # rebuild everything
#
# Host code: g++ -std=c++17 (CXX to override), JSON through nlohmann/json from the nlohmann_json wheel
# (scripts/setup.sh installs it). The tensorrt backend (trt_backend.cpp) is compiled only when all three are found:
#   TensorRT headers   $TENSORRT_ROOT/include, a system include dir, else the kernel-lens wheel's headers that
#                      plugins/build.sh fetches into third_party/ (fetched here the same way when missing);
#   a TensorRT library libnvinfer.so ($TENSORRT_ROOT/lib or the system), else libtensorrt_rtx.so of the
#                      tensorrt_rtx wheel in .venv;
#   the CUDA runtime   $CUDA_HOME (default /usr/local/cuda): include/cuda_runtime_api.h and lib64/libcudart.so.
# Otherwise the binary is built without it, and `--backend tensorrt` says so.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
SRC="$ROOT/runtime/cpp"
OUT="$ROOT/build/runtime_cpp"
BIN="$OUT/qwen-vl-generate"
CXX="${CXX:-g++}"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT/obj"
[ "${1:-}" = "--force" ] && rm -f "$OUT"/obj/*.o "$BIN"

JSON_INC="$("$PY" -c 'import nlohmann_json, os; print(os.path.join(os.path.dirname(nlohmann_json.__file__), "include"))' 2>/dev/null || true)"
if [ -z "$JSON_INC" ] || [ ! -f "$JSON_INC/nlohmann/json.hpp" ]; then
  echo "runtime_cpp: nlohmann/json.hpp not found; pip install nlohmann_json==3.12.0 (scripts/setup.sh does)" >&2
  exit 1
fi

find_trt_include() {
  if [ -n "${TENSORRT_ROOT:-}" ] && [ -f "$TENSORRT_ROOT/include/NvInferRuntime.h" ]; then echo "$TENSORRT_ROOT/include"; return; fi
  for d in /usr/include/x86_64-linux-gnu /usr/include/aarch64-linux-gnu /usr/include /usr/local/include; do
    if [ -f "$d/NvInferRuntime.h" ]; then echo "$d"; return; fi
  done
  local inc="$ROOT/third_party/kernel_lens/include/tensorrt"
  if [ ! -f "$inc/NvInferRuntime.h" ]; then
    local pip="python3 -m pip"
    [ -x "$ROOT/.venv/bin/pip" ] && pip="$ROOT/.venv/bin/pip"
    mkdir -p "$ROOT/third_party"
    $pip download -q --no-deps -d "$ROOT/third_party" kernel-lens==2.0.1 >&2 2>/dev/null || return 0
    "$PY" - "$ROOT/third_party" <<'PY'
import glob, sys, zipfile
tp = sys.argv[1]
z = zipfile.ZipFile(sorted(glob.glob(f"{tp}/kernel_lens-2.0.1-*.whl"))[0])
for n in z.namelist():
    if n.startswith("kernel_lens/include/tensorrt/"):
        z.extract(n, tp)
PY
  fi
  [ -f "$inc/NvInferRuntime.h" ] && echo "$inc"
}

find_trt_lib() {  # prints "<dir> <-l argument>" or nothing
  for d in "${TENSORRT_ROOT:-/nonexistent}/lib" /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib /usr/local/lib; do
    if [ -f "$d/libnvinfer.so" ]; then echo "$d nvinfer"; return; fi
  done
  local d
  d="$("$PY" -c 'import tensorrt_rtx_libs, os; print(os.path.dirname(tensorrt_rtx_libs.__file__))' 2>/dev/null || true)"
  # the wheel ships only the versioned file (libtensorrt_rtx.so.1): link it by name
  if [ -n "$d" ] && [ -f "$d/libtensorrt_rtx.so.1" ]; then echo "$d :libtensorrt_rtx.so.1"; fi
}

CUDA="${CUDA_HOME:-/usr/local/cuda}"
TRT_INC="$(find_trt_include || true)"
TRT_LIB="$(find_trt_lib || true)"
WITH_TRT=0
MISSING=""
[ -n "$TRT_INC" ] || MISSING="no TensorRT headers"
[ -n "$TRT_LIB" ] || MISSING="${MISSING:+$MISSING, }no libnvinfer / libtensorrt_rtx"
{ [ -f "$CUDA/include/cuda_runtime_api.h" ] && [ -f "$CUDA/lib64/libcudart.so" ]; } || MISSING="${MISSING:+$MISSING, }no CUDA runtime in $CUDA"
[ -z "$MISSING" ] && WITH_TRT=1

FLAGS="-std=c++17 -O2 -Wall -Wextra -ffp-contract=off -I$SRC -isystem $JSON_INC"
HOST_SOURCES="tensor safetensors manifest request vision_inputs positions sampling generate worker_backend main"
if [ $WITH_TRT = 1 ]; then
  BACKEND=trt_backend
  BACKEND_FLAGS="-isystem $TRT_INC -isystem $CUDA/include -Wno-deprecated-declarations"
  read -r LIBDIR LIBNAME <<<"$TRT_LIB"
  LINK="-L$LIBDIR -l$LIBNAME -Wl,-rpath,$LIBDIR -L$CUDA/lib64 -lcudart -Wl,-rpath,$CUDA/lib64"
else
  BACKEND=trt_unavailable
  BACKEND_FLAGS=""
  LINK=""
fi
STAMP="$OUT/obj/config"
CONFIG="$CXX $FLAGS | $BACKEND $BACKEND_FLAGS $MISSING | $LINK"
[ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$CONFIG" ] || { rm -f "$OUT"/obj/*.o; echo "$CONFIG" > "$STAMP"; }

t0=$(date +%s)
newest_header=$(ls -t "$SRC"/*.h | head -1)
pids=(); built=0
for name in $HOST_SOURCES $BACKEND; do
  src="$SRC/$name.cpp" obj="$OUT/obj/$name.o"
  if [ -f "$obj" ] && [ "$obj" -nt "$src" ] && [ "$obj" -nt "$newest_header" ]; then continue; fi
  extra=""; [ "$name" = "$BACKEND" ] && extra="$BACKEND_FLAGS"
  why=""; [ "$name" = trt_unavailable ] && why="-DQVL_TRT_MISSING=\"$MISSING\""
  # shellcheck disable=SC2086
  $CXX $FLAGS $extra ${why:+"$why"} -c "$src" -o "$obj" & pids+=($!); built=$((built + 1))
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}" || { echo "runtime_cpp: compile failed" >&2; exit 1; }; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || { echo "runtime_cpp: compile failed" >&2; exit 1; }; done
objs=""; for name in $HOST_SOURCES $BACKEND; do objs="$objs $OUT/obj/$name.o"; done
if [ $built -eq 0 ] && [ -f "$BIN" ]; then
  echo "runtime_cpp: $BIN is up to date"; exit 0
fi
# shellcheck disable=SC2086
$CXX -o "$BIN.tmp" $objs $LINK
mv "$BIN.tmp" "$BIN"
if [ $WITH_TRT = 1 ]; then
  echo "runtime_cpp: built $BIN in $(( $(date +%s) - t0 )) s (backends: worker, tensorrt [-l$LIBNAME, headers $TRT_INC])"
else
  echo "runtime_cpp: built $BIN in $(( $(date +%s) - t0 )) s (backends: worker; tensorrt not built: $MISSING)"
fi
