#!/usr/bin/env bash
# Drift check (not part of CI): run the HF-comparison tests against a newer transformers than
# scripts/constraints.txt pins, in a scratch venv, and print what differs.
#
#   bash scripts/check-upstream.sh                 # newest transformers on the index
#   bash scripts/check-upstream.sh 5.24.0          # a given version
#   TESTS="tests/test_prompt.py" bash scripts/check-upstream.sh   # a narrower selection
#
# The scratch venv (.venv-upstream, git-ignored) sees the project's .venv for everything heavy (torch,
# torchvision, onnxruntime) through a path entry, and installs on top of it only transformers and whatever
# that release needs newer. Exit status: 0 when every selected test passes, 1 otherwise (the differences are
# printed); docs/upstream-drift.md records past runs and which differences are intended.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-}
TESTS=${TESTS:-tests/test_prompt.py tests/test_video_vs_hf.py tests/test_preprocess.py tests/test_positions.py \
  tests/test_export_qwen3_vl.py tests/test_qwen2_5_vl.py tests/test_moe.py tests/test_generate.py}
[ -x .venv/bin/python ] || bash scripts/setup.sh
BASE_SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf .venv-upstream
.venv/bin/python -m venv .venv-upstream
UP_SITE=$(.venv-upstream/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$BASE_SITE" > "$UP_SITE/project-venv.pth"   # appended after the scratch venv's own site-packages
SPEC=transformers${VERSION:+==$VERSION}
.venv-upstream/bin/python -m pip install -q --upgrade "$SPEC"
.venv-upstream/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
  || .venv-upstream/bin/python -m pip install -q --no-deps -e .
PINNED=$(grep '^transformers==' scripts/constraints.txt | cut -d= -f3)
NOW=$(.venv-upstream/bin/python -c 'import transformers; print(transformers.__version__)')
echo "check-upstream: transformers $NOW (pinned: $PINNED); tests: $TESTS"
set +e
# shellcheck disable=SC2086
.venv-upstream/bin/python -m pytest -q -m "not gpu" -p no:cacheprovider -rf --tb=line $TESTS
rc=$?
set -e
if [ $rc -eq 0 ]; then echo "check-upstream: no difference with transformers $NOW"; else
  echo "check-upstream: transformers $NOW differs from what the project matches (failures above); see docs/upstream-drift.md"; fi
exit $rc
