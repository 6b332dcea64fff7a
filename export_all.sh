#!/usr/bin/env bash
# export_all.sh [CHECKPOINT_DIR] [ARTIFACTS_DIR] [--dtype fp32|fp16|bf16] [--no-engines]
#               [--max-patches N] [--max-frames N] [--max-batch B] [--max-seq S] [--max-cache-len K]
#               [--compute-capabilities "8.6 12.0"] [--weights dense|int4] [--int4-block-size 32|64|128]
#
# Checkpoint -> ARTIFACTS_DIR (default: artifacts/, what `trt-run` reads by default):
#   vision/embed/decoder.onnx (+ .onnx.data), vision/decoder.ort.onnx (ONNX Runtime's fused flavour, same data),
#   TensorRT engines when a TensorRT module is importable,
#   the tokenizer/processor/generation files, manifest.json.
# Without CHECKPOINT_DIR a tiny random-weight Qwen3-VL demo checkpoint is made and used. Its default dtype is
# fp32 (ONNX Runtime's CPU provider has no bf16 MatMul); real checkpoints default to bf16, their own dtype.
# Uses $PYTHON, else the python on PATH.
set -euo pipefail

PY="${PYTHON:-python}"
POSITIONAL=()
DTYPE=""
ENGINES=1
LIMITS=()
CCS=""
WEIGHTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dtype) DTYPE="$2"; shift 2 ;;
    --no-engines) ENGINES=0; shift ;;
    --max-patches|--max-frames|--max-batch|--max-seq|--max-cache-len) LIMITS+=("$1" "$2"); shift 2 ;;
    --compute-capabilities) CCS="$2"; shift 2 ;;
    --weights|--int4-block-size) WEIGHTS+=("$1" "$2"); shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "export_all.sh: unknown option $1" >&2; exit 2 ;;
    *) POSITIONAL+=("$1"); shift ;;
  esac
done
if [ ${#POSITIONAL[@]} -gt 2 ]; then
  echo "export_all.sh: at most two positional arguments (CHECKPOINT_DIR ARTIFACTS_DIR)" >&2; exit 2
fi
CKPT="${POSITIONAL[0]:-}"
OUT="${POSITIONAL[1]:-artifacts}"

if [ -z "$CKPT" ]; then
  CKPT="$OUT/demo_checkpoint"
  DTYPE="${DTYPE:-fp32}"
  echo "[1/5] no checkpoint given: making the tiny random-weight Qwen3-VL demo checkpoint in $CKPT" \
       "(dtype ${DTYPE}: ONNX Runtime CPU cannot run bf16 MatMul)" >&2
  "$PY" -m qwen_vl_trt.export.demo_checkpoint "$CKPT" >&2
else
  DTYPE="${DTYPE:-bf16}"
  echo "[1/5] checkpoint $CKPT (dtype $DTYPE)" >&2
fi
if [ ! -f "$CKPT/config.json" ]; then
  echo "error: $CKPT/config.json not found (is $CKPT a Hugging Face checkpoint directory?)" >&2; exit 2
fi
case "$DTYPE" in
  fp32|float32) TRT_DTYPE=float32 ;;
  fp16|float16) TRT_DTYPE=float16 ;;
  bf16|bfloat16) TRT_DTYPE=bfloat16 ;;
  *) echo "error: --dtype $DTYPE: use fp32, fp16 or bf16" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
rm -f "$OUT/manifest.json" "$OUT"/{vision,embed,decoder}.engine  # never leave a stale manifest or engine behind

echo "[2/5] exporting vision/embed/decoder graphs to $OUT" >&2
"$PY" -m qwen_vl_trt.export.cli "$CKPT" "$OUT" --dtype "$DTYPE" "${WEIGHTS[@]}"

echo "[3/5] copying tokenizer, chat template, processor and generation configs" >&2
"$PY" -m qwen_vl_trt.export.artifacts copy "$CKPT" "$OUT"

MANIFEST_FLAGS=()
if [ "$ENGINES" = 1 ] && [ -f "$(dirname "$0")/export/build_engines.py" ] \
   && "$PY" -c "from qwen_vl_trt.model.trt_compat import import_tensorrt; import_tensorrt()" >/dev/null 2>&1; then
  PLUGIN_LIB="$("$PY" -c "from qwen_vl_trt.model.trt_compat import plugin_library_path as p; print(p())")"
  PLUGIN_FLAGS=()
  if [ -f "$PLUGIN_LIB" ]; then PLUGIN_FLAGS=(--plugins "$PLUGIN_LIB"); fi
  CC_FLAGS=()
  if [ -n "$CCS" ]; then read -r -a CC_ARR <<<"$CCS"; CC_FLAGS=(--compute-capabilities "${CC_ARR[@]}"); fi
  echo "[4/5] building TensorRT engines (this can take minutes per graph)" >&2
  LD_LIBRARY_PATH="$("$PY" -m qwen_vl_trt.model.trt_compat)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    "$PY" -m qwen_vl_trt.export.build_engines "$OUT" --dtype "$TRT_DTYPE" "${LIMITS[@]}" \
    "${PLUGIN_FLAGS[@]}" "${CC_FLAGS[@]}"
  MANIFEST_FLAGS=(--engines "${PLUGIN_FLAGS[@]}")
elif [ "$ENGINES" = 0 ]; then
  echo "[4/5] --no-engines: skipping engines" >&2
else
  echo "[4/5] TensorRT not available: skipping engines" >&2
fi

echo "[5/5] writing $OUT/manifest.json" >&2
"$PY" -m qwen_vl_trt.export.artifacts manifest "$CKPT" "$OUT" --dtype "$DTYPE" "${LIMITS[@]}" "${MANIFEST_FLAGS[@]}"
echo "done: trt-run --model-dir $OUT --image PICTURE" >&2
