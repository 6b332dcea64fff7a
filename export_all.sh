#!/usr/bin/env bash
# export_all.sh [CHECKPOINT_DIR] [ARTIFACTS_DIR] [--dtype fp32|fp16|bf16] [--no-engines]
#               [--max-patches N] [--max-frames N] [--max-batch B] [--max-seq S] [--max-cache-len K]
#               [--compute-capabilities "8.6 12.0"] [--weights FORMATS]
#               [--int4-block-size 16|32|64|128] [--int4-activations fp32|int8]
#
# Checkpoint -> ARTIFACTS_DIR (default: artifacts/, what `trt-run` reads by default): the graphs, TensorRT engines
# when a TensorRT module is importable, the tokenizer/processor/generation files, manifest.json. Without
# CHECKPOINT_DIR a tiny random-weight Qwen3-VL demo checkpoint is made and used (fp32 by default). Every step is
# export/export_all.py (`export_all(...)` in Python); this script only calls it with $PYTHON, else the python on
# PATH, else this checkout's .venv/bin/python.
set -euo pipefail
# Without $PYTHON, a python on PATH that cannot import qwen_vl_trt gives way to .venv (scripts/setup.sh makes it).
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python}"
if [ -z "${PYTHON:-}" ] && ! "$py" -c "import qwen_vl_trt" 2>/dev/null && [ -x "$here/.venv/bin/python" ]; then
    py="$here/.venv/bin/python"
fi
if ! "$py" -c "import qwen_vl_trt" 2>/dev/null; then
    echo "error: $py cannot import qwen_vl_trt: run 'bash scripts/setup.sh' (makes .venv/) or set PYTHON" >&2
    exit 2
fi
exec "$py" -m qwen_vl_trt.export.export_all "$@"
