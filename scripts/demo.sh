#!/usr/bin/env bash
# The main job on the built-in default: tiny random-weight Qwen3-VL checkpoint -> graphs (+ engines when
# TensorRT is present) -> trt-run on a generated picture. Random weights: the text is gibberish by design.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if command -v nvcc >/dev/null 2>&1; then bash plugins/build.sh; fi  # engines then use our plugin kernels
export PATH="$PWD/.venv/bin:$PATH"
bash export_all.sh
python -c "
import numpy as np; from PIL import Image
y, x = np.mgrid[0:240, 0:320]
Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype('uint8')).save('artifacts/demo.png')"
trt-run --model-dir artifacts --image artifacts/demo.png --max-new-tokens 16 --temperature 0
