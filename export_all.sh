#!/usr/bin/env bash
# export_all.sh [CHECKPOINT_DIR] [ARTIFACTS_DIR] [--dtype fp32|fp16|bf16] [--no-engines]
#               [--max-patches N] [--max-frames N] [--max-batch B] [--max-seq S] [--max-cache-len K]
#               [--compute-capabilities "8.6 12.0"] [--weights FORMATS]
#               [--int4-block-size 16|32|64|128] [--int4-activations fp32|int8]
#
# Checkpoint -> ARTIFACTS_DIR (default: artifacts/, what `trt-run` reads by default): the graphs, TensorRT engines
# when a TensorRT module is importable, the tokenizer/processor/generation files, manifest.json. Without
# CHECKPOINT_DIR a tiny random-weight Qwen3-VL demo checkpoint is made and used (fp32 by default). Every step is
# export/export_all.py (`export_all(...)` in Python); this script only calls it with $PYTHON, else the python on PATH.
set -euo pipefail
exec "${PYTHON:-python}" -m qwen_vl_trt.export.export_all "$@"
