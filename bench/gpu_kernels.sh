#!/usr/bin/env bash
# Issue 4 on the GPU machine, one device call (after bench/gpu_stage.sh here):
#   run(carry=[".gpu/plugins", ".gpu/pylib"], timeout_s=560, command="bash bench/gpu_kernels.sh")
# 1. tests/gpu: every plugin's enqueue vs the torch references, both attention paths (simt, mma), all dtypes and
#    head dims (the library and harness prebuilt here for sm_80..120; log $OUT/kernels_tests.log);
# 2. compute-sanitizer (memcheck, then racecheck on the shared-memory tiles) on a subset of the attention cases
#    when the tool is installed ($OUT/sanitizer.log);
# 3. bench/bench_kernels.py --kernel simt mma: VarlenAttention TFLOP/s vs torch SDPA flash at 4k-16k tokens,
#    MRoPE GB/s vs a device copy ($OUT/kernels_bench.log).
# Each step has its own time limit so the call ends inside 560 s with whatever finished.
set -uo pipefail
OUT=${OUT:-/tmp/kernels-out}
mkdir -p "$OUT"
t0=$(date +%s)
export QWEN_VL_PLUGIN_LIB=$PWD/.gpu/plugins/libqwen_vl_plugins.so QWEN_VL_HARNESS_LIB=$PWD/.gpu/plugins/libqwen_vl_harness.so
for f in "$QWEN_VL_PLUGIN_LIB" "$QWEN_VL_HARNESS_LIB"; do
  [ -f "$f" ] || { echo "$f missing: run bench/gpu_stage.sh on the CPU machine and carry .gpu/plugins"; exit 3; }
done
shim=/tmp/qwen_vl_trt_shim/qwen_vl_trt
mkdir -p "$shim" && for d in export runtime; do ln -sfn "$PWD/$d" "$shim/$d"; done
export PYTHONPATH=$PWD/.gpu/pylib:/tmp/qwen_vl_trt_shim${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, pytest; print('torch', torch.__version__, 'pytest', pytest.__version__)" | tee -a "$OUT/device.txt"
timeout 270 python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu --ignore=tests/gpu/test_ort_cuda.py \
  -o addopts="" 2>&1 | tail -60 | tee "$OUT/kernels_tests.log"
san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$san" ]; then
  for tool in memcheck racecheck; do
    timeout 60 "$san" --tool "$tool" --error-exitcode 9 python3 -m pytest -q -m gpu -p no:cacheprovider -x \
      tests/gpu/test_varlen_attention_numerics.py tests/gpu/test_kv_cache_attention_numerics.py \
      -k "mma and 128 and dtype1" -o addopts="" 2>&1 | tail -15 | sed "s/^/[$tool] /" | tee -a "$OUT/sanitizer.log"
  done
else
  echo "compute-sanitizer not found on this machine" | tee "$OUT/sanitizer.log"
fi
left=$((540 - ($(date +%s) - t0)))
timeout "$left" python3 bench/bench_kernels.py --kernel simt mma 2>&1 | tee "$OUT/kernels_bench.log"
echo "done after $(( $(date +%s) - t0 )) s"
