#!/usr/bin/env bash
# The plugin kernels on the GPU machine, all cases, one device call (after bench/gpu_stage.sh here; a visit that
# also wants the pipeline runs bench/gpu_visit.sh instead, which has the small cases of step 1):
#   run(carry=[".gpu/plugins"], timeout_s=600, command="bash bench/gpu_kernels.sh 570")
# 1. tests/gpu: every plugin's enqueue vs the torch references, both attention paths (simt, mma), all dtypes and
#    head dims (the library and harness prebuilt here for sm_80..120) -> $OUT/kernels_tests.log
# 2. compute-sanitizer memcheck, then racecheck (the shared-memory tiles), on the 34 small bf16 head-dim-128 MMA
#    attention cases, instrumenting our attention kernels only (--kernel-name kns=Attention: varlenAttention*,
#    kvCacheAttention*; torch's kernels run uninstrumented) -> $OUT/memcheck.log, $OUT/racecheck.log
# 3. bench/bench_kernels.py --kernel simt mma: VarlenAttention TFLOP/s vs torch SDPA flash at 4k-16k tokens,
#    MRoPE GB/s vs a device copy -> $OUT/kernels_bench.log
# Each step within what is left of BUDGET_S (bench/gpu_lib.sh); $OUT/summary.md says what finished.
# usage: bash bench/gpu_kernels.sh BUDGET_S
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# = 1 ] || { echo "usage: bash bench/gpu_kernels.sh BUDGET_S" >&2; exit 64; }
GPU_ARGS="$*"
. bench/gpu_lib.sh
gpu_init "$1"
export QWEN_VL_PLUGIN_LIB=$PWD/.gpu/plugins/libqwen_vl_plugins.so QWEN_VL_HARNESS_LIB=$PWD/.gpu/plugins/libqwen_vl_harness.so
for f in "$QWEN_VL_PLUGIN_LIB" "$QWEN_VL_HARNESS_LIB"; do
  [ -f "$f" ] || { gpu_note "$f missing: run bench/gpu_stage.sh on the CPU machine and carry .gpu/plugins"; GPU_FAILED=1; gpu_finish; }
done
shim=/tmp/qwen_vl_trt_shim/qwen_vl_trt
mkdir -p "$shim" && for d in export runtime; do ln -sfn "$PWD/$d" "$shim/$d"; done
export PYTHONPATH=/tmp/qwen_vl_trt_shim${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import pytest" 2>/dev/null || export PYTHONPATH=$PYTHONPATH:$PWD/.gpu/pylib
gpu_note "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
gpu_note "$(python3 -c "import torch, pytest; print('torch', torch.__version__, 'pytest', pytest.__version__)" 2>&1 | tail -1)"
PYTEST=(python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts= -rfE)
gpu_step kernels_tests 60 270 "${PYTEST[@]}" tests/gpu --ignore=tests/gpu/test_ort_cuda.py
san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -z "$san" ]; then
  gpu_note "compute-sanitizer not found on this machine: memcheck / racecheck not run"
elif ! "$san" --help 2>&1 | grep -q -- "--kernel-name"; then
  gpu_note "$san has no --kernel-name filter: memcheck / racecheck not run (unfiltered, torch's kernels time out)"
else
  SMALL_MMA="mma and 128 and dtype1 and not long_16k and not frames_4x1k and not image_1k and not 300"
  for tool in memcheck racecheck; do
    gpu_step "$tool" 45 120 "$san" --tool "$tool" --kernel-name kns=Attention --error-exitcode 9 "${PYTEST[@]}" \
      tests/gpu/test_varlen_attention_numerics.py tests/gpu/test_kv_cache_attention_numerics.py -k "$SMALL_MMA"
  done
fi
gpu_step kernels_bench 60 240 python3 bench/bench_kernels.py --kernel simt mma
gpu_finish
