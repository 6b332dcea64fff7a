#!/usr/bin/env bash
# The test command: set up (which builds the ONNX Runtime kernel library), build the TensorRT plugin library if nvcc
# is present, run the CPU suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f plugins/build.sh ] && command -v nvcc >/dev/null 2>&1; then
  bash plugins/build.sh
fi
bash runtime/cpp/build.sh
exec .venv/bin/python -m pytest -q -m "not gpu" -p no:cacheprovider "$@"
